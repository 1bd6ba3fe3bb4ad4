"""Subclassed Keras models: sub-layers are tapped while the model's own call() runs."""
import keras
import numpy as np
import pytest
from PIL import Image

import zoo
from pipeline import load_run
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.inputs.models import KerasModel, load_model
from pipeline.inputs.subclassed import tapping

SIZE = 16


@keras.saving.register_keras_serializable(package="test_subclassed")
class ResidualBlock(keras.layers.Layer):
    """relu(x + conv2(conv1(x))): a layer class with sub-layers of its own."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv1 = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name="conv1")
        self.conv2 = keras.layers.Conv2D(filters, 3, padding="same", name="conv2")

    def call(self, x):
        return keras.ops.relu(x + self.conv2(self.conv1(x)))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="test_subclassed")
class TinyNet(keras.Model):
    """stem -> block -> block again (shared) -> unnamed pooling -> softmax head."""

    def __init__(self, classes=2, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.stem = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="stem")
        self.block = ResidualBlock(4, name="block")
        self.pool = keras.layers.GlobalAveragePooling2D()  # no name: Keras numbers it per process
        self.head = keras.layers.Dense(classes, activation="softmax", name="head")

    def call(self, x, training=False):
        x = self.block(self.block(self.stem(x)))
        return self.head(self.pool(x))

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Path of a built, saved TinyNet."""
    keras.utils.set_random_seed(0)
    model = TinyNet(name="tiny")
    model(np.zeros((1, SIZE, SIZE, 3), np.float32))
    path = tmp_path_factory.mktemp("subclassed") / "tiny.keras"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def full_run(saved, tmp_path_factory):
    """A whole `pipeline run` on 24 images in two classes; returns the run directory."""
    root = tmp_path_factory.mktemp("subclassed_run")
    zoo.image_folder(root / "images", classes=("a", "b"), per_class=12, size=SIZE)
    zoo.write_config(root, saved, root / "images", file="run.yaml", report_out="report", trust_model=True,
                     embed={"methods": ["tsne"], "of": ["images"]}, cluster={"bootstrap": 3},
                     probe={"bootstrap": 100, "probes": ["grayscale"]},
                     maximize={"steps": 4, "units": "top:2", "batch_size": 4, "layers": ["block/conv1"],
                               "clusters": False},
                     report={"explorer": False})
    assert main(["run", str(root / "run.yaml")]) == 0
    return root / "run"


def test_layers_lists_nested_sublayers_in_call_order_with_shapes(saved, capsys):
    assert main(["layers", saved, "--trust-model"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line and not line.startswith("layers:")}
    assert list(rows) == ["stem", "block", "block/conv1", "block/conv2", "global_average_pooling2d", "head"]
    assert rows["block/conv1"][:4] == ["Conv2D", "(8,", "8,", "4)"]
    assert rows["block"][0] == "ResidualBlock" and rows["head"][:2] == ["Dense", "(2,)"]
    assert "input (16, 16, 3)" in out


def test_refused_without_trust_in_one_line(saved, capsys):
    assert main(["layers", saved]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "custom object 'TinyNet'" in err and "--trust-model" in err


def test_auto_named_layers_keep_their_names_whatever_was_loaded_before(saved):
    first = [i.name for i in load_model(saved, trust_model=True).layers]
    keras.layers.GlobalAveragePooling2D()  # moves Keras' per-process name counter
    assert [i.name for i in load_model(saved, trust_model=True).layers] == first


def test_tapping_restores_the_layers_when_call_fails():
    model = TinyNet()
    model(np.zeros((1, SIZE, SIZE, 3), np.float32))
    taps = KerasModel(model)._taps
    with pytest.raises(ValueError, match="boom"):
        with tapping(taps.sublayers):
            raise ValueError("boom")
    assert not any("call" in layer.__dict__ for layer in taps.sublayers.values())


def test_unbuilt_model_asks_for_a_build():
    with pytest.raises(UserError, match="records no input shape"):
        KerasModel(TinyNet(), name="tiny")


def test_extracted_inner_layer_equals_its_output_computed_by_hand(full_run, saved):
    run = load_run(full_run)
    x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in run.dataset.path]) / 255
    net = keras.models.load_model(saved)
    conv1 = net.block.conv1(net.stem(x)).numpy()  # the block's first call (it is called twice)
    np.testing.assert_allclose(run.activations("block/conv1", "mean")[:], conv1.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(run.activations("block/conv1", "max")[:], conv1.max(axis=(1, 2)), atol=1e-5)
    # logits are pre-softmax (their softmax is the model's output), and so is the softmax head's tap
    logits = run.logits()[:]
    np.testing.assert_allclose(keras.ops.softmax(logits).numpy(), net(x).numpy(), atol=1e-5)
    np.testing.assert_allclose(run.activations("head")[:], logits, atol=1e-6)


def test_full_run_writes_clusters_and_maximization_images(full_run):
    import pandas as pd

    assert len(pd.read_parquet(full_run / "clusters.parquet").query("layer == 'block/conv1'")) == 4
    index = pd.read_parquet(full_run / "maximize" / "index.parquet")
    assert set(index.kind) == {"unit", "class"} and len(index) == 4
    assert set(index.query("kind == 'unit'").layer) == {"block/conv1"}
    assert np.isfinite(index.activation).all()
    assert all((full_run / path).exists() for path in index.path)


def test_maximization_climbs_units_of_an_inner_layer(saved):
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import render

    model = load_model(saved, trust_model=True)
    result = render(model, obj.channel("block/conv2", [0, 1, 2, 3]), seeds=[0, 1, 2, 3], steps=16)
    assert (result.values > result.initial).all()
