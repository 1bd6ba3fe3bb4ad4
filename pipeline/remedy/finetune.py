"""The fine-tuning loop: deterministic, seeded, on counterfactually augmented images.

Same model file, same images, same config and seed -> bit-identical weights: Keras' seeds
(``keras.utils.set_random_seed``), TensorFlow's deterministic ops, the batch order and every
augmentation are functions of the seed, and the model runs without XLA.

TensorFlow/Keras are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UserError


@dataclass
class FineTuneResult:
    """What :func:`finetune` did.

    Attributes
    ----------
    trained : list of str
        The layers whose weights were trained.
    history : list of dict
        Per epoch: ``epoch``, ``loss``, ``accuracy`` (on the augmented training images), ``augmented``
        (how many of them were counterfactuals), ``seconds``.
    from_logits : bool
        Whether the loss read the model's output as logits (False: it ends in a softmax).
    """

    trained: list
    history: list = field(default_factory=list)
    from_logits: bool = True

    @property
    def seconds(self) -> float:
        return float(sum(h["seconds"] for h in self.history))


def _layers_with_weights(model):
    return [layer for layer in model.layers if layer.weights]


def select_layers(model, spec) -> list[str]:
    """The top-level layers (with weights) that ``spec`` trains.

    Parameters
    ----------
    model : keras.Model
    spec : "all" or "last:K" or list of str
        Every layer with weights; the last K of them; or the names / glob patterns given (a nested
        sub-model is one layer here: its name trains all of it).

    Returns
    -------
    list of str

    Raises
    ------
    UserError
        A pattern matches no layer with weights.
    """
    candidates = [layer.name for layer in _layers_with_weights(model)]
    if spec == "all":
        return candidates
    if isinstance(spec, str) and spec.startswith("last:"):
        return candidates[-int(spec[5:]):]
    chosen = []
    for pattern in spec:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UserError(f"config key 'remedy.layers': '{pattern}' matches no layer with weights "
                            f"(layers with weights: {', '.join(candidates)})")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in candidates if n in chosen]


def _all_layers(model):
    """Every layer, nested sub-models' layers included (public ``layers`` attributes only)."""
    for layer in model.layers:
        yield layer
        if getattr(layer, "layers", None):
            yield from _all_layers(layer)


def _freeze(model, names, freeze_batchnorm):
    """Set trainable flags for fine-tuning; return the old flags to restore (``{layer: bool}``)."""
    old = {id(layer): (layer, layer.trainable) for layer in _all_layers(model)}
    for layer in model.layers:
        layer.trainable = layer.name in names
    if freeze_batchnorm:
        for layer in _all_layers(model):
            if type(layer).__name__ in ("BatchNormalization", "SyncBatchNormalization"):
                layer.trainable = False   # Keras 3: a frozen BatchNorm also runs in inference mode
    return old


def _restore(old):
    for layer, flag in old.values():
        layer.trainable = flag


def outputs_probabilities(model, logits_fn, x) -> bool:
    """True when the model's output is the softmax of the pipeline's logits (it ends in a softmax)."""
    out = np.asarray(model(x, training=False), dtype=np.float64)
    z = np.asarray(logits_fn(x), dtype=np.float64)
    if out.shape != z.shape:
        return False
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return bool(np.allclose(out, p, atol=1e-4)) and not np.allclose(out, z, atol=1e-6)


def finetune(model, pixels, labels, indices, augment, *, scale=(1 / 255, 0.0), epochs=8, learning_rate=1e-3,
             batch_size=32, layers="all", freeze_batchnorm=True, seed=0, from_logits=True,
             log=None) -> FineTuneResult:
    """Fine-tune ``model`` in place on counterfactually augmented images.

    Parameters
    ----------
    model : keras.Model
        A copy (loaded from the user's file): it is changed.
    pixels : (N, H, W, C) uint8
        The fine-tune images in [0, 255].
    labels : (N,) int
        Class codes; output ``k`` is class ``k``.
    indices : (N,) int
        The images' run indices (``dataset.parquet``'s ``index``): they seed the augmentation.
    augment : pipeline.remedy.augment.Counterfactuals
    scale : (float, float)
        ``data.scale``: the model sees ``pixels * a + b``.
    epochs, learning_rate, batch_size : training schedule (Adam).
    layers : "all" or "last:K" or list of str
        Which layers train (:func:`select_layers`); the others keep their weights.
    freeze_batchnorm : bool
        BatchNorm layers keep their statistics and run in inference mode.
    seed : int
    from_logits : bool
        False when the model ends in a softmax (:func:`outputs_probabilities`).
    log : callable, optional
        Gets one line per epoch.

    Returns
    -------
    FineTuneResult
        The trainable flags are restored afterwards, so the saved copy loads like the original.
    """
    from pipeline.backend.tf import tensorflow

    tf = tensorflow()
    import keras

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()
    pixels, labels, indices = np.asarray(pixels), np.asarray(labels, np.int64), np.asarray(indices)
    names = select_layers(model, layers)
    old = _freeze(model, set(names), freeze_batchnorm)
    try:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                      metrics=["accuracy"], jit_compile=False)
        result = FineTuneResult(trained=names, from_logits=from_logits)
        a, b = float(scale[0]), float(scale[1])
        for epoch in range(epochs):
            t0 = time.perf_counter()
            changed = augment(pixels, indices, seed, epoch)
            order = np.random.default_rng([int(seed), int(epoch), 0x0DE7]).permutation(len(pixels))
            x = changed[order].astype(np.float32) * np.float32(a) + np.float32(b)
            fit = model.fit(x, labels[order], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
            row = {"epoch": epoch + 1, "loss": float(fit.history["loss"][-1]),
                   "accuracy": float(fit.history["accuracy"][-1]),
                   "augmented": int((augment.choices(indices, seed, epoch) >= 0).sum()),
                   "seconds": round(time.perf_counter() - t0, 3)}
            result.history.append(row)
            if log:
                log(f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.3f}, accuracy {row['accuracy']:.3f} "
                    f"({row['augmented']} of {len(pixels)} images counterfactual)")
    finally:
        _restore(old)
    return result
