"""Logits, not probabilities: call a model's last layer without its softmax.

Shared by functional and subclassed tapping (:mod:`pipeline.inputs.models`, :mod:`pipeline.inputs.subclassed`):
statistics and maximization work on pre-softmax values, where classes do not compete.
"""
from __future__ import annotations

_SOFTMAX_NAMES = {"softmax"}


def _is_softmax(fn) -> bool:
    return getattr(fn, "__name__", "") in _SOFTMAX_NAMES


def without_softmax(layer, args, kwargs):
    """Call ``layer`` without its final softmax, or None when it has none we can strip."""
    import keras

    cls = type(layer).__name__
    if cls == "Softmax" or (cls == "Activation" and _is_softmax(layer.activation)):
        return args[0]
    if cls == "Dense" and _is_softmax(layer.activation):
        y = keras.ops.matmul(args[0], layer.kernel)
        return y + layer.bias if layer.use_bias else y
    return None
