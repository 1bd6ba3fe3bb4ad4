"""Keras 3's private internals, each read behind one small function, and nowhere else.

Keras has no public API to run a functional graph layer by layer, to list its edges, or to reset
its automatic layer names; the functions below read what they need from private attributes:

- :func:`functional`: ``Sequential._functional``; ``Functional._run_through_graph``,
  ``._standardize_inputs`` and ``._nodes_by_depth`` (tested for presence only);
- :func:`run_graph`: ``Functional._standardize_inputs``, ``Functional._run_through_graph``;
- :func:`takes_training`: ``Layer._call_context_args``;
- :func:`producer`: ``KerasTensor._keras_history`` (its ``operation``);
- :func:`model_edges`: ``Functional._nodes_by_depth``, ``Node.operation``, ``Node.input_tensors``,
  ``KerasTensor._keras_history``;
- :func:`tracked_layers`: ``Layer._flatten_layers`` (or ``Layer._layers``);
- :func:`fresh_layer_names`: ``keras.src.backend.common.global_state`` (``object_name_uids``).

Each first checks, once per process, that the installed Keras is in the tested range
(:func:`pipeline.backend.versions.check`, one warning otherwise). When an attribute is not where
expected they give the "unknown" answer their callers already handle: :func:`functional` says
"not a functional graph" (the model is then tapped as a subclassed one), :func:`producer` and
:func:`model_edges` give ``None``, :func:`takes_training` says yes (Keras' default),
:func:`tracked_layers` an empty list, :func:`fresh_layer_names` changes nothing.
"""
from __future__ import annotations

import collections
import contextlib

from pipeline.backend.versions import check

_GRAPH_ATTRIBUTES = ("_run_through_graph", "_standardize_inputs", "_nodes_by_depth")


def functional(model):
    """The functional graph of a Keras model (a Sequential's inner one), or ``None``.

    ``None`` for a subclassed model, and for any model when the private graph API is missing.
    """
    check("keras")
    import keras

    if isinstance(model, keras.Sequential):
        model = getattr(model, "_functional", None)
    return model if model is not None and all(hasattr(model, a) for a in _GRAPH_ATTRIBUTES) else None


def run_graph(graph, x, operation_fn):
    """Run the functional ``graph`` on ``x``, calling ``operation_fn(op)(*args, **kwargs)`` for each op.

    ``graph`` comes from :func:`functional`, which checked that the private methods exist.
    """
    check("keras")
    return graph._run_through_graph(graph._standardize_inputs(x), operation_fn=operation_fn)


def takes_training(op) -> bool:
    """Whether ``op``'s ``call`` takes a ``training`` argument (True when Keras does not say)."""
    check("keras")
    return "training" in getattr(op, "_call_context_args", {"training"})


def producer(tensor):
    """The layer (operation) that produced a symbolic Keras tensor, or ``None`` when unknown."""
    check("keras")
    return getattr(getattr(tensor, "_keras_history", None), "operation", None)


def model_edges(model):
    """``[(producer, consumer), ...]`` layer names of a loaded model, or ``None`` when unknown.

    Nested functional sub-models are included (``outer/inner`` names); an edge out of a nested
    model starts at the inner layer producing its output.

    Parameters
    ----------
    model : object
        A :class:`pipeline.inputs.models.KerasModel` (other adapters have no Keras graph).
    """
    keras_model = getattr(model, "model", None)
    if keras_model is None:
        return None
    check("keras")
    try:
        return list(_edges(keras_model, ""))
    except (AttributeError, TypeError, KeyError):
        return None


def _edges(model, prefix):
    graph = functional(model)
    if graph is None:
        return
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            consumer = node.operation
            for tensor in node.input_tensors:
                source = tensor._keras_history.operation
                if type(source).__name__ == "InputLayer":
                    continue
                yield _exit_name(source, prefix), prefix + consumer.name
    for layer in graph.layers:
        if layer is not graph and functional(layer) is not None:
            yield from _edges(layer, prefix + layer.name + "/")


def _exit_name(layer, prefix):
    """A nested model's output is the output of the layer that produces it."""
    inner = functional(layer)
    if inner is None:
        return prefix + layer.name
    try:
        last = inner.outputs[0]._keras_history.operation
    except (AttributeError, IndexError):
        last = inner.layers[-1] if inner.layers else layer
    if last is layer or last is inner:
        return prefix + layer.name
    return _exit_name(last, prefix + layer.name + "/")


def tracked_layers(layer) -> list:
    """The layers Keras tracks directly under ``layer`` (assigned to its attributes), in tracking order."""
    check("keras")
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "_layers", ()))


@contextlib.contextmanager
def fresh_layer_names():
    """Run the block with Keras' automatic layer-name counters at zero, then put the old ones back.

    Layers created without a ``name`` get ``conv2d``, ``conv2d_1``… from a per-process counter.
    When the counters are not where expected, nothing changes.
    """
    check("keras")
    try:
        from keras.src.backend.common import global_state

        get, put = global_state.get_global_attribute, global_state.set_global_attribute
    except (ImportError, AttributeError):
        yield
        return
    saved = get("object_name_uids")
    put("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        put("object_name_uids", saved)
