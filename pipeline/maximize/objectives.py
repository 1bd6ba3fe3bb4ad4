"""Objectives: what an image should make the model do, one value per image of a batch.

An :class:`Objective` wraps ``fn(acts) -> (B,) tensor`` where ``acts`` maps layer names (and
:data:`LOGITS`) to that layer's output for the batch. Objectives combine with ``+``, ``-``,
``*`` and ``/`` (with numbers or other objectives); each operation returns a *new* objective
and leaves its operands untouched.

Targets (channels, directions, classes) are per image: ``channel("conv3", [3, 7, 9])`` asks
image 0 to excite channel 3, image 1 channel 7 and image 2 channel 9, so one batch optimises
many units at once. A single target applies to every image. Targets may be tensors, so a
compiled render loop can take them as arguments instead of being retraced for each batch.

Examples
--------
>>> import numpy as np
>>> acts = {"conv": np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)}
>>> channel("conv", [0, 2])(acts).numpy()
array([ 4.5, 18.5], dtype=float32)
>>> (2 * channel("conv", 1) - 1)(acts).numpy()
array([10., 34.], dtype=float32)
"""
from __future__ import annotations

import numbers

from pipeline.backend.tf import tensorflow

tf = tensorflow()

#: Key of the model's pre-softmax outputs in ``acts`` (not a valid name for a Keras layer input).
LOGITS = "<logits>"


class Objective:
    """A function of a batch's activations giving one value per image.

    Parameters
    ----------
    fn : callable
        ``fn(acts) -> tensor`` of shape ``(B,)`` (or a scalar, broadcast to every image).
    name : str
        Shown in logs and tests.
    layers : tuple of str
        Layers ``fn`` reads (``LOGITS`` for the logits): the render step taps exactly these.
    """

    def __init__(self, fn, name="objective", layers=()):
        self.fn = fn
        self.name = name
        self.layers = tuple(dict.fromkeys(layers))

    def __call__(self, acts):
        return self.fn(acts)

    def __repr__(self):
        return f"Objective({self.name})"

    @staticmethod
    def _lift(other):
        if isinstance(other, Objective):
            return other
        if isinstance(other, numbers.Number):
            value = float(other)
            return Objective(lambda acts: tf.constant(value, tf.float32), repr(value))
        return NotImplemented

    def _combine(self, other, op, symbol):
        other = Objective._lift(other)
        if other is NotImplemented:
            return NotImplemented
        first, second = self, other
        return Objective(lambda acts: op(first(acts), second(acts)), f"({first.name} {symbol} {second.name})",
                         first.layers + second.layers)

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b, "+")

    def __radd__(self, other):
        lifted = Objective._lift(other)
        return NotImplemented if lifted is NotImplemented else lifted + self

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b, "-")

    def __rsub__(self, other):
        lifted = Objective._lift(other)
        return NotImplemented if lifted is NotImplemented else lifted - self

    def __mul__(self, other):
        return self._combine(other, lambda a, b: a * b, "*")

    def __rmul__(self, other):
        lifted = Objective._lift(other)
        return NotImplemented if lifted is NotImplemented else lifted * self

    def __truediv__(self, other):
        return self._combine(other, lambda a, b: a / b, "/")

    def __neg__(self):
        return -1.0 * self


def _per_channel(y):
    """``(B, C)``: the spatial mean of a feature map (the extract stage's ``mean``), or a vector as is."""
    y = tf.cast(y, tf.float32)
    if y.shape.rank == 4:
        return tf.reduce_mean(y, axis=[1, 2])
    return tf.reshape(y, [tf.shape(y)[0], -1])


def _pick(y, index):
    """Column ``index`` of ``(B, C)`` ``y``; a ``(B,)`` index picks one column per image."""
    index = tf.convert_to_tensor(index)
    if index.shape.rank == 0:
        return tf.gather(y, index, axis=1)
    return tf.gather(y, tf.cast(index, tf.int32), axis=1, batch_dims=1)


def channel(layer, n) -> Objective:
    """Mean over positions of channel ``n`` of ``layer`` (a unit of a vector layer as is)."""
    return Objective(lambda acts: _pick(_per_channel(acts[layer]), n), f"channel({layer}, {_short(n)})", (layer,))


def neuron(layer, n, x=None, y=None) -> Objective:
    """Channel ``n`` of ``layer`` at one position (default: the centre) of its feature map."""
    def fn(acts):
        t = tf.cast(acts[layer], tf.float32)
        row = t.shape[1] // 2 if y is None else y
        col = t.shape[2] // 2 if x is None else x
        return _pick(t[:, row, col, :], n)

    return Objective(fn, f"neuron({layer}, {_short(n)}, x={x}, y={y})", (layer,))


def direction(layer, vectors) -> Objective:
    """Dot product of the channel-mean activation with a direction in channel space.

    ``vectors`` is ``(C,)`` for every image or ``(B, C)`` per image (e.g. cluster centroids). A
    one-hot vector gives exactly :func:`channel`. Vectors are used as given (not normalised).
    """
    def fn(acts):
        v = tf.cast(tf.convert_to_tensor(vectors), tf.float32)
        return tf.reduce_sum(_per_channel(acts[layer]) * v, axis=-1)

    return Objective(fn, f"direction({layer})", (layer,))


def class_logit(k) -> Objective:
    """Logit (pre-softmax output) of class ``k`` (per image if ``k`` is a sequence)."""
    return Objective(lambda acts: _pick(_per_channel(acts[LOGITS]), k), f"class_logit({_short(k)})", (LOGITS,))


def class_logprob(k) -> Objective:
    """Log-probability (log-softmax of the logits) of class ``k``: rises only by beating the other classes."""
    return Objective(lambda acts: _pick(tf.nn.log_softmax(_per_channel(acts[LOGITS]), axis=-1), k),
                     f"class_logprob({_short(k)})", (LOGITS,))


def class_probability(k) -> Objective:
    """Softmax probability of class ``k`` (for measuring; its gradient vanishes near 0 and 1)."""
    return Objective(lambda acts: _pick(tf.nn.softmax(_per_channel(acts[LOGITS]), axis=-1), k),
                     f"class_probability({_short(k)})", (LOGITS,))


def diversity(layer) -> Objective:
    """Minus each image's summed similarity to the others, comparing style (Gram) matrices.

    The batch total is Lucid's ``diversity`` objective; adding it (times a weight) to another
    objective pushes the images of a batch apart. Needs a feature map ``(B, H, W, C)``.
    """
    def fn(acts):
        t = tf.cast(acts[layer], tf.float32)
        flat = tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]])
        grams = tf.matmul(flat, flat, transpose_a=True)
        grams = tf.reshape(grams, [tf.shape(t)[0], -1])
        grams = tf.math.l2_normalize(grams, axis=1, epsilon=1e-10)
        sim = tf.matmul(grams, grams, transpose_b=True)
        batch = tf.cast(tf.shape(t)[0], tf.float32)
        return -(tf.reduce_sum(sim, axis=1) - tf.linalg.diag_part(sim)) / batch

    return Objective(fn, f"diversity({layer})", (layer,))


def _short(n):
    """A short label for a target (an int, a few ints, or "N targets")."""
    if tf.is_tensor(n):
        return "targets"
    flat = list(n) if isinstance(n, (list, tuple)) or getattr(n, "ndim", 0) >= 1 else None
    if flat is None:
        return str(n)
    return str([int(v) for v in flat]) if len(flat) <= 4 else f"{len(flat)} targets"
