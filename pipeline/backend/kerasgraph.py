"""The producer -> consumer edges of a Keras functional graph, nested sub-models included.

Keras 3 keeps a functional model's graph in private attributes (``_nodes_by_depth``, each node's
``input_tensors`` and their ``_keras_history``). They are read here only, and any change in them
gives ``None`` ("graph unknown"), which ``layers: auto`` handles by using merge layers alone.
"""
from __future__ import annotations


def model_edges(model):
    """``[(producer, consumer), ...]`` layer names of a loaded model, or ``None`` when unknown.

    Parameters
    ----------
    model : object
        A :class:`pipeline.inputs.models.KerasModel` (other adapters have no Keras graph).
    """
    keras_model = getattr(model, "model", None)
    if keras_model is None:
        return None
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
                producer = tensor._keras_history.operation
                if type(producer).__name__ == "InputLayer":
                    continue
                yield _exit_name(producer, prefix), prefix + consumer.name
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


def functional(model):
    """The functional graph of a Keras model (a Sequential's inner one), or ``None`` for a subclassed model."""
    import keras

    if isinstance(model, keras.Sequential):
        return model._functional
    return model if hasattr(model, "_run_through_graph") and hasattr(model, "_nodes_by_depth") else None
