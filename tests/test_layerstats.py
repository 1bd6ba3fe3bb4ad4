"""Whole-layer figures (pipeline/layerstats.py): class separability and CKA between layers."""

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ortho_group

from pipeline.layerstats import (
    LAYER_COLUMNS,
    cka_matrix,
    class_silhouette,
    knn_class_accuracy,
    layer_figures,
    layer_table,
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
