"""The extract stage on the model shapes users bring, in every file format they save."""
import functools

import numpy as np
import pandas as pd
import pytest

import zoo
from pipeline import load_run
from pipeline.cli import main

FORMATS = ["keras", "h5", "savedmodel"]


# Batches of 5 over the 12-image folder: the last batch is a short one.
write_config = functools.partial(zoo.write_config, name="t", file="config.yaml", extract={"batch_size": 5})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    zoo.image_folder(root, per_class=4, size=20)
    return root


def load_pixels(paths):
    from pipeline.inputs.images import load_images

    x, _, _ = load_images(paths, (16, 16), 3)
    return x.astype("float32") / 255


def reference_outputs(model, paths, layer):
    """What the layer gives on the same pixels, computed with plain Keras."""
    import keras

    x = load_pixels(paths)
    if layer == "block/inner_conv":
        sub = model.get_layer("block")
        stem = keras.Model(model.inputs, model.get_layer("stem").output)(x)
        return np.asarray(keras.Model(sub.inputs, sub.get_layer("inner_conv").output)(stem))
    return np.asarray(keras.Model(model.inputs, model.get_layer(layer).output)(x))


PROBED = {"sequential": "conv_b", "branched": "left", "nested": "block/inner_conv",
          "batchnorm": "conv_a", "depthwise": "dw"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_every_architecture_and_format_extracts(tmp_path, folder, arch, fmt):
    model = zoo.randomize_batchnorm(zoo.ARCHITECTURES[arch]())
    path = zoo.save(model, tmp_path / arch, fmt)
    config = write_config(tmp_path, path, folder)

    assert main(["run", str(config), "--only", "extract"]) == 0

    run = load_run(tmp_path / "run")
    assert len(run.dataset) == 12 and set(run.dataset.class_name) == {"a", "b", "c"}
    assert run.logits().shape == (12, 3)
    layer = PROBED[arch]
    assert layer in run.layer_names
    expected = reference_outputs(model, run.dataset.path.tolist(), layer).mean(axis=(1, 2))
    np.testing.assert_allclose(run.activations(layer, "mean")[:], expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_runs_in_inference_mode(tmp_path, folder):
    model = zoo.randomize_batchnorm(zoo.batchnorm())
    config = write_config(tmp_path, zoo.save(model, tmp_path / "bn", "keras"), folder, layers=["bn"])
    assert main(["run", str(config), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    # Training-mode BatchNorm would normalise each batch to mean beta; inference uses the moving stats.
    expected = reference_outputs(model, run.dataset.path.tolist(), "bn").mean(axis=(1, 2))
    np.testing.assert_allclose(run.activations("bn")[:], expected, rtol=1e-4, atol=1e-5)


def test_auto_layers_are_conv_and_dense_and_logits_are_pre_softmax(tmp_path, folder):
    model = zoo.sequential()
    config = write_config(tmp_path, zoo.save(model, tmp_path / "m", "keras"), folder)
    assert main(["run", str(config), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    assert run.layer_names == ["conv_a", "conv_b", "out"]
    probs = np.asarray(model(load_pixels(run.dataset.path.tolist())))
    logits = run.logits()[:]
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(softmax, probs, rtol=1e-4, atol=1e-6)
    assert not np.allclose(logits.sum(1), 1.0)


def test_spatial_samples_and_float16(tmp_path, folder):
    model = zoo.sequential()
    config = write_config(tmp_path, zoo.save(model, tmp_path / "m", "keras"), folder,
                          extract={"batch_size": 5, "spatial_samples": 3, "dtype": "float16"})
    assert main(["run", str(config), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    spatial = run.activations("conv_a", "spatial")
    pos = run.activations("conv_a", "spatial_pos")[:]
    assert spatial.shape == (12, 3, 4) and spatial.dtype == np.float16
    assert pos.min() >= 0 and pos.max() < 14
    assert run.activations("conv_a", "mean").dtype == np.float16


def test_npz_input_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(7, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 1, 0, 1, 0, 1, 1])
    np.savez(tmp_path / "d.npz", x=x, y=y, class_names=np.array(["cat", "dog"]))
    zoo.write_config(tmp_path, zoo.save(zoo.sequential(), tmp_path / "m", "keras"), npz=tmp_path / "d.npz",
                     extract={"batch_size": 3})
    assert main(["run", str(tmp_path / "c.yaml"), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    assert run.dataset.class_name.tolist() == ["cat", "dog", "cat", "dog", "cat", "dog", "dog"]
    assert run.activations("conv_a").shape == (7, 4)


def test_limit_takes_a_seeded_stratified_sample(tmp_path, folder):
    model_path = zoo.save(zoo.sequential(), tmp_path / "m", "keras")
    config = write_config(tmp_path, model_path, folder, data={"images": str(folder), "limit": 6})
    assert main(["run", str(config), "--only", "extract"]) == 0
    first = load_run(tmp_path / "run").dataset
    assert first.class_name.value_counts().to_dict() == {"a": 2, "b": 2, "c": 2}
    assert main(["run", str(config), "--only", "extract", "--force"]) == 0
    assert load_run(tmp_path / "run").dataset.path.tolist() == first.path.tolist()


def test_nan_outputs_are_reported_per_layer(tmp_path, folder, capsys):
    import keras

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(inp)
    x = keras.layers.Conv2D(2, 3, name="broken")(x)
    out = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    kernel, bias = model.get_layer("broken").get_weights()
    kernel[0, 0, 0, 1] = np.nan  # a diverged training run leaves weights like this
    model.get_layer("broken").set_weights([kernel, bias])
    config = write_config(tmp_path, zoo.save(model, tmp_path / "nan", "keras"), folder,
                          layers=["conv", "broken"])
    assert main(["run", str(config), "--only", "extract"]) == 0
    err = capsys.readouterr().err
    assert "layer broken produced" in err and "NaN/Inf" in err
    run = load_run(tmp_path / "run")
    assert run.arrays.attrs["nonfinite"]["broken"] > 0
    assert run.arrays.attrs["nonfinite"]["conv"] == 0
