"""TensorFlow's private internals, each read behind one small function, and nowhere else.

- :func:`frozen_graph_def`: ``tensorflow.python.framework.convert_to_constants``
  (``_FunctionConverterDataInEager``, ``_replace_variables_by_constants``; the public
  ``convert_variables_to_constants_v2`` of the same module as the fallback);
- :func:`captures`: ``FuncGraph.captures`` of a concrete function's graph;
- :func:`tracked_variables`: ``Trackable._trackable_children``;
- :func:`gradient_override`: ``tensorflow.python.framework.ops._gradient_registry._registry``;
- :func:`is_registered_op`: ``tensorflow.python.framework.op_def_registry`` (``tf.raw_ops`` as
  the fallback);
- :func:`saved_model_proto`: ``tensorflow.core.protobuf.saved_model_pb2``.

Each imports TensorFlow through :func:`pipeline.backend.tf.tensorflow` and checks, once per
process, that its version is in the tested range (:func:`pipeline.backend.versions.check`, one
warning otherwise). Where the caller has a fallback, a moved internal gives it: the public (slower)
freezing, no captures, no children, the gradient left as it is.
"""
from __future__ import annotations

import contextlib

from pipeline.backend.tf import tensorflow
from pipeline.backend.versions import check


def _tf():
    tf = tensorflow()
    check("tensorflow")
    return tf


def frozen_graph_def(concrete_function, aggressive_inlining=False):
    """The GraphDef of ``concrete_function`` with variables as constants and calls inlined.

    ``convert_variables_to_constants_v2`` without building the function we do not use (half its
    cost); the public call when the private helpers have moved.
    """
    _tf()
    from tensorflow.python.framework import convert_to_constants as c2c

    try:
        data = c2c._FunctionConverterDataInEager(
            func=concrete_function, lower_control_flow=True, aggressive_inlining=aggressive_inlining)
        return c2c._replace_variables_by_constants(converter_data=data)[0]
    except (AttributeError, TypeError):  # the private helpers moved or changed
        frozen = c2c.convert_variables_to_constants_v2(concrete_function, aggressive_inlining=aggressive_inlining)
        return frozen.graph.as_graph_def()


def captures(concrete_function) -> list:
    """``[(external tensor, internal placeholder), ...]`` a concrete function captured; ``[]`` when unknown."""
    _tf()
    try:
        return [(external, internal) for external, internal in concrete_function.graph.captures]
    except (AttributeError, TypeError, ValueError):
        return []


def tracked_variables(root) -> list:
    """Every ``tf.Variable`` reachable from ``root`` through the objects it tracks (a loaded SavedModel)."""
    tf = _tf()
    seen, found, stack = set(), [], [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, tf.Variable):
            found.append(obj)
            continue
        try:
            stack.extend(obj._trackable_children().values())
        except Exception:  # not a trackable, or one that cannot list its children
            continue
    return found


@contextlib.contextmanager
def gradient_override(op_type, gradient):
    """While the block runs, ``gradient(op, grad)`` is the registered gradient of ``op_type`` ops.

    TensorFlow 2 has no public way to override a built-in op's gradient inside a
    ``tf.GradientTape``, so the registry entry is swapped for the duration of the block (trace time
    of ``tape.gradient``) and restored afterwards, whatever happens. Yields whether it was swapped:
    when the registry is not where expected, nothing is changed.
    """
    _tf()
    try:
        from tensorflow.python.framework import ops
    except ImportError:
        ops = None
    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    if not isinstance(registry, dict) or op_type not in registry or not isinstance(registry[op_type], dict):
        yield False
        return
    original = registry[op_type]
    registry[op_type] = dict(original, type=gradient)
    try:
        yield True
    finally:
        registry[op_type] = original


def is_registered_op(op_type) -> bool:
    """Whether ``op_type`` is an op this TensorFlow knows (built in, or from a loaded op library)."""
    tf = _tf()
    try:
        from tensorflow.python.framework import op_def_registry

        return op_def_registry.get(op_type) is not None
    except (ImportError, AttributeError):
        return hasattr(tf.raw_ops, op_type)


def saved_model_proto():
    """An empty ``SavedModel`` protocol buffer, to parse a ``saved_model.pb`` as data."""
    _tf()
    from tensorflow.core.protobuf import saved_model_pb2

    return saved_model_pb2.SavedModel()
