"""Whole-layer figures for ``layers.parquet``: class separability and CKA between layers.

Pure functions: numpy in, numbers/arrays/DataFrames out, no file I/O. Class labels are integers
with ``-1`` meaning unlabelled (as in ``dataset.parquet``); unlabelled rows are ignored. Every
figure that samples rows draws them from ``np.random.default_rng(random_state)``, so the same
inputs give the same numbers.

API
---
``probe_accuracy(x, labels, *, random_state=0, cv=5, max_rows=5000, max_iter=1000) -> float``
    Linear probe (StandardScaler + LogisticRegression), stratified k-fold CV accuracy.
``knn_class_accuracy(x, labels, *, k=5, random_state=0, max_rows=2000) -> float``
    Leave-one-out k-nearest-neighbour accuracy on standardised features.
``class_silhouette(x, labels, *, random_state=0, max_rows=2000) -> float``
    Silhouette of the classes on standardised features (euclidean).
``MinibatchCKA(*, batch_size=256, max_rows=4096, max_bytes=2**27, random_state=0)``
    ``.fit(arrays) -> self`` sets ``cka_`` (L, L): linear CKA from minibatch unbiased HSIC on a
    seeded row sample, memory ``O(L^2 + L b^2)`` whatever the layer widths. The cluster stage's CKA.
``minibatch_cka(arrays, *, batch_size=256, max_rows=4096, random_state=0, progress=None) -> (L, L)``
``StreamingCKA(*, unbiased=True)``
    The exact estimator on every row, ``O(D^2)`` memory for ``D`` units in all layers: kept as
    the reference for small data. ``.partial_fit(arrays) -> self``, ``.cka() -> (L, L)``;
    ``.empty_like()`` and ``.merge(other)`` split a pass over workers with the sequential result.
``cka_matrix(chunks, layer_dims=None, *, unbiased=True) -> (L, L)``
    :class:`StreamingCKA` over ``chunks()``, which yields per chunk a list of ``(n_i, C_l)``
    arrays, one per layer, same rows.
``layer_figures(x, labels, *, dead=None, clusters=None, random_state=0) -> dict``
    ``units, dead_units, n_clusters, probe_accuracy, knn_accuracy, class_silhouette``.
``layer_table(figures, cka=None) -> DataFrame``
    One row per layer in ``LAYER_COLUMNS`` order (+ ``cka_previous``, ``cka`` given a matrix).

All separability figures use the live (finite) columns only and are NaN with fewer than two
classes; they are computed on seeded row samples, so ``x`` may be large (any array supporting
row selection with a sorted integer array).
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd

from pipeline.analysis.streams import fold

LAYER_COLUMNS = ["layer", "units", "dead_units", "n_clusters", "probe_accuracy", "knn_accuracy",
                 "class_silhouette"]


# --------------------------------------------------------------------------- separability


def probe_accuracy(x, labels, *, random_state=0, cv=5, max_rows=5000, max_iter=1000):
    """Linear-probe accuracy: how linearly decodable the classes are from the layer.

    Parameters
    ----------
    x : array of shape (N, C)
        Pooled activations.
    labels : array of shape (N,) of int
        Class per row, ``-1`` = unlabelled (dropped).
    random_state : int, default=0
        Seeds the row sample and the fold shuffling.
    cv : int, default=5
        Folds; reduced to the size of the smallest class (classes with a single member are
        dropped: they can never be both trained on and tested).
    max_rows : int, default=5000
        Rows used at most (seeded sample).
    max_iter : int, default=1000
        LogisticRegression iterations.

    Returns
    -------
    float
        Mean accuracy over the folds; NaN with fewer than two classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(random_state)
    xs, ys = _labelled_sample(x, labels, max_rows, rng, min_per_class=2)
    if xs is None:
        return np.nan
    folds = int(min(cv, np.bincount(ys).min()))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=int(rng.integers(2**31 - 1)))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    return float(cross_val_score(probe, xs, ys, cv=splitter).mean())


def knn_class_accuracy(x, labels, *, k=5, random_state=0, max_rows=2000):
    """Leave-one-out k-NN accuracy: do neighbours in the layer share a class?

    Each sampled row is classified by a majority vote of its ``k`` nearest other rows
    (standardised features, euclidean); vote ties go to the smallest class label.

    Parameters
    ----------
    x : array of shape (N, C)
    labels : array of shape (N,) of int
        ``-1`` = unlabelled (dropped).
    k : int, default=5
    random_state : int, default=0
        Seeds the row sample.
    max_rows : int, default=2000

    Returns
    -------
    float
        NaN with fewer than two classes or no more than ``k`` rows.
    """
    from sklearn.neighbors import NearestNeighbors

    xs, ys = _labelled_sample(x, labels, max_rows, np.random.default_rng(random_state))
    if xs is None or len(xs) <= k:
        return np.nan
    xs = _standardise(xs)
    neighbours = NearestNeighbors(n_neighbors=k).fit(xs).kneighbors(return_distance=False)  # self excluded
    votes = np.zeros((len(ys), ys.max() + 1))
    np.add.at(votes, (np.repeat(np.arange(len(ys)), k), ys[neighbours].ravel()), 1)
    return float(np.mean(votes.argmax(axis=1) == ys))


def class_silhouette(x, labels, *, random_state=0, max_rows=2000):
    """Silhouette of the classes in the layer (standardised features, euclidean), in [-1, 1].

    Parameters
    ----------
    x : array of shape (N, C)
    labels : array of shape (N,) of int
        ``-1`` = unlabelled (dropped).
    random_state : int, default=0
        Seeds the row sample.
    max_rows : int, default=2000

    Returns
    -------
    float
        NaN with fewer than two classes or as many classes as rows.
    """
    from sklearn.metrics import silhouette_score

    xs, ys = _labelled_sample(x, labels, max_rows, np.random.default_rng(random_state))
    if xs is None or len(np.unique(ys)) >= len(ys):
        return np.nan
    return float(silhouette_score(_standardise(xs), ys))


def _labelled_sample(x, labels, max_rows, rng, min_per_class=1):
    """Seeded sample of labelled rows, finite columns only; classes coded 0..K-1.

    Returns ``(None, None)`` when fewer than two classes (with ``min_per_class`` members) or
    no finite column remain.
    """
    labels = np.asarray(labels)
    rows = np.flatnonzero(labels >= 0)
    if len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, max_rows, replace=False))
    xs = np.asarray(x[rows], dtype=np.float64)
    _, ys, counts = np.unique(labels[rows], return_inverse=True, return_counts=True)
    keep = counts[ys] >= min_per_class
    xs = xs[keep][:, np.isfinite(xs[keep]).all(axis=0)]  # dead units may hold NaN: drop them
    _, ys = np.unique(ys[keep], return_inverse=True)
    if xs.shape[1] == 0 or len(np.unique(ys)) < 2:
        return None, None
    return xs, ys


def _standardise(x):
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


# --------------------------------------------------------------------------- CKA


class MinibatchCKA:
    """Linear CKA between layers from minibatch unbiased HSIC, in memory independent of the widths.

    Linear CKA (Kornblith et al. 2019) compares two layers through the HSIC of their Gram
    matrices ``K = X X^T`` over the same images: ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.
    Here HSIC is the *unbiased* estimator of Song et al. (2012), averaged over minibatches of the
    images as in Nguyen, Raghu & Kornblith (2021): a seeded sample of at most ``max_rows`` images
    is shuffled and split into groups of ``batch_size`` to ``2 * batch_size - 1`` rows, and each
    group gives one unbiased estimate per layer pair. Per group, each layer's Gram matrix is
    U-centred (Szekely & Rizzo 2014), which turns the estimator into an inner product::

        HSIC_unbiased(K, L) = <U(K), U(L)> / (n (n - 3))

    so every layer is reduced to one vector (the scaled upper triangles of its ``U(K)``, one per
    group) and the HSIC of every pair of layers is one ``(L, T) @ (T, L)`` product. The layers
    are never concatenated: memory does not depend on the number of units (the former feature-
    space estimator held ``D x D`` matrices, ``D`` = all units of all layers, and crashed on
    MobileNetV2's 17 000 units).

    Because the CKA matrix is a normalised Gram matrix of those vectors, it is symmetric, within
    [-1, 1] and 1 on the diagonal (unbiased CKA can be slightly negative for unrelated layers).
    With fewer than ``2 * batch_size`` sampled rows there is a single group and the result is the
    exact unbiased CKA on the sample (up to float32 rounding of the stored vectors, < 1e-5).

    Parameters
    ----------
    batch_size : int, default=256
        Rows per group (at least 4, the estimator's minimum); groups have ``batch_size`` to
        ``2 * batch_size - 1`` rows. Larger groups lower the variance and cost ``O(batch_size)``
        more time and memory per sampled row.
    max_rows : int or None, default=4096
        Rows (images) sampled at most; None uses every row.
    max_bytes : int, default=2**27
        Budget for the stored vectors: the groups are processed in passes whose vectors (all
        layers, float32) fit it, and each pass reads every layer once. A single group is always
        allowed, so memory is at least ``4 * L * n (n - 1) / 2`` bytes for groups of ``n`` rows.
    random_state : int, numpy Generator or None, default=0
        Seeds the row sample and the grouping.

    Attributes
    ----------
    cka_ : ndarray of shape (L, L)
        The CKA matrix; NaN rows and columns for a layer that is constant on the sample.
    hsic_ : ndarray of shape (L, L)
        Sum over the groups of the unbiased HSIC estimates (of the layers after the power-of-two
        scaling described in the notes, which CKA does not see).
    rows_ : ndarray of int
        The sampled rows, sorted.
    group_sizes_ : ndarray of int
        Rows per group.
    n_passes_ : int
        Passes over the layers (reads of each layer's sampled rows).
    block_bytes_ : int
        Largest block of stored vectors held at once (bytes).
    n_nonfinite_ : ndarray of shape (L,)
        Non-finite values per layer among the sampled rows (they count as 0).

    Notes
    -----
    Memory: ``hsic_`` (``L^2``), one pass's vectors (``block_bytes_``, at most ``max_bytes`` or one
    group), one layer's rows of one pass (``rows x C_l``, as stored) and one group's Gram matrix.
    Time: ``O(M b D)`` for the Gram matrices (``M`` sampled rows, ``b`` rows per group, ``D``
    units in all) and ``O(M b L^2)`` for the products: linear in the widths; the rows read are
    bounded by ``max_rows``, so only the reading grows with ``N``.

    Each group's rows are centred first (exact zeros for constant columns, and no cancellation
    from large offsets); U-centring makes this a no-op in exact arithmetic. Each layer is also
    multiplied by a power of two fixed on its first rows, so that the float32 vectors of layers
    with activations near 1e-20 or 1e+20 neither underflow nor overflow; CKA is invariant to
    scaling a layer and a power of two is exact.

    References
    ----------
    Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of neural network representations
    revisited". Song, Smola, Gretton, Bedo & Borgwardt (2012), "Feature selection via dependence
    maximization". Szekely & Rizzo (2014), "Partial distance correlation with methods for
    dissimilarities". Nguyen, Raghu & Kornblith (2021), "Do wide and deep networks learn the same
    things?".

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(100, 3))
    >>> MinibatchCKA(batch_size=32).fit([x, 2 * x + 1]).cka_.round(6)
    array([[1., 1.],
           [1., 1.]])
    """

    def __init__(self, *, batch_size=256, max_rows=4096, max_bytes=2**27, random_state=0):
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.random_state = random_state

    def fit(self, arrays, *, progress=None):
        """Compute ``cka_`` for a list of layers; return ``self``.

        Parameters
        ----------
        arrays : sequence of array-like, each of shape (N, C_l)
            One per layer, the same images in the same order. Zarr arrays are read one layer
            and one pass at a time (only the sampled rows); numpy arrays work as well.
        progress : callable, optional
            ``progress(total=steps)`` returning an object with ``update(n)`` and ``close()``
            (e.g. a tqdm factory); one step is one layer read in one pass.

        Returns
        -------
        self
        """
        arrays = self._check(arrays)
        rng = np.random.default_rng(self.random_state)
        n_rows, n_layers = int(arrays[0].shape[0]), len(arrays)
        self.rows_ = _sample_rows(n_rows, self.max_rows, rng)
        # Shuffled, so that each group is a random subset: datasets are stored sorted by class,
        # and a group of one class would estimate a within-class HSIC instead.
        groups = np.array_split(rng.permutation(self.rows_), max(1, len(self.rows_) // self.batch_size))
        self.group_sizes_ = np.array([len(g) for g in groups], dtype=np.int64)
        self.hsic_ = np.zeros((n_layers, n_layers))
        self.n_nonfinite_ = np.zeros(n_layers, dtype=np.int64)
        self.block_bytes_, self.n_passes_ = 0, 0
        if len(self.rows_) < 4:  # the unbiased estimator needs n >= 4
            self.cka_ = np.full((n_layers, n_layers), np.nan)
            return self
        passes = _plan_passes(self.group_sizes_, n_layers, self.max_bytes)
        self.n_passes_ = len(passes)
        bar = progress(total=n_layers * len(passes)) if progress is not None else None
        scales = [None] * n_layers
        try:
            for part in passes:
                self._add_pass(arrays, [groups[g] for g in part], scales, bar)
        finally:
            if bar is not None:
                bar.close()
        self.cka_ = _normalise_hsic(self.hsic_)
        return self

    def _check(self, arrays):
        arrays = list(arrays)
        if not arrays:
            raise ValueError("MinibatchCKA needs at least one layer")
        if any(len(a.shape) < 2 for a in arrays) or len({int(a.shape[0]) for a in arrays}) != 1:
            raise ValueError("every layer must be an (N, C) array over the same N rows")
        if not (isinstance(self.batch_size, (int, np.integer)) and self.batch_size >= 4):
            raise ValueError(f"batch_size must be an int >= 4 (the unbiased estimator's minimum); "
                             f"got {self.batch_size!r}")
        if self.max_rows is not None and not (isinstance(self.max_rows, (int, np.integer)) and self.max_rows >= 1):
            raise ValueError(f"max_rows must be a positive int or None; got {self.max_rows!r}")
        return arrays

    def _add_pass(self, arrays, groups, scales, bar):
        """Read every layer's rows of these groups once, store their U-centred Gram vectors,
        then add each group's HSIC products to ``hsic_``."""
        rows = np.sort(np.concatenate(groups))
        positions = [np.searchsorted(rows, g) for g in groups]
        sizes = [len(g) * (len(g) - 1) // 2 for g in groups]
        block = np.empty((len(arrays), sum(sizes)), dtype=np.float32)
        self.block_bytes_ = max(self.block_bytes_, block.nbytes)
        for layer, arr in enumerate(arrays):
            x = self._read(arr, rows, layer)
            start = 0
            for pos, size in zip(positions, sizes):
                group = _centred(x[pos])
                if scales[layer] is None:
                    scales[layer] = _power_of_two_scale(group)
                block[layer, start:start + size] = _u_centred_gram(group * scales[layer])
                start += size
            if bar is not None:
                bar.update(1)
        start = 0
        for size in sizes:
            # float64 product per group: cancellation between positive and negative terms is
            # what makes the estimate unbiased, so its sums must not be float32
            part = block[:, start:start + size].astype(np.float64)
            self.hsic_ += part @ part.T
            start += size

    def _read(self, arr, rows, layer):
        """The layer's rows (sorted), 2-D, float32 or float64, non-finite values set to 0."""
        if hasattr(arr, "get_orthogonal_selection"):  # zarr: reads only the chunks holding them
            x = arr.get_orthogonal_selection((rows,) + (slice(None),) * (len(arr.shape) - 1))
        else:
            x = arr[rows]
        x = np.asarray(x)
        x = x.reshape(len(x), -1).astype(np.result_type(x.dtype, np.float32), copy=False)
        bad = ~np.isfinite(x)
        if bad.any():
            x = np.where(bad, 0, x)
            self.n_nonfinite_[layer] += int(bad.sum())
        return x


def minibatch_cka(arrays, *, batch_size=256, max_rows=4096, random_state=0, progress=None):
    """Linear CKA between every pair of layers: :class:`MinibatchCKA`'s ``cka_``.

    Parameters
    ----------
    arrays : sequence of array-like, each of shape (N, C_l)
        One per layer (e.g. the zarr arrays of ``activations.zarr``), the same rows.
    batch_size, max_rows, random_state
        See :class:`MinibatchCKA`.
    progress : callable, optional
        See :meth:`MinibatchCKA.fit`.

    Returns
    -------
    ndarray of shape (L, L)
        Symmetric, 1 on the diagonal, NaN rows and columns for a constant layer.
    """
    model = MinibatchCKA(batch_size=batch_size, max_rows=max_rows, random_state=random_state)
    return model.fit(arrays, progress=progress).cka_


def _sample_rows(n_rows, max_rows, rng):
    if max_rows is None or n_rows <= max_rows:
        return np.arange(n_rows)
    return np.sort(rng.choice(n_rows, max_rows, replace=False))


def _plan_passes(group_sizes, n_layers, max_bytes):
    """Consecutive groups per pass, so that a pass's float32 vectors fit ``max_bytes``."""
    passes, current, used = [], [], 0
    for g, n in enumerate(group_sizes):
        cost = 4 * n_layers * (int(n) * (int(n) - 1) // 2)
        if current and used + cost > max_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(g)
        used += cost
    return passes + [current]


def _centred(x):
    """Rows minus their mean, in float64; a constant column becomes exactly 0."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x[0]  # exact zeros for constant columns, whatever rounding the mean would bring
    return x - x.mean(axis=0)


def _power_of_two_scale(x):
    """``2**-e`` bringing the root-mean-square of ``x`` near 1 (1 for an all-zero ``x``)."""
    rms = np.sqrt(np.mean(x * x)) if x.size else 0.0
    if not (np.isfinite(rms) and rms > 0):
        return 1.0
    return float(np.ldexp(1.0, -int(np.frexp(rms)[1])))


def _u_centred_gram(x):
    """Upper triangle of the U-centred Gram matrix of the rows of ``x``, times sqrt(2 / (n (n-3))).

    U-centring (Szekely & Rizzo 2014) of ``K`` with its diagonal set to 0:
    ``U_ij = K_ij - r_i / (n-2) - r_j / (n-2) + s / ((n-1)(n-2))`` off the diagonal (``r`` the row
    sums, ``s`` their sum), 0 on it. Then ``<U(K), U(L)> / (n (n-3))`` is Song et al.'s unbiased
    HSIC; ``U`` is symmetric with a zero diagonal, so the upper triangle, scaled by
    ``sqrt(2 / (n (n-3)))``, carries the whole inner product in half the memory.
    """
    n = len(x)
    k = x @ x.T
    np.fill_diagonal(k, 0.0)
    r = k.sum(axis=0)
    u = k - (r[:, None] + r[None, :]) / (n - 2) + r.sum() / ((n - 1) * (n - 2))
    upper = np.triu_indices(n, 1)
    return u[upper] * np.sqrt(2.0 / (n * (n - 3)))


def _normalise_hsic(hsic):
    """CKA from HSIC sums; NaN for a layer whose HSIC with itself is not positive."""
    diag = np.diag(hsic)
    norm = np.sqrt(np.where(diag > 0, diag, np.nan))
    cka = np.clip(hsic / np.outer(norm, norm), -1.0, 1.0)  # |CKA| <= 1 holds up to rounding
    live = np.flatnonzero(np.isfinite(norm))
    cka[live, live] = 1.0
    return cka


class StreamingCKA:

    """Linear CKA between layers, accumulated over row chunks in memory independent of N.

    Linear CKA (Kornblith et al. 2019) only needs the cross-covariances between layers, so it
    is computed in feature space: ``HSIC(X, Y) ~ ||Xc^T Yc||_F^2``. The joint cross-product of
    all layers' units (``D x D``, ``D`` = total units) is accumulated in float64 on data shifted
    by the first chunk's mean (which keeps the later centring free of cancellation), together
    with a few extra sums that make the *unbiased* HSIC estimator (Song et al. 2012) streamable
    as well: with ``K = X X^T`` and ``q_i = ||x_i||^2`` (centred data), its Gram-matrix terms
    are ``tr(K~L~) = ||X^T Y||^2 - sum q_i r_i``, ``1^T K~ 1 = -sum q_i`` and
    ``1^T K~ L~ 1 = sum q_i r_i``; the centred ``sum q_i r_i`` is expanded into raw sums
    ``sum q q^T``, ``sum z q^T``, ``sum z z^T``, ``sum z`` (the estimator is translation
    invariant, so centring at the end is exact). Unbiased CKA does not drift towards 1 when
    layers are wide compared with N; the biased form is kept for comparison with the literature.

    Memory is ``O(D^2)``: 2 000 units in total need 32 MB, MobileNetV2's 17 000 units several
    GB (the cluster stage died there). The cluster stage therefore uses :class:`MinibatchCKA`;
    this class stays as the exact full-data reference for small data (tests compare the two).
    Non-finite values are replaced by 0 (and counted in ``n_nonfinite_``).

    Parameters
    ----------
    unbiased : bool, default=True
        Unbiased HSIC (needs N >= 4; a layer whose estimate is <= 0 gets NaN) or the biased
        feature-space form.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(100, 3))
    >>> StreamingCKA().partial_fit([x, 2 * x]).cka().round(6)
    array([[1., 1.],
           [1., 1.]])
    """

    def __init__(self, *, unbiased=True):
        self.unbiased = unbiased

    def partial_fit(self, arrays):
        """Add one chunk: a sequence of ``(n, C_l)`` arrays, one per layer, same rows."""
        z = self._stack(arrays)
        z -= self.shift_
        q = (z * z) @ self._blocks  # per-row squared norm in each layer
        self.n_samples_seen_ += len(z)
        self._s1 += z.sum(axis=0)
        self._s2 += z.T @ z
        self._u += z.T @ q
        self._t += q.T @ q
        return self

    def _stack(self, arrays):
        arrays = [np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in arrays]
        if len({len(a) for a in arrays}) != 1:
            raise ValueError("every layer's chunk must have the same number of rows")
        dims = [a.shape[1] for a in arrays]
        z = np.concatenate(arrays, axis=1)
        finite = np.isfinite(z)
        z[~finite] = 0.0
        if not hasattr(self, "dims_"):
            self._start(dims, z)
        elif dims != self.dims_:
            raise ValueError(f"layer widths {dims} differ from earlier chunks {self.dims_}")
        self.n_nonfinite_ += (~finite).sum(axis=0) @ self._blocks.astype(np.int64)
        return z

    def empty_like(self):
        """No rows yet, but this one's layer widths and shift: fit it on later rows, then
        :meth:`merge` it here (how the Dask engine spreads the pass over workers)."""
        new = StreamingCKA(unbiased=self.unbiased)
        new._start(list(self.dims_), None)
        new.shift_ = self.shift_.copy()
        return new

    def merge(self, other):
        """Add the sums of another ``StreamingCKA`` sharing this one's shift (see :meth:`empty_like`).

        Sums of single chunks merged in chunk order are bit-for-bit the sequential ``partial_fit``.
        """
        if not hasattr(other, "dims_"):
            return self
        if not hasattr(self, "dims_"):
            self._start(list(other.dims_), None)
            self.shift_ = other.shift_.copy()
        elif other.dims_ != self.dims_ or not np.array_equal(other.shift_, self.shift_):
            raise ValueError("merge needs the same layer widths and shift (make it with empty_like)")
        self.n_samples_seen_ += other.n_samples_seen_
        self.n_nonfinite_ += other.n_nonfinite_
        self._s1 += other._s1
        self._s2 += other._s2
        self._u += other._u
        self._t += other._t
        return self

    def _start(self, dims, z):
        total, layers = sum(dims), len(dims)
        self.dims_ = dims
        self.shift_ = z.mean(axis=0) if z is not None and len(z) else np.zeros(total)
        self._blocks = np.repeat(np.eye(layers), dims, axis=0)  # unit -> layer indicator (D, L)
        self.n_samples_seen_ = 0
        self.n_nonfinite_ = np.zeros(layers, dtype=np.int64)
        self._s1, self._s2 = np.zeros(total), np.zeros((total, total))
        self._u, self._t = np.zeros((total, layers)), np.zeros((layers, layers))

    def cka(self):
        """CKA matrix ``(L, L)``; NaN for a layer without variance."""
        if not hasattr(self, "dims_"):
            raise ValueError("no data seen: call partial_fit first")
        hsic = self._hsic_unbiased() if self.unbiased else self._cross_norms()
        norm = np.sqrt(np.where(np.diag(hsic) > 0, np.diag(hsic), np.nan))
        return hsic / np.outer(norm, norm)

    def _centred(self):
        n = self.n_samples_seen_
        mean = self._s1 / n
        return n, mean, self._s2 - n * np.outer(mean, mean)

    def _cross_norms(self):
        """``||Xc_a^T Xc_b||_F^2`` for every pair of layers (biased HSIC up to n^2)."""
        _, _, gram = self._centred()
        return self._blocks.T @ (gram * gram) @ self._blocks

    def _hsic_unbiased(self):
        n, mean, gram = self._centred()
        if n < 4:
            return np.full((len(self.dims_),) * 2, np.nan)
        B = self._blocks
        mean_blocks = B * mean[:, None]  # layer l's share of the mean in column l
        e = (mean * mean) @ B  # squared norm of each layer's mean
        qsum = np.diag(self._s2) @ B
        cross = self._u.T @ mean_blocks
        # sum_i q_a(i) q_b(i) on centred rows, from the raw (shifted) sums
        qq = (self._t - 2 * (cross + cross.T) + 4 * mean_blocks.T @ self._s2 @ mean_blocks
              + np.outer(qsum, e) + np.outer(e, qsum) - 3 * n * np.outer(e, e))
        r = np.diag(gram) @ B
        return (self._cross_norms() - qq * n / (n - 2) + np.outer(r, r) / ((n - 1) * (n - 2))) / (n * (n - 3))


def cka_matrix(chunks, layer_dims=None, *, unbiased=True):
    """Linear CKA between every pair of layers, in one streaming pass.

    Parameters
    ----------
    chunks : callable
        ``chunks()`` returns an iterator; each item is a list of arrays ``(n_i, C_l)``, one per
        layer, holding the same images.
    layer_dims : sequence of int, optional
        Expected width of each layer, checked against the data.
    unbiased : bool, default=True
        See :class:`StreamingCKA`.

    Returns
    -------
    ndarray of shape (L, L)
        Symmetric, 1 on the diagonal (NaN for a constant layer).
    """
    cka = fold(chunks, partial(StreamingCKA, unbiased=unbiased), _fit_chunk)
    if layer_dims is not None and list(layer_dims) != cka.dims_:
        raise ValueError(f"layer widths {cka.dims_} differ from layer_dims {list(layer_dims)}")
    return cka.cka()


def _fit_chunk(cka, arrays, offset):
    cka.partial_fit(arrays)


# --------------------------------------------------------------------------- table


def layer_figures(x, labels, *, dead=None, clusters=None, random_state=0):
    """The per-layer figures of ``layers.parquet`` for one layer.

    Parameters
    ----------
    x : array of shape (N, C)
        Pooled activations.
    labels : array of shape (N,) of int or None
        Class per image (-1 = unlabelled); None gives NaN separability figures.
    dead : array of shape (C,) of bool, optional
        Dead units (left out of the separability figures).
    clusters : array of shape (C,) of int, optional
        Cluster per unit (-1 = dead/noise).
    random_state : int, default=0

    Returns
    -------
    dict
        ``units, dead_units, n_clusters, probe_accuracy, knn_accuracy, class_silhouette``.
    """
    n_units = x.shape[1]
    dead = np.zeros(n_units, bool) if dead is None else np.asarray(dead, bool)
    clusters = None if clusters is None else np.asarray(clusters)
    figures = {"units": n_units, "dead_units": int(dead.sum()),
               "n_clusters": None if clusters is None else len(np.unique(clusters[clusters >= 0]))}
    if labels is None:
        return figures | dict.fromkeys(["probe_accuracy", "knn_accuracy", "class_silhouette"], np.nan)
    rng = np.random.default_rng(random_state)
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if len(rows) > 5000:  # read the rows once; every figure samples at most 5000
        rows = np.sort(rng.choice(rows, 5000, replace=False))
    live, labels = np.asarray(x[rows])[:, ~dead], labels[rows]
    return figures | {"probe_accuracy": probe_accuracy(live, labels, random_state=random_state),
                      "knn_accuracy": knn_class_accuracy(live, labels, random_state=random_state),
                      "class_silhouette": class_silhouette(live, labels, random_state=random_state)}


def layer_table(figures, cka=None):
    """Combine per-layer figures into the ``layers.parquet`` table.

    Parameters
    ----------
    figures : mapping of str to dict
        Layer name -> :func:`layer_figures` output (extra keys become extra columns), in model
        order.
    cka : array of shape (L, L), optional
        CKA matrix in the same layer order; adds ``cka_previous`` (CKA with the layer before,
        NaN for the first) and ``cka`` (the layer's row, as a list).

    Returns
    -------
    DataFrame
        One row per layer, ``LAYER_COLUMNS`` first; embedding-quality columns are merged by the
        caller.
    """
    table = pd.DataFrame([{"layer": name, **values} for name, values in figures.items()])
    table = table.reindex(columns=LAYER_COLUMNS + [c for c in table.columns if c not in LAYER_COLUMNS])
    table["n_clusters"] = table["n_clusters"].astype("Int64")
    if cka is not None:
        cka = np.asarray(cka, dtype=np.float64)
        if cka.shape != (len(table), len(table)):
            raise ValueError(f"cka must be ({len(table)}, {len(table)}), got {cka.shape}")
        table["cka_previous"] = np.append(np.nan, np.diag(cka, -1))
        table["cka"] = [row.tolist() for row in cka]
    return table
