"""Every stage on keras.applications architectures at tiny size: the default layer choice, all tables, a report.

Random weights (nothing is downloaded); 40 images in 4 class folders. The settings that only
shorten the run (steps, bootstrap resamples, one embedding method) are the only departures from
the defaults, so `layers: auto`, the CKA, the dead-unit rule and the maximize plan are the real ones.
"""
import json

import numpy as np
import pytest
from PIL import Image

import zoo
from pipeline import load_run
from pipeline.cli import main

ARCHITECTURES = {
    "mobilenetv2": ("MobileNetV2", {"alpha": 0.35}, 48),   # residual adds and projections
    "mobilenet": ("MobileNet", {"alpha": 0.25}, 32),       # deep, no merges: convolutions spread over depth
    "resnet50": ("ResNet50", {}, 32),                       # wide (2048 units): behind the slow marker
}
LOGITS = {"mobilenetv2": "predictions", "mobilenet": "conv_preds", "resnet50": "predictions"
}
PARAMS = [pytest.param("mobilenetv2"), pytest.param("mobilenet", marks=pytest.mark.slow),
          pytest.param("resnet50", marks=pytest.mark.slow)]


def image_folder(root, size, classes=4, per_class=10, seed=0):
    """Class folders of JPEGs; each class has its own colour blob on a noisy background."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (size, size, 3)).astype(np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            img[y:y + size // 2, x:x + size // 2, c % 3] = 230
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.jpg", quality=90)


@pytest.fixture(scope="module", params=PARAMS)
def finished_run(request, tmp_path_factory):
    import keras

    arch, extra, size = ARCHITECTURES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None, classes=4, **extra)
    model.save(root / "model.keras")
    image_folder(root / "images", size)
    maximize = {"steps": 8}
    if request.param != "resnet50":  # one compiled act-max graph per layer: the last layer and the classes here
        maximize["layers"] = "last"
    zoo.write_config(root, root / "model.keras", root / "images", file="cfg.yaml", report_out="report",
                     name=request.param, embed={"methods": ["tsne"]}, cluster={"bootstrap": 2},
                     probe={"bootstrap": 100}, maximize=maximize)
    code = main(["run", str(root / "cfg.yaml")])
    return request.param, root, code


def test_the_default_run_finishes_with_a_plan_and_every_stage_done(finished_run, capsys):
    name, root, code = finished_run
    assert code == 0
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    assert {s: manifest["stages"][s]["status"] for s in manifest["stages"]} == dict.fromkeys(
        ["extract", "embed", "cluster", "probe", "maximize", "report"], "done")
    assert main(["status", str(root / "run")]) == 0
    assert "partial" not in capsys.readouterr().out


def test_auto_layers_span_the_network_and_every_table_is_complete(finished_run):
    name, root, _ = finished_run
    run = load_run(root / "run")
    layers = run.layer_names
    assert 8 <= len(layers) <= 16
    assert layers[0] in ("Conv1", "conv1", "conv1_conv"), "the stem"
    assert layers[-1] == LOGITS[name], "the logits layer"
    units = run.clusters.groupby("layer").size()
    assert set(units.index) == set(layers)
    assert run.layers["cka"].map(len).eq(len(layers)).all()
    cka = np.array(run.layers["cka"].tolist())
    assert np.allclose(np.diag(cka)[np.isfinite(np.diag(cka))], 1.0)
    assert set(run.image_embeddings["layer"]) == set(layers)
    assert len(run.maximize) > 0 and run.maximize["path"].map(lambda p: (root / "run" / p).exists()).all()
    assert (root / "report" / "index.html").exists()
    assert len(run.bias) > 0


def test_random_init_deep_layers_are_not_all_dead(finished_run):
    _, root, _ = finished_run
    clusters = load_run(root / "run").clusters
    dead_share = clusters.groupby("layer")["dead"].mean()
    assert (dead_share < 1).all(), dead_share[dead_share == 1].index.tolist()
