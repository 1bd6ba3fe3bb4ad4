"""Counterfactual augmentation: each training image, each epoch, may lose the flagged cue.

The augmentations are the shortcut finder's probes (:mod:`pipeline.shortcuts.probes`), tuned to
*randomise* a cue rather than to test it (hue rotated by any angle, not at least 60 degrees), plus
``patch_blur`` (a random half of the patches blurred: texture varies within one image). With
probability ``strength`` an image is replaced by one of them, picked uniformly; otherwise it is
left as it is. So a model can no longer get its answer from the cue, while the originals stay
in the training set (the model keeps seeing the real colours, so accuracy on them need not drop).

Seeding: image ``index`` in epoch ``epoch`` draws from ``default_rng([seed, epoch, index, 0x2E3ED])``;
the result does not depend on batching or on the other images.

Examples
--------
>>> x = np.zeros((2, 8, 8, 3), np.uint8); x[..., 0] = 200
>>> aug = Counterfactuals(for_cue("colour"), strength=1.0)
>>> out = aug(x, indices=[0, 1], seed=0, epoch=0)
>>> out.shape, out.dtype, bool((out != x).any())
((2, 8, 8, 3), dtype('uint8'), True)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.shortcuts.probes import Probe, blur, channel_shuffle, grayscale, hue_rotation

#: The default augmentations of each cue.
BY_CUE = {"colour": ("hue_rotation", "grayscale", "channel_shuffle"), "texture": ("blur", "patch_blur")}


def patch_blur(grid=4, sigma=0.04) -> Probe:
    """Blur a random half of a ``grid x grid`` patch layout (sigma a fraction of the image side).

    Fine texture then differs from patch to patch within one image, while the outline of a shape
    stays where it was.
    """
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")

    def transform(image, rng):
        from scipy.ndimage import gaussian_filter

        s = sigma * min(image.shape[:2])
        blurred = gaussian_filter(image, sigma=(s, s, 0), mode="reflect")
        chosen = rng.random((grid, grid)) < 0.5
        rows = np.minimum(np.arange(image.shape[0]) * grid // image.shape[0], grid - 1)
        cols = np.minimum(np.arange(image.shape[1]) * grid // image.shape[1], grid - 1)
        mask = chosen[rows][:, cols][..., None]
        return np.where(mask, blurred, image)

    return Probe("patch_blur", "texture", transform,
                 description=f"a random half of {grid}x{grid} patches blurred (sigma {sigma:g} of the side)")


def _random_blur(low=0.02, high=0.06) -> Probe:
    """Blur with a sigma drawn per image from [low, high] of the image side."""
    def transform(image, rng):
        return blur(float(rng.uniform(low, high))).transform(image, rng)

    return Probe("blur", "texture", transform, description=f"Gaussian blur, sigma {low:g}-{high:g} of the side")


#: Every augmentation by name (``remedy.augment``).
AUGMENTATIONS = {
    "hue_rotation": lambda: hue_rotation(min_degrees=0.0),   # any angle: the hue becomes random
    "grayscale": grayscale,
    "channel_shuffle": channel_shuffle,
    "blur": _random_blur,
    "patch_blur": patch_blur,
}


def for_cue(cue, names=None) -> list[Probe]:
    """The augmentations named in ``names``, or the default ones of ``cue`` (:data:`BY_CUE`)."""
    if names is None:
        if cue not in BY_CUE:
            raise ValueError(f"no default augmentation for cue {cue!r} (cues: {', '.join(BY_CUE)})")
        names = BY_CUE[cue]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation '{unknown[0]}' (known: {', '.join(AUGMENTATIONS)})")
    if not names:
        raise ValueError("at least one augmentation is needed")
    return [AUGMENTATIONS[n]() for n in dict.fromkeys(names)]


@dataclass(frozen=True)
class Counterfactuals:
    """With probability ``strength`` per image and epoch, one of ``augmentations`` (uniformly).

    Attributes
    ----------
    augmentations : list of Probe
    strength : float
        In [0, 1]; 0 leaves every image alone.
    """

    augmentations: list
    strength: float = 0.8

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if not self.augmentations:
            raise ValueError("at least one augmentation is needed")

    def choices(self, indices, seed, epoch) -> np.ndarray:
        """Per image: the augmentation used (position in ``augmentations``), or -1 for none."""
        return np.array([self._draw(seed, epoch, i)[0] for i in indices], dtype=np.int64)

    def _draw(self, seed, epoch, index):
        rng = np.random.default_rng([int(seed), int(epoch), int(index), 0x2E3ED])
        hit = rng.random() < self.strength
        pick = int(rng.integers(len(self.augmentations)))
        return (pick if hit else -1), rng

    def __call__(self, pixels, indices, seed=0, epoch=0) -> np.ndarray:
        """Augment a ``(B, H, W, C)`` batch in [0, 255] (uint8 stays uint8); returns a new array."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or len(indices) != len(pixels):
            raise ValueError(f"expected a (B, H, W, C) batch with one index per image, got {pixels.shape} "
                             f"and {len(indices)} indices")
        out = pixels.copy()
        for k, index in enumerate(indices):
            pick, rng = self._draw(seed, epoch, index)
            if pick < 0:
                continue
            probe = self.augmentations[pick]
            if not probe.applicable(pixels.shape[-1]):
                continue   # a colour augmentation on a grey image: nothing to randomise
            image = probe.transform(pixels[k].astype(np.float32), rng)
            image = np.clip(image, 0.0, 255.0)
            out[k] = np.rint(image) if pixels.dtype == np.uint8 else image
        return out
