"""Counterfactual probes: small seeded image transforms that each remove one cue and keep the others.

A probe answers "what does the model say when this image loses its colour / its texture / its
shape?". Each one works on pixels in [0, 255] (before the model's ``data.scale``), on uint8 or
float batches ``(B, H, W, C)``, and returns the same dtype and shape.

======================  =========  ===============================================================
probe                   group      removes → keeps
======================  =========  ===============================================================
``grayscale``           colour     hue and saturation → luminance, texture, shape
``hue_rotation``        colour     hue (rotated 60–300°) → saturation, value, texture, shape
``channel_shuffle``     colour     which channel is which (a non-identity RGB permutation) → rest
``patch_shuffle``       shape      global shape (a k×k grid of patches permuted) → colours, local
                                   texture, the exact pixel histogram
``blur``                texture    fine texture (Gaussian, sigma a fraction of the image side) →
                                   colour, coarse shape
``centre_mask``         context    the centre box (filled with the border's mean colour) → border
``background_mask``     context    everything outside the centre box → the centre
======================  =========  ===============================================================

Seeding: image ``i`` of a run gets ``numpy.random.default_rng([seed, crc32(probe name), i])``,
so a probe's output for an image does not depend on batching, on the sample size or on which
other probes run. Colour probes need three channels: :meth:`Probe.applicable` says so, and the
caller records them as not applicable for grey models instead of dropping them silently.

Probes compose (:func:`compose`) like Lucid's transforms: ``compose(grayscale(), blur())`` is a
new probe; its parts draw from independent child generators of the image's generator.

Examples
--------
>>> x = np.zeros((2, 8, 8, 3), np.uint8); x[..., 0] = 200
>>> grey = grayscale()(x, indices=[0, 1], seed=0)
>>> grey.dtype, bool((grey[..., 0] == grey[..., 2]).all())
(dtype('uint8'), True)
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

GROUPS = ("colour", "texture", "shape", "context")
#: ITU-R BT.601 luma weights (the ones Pillow's ``convert("L")`` uses).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PERMUTATIONS = [p for p in itertools.permutations(range(3)) if p != (0, 1, 2)]


@dataclass(frozen=True)
class Probe:
    """One counterfactual transform.

    Attributes
    ----------
    name : str
        Stable identifier; also seeds the probe (``crc32(name)``).
    group : str
        The cue it removes: ``colour``, ``texture``, ``shape`` or ``context`` (masks).
    transform : callable
        ``transform(image, rng) -> image`` on one float32 ``(H, W, C)`` image in [0, 255].
    needs_colour : bool
        True when the probe only makes sense for RGB images.
    description : str
        What it removes and what it keeps, for the report.
    """

    name: str
    group: str
    transform: Callable
    needs_colour: bool = False
    description: str = ""

    def applicable(self, channels: int) -> bool:
        """Whether the probe means anything for images with ``channels`` channels."""
        return channels == 3 or not self.needs_colour

    def rng(self, seed: int, index: int) -> np.random.Generator:
        """The generator of image ``index``: a function of (seed, probe name, index) only."""
        return np.random.default_rng([int(seed), zlib.crc32(self.name.encode()), int(index)])

    def __call__(self, pixels, indices, seed=0) -> np.ndarray:
        """Apply to a batch.

        Parameters
        ----------
        pixels : numpy.ndarray
            ``(B, H, W, C)`` uint8 or float, in [0, 255].
        indices : sequence of int
            The images' indices in the run (``dataset.parquet``'s ``index``): they seed the probe.
        seed : int
            The run's seed.

        Returns
        -------
        numpy.ndarray
            Same shape and dtype; uint8 results are rounded and clipped.
        """
        pixels = np.asarray(pixels)
        if pixels.ndim != 4:
            raise ValueError(f"expected a (B, H, W, C) batch, got shape {pixels.shape}")
        if len(indices) != len(pixels):
            raise ValueError(f"{len(indices)} indices for {len(pixels)} images")
        if not self.applicable(pixels.shape[-1]):
            raise ValueError(f"probe '{self.name}' needs RGB images, got {pixels.shape[-1]} channel(s)")
        out = np.empty(pixels.shape, dtype=np.float32)
        for k, (image, index) in enumerate(zip(pixels, indices)):
            out[k] = self.transform(image.astype(np.float32), self.rng(seed, index))
        np.clip(out, 0.0, 255.0, out=out)
        if pixels.dtype == np.uint8:
            return np.rint(out).astype(np.uint8)
        return out.astype(pixels.dtype, copy=False)


def compose(*probes, name=None, group=None) -> Probe:
    """A probe applying ``probes`` in order; each part draws from its own child generator."""
    if not probes:
        raise ValueError("compose needs at least one probe")

    def transform(image, rng):
        for probe, child in zip(probes, rng.spawn(len(probes))):
            image = probe.transform(image, child)
        return image

    groups = {p.group for p in probes}
    return Probe(name=name or "+".join(p.name for p in probes),
                 group=group or (groups.pop() if len(groups) == 1 else "composite"),
                 transform=transform, needs_colour=any(p.needs_colour for p in probes),
                 description=" then ".join(p.description or p.name for p in probes))


# --------------------------------------------------------------------------- colour


def grayscale() -> Probe:
    """Every channel becomes the BT.601 luminance: R = G = B."""
    def transform(image, rng):
        luma = image @ LUMA
        return np.repeat(luma[..., None], 3, axis=-1)

    return Probe("grayscale", "colour", transform, needs_colour=True,
                 description="colour removed (luminance kept)")


def hue_rotation(min_degrees=60.0) -> Probe:
    """Rotate every pixel's hue by one angle per image, drawn from [min, 360 - min] degrees.

    Saturation and value (the largest channel) are unchanged, so brightness, texture and shape
    stay; at least ``min_degrees`` away from no rotation, the colour really changes.
    """
    if not 0.0 <= min_degrees <= 180.0:
        raise ValueError(f"min_degrees must be in [0, 180], got {min_degrees}")

    def transform(image, rng):
        from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

        hsv = rgb_to_hsv(image / 255.0)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(min_degrees, 360.0 - min_degrees) / 360.0) % 1.0
        return hsv_to_rgb(hsv) * 255.0

    return Probe("hue_rotation", "colour", transform, needs_colour=True,
                 description=f"hue rotated by {min_degrees:g}-{360 - min_degrees:g} degrees")


def channel_shuffle() -> Probe:
    """Permute the RGB channels with one of the five non-identity permutations."""
    def transform(image, rng):
        return image[..., list(_PERMUTATIONS[rng.integers(len(_PERMUTATIONS))])]

    return Probe("channel_shuffle", "colour", transform, needs_colour=True,
                 description="RGB channels permuted")


# --------------------------------------------------------------------------- shape and texture


def patch_shuffle(grid=4) -> Probe:
    """Cut the image into ``grid × grid`` equal patches and permute them (never the identity).

    Pixels are only moved, so the histogram is exactly kept; texture inside each patch is kept,
    the global shape is not. Rows/columns left over when the side is not a multiple of ``grid``
    stay in place.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")

    def transform(image, rng):
        h, w = image.shape[0] // grid, image.shape[1] // grid
        if h == 0 or w == 0:
            raise ValueError(f"image {image.shape[:2]} is smaller than a {grid}x{grid} grid")
        order = rng.permutation(grid * grid)
        if (order == np.arange(grid * grid)).all():
            order = np.roll(order, 1)
        out = image.copy()
        for target, source in enumerate(order):
            (ty, tx), (sy, sx) = divmod(target, grid), divmod(int(source), grid)
            out[ty * h:(ty + 1) * h, tx * w:(tx + 1) * w] = image[sy * h:(sy + 1) * h, sx * w:(sx + 1) * w]
        return out

    return Probe("patch_shuffle", "shape", transform,
                 description=f"{grid}x{grid} patches shuffled (shape removed, colour and local texture kept)")


def blur(sigma=0.02) -> Probe:
    """Gaussian blur with standard deviation ``sigma × min(H, W)`` pixels (reflecting edges).

    At the default 0.02 a 32-pixel image gets sigma 0.64 px (a 224-pixel one 4.5 px): a shape's
    outline stays, while a 4-pixel periodic texture loses its sharp edges (its fundamental keeps
    60 % of its contrast, the harmonics that make it a pattern of crisp dots or stripes are gone)
    and a 2-pixel one keeps 13 %.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")

    def transform(image, rng):
        from scipy.ndimage import gaussian_filter

        s = sigma * min(image.shape[:2])
        return gaussian_filter(image, sigma=(s, s, 0), mode="reflect")

    return Probe("blur", "texture", transform,
                 description=f"Gaussian blur, sigma {sigma:g} of the image side (fine texture removed)")


# --------------------------------------------------------------------------- context


def _centre_box(shape, fraction):
    h, w = shape[:2]
    bh, bw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - bh) // 2, (w - bw) // 2
    return slice(top, top + bh), slice(left, left + bw)


def _border_mean(image):
    """Mean colour of the outermost ring of pixels (about 5 % of the side): a background estimate."""
    r = max(1, round(0.05 * min(image.shape[:2])))
    ring = np.ones(image.shape[:2], dtype=bool)
    ring[r:-r, r:-r] = False
    return image[ring].mean(axis=0)


def centre_mask(fraction=0.5) -> Probe:
    """Fill the centred box (``fraction`` of each side) with the border's mean colour."""
    def transform(image, rng):
        out = image.copy()
        out[_centre_box(image.shape, fraction)] = _border_mean(image)
        return out

    return Probe("centre_mask", "context", transform,
                 description=f"centre {fraction:g} of each side hidden (background kept)")


def background_mask(fraction=0.5) -> Probe:
    """Keep the centred box, fill everything else with the border's mean colour."""
    def transform(image, rng):
        out = np.empty_like(image)
        out[...] = _border_mean(image)
        box = _centre_box(image.shape, fraction)
        out[box] = image[box]
        return out

    return Probe("background_mask", "context", transform,
                 description=f"all but the centre {fraction:g} of each side hidden")


#: Every named probe, by name; values build the probe from the probe config.
PROBES = {
    "grayscale": lambda c: grayscale(),
    "hue_rotation": lambda c: hue_rotation(),
    "channel_shuffle": lambda c: channel_shuffle(),
    "patch_shuffle": lambda c: patch_shuffle(c.patch_grid),
    "blur": lambda c: blur(c.blur_sigma),
    "centre_mask": lambda c: centre_mask(c.mask_fraction),
    "background_mask": lambda c: background_mask(c.mask_fraction),
}


def make_probes(probe_cfg) -> list[Probe]:
    """The probes named in ``probe_cfg.probes`` (a :class:`pipeline.config.ProbeConfig`), in order."""
    unknown = [n for n in probe_cfg.probes if n not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe '{unknown[0]}' (known: {', '.join(PROBES)})")
    return [PROBES[n](probe_cfg) for n in dict.fromkeys(probe_cfg.probes)]
