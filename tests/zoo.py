"""Tiny models, image folders, config files and CLI runs built in code, shared by the tests.

The benchmarks under ``tests/benchmarks/`` import this module too (they put ``tests/`` on
``sys.path``), so nothing here needs pytest.
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def _keras():
    import keras

    return keras


def sequential(size=16, channels=3, classes=3):
    k = _keras()
    return k.Sequential([
        k.Input((size, size, channels)),
        k.layers.Conv2D(4, 3, activation="relu", name="conv_a"),
        k.layers.MaxPooling2D(name="pool"),
        k.layers.Conv2D(6, 3, activation="relu", name="conv_b"),
        k.layers.GlobalAveragePooling2D(name="gap"),
        k.layers.Dense(classes, activation="softmax", name="out"),
    ], name="seq")


def branched(size=16, channels=3, classes=3):
    k = _keras()
    inp = k.Input((size, size, channels))
    a = k.layers.Conv2D(4, 3, padding="same", activation="relu", name="left")(inp)
    b = k.layers.Conv2D(4, 1, padding="same", activation="relu", name="right")(inp)
    x = k.layers.Concatenate(name="merge")([a, b])
    x = k.layers.Conv2D(5, 3, activation="relu", name="conv_b")(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, k.layers.Dense(classes, name="out")(x), name="branched")


def nested(size=16, channels=3, classes=3):
    k = _keras()
    inner_in = k.Input((size, size, 4))
    y = k.layers.Conv2D(5, 3, activation="relu", name="inner_conv")(inner_in)
    inner = k.Model(inner_in, y, name="block")
    inp = k.Input((size, size, channels))
    x = k.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inp)
    x = inner(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, k.layers.Dense(classes, activation="softmax", name="out")(x), name="nested")


def batchnorm(size=16, channels=3, classes=3):
    k = _keras()
    inp = k.Input((size, size, channels))
    x = k.layers.Conv2D(4, 3, use_bias=False, name="conv_a")(inp)
    x = k.layers.BatchNormalization(name="bn")(x)
    x = k.layers.ReLU(name="relu")(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, k.layers.Dense(classes, name="out")(x), name="bn")


def depthwise(size=16, channels=3, classes=3):
    k = _keras()
    inp = k.Input((size, size, channels))
    x = k.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw")(inp)
    x = k.layers.Conv2D(4, 1, activation="relu", name="pw")(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, k.layers.Dense(classes, name="out")(x), name="dw")


def slow_model(filters=32, size=48, classes=3):
    """Two ``filters``-wide 3x3 convolutions on ``size`` px: a few ms per batch of 4 on CPU.

    Slow enough that a SIGKILL sent after a few recorded batches (or shards) lands while the
    run is still going; the tests that kill runs assert that it did. Layers ``c1``, ``c2``, ``out``.

    Parameters
    ----------
    filters : int, default=32
        Channels of both convolutions; more is slower (the resume test uses 48).
    size : int, default=48
        Input height and width (RGB).
    classes : int, default=3
        Outputs of the dense head.

    Returns
    -------
    keras.Model
    """
    k = _keras()
    inp = k.Input((size, size, 3))
    x = k.layers.Conv2D(filters, 3, padding="same", activation="relu", name="c1")(inp)
    x = k.layers.Conv2D(filters, 3, padding="same", activation="relu", name="c2")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inp, k.layers.Dense(classes, name="out")(x))


def mini_xception(size=64, classes=7, width=(16, 32, 64, 128), l2=0.01):
    """A mini-Xception face-emotion classifier (Arriaga et al. 2017) as published: grey input.

    A stem of two 8-filter 3x3 convolutions with BatchNorm, then one residual module per entry of
    ``width``: two separable 3x3 convolutions with BatchNorm, a 3x3/2 max pool, added to a strided
    1x1 convolution of the module's input. A 3x3 convolution to ``classes`` maps, global average
    pooling and a softmax end it. The last module's separable convolutions have 128 channels
    (``sep4b``, at ``size / 8`` px); its sum is ``add4``. Inputs are in [-1, 1].

    Parameters
    ----------
    size : int, default=64
        Input height and width (one channel).
    classes : int, default=7
    width : tuple of int
        Channels of each residual module.
    l2 : float
        L2 weight regularisation of the convolutions, as published.

    Returns
    -------
    keras.Model
    """
    k = _keras()
    reg = k.regularizers.l2(l2)
    inp = k.Input((size, size, 1))
    x = inp
    for i in (1, 2):
        x = k.layers.Conv2D(8, 3, use_bias=False, kernel_regularizer=reg, name=f"stem{i}")(x)
        x = k.layers.BatchNormalization(name=f"stem{i}_bn")(x)
        x = k.layers.Activation("relu", name=f"stem{i}_relu")(x)
    for m, filters in enumerate(width, start=1):
        residual = k.layers.Conv2D(filters, 1, strides=2, padding="same", use_bias=False, name=f"res{m}")(x)
        residual = k.layers.BatchNormalization(name=f"res{m}_bn")(residual)
        x = k.layers.SeparableConv2D(filters, 3, padding="same", depthwise_regularizer=reg,
                                     pointwise_regularizer=reg, use_bias=False, name=f"sep{m}a")(x)
        x = k.layers.BatchNormalization(name=f"sep{m}a_bn")(x)
        x = k.layers.Activation("relu", name=f"sep{m}a_relu")(x)
        x = k.layers.SeparableConv2D(filters, 3, padding="same", depthwise_regularizer=reg,
                                     pointwise_regularizer=reg, use_bias=False, name=f"sep{m}b")(x)
        x = k.layers.BatchNormalization(name=f"sep{m}b_bn")(x)
        x = k.layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{m}")(x)
        x = k.layers.Add(name=f"add{m}")([x, residual])
    x = k.layers.Conv2D(classes, 3, padding="same", name="head")(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, k.layers.Activation("softmax", name="predictions")(x), name="mini_xception")


ARCHITECTURES = {"sequential": sequential, "branched": branched, "nested": nested,
                 "batchnorm": batchnorm, "depthwise": depthwise}


def randomize_batchnorm(model, seed=0):
    """Give BatchNorm layers non-trivial statistics so inference mode is actually tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * 2, beta + 0.5, rng.normal(size=mean.shape).astype("float32"),
                               var + 1.0])
    return model


def save(model, path, fmt):
    """Save in ``keras``, ``h5`` or ``savedmodel`` format; returns the path."""
    path = str(path)
    if fmt == "keras":
        model.save(path + ".keras")
        return path + ".keras"
    if fmt == "h5":
        model.save(path + ".h5")
        return path + ".h5"
    model.export(path, verbose=False)
    return path


def image_folder(root, classes=("a", "b", "c"), per_class=4, size=20, seed=0):
    """Class sub-folders of random PNGs; each class has its own mean brightness."""
    rng = np.random.default_rng(seed)
    paths = []
    for ci, name in enumerate(classes):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(60 + 60 * ci, 30, size=(size, size, 3)), 0, 255).astype("uint8")
            p = os.path.join(folder, f"{i:03d}.png")
            Image.fromarray(arr).save(p)
            paths.append(p)
    return paths


def peak_bytes(fn):
    """Peak Python-heap allocation while ``fn()`` runs (tracemalloc; numpy arrays are counted)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def write_config(folder, model, images=None, npz=None, *, out="run", file="c.yaml", report_out=None,
                 **sections):
    """Write a run's YAML config into ``folder``; returns its path.

    Parameters
    ----------
    folder : path-like
        Where the file goes; ``out`` is relative to it.
    model : path-like
        The model file or SavedModel folder (written as a string).
    images, npz : path-like, optional
        ``data.images`` / ``data.npz``; neither given and no ``data`` section: no ``data`` key.
    out : str or path-like or None, default="run"
        The run directory, ``folder / out`` (an absolute ``out`` stays as it is); ``None`` leaves
        the key out, for tests of configs without one.
    file : str, default="c.yaml"
        File name inside ``folder``.
    report_out : str, optional
        ``report.out`` as ``folder / report_out``, merged under a ``report`` section (whose own
        ``out`` wins): the report beside the run without spelling the folder out in each test.
    **sections
        Any other top-level keys (``name``, ``layers``, ``extract``, ``report``, ...), written as
        given. A ``data`` section replaces the one built from ``images``/``npz`` as a whole, as
        ``dict.update`` would: tests pass it to write ``data`` exactly as they mean it.

    Returns
    -------
    pathlib.Path
        ``folder / file``.
    """
    folder = Path(folder)
    cfg = {"model": str(model)}
    if out is not None:
        cfg["out"] = str(folder / out)
    data = {key: str(value) for key, value in (("images", images), ("npz", npz)) if value is not None}
    if data:
        cfg["data"] = data
    cfg.update(sections)
    if report_out is not None:
        cfg["report"] = {"out": str(folder / report_out), **sections.get("report", {})}
    path = folder / file
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(**extra):
    """The environment of a ``python -m pipeline`` child: this one, oneDNN off, progress not forced.

    ``TF_ENABLE_ONEDNN_OPTS=0`` because oneDNN's gradient of a strided 1x1 convolution can crash
    on CPU. ``PIPELINE_PROGRESS=0`` is no mode, so the child picks by its stderr (a pipe: plain
    lines) whatever the caller's shell exports; a test's expected stderr must not depend on it.

    Parameters
    ----------
    **extra : str
        Further variables, overriding these.

    Returns
    -------
    dict
    """
    return dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", PIPELINE_PROGRESS="0", **extra)


def cli_command(*args):
    """``[python, -m, pipeline, *args]`` with every argument as a string."""
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def run_cli(*args, cwd=None, timeout=600):
    """Run ``python -m pipeline ARGS`` in a fresh process, as a user would, and wait for it.

    A fresh process is the point: start-up, exit codes and what reaches stderr are what is tested.

    Parameters
    ----------
    *args : str or path-like
        Command-line arguments after ``python -m pipeline``.
    cwd : path-like, optional
        Working directory of the child (default: this process's).
    timeout : float, default=600
        Seconds before ``subprocess.TimeoutExpired``: a hung child fails the test, never the suite.

    Returns
    -------
    subprocess.CompletedProcess
        With ``returncode`` and text ``stdout`` / ``stderr``.
    """
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), cwd=cwd,
                          timeout=timeout)


def start_cli(*args, **popen):
    """Start ``python -m pipeline ARGS`` without waiting, for tests that kill or race runs.

    Parameters
    ----------
    *args : str or path-like
        Command-line arguments after ``python -m pipeline``.
    **popen
        Passed to ``subprocess.Popen`` (``stdout``, ``stderr``, ``text``, ...).

    Returns
    -------
    subprocess.Popen
    """
    return subprocess.Popen(cli_command(*args), env=cli_env(), **popen)
