"""Killing extraction at any point loses nothing: a rerun finishes with bit-identical arrays."""
import json
import signal
import subprocess
import time

import numpy as np

import zoo
from pipeline import load_run


def start(config):
    return zoo.start_cli("extract", config, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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
    model = zoo.save(zoo.slow_model(filters=48), tmp_path / "m", "keras")  # a kill lands mid-run

    def config(name):
        return zoo.write_config(tmp_path, model, tmp_path / "images", out=name, file=f"{name}.yaml",
                                extract={"batch_size": 4, "chunk_rows": 4, "spatial_samples": 2})

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
