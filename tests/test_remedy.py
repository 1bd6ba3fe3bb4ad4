"""The remedy: fine-tune a copy of a model against the shortcut the probe stage flagged, and show it worked.

Pure parts first (augmentations, the split, the deterministic fine-tune loop on a tiny model), then
the refusals of ``python -m pipeline remedy``, then the whole loop on a small CNN trained with a
planted colour shortcut. The shape-driven control and the run-twice check train more models and
are ``slow`` (``python -m pytest -m slow tests/test_remedy.py``, about 6 minutes: the demo's model is trained).
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow is imported (DESIGN.md)

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import rgb_to_hsv

import zoo
from pipeline.cli import main
from pipeline.config import make_config
from pipeline.demo import data as demo_data
from pipeline.remedy.augment import BY_CUE, Counterfactuals, for_cue
from pipeline.remedy.split import split_rows


def colourful(n=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    x[:, 4:12, 4:12] = (230, 60, 40)
    return x


# --------------------------------------------------------------------------- augmentations


def test_colour_counterfactuals_change_colour_and_keep_the_layout():
    x = colourful()
    out = Counterfactuals(for_cue("colour"), strength=1.0)(x, indices=range(8), seed=0, epoch=0)
    assert out.dtype == np.uint8 and out.shape == x.shape
    hue = lambda a: rgb_to_hsv(a[:, 8, 8] / 255.0)[:, 0]
    assert (np.abs(hue(out) - hue(x)) > 1e-3).sum() >= 6   # the red square is not red any more (mostly)
    # Brightness edges stay where they were: luminance correlates with the original's.
    lum = lambda a: (a.astype(float) @ [0.299, 0.587, 0.114]).ravel()
    assert np.corrcoef(lum(out), lum(x))[0, 1] > 0.5


def test_strength_is_the_share_of_images_replaced_and_zero_changes_nothing():
    x = colourful(n=200, size=8)
    assert (Counterfactuals(for_cue("colour"), strength=0.0)(x, range(200), seed=1) == x).all()
    picks = Counterfactuals(for_cue("colour"), strength=0.5).choices(range(200), seed=1, epoch=0)
    assert 70 < (picks >= 0).sum() < 130
    assert set(picks[picks >= 0]) == {0, 1, 2}   # hue rotation, greyscale, channel shuffle all used


def test_augmentation_is_seeded_per_image_and_epoch_not_by_batch():
    x = colourful(n=6)
    aug = Counterfactuals(for_cue("texture"), strength=1.0)
    whole = aug(x, range(6), seed=3, epoch=2)
    parts = np.concatenate([aug(x[:2], range(2), seed=3, epoch=2), aug(x[2:], range(2, 6), seed=3, epoch=2)])
    assert (whole == parts).all()
    assert (aug(x, range(6), seed=3, epoch=3) != whole).any()
    assert BY_CUE["texture"] == ("blur", "patch_blur")


def test_unknown_augmentation_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown augmentation 'sepia'"):
        for_cue("colour", ["sepia"])


# --------------------------------------------------------------------------- split


def test_the_split_is_stratified_disjoint_and_seeded():
    labels = np.array([0] * 10 + [1] * 6 + [-1] * 3)
    train, held = split_rows(labels, 0.5, seed=0)
    assert set(train).isdisjoint(held) and sorted([*train, *held]) == list(range(16))  # unlabelled rows in neither
    assert (labels[train] == 0).sum() == 5 and (labels[train] == 1).sum() == 3
    assert (split_rows(labels, 0.5, seed=0)[0] == train).all()
    assert (split_rows(labels, 0.5, seed=1)[0] != train).any()


# --------------------------------------------------------------------------- fine-tuning


def _tiny_finetune(tmp_path, seed, layers="all"):
    import keras

    from pipeline.remedy.finetune import finetune

    path = tmp_path / "tiny.keras"
    if not path.exists():
        keras.utils.set_random_seed(0)
        zoo.sequential(size=16).save(path)
    model = keras.models.load_model(path)
    x = colourful(n=48, seed=5)
    y = np.arange(48) % 3
    result = finetune(model, x, y, np.arange(48), Counterfactuals(for_cue("colour"), 0.8), epochs=2,
                      batch_size=16, layers=layers, seed=seed, from_logits=False)
    return model, result


def test_the_same_seed_gives_bit_identical_weights(tmp_path):
    a, result = _tiny_finetune(tmp_path, seed=7)
    b, _ = _tiny_finetune(tmp_path, seed=7)
    c, _ = _tiny_finetune(tmp_path, seed=8)
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    assert all(np.array_equal(p, q) for p, q in zip(wa, wb))
    assert any(not np.array_equal(p, q) for p, q in zip(wa, wc))
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.trained == ["conv_a", "conv_b", "out"]


def test_only_the_chosen_layers_train_and_flags_are_restored(tmp_path):
    import keras

    original = None
    model, result = _tiny_finetune(tmp_path, seed=0, layers="last:1")
    original = keras.models.load_model(tmp_path / "tiny.keras")
    assert result.trained == ["out"]
    for layer in ("conv_a", "conv_b"):
        assert all(np.array_equal(p, q) for p, q in zip(model.get_layer(layer).get_weights(),
                                                         original.get_layer(layer).get_weights()))
    assert not np.array_equal(model.get_layer("out").get_weights()[0], original.get_layer("out").get_weights()[0])
    assert all(layer.trainable for layer in model.layers)


# --------------------------------------------------------------------------- the command's refusals


def _probe_run(root, model, x, y, names, remedy=None, stages=("extract", "probe")):
    """Save model and images, run ``stages``; return the config of the run."""
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    root.mkdir(parents=True, exist_ok=True)
    model.save(root / "model.keras")
    np.savez(root / "images.npz", x=x, y=y, class_names=np.array(names))
    cfg = make_config({"out": str(root / "run"), "model": str(root / "model.keras"),
                       "data": {"npz": str(root / "images.npz")}, "remedy": remedy or {}})
    Runner(cfg, [s for s in all_stages() if s.name in stages]).run()
    return cfg


def test_refusals_are_one_line_and_change_nothing(tmp_path, capsys):
    import keras

    keras.utils.set_random_seed(0)
    x, y, names = demo_data.make_shapes(40, [0, 9], size=16)
    cfg = _probe_run(tmp_path / "a", zoo.sequential(size=16, classes=4), x, y, names, stages=("extract",))
    run = str(cfg.out_dir)
    assert main(["remedy", run]) == 2
    assert "has no finished probe stage" in capsys.readouterr().err

    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    Runner(cfg, all_stages()).run(only="probe")   # an untrained model: every class inconclusive
    assert main(["remedy", run]) == 0
    err = capsys.readouterr().err
    assert "nothing was flagged" in err and "no remedy trained" in err
    assert not (cfg.out_dir / "remedy").exists()

    saved = tmp_path / "exported"
    keras.models.load_model(cfg.model).export(saved, verbose=False)
    yaml_cfg = zoo.write_config(tmp_path, saved, npz=cfg.data.npz, out=run)
    assert main(["remedy", str(yaml_cfg)]) == 2
    assert "remedy fine-tunes Keras model files (.keras, .h5)" in capsys.readouterr().err


# --------------------------------------------------------------------------- the whole loop


REMEDY = {"epochs": 12, "learning_rate": 3e-3, "stages": ["extract", "probe"]}   # the demo's settings


@pytest.fixture(scope="module")
def remedied(tmp_path_factory):
    """The demo's colour-shortcut model (trained in about 2 minutes: small models trained for a few
    seconds learn colour only, and 400 images cannot teach them shape) remedied with the demo's settings."""
    from pipeline.demo.data import ensure_demo_assets
    from pipeline.orchestration.runner import Runner
    from pipeline.remedy.run import remedy
    from pipeline.stages import all_stages

    root = tmp_path_factory.mktemp("demo")
    assets = ensure_demo_assets(root / "assets")
    cfg = make_config({"out": str(root / "run"), "model": str(assets["model"]),
                       "data": {"images": str(assets["images"])}, "remedy": REMEDY})
    Runner(cfg, [s for s in all_stages() if s.name in ("extract", "probe")]).run()
    return cfg, remedy(cfg)


@pytest.mark.slow
def test_a_colour_shortcut_is_remedied(remedied):
    cfg, summary = remedied
    verdicts = pd.read_parquet(cfg.out_dir / "remedy" / "remedy_verdicts.parquet")
    accuracy = pd.read_parquet(cfg.out_dir / "remedy" / "remedy_accuracy.parquet").set_index(["split", "probe"])
    assert (verdicts["verdict_before"] == "relies on colour").all()
    # Colour reliance is no longer flagged for most classes of the held-out images ...
    assert (verdicts["verdict_after"] == "relies on colour").sum() <= 1, verdicts[["class_name", "verdict_after"]]
    # ... accuracy under recolouring rises by a large margin, and on the originals it does not collapse.
    held = accuracy.loc["held-out"]
    for probe in ("grayscale", "hue_rotation", "channel_shuffle"):
        assert held.loc[probe, "change"] > 0.15 and held.loc[probe, "change_ci_low"] > 0, held
    assert held.loc["original", "accuracy_after"] >= held.loc["original", "accuracy_before"] - 0.05
    assert summary["flagged"]["after"] < summary["flagged"]["before"]


@pytest.mark.slow
def test_the_remedied_model_is_a_plain_keras_copy_and_the_original_is_untouched(remedied):
    import keras

    from pipeline.storage.hashing import file_hash

    cfg, summary = remedied
    remedied_model = keras.models.load_model(cfg.out_dir / "remedy" / "model.keras")   # no custom objects
    original = keras.models.load_model(cfg.model)
    assert [l.name for l in remedied_model.layers] == [l.name for l in original.layers]
    assert not np.array_equal(remedied_model.get_weights()[0], original.get_weights()[0])
    manifest = pd.read_json(cfg.out_dir / "remedy" / "manifest.json", typ="series")
    assert manifest["stages"]["extract"]["input_hashes"]["model"] == file_hash(cfg.out_dir / "remedy" / "model.keras")
    # The remedied run is a run directory over the same images, with its own verdicts.
    after = pd.read_parquet(cfg.out_dir / "remedy" / "dataset.parquet")
    pd.testing.assert_frame_equal(after, pd.read_parquet(cfg.out_dir / "dataset.parquet"))
    assert (cfg.out_dir / "remedy" / "bias_verdicts.parquet").exists()
    page = (cfg.out_dir / "remedy" / "before-after" / "index.html").read_text()
    assert "Content-Security-Policy" in page and "relies on colour" in page and "<script" not in page


@pytest.mark.slow
def test_a_second_run_reuses_the_fine_tuned_model(remedied, capsys):
    cfg, summary = remedied
    weights = (cfg.out_dir / "remedy" / "model.keras").read_bytes()
    assert main(["remedy", str(cfg.out_dir)]) == 0
    assert "up to date" in capsys.readouterr().err
    assert (cfg.out_dir / "remedy" / "model.keras").read_bytes() == weights


@pytest.mark.slow
def test_same_seed_same_weights_and_tables(remedied, tmp_path):
    """Run the whole remedy again from scratch into another folder: identical weights and tables."""
    import keras

    from pipeline.remedy.run import remedy

    cfg, _ = remedied
    remedy(cfg, out=tmp_path / "again")
    a = keras.models.load_model(cfg.out_dir / "remedy" / "model.keras").get_weights()
    b = keras.models.load_model(tmp_path / "again" / "model.keras").get_weights()
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    for table in ("remedy_verdicts", "remedy_accuracy", "remedy_split", "bias_verdicts", "probe_units"):
        pd.testing.assert_frame_equal(pd.read_parquet(cfg.out_dir / "remedy" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "again" / f"{table}.parquet"))


@pytest.mark.slow
def test_a_shape_driven_control_is_left_essentially_unchanged(tmp_path):
    """Colour augmentation forced on a model that already ignores colour: verdicts stay shape-driven."""
    from pipeline.remedy.run import remedy

    x, y, _ = demo_data.make_shapes(2000, [0, 1], shortcut=0.25)
    model = demo_data.train_demo_model(x, y, 0, epochs=20, batch_size=32, n_classes=4)
    xa, ya, names = demo_data.make_shapes(400, [0, 3], shortcut=0.25)
    cfg = _probe_run(tmp_path, model, xa, ya, names, dict(REMEDY, cue="colour"))
    summary = remedy(cfg)
    verdicts = pd.read_parquet(cfg.out_dir / "remedy" / "remedy_verdicts.parquet")
    accuracy = pd.read_parquet(cfg.out_dir / "remedy" / "remedy_accuracy.parquet").set_index(["split", "probe"])
    shape_before = verdicts["verdict_before"] == "shape-driven"
    assert shape_before.sum() >= 3 and summary["forced"]
    assert (verdicts.loc[shape_before, "verdict_after"] == "shape-driven").all(), verdicts
    assert abs(accuracy.loc[("held-out", "original"), "change"]) < 0.05
