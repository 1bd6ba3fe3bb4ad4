"""The shortcut finder: counterfactual probes, the per-class verdicts, and the ``probe`` stage end to end.

The end-to-end tests train three small CNNs on the demo's shapes (about a minute in all) and
check that the finder says what was planted: a colour shortcut is "relies on colour", a control
trained with random colours is not, a texture-labelled model is "relies on texture".
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow is imported (DESIGN.md)

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import rgb_to_hsv

from pipeline.shortcuts import verdicts as bias
from pipeline.demo import data as demo_data
from pipeline.shortcuts.verdicts import Interval, Rules, UnitSensitivity, cluster_sensitivity, decide, shortcut_tables
from pipeline.config import ProbeConfig, make_config
from pipeline.shortcuts.probes import (background_mask, blur, centre_mask, channel_shuffle, compose, grayscale,
                             hue_rotation, make_probes, patch_shuffle)


def images(n=6, size=16, seed=0):
    """Random colourful uint8 images with a bright square in the middle."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    x[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = (250, 120, 30)
    return x


IDX = np.arange(6)


# --------------------------------------------------------------------------- transforms


def test_grayscale_gives_equal_channels_at_the_luminance():
    x = images()
    grey = grayscale()(x, IDX, seed=0)
    assert grey.dtype == np.uint8 and grey.shape == x.shape
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    luma = x.astype(float) @ [0.299, 0.587, 0.114]
    assert np.abs(grey[..., 0] - luma).max() <= 0.5 + 1e-6


def test_hue_rotation_changes_hue_but_keeps_value_and_saturation():
    x = images()
    out = hue_rotation()(x.astype(np.float32), IDX, seed=0)
    before, after = rgb_to_hsv(x / 255.0), rgb_to_hsv(out / 255.0)
    np.testing.assert_allclose(after[..., 2], before[..., 2], atol=1e-5)           # value
    np.testing.assert_allclose(after[..., 1], before[..., 1], atol=1e-5)           # saturation
    turn = (after[..., 0] - before[..., 0]) % 1.0
    coloured = before[..., 1] > 0.1
    assert ((turn[coloured] > 59 / 360) & (turn[coloured] < 301 / 360)).all()      # by 60-300 degrees


def test_channel_shuffle_permutes_channels_never_the_identity():
    x = images(n=40)
    out = channel_shuffle()(x, np.arange(40), seed=0)
    for a, b in zip(x, out):
        perm = [next(c for c in range(3) if np.array_equal(b[..., k], a[..., c])) for k in range(3)]
        assert sorted(perm) == [0, 1, 2] and perm != [0, 1, 2]


def test_patch_shuffle_keeps_the_pixel_histogram_and_breaks_the_layout():
    x = images()
    out = patch_shuffle(4)(x, IDX, seed=0)
    for a, b in zip(x, out):
        np.testing.assert_array_equal(np.sort(a.reshape(-1, 3), axis=0), np.sort(b.reshape(-1, 3), axis=0))
        assert not np.array_equal(a, b)
    # Every 4x4 patch of the output is a patch of the input.
    patches = {x[0, r:r + 4, c:c + 4].tobytes() for r in range(0, 16, 4) for c in range(0, 16, 4)}
    assert all(out[0, r:r + 4, c:c + 4].tobytes() in patches for r in range(0, 16, 4) for c in range(0, 16, 4))


def test_probes_are_seeded_per_image_so_batching_does_not_matter():
    x = images()
    shuffle = patch_shuffle(4)
    whole = shuffle(x, IDX, seed=3)
    np.testing.assert_array_equal(whole, shuffle(x, IDX, seed=3))
    np.testing.assert_array_equal(whole[2:5], shuffle(x[2:5], IDX[2:5], seed=3))
    assert not np.array_equal(whole, shuffle(x, IDX, seed=4))
    # The image's index, not its position in the batch, seeds it.
    assert not np.array_equal(whole[:1], shuffle(x[:1], [5], seed=3))


def test_blur_removes_high_frequencies_and_keeps_the_mean_colour():
    x = images(size=32)

    def high_frequency_energy(a):
        spectrum = np.abs(np.fft.fft2(a.astype(float) - a.mean(axis=(1, 2), keepdims=True), axes=(1, 2))) ** 2
        f = np.abs(np.fft.fftfreq(32))
        high = (f[:, None] > 0.25) | (f[None, :] > 0.25)
        return spectrum[:, high].sum()

    out = blur(0.02)(x, IDX, seed=0)
    assert high_frequency_energy(out) < 0.2 * high_frequency_energy(x)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1.0)


def test_centre_mask_hides_the_centre_and_background_mask_the_rest():
    x = images()
    centre = (slice(4, 12), slice(4, 12))
    hidden = centre_mask(0.5)(x, IDX)
    kept = background_mask(0.5)(x, IDX)
    outside = np.ones((16, 16), bool)
    outside[centre] = False
    np.testing.assert_array_equal(hidden[:, outside], x[:, outside])
    np.testing.assert_array_equal(kept[:, centre[0], centre[1]], x[:, centre[0], centre[1]])
    for h, k in zip(hidden, kept):   # one flat colour where hidden: the border's mean
        assert len(np.unique(h[centre].reshape(-1, 3), axis=0)) == 1
        assert len(np.unique(k[outside].reshape(-1, 3), axis=0)) == 1


def test_float_batches_stay_float_and_uint8_stay_uint8():
    x = images()
    for probe in make_probes(ProbeConfig()):
        assert probe(x, IDX).dtype == np.uint8
        out = probe(x.astype(np.float32), IDX)
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255


def test_colour_probes_do_not_apply_to_grey_images():
    probes = {p.name: p for p in make_probes(ProbeConfig())}
    assert {n for n, p in probes.items() if not p.applicable(1)} == {"grayscale", "hue_rotation", "channel_shuffle"}
    with pytest.raises(ValueError, match="probe 'grayscale' needs RGB images, got 1 channel"):
        probes["grayscale"](np.zeros((2, 8, 8, 1), np.uint8), [0, 1])
    assert probes["blur"](np.zeros((2, 8, 8, 1), np.uint8), [0, 1]).shape == (2, 8, 8, 1)


def test_composed_probes_apply_in_order():
    x = images()
    both = compose(grayscale(), blur(0.05))
    assert both.name == "grayscale+blur" and both.group == "composite" and not both.applicable(1)
    np.testing.assert_array_equal(both(x.astype(np.float32), IDX),
                                  blur(0.05)(grayscale()(x.astype(np.float32), IDX), IDX))


# --------------------------------------------------------------------------- verdicts on hand-made numbers

I = Interval
NOTHING = I(0.02, 0.0, 0.05)
ALL = I(0.98, 0.95, 1.0)


def contrasts_of(effects):
    """Paired differences as if the intervals were exact (wide enough for these tests)."""
    return {(a, b): I(effects[a].value - effects[b].value, effects[a].low - effects[b].high,
                      effects[a].high - effects[b].low) for a in effects for b in effects if a != b}


@pytest.mark.parametrize("colour, texture, shape, verdict", [
    (ALL, NOTHING, NOTHING, "relies on colour"),             # recolouring overturns it, nothing else does
    (I(0.4, 0.3, 0.5), I(0.6, 0.5, 0.7), ALL, "relies on colour"),  # colour matters even if shape does too
    (NOTHING, ALL, NOTHING, "relies on texture"),            # blur overturns it, patch shuffling does not
    (NOTHING, I(0.1, 0.05, 0.15), ALL, "shape-driven"),      # only patch shuffling overturns it
    (NOTHING, I(0.3, 0.25, 0.35), ALL, "inconclusive"),      # patch shuffling most, but blur matters too
    (NOTHING, ALL, ALL, "inconclusive"),                     # texture and shape cannot be told apart
    (NOTHING, NOTHING, NOTHING, "inconclusive"),             # robust to every probe
    (I(0.5, 0.4, 0.6), ALL, NOTHING, "relies on texture"),   # both matter: the larger wins
])
def test_verdict_rules(colour, texture, shape, verdict):
    effects = {"colour": colour, "texture": texture, "shape": shape}
    got, cue, effect, reason = decide(effects, contrasts_of(effects), n=100, n_correct=80)
    assert got == verdict
    assert reason
    if verdict != "inconclusive":
        assert cue in verdict and effect == effects[cue]


def test_too_few_images_or_correct_decisions_is_inconclusive_with_the_reason():
    effects = {"colour": ALL, "texture": NOTHING, "shape": NOTHING}
    verdict, _, effect, reason = decide(effects, contrasts_of(effects), n=6, n_correct=6)
    assert (verdict, reason) == ("inconclusive", "only 6 images of this class (need 10)") and np.isnan(effect.value)
    verdict, _, _, reason = decide(effects, contrasts_of(effects), n=100, n_correct=4)
    assert verdict == "inconclusive" and reason.startswith("only 4 of 100 images classified correctly")


def test_grey_images_can_still_be_shape_driven():
    effects = {"texture": NOTHING, "shape": ALL}
    verdict, _, _, reason = decide(effects, contrasts_of(effects), n=50, n_correct=50)
    assert verdict == "shape-driven" and "colour not testable" in reason


def test_near_chance_accuracy_is_mentioned():
    effects = {"colour": ALL, "texture": NOTHING, "shape": NOTHING}
    _, _, _, reason = decide(effects, contrasts_of(effects), n=100, n_correct=25, accuracy=0.25, n_classes=4)
    assert "near chance 0.25" in reason


def simulated(seed=0, n_per_class=50, k=4, blur_sinks=False):
    """Logits of a model that is always right, and of probes with planted effects.

    ``grayscale`` moves every image to a random class (the model needs colour); ``patch_shuffle``
    keeps every decision; ``blur`` keeps them too, or with ``blur_sinks`` sends every image to
    class 0 (a "sink").
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    onehot = np.eye(k)[labels] * 5.0
    sink = np.zeros_like(onehot)
    sink[:, 0] = 5.0
    probed = {"grayscale": np.eye(k)[rng.integers(0, k, len(labels))] * 5.0, "patch_shuffle": onehot.copy(),
              "blur": sink if blur_sinks else onehot.copy()}
    groups = {"grayscale": "colour", "patch_shuffle": "shape", "blur": "texture"}
    return labels, {c: f"class{c}" for c in range(k)}, onehot, probed, groups


def test_planted_colour_reliance_is_found_from_logits():
    table, verdicts = shortcut_tables(*simulated(), seed=0)
    assert list(table.columns) == bias.BIAS_COLUMNS and list(verdicts.columns) == bias.VERDICT_COLUMNS
    assert len(table) == 4 * 3 and (verdicts["verdict"] == "relies on colour").all()
    assert (verdicts["colour_ci_low"] > 0.5).all() and (verdicts["shape_lost"] == 0).all()


def test_a_sink_class_is_not_mistaken_for_a_robust_one():
    """Blur sends everything to class 0: no class-0 decision breaks, yet blur erased the class signal."""
    table, _ = shortcut_tables(*simulated(blur_sinks=True), seed=0)
    blurred = table[table["probe"] == "blur"].set_index("class")
    assert blurred.loc[0, "break_rate"] == 0.0 and blurred.loc[0, "signal_lost"] == 1.0
    assert (blurred.loc[1:, "break_rate"] == 1.0).all()


def test_tables_are_reproducible_with_the_seed():
    a = shortcut_tables(*simulated(), seed=7)
    b = shortcut_tables(*simulated(), seed=7)
    c = shortcut_tables(*simulated(), seed=8)
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert not a[1]["colour_ci_low"].equals(c[1]["colour_ci_low"])


def test_bootstrap_intervals_hold_the_estimate():
    labels, names, logits, probed, groups = simulated()
    table, _ = shortcut_tables(labels, names, logits, probed, groups, rules=Rules(n_boot=200))
    done = table.dropna(subset=["signal_ci_low"])
    assert (done["signal_ci_low"] <= done["signal_lost"] + 1e-12).all()
    assert (done["signal_lost"] <= done["signal_ci_high"] + 1e-12).all()
    assert (table["ci_low"] <= table["accuracy_drop"] + 1e-12).all()


def test_not_applicable_probes_get_rows_that_say_why():
    labels, names, logits, probed, groups = simulated()
    table, _ = shortcut_tables(labels, names, logits, probed, groups,
                               not_applicable={"hue_rotation": "not applicable: grey images"})
    rows = table[table["probe"] == "hue_rotation"]
    assert len(rows) == 4 and not rows["applicable"].any() and rows["accuracy"].isna().all()
    assert (rows["note"] == "not applicable: grey images").all()


def test_unit_sensitivity_is_the_mean_change_in_units_of_spread():
    acc = UnitSensitivity()
    original = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])        # unit 1 is constant
    acc.update("conv", original[:2], {"grayscale": original[:2] + 1, "blur": original[:2]})
    acc.update("conv", original[2:], {"grayscale": original[2:] + 1, "blur": original[2:]})
    table = acc.table({"grayscale": "colour", "blur": "texture"})
    std = np.std([0.0, 2.0, 4.0])
    assert table.loc[0, "colour_sensitivity"] == pytest.approx(1.0 / std)
    assert table.loc[0, "texture_sensitivity"] == 0.0
    assert np.isnan(table.loc[1, "colour_sensitivity"])               # constant: undefined
    assert np.isnan(table.loc[0, "shape_sensitivity"])                # no shape probe ran


def test_cluster_sensitivity_averages_live_members():
    units = pd.DataFrame({"layer": "c", "channel": [0, 1, 2, 3], "colour_sensitivity": [1.0, 3.0, 9.0, 5.0],
                          "texture_sensitivity": 0.5, "shape_sensitivity": [0.0, 0.0, 0.0, 9.0]})
    clusters = pd.DataFrame({"layer": "c", "channel": [0, 1, 2, 3], "cluster": [0, 0, -1, 1],
                             "dead": [False, False, True, False]})
    table = cluster_sensitivity(units, clusters)
    assert table[["cluster", "size", "colour_sensitivity"]].values.tolist() == [[0, 2, 2.0], [1, 1, 5.0]]
    assert table["dominant_cue"].tolist() == ["colour", "shape"]


# --------------------------------------------------------------------------- end to end


def train(x, y, epochs, batch_size, seed=0):
    return demo_data.train_demo_model(x, y, seed, epochs=epochs, batch_size=batch_size, n_classes=4)


def probe_run(tmp_path, name, model, x, y, class_names, **probe):
    """Save model and images, run extract + probe, return (run directory, verdicts by class name)."""
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import extract
    from pipeline.stages import probe as probe_stage

    root = tmp_path / name
    root.mkdir()
    model.save(root / "model.keras")
    np.savez(root / "images.npz", x=x, y=y, class_names=np.array(class_names))
    cfg = make_config({"out": str(root / "run"), "model": str(root / "model.keras"),
                       "data": {"npz": str(root / "images.npz")}, "probe": probe})
    Runner(cfg, [extract.STAGE, probe_stage.STAGE]).run()
    verdicts = pd.read_parquet(root / "run" / "bias_verdicts.parquet")
    return root / "run", verdicts.set_index("class_name")


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """Trained where colour always gives the class; analysed on random colours."""
    x, y, _ = demo_data.make_shapes(1500, [0, 1], shortcut=1.0)
    model = train(x, y, epochs=6, batch_size=64)
    xa, ya, names = demo_data.make_shapes(400, [0, 3], shortcut=0.25)
    return probe_run(tmp_path_factory.mktemp("colour"), "colour", model, xa, ya, names)


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    """Trained on the same shapes with random colours: shape is the only cue."""
    x, y, _ = demo_data.make_shapes(2000, [0, 1], shortcut=0.25)
    model = train(x, y, epochs=20, batch_size=32)
    xa, ya, names = demo_data.make_shapes(400, [0, 3], shortcut=0.25)
    return probe_run(tmp_path_factory.mktemp("control"), "control", model, xa, ya, names)


@pytest.fixture(scope="module")
def texture_run(tmp_path_factory):
    """Trained where only the fill texture carries the label (shape and colour random)."""
    x, y, _ = demo_data.make_shapes(1500, [0, 1], shortcut=1.0, carrier="texture")
    model = train(x, y, epochs=6, batch_size=64)
    xa, ya, names = demo_data.make_shapes(400, [0, 3], shortcut=1.0, carrier="texture")
    return probe_run(tmp_path_factory.mktemp("texture"), "texture", model, xa, ya, names)


def test_a_colour_shortcut_is_flagged_for_every_class(colour_run):
    _, verdicts = colour_run
    assert (verdicts["verdict"] == "relies on colour").all(), verdicts[["verdict", "reason"]]
    assert (verdicts["effect_ci_low"] > 0.5).all()
    # On random-colour images such a model is right about as often as chance, and the reason says so.
    assert verdicts["reason"].str.contains("near chance").any()


def test_the_random_colour_control_is_not_flagged(control_run):
    _, verdicts = control_run
    assert not (verdicts["verdict"] == "relies on colour").any(), verdicts[["verdict", "reason"]]
    assert (verdicts["verdict"] == "shape-driven").sum() >= 3
    assert (verdicts["colour_ci_high"] < 0.2).all()


def test_a_texture_label_is_flagged_as_texture(texture_run):
    _, verdicts = texture_run
    assert (verdicts.loc[["checks", "dots", "stripes"], "verdict"] == "relies on texture").all(), \
        verdicts[["verdict", "reason"]]
    assert not verdicts["verdict"].isin(["relies on colour", "shape-driven"]).any()


def test_the_stage_writes_its_tables_and_example_images(colour_run):
    run, _ = colour_run
    table = pd.read_parquet(run / "bias.parquet")
    assert list(table.columns) == bias.BIAS_COLUMNS
    assert set(table["probe"]) == set(ProbeConfig().probes) and len(table) == 4 * len(ProbeConfig().probes)
    units = pd.read_parquet(run / "probe_units.parquet")
    assert {"layer", "channel", "colour_sensitivity", "texture_sensitivity", "shape_sensitivity"} <= set(units.columns)
    # The first layer of a colour-shortcut model reacts to recolouring far more than to blur.
    first = units[units["layer"] == "conv1"]
    assert first["colour_sensitivity"].median() > 3 * first["texture_sensitivity"].median()
    index = pd.read_parquet(run / "probes" / "index.parquet")
    assert index["probe"].tolist() == ["original", *ProbeConfig().probes]
    assert all((run / p).is_file() for p in index["path"]) and (run / "probes" / "examples.png").is_file()
    assert not (run / "probe_clusters.parquet").exists()   # the cluster stage has not run


def test_rerunning_the_stage_gives_identical_tables(colour_run):
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import extract, probe

    run, _ = colour_run
    before = [pd.read_parquet(run / f) for f in ("bias.parquet", "bias_verdicts.parquet", "probe_units.parquet")]
    cfg = make_config({"out": str(run), "model": str(run.parent / "model.keras"),
                       "data": {"npz": str(run.parent / "images.npz")}})
    Runner(cfg, [extract.STAGE, probe.STAGE]).run(only="probe")
    after = [pd.read_parquet(run / f) for f in ("bias.parquet", "bias_verdicts.parquet", "probe_units.parquet")]
    for a, b in zip(before, after):
        pd.testing.assert_frame_equal(a, b)


def test_grey_unlabelled_images_still_get_unit_sensitivities(tmp_path):
    import keras

    from pipeline.orchestration.runner import Runner
    from pipeline.stages import extract, probe

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, name="out")])
    model.save(tmp_path / "grey.keras")
    np.savez(tmp_path / "grey.npz", x=np.random.default_rng(0).integers(0, 256, (24, 16, 16), dtype=np.uint8))
    cfg = make_config({"out": str(tmp_path / "run"), "model": str(tmp_path / "grey.keras"),
                       "data": {"npz": str(tmp_path / "grey.npz")}})
    Runner(cfg, [extract.STAGE, probe.STAGE]).run()
    run = tmp_path / "run"
    assert pd.read_parquet(run / "bias.parquet").empty and pd.read_parquet(run / "bias_verdicts.parquet").empty
    units = pd.read_parquet(run / "probe_units.parquet")
    assert len(units) == 4 + 3 and units["colour_sensitivity"].isna().all()
    assert units["shape_sensitivity"].notna().any()
    import json

    summary = json.loads((run / "manifest.json").read_text())["stages"]["probe"]["summary"]
    assert summary["class_metrics"] == "skipped: the images are unlabelled"
    assert summary["not_applicable"] == ["channel_shuffle", "grayscale", "hue_rotation"]
