"""Labels that are not the model's outputs: an empty class folder, sparse ``.npz`` labels, extra outputs.

The extract stage codes classes densely (``dataset.parquet`` ``label`` is ``0..K-1``, the user's
own label is ``source_label``) and records the class list in the manifest
(``stages.extract.summary.classes = {"names": [...], "identity": bool}``). Everything that reads
the model's logits as classes (the report's predictions, accuracy and confusion, the probe stage's
verdicts, the maximize stage's class names) does so only when output ``k`` is class ``k``: the codes
are the user's labels (``identity``) and there are as many outputs as declared classes. Otherwise
the report says why in one sentence, and everything that uses labels only as targets (maps
coloured by class, clusters, unit sensitivities) still works.

Each run here is tiny: a 3-output Keras model built in code, 16 px images, the real extract,
cluster and probe stages, made-up embeddings and maximization rows (as in ``test_report``), then the
report; older runs (no class list, the user's labels in ``label``) are made from them.
"""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import zoo
from pipeline.shortcuts.verdicts import Classes, read_classes, shortcut_tables
from pipeline.config import load_config
from pipeline.report import build_report
from pipeline.report.data import load_report_data
from pipeline.report.names import class_page
from pipeline.orchestration.runner import Runner
from pipeline.stages import cluster, extract, maximize, probe
from pipeline.stages.base import Context
from pipeline.storage.store import RunStore
from test_report import add_embeddings_and_maximize

NOT_MATCHED = "predictions are not matched to labels"
MB = 1_000_000


# ---------------------------------------------------------------- building runs


def run_and_report(root, data, model):
    """Extract, cluster, probe, made-up embeddings and maximization rows, report: ``(cfg, report folder)``."""
    zoo.write_config(root, model, name=root.name, data=data, cluster={"bootstrap": 2}, probe={"bootstrap": 100})
    cfg = load_config(root / "c.yaml")
    Runner(cfg, [extract.STAGE, cluster.STAGE]).run()
    add_embeddings_and_maximize(cfg.out_dir)
    Runner(cfg, [extract.STAGE, probe.STAGE]).run(only="probe")
    out = root / "report"
    build_report(cfg.out_dir, out, options=cfg.report.model_copy(update={"out": str(out)}))
    return cfg, out


def class_list(cfg):
    """What the extract stage recorded: ``(names, identity)`` and the dataset's ``(label, source_label)`` pairs."""
    store = RunStore(cfg.out_dir)
    listed = store.read_json("manifest.json")["stages"]["extract"]["summary"]["classes"]
    rows = store.read_table("dataset.parquet").drop_duplicates("label").sort_values("label")
    return (listed["names"], listed["identity"]), list(zip(rows["label"], rows["source_label"]))


def as_old_run(run_dir):
    """The run as written before the class list existed: the user's labels in ``label``, no list."""
    store = RunStore(run_dir)
    manifest = store.read_json("manifest.json")
    manifest["stages"]["extract"]["summary"].pop("classes", None)
    dataset = store.read_table("dataset.parquet")
    dataset["label"] = dataset.pop("source_label")
    store.write_table("dataset.parquet", dataset)
    store.write_json("manifest.json", manifest)


def npz_data(root, y):
    x = np.random.default_rng(0).integers(0, 256, (len(y), 16, 16, 3), dtype=np.uint8)
    np.savez(root / "images.npz", x=x, y=np.asarray(y))
    return {"npz": str(root / "images.npz")}


def folder_size(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def explorer_specs(report):
    """Every spec pushed by the report's ``explorer/*.js`` files (the JSON between ``push(`` and ``);``)."""
    specs = []
    for path in sorted((report / "explorer").glob("*.js")):
        for line in path.read_text().splitlines():
            if line.startswith("window.PIPELINE_EXPLORER.push("):
                specs.append(json.loads(line[len("window.PIPELINE_EXPLORER.push("):-2]))
    return specs


def palettes(report, column):
    """Length of the palette of one colour option in every explorer spec that has it."""
    return [len(o["palette"]) for s in explorer_specs(report) for o in s["meta"]["colours"] if o["column"] == column]


def bias_summary(cfg):
    return RunStore(cfg.out_dir).read_json("manifest.json")["stages"]["probe"]["summary"]


# ---------------------------------------------------------------- (a) an empty class folder


@pytest.fixture(scope="module")
def empty_class(tmp_path_factory):
    """Class folders ``a``, ``b`` (empty) and ``c``; a model with 3 outputs."""
    root = tmp_path_factory.mktemp("empty_class")
    zoo.image_folder(root / "images", classes=("a", "c"), per_class=6, size=16)
    (root / "images" / "b").mkdir()
    model = zoo.save(zoo.sequential(classes=3), root / "model", "keras")
    return run_and_report(root, {"images": str(root / "images")}, model)


def test_an_empty_class_folder_is_a_class_without_images(empty_class):
    cfg, report = empty_class
    assert class_list(cfg) == ((["a", "b", "c"], True), [(0, 0), (2, 2)])
    data = load_report_data(cfg.out_dir)
    assert data.class_names == {0: "a", 1: "b", 2: "c"}
    assert sorted(set(data.labels.tolist())) == [0, 2]
    index = (report / "index.html").read_text()
    for name in "abc":
        assert f'href="{class_page(name)}"' in index
    assert re.search(rf'href="{re.escape(class_page("b"))}">b</a></td><td class="n">0</td>', index)
    assert "No images of this class were analysed" in (report / class_page("b")).read_text()
    assert "No images of this class" not in (report / class_page("a")).read_text()


def test_with_an_empty_class_folder_outputs_are_still_the_classes(empty_class):
    cfg, report = empty_class
    data = load_report_data(cfg.out_dir)
    assert data.predictions.aligned and data.predictions.why_not is None
    assert np.isfinite(data.predictions.p_label).all()
    index = (report / "index.html").read_text()
    assert NOT_MATCHED not in index and "img/fig/confusion" in index
    verdicts = pd.read_parquet(cfg.out_dir / "bias_verdicts.parquet")
    assert sorted(verdicts["class"]) == [0, 2] and list(verdicts["class_name"]) == ["a", "c"]
    assert "class_metrics" not in bias_summary(cfg)
    assert palettes(report, "c_class") and set(palettes(report, "c_class")) == {3}


def test_the_confusion_matrix_keeps_the_empty_class_as_a_row_and_column(empty_class):
    from pipeline.report.pages import confusion_matrix

    cfg, _ = empty_class
    data = load_report_data(cfg.out_dir)
    matrix = confusion_matrix(data)
    assert matrix.shape == (3, 3) and matrix[1].sum() == 0 and matrix.sum() == 12
    assert list(matrix.sum(axis=1)) == [6, 0, 6]


# ---------------------------------------------------------------- (b) sparse npz labels


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """An ``.npz`` with ``y`` in {0, 1, 3000000} and a model with 3 outputs."""
    root = tmp_path_factory.mktemp("sparse")
    data = npz_data(root, np.repeat([0, 1, 3000000], 8))
    model = zoo.save(zoo.sequential(classes=3), root / "model", "keras")
    return run_and_report(root, data, model)


def test_sparse_labels_are_coded_densely_and_not_read_as_outputs(sparse):
    cfg, report = sparse
    assert class_list(cfg) == ((["0", "1", "3000000"], False), [(0, 0), (1, 1), (2, 3000000)])
    data = load_report_data(cfg.out_dir)
    assert list(data.class_names) == [0, 1, 2] and sorted(set(data.labels.tolist())) == [0, 1, 2]
    assert not data.predictions.aligned and data.predictions.p_label is None
    assert "labelled 0, 1, 3000000" in data.predictions.why_not and NOT_MATCHED in data.predictions.why_not
    index = (report / "index.html").read_text()
    assert NOT_MATCHED in index and "img/fig/confusion" not in index
    assert "<meter" not in index.split("<h2>Classes</h2>")[1].split("</table>")[0]  # no per-class accuracy
    page = (report / class_page("3000000")).read_text()
    assert NOT_MATCHED in page and "outputs are not this run's classes" in page
    assert "img/max/class" not in page  # output 2's image is not class 3000000's


def test_sparse_labels_make_a_small_report(sparse):
    _, report = sparse
    assert folder_size(report) < 5 * MB
    assert all(p.stat().st_size < 0.5 * MB for p in (report / "explorer").glob("*.js"))
    assert set(palettes(report, "c_class")) == {3}
    assert set(palettes(report, "c_top_class")) == {3}
    assert set(palettes(report, "c_pred")) == {3}  # the model's 3 outputs, as "output k"


def test_the_probe_stage_says_why_there_are_no_class_verdicts(sparse):
    cfg, report = sparse
    why = bias_summary(cfg)["class_metrics"]
    assert why.startswith("skipped: ") and NOT_MATCHED in why and "3000000" in why
    assert pd.read_parquet(cfg.out_dir / "bias_verdicts.parquet").empty
    assert pd.read_parquet(cfg.out_dir / "bias.parquet").empty
    assert not pd.read_parquet(cfg.out_dir / "probe_units.parquet").empty  # label-free part still runs
    assert "No per-class verdicts: skipped: " in (report / "index.html").read_text()


def test_an_old_run_with_sparse_labels_still_builds_small(sparse, tmp_path):
    """Runs written before the class list: the labels of the rows, never read as outputs."""
    import shutil

    cfg, _ = sparse
    run = tmp_path / "run"
    shutil.copytree(cfg.out_dir, run)
    as_old_run(run)
    data = load_report_data(run)
    assert data.class_names == {0: "0", 1: "1", 3000000: "3000000"} and not data.classes.identity
    assert not data.predictions.aligned and "labelled 0, 1, 3000000" in data.predictions.why_not
    build_report(run, tmp_path / "report")
    assert folder_size(tmp_path / "report") < 5 * MB
    assert set(palettes(tmp_path / "report", "c_class")) == {3}
    assert NOT_MATCHED in (tmp_path / "report" / "index.html").read_text()


# ---------------------------------------------------------------- (c) labels that are the outputs


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    """An ``.npz`` with ``y`` in {0, 1, 2} and a model with 3 outputs: output k is class k."""
    root = tmp_path_factory.mktemp("identity")
    data = npz_data(root, np.repeat([0, 1, 2], 8))
    model = zoo.save(zoo.sequential(classes=3), root / "model", "keras")
    return run_and_report(root, data, model)


def test_labels_that_are_the_outputs_are_still_matched(identity):
    cfg, report = identity
    assert class_list(cfg) == ((["0", "1", "2"], True), [(0, 0), (1, 1), (2, 2)])
    data = load_report_data(cfg.out_dir)
    pred = data.predictions
    assert pred.aligned and pred.why_not is None
    logits = np.asarray(data.run.logits()[:], dtype=np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(pred.p_label, p[np.arange(len(p)), data.labels], rtol=1e-6)
    index = (report / "index.html").read_text()
    assert NOT_MATCHED not in index and "img/fig/confusion" in index
    assert sorted(pd.read_parquet(cfg.out_dir / "bias_verdicts.parquet")["class"]) == [0, 1, 2]
    assert "img/max/class" in (report / class_page("1")).read_text()


# ---------------------------------------------------------------- the rule itself


@pytest.mark.parametrize("classes, outputs, expected", [
    (Classes({0: "a", 1: "b", 2: "c"}, True), 3, None),
    (Classes({0: "a", 1: "b", 2: "c"}, True), 10,
     "the model has 10 outputs but the data has 3 classes labelled 0, 1, 2: " + NOT_MATCHED),
    (Classes({0: "0", 1: "1", 2: "3000000"}, False, {0: 0, 1: 1, 2: 3000000}), 10,
     "the model has 10 outputs but the data has 3 classes labelled 0, 1, 3000000: " + NOT_MATCHED),
    (Classes({0: "0", 1: "1", 2: "3000000"}, False, {0: 0, 1: 1, 2: 3000000}), 3,
     "the data's 3 classes are labelled 0, 1, 3000000, not 0 to 2 like the model's 3 outputs: " + NOT_MATCHED),
    (Classes({}, True), 3, "the images are unlabelled"),
])
def test_outputs_are_classes_only_for_the_users_labels_and_as_many_outputs(classes, outputs, expected):
    assert classes.mismatch(outputs) == expected


def test_long_label_lists_are_shortened():
    classes = Classes({k: str(k) for k in range(20)}, False, {k: 10 * k for k in range(20)})
    assert "labelled 0, 10, 20, 30, …, 190," in classes.mismatch(20)


def test_read_classes_from_the_class_list_and_from_old_rows():
    rows = pd.DataFrame({"label": [0, 2, 2, -1], "class_name": ["a", "c", "c", None],
                         "source_label": [0, 2, 2, -1]})
    listed = {"stages": {"extract": {"summary": {"classes": {"names": ["a", "b", "c"], "identity": True}}}}}
    assert read_classes(rows, listed) == Classes({0: "a", 1: "b", 2: "c"}, True, {0: 0, 1: 1, 2: 2})
    old = read_classes(rows.drop(columns="source_label"), {})
    assert old.names == {0: "a", 2: "c"} and not old.identity  # sparse rows are never read as outputs
    dense = read_classes(pd.DataFrame({"label": [1, 0], "class_name": ["b", "a"]}))
    assert dense == Classes({0: "a", 1: "b"}, True, {0: 0, 1: 1})


def test_shortcut_tables_refuse_labels_without_an_output():
    logits = np.zeros((4, 3))
    with pytest.raises(ValueError, match="cannot be read as the model's 3 outputs"):
        shortcut_tables(np.array([0, 1, 2, 3000000]), {}, logits, {}, {})


def test_probe_class_support_uses_the_same_rule():
    listed = Classes({0: "0", 1: "1", 2: "3000000"}, False, {0: 0, 1: 1, 2: 3000000})
    assert NOT_MATCHED in probe.class_support(np.array([0, 1, 2]), 3, listed)
    assert probe.class_support(np.array([0, 1, 2]), 3) is None
    assert probe.class_support(np.array([-1, -1]), 3) == "the images are unlabelled"
    assert NOT_MATCHED in probe.class_support(np.array([0, 1, 3000000]), 3)


@pytest.mark.parametrize("fixture, names", [("identity", {0: "0", 1: "1", 2: "2"}), ("sparse", {})])
def test_maximize_names_class_images_only_when_outputs_are_classes(fixture, names, request):
    from pipeline.maximize import plan

    cfg, _ = request.getfixturevalue(fixture)
    logged = []
    ctx = Context(cfg, RunStore(cfg.out_dir))
    ctx.log = logged.append
    assert maximize._output_names(ctx, 3) == names
    targets = plan.class_targets(3, 0, names)
    assert [t.class_name for t in targets] == ([None] * 3 if not names else ["0", "1", "2"])
    assert bool(logged) == (not names)


@pytest.mark.parametrize("fixture", ["empty_class", "sparse"])
def test_every_page_opens_cleanly_in_chromium(fixture, request, browser):
    _, report = request.getfixturevalue(fixture)
    inside = report.resolve().as_uri() + "/"
    for page in sorted(report.glob("*.html")):
        found = browser.check(page.resolve().as_uri(), inside)
        assert (found["console"], found["broken"], found["outside"]) == ([], [], []), (page.name, found)


@pytest.mark.parametrize("fixture, names", [("identity", ["0", "1", "2"]), ("sparse", [None, None, None])])
def test_the_maximize_stage_names_class_images_only_when_outputs_are_classes(fixture, names, request, tmp_path):
    import shutil

    cfg, _ = request.getfixturevalue(fixture)
    shutil.copytree(cfg.out_dir, tmp_path / "run")
    raw = yaml.safe_load((cfg.out_dir.parent / "c.yaml").read_text())
    raw.update(out=tmp_path / "run",
               maximize={"steps": 4, "batch_size": 4, "units": [], "clusters": False, "max_seconds": None})
    zoo.write_config(tmp_path, **raw)
    Runner(load_config(tmp_path / "c.yaml"), [extract.STAGE, cluster.STAGE, maximize.STAGE]).run(only="maximize")
    index = pd.read_parquet(tmp_path / "run" / "maximize" / "index.parquet")
    classes = index[index["kind"] == "class"].sort_values("class")
    assert list(classes["class"]) == [0, 1, 2] and list(classes["class_name"]) == names
