"""Parameterisations: how raw, optimised numbers become an image batch with values in [0, 1].

A :class:`Param` knows the shape of one image's raw numbers, how to draw them from a seeded
generator, and how to turn a raw batch into images. It holds no variables: the render loop
owns the numbers, so a parameterisation can be reused for any batch.

- :func:`pixel` — one number per pixel and channel (what tf-keras-vis optimises).
- :func:`fourier` — Fourier coefficients scaled by ``1 / frequency ** decay_power``, so every
  spatial frequency learns at a similar rate and the image is not swamped by high-frequency
  noise (Lucid's ``fft_image``); RGB channels are decorrelated (Lucid's ``to_valid_rgb``).
- :func:`image` — the default for a model input: Fourier for RGB and grey alike.

Examples
--------
>>> import numpy as np
>>> p = fourier(16, 16, 3)
>>> raw = p.init(np.random.default_rng(0))[None]
>>> img = p(raw).numpy()
>>> img.shape, bool(((img >= 0) & (img <= 1)).all())
((1, 16, 16, 3), True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.backend.tf import tensorflow

tf = tensorflow()

#: Square root of the colour correlation of natural images (Lucid, from ImageNet).
COLOR_CORRELATION_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02],
                                         [0.27, 0.00, -0.05],
                                         [0.27, -0.09, 0.03]], dtype=np.float32)
_COLOR_NORMALIZED = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))


@dataclass(frozen=True)
class Param:
    """An image parameterisation.

    Attributes
    ----------
    shape : tuple of int
        Shape of one image's raw numbers (no batch axis).
    to_image : callable
        ``to_image(raw) -> images``: ``(B, *shape)`` -> ``(B, H, W, C)`` float32 in [0, 1].
    sd : float
        Standard deviation of the initial raw numbers.
    name : str
    """

    shape: tuple
    to_image: Callable
    sd: float = 0.01
    name: str = "param"

    def init(self, rng) -> np.ndarray:
        """Initial raw numbers of one image, drawn from ``rng`` (a numpy Generator)."""
        return rng.normal(0.0, self.sd, self.shape).astype(np.float32)

    def __call__(self, raw):
        return self.to_image(raw)


def rfft2d_freqs(height, width) -> np.ndarray:
    """Spatial frequency (cycles per pixel) of each coefficient of a real 2-D FFT, ``(H, W // 2 + 1)``."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def to_valid(t, decorrelate):
    """Squash the last axis to [0, 1] with a sigmoid, after decorrelating colours if asked (RGB only)."""
    if decorrelate:
        t = tf.tensordot(t, tf.constant(_COLOR_NORMALIZED.T), axes=[[-1], [0]])
    return tf.sigmoid(t)


def pixel(height, width, channels, sd=0.01, decorrelate=False) -> Param:
    """One raw number per pixel and channel.

    Parameters
    ----------
    height, width, channels : int
    sd : float
        Initial noise; 0.01 starts every image at mid-grey.
    decorrelate : bool
        Interpret the channels as decorrelated colours (RGB only).
    """
    decorrelate = bool(decorrelate) and channels == 3

    def to_image(raw):
        return to_valid(raw, decorrelate)

    return Param((height, width, channels), to_image, sd, "pixel")


def fourier(height, width, channels, decay_power=1.0, decorrelate=True, sd=0.01) -> Param:
    """Fourier coefficients per channel; a grey image for ``channels == 1``.

    Parameters
    ----------
    height, width, channels : int
    decay_power : float
        Coefficients are scaled by ``1 / max(f, 1 / max(H, W)) ** decay_power``: 1 gives the
        ``1/f`` spectrum of natural images, 0 makes it equivalent to pixels.
    decorrelate : bool
        Decorrelate RGB colours (ignored for other channel counts).
    sd : float

    Notes
    -----
    Raw numbers have shape ``(2, C, H, W // 2 + 1)`` (real and imaginary parts). The scale is
    multiplied by ``sqrt(H * W)`` so the transform is about unitary and learning rates that suit
    pixels suit it too; Lucid's final division by 4 is kept.
    """
    freqs = rfft2d_freqs(height, width)
    scale = (1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power) * np.sqrt(height * width)
    scale = tf.constant(scale.astype(np.float32))
    decorrelate = bool(decorrelate) and channels == 3

    def to_image(raw):
        spectrum = tf.complex(raw[:, 0] * scale, raw[:, 1] * scale)  # (B, C, H, W//2+1)
        img = tf.signal.irfft2d(spectrum, fft_length=[height, width])  # (B, C, H, W)
        img = tf.transpose(img, (0, 2, 3, 1)) / 4.0
        return to_valid(img, decorrelate)

    return Param((2, channels) + freqs.shape, to_image, sd, "fourier")


def image(height, width, channels, fft=True, decorrelate=True) -> Param:
    """The default parameterisation for a model input of the given shape.

    Parameters
    ----------
    height, width, channels : int
    fft : bool
        Fourier (True) or pixels (False).
    decorrelate : bool
        Decorrelate colours; only applies to RGB (``channels == 3``).
    """
    if fft:
        return fourier(height, width, channels, decorrelate=decorrelate)
    return pixel(height, width, channels, decorrelate=decorrelate)
