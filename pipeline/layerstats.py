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
``StreamingCKA(*, unbiased=True)``
    ``.partial_fit(arrays) -> self``, ``.cka() -> (L, L)``; ``.empty_like()`` and ``.merge(other)``
    split a pass over workers (the Dask engine) with exactly the sequential result.
``cka_matrix(chunks, layer_dims=None, *, unbiased=True) -> (L, L)``
    ``chunks()`` yields, per chunk, a list of ``(n_i, C_l)`` arrays, one per layer, same rows.
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

from pipeline.streams import fold

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

    Memory is ``O(D^2)``: 2 000 units in total need 32 MB; for very wide models pass fewer
    layers. Non-finite values are replaced by 0 (and counted in ``n_nonfinite_``).

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
