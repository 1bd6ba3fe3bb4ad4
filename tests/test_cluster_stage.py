"""Neuron clusters recovered from a model with planted groups of units, end to end."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import zoo
from pipeline import load_run
from pipeline.cli import main

GROUPS, PER_GROUP = 4, 8


def planted_model(seed=0):
    """A conv layer whose 32 units are 4 base filters, each copied 8 times with its own scale.

    Channel 32 has all-zero weights and bias: a dead unit.
    """
    import keras

    rng = np.random.default_rng(seed)
    inp = keras.Input((24, 24, 3))
    base = keras.layers.Conv2D(GROUPS, 3, padding="same", activation="relu", name="base")(inp)
    planted = keras.layers.Conv2D(GROUPS * PER_GROUP + 1, 1, name="planted")(base)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(planted))
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(x))
    kernel = np.zeros((1, 1, GROUPS, GROUPS * PER_GROUP + 1), np.float32)
    for unit in range(GROUPS * PER_GROUP):
        group = unit // PER_GROUP
        kernel[0, 0, :, unit] = rng.normal(0, 0.03, GROUPS)  # a little of the other groups
        kernel[0, 0, group, unit] = rng.uniform(0.5, 3.0)    # mostly its own base filter, own scale
    model.get_layer("planted").set_weights([kernel, np.zeros(GROUPS * PER_GROUP + 1, np.float32)])
    # Four independent detectors: red, green, blue, and vertical edges.
    base_kernel = np.zeros((3, 3, 3, GROUPS), np.float32)
    for c in range(3):
        base_kernel[1, 1, c, c] = 1.0
    base_kernel[:, 0, :, 3], base_kernel[:, 2, :, 3] = -1.0, 1.0
    model.get_layer("base").set_weights([base_kernel, np.zeros(GROUPS, np.float32)])
    return model


def factor_images(root, classes=("x", "y"), per_class=60, size=24, seed=0):
    """Images whose red, green, blue levels and stripe strength vary independently."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    stripes = (np.arange(size) // 3 % 2)[None, :, None].astype(np.float32)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = rng.uniform(0, 0.6, 3)[None, None, :]
            img = (colour + rng.uniform(0, 0.4) * stripes) * 255
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    factor_images(tmp / "images")
    config = zoo.write_config(tmp, zoo.save(planted_model(), tmp / "m", "keras"), tmp / "images",
                              file="run.yaml", cluster={"bootstrap": 5}, layers=["planted"])
    assert main(["run", str(config), "--only", "extract"]) == 0
    assert main(["run", str(config), "--only", "cluster"]) == 0
    return tmp, config


def test_planted_groups_are_recovered_and_the_zero_channel_is_dead(planted_run):
    tmp, _ = planted_run
    units = load_run(tmp / "run").clusters.query("layer == 'planted'").sort_values("channel")
    live = units[~units.dead]
    truth = live.channel.to_numpy() // PER_GROUP
    assert adjusted_rand_score(truth, live.cluster) >= 0.9
    dead = units[units.channel == GROUPS * PER_GROUP].iloc[0]
    assert dead.dead and dead.cluster == -1
    summary = load_run(tmp / "run").cluster_summary.query("layer == 'planted'")
    assert len(summary) == GROUPS
    assert (summary.mean_corr > 0.9).all() and (summary.stability > 0.9).all()


def test_same_config_twice_gives_identical_tables(planted_run, tmp_path):
    tmp, config = planted_run
    first = {name: load_run(tmp / "run").table(name).copy() for name in ("clusters", "cluster_summary", "layers")}
    assert main(["run", str(config), "--only", "cluster", "--force"]) == 0
    again = load_run(tmp / "run")
    for name, table in first.items():
        assert table.equals(again.table(name)), name


def test_five_images_of_one_class_and_a_nan_layer_finish_with_clear_messages(tmp_path, capsys):
    import keras

    zoo.image_folder(tmp_path / "images", classes=("only",), per_class=5, size=16)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Conv2D(3, 3, name="broken")(x)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D()(x)))
    kernel, bias = model.get_layer("broken").get_weights()
    model.get_layer("broken").set_weights([kernel * np.nan, bias])
    config = zoo.write_config(tmp_path, zoo.save(model, tmp_path / "m", "keras"), tmp_path / "images",
                              file="run.yaml", cluster={"bootstrap": 5})
    assert main(["run", str(config)]) == 0
    err = capsys.readouterr().err
    assert "layer broken produced" in err
    assert "cluster: broken: every unit is dead" in err
    run = load_run(tmp_path / "run")
    assert run.clusters.query("layer == 'broken'").dead.all()
    assert np.isnan(run.layers.set_index("layer").probe_accuracy["conv"])  # one class: no probe
