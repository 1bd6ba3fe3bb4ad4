"""The demo dataset plants a colour (or texture) shortcut; the demo model is a small named CNN."""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow is imported (DESIGN.md)

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo import data as demo_data
from pipeline.demo.data import (CLASS_NAMES, PALETTE, TEXTURE_NAMES, build_demo_model,
                                ensure_demo_assets, make_shapes, sample_factors,
                                train_demo_model)

LAYER_NAMES = ["conv1", "pool1", "conv2", "pool2", "conv3", "gap", "logits", "probs"]


def nearest_palette(x):
    """Index of the palette colour nearest each image's mean shape colour.

    Shape pixels are found from the image alone: the background is dark (every channel below
    ~70) and every palette colour has a channel above 200.
    """
    pixels = x.astype(np.float32)
    mask = pixels.max(axis=-1, keepdims=True) > 110
    mean = (pixels * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
    return np.argmin(((mean[:, None, :] - PALETTE[None].astype(np.float32)) ** 2).sum(-1), axis=1)


def texture_features(x):
    """Spectral power of the grey image at the textures' 4-pixel period, as log fractions.

    Stripes put power on one axis, checks on the diagonal, dots on both axes and the diagonal,
    plain fills nowhere.
    """
    grey = x.astype(np.float32).sum(axis=-1)
    power = np.abs(np.fft.fft2(grey - grey.mean(axis=(1, 2), keepdims=True))) ** 2
    k = x.shape[1] // 4
    horizontal, vertical = power[:, 0, k], power[:, k, 0]
    diagonal = power[:, k, k] + power[:, k, -k]
    features = [np.minimum(horizontal, vertical), np.maximum(horizontal, vertical), diagonal]
    return np.log(np.stack(features, axis=1) / power.sum(axis=(1, 2))[:, None])


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y):
    centroids = np.stack([train_x[train_y == k].mean(axis=0) for k in np.unique(train_y)])
    predicted = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return np.mean(predicted == test_y)


# --------------------------------------------------------------------------- generator


def test_same_seed_same_images_other_seed_other_images():
    x1, y1, _ = make_shapes(20, seed=3)
    x2, y2, _ = make_shapes(20, seed=3)
    x3, y3, _ = make_shapes(20, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_shapes_dtypes_and_balanced_classes():
    x, y, names = make_shapes(42, seed=0, size=24)
    assert x.shape == (42, 24, 24, 3) and x.dtype == np.uint8
    assert y.shape == (42,) and y.dtype == np.int64
    assert names == CLASS_NAMES
    counts = np.bincount(y, minlength=len(CLASS_NAMES))
    assert counts.max() - counts.min() <= 1


def test_labels_are_shuffled_not_in_class_order():
    _, y, _ = make_shapes(40, seed=0)
    assert not np.array_equal(y, np.arange(40) % len(CLASS_NAMES))


def test_full_shortcut_fills_every_shape_with_its_class_colour():
    x, y, _ = make_shapes(200, seed=1, shortcut=1.0)
    np.testing.assert_array_equal(nearest_palette(x), y)


def test_training_shortcut_mostly_agrees_with_the_label():
    x, y, _ = make_shapes(400, seed=2, shortcut=0.9)
    assert 0.85 <= np.mean(nearest_palette(x) == y) <= 0.95


def test_chance_shortcut_makes_colour_uninformative():
    x, y, _ = make_shapes(400, seed=2, shortcut=1 / len(CLASS_NAMES))
    colour = nearest_palette(x)
    # Chance is 0.25 (standard error ~0.022 at n=400); also no colour favours any class.
    assert abs(np.mean(colour == y) - 0.25) < 0.08
    table = np.histogram2d(y, colour, bins=len(CLASS_NAMES))[0] / 100
    assert np.all(np.abs(table - 0.25) < 0.15)


def test_colour_carrier_draws_the_class_shape():
    factors = sample_factors(100, np.random.default_rng(0), shortcut=0.5, carrier="colour")
    np.testing.assert_array_equal(factors["shape"], factors["label"])
    assert np.all(factors["texture"] == 0)


def test_texture_carrier_label_is_in_the_texture_not_the_shape_or_colour():
    x_fit, y_fit, names = make_shapes(400, seed=0, shortcut=1.0, carrier="texture")
    x_test, y_test, _ = make_shapes(400, seed=1, shortcut=1.0, carrier="texture")
    assert names == TEXTURE_NAMES
    assert nearest_centroid_accuracy(texture_features(x_fit), y_fit,
                                     texture_features(x_test), y_test) > 0.9
    factors = sample_factors(400, np.random.default_rng(1), shortcut=1.0, carrier="texture")
    assert abs(np.mean(factors["shape"] == factors["label"]) - 0.25) < 0.08
    assert abs(np.mean(factors["colour"] == factors["label"]) - 0.25) < 0.08


def test_texture_shortcut_strength():
    factors = sample_factors(400, np.random.default_rng(0), shortcut=0.75, carrier="texture")
    assert abs(np.mean(factors["texture"] == factors["label"]) - 0.75) < 0.08


def test_bad_arguments_are_rejected_with_their_name():
    with pytest.raises(ValueError, match="carrier must be one of"):
        make_shapes(4, seed=0, carrier="shape")
    with pytest.raises(ValueError, match=r"shortcut must be in \[0, 1\]"):
        make_shapes(4, seed=0, shortcut=1.5)


def test_five_thousand_images_in_about_two_seconds():
    make_shapes(50, seed=0)  # first-call overheads are not the generator's
    start = time.perf_counter()
    make_shapes(5000, seed=0)
    assert time.perf_counter() - start < 4.0  # 2 s budget, slack for a busy CI machine


# --------------------------------------------------------------------------- model


def test_demo_model_has_named_layers_and_outputs_probabilities():
    model = build_demo_model((32, 32, 3), n_classes=4)
    assert [layer.name for layer in model.layers[1:]] == LAYER_NAMES
    assert not any(type(layer).__name__ == "Rescaling" for layer in model.layers)
    probs = np.asarray(model(np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)))
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_train_demo_model_one_epoch_on_a_tiny_set():
    x, y, _ = make_shapes(128, seed=0)
    messages = []
    start = time.perf_counter()
    model = train_demo_model(x, y, seed=0, epochs=1, log=messages.append)
    assert time.perf_counter() - start < 20
    assert model.output_shape == (None, len(CLASS_NAMES))
    assert [layer.name for layer in model.layers[1:]] == LAYER_NAMES
    assert len(messages) == 1 and messages[0].startswith("epoch 1/1")


# --------------------------------------------------------------------------- cached assets

TINY = dict(seed=0, n_train=64, n_analysis=12, epochs=1)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo")
    messages = []
    paths = ensure_demo_assets(data_dir, log=messages.append, **TINY)
    return data_dir, paths, messages


def test_assets_are_a_keras_model_and_class_folders_of_pngs(tiny_assets):
    data_dir, paths, messages = tiny_assets
    assert paths["model"].name == "model.keras" and paths["model"].is_file()
    pngs = sorted(p.relative_to(paths["images"]).as_posix() for p in paths["images"].rglob("*"))
    pngs = [p for p in pngs if p.endswith(".png")]
    assert len(pngs) == TINY["n_analysis"]
    assert all(p.split("/")[0] in CLASS_NAMES for p in pngs)
    assert {p.split("/")[1] for p in pngs} == {f"{i:05d}.png" for i in range(TINY["n_analysis"])}
    assert any("training demo model" in m for m in messages)


def test_assets_record_each_image_class_and_colour(tiny_assets):
    import pandas as pd

    _, paths, _ = tiny_assets
    factors = pd.read_csv(paths["factors"])
    assert len(factors) == TINY["n_analysis"]
    assert all((paths["images"] / p).is_file() for p in factors["path"])
    assert (factors["class_name"] == factors["shape"]).all()
    info = json.loads(paths["info"].read_text())
    assert {"accuracy_heldout_shortcut", "accuracy_analysis"} <= set(info)


def test_saved_model_loads_with_its_layer_names(tiny_assets):
    import keras

    model = keras.models.load_model(tiny_assets[1]["model"])
    assert [layer.name for layer in model.layers[1:]] == LAYER_NAMES


def test_second_call_reuses_the_cache_without_training(tiny_assets, monkeypatch):
    data_dir, paths, _ = tiny_assets
    monkeypatch.setattr(demo_data, "train_demo_model",
                        lambda *a, **k: pytest.fail("trained again"))
    assert ensure_demo_assets(data_dir, **TINY) == paths


def test_other_parameters_get_another_cache_entry(tiny_assets):
    data_dir, paths, _ = tiny_assets
    key = demo_data._cache_key
    params = dict(TINY, size=32, train_shortcut=0.9, analysis_shortcut=0.25)
    assert key(params) != key(dict(params, seed=1)) != key(dict(params, n_train=65))
    assert Path(paths["model"]).parent.parent == data_dir


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "train_demo_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_assets(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []
