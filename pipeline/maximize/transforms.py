"""Random transforms an image must survive while it is optimised (Lucid's ``transform``).

A :class:`Transform` is a function ``(images, u) -> images`` plus the number of random numbers
it draws per image (``n_random``). ``u`` is a ``(B, n_random)`` array of uniforms in [0, 1) that
the render loop draws from each image's own seed, so an image's transforms depend only on its
seed and step, never on which other images share its batch. Randomness is per image.

Transforms are built by small functions (``jitter(4)``) and chained by :func:`compose`.
``pad`` and ``jitter`` change the image size (Lucid semantics); ``random_scale`` and
``random_rotate`` keep it; :func:`crop_or_pad` brings a batch back to the model's input size.

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

import math
from dataclasses import dataclass
from typing import Callable

from pipeline.backend.tf import tensorflow

tf = tensorflow()


@dataclass(frozen=True)
class Transform:
    """``fn(images, u) -> images`` drawing ``n_random`` uniforms per image."""

    fn: Callable
    n_random: int = 0
    name: str = "transform"

    def __call__(self, images, u=None):
        return self.fn(tf.convert_to_tensor(images, tf.float32), u)


def _warp(images, matrices, out_hw, interpolation="BILINEAR", fill_mode="REFLECT", fill_value=0.5):
    """Sample ``images`` at ``M @ (x, y, 1)`` for each output pixel; ``matrices`` is ``(B, 8)``."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.cast(matrices, tf.float32), output_shape=tf.constant(out_hw, tf.int32),
        fill_value=tf.constant(fill_value, tf.float32), interpolation=interpolation, fill_mode=fill_mode)


def _static_hw(images):
    h, w = images.shape[1], images.shape[2]
    if h is None or w is None:
        raise ValueError("transforms need images with a static height and width")
    return int(h), int(w)


def pad(width, value=0.5) -> Transform:
    """Pad every side by ``width`` pixels of constant ``value`` (0.5 = mid-grey)."""
    def fn(images, u):
        return tf.pad(images, [[0, 0], [width, width], [width, width], [0, 0]], constant_values=value)

    return Transform(fn, 0, f"pad({width})")


def jitter(d) -> Transform:
    """Crop ``d`` pixels off each axis at a random offset per image (the image shrinks by ``d``)."""
    def fn(images, u):
        h, w = _static_hw(images)
        offset = tf.floor(tf.cast(u, tf.float32) * (d + 1))  # integers 0..d
        ones, zeros = tf.ones_like(offset[:, 0]), tf.zeros_like(offset[:, 0])
        m = tf.stack([ones, zeros, offset[:, 0], zeros, ones, offset[:, 1], zeros, zeros], axis=1)
        return _warp(images, m, [h - d, w - d], interpolation="NEAREST")

    return Transform(fn, 2, f"jitter({d})")


def _about_centre(images, a, b, c, d):
    """Warp with the linear map ``[[a, b], [c, d]]`` (output -> input) about the image centre."""
    h, w = _static_hw(images)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    zeros = tf.zeros_like(a)
    m = tf.stack([a, b, cx - a * cx - b * cy, c, d, cy - c * cx - d * cy, zeros, zeros], axis=1)
    return _warp(images, m, [h, w])


def random_scale(low=0.9, high=1.1) -> Transform:
    """Zoom each image by a factor drawn uniformly from [low, high], keeping its size."""
    def fn(images, u):
        s = low + (high - low) * tf.cast(u[:, 0], tf.float32)
        zeros = tf.zeros_like(s)
        return _about_centre(images, 1.0 / s, zeros, zeros, 1.0 / s)

    return Transform(fn, 1, f"random_scale({low}, {high})")


def random_rotate(degrees=10.0) -> Transform:
    """Rotate each image by an angle drawn uniformly from [-degrees, degrees], keeping its size."""
    def fn(images, u):
        angle = (2.0 * tf.cast(u[:, 0], tf.float32) - 1.0) * (degrees * math.pi / 180.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        return _about_centre(images, cos, -sin, sin, cos)

    return Transform(fn, 1, f"random_rotate({degrees})")


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

    return Transform(fn, 0, f"crop_or_pad({height}, {width})")


def compose(transforms) -> Transform:
    """Apply ``transforms`` in order; each gets its own slice of the random numbers."""
    transforms = list(transforms)
    sizes = [t.n_random for t in transforms]

    def fn(images, u):
        start = 0
        for t, n in zip(transforms, sizes):
            images = t.fn(images, None if n == 0 else u[:, start:start + n])
            start += n
        return images

    return Transform(fn, sum(sizes), " -> ".join(t.name for t in transforms) or "identity")


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
