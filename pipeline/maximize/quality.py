"""How far a maximization image drives its unit, compared with the dataset.

Two figures per image:

- ``score`` = achieved / dataset max: 1 means "as strong as the strongest dataset image". It
  is only meaningful where the dataset max is clearly positive; where it is ≤ ~0 (e.g. a
  pre-BatchNorm unit that is negative everywhere, or a dead ReLU) the score is NaN and
  ``score_valid`` is False.
- ``z_score`` = (achieved − dataset mean) / dataset std: defined whenever the unit varies.

No TensorFlow here: statistics are computed chunk by chunk from the stored activations.

Examples
--------
>>> import numpy as np
>>> stats = column_stats(np.array([[0.0, -3.0], [2.0, -1.0]]))
>>> stats.max.tolist(), stats.mean.tolist()
([2.0, -1.0], [1.0, -2.0])
>>> s, z, ok = scores(np.array([3.0, 0.0]), stats)
>>> s.tolist()[0], bool(np.isnan(s[1])), ok.tolist()
(1.5, True, [True, False])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The dataset max must exceed this fraction of the dataset's range (max − min) for a ratio.
MIN_MAX_FRACTION = 0.05
_TINY = 1e-6


@dataclass
class Stats:
    """Per-column statistics over the dataset (float64 arrays of equal length)."""

    max: np.ndarray
    min: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def take(self, index) -> "Stats":
        return Stats(self.max[index], self.min[index], self.mean[index], self.std[index])


def column_stats(array, directions=None, chunk=8192) -> Stats:
    """Max, min, mean and std of each column of ``array`` (N, C), read ``chunk`` rows at a time.

    Parameters
    ----------
    array : array-like
        ``(N, C)``; a zarr array is read chunk by chunk, never whole.
    directions : ndarray, optional
        ``(K, C)``: also the statistics of the projections ``array @ directions.T``, appended
        after the ``C`` columns (so the result has ``C + K`` entries).
    chunk : int

    Returns
    -------
    Stats
        NaN/Inf values are ignored (a unit that is never finite gets NaN statistics).
    """
    n = int(array.shape[0])
    acc = None
    for start in range(0, max(n, 1), chunk):
        block = np.asarray(array[start:start + chunk], dtype=np.float64)
        if block.size == 0:
            continue
        block = block.reshape(len(block), -1)
        if directions is not None and len(directions):
            block = np.concatenate([block, block @ np.asarray(directions, np.float64).T], axis=1)
        acc = _merge(acc, _chunk_moments(block))
    if acc is None:
        empty = np.full(0, np.nan)
        return Stats(empty, empty, empty, empty)
    count, mean, m2, hi, lo = acc
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(m2 / count)
    return Stats(hi, lo, np.where(count > 0, mean, np.nan), np.where(count > 0, std, np.nan))


def _chunk_moments(block):
    finite = np.isfinite(block)
    count = finite.sum(axis=0).astype(np.float64)
    values = np.where(finite, block, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, values.sum(axis=0) / np.maximum(count, 1), 0.0)
    m2 = (np.where(finite, block - mean, 0.0) ** 2).sum(axis=0)
    hi = np.where(finite, block, -np.inf).max(axis=0)
    lo = np.where(finite, block, np.inf).min(axis=0)
    return count, mean, m2, hi, lo


def _merge(a, b):
    """Combine two chunks' (count, mean, M2, max, min) (Chan et al.'s parallel variance)."""
    if a is None:
        return b
    na, ma, m2a, hia, loa = a
    nb, mb, m2b, hib, lob = b
    n = na + nb
    delta = mb - ma
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, ma + delta * nb / np.maximum(n, 1), 0.0)
        m2 = m2a + m2b + np.where(n > 0, delta ** 2 * na * nb / np.maximum(n, 1), 0.0)
    return n, mean, m2, np.maximum(hia, hib), np.minimum(loa, lob)


def ratio_is_meaningful(stats: Stats) -> np.ndarray:
    """True where the dataset max is clearly above zero (relative to the dataset's range)."""
    spread = np.nan_to_num(stats.max - stats.min, nan=0.0, posinf=0.0)
    threshold = np.maximum(_TINY, MIN_MAX_FRACTION * spread)
    return np.isfinite(stats.max) & (stats.max > threshold)


def scores(activation, stats: Stats):
    """``(score, z_score, score_valid)`` for achieved activations against dataset ``stats``.

    Parameters
    ----------
    activation : ndarray
        What each image reached (same reduction as the stored statistics).
    stats : Stats
        Dataset statistics of the same units, one entry per image.
    """
    activation = np.asarray(activation, np.float64)
    valid = ratio_is_meaningful(stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(valid, activation / np.where(valid, stats.max, 1.0), np.nan)
        varies = np.isfinite(stats.std) & (stats.std > _TINY * (1.0 + np.abs(np.nan_to_num(stats.mean))))
        z = np.where(varies, (activation - stats.mean) / np.where(varies, stats.std, 1.0), np.nan)
    return score, z, valid
