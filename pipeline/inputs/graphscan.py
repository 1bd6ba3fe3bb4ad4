"""Decide whether a SavedModel may be loaded, by reading its graph as data.

A SavedModel is a program. ``tf.saved_model.load`` runs its resource initializers and its
checkpoint restore functions, and every forward pass runs its signature function; any of them can
hold ``WriteFile``, ``PrintV2`` to a file, a ``PyFunc`` or a custom op. So before anything loads
it, this module parses ``saved_model.pb`` (or ``saved_model.pbtxt``, the file TensorFlow's own
loader would read) with the protobuf classes — which runs no model code — and checks every node
of every meta graph: the top-level ``graph_def`` and every function of its library (initializers,
restore functions, ``If``/``While`` branches, gradients, functions nobody calls).

Rules
-----
- A node's op must be in :data:`SAFE_OPS`, a list of compute, variable, control-flow and
  in-memory-table ops, or name a function of the library (a direct call; that function is checked
  too). Anything else is refused, including ops not registered in this TensorFlow (a custom op
  library: TensorFlow never loads one from a SavedModel, but whoever does load it would run it).
- ``PrintV2`` is allowed to the standard streams and logs, not to ``file://`` destinations.
- The saver sub-graph of a TF2 SavedModel is not checked: ``saver_def``'s save and restore ops and
  what is reachable only from them (``__inference__traced_save_*``, ``SaveV2``, ``RestoreV2``,
  ``MergeV2Checkpoints`` ...). TensorFlow 2's loader restores variables with ops it builds itself
  (``TrackableSaver`` in ``tensorflow/python/saved_model/load.py``) and never runs this
  sub-graph. The exclusion is structural, not by name: a function reached from anything else
  (another node, the object graph, a gradient) is checked whatever it is called. SavedModels
  without an object graph (TF1 format) are loaded through ``load_v1_in_v2``, which does run the
  restore op, so nothing is excluded there and their ``SaveV2``/``RestoreV2`` make them refused.

Other ways a SavedModel could act at load time, and why they need nothing more: ``assets/`` files
are only paths handed to ops (every op that reads a file is refused); ``fingerprint.pb`` and the
debug info are parsed, never run; variables are read from ``variables/`` by TensorFlow's own
restore ops; Python objects are rebuilt only from classes already imported in this process.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.backend.tf_internals import is_registered_op, saved_model_proto
from pipeline.errors import UnsafeModelError, UserError

# PrintV2 ``output_stream`` values that do not name a file.
STREAMS = frozenset({"stderr", "stdout", "log(info)", "log(warning)", "log(error)"})

# Ops that compute on tensors, variables and in-memory tables and nothing else: no file, process,
# network, queue, dataset or Python-callback op. Built from what the gate sees in 100 SavedModels
# (Keras 3.15, TF 2.21): all 40 keras.applications architectures, saved with model.export and with
# tf.saved_model.save; a Keras layer zoo in float32, mixed_float16 and mixed_bfloat16; a tf.Module
# using common tf.* ops. They use 147 distinct ops, all listed; the rest are the pure ops of the
# same families (math, reductions, array, image, stateless random, tensor lists).
SAFE_OPS = frozenset("""
    Const Placeholder PlaceholderWithDefault Identity IdentityN Snapshot StopGradient
    PreventGradient NoOp EnsureShape CheckNumerics CheckNumericsV2 Assert

    StatefulPartitionedCall PartitionedCall If StatelessIf While StatelessWhile Case StatelessCase
    Switch Merge Enter Exit NextIteration LoopCond

    VarHandleOp ReadVariableOp AssignVariableOp AssignAddVariableOp AssignSubVariableOp
    VarIsInitializedOp DestroyResourceOp ResourceGather ResourceGatherNd

    HashTableV2 MutableHashTableV2 MutableDenseHashTableV2 InitializeTableV2 LookupTableFindV2
    LookupTableImportV2 LookupTableExportV2 LookupTableInsertV2 LookupTableRemoveV2
    LookupTableSizeV2

    TensorListFromTensor TensorListGetItem TensorListSetItem TensorListReserve TensorListStack
    TensorListLength TensorListElementShape TensorListPushBack TensorListPopBack EmptyTensorList
    TensorListConcatV2 TensorListSplit TensorListGather TensorListResize
    TensorListScatterIntoExistingList TensorArrayV3 TensorArrayReadV3 TensorArrayWriteV3
    TensorArrayGatherV3 TensorArrayScatterV3 TensorArraySizeV3 TensorArrayCloseV3

    Add AddV2 AddN Sub Mul MulNoNan Div DivNoNan RealDiv FloorDiv FloorMod TruncateDiv
    TruncateMod Mod Neg Abs Sign Square Sqrt Rsqrt Exp Expm1 Log Log1p Pow Reciprocal Inv Floor
    Ceil Round Rint Sin Cos Tan Asin Acos Atan Atan2 Sinh Cosh Tanh Asinh Acosh Atanh Erf Erfc
    Erfinv Lgamma Digamma Sigmoid Softplus Softsign Maximum Minimum SquaredDifference
    ClipByValue Xlogy Xdivy Xlog1py IsFinite IsNan IsInf Equal NotEqual Greater GreaterEqual
    Less LessEqual LogicalAnd LogicalOr LogicalNot Select SelectV2 Cast BitwiseAnd BitwiseOr
    BitwiseXor Invert LeftShift RightShift Complex ComplexAbs Real Imag Angle Conj FFT IFFT
    FFT2D IFFT2D RFFT IRFFT RFFT2D IRFFT2D

    Sum Mean Max Min Prod All Any ArgMax ArgMin Cumsum Cumprod EuclideanNorm TopKV2 InTopKV2
    NthElement UnsortedSegmentSum UnsortedSegmentMax UnsortedSegmentMin UnsortedSegmentProd
    SegmentSum SegmentMean SegmentMax SegmentMin Bincount DenseBincount Bucketize LowerBound
    UpperBound Unique

    MatMul BatchMatMul BatchMatMulV2 BatchMatMulV3 Einsum Transpose ConjugateTranspose
    MatrixBandPart MatrixDiagV3 MatrixDiagPartV3 MatrixSetDiagV3 Diag DiagPart

    Conv2D Conv3D Conv2DBackpropInput Conv3DBackpropInputV2 DepthwiseConv2dNative
    DepthwiseConv2dNativeBackpropInput BiasAdd BiasAddV1 Relu Relu6 Elu Selu LeakyRelu Softmax
    LogSoftmax FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3 MaxPool MaxPoolV2 MaxPool3D
    AvgPool AvgPool3D LRN L2Loss Dilation2D

    Reshape Shape ShapeN Size Rank Squeeze ExpandDims Concat ConcatV2 Pack Unpack Split SplitV
    Slice StridedSlice Tile Pad PadV2 MirrorPad Fill ZerosLike OnesLike Range LinSpace Gather
    GatherV2 GatherNd ScatterNd TensorScatterUpdate TensorScatterAdd Where ReverseV2
    BroadcastTo BroadcastArgs BroadcastGradientArgs OneHot InvertPermutation Roll
    SpaceToBatchND BatchToSpaceND SpaceToDepth DepthToSpace ExtractImagePatches

    ResizeBilinear ResizeNearestNeighbor ResizeBicubic ResizeArea ScaleAndTranslate CropAndResize
    ImageProjectiveTransformV2 ImageProjectiveTransformV3 RGBToHSV HSVToRGB AdjustContrastv2
    AdjustHue AdjustSaturation NonMaxSuppressionV3 NonMaxSuppressionV4 NonMaxSuppressionV5

    RandomUniform RandomUniformInt RandomStandardNormal TruncatedNormal StatelessRandomUniform
    StatelessRandomNormal StatelessTruncatedNormal StatelessRandomUniformV2
    StatelessRandomNormalV2 StatelessTruncatedNormalV2 StatelessRandomUniformIntV2
    StatelessRandomGetKeyCounter StatelessRandomGetAlg StatelessRandomGetKeyCounterAlg
    RngReadAndSkip

    StringFormat AsString StringLength StringJoin Print
""".split())


def read_saved_model(path):
    """Parse a SavedModel directory's graph file without running any of it.

    Parameters
    ----------
    path : str or os.PathLike
        SavedModel directory.

    Returns
    -------
    SavedModel protocol buffer
        From :func:`pipeline.backend.tf_internals.saved_model_proto`.

    Raises
    ------
    UserError
        No graph file, or one that does not parse.
    """
    proto = saved_model_proto()  # imports TensorFlow (quietly) and its protobuf classes
    from google.protobuf import message, text_format

    folder = Path(path)
    # Same precedence as TensorFlow's loader_impl.parse_saved_model: check the file it will load.
    try:
        if (folder / "saved_model.pb").is_file():
            proto.ParseFromString((folder / "saved_model.pb").read_bytes())
        elif (folder / "saved_model.pbtxt").is_file():
            text_format.Parse((folder / "saved_model.pbtxt").read_text("utf-8"), proto)
        else:
            raise UserError(f"{folder} is not a SavedModel directory (no saved_model.pb inside)")
    except (message.DecodeError, text_format.ParseError, ValueError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read SavedModel {folder.name}: {printable(first, 200)}") from None
    return proto


def check_saved_model(path, trust_model=False) -> None:
    """Refuse a SavedModel whose graph could touch files or run code, unless trusted.

    Parameters
    ----------
    path : str or os.PathLike
        SavedModel directory.
    trust_model : bool
        Skip the check (``--trust-model``).

    Raises
    ------
    UnsafeModelError
        One line naming the offending ops and the functions holding them.
    UserError
        The graph file is missing or does not parse.
    """
    if trust_model:
        return
    found = unsafe_ops(read_saved_model(path))
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise UnsafeModelError(
            f"SavedModel {printable(Path(path).name)} runs ops outside the safe list ({shown}): "
            "loading or running it can touch files or run code; pass --trust-model "
            "(or trust_model: true) if you trust it")


def unsafe_ops(saved_model) -> list[str]:
    """Descriptions of the nodes that the allowlist refuses, e.g. ``WriteFile in __inference_f_12``.

    Parameters
    ----------
    saved_model : saved_model_pb2.SavedModel
        From :func:`read_saved_model`.

    Returns
    -------
    list of str
        Sorted, without duplicates; empty when the model is safe to load and run.
    """
    found = set()
    for meta_graph in saved_model.meta_graphs:
        library = {f.signature.name for f in meta_graph.graph_def.library.function}
        for where, node in checked_nodes(meta_graph, tf2_format(saved_model)):
            found.add(_problem(node, where, library))
    return sorted(found - {None})


def tf2_format(saved_model) -> bool:
    """Whether TensorFlow 2's object-graph loader (not ``load_v1_in_v2``) will load it."""
    metas = saved_model.meta_graphs
    return len(metas) == 1 and metas[0].HasField("object_graph_def")


def checked_nodes(meta_graph, skip_saver=True):
    """Every ``(where, NodeDef)`` the gate checks: graph nodes and library function bodies.

    Parameters
    ----------
    meta_graph : meta_graph_pb2.MetaGraphDef
    skip_saver : bool
        Leave out what only ``saver_def`` reaches (see the module docstring).

    Yields
    ------
    (str, NodeDef)
        ``where`` is ``"the graph"`` or the function's name.
    """
    nodes, functions = _saver_only(meta_graph) if skip_saver else (set(), set())
    for node in meta_graph.graph_def.node:
        if node.name not in nodes:
            yield "the graph", node
    for function in meta_graph.graph_def.library.function:
        if function.signature.name not in functions:
            for node in function.node_def:
                yield function.signature.name, node


def _problem(node, where, library):
    """Why ``node`` is refused (``"WriteFile in f"``, ``"PrintV2 to file:///x"``), or None."""
    if node.op in library or node.op in SAFE_OPS:
        return None
    if node.op == "PrintV2":
        stream = node.attr["output_stream"].s if "output_stream" in node.attr else b""
        stream = stream.decode("utf-8", "replace") or "stderr"
        return None if stream in STREAMS else f"PrintV2 to {printable(stream)}"
    op = printable(node.op) + ("" if is_registered_op(node.op) else " (not a TensorFlow op)")
    return f"{op} in {printable(where)}"


def printable(text, limit=80) -> str:
    """``text`` from a model file made safe for a one-line message: escaped, shortened.

    Parameters
    ----------
    text : str
        A name chosen by the model's author (op, function, class, module, path).
    limit : int
        Longest result, in characters.

    Returns
    -------
    str
        Newlines and terminal escape sequences shown as ``\\n``, ``\\x1b``.
    """
    shown = repr(str(text))[1:-1]
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


# ------------------------------------------------------------------- the saver sub-graph


def _saver_only(meta_graph):
    """Graph nodes and library functions reachable only from ``saver_def``'s ops."""
    graph = meta_graph.graph_def
    functions = [f.signature.name for f in graph.library.function]
    if not (_unique(n.name for n in graph.node) and _unique(functions)):
        return set(), set()  # a second definition under a saver's name would be skipped with it
    saver_nodes, kept_nodes = _saver_nodes(graph, meta_graph.saver_def)
    calls, callees = _function_calls(meta_graph), _callees(meta_graph)
    by_name = {n.name: n for n in graph.node}
    saver_functions = closure(set().union(*(calls(by_name[n]) for n in saver_nodes)), callees)
    kept = set().union(*(calls(by_name[n]) for n in kept_nodes))
    kept |= _object_graph_functions(meta_graph)
    kept |= {name for g in graph.library.gradient for name in (g.function_name, g.gradient_func)}
    kept |= set(functions) - saver_functions
    return saver_nodes, saver_functions - closure(kept, callees)


def _saver_nodes(graph, saver_def):
    """``(nodes only the saver's ops depend on, every other node)``, by data and control inputs."""
    inputs = {n.name: [_op_name(i) for i in n.input] for n in graph.node}
    roots = {_op_name(t) for t in (saver_def.save_tensor_name, saver_def.restore_op_name,
                                   saver_def.filename_tensor_name) if t} & inputs.keys()
    reached = closure(roots, lambda n: inputs.get(n, ()))
    kept = closure(inputs.keys() - reached, lambda n: inputs.get(n, ())) & inputs.keys()
    return (reached - kept) & inputs.keys(), kept


def _unique(names):
    names = list(names)
    return len(names) == len(set(names))


def _op_name(tensor_name):
    return tensor_name.lstrip("^").split(":")[0]


def closure(start, neighbours):
    """Every node reachable from the nodes ``start`` (included) through ``neighbours(node)``."""
    seen, stack = set(start), list(start)
    while stack:
        for nxt in neighbours(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _function_calls(meta_graph):
    """``node -> names of library functions it calls`` (its op, or a function-valued attr)."""
    library = {f.signature.name for f in meta_graph.graph_def.library.function}

    def calls(node):
        named = {node.op} | {name for value in node.attr.values() for name in _attr_functions(value)}
        return named & library

    return calls


def _callees(meta_graph):
    calls = _function_calls(meta_graph)
    bodies = {f.signature.name: f.node_def for f in meta_graph.graph_def.library.function}
    return lambda name: set().union(*(calls(n) for n in bodies.get(name, ())))


def _attr_functions(value):
    """Function names in an AttrValue: ``f``, ``then_branch``, ``body``, ``branches`` ..."""
    funcs = ([value.func] if value.HasField("func") else []) + list(value.list.func)
    for func in funcs:
        yield func.name
        for inner in func.attr.values():
            yield from _attr_functions(inner)


def _object_graph_functions(meta_graph):
    """Functions the TF2 loader wires into Python objects (and so may call)."""
    graph = meta_graph.object_graph_def
    names = set(graph.concrete_functions)
    for obj in graph.nodes:
        kind = obj.WhichOneof("kind")
        if kind == "function":
            names.update(obj.function.concrete_functions)
        elif kind == "bare_concrete_function":
            names.add(obj.bare_concrete_function.concrete_function_name)
        elif kind == "captured_tensor":
            names.add(obj.captured_tensor.concrete_function)
    return names
