"""Neurons of one layer (pipeline/analysis/neurons.py): moments, dead units, clusters, stability, summaries."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from zoo import peak_bytes

from pipeline.analysis.neurons import (
    NeuronClusterer,
    StreamingMoments,
    bootstrap_stability,
    class_selectivity,
    cluster_summary,
    correlation_streaming,
    dead_units,
    unit_moments,
    unit_summary,
)

GROUPS = np.repeat(np.arange(4), 10)  # 40 units: 4 planted groups of 10
ZERO, NAN = 40, 41  # two dead units appended after the groups


def planted(n_images=600, seed=0):
    """Each unit copies one of 4 non-negative base signals, times its own scale, plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.exponential(size=(n_images, 4))
    x = base[:, GROUPS] * rng.uniform(0.5, 3.0, len(GROUPS)) + 0.05 * rng.normal(size=(n_images, len(GROUPS)))
    x = np.column_stack([x, np.zeros(n_images), rng.normal(size=n_images)])
    x[5, NAN] = np.nan
    return x


def chunked(x, size=97):
    return lambda: (x[i:i + size] for i in range(0, len(x), size))


def generated(n_chunks, size=256, units=64):
    """Chunks made on the fly, so nothing of size N is ever held."""
    return lambda: (np.random.default_rng([7, i]).normal(size=(size, units)) for i in range(n_chunks))




# --------------------------------------------------------------------------- moments


def test_streaming_correlation_equals_numpy_on_live_units():
    x = planted()
    corr, stats = correlation_streaming(chunked(x))
    assert np.allclose(corr[:40, :40], np.corrcoef(x[:, :40].T), atol=1e-6, rtol=0)
    assert np.allclose(stats["mean"][:40], x[:, :40].mean(axis=0))
    assert np.allclose(stats["std"][:40], x[:, :40].std(axis=0))
    assert stats["n"] == 600


def test_correlation_survives_a_drifting_mean():
    # datasets are stored sorted by class: a large offset that changes between chunks must not
    # cost precision (each chunk is centred on its own mean before the float32 product)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 5)) + 1e4 + np.linspace(0, 50, 1000)[:, None] * [1, -1, 0, 0, 2]
    corr, _ = correlation_streaming(chunked(x, 64))
    assert np.allclose(corr, np.corrcoef(x.T), atol=1e-6, rtol=0)


def test_dead_units_are_flagged_and_get_nan_rows():
    x = planted()
    corr, stats = correlation_streaming(chunked(x))
    assert np.flatnonzero(dead_units(stats)).tolist() == [ZERO, NAN]
    assert stats["n_nonfinite"][NAN] == 1
    assert np.isnan(corr[[ZERO, NAN]]).all() and np.isnan(corr[:, [ZERO, NAN]]).all()
    assert np.isfinite(corr[:40, :40]).all()  # the NaN did not leak into other units


def scales_and_constants(n=1000, seed=3):
    """float32 columns as the extract stage stores them: 4 alive at very different scales, then
    5 dead ones (constants at 1e6, 1e-10 and 0, 1e6 plus float32-rounding noise, one NaN)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    ulp = np.spacing(np.float32(1e6))  # 0.0625: the float32 rounding step at 1e6
    x = np.column_stack([
        1e-10 * signal + 3e-10,  # random-init deep layers: tiny, but informative
        1e6 + 1e3 * signal,  # a large offset with real variation
        1e-10 * rng.exponential(size=n) * (rng.random(n) < 0.01),  # sparse: 0 on 99 % of the images
        -1e6 * signal,
        np.full(n, 1e6), np.full(n, 1e-10), np.zeros(n),
        np.float32(1e6) + ulp * rng.integers(-2, 3, n),  # only rounding steps of its magnitude
        rng.normal(size=n),
    ]).astype(np.float32)
    x[17, -1] = np.nan
    return x


def test_dead_units_are_scale_free():
    x = scales_and_constants()
    corr, stats = correlation_streaming(chunked(x))
    assert dead_units(stats).tolist() == [False] * 4 + [True] * 5
    assert np.allclose(corr[0, 1], 1.0) and np.allclose(corr[0, 3], -1.0)  # the same signal at 1e-10 and 1e6
    assert np.isnan(corr[4:]).all() and np.isfinite(corr[:4, :4]).all()


def test_dead_unit_rule_on_the_stats_alone():
    # std <= 4 float32 eps (4.8e-7) x max(|mean|, max|value|), or any non-finite value
    stats = {"mean": np.array([1e-10, 1e6, 1e6, 0.0, 5.0, 5.0]),
             "std": np.array([1e-11, 1e-2, 1.0, 0.0, 1.0, np.nan]),
             "min": np.array([0.0, 1e6 - 1, 1e6 - 5, 0.0, 0.0, np.nan]),
             "max": np.array([3e-10, 1e6 + 1, 1e6 + 5, 0.0, 9.0, np.nan]),
             "n_nonfinite": np.array([0, 0, 0, 0, 2, 100])}
    assert dead_units(stats).tolist() == [False, True, False, True, True, True]


def test_unit_moments_are_the_correlation_stats_without_the_matrix():
    x = scales_and_constants()
    _, stats = correlation_streaming(chunked(x))
    alone = unit_moments(chunked(x))
    assert stats.keys() == alone.keys()
    assert all(np.allclose(stats[k], alone[k], equal_nan=True, rtol=1e-6, atol=0) for k in stats)
    assert np.array_equal(dead_units(stats), dead_units(alone))


def test_a_layer_wider_than_max_units_is_not_clustered():
    from pipeline.config import make_config
    from pipeline.stages.cluster import cluster_layer

    x = planted()
    labels = np.random.default_rng(0).integers(0, 3, len(x))
    cfg = make_config({"model": "m.keras", "data": {"images": "i"}, "cluster": {"max_units": 41}})
    units, summary, clusterer, notes = cluster_layer(chunked(x), len(x), labels, cfg, n_units=x.shape[1])
    assert clusterer is None and len(summary) == 0
    assert (units.cluster == -1).all() and np.flatnonzero(units.dead).tolist() == [ZERO, NAN]
    assert units.channel.tolist() == list(range(42)) and units.top_indices.map(len).iloc[0] == 9
    assert notes == ["42 units, more than cluster.max_units = 41: not clustered (every unit gets cluster -1; "
                     "the 42 x 42 correlation alone would take 0.0 GB); raise cluster.max_units to cluster it"]
    cfg.cluster.max_units = 42
    units, summary, _, notes = cluster_layer(chunked(x), len(x), labels, cfg, n_units=x.shape[1])
    assert len(summary) >= 2 and units.cluster.max() >= 1 and not notes


def test_weights_act_like_repeated_rows():
    # bootstrap multiplicities as weights: no copy of the data, same moments as repeating rows
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
    weighted = StreamingMoments(dtype=np.float64)
    for part in (slice(0, 20), slice(20, 50)):
        weighted.partial_fit(x[part], sample_weight=w[part])
    repeated = np.repeat(x, w, axis=0)
    assert np.allclose(weighted.correlation(), np.corrcoef(repeated.T))
    assert np.allclose(weighted.summary()["mean"], repeated.mean(axis=0))
    assert weighted.summary()["n"] == w.sum()


def test_peak_memory_does_not_depend_on_the_number_of_images():
    small = peak_bytes(lambda: correlation_streaming(generated(10)))
    large = peak_bytes(lambda: correlation_streaming(generated(40)))
    assert abs(large - small) <= 0.15 * small


# --------------------------------------------------------------------------- clustering


def test_planted_groups_are_recovered_and_dead_units_excluded():
    corr, _ = correlation_streaming(chunked(planted()))
    clusterer = NeuronClusterer(n_clusters="auto", random_state=0).fit(corr)
    assert adjusted_rand_score(GROUPS, clusterer.labels_[:40]) >= 0.9
    assert clusterer.labels_[[ZERO, NAN]].tolist() == [-1, -1]
    assert clusterer.n_clusters_ == 4
    assert max(clusterer.silhouette_curve_, key=clusterer.silhouette_curve_.get) == 4
    assert list(clusterer.silhouette_curve_) == list(range(2, 13))


@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
def test_other_methods_run(method):
    corr, _ = correlation_streaming(chunked(planted()))
    labels = NeuronClusterer(method=method, random_state=0).fit_predict(corr)
    assert labels.shape == (42,) and labels[[ZERO, NAN]].tolist() == [-1, -1]
    assert adjusted_rand_score(GROUPS, labels[:40]) >= 0.9


def test_fixed_k_and_labels_numbered_by_size():
    corr = np.array([[1, .9, 0, 0, 0], [.9, 1, 0, 0, 0], [0, 0, 1, .8, .8], [0, 0, .8, 1, .8],
                     [0, 0, .8, .8, 1]])
    labels = NeuronClusterer(n_clusters=2).fit(corr).labels_
    assert labels.tolist() == [1, 1, 0, 0, 0]  # cluster 0 is the largest


def test_fewer_than_three_live_units_go_to_cluster_zero():
    corr = np.full((4, 4), np.nan)
    corr[np.ix_([0, 2], [0, 2])] = [[1, .3], [.3, 1]]
    clusterer = NeuronClusterer().fit(corr)
    assert clusterer.labels_.tolist() == [0, -1, 0, -1]
    assert clusterer.n_clusters_ == 1
    assert clusterer.note_ == "only 2 live units: all in cluster 0"


def test_fit_validates_its_input():
    with pytest.raises(ValueError, match="must be square"):
        NeuronClusterer().fit(np.eye(3)[:2])
    with pytest.raises(ValueError, match="not symmetric"):
        NeuronClusterer().fit(np.array([[1, .5, 0], [.1, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="non-finite entries between live units"):
        NeuronClusterer().fit(np.array([[1, np.nan, 0], [np.nan, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="method must be one of"):
        NeuronClusterer(method="ward").fit(np.eye(3))


def test_same_inputs_same_outputs():
    def run():
        chunks = chunked(planted())
        corr, _ = correlation_streaming(chunks)
        clusterer = NeuronClusterer(method="kmeans", random_state=3).fit(corr)
        stability = bootstrap_stability(chunks, clusterer, 600, n_boot=5, random_state=3)
        return corr, clusterer.labels_, stability.jaccard, stability.ari

    for first, second in zip(run(), run()):
        np.testing.assert_array_equal(first, second)


# --------------------------------------------------------------------------- stability


def test_bootstrap_stability_is_high_for_planted_groups():
    x = planted()
    corr, _ = correlation_streaming(chunked(x))
    clusterer = NeuronClusterer(random_state=0).fit(corr)
    stability = bootstrap_stability(chunked(x), clusterer, len(x), n_boot=20, random_state=0)
    assert stability.cluster.shape == (4,) and (stability.cluster > 0.8).all()
    assert stability.mean_ari > 0.8
    assert np.isnan(stability.per_unit(clusterer.labels_)[[ZERO, NAN]]).all()


def test_bootstrap_stability_is_lower_for_pure_noise():
    x = np.random.default_rng(4).normal(size=(800, 64))  # no structure: clusters are accidents
    corr, _ = correlation_streaming(chunked(x, 128))
    clusterer = NeuronClusterer(random_state=0).fit(corr)
    stability = bootstrap_stability(chunked(x, 128), clusterer, len(x), n_boot=20, random_state=0)
    assert stability.cluster.mean() < 0.6 and stability.mean_ari < 0.3


def test_bootstrap_needs_a_fitted_clusterer():
    with pytest.raises(ValueError, match="fit the clusterer"):
        bootstrap_stability(chunked(planted()), NeuronClusterer(), 600)


# --------------------------------------------------------------------------- summaries


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 6])
def test_top_indices_on_a_hand_made_example(chunk_size):
    x = np.array([[0.0, 5], [3, 5], [1, np.nan], [3, 2], [7, 5], [2, 1]])
    table = unit_summary(chunked(x, chunk_size), top_k=3)
    assert table["top_indices"].tolist() == [[4, 1, 3],  # ties (3 and 3) go to the lower index
                                             [0, 1, 4]]  # NaN never listed
    assert table["max"].tolist() == [7, 5]


def test_class_selectivity_one_for_a_single_class_zero_for_all_classes():
    labels = np.repeat([0, 1, 2], 4)
    only_class_1 = (labels == 1) * 2.0
    every_class = np.full(12, 3.0)
    table = unit_summary(chunked(np.column_stack([only_class_1, every_class]), 5), labels)
    assert table["class_selectivity"].tolist() == [1.0, 0.0]
    assert table["top_class"][0] == 1


def test_class_selectivity_guards_negative_and_silent_units():
    means = np.array([[-2.0, 0.0, 1.0], [-1.0, 0.0, 3.0]])  # 2 classes x 3 units
    # unit 0 is negative: shifted so the weaker class sits at 0 -> (1 - 0) / (1 + 0)
    # unit 1 is silent: no class preference -> 0; unit 2: (3 - 1) / (3 + 1)
    assert class_selectivity(means).tolist() == [1.0, 0.0, 0.5]


def test_unit_summary_without_labels():
    table = unit_summary(chunked(planted()))
    assert table["class_selectivity"].isna().all() and table["top_class"].isna().all()
    assert list(table.columns) == ["channel", "mean", "std", "max", "top_indices", "class_selectivity",
                                   "top_class"]


def test_cluster_summary_finds_the_images_and_class_of_a_group():
    x = planted()
    corr, stats = correlation_streaming(chunked(x))
    labels = NeuronClusterer(random_state=0).fit(corr).labels_
    group0 = np.flatnonzero(GROUPS == 0)
    signal = x[:, group0].mean(axis=1)
    images = (signal > np.median(signal)).astype(int)  # class 1: the images where group 0 fires
    table = cluster_summary(chunked(x), corr, labels, stats, image_labels=images, top_k=5)

    assert table["size"].tolist() == [10] * 4
    row = table.iloc[labels[0]]  # the cluster holding group 0
    centroid = np.array(row["centroid"])
    assert np.allclose(centroid[group0], 1 / np.sqrt(10), atol=0.01)  # homogeneous group
    assert np.count_nonzero(centroid) == 10 and row["mean_corr"] > 0.95
    live = slice(0, 40)
    projection = (x[:, live] - x[:, live].mean(0)) / x[:, live].std(0) @ centroid[live]
    assert row["top_indices"] == np.argsort(-projection)[:5].tolist()
    assert row["top_class"] == 1 and row["dominant_classes"] == [1, 0]
