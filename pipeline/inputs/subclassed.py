"""Subclassed Keras models: their sub-layers, tapped while the model's own ``call`` runs.

A ``keras.Model`` subclass has no layer graph to cut open: its forward pass is Python code. Its
sub-layers are still known (Keras tracks every layer assigned to an attribute), so their outputs
are captured while ``call`` runs: for the duration of one call, each tracked sub-layer's ``call``
is replaced *on the instance* by a wrapper that records what it returns under the layer's
address, and the originals are put back afterwards, even when the call fails. Inside a
``tf.function`` this happens once, at trace time, so the compiled pass returns the taps at no
extra cost.

Addresses follow functional models: a sub-layer is named by its Keras name, and the layers of a
sub-layer that has its own (a residual block class holding two ``Conv2D``, a nested ``Sequential``)
are ``outer/inner``. An instance reachable under several parents keeps its first address (in
tracking order). A layer called more than once in ``call`` (shared weights) is tapped at its
*first* call. Layers ``call`` never reaches are listed but not analysable.

The wrappers live on shared layer instances, so tapped calls are serialised by one process-wide
lock (they run at trace time only, so this costs nothing once compiled). A model called *without*
tapping by another thread while a tapped call is being traced would still pass through them (the
pipeline never does this).
"""
from __future__ import annotations

import contextlib
import threading

from pipeline.backend.keras_internals import tracked_layers
from pipeline.errors import UserError
from pipeline.inputs.modelinfo import LayerInfo, analysable_shape

_MISSING = object()
_LOCK = threading.RLock()


def sublayers(model) -> dict:
    """``{address: layer}`` for every layer tracked under ``model``, depth first.

    Parameters
    ----------
    model : keras.Layer
        The subclassed model (it is not part of the result).

    Returns
    -------
    dict
        In tracking order; a parent comes before its own sub-layers.
    """
    found, seen = {}, {id(model)}

    def walk(layer, prefix):
        taken = set()
        for child in tracked_layers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = _unique(child.name, taken)
            found[prefix + name] = child
            walk(child, prefix + name + "/")

    walk(model, "")
    return found


def _unique(name, taken):
    """``name``, or ``name_2``, ``name_3``… when a sibling already has it."""
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def built_input_shape(model, name) -> tuple:
    """``(H, W, C)`` the model was built with (its ``build_config``; sizes may be None).

    Raises
    ------
    UserError
        The model records no input shape (it was never built or called), or several inputs.
    """
    config = model.get_build_config() if hasattr(model, "get_build_config") else None
    if not config or "input_shape" not in config:
        if config and "shapes_dict" in config:
            raise UserError(f"model {name} takes several inputs: only single-image-input models are supported")
        raise UserError(f"subclassed model {name} records no input shape (it was saved before it was built): "
                        "call it on an image batch or model.build((None, H, W, C)) before saving; "
                        "a model built for any size also needs data.size: [height, width]")
    shape = tuple(config["input_shape"])
    if len(shape) != 4:
        raise UserError(f"model {name} input shape {shape[1:]} is not an image (H, W, C)")
    return tuple(None if s is None else int(s) for s in shape[1:])


class Recorder:
    """What one tapped call saw: first output per address, call order, every call's output.

    Attributes
    ----------
    taps : dict
        ``{address: output of the layer's first call}``.
    order : dict
        ``{address: k}``: the layer's first call started k-th.
    calls : list of tuple
        ``(layer, args, kwargs, output)`` in the order the calls *returned*.
    """

    def __init__(self):
        self.taps, self.order, self.calls = {}, {}, []

    def wrap(self, address, layer, original):
        def tapped(*args, **kwargs):
            self.order.setdefault(address, len(self.order))
            y = original(*args, **kwargs)
            self.taps.setdefault(address, y)
            self.calls.append((layer, args, kwargs, y))
            return y

        return tapped

    def logits(self, output):
        """The model's first output, before its final softmax when a sub-layer applied one last.

        As for functional models, that sub-layer's own tap becomes pre-softmax too.
        """
        from pipeline.inputs.logits import without_softmax

        out = _first(output)
        for layer, args, kwargs, y in self.calls:  # innermost first: it returns before its parents
            if y is out:
                pre = without_softmax(layer, args, kwargs)
                if pre is None:
                    return out
                for tapped, value in self.taps.items():
                    if value is out:
                        self.taps[tapped] = pre
                return pre
        return out


def _first(output):
    if isinstance(output, dict):
        return next(iter(output.values()))
    if isinstance(output, (list, tuple)):
        return output[0]
    return output


@contextlib.contextmanager
def tapping(layers):
    """Record the outputs of ``layers`` (``{address: layer}``) while the block runs.

    Each layer's ``call`` (``quantized_call`` for a quantized layer, which Keras calls instead)
    is shadowed by an instance attribute for the duration of the block and restored after it,
    whatever happens inside.

    Yields
    ------
    Recorder
    """
    recorder, saved = Recorder(), []
    with _LOCK, _restoring(saved):
        for address, layer in layers.items():
            attr = "quantized_call" if getattr(layer, "quantization_mode", None) is not None else "call"
            saved.append((layer, attr, layer.__dict__.get(attr, _MISSING)))
            # object.__setattr__: a plain function must not go through Keras' attribute tracking.
            object.__setattr__(layer, attr, recorder.wrap(address, layer, getattr(layer, attr)))
        yield recorder


@contextlib.contextmanager
def _restoring(saved):
    """Put back the ``(layer, attribute, previous instance value)`` in ``saved``, whatever happens."""
    try:
        yield
    finally:
        for layer, attr, previous in reversed(saved):
            if previous is _MISSING:
                layer.__dict__.pop(attr, None)
            else:
                layer.__dict__[attr] = previous


class CallTaps:
    """A subclassed model's layers (:class:`LayerInfo`) and a tapped forward pass.

    Parameters
    ----------
    model : keras.Model
        A built subclassed model.
    name : str
        Shown in messages.

    Attributes
    ----------
    input_shape : tuple
        ``(H, W, C)`` from the model's build config.
    layers : list of LayerInfo
        Every tracked sub-layer, in the order ``call`` first reaches it (never-called ones last),
        with output shapes from one traced call at ``input_shape``.
    """

    def __init__(self, model, name="model"):
        self.model = model
        self.name = name
        self.input_shape = built_input_shape(model, name)
        self.sublayers = sublayers(model)
        self.layers = self._describe()

    def run(self, x):
        """Call the model on ``x`` in inference mode; returns ``(Recorder, logits)``."""
        with tapping(self.sublayers) as recorder:
            output = self.model(x, training=False)
        return recorder, recorder.logits(output)

    def build_extractor(self, layer_names):
        """``fn(x) -> (outputs of layer_names, logits)``, for use inside a ``tf.function``."""
        names = list(layer_names)

        def extract(x):
            recorder, logits = self.run(x)
            missing = [n for n in names if n not in recorder.taps]
            if missing:
                raise UserError(f"layer '{missing[0]}' is not called by the call() of model {self.name}")
            return [recorder.taps[n] for n in names], logits

        return extract

    def _describe(self):
        """One traced call at the built input shape: each sub-layer's type, output shape, dtype."""
        import tensorflow as tf

        seen = {}

        def trace(x):
            recorder, logits = self.run(x)
            seen.update(recorder=recorder, graph=getattr(logits, "graph", None))
            return logits

        spec = tf.TensorSpec((None, *self.input_shape), tf.float32)
        try:
            tf.function(trace, autograph=False).get_concrete_function(spec)
        except UserError:
            raise
        except Exception as exc:  # the author's call() can fail in any way on a dummy input
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot trace model {self.name} at input shape {self.input_shape}: {msg}") from None
        recorder = seen["recorder"]
        called = sorted(recorder.order, key=recorder.order.get)
        never = [a for a in self.sublayers if a not in recorder.order]
        return ([_info(a, self.sublayers[a], recorder.taps[a], seen["graph"]) for a in called]
                + [_not_called(a, self.sublayers[a]) for a in never])


def _info(address, layer, output, graph) -> LayerInfo:
    cls = type(layer).__name__
    if isinstance(output, (list, tuple, dict)):
        return LayerInfo(address, cls, None, False, "several outputs")
    if not hasattr(output, "shape") or not hasattr(output, "dtype"):
        return LayerInfo(address, cls, None, False, f"output is a {type(output).__name__}, not a tensor")
    shape = tuple(None if s is None else int(s) for s in output.shape[1:])
    if graph is not None and getattr(output, "graph", graph) is not graph:
        return LayerInfo(address, cls, shape, False, "computed inside a nested tf.function (cannot be tapped)")
    ok, reason = analysable_shape(shape)
    if ok and "float" not in str(output.dtype):
        ok, reason = False, f"dtype {output.dtype}"
    return LayerInfo(address, cls, shape, ok, reason)


def _not_called(address, layer) -> LayerInfo:
    cls = type(layer).__name__
    reason = "input layer" if cls == "InputLayer" else "not called by the model's call() in inference mode"
    return LayerInfo(address, cls, None, False, reason)
