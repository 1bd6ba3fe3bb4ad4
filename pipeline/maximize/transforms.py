"""Random transforms an image must survive while it is optimised (Lucid's ``transform``).

A :class:`Transform` is a function ``(images, u) -> images`` plus the number of random numbers
it draws per image (``n_random``). ``u`` is a ``(B, n_random)`` array of uniforms in [0, 1) that
the render loop draws from each image's own seed, so an image's transforms depend only on its
seed and step, never on which other images share its batch. Randomness is per image.

Transforms are built by small functions (``jitter(4)``) and chained by :func:`compose`.
``pad`` and ``jitter`` change the image size (Lucid semantics); ``random_scale`` and
``random_rotate`` keep it; :func:`crop_or_pad` brings a batch back to the model's input size.

Every geometric transform here is also an affine map (:class:`Affine`): which input pixel each
output pixel samples. :func:`compose` multiplies the maps of consecutive geometric transforms
and samples the image once: the standard chain (pad, jitter, scale, rotate, jitter, crop) is one
bilinear warp of the image instead of five passes over a padded copy, forward and backward. On a
mini-Xception at 64x64 (batch 32) the warps took 11 % of a step as a chain. Integer jitter offsets
sample exactly under bilinear interpolation, and what lies beyond the image is the padding's grey,
as in the chain; what differs is that scaling and rotation interpolate once, not twice.

Examples
--------
>>> import numpy as np
>>> t = compose([pad(2), jitter(4)])
>>> t.n_random
2
>>> out = t(np.zeros((3, 8, 8, 1), np.float32), np.full((3, 2), 0.5, np.float32))
>>> tuple(out.shape)
(3, 8, 8, 1)
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.backend.tf import tensorflow

tf = tensorflow()


@dataclass(frozen=True)
class Affine:
    """A geometric transform as a map from output to input pixel coordinates.

    Attributes
    ----------
    matrix : callable
        ``matrix((h, w), u, n) -> ((n, 3, 3) tensor, (out_h, out_w))``: homogeneous ``(x, y, 1)``
        of an output pixel to the input pixel it samples, for ``n`` inputs of ``(h, w)``.
    fill : float or None
        Value beyond the input's edge (``pad``), or ``None`` to reflect the image there.
    bilinear : bool
        Whether the transform needs interpolation (jitter and crops move by whole pixels).
    """

    matrix: Callable
    fill: Optional[float] = None
    bilinear: bool = False


@dataclass(frozen=True)
class Transform:
    """``fn(images, u) -> images`` drawing ``n_random`` uniforms per image (``affine`` when geometric)."""

    fn: Callable
    n_random: int = 0
    name: str = "transform"
    affine: Optional[Affine] = None

    def __call__(self, images, u=None):
        return self.fn(tf.convert_to_tensor(images, tf.float32), u)


_TRACING = threading.local()


@contextlib.contextmanager
def for_xla(on=True):
    """While a graph is traced in this context, warps with a constant fill use gathers (:func:`_sample`).

    ``ImageProjectiveTransformV3`` has no XLA kernel; the gathers are about 1.8x slower than it
    without XLA (64x64 output, batch 32, forward and backward on 2 CPU cores), so they are used
    only for graphs compiled with XLA.
    """
    before = getattr(_TRACING, "xla", False)
    _TRACING.xla = bool(on)
    try:
        yield
    finally:
        _TRACING.xla = before


def _warp(images, matrices, out_hw, interpolation="BILINEAR", fill_mode="REFLECT", fill_value=0.5):
    """Sample ``images`` at ``M @ (x, y, 1)`` for each output pixel; ``matrices`` is ``(B, 8)``."""
    if getattr(_TRACING, "xla", False) and fill_mode == "CONSTANT":
        return _sample(images, matrices, out_hw, interpolation == "BILINEAR", fill_value)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.cast(matrices, tf.float32), output_shape=tf.constant(out_hw, tf.int32),
        fill_value=tf.constant(fill_value, tf.float32), interpolation=interpolation, fill_mode=fill_mode)


def _sample(images, matrices, out_hw, bilinear=True, fill_value=0.5):
    """:func:`_warp` with a constant fill, from gathers: ops XLA can compile.

    The same sampling as ``ImageProjectiveTransformV3`` (pixel centres at integer coordinates,
    each of the four neighbours outside the image reads ``fill_value``), for affine matrices.
    Its gradient is the exact adjoint of the sampling (a scatter-add).
    """
    h, w = _static_hw(images)
    oh, ow = out_hw
    channels = images.shape[-1]
    ys, xs = tf.meshgrid(tf.range(oh, dtype=tf.float32), tf.range(ow, dtype=tf.float32), indexing="ij")
    grid = tf.stack([tf.reshape(xs, [-1]), tf.reshape(ys, [-1]), tf.ones([oh * ow])], axis=0)  # (3, P)
    m = tf.reshape(tf.cast(matrices, tf.float32), [-1, 8])
    src = tf.linalg.matmul(tf.reshape(m[:, :6], [-1, 2, 3]), grid)  # (B, 2, P): x, y
    flat = tf.reshape(images, [tf.shape(images)[0], h * w, -1])

    def read(x, y):
        inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
        index = tf.cast(tf.clip_by_value(y, 0, h - 1) * w + tf.clip_by_value(x, 0, w - 1), tf.int32)
        values = tf.gather(flat, index, batch_dims=1)
        return tf.where(inside[..., None], values, tf.constant(fill_value, images.dtype))

    x, y = src[:, 0], src[:, 1]
    if bilinear:
        x0, y0 = tf.floor(x), tf.floor(y)
        fx, fy = (x - x0)[..., None], (y - y0)[..., None]
        out = ((1 - fy) * ((1 - fx) * read(x0, y0) + fx * read(x0 + 1, y0))
               + fy * ((1 - fx) * read(x0, y0 + 1) + fx * read(x0 + 1, y0 + 1)))
    else:
        out = read(tf.round(x), tf.round(y))
    return tf.reshape(out, [-1, oh, ow, channels])


def _static_hw(images):
    h, w = images.shape[1], images.shape[2]
    if h is None or w is None:
        raise ValueError("transforms need images with a static height and width")
    return int(h), int(w)


def pad(width, value=0.5) -> Transform:
    """Pad every side by ``width`` pixels of constant ``value`` (0.5 = mid-grey)."""
    def fn(images, u):
        return tf.pad(images, [[0, 0], [width, width], [width, width], [0, 0]], constant_values=value)

    def matrix(hw, u, n):
        return _translation(n, -width, -width), (hw[0] + 2 * width, hw[1] + 2 * width)

    return Transform(fn, 0, f"pad({width})", Affine(matrix, fill=value))


def jitter(d) -> Transform:
    """Crop ``d`` pixels off each axis at a random offset per image (the image shrinks by ``d``)."""
    def offsets(u):
        return tf.floor(tf.cast(u, tf.float32) * (d + 1))  # integers 0..d

    def matrix(hw, u, n):
        offset = offsets(u)
        return _translation(n, offset[:, 0], offset[:, 1]), (hw[0] - d, hw[1] - d)

    return _geometric(Affine(matrix), 2, f"jitter({d})")


def _geometric(affine, n_random, name) -> Transform:
    """The transform that samples the image through ``affine`` (its own warp when not fused)."""
    return Transform(_warp_fn(affine), n_random, name, affine)


def _translation(n, dx, dy):
    """``(n, 3, 3)`` matrices moving by ``(dx, dy)`` (tensors or numbers)."""
    dx = tf.broadcast_to(tf.cast(dx, tf.float32), [n])
    dy = tf.broadcast_to(tf.cast(dy, tf.float32), [n])
    ones, zeros = tf.ones([n]), tf.zeros([n])
    return tf.reshape(tf.stack([ones, zeros, dx, zeros, ones, dy, zeros, zeros, ones], axis=1), [-1, 3, 3])


def _centred(hw, a, b, c, d):
    """``(B, 3, 3)`` matrices of the linear map ``[[a, b], [c, d]]`` about the centre of an ``hw`` image."""
    h, w = hw
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    zeros, ones = tf.zeros_like(a), tf.ones_like(a)
    m = tf.stack([a, b, cx - a * cx - b * cy, c, d, cy - c * cx - d * cy, zeros, zeros, ones], axis=1)
    return tf.reshape(m, [-1, 3, 3]), (h, w)


def random_scale(low=0.9, high=1.1) -> Transform:
    """Zoom each image by a factor drawn uniformly from [low, high], keeping its size."""
    def linear(u):
        s = low + (high - low) * tf.cast(u[:, 0], tf.float32)
        zeros = tf.zeros_like(s)
        return 1.0 / s, zeros, zeros, 1.0 / s

    return _geometric(Affine(lambda hw, u, n: _centred(hw, *linear(u)), bilinear=True), 1,
                      f"random_scale({low}, {high})")


def random_rotate(degrees=10.0) -> Transform:
    """Rotate each image by an angle drawn uniformly from [-degrees, degrees], keeping its size."""
    def linear(u):
        angle = (2.0 * tf.cast(u[:, 0], tf.float32) - 1.0) * (degrees * math.pi / 180.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        return cos, -sin, sin, cos

    return _geometric(Affine(lambda hw, u, n: _centred(hw, *linear(u)), bilinear=True), 1,
                      f"random_rotate({degrees})")


def crop_or_pad(height, width, value=0.5) -> Transform:
    """Centre-crop or pad (with ``value``) to ``height`` x ``width``; no randomness."""
    def fn(images, u):
        h, w = _static_hw(images)
        top, left = (h - height) // 2, (w - width) // 2
        if top < 0 or left < 0:
            pt, pl = max(-top, 0), max(-left, 0)
            images = tf.pad(images, [[0, 0], [pt, max(height - h - pt, 0)], [pl, max(width - w - pl, 0)], [0, 0]],
                            constant_values=value)
            top, left = max(top, 0), max(left, 0)
        return images[:, top:top + height, left:left + width, :]

    def matrix(hw, u, n):
        # Same placement as fn: the top-left offset (h - height) // 2 (negative: padding).
        return _translation(n, (hw[1] - width) // 2, (hw[0] - height) // 2), (height, width)

    return Transform(fn, 0, f"crop_or_pad({height}, {width})", Affine(matrix, fill=value))


def compose(transforms, fuse=True) -> Transform:
    """Apply ``transforms`` in order; each gets its own slice of the random numbers.

    With ``fuse``, each run of consecutive geometric transforms (``affine``) samples the image
    once, through the product of their maps (see the module notes); otherwise each runs alone.
    """
    transforms = list(transforms)
    sizes = [t.n_random for t in transforms]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    steps = _fused_runs(transforms, starts, sizes) if fuse else [
        (t.fn, start, n) for t, start, n in zip(transforms, starts, sizes)]

    def fn(images, u):
        for step, start, n in steps:
            images = step(images, None if n == 0 else u[:, start:start + n])
        return images

    affine = _product(transforms, starts, sizes) if fuse and transforms and all(
        t.affine for t in transforms) else None
    return Transform(fn, sum(sizes), " -> ".join(t.name for t in transforms) or "identity", affine)


def _product(transforms, starts, sizes):
    """The :class:`Affine` of affine ``transforms`` done in order (so a composed chain fuses with more)."""
    fills = [t.affine.fill for t in transforms if t.affine.fill is not None]

    def matrix(hw, u, n):
        total = None
        for t, start, k in zip(transforms, starts, sizes):
            m, hw = t.affine.matrix(hw, None if k == 0 else u[:, start:start + k], n)
            total = m if total is None else tf.linalg.matmul(total, m)
        return total, hw

    return Affine(matrix, fills[0] if fills else None, any(t.affine.bilinear for t in transforms))


def _fused_runs(transforms, starts, sizes):
    """``[(fn, start, n)]``: lone transforms as they are, runs of two or more affine ones fused."""
    steps, run = [], []

    def flush():
        if len(run) == 1:
            t, start, n = run[0]
            steps.append((t.fn, start, n))
        elif run:
            first = run[0][1]  # the run's random numbers start here
            affine = _product([t for t, *_ in run], [s - first for _, s, _ in run], [n for *_, n in run])
            steps.append((_warp_fn(affine), first, sum(n for *_, n in run)))
        run.clear()

    for t, start, n in zip(transforms, starts, sizes):
        if t.affine is None:
            flush()
            steps.append((t.fn, start, n))
        else:
            run.append((t, start, n))
    flush()
    return steps


def _warp_fn(affine):
    """``fn(images, u)``: one warp of the images through ``affine`` (:class:`Affine`)."""
    def fn(images, u):
        total, hw = affine.matrix(_static_hw(images), u, tf.shape(images)[0])
        flat = tf.reshape(total, [-1, 9])[:, :8]  # the last row stays (0, 0, 1)
        fill = affine.fill is not None
        return _warp(images, flat, list(hw), "BILINEAR" if affine.bilinear else "NEAREST",
                     "CONSTANT" if fill else "REFLECT", affine.fill if fill else 0.0)

    return fn


def identity() -> Transform:
    """No transform."""
    return compose([])


def standard(size, scale=(0.9, 1.1), degrees=10.0) -> Transform:
    """Lucid's standard robustness chain, scaled to an image of ``size`` pixels (Lucid's is for 128).

    pad 12, jitter 8, scale 0.9-1.1, rotate +-10 degrees, jitter 4 (pixel amounts times
    ``size / 128``, at least 1). ``scale=None`` / ``degrees=None`` leave out those steps
    (:func:`jitter_only`). Follow it with :func:`crop_or_pad` for fixed-size models.
    """
    k = size / 128.0

    def px(n):
        return max(1, int(round(n * k)))

    chain = [pad(px(12)), jitter(px(8))]
    if scale is not None:
        chain.append(random_scale(*scale))
    if degrees:
        chain.append(random_rotate(degrees))
    return compose(chain + [jitter(px(4))])


def jitter_only(size) -> Transform:
    """The standard chain without scaling and rotation: padding and random translation only."""
    return standard(size, scale=None, degrees=None)
