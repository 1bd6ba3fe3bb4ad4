"""TensorFlow SavedModel directories seen as graphs whose name scopes are layers.

Keras 3 cannot load a SavedModel as a Keras model (``keras.models.load_model`` refuses it and
``keras.layers.TFSMLayer`` exposes only the final outputs). To reach intermediate layers we

1. check its graph without running it (:func:`pipeline.inputs.graphscan.check_saved_model`: loading runs
   resource initializers, and every forward pass runs the graph, so ops that touch files or run
   code are refused unless ``trust_model``), then load the directory with
   ``tf.saved_model.load`` and take its ``serving_default`` signature (or its only signature);
2. freeze that signature with ``convert_variables_to_constants_v2``: variables become constants
   and nested function calls are inlined, leaving one flat GraphDef whose op names carry the
   Keras name scopes (``StatefulPartitionedCall/functional_1/conv1_1/Relu``);
3. read layers off the name scopes (see *Naming* below); a layer's output is the last op of its
   scope whose output is used outside the scope (or is the graph output);
4. import the GraphDef into a ``tf.compat.v1.wrap_function`` and ``prune`` it from the image
   input to the requested layer outputs. The pruned function takes any batch size, is
   differentiable with respect to its input and can be called inside a ``tf.function``.

Naming
------
Wrapper scopes (``StatefulPartitionedCall``, ``PartitionedCall``, ``Func/...``) and the model's
own scope are dropped; the remaining scopes are layers, and scopes of nested models (or of layers
that call sub-layers) give addresses ``inner/conv``. Keras 3 (TF backend) enters every layer's
name scope twice per call (once to build, once to call), so its graphs name a layer ``conv1`` as
``conv1_1`` and a layer ``conv2d_1`` as ``conv2d_1_2``: for such graphs exactly one trailing
``_<n>`` is removed from every layer scope, which recovers the Keras names. Whether a graph is such
a graph is decided from the variables (``conv1/kernel`` read inside scope ``conv1_1``), or, for
models without variables, from every layer scope having a ``_<n>`` suffix. tf.keras 2 graphs keep
the Keras names unchanged. A layer called twice (shared layer) appears once per call, the later
calls as ``conv@1``, ``conv@2``.

Layers whose call adds no op to the graph (``InputLayer``, ``Dropout`` at inference) do not
appear. A scope that only contains other layers (a nested model, or a custom layer calling
sub-layers) is listed too, with type ``"Block"``, after the layers it contains. Ops directly in
the model's scope (a subclassed model's own ``tf.nn.relu``) belong to no layer.

Types
-----
A layer's type is its main op: the first of ``Conv2D`` (also for SeparableConv2D),
``DepthwiseConv2dNative``, ``MatMul``, ``FusedBatchNormV3``, ``MaxPool``, ... that it contains;
``"BatchNorm"`` for Keras 3's BatchNormalization (decomposed into Mul/Add inside a ``batchnorm``
scope); otherwise the type of its last op (``Relu``, ``AddV2``, ``ConcatV2``, ``Mean``,
``Reshape``).

Outputs
-------
Logits are the signature's first output (``output_0``), or the *input* of the Softmax producing
it (``GraphModel.logits_from_softmax`` says which). Layers feeding any output are listed.

Limits
------
Freezing copies every weight into a GraphDef (the SavedModel must stay under protobuf's 2 GB);
layer order is a topological order of the graph, which for branching models can differ from
Keras's ``model.layers`` order; graphs other than Keras 3's are read with a structural rule
(a scope with no op of its own and two or more sub-scopes is a block), so a nested model of a
single layer shows as one layer, and an internal scope of a tf.keras 2 layer may show as a layer.
"""
from __future__ import annotations

import heapq
import os
import re
from collections import defaultdict

from pipeline.backend.tf_internals import captures, frozen_graph_def, tracked_variables
from pipeline.errors import UserError
from pipeline.inputs.graphscan import check_saved_model, closure
from pipeline.inputs.modelinfo import LayerInfo, analysable_shape

_WRAPPER = re.compile(r"^(Stateful)?PartitionedCall(_\d+)?$")
_SUFFIX = re.compile(r"^(.+)_\d+$")
_MAIN_OPS = (
    "Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3D", "MatMul",
    "BatchMatMulV2", "BatchMatMulV3", "Einsum", "FusedBatchNormV3", "FusedBatchNorm",
    "MaxPool", "AvgPool",
)
_PASS_THROUGH = ("Identity", "IdentityN", "StopGradient")
BLOCK = "Block"


class GraphModel:
    """A SavedModel seen as a graph whose name scopes are layers.

    Parameters
    ----------
    path : str or os.PathLike
        A SavedModel directory (Keras 3 ``model.export(path)``, tf.keras 2 ``model.save(path)``
        or ``tf.saved_model.save(model, path)``).
    trust_model : bool
        Load it even when its graph holds ops outside :data:`pipeline.inputs.graphscan.SAFE_OPS`.

    Attributes
    ----------
    name : str
        The directory name.
    input_shape : tuple
        ``(H, W, C)`` of one example, ``None`` for unknown sizes.
    layers : list of LayerInfo
        In graph (topological) order; see the module docstring for the naming.
    logits_from_softmax : bool
        True when the graph output is a Softmax, whose *input* the extractor returns as logits.

    Raises
    ------
    UnsafeModelError
        The graph holds ops that touch files or run code, and ``trust_model`` is false.
    UserError
        Not a SavedModel directory, no usable signature, more than one input, or an input that
        is not a rank-4 float image batch.

    Examples
    --------
    >>> gm = GraphModel("exported/")                         # doctest: +SKIP
    >>> [l.name for l in gm.layers]                          # doctest: +SKIP
    ['conv1', 'pool', 'inner/conv', 'inner', 'dense']
    >>> outputs, logits = gm.build_extractor(["conv1"])(x)  # doctest: +SKIP
    """

    def __init__(self, path, trust_model=False):
        path = os.fspath(path)
        self.name = os.path.basename(os.path.normpath(path))
        loaded = _load(path, trust_model)
        signature = _pick_signature(loaded, path)
        self._input_dtype, self.input_shape = _check_input(signature, path)
        graph_def, input_name, output_names = _freeze(signature)
        graph = _Graph(graph_def, input_name, output_names)
        strip = _strip_suffixes(graph, _capture_variable_names(loaded, signature))
        self._wrapped = _import(graph_def)
        self._input_name = input_name
        self._logits_name, self.logits_from_softmax = _logits(graph, output_names[0])
        self._outputs = {}
        self.layers = []
        for address, op_type, tensor_name in _discover_layers(graph, strip):
            self._outputs[address] = tensor_name
            self.layers.append(self._layer_info(address, op_type, tensor_name))

    def _layer_info(self, address, op_type, tensor_name):
        shape = self._wrapped.graph.get_tensor_by_name(tensor_name).shape
        shape = None if shape.rank is None else tuple(shape.as_list()[1:])
        ok, reason = analysable_shape(shape)
        return LayerInfo(address, op_type, shape, ok, reason)

    def build_extractor(self, layer_names):
        """A function from an image batch to the outputs of ``layer_names`` and the logits.

        Parameters
        ----------
        layer_names : list of str
            Addresses from ``self.layers``.

        Returns
        -------
        callable
            ``fn(x)`` with ``x`` a float32 ``(B, H, W, C)`` tensor (any B); returns
            ``(list of tf.Tensor in layer_names order, tf.Tensor logits)``. The logits are the
            graph output, or the input of its Softmax when the graph ends in one. ``fn`` is
            differentiable with respect to ``x`` and can be called inside a ``tf.function``.

        Raises
        ------
        UserError
            A name that is not a layer of this model.
        """
        import tensorflow as tf

        names = [self._tensor_name(n) for n in layer_names] + [self._logits_name]
        unique = list(dict.fromkeys(names))
        graph = self._wrapped.graph
        pruned = self._wrapped.prune(
            feeds=graph.get_tensor_by_name(self._input_name),
            fetches=[graph.get_tensor_by_name(n) for n in unique],
        )
        positions = [unique.index(n) for n in names]
        dtype = self._input_dtype

        def extract(x):
            fetched = pruned(tf.cast(tf.convert_to_tensor(x), dtype))
            outputs = [fetched[i] for i in positions]
            return outputs[:-1], outputs[-1]

        return extract

    def _tensor_name(self, layer_name):
        if layer_name not in self._outputs:
            valid = ", ".join(list(self._outputs)[:8])
            raise UserError(
                f"no layer {layer_name!r} in SavedModel {self.name!r}; "
                f"its {len(self._outputs)} layers include: {valid}"
            )
        return self._outputs[layer_name]


# --------------------------------------------------------------------------- loading


def _load(path, trust_model):
    import tensorflow as tf

    if not os.path.isdir(path) or not tf.saved_model.contains_saved_model(path):
        raise UserError(f"{path} is not a SavedModel directory (no saved_model.pb inside)")
    # Here and not only in the CLI: tf.saved_model.load itself runs the model's initializers.
    check_saved_model(path, trust_model)
    try:
        return tf.saved_model.load(path)
    except Exception as err:  # corrupt files, missing custom ops, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load SavedModel {path}: {first_line}") from err


def _pick_signature(loaded, path):
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if "serving_default" in signatures:
        return signatures["serving_default"]
    if len(signatures) == 1:
        return next(iter(signatures.values()))
    if not signatures:
        raise UserError(
            f"SavedModel {path} has no signature to call; export it with model.export(path)"
        )
    raise UserError(
        f"SavedModel {path} has {len(signatures)} signatures ({', '.join(sorted(signatures))}) "
        "and none is 'serving_default'"
    )


def _check_input(signature, path):
    import tensorflow as tf

    specs = tf.nest.flatten(signature.structured_input_signature)
    if len(specs) != 1:
        names = ", ".join(str(getattr(s, "name", s)) for s in specs)
        raise UserError(
            f"SavedModel {path} takes {len(specs)} inputs ({names}); only models with one "
            "image input are supported"
        )
    spec = specs[0]
    if spec.shape.rank != 4 or not spec.dtype.is_floating:
        raise UserError(
            f"SavedModel {path} input {spec.name!r} is {spec.dtype.name} {spec.shape}; "
            "need a float image batch (batch, height, width, channels)"
        )
    return spec.dtype, tuple(spec.shape.as_list()[1:])


def _freeze(signature):
    """Frozen, inlined GraphDef and the names of its input and output tensors."""
    graph_def = frozen_graph_def(signature, aggressive_inlining=False)
    if any(_WRAPPER.match(n.op) for n in graph_def.node):  # some call was not inlined
        graph_def = frozen_graph_def(signature, aggressive_inlining=True)
    # Variables and other captures come after the signature's own inputs; outputs are in
    # flattened structure order, i.e. sorted by key (``output_0`` first) for a signature.
    return graph_def, signature.inputs[0].name, [t.name for t in signature.outputs]


def _import(graph_def):
    import tensorflow as tf

    return tf.compat.v1.wrap_function(
        lambda: tf.compat.v1.import_graph_def(graph_def, name=""), []
    )


def _capture_variable_names(loaded, signature):
    """``{constant name in the frozen graph: variable name}`` for the captured variables."""
    by_handle = {id(v.handle): v.name for v in tracked_variables(loaded)}
    names = {}
    for external, internal in captures(signature):
        if id(external) in by_handle:
            names[internal.op.name] = by_handle[id(external)]
    return names


# --------------------------------------------------------------------------- graph analysis


class _Graph:
    """The frozen GraphDef as plain Python: ops, edges, topological order, the data path.

    The data path is the set of ops that depend on the input and that an output depends on
    (constant-only subgraphs such as variable reads are not on it).
    """

    def __init__(self, graph_def, input_name, output_names):
        self.input_name = input_name
        self.outputs = dict(_split(name) for name in reversed(output_names))  # op -> index
        self.op_type = {}
        self.inputs = {}                       # op -> [(producer op, output index)]
        self.consumers = defaultdict(list)     # op -> [consumer op]
        control = {}
        for node in graph_def.node:
            self.op_type[node.name] = node.op
            self.inputs[node.name] = [_split(i) for i in node.input if not i.startswith("^")]
            control[node.name] = [i[1:] for i in node.input if i.startswith("^")]
            for producer, _ in self.inputs[node.name]:
                self.consumers[producer].append(node.name)
        self.order = _topological_order(self.inputs, control)
        downstream = closure([_split(input_name)[0]], lambda op: self.consumers.get(op, ()))
        upstream = set().union(*(
            closure([op], lambda op: [p for p, _ in self.inputs[op]]) for op in self.outputs
        ))
        self.data_path = downstream & upstream


def _split(tensor_name):
    op, _, index = tensor_name.partition(":")
    return op, int(index or 0)


def _topological_order(inputs, control):
    """Topological order closest to the GraphDef order (which follows the trace)."""
    position = {op: i for i, op in enumerate(inputs)}
    preds = {op: {p for p, _ in inputs[op]} | set(control[op]) for op in inputs}
    succs = defaultdict(list)
    for op, ps in preds.items():
        ps &= position.keys()
        for p in ps:
            succs[p].append(op)
    waiting = {op: len(ps) for op, ps in preds.items()}
    ready = [position[op] for op, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    ops, order = list(inputs), {}
    while ready:
        op = ops[heapq.heappop(ready)]
        order[op] = len(order)
        for nxt in succs[op]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, position[nxt])
    return order


def _scope_of(op_name):
    """Scope components of an op, without wrapper scopes; None for ops outside any layer."""
    parts = op_name.split("/")[:-1]
    if "Func" in parts:  # identities at the boundary of an inlined function
        return None
    parts = [p for p in parts if not _WRAPPER.match(p)]
    return tuple(parts) if parts else None


def _layer_ops(graph):
    """``{op: scope below the model's own scope}`` for the data-path ops inside a layer."""
    scopes = {op: _scope_of(op) for op in sorted(graph.data_path, key=graph.order.get)}
    scopes = {op: s for op, s in scopes.items() if s}
    firsts = {s[0] for s in scopes.values()}
    if len(firsts) == 1 and any(len(s) > 1 for s in scopes.values()):
        scopes = {op: s[1:] for op, s in scopes.items() if len(s) > 1}
    return scopes


def _strip_suffixes(graph, variable_names):
    """Whether layer scopes carry Keras 3's extra ``_<n>`` (see the module docstring)."""
    votes = defaultdict(int)
    for const, var_name in variable_names.items():
        parts = var_name.split(":")[0].split("/")
        if len(parts) < 2:
            continue
        scope = _reader_scope(graph, const)
        if scope:
            votes[_vote(scope, parts[-2])] += 1
    if votes["suffixed"] != votes["exact"]:
        return votes["suffixed"] > votes["exact"]
    tops = {s[0] for s in _layer_ops(graph).values()}
    return bool(tops) and all(_SUFFIX.match(t) for t in tops)


def _reader_scope(graph, const):
    """Scope of the first op (past function-boundary identities) that reads a constant."""
    stack = list(graph.consumers.get(const, ()))
    while stack:
        op = stack.pop(0)
        if "Func" not in op.split("/")[:-1]:
            return _scope_of(op)
        stack.extend(graph.consumers.get(op, ()))
    return None


def _vote(scope, layer_name):
    if layer_name in scope:
        return "exact"
    pattern = re.compile(re.escape(layer_name) + r"_\d+$")
    return "suffixed" if any(pattern.match(p) for p in scope) else "none"


class _Scope:
    def __init__(self):
        self.ops = []          # data-path ops directly in this scope
        self.children = {}     # component -> _Scope

    def all_ops(self):
        return self.ops + [op for c in self.children.values() for op in c.all_ops()]


def _scope_tree(scopes):
    root = _Scope()
    for op, path in scopes.items():
        node = root
        for part in path:
            node = node.children.setdefault(part, _Scope())
        node.ops.append(op)
    return root


def _is_block(scope, strip):
    """A scope made of layers (nested model / composite layer) rather than a layer."""
    if not scope.children:
        return False
    if strip:  # Keras 3: layer scopes, and only they, carry the extra suffix
        return all(_SUFFIX.match(c) for c in scope.children)
    return not scope.ops and len(scope.children) >= 2


def _discover_layers(graph, strip):
    """``[(address, type, output tensor name)]`` in topological order of the outputs."""
    found = []
    _walk(_scope_tree(_layer_ops(graph)), (), graph, strip, found)
    found.sort(key=lambda item: item[0])
    return _unique_addresses([item[1:] for item in found])


def _walk(scope, path, graph, strip, found):
    for part, child in scope.children.items():
        name = _SUFFIX.match(part).group(1) if strip and _SUFFIX.match(part) else part
        block = _is_block(child, strip)
        if block:
            _walk(child, path + (name,), graph, strip, found)
        tensor = _scope_output(graph, set(child.all_ops()))
        if tensor is not None:
            op_type = BLOCK if block else _main_type(graph, child)
            key = (graph.order[_split(tensor)[0]], -len(path))  # a block after its layers
            found.append((key, "/".join(path + (name,)), op_type, tensor))


def _scope_output(graph, ops):
    """Last op of the scope whose output is used outside it (or is a graph output)."""
    for op in sorted(ops, key=graph.order.get, reverse=True):
        if op in graph.outputs:
            return f"{op}:{graph.outputs[op]}"
        used = [i for c in graph.consumers.get(op, ()) if c not in ops and c in graph.data_path
                for p, i in graph.inputs[c] if p == op]
        if used:
            return f"{op}:{min(used)}"
    return None


def _main_type(graph, scope):
    ops = sorted(scope.all_ops(), key=graph.order.get)
    types = [graph.op_type[op] for op in ops]
    for main in _MAIN_OPS:
        if main in types:
            return main
    if any("batchnorm" in op.split("/") for op in ops):
        return "BatchNorm"
    meaningful = [t for t in types if t not in _PASS_THROUGH]
    return (meaningful or types)[-1]


def _unique_addresses(layers):
    seen = defaultdict(int)
    unique = []
    for address, op_type, tensor in layers:
        count = seen[address]
        seen[address] += 1
        unique.append((f"{address}@{count}" if count else address, op_type, tensor))
    return unique


def _logits(graph, output_name):
    """The graph output, or the input of the Softmax producing it (through identities)."""
    name = output_name
    op, _ = _split(name)
    while graph.op_type.get(op) in _PASS_THROUGH and graph.inputs.get(op):
        name = "%s:%d" % graph.inputs[op][0]
        op, _ = _split(name)
    if graph.op_type.get(op) == "Softmax":
        return "%s:%d" % graph.inputs[op][0], True
    return output_name, False
