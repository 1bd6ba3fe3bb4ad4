"""Synthetic shapes dataset and small CNN for the demo, with a planted shortcut.

The demo classifier is trained on images where the class (the shape) is usually drawn in its
own colour, so it learns to rely partly on colour instead of shape. The analysis split draws
colours at random, so colour carries no information there and the later stages can expose the
shortcut (accuracy drops, neurons group by colour rather than by class).

A second carrier, ``carrier="texture"``, plants the label in a fill texture instead while shape
and colour are random, for tests of "relies on texture" findings.

TensorFlow/Keras are imported inside the functions that need them, so importing this module is
cheap.

Examples
--------
>>> x, y, names = make_shapes(8, seed=0)
>>> x.shape, x.dtype, y.dtype, names[0]
((8, 32, 32, 3), dtype('uint8'), dtype('int64'), 'circle')
"""
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

#: Bump whenever the generator, the model or the training recipe changes: it invalidates caches.
DEMO_VERSION = 2

# Alphabetical, like every folder-based labelling (ours and Keras' image_dataset_from_directory):
# the model's output k must be the k-th class folder in sorted order.
CLASS_NAMES = ("circle", "cross", "square", "triangle")
TEXTURE_NAMES = ("checks", "dots", "plain", "stripes")
COLOUR_NAMES = ("red", "green", "blue", "yellow")
#: The colour each class mostly has in training (same order as ``CLASS_NAMES``).
PALETTE = np.array(
    [(220, 40, 40), (40, 200, 60), (50, 90, 230), (230, 210, 40)], dtype=np.uint8
)
CARRIERS = ("colour", "texture")

# Training set shortcut strength: colour alone explains 90 % of labels, shape explains all.
TRAIN_SHORTCUT = 0.9
DEFAULT_EPOCHS = 20

# Distinct seed streams for the splits, so train, held-out and analysis images never coincide.
_TRAIN_STREAM, _HELDOUT_STREAM, _ANALYSIS_STREAM = 1, 2, 3


# --------------------------------------------------------------------------- generator


def _circle(u, v):
    return np.sqrt(u * u + v * v) - 0.85


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) - 0.75


_TRIANGLE_NORMALS = [(np.cos(a), np.sin(a)) for a in np.deg2rad([90.0, 210.0, 330.0])]


def _triangle(u, v):
    # Equilateral, edges 0.62 from the centre (vertices at 1.24).
    return np.max([u * nx + v * ny for nx, ny in _TRIANGLE_NORMALS], axis=0) - 0.62


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.32, av - 1.0), np.maximum(av - 0.32, au - 1.0))


# Approximate signed distance to each outline, in units of the radius, negative inside. Exact
# distances are not needed: they only feed a one-pixel anti-aliasing ramp. Sizes are chosen so
# all four areas are about 2.0-2.3 squared radii: size is not a class cue.
_OUTLINES = {"circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross}


def _other(rng, label, n_options):
    """A uniformly random option different from ``label`` (elementwise)."""
    return (label + rng.integers(1, n_options, size=label.shape)) % n_options


def _with_shortcut(rng, label, shortcut, n_options):
    """``label`` with probability ``shortcut``, otherwise a random *other* option.

    With ``shortcut == 1 / n_options`` every option is equally likely whatever the label, so the
    result carries no information about it.
    """
    keep = rng.random(label.shape) < shortcut
    return np.where(keep, label, _other(rng, label, n_options))


def sample_factors(n, rng, shortcut=TRAIN_SHORTCUT, carrier="colour"):
    """Draw the latent factors of ``n`` images: label, shape, colour, texture and placement.

    Parameters
    ----------
    n : int
        Number of images.
    rng : numpy.random.Generator
        Source of randomness.
    shortcut : float
        Probability that the carrier (colour or texture) matches the label.
    carrier : {"colour", "texture"}
        ``"colour"``: label = shape, colour agrees with the label with probability ``shortcut``,
        texture plain. ``"texture"``: shape and colour random, texture agrees with the label with
        probability ``shortcut``.

    Returns
    -------
    dict of numpy.ndarray
        ``label``, ``shape``, ``colour``, ``texture`` (int64, shape (n,)); ``centre`` (n, 2) and
        ``radius``, ``angle`` (n,) as fractions of the image size / radians.
    """
    if carrier not in CARRIERS:
        raise ValueError(f"carrier must be one of {CARRIERS}, got {carrier!r}")
    if not 0.0 <= shortcut <= 1.0:
        raise ValueError(f"shortcut must be in [0, 1], got {shortcut}")
    k = len(CLASS_NAMES)
    label = rng.permutation(np.arange(n, dtype=np.int64) % k)
    if carrier == "colour":
        shape, colour = label, _with_shortcut(rng, label, shortcut, k)
        texture = np.zeros(n, dtype=np.int64)
    else:
        shape, colour = rng.integers(0, k, n), rng.integers(0, k, n)
        texture = _with_shortcut(rng, label, shortcut, len(TEXTURE_NAMES))
    radius = rng.uniform(0.22, 0.38, n)
    # A triangle vertex reaches 1.24 radii from the centre: keep every shape inside the frame.
    margin = 1.25 * radius
    centre = rng.uniform(margin[:, None], 1.0 - margin[:, None], (n, 2))
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    return dict(label=label, shape=shape.astype(np.int64), colour=colour.astype(np.int64),
                texture=texture.astype(np.int64), centre=centre, radius=radius, angle=angle)


def _coverage(factors, size):
    """Anti-aliased shape coverage in [0, 1], shape (n, size, size)."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    dx = grid[None, None, :] - factors["centre"][:, 0, None, None].astype(np.float32)
    dy = grid[None, :, None] - factors["centre"][:, 1, None, None].astype(np.float32)
    cos = np.cos(factors["angle"]).astype(np.float32)[:, None, None]
    sin = np.sin(factors["angle"]).astype(np.float32)[:, None, None]
    radius = factors["radius"].astype(np.float32)[:, None, None]
    u, v = (dx * cos + dy * sin) / radius, (dy * cos - dx * sin) / radius
    coverage = np.empty(u.shape, dtype=np.float32)
    for k, name in enumerate(CLASS_NAMES):
        sel = factors["shape"] == k
        if sel.any():
            distance = _OUTLINES[name](u[sel], v[sel])
            coverage[sel] = np.clip(0.5 - distance * radius[sel] * size, 0.0, 1.0)
    return coverage


def _texture_gain(texture, size, rng):
    """Brightness multiplier of the fill, shape (n, size, size).

    Axis-aligned 2-pixel patterns with a random phase (and stripe direction) so that the
    texture, not its position, is what identifies it.
    """
    n = len(texture)
    yy, xx = np.mgrid[0:size, 0:size]
    off = rng.integers(0, 4, (n, 2))
    xs = (xx[None] + off[:, 0, None, None]) // 2 % 2
    ys = (yy[None] + off[:, 1, None, None]) // 2 % 2
    vertical = rng.random(n)[:, None, None] < 0.5
    patterns = np.stack([           # in TEXTURE_NAMES order
        xs ^ ys,                    # checks
        xs * ys,                    # dots
        np.ones_like(xs),           # plain
        np.where(vertical, xs, ys),  # stripes
    ])
    on = patterns[texture, np.arange(n)]
    # Dark phases at a third of the brightness keep the pattern visible but the shape whole.
    return np.where(on == 1, 1.0, 0.35).astype(np.float32)


def render_factors(factors, size, rng):
    """Render images from :func:`sample_factors`.

    Parameters
    ----------
    factors : dict of numpy.ndarray
        As returned by :func:`sample_factors`.
    size : int
        Image height and width in pixels.
    rng : numpy.random.Generator
        Source of noise and colour jitter.

    Returns
    -------
    numpy.ndarray
        uint8 images, shape (n, size, size, 3).
    """
    n = len(factors["label"])
    background = rng.uniform(10.0, 45.0, (n, 1, 1, 1)).astype(np.float32)
    fill = PALETTE[factors["colour"]] + rng.normal(0.0, 12.0, (n, 3))
    fill = fill.astype(np.float32)[:, None, None, :]
    fill = fill * _texture_gain(factors["texture"], size, rng)[..., None]
    alpha = _coverage(factors, size)[..., None]
    # float32 noise: drawing it is most of the cost of a large batch.
    noise = rng.standard_normal((n, size, size, 3), dtype=np.float32) * np.float32(6.0)
    images = alpha * fill + (1.0 - alpha) * background + noise
    return np.clip(np.rint(images, out=images), 0, 255, out=images).astype(np.uint8)


def make_shapes(n, seed, shortcut=TRAIN_SHORTCUT, size=32, carrier="colour"):
    """Generate a balanced, labelled shapes dataset with a planted shortcut.

    Parameters
    ----------
    n : int
        Number of images; classes are balanced (counts differ by at most one).
    seed : int or sequence of int
        Anything :func:`numpy.random.default_rng` accepts; the output is a function of it.
    shortcut : float
        Probability that the carrier agrees with the label. ``1 / len(CLASS_NAMES)`` makes the
        carrier uninformative (each value equally likely whatever the label).
    size : int
        Image height and width in pixels.
    carrier : {"colour", "texture"}
        What carries the shortcut. ``"colour"``: the label is the shape, filled with the
        class's ``PALETTE`` colour with probability ``shortcut``, else another palette colour.
        ``"texture"``: the label is carried only by a fill texture (``TEXTURE_NAMES``) with
        probability ``shortcut``; shape and colour are random, so for the other images the
        label is not visible at all (label noise).

    Returns
    -------
    x : numpy.ndarray
        uint8, shape (n, size, size, 3).
    y : numpy.ndarray
        int64 labels, shape (n,).
    class_names : tuple of str
        ``CLASS_NAMES`` for ``carrier="colour"``, ``TEXTURE_NAMES`` for ``"texture"``.
    """
    rng = np.random.default_rng(seed)
    factors = sample_factors(n, rng, shortcut, carrier)
    x = render_factors(factors, size, rng)
    names = CLASS_NAMES if carrier == "colour" else TEXTURE_NAMES
    return x, factors["label"], names


def _make_factors_and_images(n, seed, shortcut, size, carrier="colour"):
    """Like :func:`make_shapes` but also returns the factors (same images for the same seed)."""
    rng = np.random.default_rng(seed)
    factors = sample_factors(n, rng, shortcut, carrier)
    return factors, render_factors(factors, size, rng)


# --------------------------------------------------------------------------- model


def _keras():
    from pipeline.backend.tf import tensorflow

    tensorflow()  # with its environment set first (the demo takes gradients: DESIGN.md on oneDNN)
    import keras

    return keras


def build_demo_model(input_shape=(32, 32, 3), n_classes=len(CLASS_NAMES)):
    """A small functional CNN with named layers; expects floats in [0, 1].

    Rescaling is not part of the model: the pipeline's ``scale: 1/255`` preprocessing does it.

    Parameters
    ----------
    input_shape : tuple of int
        (height, width, channels).
    n_classes : int
        Number of output classes.

    Returns
    -------
    keras.Model
        Layers ``conv1, pool1, conv2, pool2, conv3, gap, logits, probs``; outputs softmax
        probabilities.
    """
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    h = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = layers.MaxPooling2D(name="pool1")(h)
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(h)
    h = layers.MaxPooling2D(name="pool2")(h)
    h = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    logits = layers.Dense(n_classes, name="logits")(h)
    probs = layers.Activation("softmax", name="probs")(logits)
    return keras.Model(inputs, probs, name="demo_shapes_cnn")


def train_demo_model(x, y, seed, epochs=DEFAULT_EPOCHS, batch_size=64, learning_rate=3e-3,
                     n_classes=None, log=None):
    """Build and train the demo CNN on uint8 images (scaled by 1/255 here).

    Parameters
    ----------
    x : numpy.ndarray
        uint8 images (n, h, w, c).
    y : numpy.ndarray
        Integer labels (n,).
    seed : int
        Seeds weight initialisation and batch shuffling (``keras.utils.set_random_seed``).
    epochs, batch_size : int
        Training schedule; the defaults take about a minute for 4000 32×32 images on 2 cores.
    learning_rate : float
        Adam step size; 3e-3 learns shape within the minute, 1e-3 barely gets past colour.
    n_classes : int, optional
        Output size; by default ``max(y) + 1``.
    log : callable, optional
        Called with one progress string per epoch.

    Returns
    -------
    keras.Model
        The trained model (compiled with Adam and sparse categorical cross-entropy).
    """
    keras = _keras()
    keras.utils.set_random_seed(seed)
    # Multi-threaded CPU kernels sum in varying order; deterministic ops make the same seed give
    # the same weights on every machine run, as the demo's reproducibility promise needs.
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    n_classes = n_classes or int(np.max(y)) + 1
    model = build_demo_model(x.shape[1:], n_classes)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = [] if log is None else [_epoch_logger(keras, epochs, log)]
    model.fit(x.astype(np.float32) / 255.0, np.asarray(y), epochs=epochs, batch_size=batch_size,
              shuffle=True, verbose=0, callbacks=callbacks)
    return model


def _epoch_logger(keras, epochs, log):
    def on_epoch_end(epoch, logs):
        log(f"epoch {epoch + 1}/{epochs}: loss {logs['loss']:.3f}, "
            f"accuracy {logs['accuracy']:.3f}")

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def accuracy(model, x, y, batch_size=256):
    """Fraction of uint8 images ``x`` (scaled by 1/255) that ``model`` assigns to label ``y``."""
    probs = model.predict(x.astype(np.float32) / 255.0, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(y)))


# --------------------------------------------------------------------------- cached assets


def _cache_key(params):
    """Short hash of the generator/training parameters, the demo version and the Keras version."""
    # importlib.metadata reads the installed version without importing Keras (seconds saved
    # on every cache hit).
    payload = dict(params, demo_version=DEMO_VERSION,
                   keras=importlib.metadata.version("keras"))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _write_images(root, x, y, class_names):
    """Write ``<root>/<class_name>/<index:05d>.png``; return the relative paths."""
    from PIL import Image

    paths = []
    for index, (image, label) in enumerate(zip(x, y)):
        path = Path(class_names[label]) / f"{index:05d}.png"
        (root / path.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / path)
        paths.append(path.as_posix())
    return paths


def _write_factors(path, image_paths, factors):
    """One CSV row per analysis image: what it shows, so a report can test for the shortcut."""
    import pandas as pd

    table = pd.DataFrame({
        "index": np.arange(len(image_paths)),
        "path": image_paths,
        "label": factors["label"],
        "class_name": np.asarray(CLASS_NAMES)[factors["label"]],
        "shape": np.asarray(CLASS_NAMES)[factors["shape"]],
        "colour": np.asarray(COLOUR_NAMES)[factors["colour"]],
        "colour_matches_class": factors["colour"] == factors["label"],
    })
    table.to_csv(path, index=False)


def _asset_paths(root):
    return {"model": root / "model.keras", "images": root / "images",
            "factors": root / "factors.csv", "info": root / "demo.json"}


def _build_assets(root, params, log):
    """Generate data, train, evaluate and write everything under ``root`` (a fresh directory)."""
    size, seed = params["size"], params["seed"]
    log(f"generating {params['n_train']} training images")
    x, y, _ = make_shapes(params["n_train"], [seed, _TRAIN_STREAM], params["train_shortcut"], size)
    log("training demo model (about a minute)…")
    model = train_demo_model(x, y, seed, epochs=params["epochs"], n_classes=len(CLASS_NAMES),
                             log=log)
    paths = _asset_paths(root)
    model.save(paths["model"])
    x_held, y_held, _ = make_shapes(params["n_analysis"], [seed, _HELDOUT_STREAM],
                                    params["train_shortcut"], size)
    factors, x_ana = _make_factors_and_images(params["n_analysis"], [seed, _ANALYSIS_STREAM],
                                              params["analysis_shortcut"], size)
    log(f"writing {params['n_analysis']} analysis images")
    image_paths = _write_images(paths["images"], x_ana, factors["label"], CLASS_NAMES)
    _write_factors(paths["factors"], image_paths, factors)
    info = dict(params, class_names=list(CLASS_NAMES),
                accuracy_heldout_shortcut=accuracy(model, x_held, y_held),
                accuracy_analysis=accuracy(model, x_ana, factors["label"]))
    paths["info"].write_text(json.dumps(info, indent=2))
    log(f"held-out accuracy {info['accuracy_heldout_shortcut']:.3f} with colour shortcut, "
        f"{info['accuracy_analysis']:.3f} with random colours")


def ensure_demo_assets(data_dir, seed=0, n_train=4000, n_analysis=800, epochs=DEFAULT_EPOCHS,
                       size=32, log=None):
    """Return the demo model and analysis images, generating and training them on first use.

    Assets live in ``<data_dir>/<hash>/`` where the hash covers every parameter,
    ``DEMO_VERSION`` and the installed Keras version; a second call with the same arguments
    returns at once. The directory is built under a temporary name and renamed when complete,
    so an interrupted run never leaves a cache that looks finished.

    Parameters
    ----------
    data_dir : str or pathlib.Path
        Parent folder of the cache (e.g. ``data/demo``).
    seed : int
        Seeds the data and the training.
    n_train, n_analysis : int
        Number of training images (colour shortcut ``TRAIN_SHORTCUT``) and of analysis images
        (random colours: shortcut ``1 / len(CLASS_NAMES)``).
    epochs : int
        Training epochs.
    size : int
        Image height and width.
    log : callable, optional
        Receives progress messages (e.g. ``print``); silent by default.

    Returns
    -------
    dict of pathlib.Path
        ``model`` (``.keras`` file), ``images`` (``<images>/<class_name>/<index:05d>.png``),
        ``factors`` (CSV: per analysis image its class, shape and fill colour) and ``info``
        (JSON: parameters and held-out accuracies with and without the colour shortcut).
    """
    log = log or (lambda message: None)
    params = dict(seed=seed, n_train=n_train, n_analysis=n_analysis, epochs=epochs, size=size,
                  train_shortcut=TRAIN_SHORTCUT, analysis_shortcut=1.0 / len(CLASS_NAMES))
    data_dir = Path(data_dir)
    target = data_dir / _cache_key(params)
    if target.is_dir():
        return _asset_paths(target)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=data_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published cache should be readable
    try:
        _build_assets(tmp, params, log)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"demo assets ready in {target}")
    return _asset_paths(target)


def _publish(tmp, target):
    """Rename ``tmp`` to ``target``; if another process got there first, keep its copy."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
