"""Killing extraction at any point loses nothing: a rerun finishes with bit-identical arrays."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

import zoo
from pipeline import load_run


def heavy_model():
    """Slow enough per batch (a few ms) that a kill lands mid-run."""
    import keras

    inp = keras.Input((48, 48, 3))
    x = keras.layers.Conv2D(48, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(48, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x))


def start(config):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
    return subprocess.Popen([sys.executable, "-m", "pipeline", "extract", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def done_batches(run_dir):
    try:
        return len(json.loads((run_dir / "extract.progress.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_after(config, run_dir, batches, timeout=120):
    """Start a run and SIGKILL it once ``batches`` batches are recorded; True if it was killed mid-run."""
    proc = start(config)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if done_batches(run_dir) >= batches:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def test_sigkill_during_extract_then_rerun_gives_identical_arrays(tmp_path):
    zoo.image_folder(tmp_path / "images", per_class=40, size=48)
    model = zoo.save(heavy_model(), tmp_path / "m", "keras")

    def config(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"out": str(tmp_path / name), "model": model,
                                        "data": {"images": str(tmp_path / "images")},
                                        "extract": {"batch_size": 4, "chunk_rows": 4,
                                                    "spatial_samples": 2}}))
        return path

    clean = config("clean")
    assert start(clean).wait() == 0

    interrupted = config("interrupted")
    kills = [kill_after(interrupted, tmp_path / "interrupted", n) for n in (2, 9, 17)]
    assert any(kills), "the run finished before any kill: make the model slower"
    assert not (tmp_path / "interrupted" / "activations.zarr").exists()
    assert 0 < done_batches(tmp_path / "interrupted") < 30
    proc = start(interrupted)
    assert proc.wait() == 0, proc.stderr.read().decode()

    a, b = load_run(tmp_path / "clean"), load_run(tmp_path / "interrupted")
    assert a.dataset.equals(b.dataset)
    for key in ("c1/mean", "c1/max", "c2/mean", "c2/max", "c1/spatial", "c2/spatial_pos", "out/value", "logits"):
        x, y = a.arrays[key][:], b.arrays[key][:]
        assert x.dtype == y.dtype and np.array_equal(x, y), key
    assert not (tmp_path / "interrupted" / "extract.progress.json").exists()
