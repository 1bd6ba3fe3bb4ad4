"""Whole-layer figures (pipeline/analysis/layerstats.py): class separability and CKA between layers."""

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ortho_group

from zoo import peak_bytes

from pipeline.analysis.layerstats import (
    LAYER_COLUMNS,
    MinibatchCKA,
    StreamingCKA,
    cka_matrix,
    class_silhouette,
    knn_class_accuracy,
    layer_figures,
    layer_table,
    minibatch_cka,
    probe_accuracy,
)


def classes(n=900, n_classes=3, seed=0):
    return np.random.default_rng(seed).integers(0, n_classes, n)


def separable(labels, units=20, seed=1):
    """Each class shifts the features along its own direction."""
    rng = np.random.default_rng(seed)
    centres = 3 * rng.normal(size=(labels.max() + 1, units))
    return centres[labels] + rng.normal(size=(len(labels), units))


def noise(n, units=20, seed=2):
    return np.random.default_rng(seed).normal(size=(n, units))


def in_chunks(layers, size=64):
    return lambda: ([x[i:i + size] for x in layers] for i in range(0, len(layers[0]), size))


def hsic_unbiased(x, y):
    """Song et al. (2012) unbiased HSIC from the n x n Gram matrices, for reference."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    return (np.trace(k @ l) + ones @ k @ ones * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))


def hsic_biased(x, y):
    """Kornblith et al. (2019) feature-space form on centred data."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2




def cka_full_batch(layers, hsic):
    h = np.array([[hsic(a, b) for b in layers] for a in layers])
    return h / np.sqrt(np.outer(np.diag(h), np.diag(h)))


# --------------------------------------------------------------------------- separability


def test_probe_accuracy_is_high_on_separable_features_and_chance_on_noise():
    labels = classes()
    assert probe_accuracy(separable(labels), labels) > 0.95
    assert abs(probe_accuracy(noise(len(labels)), labels) - 1 / 3) < 0.07


def test_probe_accuracy_needs_two_classes_and_adapts_the_folds():
    labels = classes()
    assert np.isnan(probe_accuracy(separable(labels), np.zeros(len(labels), int)))
    assert np.isnan(probe_accuracy(separable(labels), np.full(len(labels), -1)))  # unlabelled
    rare = labels.copy()
    rare[np.flatnonzero(labels == 2)[3:]] = -1  # class 2 keeps 3 images: 3 folds, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe_accuracy(separable(labels), rare) > 0.9


def test_probe_accuracy_uses_a_seeded_subsample():
    labels = classes(6000)
    x = separable(labels)
    first = probe_accuracy(x, labels, random_state=4, max_rows=500)
    assert first == probe_accuracy(x, labels, random_state=4, max_rows=500)


def test_knn_accuracy_and_silhouette_rank_separable_above_noise():
    labels = classes()
    good, bad = separable(labels), noise(len(labels))
    assert knn_class_accuracy(good, labels) > 0.95 > 0.5 > knn_class_accuracy(bad, labels)
    assert class_silhouette(good, labels) > 0.3 > 0.05 > class_silhouette(bad, labels)


def test_dead_units_with_nan_do_not_break_the_figures():
    labels = classes()
    x = separable(labels)
    x[:, 0] = np.nan
    assert probe_accuracy(x, labels) > 0.95
    assert knn_class_accuracy(x, labels) > 0.95


# --------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_is_one_for_a_layer_with_itself_and_its_rotations(unbiased):
    x = noise(500, 16)
    rotation = ortho_group.rvs(16, random_state=0)
    cka = cka_matrix(in_chunks([x, x @ rotation, 5 * x + 2]), unbiased=unbiased)
    assert np.allclose(cka, 1.0)  # orthogonal maps, isotropic scaling and shifts do not matter


@pytest.mark.parametrize("unbiased, limit", [(True, 0.02), (False, 0.05)])
def test_cka_is_small_between_independent_layers(unbiased, limit):
    cka = cka_matrix(in_chunks([noise(2000, 16, seed=5), noise(2000, 8, seed=6)]), unbiased=unbiased)
    assert abs(cka[0, 1]) < limit


def test_streaming_cka_equals_the_full_batch_formulas():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 7)) + np.linspace(0, 5, 300)[:, None]  # drifting mean, as in sorted data
    b = a @ rng.normal(size=(7, 5)) + rng.normal(size=(300, 5)) + 10
    c = 100 * rng.normal(size=(300, 3)) + 1000
    layers = [a, b, c]
    assert np.allclose(cka_matrix(in_chunks(layers, 37), unbiased=False),
                       cka_full_batch(layers, hsic_biased), atol=1e-10)
    assert np.allclose(cka_matrix(in_chunks(layers, 37), [7, 5, 3]),
                       cka_full_batch(layers, hsic_unbiased), atol=1e-10)


def test_cka_checks_the_layer_widths():
    with pytest.raises(ValueError, match=r"layer widths \[4, 2\] differ from layer_dims \[4, 3\]"):
        cka_matrix(in_chunks([noise(50, 4), noise(50, 2)]), [4, 3])


def test_cka_memory_does_not_depend_on_the_number_of_images():
    def generated(n_chunks):
        def layers(i):
            rng = np.random.default_rng([9, i])
            return [rng.normal(size=(128, 32)), rng.normal(size=(128, 16))]

        return lambda: (layers(i) for i in range(n_chunks))

    def peak(n_chunks):
        chunks = generated(n_chunks)
        tracemalloc.start()
        try:
            cka_matrix(chunks)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(10), peak(40)
    assert abs(large - small) <= 0.15 * small


# --------------------------------------------------------------------------- minibatch CKA


def exact_cka(layers):
    """The exact unbiased CKA on every row (the former streaming estimator, O(D^2) memory)."""
    return StreamingCKA().partial_fit(layers).cka()


def planted_layers(n=2000, seed=0):
    """A chain of layers, each a noisy ReLU map of the one before, plus an unrelated layer and one
    that keeps two of the latent factors: CKA from about 0 to 0.9."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    layers, h = [], z
    for width in (16, 32, 24, 48, 8):
        h = np.maximum(h @ rng.normal(size=(h.shape[1], width)), 0) + 0.5 * rng.normal(size=(n, width))
        layers.append(h)
    return layers + [rng.normal(size=(n, 12)), np.column_stack([z[:, :2], rng.normal(size=(n, 3))])]


class LazyLayer:
    """An (N, C) float32 layer made when rows are asked for: nothing of size N x C is kept."""

    def __init__(self, n, units, seed):
        self.shape, self.seed = (n, units), seed

    def __getitem__(self, rows):
        rng = np.random.default_rng(self.seed)
        base = rng.standard_normal((self.shape[0], 4), dtype=np.float32)[rows]
        return (base @ rng.standard_normal((4, self.shape[1]), dtype=np.float32)
                + rng.standard_normal((len(base), self.shape[1]), dtype=np.float32))


def test_one_group_is_the_exact_unbiased_estimator():
    # 300 rows < 2 x 256: a single group of every row, i.e. Song et al.'s estimator itself. The
    # only difference is the float32 storage of the U-centred Gram vectors (measured: 1e-10).
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 7)) + np.linspace(0, 5, 300)[:, None]
    b = a @ rng.normal(size=(7, 5)) + rng.normal(size=(300, 5)) + 10
    c = 100 * rng.normal(size=(300, 3)) + 1000
    model = MinibatchCKA().fit([a, b, c])
    assert model.group_sizes_.tolist() == [300]
    assert np.allclose(model.cka_, cka_full_batch([a, b, c], hsic_unbiased), atol=1e-6, rtol=0)
    assert np.allclose(model.cka_, exact_cka([a, b, c]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_minibatches_stay_close_to_the_exact_estimator(seed):
    # 2000 rows in 7 groups of about 285: over 25 draws (5 data seeds x 5 grouping seeds) the
    # largest |difference| from the exact CKA on all rows was 0.0052; 0.02 leaves room for
    # other BLAS builds without hiding a real error (the matrix spans 0 to 0.9)
    layers = planted_layers(seed=seed)
    model = MinibatchCKA(random_state=seed).fit(layers)
    assert len(model.group_sizes_) == 7 and model.group_sizes_.min() >= 256
    exact = exact_cka(layers)
    assert np.abs(model.cka_ - exact).max() < 0.02
    assert exact.min() < 0.01 and np.sort(exact, axis=None)[-len(layers) - 1] > 0.85  # the structure is there


def test_memory_does_not_depend_on_the_layer_widths():
    # 40 layers of 2000 units: the former estimator held 80 000 x 80 000 float64 matrices
    # (51 GB each). Here the state is the L x L sums plus one pass's U-centred Gram vectors
    # (4 bytes x L x n(n-1)/2 per group of n rows), the same for 20 units per layer.
    states = {}
    for units in (2000, 20):
        model = MinibatchCKA(batch_size=64).fit([LazyLayer(300, units, seed) for seed in range(40)])
        sizes = model.group_sizes_
        assert model.hsic_.shape == model.cka_.shape == (40, 40)
        assert model.block_bytes_ == 4 * 40 * int((sizes * (sizes - 1) // 2).sum())  # 1.8 MB
        states[units] = (model.block_bytes_, model.hsic_.nbytes)
    assert states[2000] == states[20]
    peak = peak_bytes(lambda: MinibatchCKA(batch_size=64).fit([LazyLayer(300, 2000, s) for s in range(40)]))
    assert peak < 32 * 2**20  # measured 10 MB: a few layer reads of 300 x 2000, not D x D


def test_a_memory_budget_splits_the_passes_without_changing_the_result():
    layers = planted_layers(n=1200)
    one = MinibatchCKA(batch_size=64).fit(layers)
    split = MinibatchCKA(batch_size=64, max_bytes=one.block_bytes_ // 4).fit(layers)
    assert one.n_passes_ == 1 and split.n_passes_ >= 4 and split.block_bytes_ <= one.block_bytes_ // 4
    assert np.array_equal(one.cka_, split.cka_)


def test_same_seed_same_matrix_and_the_sample_is_bounded():
    layers = planted_layers(n=3000)
    first = MinibatchCKA(max_rows=1000, random_state=7).fit(layers)
    again = MinibatchCKA(max_rows=1000, random_state=7).fit(layers)
    other = MinibatchCKA(max_rows=1000, random_state=8).fit(layers)
    assert np.array_equal(first.cka_, again.cka_) and np.array_equal(first.rows_, again.rows_)
    assert len(first.rows_) == 1000 and not np.array_equal(first.rows_, other.rows_)
    assert np.abs(first.cka_ - other.cka_).max() < 0.05  # another sample, the same picture


def test_zarr_arrays_give_the_numpy_result(tmp_path):
    import zarr

    layers = [x.astype(np.float32) for x in planted_layers(n=700)]
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    stored = []
    for i, x in enumerate(layers):
        stored.append(root.create_array(f"l{i}", shape=x.shape, chunks=(128, x.shape[1]), dtype="float32"))
        stored[-1][:] = x
    assert np.array_equal(minibatch_cka(stored, max_rows=500), minibatch_cka(layers, max_rows=500))


def test_cka_is_one_for_rotations_scalings_and_shifts_at_any_scale():
    x = noise(600, 16)
    rotation = ortho_group.rvs(16, random_state=0)
    cka = minibatch_cka([x, x @ rotation, 5 * x + 2, 1e-10 * x, 1e20 * x - 3e20], batch_size=64)
    assert np.allclose(cka, 1.0, atol=1e-6)


def test_a_constant_layer_gets_a_nan_row_and_the_others_are_unaffected():
    layers = planted_layers(n=600)[:3]
    constants = [np.zeros((600, 4)), np.full((600, 4), 0.1), np.full((600, 4), 1e6)]
    cka = minibatch_cka(layers + constants, batch_size=64)
    assert np.isnan(cka[3:]).all() and np.isnan(cka[:, 3:]).all()
    assert np.allclose(cka[:3, :3], minibatch_cka(layers, batch_size=64), atol=1e-12, rtol=0)


def test_non_finite_values_count_as_zero():
    layers = planted_layers(n=600)[:3]
    broken = [x.copy() for x in layers]
    broken[0][5, 2], broken[1][7, :], broken[2][9, 0] = np.nan, np.inf, -np.inf
    model = MinibatchCKA(batch_size=64).fit(broken)
    assert model.n_nonfinite_.tolist() == [1, 32, 1]
    zeroed = [np.where(np.isfinite(x), x, 0.0) for x in broken]
    assert np.isfinite(model.cka_).all()
    assert np.array_equal(model.cka_, MinibatchCKA(batch_size=64).fit(zeroed).cka_)


def test_minibatch_cka_checks_its_input():
    with pytest.raises(ValueError, match="batch_size must be an int >= 4"):
        MinibatchCKA(batch_size=3).fit([noise(50, 4)])
    with pytest.raises(ValueError, match="same N rows"):
        MinibatchCKA().fit([noise(50, 4), noise(40, 4)])
    assert np.isnan(MinibatchCKA().fit([noise(3, 4), noise(3, 2)]).cka_).all()  # n < 4: no estimate


# --------------------------------------------------------------------------- table


def test_layer_table_combines_the_figures_in_model_order():
    labels = classes()
    dead = np.zeros(20, bool)
    dead[:2] = True
    clusters = np.r_[-1, -1, [0, 1] * 9]
    figures = {"conv1": layer_figures(separable(labels), labels, dead=dead, clusters=clusters),
               "dense": layer_figures(noise(len(labels)), None)}
    table = layer_table(figures, cka=np.array([[1.0, 0.4], [0.4, 1.0]]))

    assert list(table.columns) == LAYER_COLUMNS + ["cka_previous", "cka"]
    assert table["layer"].tolist() == ["conv1", "dense"]
    assert table["dead_units"].tolist() == [2, 0]
    assert table["n_clusters"].tolist() == [2, pd.NA]
    assert table.loc[0, "probe_accuracy"] > 0.95 and np.isnan(table.loc[1, "probe_accuracy"])
    assert np.isnan(table.loc[0, "cka_previous"]) and table.loc[1, "cka_previous"] == 0.4
