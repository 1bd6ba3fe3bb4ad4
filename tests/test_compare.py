"""``python -m pipeline compare RUN_A RUN_B``: two runs over the same images, side by side.

Two tiny CNNs are trained for a few steps on the demo's shapes: A where colour gives the class
away (a planted colour shortcut), B on random colours. Both are analysed (extract, cluster, probe)
on the same random-colour images, whose class names include markup. Then:

- a run compared with itself: CKA 1 on the diagonal, every unit's best match is itself (r = 1),
  no verdict or accuracy difference, with a zero-width interval;
- A against B: lower CKA and best-match correlations, paired intervals for the differences;
- runs over different images are refused with one clear line; a run over most of the same
  images is compared on the intersection, and says so;
- the page has the report's Content-Security-Policy, no script, and escapes hostile names.
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow is imported (DESIGN.md)

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.compare import analysis as an
from pipeline.config import make_config
from markupsafe import escape

from pipeline.errors import UserError
from pipeline.report.csp import CSP
from zoo import run_cli

HOSTILE = '<img src=x onerror="alert(1)">'
CLASS_NAMES = ["circle", "square", HOSTILE, "cross"]
HOSTILE_LAYER = "conv>2"  # TensorFlow's scope names allow no other markup character


def tiny_cnn(seed):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1"),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu", name=HOSTILE_LAYER),
        keras.layers.GlobalAveragePooling2D(name="gap"),
        keras.layers.Dense(4, name="logits"),
    ])


def trained(shortcut, seed):
    """8 epochs on 800 shapes (about 4 s); ``shortcut`` = share of images whose colour gives the class."""
    import keras

    from pipeline.demo import data as demo_data

    x, y, _ = demo_data.make_shapes(800, [seed, 1], shortcut=shortcut)
    model = tiny_cnn(seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x / 255.0, y, epochs=8, batch_size=32, verbose=0)
    return model


def analyse(root, name, model, npz, stages=("extract", "cluster", "probe"), **data):
    """Save ``model`` and run ``stages`` on ``npz``; returns the run directory."""
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    model_path = root / f"{name}.keras"
    if not model_path.exists():
        model.save(model_path)
    cfg = make_config({"name": name, "out": str(root / name), "model": str(model_path),
                       "data": {"npz": str(npz), **data}, "report": {"out": str(root / "reports" / name)},
                       "cluster": {"bootstrap": 2}, "probe": {"bootstrap": 200}})
    Runner(cfg, [s for s in all_stages() if s.name in stages]).run()
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.demo import data as demo_data

    root = tmp_path_factory.mktemp("compare")
    x, y, _ = demo_data.make_shapes(240, [7, 3], shortcut=0.6)  # colour agrees with the class on 60 %
    np.savez(root / "images.npz", x=x, y=y, class_names=np.array(CLASS_NAMES))
    other, _, _ = demo_data.make_shapes(60, [8, 3], shortcut=0.25)
    np.savez(root / "other.npz", x=other, y=y[:60], class_names=np.array(CLASS_NAMES))
    a, b = trained(shortcut=1.0, seed=0), trained(shortcut=0.5, seed=1)
    return {"root": root, "a": analyse(root, "colour", a, root / "images.npz"),
            "b": analyse(root, "control", b, root / "images.npz", stages=("extract", "probe")),  # no clusters
            "model_a": a}


@pytest.fixture(scope="module")
def self_compare(runs):
    from pipeline.compare import compare_runs

    return compare_runs(runs["a"], runs["a"], runs["root"] / "self", n_boot=200)


@pytest.fixture(scope="module")
def cross_compare(runs):
    from pipeline.compare import compare_runs

    return compare_runs(runs["a"], runs["b"], n_boot=200)


# --------------------------------------------------------------------------- a run against itself


def test_a_run_compared_with_itself_has_cka_one_on_the_diagonal(self_compare):
    cka = self_compare.cka
    diagonal = cka[cka["layer_a"] == cka["layer_b"]]
    assert len(diagonal) == 3 and (diagonal["cka"] > 0.999).all(), diagonal
    assert diagonal["paired"].all()  # each layer is paired with itself (same name, best CKA)


def test_every_unit_of_a_run_matches_itself(self_compare):
    units = self_compare.units
    alive = units[units["best_channel"] >= 0]
    assert len(alive) >= 0.75 * len(units)
    assert (alive["best_channel"] == alive["channel"]).all() and (alive["best_corr"] > 0.999).all()
    assert alive["mutual"].all()
    clusters = self_compare.clusters
    assert len(clusters) and clusters["has_counterpart"].all()


def test_a_run_compared_with_itself_changes_no_verdict_and_no_accuracy(self_compare):
    verdicts = self_compare.verdicts
    assert len(verdicts) == 3 * 4 and not verdicts["changed"].any()
    measured = verdicts[verdicts["difference"].notna()]  # NaN: a class with too few right decisions
    assert len(measured) >= 6
    assert (measured["difference"] == 0).all()
    assert (measured["diff_ci_low"] == 0).all() and (measured["diff_ci_high"] == 0).all()
    assert (verdicts["n_paired"] > 0).all()
    accuracy = self_compare.accuracy
    assert accuracy["class_name"].tolist() == ["all", *CLASS_NAMES]
    assert (accuracy["difference"] == 0).all() and (accuracy["diff_ci_high"] == 0).all()
    assert self_compare.summary["matching"]["identical"] and self_compare.summary["matching"]["note"] is None


def test_the_per_image_probe_outcomes_reproduce_the_probe_stage_verdicts(runs):
    """probe_predictions.parquet holds what the verdicts were computed from: same numbers again."""
    from pipeline.shortcuts.verdicts import Bootstrap

    table = pd.read_parquet(runs["a"] / "probe_predictions.parquet")
    verdicts = pd.read_parquet(runs["a"] / "bias_verdicts.parquet")
    wide = table.pivot(index="index", columns="probe", values="predicted")
    labels = table.groupby("index")["label"].first().loc[wide.index].to_numpy()
    groups = dict(zip(table["probe"], table["group"]))
    probes = [p for p in wide.columns if p != "original"]
    outcomes = an.ProbeOutcomes(labels, wide["original"].to_numpy(), {p: wide[p].to_numpy() for p in probes},
                                {p: groups[p] for p in probes})
    classes, point, _ = an.cue_loss_samples(outcomes, Bootstrap(len(labels), 10))
    assert classes.tolist() == verdicts["class"].tolist()
    for cue in ("colour", "texture", "shape"):
        np.testing.assert_allclose(point[cue], verdicts[f"{cue}_lost"], atol=1e-12)


# --------------------------------------------------------------------------- two different models


def test_two_different_models_are_less_alike_than_a_model_and_itself(cross_compare, self_compare):
    cka = cross_compare.cka
    diagonal = cka[cka["layer_a"] == cka["layer_b"]]["cka"]
    assert diagonal.max() < 0.99 and np.isfinite(diagonal).all()
    best = cross_compare.units.groupby("layer_a")["best_corr"].median()
    assert (best < 0.99).all() and best.mean() < self_compare.units["best_corr"].median()
    assert cross_compare.summary["clusters"]["total"] >= 1


def test_verdicts_and_accuracy_differences_come_with_paired_intervals(cross_compare):
    verdicts = cross_compare.verdicts
    assert (verdicts["n_paired"] > 0).all()
    measured = verdicts[verdicts["difference"].notna()]
    assert len(measured) >= 6 and measured["diff_ci_low"].notna().all()
    assert (measured["diff_ci_low"] <= measured["diff_ci_high"]).all()
    assert (measured["diff_ci_high"] - measured["diff_ci_low"] > 0).any()  # two models: real uncertainty
    overall = cross_compare.accuracy.iloc[0]
    assert overall["class_name"] == "all" and overall["n"] == 240
    assert overall["diff_ci_low"] <= overall["difference"] <= overall["diff_ci_high"]


def test_the_comparison_is_written_to_run_b_and_registered_in_both_runs(cross_compare, runs):
    out = cross_compare.out
    assert out.parent == runs["b"] / "comparisons" and out.name.startswith("colour-")
    names = sorted(p.name for p in out.iterdir())
    for table in ("cka.parquet", "units.parquet", "cluster_matches.parquet", "layer_curves.parquet",
                  "accuracy.parquet", "verdicts.parquet", "compare.json", "index.html"):
        assert table in names
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cka.parquet"), cross_compare.cka)
    summary = json.loads((out / "compare.json").read_text())
    assert summary["run_a"]["name"] == "colour" and summary["matching"]["n_matched"] == 240
    for run in (runs["a"], runs["b"]):
        listed = json.loads((run / "comparisons.json").read_text())
        assert str(out.resolve()) in [e["path"] for e in listed]
    curves = cross_compare.layers.set_index("run")
    assert curves.loc["a", "probe_accuracy"].notna().all()
    assert curves.loc["b", "probe_accuracy"].isna().all()  # B's cluster stage did not run: not computed
    assert (cross_compare.clusters["cluster_b"] == -1).all()  # nor are B's clusters known


def test_the_page_is_offline_and_escapes_hostile_names(cross_compare):
    html = cross_compare.page.read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">' in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert HOSTILE not in html and "&lt;img src=x onerror=" in html  # the class name, escaped
    assert HOSTILE_LAYER not in html and "conv&gt;2" in html
    assert (cross_compare.out / "img" / "cka.png").is_file() and (cross_compare.out / "style.css").is_file()


def test_the_report_of_a_compared_run_links_the_comparison(cross_compare, runs):
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    cfg = make_config(json.loads((runs["a"] / "manifest.json").read_text())["config"] | {"out": str(runs["a"])})
    Runner(cfg, all_stages()).run(only="report")
    index = (runs["root"] / "reports" / "colour" / "index.html").read_text()
    href = os.path.relpath(cross_compare.page, runs["root"] / "reports" / "colour")
    assert f'href="{href}"' in index and "this run (A) vs control" in index


# --------------------------------------------------------------------------- which images


def test_runs_over_different_images_are_refused_with_one_line(runs):
    other = analyse(runs["root"], "other", runs["model_a"], runs["root"] / "other.npz", stages=("extract",))
    result = run_cli("compare", runs["a"], other)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: the two runs are not over the same images: only 0 of their 240 and 60 images are the same")
    assert not (other / "comparisons").exists()


def test_a_run_over_most_of_the_images_is_compared_on_the_intersection(runs):
    from pipeline.compare import compare_runs

    part = analyse(runs["root"], "part", runs["model_a"], runs["root"] / "images.npz", stages=("extract",),
                   limit=180)
    result = compare_runs(runs["a"], part, runs["root"] / "part-vs-a", n_boot=50)
    assert result.summary["matching"]["n_matched"] == 180
    assert result.summary["matching"]["note"].startswith("compared on the 180 images found in both runs")
    assert "compared on the 180 images" in result.page.read_text()
    # The same model on a subset of its images: the same representation.
    cka = result.cka[result.cka["layer_a"] == result.cka["layer_b"]]
    assert (cka["cka"] > 0.999).all()
    # B has no probe stage: the verdicts say so rather than inventing numbers.
    assert result.verdicts["diff_ci_low"].isna().all()
    assert "run B has no per-image probe outcomes (probe stage not run)" in result.verdicts["note"].iloc[0]


def test_the_matching_rule():
    hashes = [f"h{i}" for i in range(100)]
    same = an.match_images(hashes, hashes[::-1])
    assert same.identical and same.note is None and same.n == 100
    assert (np.asarray(hashes)[same.rows_a] == np.asarray(hashes[::-1])[same.rows_b]).all()
    most = an.match_images(hashes, hashes[:60] + [f"x{i}" for i in range(40)])
    assert most.n == 60 and not most.identical and "60 images found in both runs" in most.note
    with pytest.raises(UserError, match=r"only 40 of their 100 and 100 images are the same"):
        an.match_images(hashes, hashes[:40] + [f"x{i}" for i in range(60)])
    assert an.match_images(hashes, hashes[:40] + [f"x{i}" for i in range(60)], min_overlap=0.4).n == 40
    with pytest.raises(UserError, match="at least 10"):
        an.match_images(hashes[:5], hashes[:5])


def test_older_runs_get_their_hashes_from_the_recorded_files(runs, tmp_path):
    from pipeline.inputs.dataset import recorded_hashes

    dataset = pd.read_parquet(runs["a"] / "dataset.parquet")
    old = dataset.drop(columns="content_hash")
    assert (recorded_hashes(old) == dataset["content_hash"].to_numpy()).all()
    moved = old.assign(path=[str(tmp_path / "gone.npz") + f"#{i}" for i in old["source_index"]])
    with pytest.raises(UserError, match="made before dataset.parquet had a content_hash column.*can no longer be read"):
        recorded_hashes(moved)


def test_best_matches_on_hand_made_units():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    other = np.column_stack([x[:, 2], 3 * x[:, 0] + 1, np.ones(200)])  # a permuted, rescaled copy, and a dead unit
    units = an.best_matches(x, other)
    assert units.loc[[0, 2], "best_channel"].tolist() == [1, 0]
    np.testing.assert_allclose(units.loc[[0, 2], "best_corr"], 1.0)
    assert units.loc[[0, 2], "mutual"].all()
    assert units.loc[1, "best_corr"] < 0.3  # nothing in B carries A's unit 1
    dead = an.best_matches(np.ones((10, 1)), x[:10])
    assert dead["best_channel"].tolist() == [-1] and dead["best_corr"].isna().all()
