"""2-D embeddings of images and of neurons, and how faithful they are.

Arrays in, arrays or DataFrames out, no file I/O. The embed stage calls
:func:`prepare_features` (or :func:`neuron_features` then :func:`prepare_features`), then
:func:`embed`, scores the result with :func:`trustworthiness_sampled` / :func:`knn_accuracy`
and stores :func:`image_embedding_table` / :func:`neuron_embedding_table` rows.

The maps themselves are scikit-learn style objects: :class:`TSNEMap` and :class:`UMAPMap`
(or :func:`make_map`) ``fit`` on some points (``embedding_``) and ``transform`` places new
points into the fitted map without moving it. :func:`tsne_2d` / :func:`umap_2d` fit one on a
seeded sample of at most ``max_fit`` points and ``transform`` the rest in chunks; their
``placer`` hook lets an engine place the chunks elsewhere (the Dask engine: on its workers) and
their ``profile`` hook reports the seconds spent fitting and placing.

Determinism: every random choice is seeded from ``random_state``, so the same inputs and seed
give bit-identical outputs on the same machine and library versions.

- openTSNE runs with ``n_jobs=1``. Measured here: repeated runs were identical at 1 and 2
  threads, but Barnes-Hut results depend on the thread count (1 and 2 threads differ), so one
  fixed thread is the only setting reproducible whatever the machine's core count; two
  threads also cost 3-4x the CPU for no speed-up on our 2-core machine.
- umap-learn is single-threaded whenever it is seeded (it overrides ``n_jobs`` itself).

Heavy libraries (openTSNE, umap) are imported inside the functions that need them.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from pipeline.backend.umap import import_umap

#: Fewer points than this and t-SNE/UMAP are not meaningful: a deterministic PCA layout is
#: returned instead and the caller should record that the embedding is only a fallback.
MIN_POINTS = 5

METHODS = ("tsne", "umap")

#: umap-learn finds exact neighbours for fits of fewer points, NN-descent from here on.
UMAP_EXACT_BELOW = 4096

#: t-SNE uses FFT-interpolated gradients from this many fitted points, Barnes-Hut below.
FFT_FROM = 10_000

# openTSNE's default optimisation schedule for a fit (250 exaggerated + 500 normal iterations).
_TSNE_SCHEDULE = dict(early_exaggeration_iter=250, n_iter=500)

# openTSNE's own ``transform`` schedule for adding points to a fitted embedding (the defaults
# of ``TSNEEmbedding.transform`` in openTSNE 1.0.4).
_TSNE_PLACE = dict(n_iter=250, learning_rate=0.1, exaggeration=1.5, momentum=0.8,
                   max_grad_norm=0.25)
_TSNE_PLACE_PERPLEXITY = 5.0
_TSNE_PLACE_K = 25

# Relative spread below which a float32 column is constant up to round-off.
_REL_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# seeds and sampling
# --------------------------------------------------------------------------------------------

def _seed(random_state) -> int:
    """One integer seed from a scikit-learn style ``random_state``.

    Ints pass through unchanged so ``random_state=0`` is the library's own seed 0; a
    ``RandomState``/``Generator`` is consumed once; ``None`` gives a fresh, unrepeatable seed.
    """
    if isinstance(random_state, (int, np.integer)):
        return int(random_state)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(np.iinfo(np.int32).max))
    from sklearn.utils import check_random_state

    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _split_sample(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of a seeded sample of ``size`` out of ``n``, and the sorted rest."""
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:size]] = True
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive pieces of at most ``size`` indices."""
    size = max(1, int(size))
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------

def _column_stats(x: np.ndarray, block: int = 4096):
    """Per-column (all finite, mean, std) with float64 sums over row blocks.

    Blocks keep the float64 temporaries small: upcasting a 100k x 2048 float32 matrix at
    once would take 1.6 GB.
    """
    n, d = x.shape
    finite, total, squares = np.ones(d, dtype=bool), np.zeros(d), np.zeros(d)
    for i in range(0, n, block):
        rows = x[i:i + block]
        finite &= np.isfinite(rows).all(axis=0)
        total += np.where(np.isfinite(rows), rows, 0).sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    for i in range(0, n, block):
        rows = x[i:i + block]
        squares += np.square(np.where(np.isfinite(rows), rows, 0) - mean).sum(axis=0)
    return finite, mean, np.sqrt(squares / max(n, 1))


def _informative(x: np.ndarray, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(float32 copy of the informative columns, z-scored unless told not to; their mask).

    Informative: finite everywhere and not constant. Float32 data derived from a constant
    can keep a round-off spread, which is not signal.
    """
    finite, mean, std = _column_stats(x)
    keep = finite & (std > _REL_EPS * np.maximum(np.abs(mean), 1e-30))
    z = x[:, keep].astype(np.float32)  # the only full-size copy; standardised in place
    if standardize:
        z -= mean[keep].astype(np.float32)
        z /= std[keep].astype(np.float32)
    return z, keep


def _pca(x: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Leading principal components of ``x`` (rows are samples), seeded.

    The exact solver is cheap for small matrices and when most components are kept; the
    randomized one is used otherwise and is deterministic given the seed.
    """
    from sklearn.decomposition import PCA

    small = min(x.shape)
    solver = "full" if small <= 500 or n_components >= 0.8 * small else "randomized"
    pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed)
    return pca.fit_transform(x).astype(np.float32, copy=False)


def prepare_features(x, pca=50, random_state=0, standardize=True) -> np.ndarray:
    """Clean, standardise and PCA-reduce a feature matrix for embedding.

    Parameters
    ----------
    x : array-like of shape (n_samples, n_features)
        Activations (one row per image, or per neuron for neuron embeddings).
    pca : int or None, default=50
        Maximum number of principal components. ``None`` or 0 skips PCA.
    random_state : int, RandomState instance or None, default=0
        Seeds the randomized PCA solver.
    standardize : bool, default=True
        Z-score the columns before PCA. Pass False for :func:`neuron_features`, whose rows are
        already z-scored: scaling columns too would distort their correlation geometry.

    Returns
    -------
    ndarray of shape (n_samples, n_components), float32
        ``n_components = min(pca, n_informative_features, n_samples - 1)``. Columns with any
        non-finite value and constant columns are dropped first. With fewer than 3 samples
        this is what is possible: 1 sample gives 0 columns (everything is constant), 2 samples
        give at most 1 column. When PCA would keep every column, the standardised columns are
        returned as they are (PCA would only centre and rotate them).

    Examples
    --------
    >>> x = np.c_[np.arange(10.0), np.ones(10), np.arange(10.0) ** 2]
    >>> prepare_features(x, pca=50).shape
    (10, 2)
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (n_samples, n_features), got shape {x.shape}")
    x, _ = _informative(x, standardize)
    n, d = x.shape
    n_components = min(pca or d, d, max(n - 1, 0))
    if n_components == d:
        return np.ascontiguousarray(x)
    if n_components == 0:
        return np.zeros((n, 0), dtype=np.float32)
    return _pca(x, n_components, _seed(random_state))


def neuron_features(acts, max_images=5000, random_state=0) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron response profiles, the input of a neuron embedding.

    Parameters
    ----------
    acts : array-like of shape (n_images, n_units)
        One reduced activation (e.g. spatial mean) per image and unit.
    max_images : int, default=5000
        When there are more images, a seeded sample of this many is used. The feature
        dimension of a neuron is the number of images, so this bounds memory and the PCA that
        follows; a few thousand images already pin down how units co-vary.
    random_state : int, RandomState instance or None, default=0
        Seeds the image sample.

    Returns
    -------
    features : ndarray of shape (n_units, min(n_images, max_images)), float32
        Each unit's responses z-scored over the images. Rows of excluded units are zeros.
    keep_mask : ndarray of shape (n_units,), bool
        False for units that are constant (dead) or have a non-finite response: their
        correlation with other units is undefined, so the caller must drop them
        (``features[keep_mask]``, channels ``np.flatnonzero(keep_mask)``).

    Notes
    -----
    With z-scored rows the squared Euclidean distance between two units is
    ``2 * n_images * (1 - r)`` (``r``: Pearson correlation), so a Euclidean embedding of these
    rows is a correlation embedding. Reduce them with
    ``prepare_features(features[keep_mask], standardize=False)`` to keep that property.

    Examples
    --------
    >>> acts = np.c_[np.arange(6.0), np.zeros(6), np.arange(6.0) % 2]
    >>> features, keep = neuron_features(acts)
    >>> features.shape, keep.tolist()
    ((3, 6), [True, False, True])
    """
    acts = np.asarray(acts, dtype=np.float32)
    if acts.ndim != 2:
        raise ValueError(f"expected activations of shape (n_images, n_units), got {acts.shape}")
    if acts.shape[0] > max_images:
        rows, _ = _split_sample(acts.shape[0], max_images, _seed(random_state))
        acts = acts[rows]
    z, keep = _informative(acts)
    features = np.zeros(acts.shape[::-1], dtype=np.float32)
    features[keep] = z.T
    return features, keep


# --------------------------------------------------------------------------------------------
# fallback for tiny inputs
# --------------------------------------------------------------------------------------------

def _as_matrix(x) -> np.ndarray:
    """float32 (n_samples, n_features), also for 1-D and empty inputs."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(len(x), -1) if x.size else x.reshape(len(x), 0)


def _leading_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """First two principal components, zero-padded to 2 columns (deterministic)."""
    x = _as_matrix(x)
    n, d = x.shape
    n_components = min(2, d, max(n - 1, 0))
    xy = np.zeros((n, 2), dtype=np.float32)
    if n_components > 0:
        xy[:, :n_components] = _pca(x, n_components, seed)
    return xy


def fallback_2d(x, random_state=0) -> np.ndarray:
    """The layout returned instead of t-SNE/UMAP when there are fewer than ``MIN_POINTS``.

    Parameters
    ----------
    x : array-like of shape (n_samples, n_features)
    random_state : int, RandomState instance or None, default=0
        Only used by PCA on large inputs; tiny inputs use the exact solver.

    Returns
    -------
    ndarray of shape (n_samples, 2), float32
        The first two principal components, zero-padded (one point sits at the origin).
    """
    return _leading_2d(x, _seed(random_state))


# --------------------------------------------------------------------------------------------
# fitted maps (scikit-learn style): fit on some points, place new ones
# --------------------------------------------------------------------------------------------

def _check_features(x, who: str) -> np.ndarray:
    """float32 (n_samples, n_features) with only finite values, or a ValueError saying why not."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        hint = (" (for 1-D data: x.reshape(-1, 1) if it is one feature, x.reshape(1, -1) if it is "
                "one sample)" if x.ndim == 1 else "")
        raise ValueError(f"{who} expects a 2-D array (n_samples, n_features), got shape {x.shape}{hint}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{who}: {int(bad.sum())} of {len(x)} rows hold NaN or infinite values "
                         f"(first: row {int(np.flatnonzero(bad)[0])}); prepare_features drops "
                         "non-finite columns, or leave those rows out")
    return x


class _EmbeddingMap(TransformerMixin, BaseEstimator):
    """What the t-SNE and UMAP maps share: input checks, ``fit_transform``, ``transform``."""

    def fit(self, X, y=None):
        """Fit the map on the rows of ``X``; return ``self``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            At least ``MIN_POINTS`` rows, all finite; usually the output of
            :func:`prepare_features`.
        y : ignored
        """
        name = type(self).__name__
        x = _check_features(X, f"{name}.fit")
        if len(x) < MIN_POINTS:
            raise ValueError(f"{name} needs at least {MIN_POINTS} points to fit, got {len(x)}; "
                             "fallback_2d gives a PCA layout of fewer")
        self._fit(x, _seed(self.random_state))
        self.n_features_in_ = x.shape[1]
        return self

    def fit_transform(self, X, y=None):
        """Fit on ``X`` and return ``embedding_`` (the fitted positions, not ``transform(X)``)."""
        return self.fit(X).embedding_

    def transform(self, X):
        """Place new points into the fitted map, which itself stays as it is.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Finite values, in the same feature space as the fit (e.g. rows of the same
            :func:`prepare_features` output).

        Returns
        -------
        ndarray of shape (n_samples, 2), float32
            Each point's position depends only on the fitted map and the rows passed in the
            same call, so points can be placed in any chunks, in any order, on any machine.
        """
        check_is_fitted(self)
        name = type(self).__name__
        x = _check_features(X, f"{name}.transform")
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"{name}.transform: X has {x.shape[1]} features, but the map was "
                             f"fitted on {self.n_features_in_}")
        if not len(x):
            return np.zeros((0, 2), dtype=np.float32)
        return np.asarray(self._place(x), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# t-SNE (openTSNE)
# --------------------------------------------------------------------------------------------

def _clamp_perplexity(perplexity: float, n: int) -> float:
    # openTSNE needs about 3 * perplexity neighbours per point
    return float(max(1.0, min(perplexity, (n - 1) / 3)))


def _tsne_init(x: np.ndarray, seed: int) -> np.ndarray:
    """openTSNE's PCA initialisation, also valid for 1-D input and coincident points."""
    from openTSNE import initialization

    init = _leading_2d(x, seed).astype(np.float64)
    if not np.std(init[:, 0]) > 0:
        return initialization.random(len(x), 2, random_state=seed)
    init = initialization.jitter(init, scale=0.01, random_state=seed)
    return initialization.rescale(init)


def _gradient_method(n: int, requested: str | None) -> str:
    # FFT interpolation costs a fixed grid per iteration: 8 s of CPU for 300 points where
    # Barnes-Hut takes 0.6 s; it only wins from about 10k points (openTSNE's own "auto" rule)
    if requested is not None:
        return requested
    return "fft" if n >= FFT_FROM else "bh"


class TSNEMap(_EmbeddingMap):
    """A 2-D t-SNE map (openTSNE) that new points can be placed into.

    ``fit`` optimises the map of the fit points (PCA initialisation, 250 exaggerated + 500
    normal iterations, one thread); ``transform`` places new points into it with openTSNE's
    ``prepare_partial`` + ``optimize`` (the schedule of ``TSNEEmbedding.transform``) and leaves
    the map unchanged. :func:`tsne_2d` is this map fitted on a sample with the rest transformed.

    Parameters
    ----------
    perplexity : float, default=30.0
        Clamped to ``max(1, min(perplexity, (n_fit - 1) / 3))`` so small fits work.
    negative_gradient_method : {"fft", "bh"}, optional
        Default: FFT interpolation from ``FFT_FROM`` (10,000) fit points, Barnes-Hut below.
    random_state : int, RandomState instance or None, default=0
        Seeds the initialisation and the optimisation; an int gives bit-identical maps on the
        same machine and library versions.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_fit, 2), float32
        Positions of the fit points.
    n_features_in_ : int
    perplexity_ : float
        The perplexity used (after clamping).
    negative_gradient_method_ : str
        The gradient method used.
    kl_divergence_ : float
        openTSNE's KL divergence of the fitted map.
    model_ : openTSNE.TSNEEmbedding
        The fitted openTSNE object, for openTSNE's own API. Its ``transform`` re-centres the
        map in place; this class's ``transform`` does not.

    Notes
    -----
    Single-threaded (``n_jobs=1``): openTSNE's result depends on the thread count.

    Examples
    --------
    >>> x = prepare_features(np.random.default_rng(0).normal(size=(300, 20)))
    >>> tsne = TSNEMap(perplexity=20, random_state=0).fit(x[:200])
    >>> tsne.embedding_.shape, tsne.transform(x[200:]).shape
    ((200, 2), (100, 2))
    """

    def __init__(self, *, perplexity=30.0, negative_gradient_method=None, random_state=0):
        self.perplexity = perplexity
        self.negative_gradient_method = negative_gradient_method
        self.random_state = random_state

    def _fit(self, x, seed):
        from openTSNE import TSNE

        self.perplexity_ = _clamp_perplexity(self.perplexity, len(x))
        self.negative_gradient_method_ = _gradient_method(len(x), self.negative_gradient_method)
        tsne = TSNE(n_components=2, perplexity=self.perplexity_,
                    negative_gradient_method=self.negative_gradient_method_, n_jobs=1,
                    random_state=seed, verbose=False, **_TSNE_SCHEDULE)
        self.model_ = tsne.fit(x, initialization=_tsne_init(x, seed))
        self.embedding_ = np.asarray(self.model_, dtype=np.float32)
        self.kl_divergence_ = float(self.model_.kl_divergence)

    def _place(self, x):
        # prepare_partial + optimize, not TSNEEmbedding.transform: that one also re-centres the
        # reference map in place, which would shift points placed by earlier calls
        reference = self.model_
        perplexity = _clamp_perplexity(_TSNE_PLACE_PERPLEXITY, reference.shape[0] + 1)
        partial = reference.prepare_partial(x, initialization="median", k=_TSNE_PLACE_K,
                                            perplexity=perplexity)
        return partial.optimize(**_TSNE_PLACE, inplace=True)


# --------------------------------------------------------------------------------------------
# UMAP (umap-learn)
# --------------------------------------------------------------------------------------------

class UMAPMap(_EmbeddingMap):
    """A 2-D UMAP map (umap-learn) that new points can be placed into.

    ``fit`` fits ``umap.UMAP`` on the fit points; ``transform`` is ``UMAP.transform``, seeded
    with the same seed. :func:`umap_2d` is this map fitted on a sample with the rest
    transformed.

    Parameters
    ----------
    n_neighbors : int, default=15
        Clamped to ``n_fit - 1`` (and at least 2) for small fits.
    random_state : int, RandomState instance or None, default=0
        Seeds the fit and ``transform`` (seeded UMAP is single-threaded by design).

    Attributes
    ----------
    embedding_ : ndarray of shape (n_fit, 2), float32
        Positions of the fit points.
    n_features_in_ : int
    n_neighbors_ : int
        The number of neighbours used (after clamping).
    model_ : umap.UMAP
        The fitted umap-learn object.

    Notes
    -----
    The first fit in a process compiles numba code (tens of seconds); :func:`warm_up_umap`
    does it up front.

    Examples
    --------
    >>> x = prepare_features(np.random.default_rng(0).normal(size=(300, 20)))
    >>> umap = UMAPMap(n_neighbors=10, random_state=0).fit(x[:200])  # doctest: +SKIP
    >>> umap.transform(x[200:]).shape                                  # doctest: +SKIP
    (100, 2)
    """

    def __init__(self, *, n_neighbors=15, random_state=0):
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def _fit(self, x, seed):
        UMAP = import_umap()
        self.n_neighbors_ = max(2, min(int(self.n_neighbors), len(x) - 1))
        # n_jobs=1 explicitly: a seed forces it anyway, and umap warns when it has to override it
        self.model_ = UMAP(n_components=2, n_neighbors=self.n_neighbors_, random_state=seed,
                           transform_seed=seed, n_jobs=1)
        self.model_.fit(x)
        self.embedding_ = np.asarray(self.model_.embedding_, dtype=np.float32)

    def _place(self, x):
        return self.model_.transform(x)


def warm_up_umap(approximate=True) -> float:
    """Compile umap's numba code once per process, on tiny data.

    Sets ``NUMBA_CACHE_DIR`` to ``~/.cache/pipeline-numba`` if unset, so the functions numba
    can cache are kept on disk across runs (measured: import 22 s -> 2 s; most of the fit's
    compilation is not cacheable and is paid again in every process).

    Parameters
    ----------
    approximate : bool, default=True
        Also compile the nearest-neighbour-descent path that UMAP takes when it fits at least
        ``UMAP_EXACT_BELOW`` (4096) points (about 25 s more of CPU). Fits of fewer points, and
        their ``transform``, use exact neighbours, compiled in any case (about 12 s).

    Returns
    -------
    float
        Seconds spent (import + compilation), for the progress log.
    """
    start = time.perf_counter()
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    UMAP = import_umap()
    for force in (False, True) if approximate else (False,):
        model = UMAP(n_neighbors=5, n_epochs=5, random_state=0, n_jobs=1,
                     force_approximation_algorithm=force)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny data: spectral-init and size warnings
            model.fit(x[:30])
            model.transform(x[30:])
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# whole embeddings: the map fitted on a sample, the rest placed in chunks
# --------------------------------------------------------------------------------------------

MAPS = {"tsne": TSNEMap, "umap": UMAPMap}


def make_map(method, **params):
    """An unfitted :class:`TSNEMap` (``"tsne"``) or :class:`UMAPMap` (``"umap"``).

    Examples
    --------
    >>> make_map("tsne", perplexity=10)
    TSNEMap(perplexity=10)
    """
    if method not in MAPS:
        raise ValueError(f"unknown embedding method {method!r}: expected one of {list(METHODS)}")
    return MAPS[method](**params)


def _place_here(fitted, chunks):
    """The default placer: each chunk in turn, in this process."""
    for chunk in chunks:
        yield fitted.transform(chunk)


def _fit_and_place(x, new_map, seed, max_fit, chunk_size, placer, profile):
    """Fit ``new_map`` on all of ``x`` or on a seeded sample of ``max_fit`` rows; place the rest."""
    note = profile or (lambda phase, n_points, seconds: None)
    if len(x) <= max_fit:
        start = time.perf_counter()
        fitted = new_map.fit(x)
        note("fit", len(x), time.perf_counter() - start)
        return fitted.embedding_
    fit_rows, rest = _split_sample(len(x), max_fit, seed)
    start = time.perf_counter()
    fitted = new_map.fit(x[fit_rows])
    note("fit", len(fit_rows), time.perf_counter() - start)
    xy = np.empty((len(x), 2), dtype=np.float32)
    xy[fit_rows] = fitted.embedding_
    pieces = _chunks(rest, chunk_size or max_fit)
    placed = iter((placer or _place_here)(fitted, (x[rows] for rows in pieces)))
    for i, rows in enumerate(pieces):
        start = time.perf_counter()
        piece = next(placed, None)
        if piece is None:
            raise RuntimeError(f"the placer returned {i} results for {len(pieces)} chunks")
        piece = np.asarray(piece, dtype=np.float32)
        if piece.shape != (len(rows), 2):
            raise RuntimeError(f"the placer returned shape {piece.shape} for a chunk of {len(rows)} points")
        xy[rows] = piece
        note("place", len(rows), time.perf_counter() - start)
    return xy


def tsne_2d(x, random_state=0, perplexity=30.0, max_fit=10000, chunk_size=None,
            negative_gradient_method=None, *, placer=None, profile=None) -> np.ndarray:
    """2-D t-SNE (openTSNE, PCA initialisation), deterministic given the seed.

    Parameters
    ----------
    x : array-like of shape (n_samples, n_features)
        Usually the output of :func:`prepare_features`.
    random_state : int, RandomState instance or None, default=0
    perplexity : float, default=30.0
        Clamped to ``max(1, min(perplexity, (n - 1) / 3))`` so small inputs work.
    max_fit : int, default=10000
        Above this many points a :class:`TSNEMap` is fitted on a seeded sample of ``max_fit``
        points and the rest are placed into that fixed map with its ``transform`` (openTSNE's
        ``prepare_partial`` + ``optimize``), ``chunk_size`` points at a time so memory stays
        bounded. Fitting 10k and placing 40k matched a full fit's trustworthiness.
    chunk_size : int, optional
        Points placed per chunk; defaults to ``max_fit``.
    negative_gradient_method : {"fft", "bh"}, optional
        Default: FFT interpolation when t-SNE is fitted on at least ``FFT_FROM`` (10,000)
        points, Barnes-Hut below, where FFT's fixed grid cost makes it ~10x slower.
    placer : callable, optional
        Where the chunks are placed: ``placer(fitted_map, chunks)`` receives the fitted map and
        an iterator over the chunks' feature rows and returns an iterable of their ``(n, 2)``
        positions, in order. Default: ``fitted_map.transform(chunk)`` for each chunk in turn,
        in this process. The Dask engine passes one that places them on its workers; the
        chunks and the result are the same.
    profile : callable, optional
        Called as ``profile(phase, n_points, seconds)`` after the fit (``"fit"``, once) and
        after each placed chunk (``"place"``), with the wall seconds this call spent on it.

    Returns
    -------
    ndarray of shape (n_samples, 2), float32
        With fewer than ``MIN_POINTS`` points openTSNE is not called and :func:`fallback_2d`
        is returned: the caller should record that t-SNE was not meaningful.

    Notes
    -----
    Runs single-threaded (``n_jobs=1``): openTSNE's result depends on the thread count.
    """
    x = _as_matrix(x)
    seed = _seed(random_state)
    if len(x) < MIN_POINTS:
        return _leading_2d(x, seed)
    new_map = TSNEMap(perplexity=perplexity, negative_gradient_method=negative_gradient_method,
                      random_state=seed)
    return _fit_and_place(x, new_map, seed, max_fit, chunk_size, placer, profile)


def umap_2d(x, random_state=0, n_neighbors=15, max_fit=10000, chunk_size=None, *,
            placer=None, profile=None) -> np.ndarray:
    """2-D UMAP (umap-learn), deterministic given the seed.

    Parameters
    ----------
    x : array-like of shape (n_samples, n_features)
        Usually the output of :func:`prepare_features`.
    random_state : int, RandomState instance or None, default=0
        Seeds the fit and ``transform`` (seeded UMAP is single-threaded by design).
    n_neighbors : int, default=15
        Clamped to ``n_fit - 1`` (and at least 2) for small inputs.
    max_fit : int, default=10000
        Above this many points a :class:`UMAPMap` is fitted on a seeded sample of ``max_fit``
        points and the rest are placed with its ``transform``, ``chunk_size`` points at a time.
    chunk_size : int, optional
        Points transformed per chunk; defaults to ``max_fit``.
    placer : callable, optional
        Where the chunks are placed: ``placer(fitted_map, chunks)`` receives the fitted map and
        an iterator over the chunks' feature rows and returns an iterable of their ``(n, 2)``
        positions, in order. Default: ``fitted_map.transform(chunk)`` for each chunk in turn,
        in this process. The Dask engine passes one that places them on its workers; the
        chunks and the result are the same.
    profile : callable, optional
        Called as ``profile(phase, n_points, seconds)`` after the fit (``"fit"``, once) and
        after each placed chunk (``"place"``), with the wall seconds this call spent on it.

    Returns
    -------
    ndarray of shape (n_samples, 2), float32
        With fewer than ``MIN_POINTS`` points umap is not called and :func:`fallback_2d` is
        returned.

    Notes
    -----
    The first call in a process compiles numba code (tens of seconds); call
    :func:`warm_up_umap` once up front so the cost is not charged to the first layer.
    """
    x = _as_matrix(x)
    seed = _seed(random_state)
    if len(x) < MIN_POINTS:
        return _leading_2d(x, seed)
    new_map = UMAPMap(n_neighbors=n_neighbors, random_state=seed)
    return _fit_and_place(x, new_map, seed, max_fit, chunk_size, placer, profile)


def embed(x, method, **kw) -> np.ndarray:
    """2-D embedding of ``x`` with ``method`` ("tsne" or "umap").

    Parameters
    ----------
    x : array-like of shape (n_samples, n_features)
    method : {"tsne", "umap"}
    **kw
        Passed to :func:`tsne_2d` or :func:`umap_2d` (e.g. ``random_state``, ``max_fit``,
        ``placer``, ``profile``).

    Returns
    -------
    ndarray of shape (n_samples, 2), float32
    """
    functions = {"tsne": tsne_2d, "umap": umap_2d}
    if method not in functions:
        raise ValueError(f"unknown embedding method {method!r}: expected one of {list(METHODS)}")
    return functions[method](x, **kw)


# --------------------------------------------------------------------------------------------
# quality scores
# --------------------------------------------------------------------------------------------

def trustworthiness_sampled(x_high, y_low, n_neighbors=10, sample=2000, random_state=0) -> float:
    """How well the embedding keeps neighbours, on a seeded sample of points.

    Parameters
    ----------
    x_high : array-like of shape (n_samples, n_features)
        The embedded features.
    y_low : array-like of shape (n_samples, 2)
        The embedding.
    n_neighbors : int, default=10
    sample : int, default=2000
        At most this many points are scored (the exact score is quadratic in N).
    random_state : int, RandomState instance or None, default=0
        Seeds the sample.

    Returns
    -------
    float
        ``sklearn.manifold.trustworthiness`` in [0, 1] (1 = no false neighbours), or NaN when
        the sample is too small for it (``n_neighbors >= n / 2``).
    """
    from sklearn.manifold import trustworthiness

    x_high, y_low = np.asarray(x_high), np.asarray(y_low)
    n = len(x_high)
    if len(y_low) != n:
        raise ValueError(f"x_high has {n} rows but y_low has {len(y_low)}")
    if n > sample:
        rows, _ = _split_sample(n, sample, _seed(random_state))
        x_high, y_low = x_high[rows], y_low[rows]
    if n_neighbors >= len(x_high) / 2:
        return float("nan")
    return float(trustworthiness(x_high, y_low, n_neighbors=n_neighbors))


def _loo_knn_accuracy(y: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out kNN accuracy: each point voted on by its k nearest other points."""
    from sklearn.neighbors import KNeighborsClassifier

    k = min(k, len(y) - 1)
    _, neighbours = KNeighborsClassifier(n_neighbors=k).fit(y, labels).kneighbors()
    votes = labels[neighbours]
    classes = np.unique(labels)
    counts = (votes[:, :, None] == classes).sum(axis=1)
    return float(np.mean(classes[counts.argmax(axis=1)] == labels))


def knn_accuracy(y_low, labels, k=5, random_state=0) -> float:
    """Cross-validated k-nearest-neighbour class accuracy in the embedding.

    Parameters
    ----------
    y_low : array-like of shape (n_samples, 2)
    labels : array-like of shape (n_samples,) or None
        Integer class labels; negative values mean unlabelled and are ignored.
    k : int, default=5
        Clamped to the size of the training fold.
    random_state : int, RandomState instance or None, default=0
        Seeds the fold shuffling.

    Returns
    -------
    float
        Mean accuracy over stratified folds (5, or as many as the rarest class allows). When
        a class has a single member, leave-one-out kNN instead. NaN without labels or with
        fewer than 2 classes.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    if labels is None:
        return float("nan")
    labels = np.asarray(labels).astype(np.int64)
    y_low = np.asarray(y_low)
    labelled = labels >= 0
    y_low, labels = y_low[labelled], labels[labelled]
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        return float("nan")
    n_splits = min(5, counts.min())
    if n_splits < 2:
        return _loo_knn_accuracy(y_low, labels, k)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=_seed(random_state))
    n_train = len(labels) - int(np.ceil(len(labels) / n_splits))
    classifier = KNeighborsClassifier(n_neighbors=max(1, min(k, n_train)))
    return float(cross_val_score(classifier, y_low, labels, cv=folds).mean())


# --------------------------------------------------------------------------------------------
# tables (run-directory contract: embeddings/images.parquet, embeddings/neurons.parquet)
# --------------------------------------------------------------------------------------------

def _xy(xy) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float32)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"expected embedding coordinates of shape (n, 2), got {xy.shape}")
    return xy


def image_embedding_table(layer, method, xy, index=None) -> pd.DataFrame:
    """Rows of ``embeddings/images.parquet`` for one layer and method.

    Parameters
    ----------
    layer : str
    method : str
    xy : array-like of shape (n_images, 2)
    index : array-like of shape (n_images,), optional
        Image indices (``dataset.parquet`` ``index``); defaults to ``0 .. n_images - 1``.

    Returns
    -------
    DataFrame
        Columns ``layer, method, index, x, y``.
    """
    xy = _xy(xy)
    index = np.arange(len(xy)) if index is None else np.asarray(index)
    if len(index) != len(xy):
        raise ValueError(f"{len(index)} image indices for {len(xy)} embedded points")
    return pd.DataFrame({"layer": str(layer), "method": str(method),
                         "index": index.astype(np.int64), "x": xy[:, 0], "y": xy[:, 1]})


def neuron_embedding_table(layer, method, xy, channels) -> pd.DataFrame:
    """Rows of ``embeddings/neurons.parquet`` for one layer and method.

    Parameters
    ----------
    layer : str
    method : str
    xy : array-like of shape (n_units, 2)
    channels : array-like of shape (n_units,)
        Channel numbers of the embedded units (e.g. ``np.flatnonzero(keep_mask)``).

    Returns
    -------
    DataFrame
        Columns ``layer, method, channel, x, y``.
    """
    xy = _xy(xy)
    channels = np.asarray(channels)
    if len(channels) != len(xy):
        raise ValueError(f"{len(channels)} channels for {len(xy)} embedded points")
    return pd.DataFrame({"layer": str(layer), "method": str(method),
                         "channel": channels.astype(np.int64), "x": xy[:, 0], "y": xy[:, 1]})
