"""What a user sees at the command line: clear one-line errors, skips, status, layer listings."""
import functools
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import zoo
from zoo import run_cli
from pipeline import load_run
from pipeline.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    zoo.image_folder(root / "images", per_class=3)
    model = zoo.save(zoo.sequential(), root / "model", "keras")
    return root, model


# Every config of this file names its run "cli"; the model, images and other sections come from each test.
config = functools.partial(zoo.write_config, name="cli")


def test_unknown_config_key_is_one_line_naming_it(tmp_path, setup):
    root, model = setup
    path = config(tmp_path, model, root / "images", extrct={"batch_size": 3})
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'extrct' (did you mean 'extract'?)"
    assert "Traceback" not in result.stderr


def test_mistyped_nested_key_and_bad_value(tmp_path, setup, capsys):
    root, model = setup
    assert main(["run", str(config(tmp_path, model, root / "images", extract={"batchsize": 3}))]) == 2
    assert "unknown config key 'extract.batchsize' (did you mean 'batch_size'?)" in capsys.readouterr().err
    assert main(["run", str(config(tmp_path, model, root / "images", extract={"batch_size": 0}))]) == 2
    assert "config key 'extract.batch_size'" in capsys.readouterr().err


def test_missing_model_and_missing_images_are_clear(tmp_path, setup, capsys):
    root, model = setup
    assert main(["run", "--model", str(tmp_path / "nope.keras"), "--images", str(root / "images"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["run", "--model", model, "--images", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err


def test_lambda_model_is_refused_unless_trusted(tmp_path, setup):
    import keras

    root, _ = setup
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inp)
    x = keras.layers.Conv2D(2, 3, name="conv")(x)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    for fmt in ("keras", "h5"):
        path = zoo.save(keras.Model(inp, out), tmp_path / f"lam_{fmt}", fmt)
        refused = run_cli("run", "--model", path, "--images", str(root / "images"), "--out", str(tmp_path / fmt),
                          "--only", "extract")
        assert refused.returncode == 2, refused.stderr
        assert "Lambda layer 'double'" in refused.stderr and "--trust-model" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / fmt / "activations.zarr").exists()
        assert main(["run", "--model", path, "--images", str(root / "images"), "--out",
                     str(tmp_path / fmt), "--trust-model", "--only", "extract"]) == 0
        assert load_run(tmp_path / fmt).activations("conv").shape == (9, 2)


def test_custom_object_is_refused_before_any_code_runs(tmp_path, setup):
    import json
    import zipfile

    root, model = setup
    # Rewrite a saved model's config so one layer claims to come from a user module.
    src, dst = zipfile.ZipFile(model), tmp_path / "custom.keras"
    with zipfile.ZipFile(dst, "w") as out:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                cfg = json.loads(data)
                layer = cfg["config"]["layers"][1]
                layer.update(module="my_project.layers", class_name="MyConv", registered_name="MyConv")
                data = json.dumps(cfg).encode()
            out.writestr(item, data)
    result = run_cli("layers", str(dst))
    assert result.returncode == 2
    assert "custom object 'MyConv' (module 'my_project.layers')" in result.stderr
    assert "--trust-model" in result.stderr


def test_second_run_skips_and_layer_change_reruns(tmp_path, setup, capsys):
    root, model = setup
    path = config(tmp_path, model, root / "images")
    assert main(["run", str(path), "--only", "extract"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--only", "extract"]) == 0
    assert "extract: up to date, skipped" in capsys.readouterr().err

    assert main(["status", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["extract", "done"]

    path = config(tmp_path, model, root / "images", layers=["conv_a"])
    assert main(["status", str(path)]) == 0
    assert "extract   stale    parameters changed" in capsys.readouterr().out
    assert main(["extract", str(path)]) == 0
    assert "extract: running" in capsys.readouterr().err
    assert load_run(tmp_path / "run").layer_names == ["conv_a"]

    assert main(["extract", str(path), "--force"]) == 0
    assert "extract: running" in capsys.readouterr().err
    assert main(["run", str(path), "--only", "extract"]) == 0
    assert "extract: up to date, skipped" in capsys.readouterr().err



def test_status_reports_changed_inputs(tmp_path, setup, capsys):
    root, model = setup
    images = tmp_path / "imgs"
    zoo.image_folder(images, per_class=2)
    path = config(tmp_path, model, images)
    assert main(["run", str(path), "--only", "extract"]) == 0
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(images / "a" / "new.png")
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0
    assert "extract   stale    input 'data' changed" in capsys.readouterr().out


def test_status_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_layers_lists_names_types_shapes_and_verdicts(tmp_path):
    path = zoo.save(zoo.nested(), tmp_path / "nested", "keras")
    result = run_cli("layers", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model nested: input (16, 16, 3)")
    row = next(l for l in lines if l.startswith("block/inner_conv"))
    assert "Conv2D" in row and "(14, 14, 5)" in row and "yes (auto:" in row
    assert "no: input layer" in next(l for l in lines if l.startswith("input_layer"))


def bad_files(folder):
    """One file of every broken kind users have sent us; returns {name: expected reason fragment}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    (folder / "readme.txt").write_text("not an image")
    return {"empty.png": "empty file", "notes.png": "not a readable image", "cut.jpg": "truncated",
            "bomb.png": "decompression bomb", "dangling.png": "cannot read file",
            "readme.txt": "not an image file"}


def test_bad_files_are_skipped_with_reasons_and_good_ones_used(tmp_path, setup):
    root, model = setup
    images = tmp_path / "imgs"
    good = zoo.image_folder(images, per_class=3)
    expected = bad_files(images / "b")
    path = config(tmp_path, model, images, data={"images": str(images), "max_pixels": 50_000_000})
    result = run_cli("run", str(path), "--only", "extract")
    assert result.returncode == 0, result.stderr
    run = load_run(tmp_path / "run")
    assert sorted(run.dataset.path) == sorted(str(p) for p in good)
    skipped = {os.path.basename(p): r for p, r in zip(run.skipped.path, run.skipped.reason)}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
    assert "6 input(s) skipped" in result.stderr
    assert run.activations("conv_a").shape == (len(good), 4)


def test_all_files_bad_is_a_clear_error(tmp_path, setup):
    root, model = setup
    images = tmp_path / "imgs"
    (images / "x").mkdir(parents=True)
    (images / "x" / "a.png").write_bytes(b"")
    result = run_cli("run", "--model", model, "--images", str(images), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "no usable images" in result.stderr
    assert pd.read_csv(tmp_path / "run" / "skipped.csv").reason.tolist() == ["empty file (0 bytes)"]


def test_help_on_every_command():
    for command in ("demo", "run", "extract", "status", "layers"):
        assert run_cli(command, "--help").returncode == 0


@pytest.mark.parametrize("flag, value, key", [("--limit", "0", "data.limit"), ("--seed", "-1", "seed")])
def test_out_of_range_flags_are_one_line_errors_before_any_work(tmp_path, setup, capsys, flag, value, key):
    root, model = setup
    assert main(["run", "--model", str(model), "--images", str(root / "images"), "--out", str(tmp_path / "r"),
                 flag, value]) == 2
    assert f"config key '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("section, values", [("cluster", {"n_clusters": 1}), ("extract", {"batch_size": 10**9})])
def test_out_of_range_config_values_are_refused(tmp_path, setup, capsys, section, values):
    root, model = setup
    assert main(["run", str(config(tmp_path, model, root / "images", **{section: values}))]) == 2
    key = next(iter(values))
    assert f"config key '{section}.{key}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
