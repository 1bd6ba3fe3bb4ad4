"""Embeddings: planted blobs are recovered, runs repeat bit for bit, tiny inputs do not crash;
the fitted maps place new points."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import KNeighborsClassifier

from pipeline.analysis import embedding as E
from pipeline.backend.umap import default_numba_cache_dir

METHODS = ["tsne", "umap"]


def blobs(n=300, dim=20, seed=0):
    """Three well-separated Gaussian blobs: centres ~14 apart, unit noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 10
    labels = np.arange(n) % 3
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


@pytest.fixture(scope="module")
def blob_features():
    x, labels = blobs()
    return E.prepare_features(x), labels


@pytest.fixture(scope="module")
def embedded(blob_features):
    """One embedding per method, shared by the quality and the determinism tests."""
    x, _ = blob_features
    return {method: E.embed(x, method, random_state=0) for method in METHODS}


@pytest.fixture(scope="module")
def large():
    """The fit-on-a-sample path: 600 points, fitted on 200, the rest placed 150 at a time."""
    x, labels = blobs(n=600, seed=1)
    x = E.prepare_features(x)
    run = lambda method: E.embed(x, method, random_state=3, max_fit=200, chunk_size=150)
    return x, labels, run, {method: run(method) for method in METHODS}


# --- quality and determinism -----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_blobs_stay_separated_and_neighbourhoods_are_kept(method, blob_features, embedded):
    x, labels = blob_features
    xy = embedded[method]
    assert xy.shape == (300, 2) and xy.dtype == np.float32
    assert E.knn_accuracy(xy, labels) > 0.95
    assert E.trustworthiness_sampled(x, xy) > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_give_identical_embeddings(method, blob_features, embedded):
    x, _ = blob_features
    assert np.array_equal(E.embed(x, method, random_state=0), embedded[method])


def test_a_different_seed_gives_a_different_embedding(blob_features, embedded):
    x, _ = blob_features
    assert not np.array_equal(E.tsne_2d(x, random_state=1), embedded["tsne"])


def test_fft_gradients_are_deterministic_too(monkeypatch):
    # FFT is the default from 10k fitted points. Its grid costs ~10 ms per iteration however
    # few the points, so shorten the schedules: determinism does not depend on their length.
    monkeypatch.setattr(E, "_TSNE_SCHEDULE", dict(early_exaggeration_iter=30, n_iter=30))
    monkeypatch.setattr(E, "_TSNE_PLACE", {**E._TSNE_PLACE, "n_iter": 30})
    x, labels = blobs(n=250, seed=2)
    run = lambda: E.tsne_2d(x, max_fit=100, chunk_size=100, negative_gradient_method="fft")
    first = run()
    assert np.array_equal(run(), first)
    assert E.knn_accuracy(first, labels) > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_large_input_is_fitted_on_a_sample_and_the_rest_placed(method, large):
    x, labels, run, results = large
    xy = results[method]
    assert xy.shape == (600, 2) and np.isfinite(xy).all()
    # every point got its own position (none left at an uninitialised value)
    assert len(np.unique(xy, axis=0)) == 600
    assert E.knn_accuracy(xy, labels) > 0.9
    assert np.array_equal(run(method), xy)


def test_sample_and_rest_split_is_seeded_and_complete():
    fit, rest = E._split_sample(10, 4, seed=5)
    assert len(fit) == 4 and np.array_equal(np.sort(np.r_[fit, rest]), np.arange(10))
    assert np.array_equal(E._split_sample(10, 4, seed=5)[0], fit)


# --- the fitted maps: fit on some points, place new ones ------------------------------------

@pytest.fixture(scope="module")
def fitted(blob_features):
    """One map per method, fitted on the first 200 of the 300 blob points."""
    x, _ = blob_features
    return {method: E.make_map(method, random_state=0).fit(x[:200]) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_a_map_is_fitted_on_some_points_and_places_new_ones(method, blob_features, fitted):
    x, labels = blob_features
    fitted_map = fitted[method]
    assert fitted_map.embedding_.shape == (200, 2) and fitted_map.embedding_.dtype == np.float32
    assert fitted_map.n_features_in_ == x.shape[1]
    new = fitted_map.transform(x[200:])
    assert new.shape == (100, 2) and new.dtype == np.float32 and np.isfinite(new).all()
    # each new point lands among the fitted points of its own blob
    nearest = KNeighborsClassifier(n_neighbors=1).fit(fitted_map.embedding_, labels[:200])
    assert nearest.score(new, labels[200:]) > 0.95
    assert fitted_map.transform(x[:0]).shape == (0, 2)


@pytest.mark.parametrize("method", METHODS)
def test_the_fit_points_are_placed_where_the_map_has_them(method, blob_features, fitted):
    x, _ = blob_features
    xy = fitted[method].embedding_
    radius = np.median(np.linalg.norm(xy - xy.mean(axis=0), axis=1))
    assert np.linalg.norm(fitted[method].transform(x[:200]) - xy, axis=1).max() < 0.05 * radius


@pytest.mark.parametrize("method", METHODS)
def test_placing_points_leaves_the_map_as_it_is(method, blob_features, fitted):
    # openTSNE's own transform re-centres the map in place; chunks placed later would shift
    x, _ = blob_features
    fitted_map = fitted[method]
    library_map = lambda: np.array(fitted_map.model_.embedding_ if method == "umap" else fitted_map.model_)
    before, library_before = fitted_map.embedding_.copy(), library_map()
    first = fitted_map.transform(x[200:])
    assert np.array_equal(fitted_map.embedding_, before) and np.array_equal(library_map(), library_before)
    assert np.array_equal(fitted_map.transform(x[200:]), first)


@pytest.mark.parametrize("method", METHODS)
def test_a_map_is_reproducible_from_its_seed(method, blob_features, fitted):
    x, _ = blob_features
    again = E.make_map(method, random_state=0).fit(x[:200])
    assert np.array_equal(again.embedding_, fitted[method].embedding_)
    assert np.array_equal(again.transform(x[200:]), fitted[method].transform(x[200:]))
    other = E.make_map(method, random_state=1).fit(x[:200])
    assert not np.array_equal(other.embedding_, fitted[method].embedding_)


@pytest.mark.parametrize("method", METHODS)
def test_a_pickled_map_places_points_identically(method, blob_features, fitted):
    # how the Dask engine ships a fitted map to its workers
    x, _ = blob_features
    copy = pickle.loads(pickle.dumps(fitted[method]))
    assert np.array_equal(copy.transform(x[200:]), fitted[method].transform(x[200:]))


@pytest.mark.parametrize("method", METHODS)
def test_the_embedding_of_few_points_is_the_fitted_map(method, blob_features, embedded):
    x, _ = blob_features
    assert np.array_equal(E.make_map(method, random_state=0).fit_transform(x), embedded[method])


def test_maps_follow_scikit_learn_conventions():
    tsne = E.TSNEMap(perplexity=5, random_state=2)
    assert tsne.get_params() == {"perplexity": 5, "negative_gradient_method": None, "random_state": 2}
    assert clone(tsne).get_params() == tsne.get_params() and repr(tsne) == "TSNEMap(perplexity=5, random_state=2)"
    assert E.make_map("umap", n_neighbors=7).get_params() == {"n_neighbors": 7, "random_state": 0}
    with pytest.raises(ValueError, match="unknown embedding method 'pca'"):
        E.make_map("pca")


@pytest.mark.parametrize("method", METHODS)
def test_a_map_refuses_input_it_cannot_embed(method, blob_features, fitted):
    x, _ = blob_features
    unfitted = E.make_map(method)
    with pytest.raises(ValueError, match=r"expects a 2-D array \(n_samples, n_features\), got shape \(300,\) "
                                         r"\(for 1-D data: x.reshape\(-1, 1\)"):
        unfitted.fit(x[:, 0])
    bad = x.copy()
    bad[7, 1], bad[9, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"fit: 2 of 300 rows hold NaN or infinite values \(first: row 7\)"):
        unfitted.fit(bad)
    with pytest.raises(ValueError, match=f"needs at least {E.MIN_POINTS} points to fit, got 4"):
        unfitted.fit(x[:4])
    with pytest.raises(NotFittedError):
        unfitted.transform(x)
    with pytest.raises(ValueError, match=r"transform expects a 2-D array .* got shape \(20,\)"):
        fitted[method].transform(x[0])
    with pytest.raises(ValueError, match=r"transform: 2 of 300 rows hold NaN or infinite values"):
        fitted[method].transform(bad)
    with pytest.raises(ValueError, match=f"X has 3 features, but the map was fitted on {x.shape[1]}"):
        fitted[method].transform(x[:, :3])


# --- the hooks of tsne_2d / umap_2d: where chunks are placed, how long each phase took ------

def test_the_profile_hook_reports_the_fit_and_each_placed_chunk(large):
    x, _, _, results = large
    phases = []
    xy = E.embed(x, "tsne", random_state=3, max_fit=200, chunk_size=150,
                 profile=lambda *phase: phases.append(phase))
    assert np.array_equal(xy, results["tsne"])
    assert [(phase, n) for phase, n, _ in phases] == [("fit", 200), ("place", 150), ("place", 150), ("place", 100)]
    assert all(seconds >= 0 for _, _, seconds in phases)
    phases.clear()
    E.tsne_2d(x[:50], profile=lambda *phase: phases.append(phase))
    assert [(phase, n) for phase, n, _ in phases] == [("fit", 50)]


def test_the_placer_hook_may_place_the_chunks_elsewhere_in_any_order(large):
    x, _, _, results = large
    calls = []

    def placer(fitted_map, chunks):  # as a remote engine would: a shipped copy, chunks out of order
        chunks = list(chunks)
        calls.append((type(fitted_map).__name__, [len(chunk) for chunk in chunks]))
        shipped = pickle.loads(pickle.dumps(fitted_map))
        return [shipped.transform(chunk) for chunk in chunks[::-1]][::-1]

    assert np.array_equal(E.embed(x, "tsne", random_state=3, max_fit=200, chunk_size=150, placer=placer),
                          results["tsne"])
    assert calls == [("TSNEMap", [150, 150, 100])]
    with pytest.raises(RuntimeError, match=r"placer returned shape \(3, 2\) for a chunk of 150 points"):
        E.embed(x, "tsne", random_state=3, max_fit=200, chunk_size=150,
                placer=lambda fitted_map, chunks: (np.zeros((3, 2)) for _ in chunks))
    with pytest.raises(RuntimeError, match="the placer returned 1 results for 3 chunks"):
        E.embed(x, "tsne", random_state=3, max_fit=200, chunk_size=150,
                placer=lambda fitted_map, chunks: [fitted_map.transform(next(chunks))])


# --- small inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [0, 1, 2, 5, 20])
def test_small_inputs_give_finite_coordinates(method, n):
    x, _ = blobs(n=n, seed=4)
    xy = E.embed(x, method)
    assert xy.shape == (n, 2) and np.isfinite(xy).all()


@pytest.mark.parametrize("method", METHODS)
def test_fewer_than_min_points_returns_the_pca_fallback(method):
    x, _ = blobs(n=E.MIN_POINTS - 1, seed=4)
    assert np.array_equal(E.embed(x, method), E.fallback_2d(x))


def test_fallback_is_the_leading_components_zero_padded():
    assert np.array_equal(E.fallback_2d(np.ones((1, 3))), np.zeros((1, 2)))
    xy = E.fallback_2d(np.array([[0.0, 0.0], [2.0, 0.0]]))
    assert np.allclose(np.abs(xy[:, 0]), 1) and np.array_equal(xy[:, 1], [0, 0])


def test_perplexity_is_clamped_for_small_inputs():
    assert E._clamp_perplexity(30, 20) == pytest.approx(19 / 3)
    assert E._clamp_perplexity(30, 2) == 1
    assert E._clamp_perplexity(30, 1000) == 30


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown embedding method 'pca'"):
        E.embed(np.zeros((10, 2)), "pca")


# --- features --------------------------------------------------------------------------------

def test_prepare_features_drops_constant_and_nonfinite_columns_then_reduces():
    x, _ = blobs(n=100, dim=60)
    x[:, 3] = 7.0
    x[5, 8] = np.nan
    assert E.prepare_features(x[:, :10], pca=50).shape == (100, 8)
    reduced = E.prepare_features(x, pca=5)
    assert reduced.shape == (100, 5) and reduced.dtype == np.float32


def test_prepare_features_standardises_kept_columns():
    x = np.c_[np.arange(10.0) * 1000, np.arange(10.0) % 3]
    z = E.prepare_features(x, pca=None)
    assert np.allclose(z.mean(axis=0), 0, atol=1e-6) and np.allclose(z.std(axis=0), 1)


def test_unstandardised_neuron_features_keep_correlation_geometry():
    acts = np.random.default_rng(0).normal(size=(40, 6))
    features, keep = E.neuron_features(acts)
    kept = E.prepare_features(features[keep], pca=None, standardize=False)
    squared = ((kept[0] - kept[1]) ** 2).sum()
    assert squared == pytest.approx(2 * 40 * (1 - np.corrcoef(acts.T)[0, 1]), rel=1e-4)


def test_prepare_features_returns_what_is_possible_for_tiny_inputs():
    assert E.prepare_features(np.ones((1, 4))).shape == (1, 0)
    assert E.prepare_features([[0.0, 1.0, 5.0], [1.0, 3.0, 5.0]]).shape == (2, 1)


def test_prepare_features_is_deterministic_with_the_randomized_solver():
    x = np.random.default_rng(0).normal(size=(600, 700)).astype(np.float32)
    assert np.array_equal(E.prepare_features(x, pca=20), E.prepare_features(x, pca=20))


def test_neuron_features_masks_dead_and_nonfinite_units():
    acts = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    acts[:, 1] = 0.25  # dead unit
    acts[7, 3] = np.nan
    features, keep = E.neuron_features(acts)
    assert keep.tolist() == [True, False, True, False]
    assert features.shape == (4, 50) and np.isfinite(features).all()
    assert np.allclose(features[keep].mean(axis=1), 0, atol=1e-6)
    assert np.allclose(features[keep].std(axis=1), 1)


def test_neuron_features_use_a_seeded_sample_of_images():
    acts = np.random.default_rng(0).normal(size=(80, 3))
    features, keep = E.neuron_features(acts, max_images=50, random_state=2)
    assert features.shape == (3, 50) and keep.all()
    assert np.array_equal(E.neuron_features(acts, max_images=50, random_state=2)[0], features)


# --- scores ----------------------------------------------------------------------------------

def test_knn_accuracy_ignores_unlabelled_points():
    xy = np.r_[np.zeros((10, 2)), np.ones((10, 2)) * 10, np.ones((10, 2)) * 5]
    labels = np.r_[np.zeros(10), np.ones(10), -np.ones(10)].astype(int)
    assert E.knn_accuracy(xy + np.arange(30)[:, None] * 1e-3, labels) == 1.0


@pytest.mark.parametrize("labels", [None, np.zeros(6, int), -np.ones(6, int), [0, 0, 0, 0, 0, -1]])
def test_knn_accuracy_is_nan_without_two_classes(labels):
    assert np.isnan(E.knn_accuracy(np.random.default_rng(0).normal(size=(6, 2)), labels))


def test_knn_accuracy_falls_back_to_leave_one_out_for_a_singleton_class():
    # the lone class-1 point's neighbours are all class 0: 4 of 5 points are right
    xy = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [0.3, 0], [0.15, 0.1]])
    assert E.knn_accuracy(xy, [0, 0, 0, 0, 1], k=3) == pytest.approx(0.8)


def test_trustworthiness_is_nan_when_too_few_points():
    assert np.isnan(E.trustworthiness_sampled(np.ones((15, 3)), np.ones((15, 2)), n_neighbors=10))


def test_trustworthiness_scores_a_seeded_sample(blob_features, embedded):
    x, _ = blob_features
    score = E.trustworthiness_sampled(x, embedded["tsne"], sample=100, random_state=1)
    assert 0.9 < score <= 1
    assert score == E.trustworthiness_sampled(x, embedded["tsne"], sample=100, random_state=1)


# --- tables ----------------------------------------------------------------------------------

def test_image_table_follows_the_run_directory_contract():
    table = E.image_embedding_table("conv1", "umap", np.arange(6.0).reshape(3, 2))
    assert list(table.columns) == ["layer", "method", "index", "x", "y"]
    assert table["index"].tolist() == [0, 1, 2] and table["y"].tolist() == [1, 3, 5]
    assert (table["layer"] == "conv1").all() and (table["method"] == "umap").all()


def test_neuron_table_follows_the_run_directory_contract():
    table = E.neuron_embedding_table("dense", "tsne", np.zeros((2, 2)), channels=[3, 7])
    assert list(table.columns) == ["layer", "method", "channel", "x", "y"]
    assert table["channel"].tolist() == [3, 7]
    assert pd.api.types.is_integer_dtype(table["channel"])


def test_tables_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="2 channels for 3 embedded points"):
        E.neuron_embedding_table("dense", "tsne", np.zeros((3, 2)), channels=[0, 1])
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        E.image_embedding_table("dense", "tsne", np.zeros((3, 3)))


# --- umap housekeeping -----------------------------------------------------------------------

def test_warm_up_compiles_umap_and_sets_a_numba_cache():
    assert E.warm_up_umap(approximate=False) > 0
    assert os.environ.get("NUMBA_CACHE_DIR")


def test_numba_cache_dir_chosen_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/else")
    default_numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == "/somewhere/else"


def test_importing_umap_does_not_import_tensorflow():
    code = ("import sys; from pipeline.backend.umap import import_umap; import_umap(); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"
