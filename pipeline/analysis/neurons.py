"""Neurons of one layer: streaming moments, dead units, clusters, their stability, summaries.

Everything here is pure: numpy in, numpy/pandas out, no file I/O. An activation matrix
``(N images, C units)`` is read as a *stream*: ``chunks`` is a zero-argument callable returning
an iterator over row chunks ``(n_i, C)`` in image order (the caller reads them from
``activations.zarr``). It is called once per pass, so memory depends on ``C``, never on ``N``.
Image class labels are integers with ``-1`` meaning unlabelled (as in ``dataset.parquet``).
Every pass is a :func:`pipeline.analysis.streams.fold` over mergeable accumulators, so the Dask engine can
fit the chunks on workers and merge them in row order with exactly the local result.

API
---
``StreamingMoments(*, cross=True, dtype=np.float32)``
    ``.partial_fit(x, sample_weight=None) -> self``, ``.merge(other) -> self``, ``.summary() -> dict``,
    ``.correlation(rtol=DEAD_RTOL) -> (C, C)``. Running mean, co-moments, min, max, non-finite counts.
``correlation_streaming(chunks, *, rtol=DEAD_RTOL, dtype=np.float32) -> (corr (C, C), stats dict)``
    One pass. ``stats``: ``n, mean, std, min, max, n_nonfinite`` (arrays of length C).
``unit_moments(chunks) -> stats dict``
    The same ``stats`` without the ``(C, C)`` co-moments: ``O(C)`` memory, for very wide layers.
``dead_units(stats, rtol=DEAD_RTOL) -> (C,) bool``
    Scale-free: non-finite anywhere, or constant within float32 precision of the unit's own scale.
``NeuronClusterer(*, method="agglomerative", n_clusters="auto", k_range=(2, 12),
min_cluster_size=5, random_state=None)``
    ``.fit(corr) -> self`` sets ``labels_`` (-1 = dead or noise), ``n_clusters_``, ``kept_``,
    ``silhouette_``, ``silhouette_curve_``, ``note_``; ``.fit_predict(corr) -> labels_``.
``bootstrap_stability(chunks, clusterer, n_images, *, n_boot=20, random_state=None,
max_bytes=2**28) -> Stability``
    ``Stability.cluster`` (mean best-match Jaccard per cluster), ``.jaccard``, ``.ari``,
    ``.mean_ari``, ``.per_unit(labels)``.
``class_selectivity(class_means) -> (C,)``
``unit_summary(chunks, image_labels=None, *, top_k=9) -> DataFrame``
    One row per unit: ``channel, mean, std, max, top_indices, class_selectivity, top_class``.
``cluster_summary(chunks, corr, labels, stats, *, image_labels=None, top_k=9) -> DataFrame``
    One row per cluster: ``cluster, size, members, mean_corr, explained, centroid, top_indices,
    top_class, dominant_classes, class_selectivity``.

A typical layer::

    corr, stats = correlation_streaming(chunks)
    clusterer = NeuronClusterer(random_state=seed).fit(corr)        # dead units get -1
    stability = bootstrap_stability(chunks, clusterer, n_images, random_state=seed)
    units = unit_summary(chunks, image_labels)
    clusters = cluster_summary(chunks, corr, clusterer.labels_, stats, image_labels=image_labels)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin, clone
from sklearn.metrics import adjusted_rand_score, silhouette_score

from pipeline.analysis.streams import fold

METHODS = ("agglomerative", "kmeans", "hdbscan")

#: A unit whose std is at most this share of its largest |value| is constant: its variation is a
#: few float32 rounding steps (activations are stored as float32), which no correlation can use.
DEAD_RTOL = 4 * float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- moments


class StreamingMoments:
    """Running moments of ``C`` units over row chunks, memory independent of the row count.

    Each chunk is centred on its own (weighted) mean and merged with Chan et al.'s parallel
    update, so the product can be taken in float32 without the catastrophic cancellation of
    ``E[xy] - E[x]E[y]``: datasets are stored sorted by class, so the running mean drifts.
    Non-finite values are counted per unit and replaced by 0, which keeps them from poisoning
    the other units; such units are dead anyway (see :func:`dead_units`).

    Parameters
    ----------
    cross : bool, default=True
        Keep the ``(C, C)`` co-moment matrix (needed for correlations); ``False`` keeps only the
        per-unit variance, ``O(C)`` memory.
    dtype : numpy dtype, default=np.float32
        Precision of the per-chunk product; running sums are always float64.

    Attributes
    ----------
    n_samples_seen_ : float
        Sum of the sample weights seen (the row count when unweighted).
    mean_, min_, max_ : ndarray of shape (C,)
    n_nonfinite_ : ndarray of shape (C,)
        Non-finite values per unit (among rows with positive weight).

    Examples
    --------
    >>> m = StreamingMoments()
    >>> for x in np.array_split(np.arange(12.0).reshape(6, 2), 3):
    ...     _ = m.partial_fit(x)
    >>> m.summary()["mean"]
    array([5., 6.])
    """

    def __init__(self, *, cross=True, dtype=np.float32):
        self.cross = cross
        self.dtype = dtype

    def partial_fit(self, x, sample_weight=None):
        """Add a chunk of rows ``x`` (n, C), optionally weighted (e.g. bootstrap multiplicities)."""
        x, w = _check_chunk(x, sample_weight)
        if not hasattr(self, "n_samples_seen_"):
            self._start(x.shape[1])
        elif x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"chunk has {x.shape[1]} units, earlier chunks had {self.mean_.shape[0]}")
        if len(x) == 0:
            return self
        finite = np.isfinite(x)
        self.n_nonfinite_ += (~finite).sum(axis=0)
        self.max_ = np.fmax(self.max_, np.where(finite, x, -np.inf).max(axis=0))
        self.min_ = np.fmin(self.min_, np.where(finite, x, np.inf).min(axis=0))
        self._merge(*self._chunk_moments(np.where(finite, x, 0.0), w))
        return self

    def _start(self, n_units):
        self.n_samples_seen_ = 0.0
        self.mean_ = np.zeros(n_units)
        self.min_ = np.full(n_units, np.inf)
        self.max_ = np.full(n_units, -np.inf)
        self.n_nonfinite_ = np.zeros(n_units, dtype=np.int64)
        self._m2 = np.zeros((n_units, n_units) if self.cross else n_units)

    def _chunk_moments(self, x, w):
        total = float(len(x)) if w is None else float(w.sum())
        mean = (x.sum(axis=0) if w is None else w @ x) / total
        centred = (x - mean).astype(self.dtype)
        weighted = centred if w is None else centred * w.astype(self.dtype)[:, None]
        m2 = weighted.T @ centred if self.cross else np.einsum("ij,ij->j", weighted, centred)
        return total, mean, m2.astype(np.float64)

    def merge(self, other):
        """Add the rows another ``StreamingMoments`` has seen (Chan et al.'s parallel update).

        Merging the moments of single chunks in chunk order is bit-for-bit ``partial_fit`` on
        those chunks in that order (up to the sign of zeros), which is how the Dask engine
        spreads a pass over workers and still matches the local engine exactly.
        """
        if not hasattr(other, "n_samples_seen_"):
            return self
        if not hasattr(self, "n_samples_seen_"):
            self._start(other.mean_.shape[0])
        elif other.mean_.shape != self.mean_.shape or other.cross != self.cross:
            raise ValueError("cannot merge moments of different units or cross settings")
        self.n_nonfinite_ += other.n_nonfinite_
        self.max_ = np.fmax(self.max_, other.max_)
        self.min_ = np.fmin(self.min_, other.min_)
        if other.n_samples_seen_:
            self._merge(other.n_samples_seen_, other.mean_, other._m2)
        return self

    def _merge(self, total, mean, m2):
        seen = self.n_samples_seen_
        merged = seen + total
        delta = mean - self.mean_
        outer = np.outer(delta, delta) if self.cross else delta * delta
        self._m2 += m2 + outer * (seen * total / merged)
        self.mean_ = self.mean_ + delta * (total / merged)
        self.n_samples_seen_ = merged

    def summary(self):
        """Per-unit ``n, mean, std`` (population, ddof=0), ``min, max, n_nonfinite`` as a dict."""
        _require_data(self)
        n = self.n_samples_seen_
        var = (np.diag(self._m2) if self.cross else self._m2) / n if n else np.full(len(self.mean_), np.nan)
        missing = np.isinf(self.max_)  # no finite value at all
        return {"n": n, "mean": self.mean_.copy() if n else np.full(len(self.mean_), np.nan),
                "std": np.sqrt(np.maximum(var, 0.0)),
                "min": np.where(missing, np.nan, self.min_), "max": np.where(missing, np.nan, self.max_),
                "n_nonfinite": self.n_nonfinite_.copy()}

    def correlation(self, rtol=DEAD_RTOL):
        """Pearson correlation ``(C, C)``; rows and columns of dead units (see :func:`dead_units`)
        are NaN, diagonal 1."""
        _require_data(self)
        if not self.cross:
            raise ValueError("correlation needs StreamingMoments(cross=True)")
        dead = dead_units(self.summary(), rtol)
        scale = np.sqrt(np.where(dead, 1.0, np.diag(self._m2)))
        corr = np.clip(self._m2 / np.outer(scale, scale), -1.0, 1.0)
        corr[dead, :] = np.nan
        corr[:, dead] = np.nan
        live = np.flatnonzero(~dead)
        corr[live, live] = 1.0
        return corr


def _check_chunk(x, sample_weight):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"a chunk must be 2-D (rows, units), got shape {x.shape}")
    if sample_weight is None:
        return x, None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (len(x),) or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("sample_weight must be finite, non-negative, one per row")
    keep = w > 0  # bootstrap weights are 0 for about a third of the rows: skip their products
    return x[keep], w[keep]


def _require_data(moments):
    if not hasattr(moments, "n_samples_seen_"):
        raise ValueError("no data seen: call partial_fit first")


def correlation_streaming(chunks, *, rtol=DEAD_RTOL, dtype=np.float32):
    """Pearson correlation between units in one streaming pass.

    Parameters
    ----------
    chunks : callable
        ``chunks()`` returns an iterator over row chunks ``(n_i, C)``.
    rtol : float, default=DEAD_RTOL
        Dead-unit tolerance, see :func:`dead_units`; dead units get NaN rows and columns.
    dtype : numpy dtype, default=np.float32
        Precision of the per-chunk product (sums are float64).

    Returns
    -------
    corr : ndarray of shape (C, C), float64
    stats : dict
        ``n`` (rows), and per unit ``mean, std, min, max, n_nonfinite``.
    """
    moments = fold(chunks, partial(StreamingMoments, dtype=dtype), _fit_rows)
    return moments.correlation(rtol), moments.summary()


def unit_moments(chunks):
    """Per-unit ``stats`` as :func:`correlation_streaming` returns them, in ``O(C)`` memory.

    For layers too wide for a ``(C, C)`` correlation: enough for :func:`dead_units` and the
    centroid projection of :func:`cluster_summary`.

    Parameters
    ----------
    chunks : callable
        ``chunks()`` returns an iterator over row chunks ``(n_i, C)``.

    Returns
    -------
    dict
        ``n`` (rows), and per unit ``mean, std, min, max, n_nonfinite``.
    """
    return fold(chunks, partial(StreamingMoments, cross=False), _fit_rows).summary()


def _fit_rows(moments, x, offset):
    moments.partial_fit(x)


def dead_units(stats, rtol=DEAD_RTOL):
    """Units that cannot be correlated: constant at float32 precision, or with a non-finite value.

    The rule is scale-free: a unit is dead when ``n_nonfinite > 0`` or
    ``std <= rtol * max(|mean|, max|value|)``, with ``max|value| = max(|min|, |max|)`` the unit's
    own largest magnitude. A unit whose values are all equal (std 0, at any level, also 0) or vary
    only by a few float32 rounding steps of its magnitude is dead; a unit with values near 1e-10
    that really vary is alive (randomly initialised deep layers produce such activations, and
    they carry information: an absolute floor such as ``std < 1e-8`` called every unit dead).
    The largest magnitude, not the mean, sets the scale, so a sparse unit (0 on most images) is
    alive: its std is at least ``max|value| / sqrt(N)``.

    Parameters
    ----------
    stats : dict
        Per-unit ``std, mean, min, max, n_nonfinite`` (from :func:`correlation_streaming`,
        :func:`unit_moments` or ``StreamingMoments.summary()``; ``min``/``max`` are over the
        finite values, NaN when there is none).
    rtol : float, default=DEAD_RTOL
        ``4 * float32 eps`` (about 4.8e-7): four rounding steps of the stored activations.

    Returns
    -------
    ndarray of shape (C,), bool
    """
    std, mean = np.asarray(stats["std"], dtype=np.float64), np.asarray(stats["mean"], dtype=np.float64)
    scale = np.fmax(np.abs(mean), np.fmax(np.abs(np.asarray(stats["min"], dtype=np.float64)),
                                          np.abs(np.asarray(stats["max"], dtype=np.float64))))
    constant = ~(std > rtol * scale)  # NaN std or NaN scale (no finite value) counts as constant
    return constant | (np.asarray(stats["n_nonfinite"]) > 0)


# --------------------------------------------------------------------------- clustering


class NeuronClusterer(ClusterMixin, BaseEstimator):
    """Cluster the units of a layer from their correlation matrix (distance ``1 - r``).

    Clustering neurons is clustering *features*: units that rise and fall together over the
    images end up together. Rows with a NaN diagonal (dead units, as returned by
    :func:`correlation_streaming`) are left out and labelled ``-1``.

    Parameters
    ----------
    method : {"agglomerative", "kmeans", "hdbscan"}, default="agglomerative"
        ``agglomerative``: average linkage on the precomputed distance ``1 - r`` (tree built
        once, cut at every ``k``). ``kmeans``: k-means on the rows of the correlation matrix,
        i.e. each unit is described by its correlation profile with every live unit (units with
        similar profiles group together; no extra embedding step, and the profile is exactly
        what the agglomerative distance summarises). ``hdbscan``: ``sklearn.cluster.HDBSCAN``
        on the precomputed distance; it chooses the number of clusters itself and its noise
        label ``-1`` is kept (``n_clusters`` is then ignored).
    n_clusters : "auto" or int, default="auto"
        ``auto`` picks the ``k`` with the best silhouette (precomputed ``1 - r``) over
        ``k_range`` clipped to ``[2, n_live - 1]``; ties go to the smaller ``k``. An int larger
        than the number of live units is clipped (and noted in ``note_``).
    k_range : (int, int), default=(2, 12)
        Inclusive range of ``k`` tried by ``auto``.
    min_cluster_size : int, default=5
        HDBSCAN only; clipped to the number of live units.
    random_state : int, numpy Generator or None
        Seeds k-means (the only random step).

    Attributes
    ----------
    labels_ : ndarray of shape (C,)
        Cluster per unit, ``0`` the largest cluster; ``-1`` for dead units and HDBSCAN noise.
    n_clusters_ : int
    kept_ : ndarray of shape (C,), bool
        Units that were clustered (finite diagonal).
    silhouette_ : float
        Silhouette of ``labels_`` on the kept, non-noise units (NaN when undefined).
    silhouette_curve_ : dict
        ``k -> silhouette`` for every ``k`` tried by ``auto`` (empty otherwise).
    note_ : str
        Why the result is degenerate (e.g. fewer than 3 live units), else ``""``.

    Examples
    --------
    >>> corr = np.array([[1, .9, 0, 0], [.9, 1, 0, 0], [0, 0, 1, .8], [0, 0, .8, 1]])
    >>> NeuronClusterer(n_clusters=2).fit(corr).labels_
    array([0, 0, 1, 1])
    """

    def __init__(self, *, method="agglomerative", n_clusters="auto", k_range=(2, 12),
                 min_cluster_size=5, random_state=None):
        self.method = method
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.min_cluster_size = min_cluster_size
        self.random_state = random_state

    def fit(self, corr, y=None):
        """Cluster the units whose row of ``corr`` has a finite diagonal; return ``self``."""
        self._check_params()
        corr, kept = _check_corr(corr)
        rng = np.random.default_rng(self.random_state)
        live, curve, note = self._fit_live(corr[np.ix_(kept, kept)], rng)
        labels = np.full(len(corr), -1, dtype=np.int64)
        labels[kept] = _canonical(live)
        self.labels_, self.kept_, self.note_ = labels, kept, note
        self.n_clusters_ = int(labels.max() + 1)
        self.silhouette_curve_ = curve
        self.silhouette_ = _silhouette(_distance(corr[np.ix_(kept, kept)]), labels[kept])
        return self

    def _check_params(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        auto = isinstance(self.n_clusters, str) and self.n_clusters == "auto"
        if not auto and not (isinstance(self.n_clusters, (int, np.integer)) and self.n_clusters >= 1):
            raise ValueError(f"n_clusters must be 'auto' or a positive int; got {self.n_clusters!r}")
        lo, hi = self.k_range
        if not 2 <= lo <= hi:
            raise ValueError(f"k_range must be (low, high) with 2 <= low <= high; got {self.k_range!r}")
        if self.min_cluster_size < 2:
            raise ValueError(f"min_cluster_size must be >= 2; got {self.min_cluster_size!r}")

    def _fit_live(self, corr, rng):
        n = len(corr)
        if n < 3:
            return np.zeros(n, dtype=np.int64), {}, f"only {n} live units: all in cluster 0"
        distance = _distance(corr)
        if self.method == "hdbscan":
            return self._hdbscan(distance), {}, ""
        ks = list(_k_candidates(self.k_range, n)) if self.n_clusters == "auto" else [min(int(self.n_clusters), n)]
        cut = self._cutter(corr, distance, rng, ks)
        if self.n_clusters == "auto":
            candidates = {k: cut(k) for k in ks}
            curve = {k: _silhouette(distance, labels) for k, labels in candidates.items()}
            best = max(curve, key=lambda k: (np.nan_to_num(curve[k], nan=-np.inf), -k))
            return candidates[best], curve, ""
        k = min(int(self.n_clusters), n)
        note = f"n_clusters={self.n_clusters} > {n} live units: clipped to {n}" if k < self.n_clusters else ""
        return cut(k), {}, note

    def _cutter(self, corr, distance, rng, ks):
        """A function ``k -> labels`` for ``k`` in ``ks`` (the tree is built and cut only once)."""
        if self.method == "kmeans":
            seed = int(rng.integers(2**31 - 1))
            return lambda k: _kmeans(corr, k, seed)
        from scipy.cluster.hierarchy import cut_tree, linkage
        from scipy.spatial.distance import squareform

        tree = linkage(squareform(distance, checks=False), method="average")
        # one walk of the tree gives every cut: scipy's cut_tree is pure Python and dominated the
        # stage on wide layers when called once per k (and per bootstrap resample)
        cuts = cut_tree(tree, n_clusters=ks)
        return lambda k: cuts[:, ks.index(k)]

    def _hdbscan(self, distance):
        from sklearn.cluster import HDBSCAN

        size = max(2, min(self.min_cluster_size, len(distance)))
        return HDBSCAN(metric="precomputed", min_cluster_size=size, copy=True).fit_predict(distance)


def _kmeans(rows, k, seed):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    # One thread: the data is only units x units, OpenMP spin-waits made these fits ~30x slower
    # on a busy 2-core machine, and the result must not depend on the thread count.
    with threadpool_limits(1):
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(rows)


def _check_corr(corr):
    corr = np.asarray(corr, dtype=np.float64)
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
        raise ValueError(f"correlation matrix must be square, got shape {corr.shape}")
    kept = np.isfinite(np.diag(corr))
    live = corr[np.ix_(kept, kept)]
    if not np.isfinite(live).all():
        raise ValueError("correlation matrix has non-finite entries between live units "
                         "(units with a finite diagonal)")
    if not np.allclose(live, live.T, atol=1e-6):
        raise ValueError("correlation matrix is not symmetric")
    return corr, kept


def _distance(corr):
    distance = 1.0 - (corr + corr.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return np.clip(distance, 0.0, 2.0)  # float32 products can overshoot |r| = 1 slightly


def _k_candidates(k_range, n):
    lo, hi = (int(np.clip(k, 2, n - 1)) for k in k_range)
    return range(lo, hi + 1)


def _silhouette(distance, labels):
    clustered = labels >= 0
    labels = labels[clustered]
    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return np.nan
    return float(silhouette_score(distance[np.ix_(clustered, clustered)], labels, metric="precomputed"))


def _canonical(labels):
    """Renumber clusters by decreasing size, ties by first member, so results compare by eye."""
    labels = np.asarray(labels)
    ids, first, sizes = np.unique(labels[labels >= 0], return_index=True, return_counts=True)
    order = ids[np.lexsort((first, -sizes))]
    out = np.full(len(labels), -1, dtype=np.int64)
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


# --------------------------------------------------------------------------- stability


@dataclass(frozen=True)
class Stability:
    """Bootstrap stability of a clustering.

    Attributes
    ----------
    cluster : ndarray of shape (K,)
        Mean over bootstraps of each reference cluster's best-match Jaccard index.
    jaccard : ndarray of shape (n_boot, K)
    ari : ndarray of shape (n_boot,)
        Adjusted Rand index between reference and bootstrap labels on the clustered units.
    """

    cluster: np.ndarray
    jaccard: np.ndarray
    ari: np.ndarray

    @property
    def mean_ari(self):
        return float(np.mean(self.ari)) if len(self.ari) else np.nan

    def per_unit(self, labels):
        """Stability of each unit's cluster (NaN for ``-1``), for ``clusters.parquet``."""
        labels = np.asarray(labels)
        padded = np.append(self.cluster, np.nan)  # index -1 -> NaN
        return padded[np.where(labels >= 0, labels, len(self.cluster))]


def bootstrap_stability(chunks, clusterer, n_images, *, n_boot=20, random_state=None, max_bytes=2**28):
    """How reproducible a unit clustering is when the images are resampled.

    For each bootstrap the images are drawn with replacement; rather than copying rows, each
    row's multiplicity becomes its weight in the streaming moments. The correlation is
    recomputed, the clusterer refitted with the reference number of clusters, and every
    reference cluster is matched to its best bootstrap cluster (Jaccard index, Hennig 2007).
    Several bootstraps share each pass over the data, as many as fit in ``max_bytes``. A unit
    that happens to be constant in a resample is unclustered there, which lowers its cluster's
    score; units dead in the reference stay out.

    Parameters
    ----------
    chunks : callable
        Row chunks of the activations, in the same image order as the reference fit.
    clusterer : NeuronClusterer
        Fitted on the full data; its parameters (with ``n_clusters = n_clusters_``) are reused,
        and its dead units stay excluded in every bootstrap.
    n_images : int
        Total number of rows ``chunks()`` yields.
    n_boot : int, default=20
    random_state : int, numpy Generator or None
        Seeds the resampling.
    max_bytes : int, default=2**28
        Memory for the ``(C, C)`` accumulators of simultaneous bootstraps.

    Returns
    -------
    Stability
    """
    if not hasattr(clusterer, "labels_"):
        raise ValueError("fit the clusterer on the full data before bootstrap_stability")
    reference, kept = clusterer.labels_, clusterer.kept_
    k = clusterer.n_clusters_
    if k == 0 or n_boot == 0:
        return Stability(np.full(k, np.nan), np.empty((0, k)), np.empty(0))
    rng = np.random.default_rng(random_state)
    weights = [np.bincount(rng.integers(0, n_images, n_images), minlength=n_images) for _ in range(n_boot)]
    refit = clone(clusterer).set_params(n_clusters=k)
    jaccard, ari = [], []
    for corr in _weighted_correlations(chunks, weights, len(reference), max_bytes):
        corr[~kept, :] = np.nan
        corr[:, ~kept] = np.nan
        labels = refit.fit(corr).labels_
        jaccard.append(_best_jaccard(reference[kept], labels[kept], k))
        ari.append(adjusted_rand_score(reference[kept], labels[kept]))
    jaccard = np.array(jaccard)
    return Stability(jaccard.mean(axis=0), jaccard, np.array(ari))


def _weighted_correlations(chunks, weights, n_units, max_bytes):
    """Yield one correlation per weight vector, sharing each pass among a group of them.

    A ``chunks`` object with ``map_passes`` (the Dask engine's row blocks) runs the groups'
    passes itself, in parallel; each correlation is the same either way.
    """
    group = max(1, int(max_bytes // (8 * n_units * n_units)))
    passes = getattr(chunks, "map_passes", None)
    if passes is not None:
        yield from passes(_weighted_pass, weights, group)
        return
    for start in range(0, len(weights), group):
        yield from _weighted_pass(chunks, weights[start:start + group])


def _weighted_pass(chunks, block):
    """One pass over the chunks for a group of weight vectors; yields their correlations."""
    moments = [StreamingMoments() for _ in block]
    offset = 0
    for x in chunks():
        x = np.asarray(x, dtype=np.float64)  # convert once, not once per bootstrap
        if offset + len(x) > len(block[0]):
            raise ValueError(f"chunks yielded more rows than n_images={len(block[0])}")
        for m, w in zip(moments, block):
            m.partial_fit(x, sample_weight=w[offset:offset + len(x)])
        offset += len(x)
    if offset != len(block[0]):
        raise ValueError(f"chunks yielded {offset} rows, n_images is {len(block[0])}")
    yield from (m.correlation() for m in moments)


def _best_jaccard(reference, labels, k):
    """For each reference cluster 0..k-1, its highest Jaccard index with any bootstrap cluster."""
    ref = reference[:, None] == np.arange(k)
    ids = np.unique(labels[labels >= 0])
    if len(ids) == 0:
        return np.zeros(k)
    boot = labels[:, None] == ids
    overlap = ref.T.astype(float) @ boot
    union = ref.sum(axis=0)[:, None] + boot.sum(axis=0) - overlap
    return (overlap / union).max(axis=1)


# --------------------------------------------------------------------------- summaries


def class_selectivity(class_means):
    """Class selectivity index per unit (Morcos et al. 2018) from class-mean activations.

    ``(mu_max - mu_rest) / (mu_max + mu_rest)``, with ``mu_max`` the largest class mean and
    ``mu_rest`` the mean of the other class means: 0 when every class drives the unit equally,
    1 when a single class does. The index assumes non-negative activity (post-ReLU). For a unit
    with a negative class mean the class means are first shifted so the least-driving class sits
    at 0, which keeps the index in [0, 1] (read it then as selectivity relative to that class).
    A unit with equal class means scores 0 (also when they are all 0); NaN when a class mean is
    not finite or fewer than 2 classes are given.

    Parameters
    ----------
    class_means : array of shape (K, C)

    Returns
    -------
    ndarray of shape (C,)
    """
    mu = np.asarray(class_means, dtype=np.float64)
    if mu.ndim != 2 or len(mu) < 2:
        return np.full(mu.shape[-1] if mu.ndim == 2 else 0, np.nan)
    mu = mu - np.minimum(mu.min(axis=0), 0.0)
    top = mu.max(axis=0)
    rest = (mu.sum(axis=0) - top) / (len(mu) - 1)
    spread, total = top - rest, top + rest
    index = np.divide(spread, total, out=np.zeros_like(total), where=total > 0)
    return np.where(np.isfinite(mu).all(axis=0), np.clip(index, 0.0, 1.0), np.nan)


def unit_summary(chunks, image_labels=None, *, top_k=9):
    """Per-unit figures for ``clusters.parquet`` in one streaming pass.

    Parameters
    ----------
    chunks : callable
        Row chunks ``(n_i, C)`` of the activations.
    image_labels : array of shape (N,) of int, optional
        Class per image (-1 = unlabelled, ignored). Without labels ``class_selectivity`` is NaN
        and ``top_class`` missing.
    top_k : int, default=9
        Images listed in ``top_indices``, highest activation first; ties go to the lower index;
        non-finite activations are never listed.

    Returns
    -------
    DataFrame
        ``channel, mean, std, max, top_indices (list of int), class_selectivity, top_class``
        (``top_class`` is the label of the class with the highest mean, nullable Int64).
    """
    stats, top, classes, means = _column_pass(chunks, image_labels, top_k)
    table = pd.DataFrame({"channel": np.arange(len(stats["mean"])), "mean": stats["mean"],
                          "std": stats["std"], "max": stats["max"], "top_indices": top})
    table["class_selectivity"] = class_selectivity(means) if len(classes) >= 2 else np.nan
    table["top_class"] = _top_class(classes, means, len(table))
    return table


def cluster_summary(chunks, corr, labels, stats, *, image_labels=None, top_k=9):
    """Per-cluster figures: cohesion, a centroid direction, its top images and classes.

    The centroid of a cluster is the leading eigenvector of its members' correlation matrix,
    i.e. the first principal component of their *z-scored* activations, written as a length-C
    vector (zero outside the cluster, unit norm, signed so its weights sum to > 0). For a
    homogeneous cluster it is ``1/sqrt(size)`` on every member (the mean standardised
    direction); it down-weights members that follow the group loosely. An image's score is its
    projection ``((x - mean) / std) @ centroid``; to use it as an objective on raw activations
    take weights ``centroid / std``. ``explained`` is the share of the members' standardised
    variance the centroid captures.

    Parameters
    ----------
    chunks : callable
        Row chunks ``(n_i, C)`` of the activations (one pass for all clusters).
    corr : array of shape (C, C)
        From :func:`correlation_streaming`.
    labels : array of shape (C,)
        Cluster per unit; ``-1`` is skipped.
    stats : dict
        ``mean`` and ``std`` per unit, from :func:`correlation_streaming`.
    image_labels : array of shape (N,) of int, optional
        Class per image (-1 = unlabelled).
    top_k : int, default=9

    Returns
    -------
    DataFrame
        ``cluster, size, members (list), mean_corr`` (mean off-diagonal r, NaN for a singleton),
        ``explained, centroid (list), top_indices (list), top_class, dominant_classes`` (up to 3
        labels by decreasing mean projection) and ``class_selectivity`` of the projection (which
        is centred, so the shift described in :func:`class_selectivity` applies).
    """
    corr, labels = np.asarray(corr, dtype=np.float64), np.asarray(labels)
    ids = np.unique(labels[labels >= 0])
    shapes = [_cluster_shape(corr, np.flatnonzero(labels == c)) for c in ids]
    table = pd.DataFrame([row for row, _ in shapes], columns=CLUSTER_SHAPE)
    table.insert(0, "cluster", ids.astype(np.int64))
    if len(ids) == 0:
        return table.assign(centroid=[], top_indices=[], top_class=pd.array([], dtype="Int64"),
                            dominant_classes=[], class_selectivity=np.zeros(0))
    centroids = np.column_stack([lead for _, lead in shapes])
    used = np.flatnonzero(centroids.any(axis=1))  # only member columns are read from the chunks
    weights = centroids[used] / np.asarray(stats["std"])[used, None]
    offset = np.asarray(stats["mean"])[used] @ weights

    def project(x):
        return np.asarray(x, dtype=np.float64)[:, used] @ weights - offset

    _, top, classes, means = _column_pass(chunks, image_labels, top_k, project)
    table["centroid"] = [c.tolist() for c in centroids.T]
    table["top_indices"] = top
    table["top_class"] = _top_class(classes, means, len(ids))
    table["dominant_classes"] = _dominant_classes(classes, means, len(ids))
    table["class_selectivity"] = class_selectivity(means) if len(classes) >= 2 else np.nan
    return table


CLUSTER_SHAPE = ["size", "members", "mean_corr", "explained"]


def _cluster_shape(corr, members):
    """Size, members, mean off-diagonal r, explained share; and the length-C centroid."""
    sub = corr[np.ix_(members, members)]
    size = len(members)
    mean_corr = (sub.sum() - np.trace(sub)) / (size * (size - 1)) if size > 1 else np.nan
    values, vectors = np.linalg.eigh(sub)
    lead = np.zeros(len(corr))
    lead[members] = vectors[:, -1] * (1.0 if vectors[:, -1].sum() >= 0 else -1.0)
    return (size, members.tolist(), float(mean_corr), float(values[-1] / size)), lead


def _dominant_classes(classes, means, n, count=3):
    if len(classes) == 0:
        return [[] for _ in range(n)]
    order = np.argsort(-means, axis=0, kind="stable")[:count]
    return [classes[order[:, j]].tolist() for j in range(n)]


def _column_pass(chunks, image_labels, top_k, transform=None):
    """One pass over (optionally transformed) chunks: moments, top rows, class means."""
    classes, codes = _class_codes(image_labels)
    acc = fold(chunks, partial(_ColumnPass, len(classes), top_k), partial(_column_update, codes, transform))
    if image_labels is not None and acc.rows != len(image_labels):
        raise ValueError(f"chunks yielded {acc.rows} rows, image_labels has {len(image_labels)}")
    present = acc.counts > 0 if acc.counts is not None else np.zeros(0, bool)
    means = acc.sums[present] / acc.counts[present, None] if acc.sums is not None else np.zeros((0, 0))
    return acc.moments.summary(), acc.top.indices(), classes[present], means


def _column_update(codes, transform, acc, x, offset):
    acc.update(np.asarray(x, dtype=np.float64) if transform is None else transform(x), offset, codes)


class _ColumnPass:
    """Accumulators of one pass over units: moments, top rows and per-class sums.

    Class sums are taken per chunk and then added to the running sums, so accumulators of
    single chunks merged in row order give exactly the sequential result.
    """

    def __init__(self, n_classes, top_k):
        self.moments, self.top = StreamingMoments(cross=False), _TopK(top_k)
        self.n_classes = n_classes
        self.sums = self.counts = None
        self.rows = 0

    def update(self, x, offset, codes):
        self.moments.partial_fit(x)
        self.top.update(x, offset)
        if self.n_classes:
            part = codes[offset:offset + len(x)]
            sums, counts = np.zeros((self.n_classes, x.shape[1])), np.zeros(self.n_classes)
            np.add.at(sums, part[part >= 0], x[part >= 0])
            counts += np.bincount(part[part >= 0], minlength=self.n_classes)
            self._add(sums, counts)
        self.rows += len(x)

    def _add(self, sums, counts):
        if self.sums is None:
            self.sums, self.counts = sums.copy(), counts.copy()
        else:
            self.sums += sums
            self.counts += counts

    def merge(self, other):
        """Add another pass's accumulators over later rows."""
        self.moments.merge(other.moments)
        self.top.merge(other.top)
        if other.sums is not None:
            self._add(other.sums, other.counts)
        self.rows += other.rows
        return self


def _class_codes(image_labels):
    if image_labels is None:
        return np.zeros(0, dtype=np.int64), None
    image_labels = np.asarray(image_labels)
    classes = np.unique(image_labels[image_labels >= 0])
    codes = np.where(image_labels >= 0, np.searchsorted(classes, image_labels), -1)
    return classes, codes


def _top_class(classes, means, n):
    if len(classes) == 0:
        return pd.array([pd.NA] * n, dtype="Int64")
    best = np.argmax(np.where(np.isfinite(means), means, -np.inf), axis=0)
    return pd.array(classes[best], dtype="Int64")


class _TopK:
    """Running top-k row indices per column; ties go to the lower row index."""

    def __init__(self, k):
        self.k = k
        self.values = self.index = None  # (C, <=k), sorted by value desc, then index asc

    def update(self, x, offset):
        kept = 0 if self.values is None else self.values.shape[1]
        # units as rows: partitioning along contiguous rows is ~3x faster than along columns
        values = np.empty((x.shape[1], kept + x.shape[0]), dtype=np.result_type(x.dtype, np.float32))
        values[:, kept:] = x.T
        values[~np.isfinite(values)] = -np.inf  # never listed as a top image
        if kept:
            values[:, :kept] = self.values
        position = _top_positions(values, self.k)
        earlier = np.take_along_axis(self.index, np.minimum(position, kept - 1), 1) if kept else 0
        self.values = np.take_along_axis(values, position, 1)
        self.index = np.where(position < kept, earlier, offset + position - kept)

    def merge(self, other):
        """Add the candidates of another ``_TopK`` whose rows all come after this one's.

        A chunk's own top k holds every row of it that can make the overall top k, so merging
        per-chunk top k in row order gives exactly the sequential result (ties included: this
        one's rows come first, and each side is ordered by value, then row).
        """
        if other.values is None:
            return self
        if self.values is None:
            self.values, self.index = other.values.copy(), other.index.copy()
            return self
        values = np.concatenate([self.values, other.values], axis=1)
        index = np.concatenate([self.index, other.index], axis=1)
        position = _top_positions(values, self.k)
        self.values = np.take_along_axis(values, position, 1)
        self.index = np.take_along_axis(index, position, 1)
        return self

    def indices(self):
        if self.values is None:
            return []
        return [idx[np.isfinite(v)].tolist() for v, idx in zip(self.values, self.index)]


def _top_positions(values, k):
    """Positions of each row's ``k`` largest values, by value desc then position asc.

    Earlier positions hold earlier images, so ties resolve to the lower image index whatever
    the chunking.
    """
    m = values.shape[1]
    if m > k:
        kth = np.partition(values, m - k, axis=1)[:, m - k, None]
        above, tied = values > kth, values == kth
        room = k - above.sum(axis=1, keepdims=True)
        take = above | (tied & (np.cumsum(tied, axis=1) <= room))
        position = np.argsort(~take, axis=1, kind="stable")[:, :k]
    else:
        position = np.broadcast_to(np.arange(m), values.shape)
    order = np.argsort(-np.take_along_axis(values, position, 1), axis=1, kind="stable")
    return np.take_along_axis(position, order, 1)
