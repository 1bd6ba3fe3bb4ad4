"""Tiny models and image folders built in code, shared by the tests."""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
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
