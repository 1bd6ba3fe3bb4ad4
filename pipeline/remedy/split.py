"""The seeded, class-stratified split of the labelled images: fine-tune on one part, judge on the other.

Examples
--------
>>> train, held = split_rows(np.array([0, 0, 0, 0, 1, 1, 1, 1, -1]), 0.5, seed=0)
>>> len(train), len(held), sorted(np.r_[train, held].tolist()) == list(range(8))
(4, 4, True)
"""
from __future__ import annotations

import numpy as np


def split_rows(labels, fraction, seed) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the fine-tune and held-out images (unlabelled rows, label -1, are in neither).

    Each class gives ``round(fraction * n)`` of its ``n`` images to fine-tuning, at least one and
    (when it has two or more) leaving at least one held out. Both parts are sorted; the result is a
    function of ``(labels, fraction, seed)`` only.

    Parameters
    ----------
    labels : (N,) int
    fraction : float
        In (0, 1).
    seed : int

    Returns
    -------
    train, heldout : numpy.ndarray of int64
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 0x5B117])
    train, held = [], []
    for c in np.unique(labels[labels >= 0]):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(members)))
        k = min(max(k, 1), max(len(members) - 1, 1))
        train.append(members[:k])
        held.append(members[k:])
    cat = (lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64))
    return cat(train), cat(held)
