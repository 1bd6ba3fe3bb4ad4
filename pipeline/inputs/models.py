"""Load a user's model safely and expose its layers for extraction.

Keras files (``.keras``, ``.h5``) are inspected *before* loading: a Lambda layer or a class that is
not part of Keras means loading would run the author's code, so it is refused unless the user
passes ``--trust-model``; so is any Keras file when the installed Keras has known ``safe_mode``
bypasses. SavedModel directories are programs: their graph is checked by :mod:`pipeline.inputs.graphscan`
and loaded by :mod:`pipeline.inputs.savedmodel`.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import sys
import zipfile
from pathlib import Path

from pipeline.backend.keras_internals import fresh_layer_names, functional, producer, run_graph, takes_training
from pipeline.backend.versions import release
from pipeline.errors import UnsafeModelError, UserError, first_line
from pipeline.inputs.graphscan import check_saved_model, printable
from pipeline.inputs.logits import without_softmax
from pipeline.inputs.modelinfo import LayerInfo, analysable_shape
from pipeline.inputs.precision import FLOAT32, cpu_note, float32_outputs, mixed_clone, not_applicable

# Markers Keras writes without a module for plain values (tensors' shapes, tuples, bytes...).
_VALUE_MARKERS = frozenset({"__keras_tensor__", "__tuple__", "__bytes__", "__slice__", "__ellipsis__",
                            "__numpy__", "__tensor__"})
# The one non-Keras (module, class) Keras 3.15 writes: a loss/metric/activation function saved by
# name (compile configs), which Keras resolves among its own functions only. It never writes numpy.
_PLAIN_OBJECTS = frozenset({("builtins", "function")})
# safe_mode bypasses: CVE-2025-1550 (< 3.9), CVE-2025-12060, CVE-2026-1462 (< 3.14).
SAFE_KERAS = (3, 14)


def model_kind(path) -> str:
    """``keras``, ``h5`` or ``savedmodel`` from the path, or a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if p.is_dir():
        if (p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists():
            return "savedmodel"
        raise UserError(f"{p} is a directory but not a SavedModel (no saved_model.pb)")
    suffix = p.suffix.lower()
    if suffix == ".keras":
        return "keras"
    if suffix in (".h5", ".hdf5"):
        return "h5"
    raise UserError(f"unsupported model file {p.name}: use .keras, .h5 or a SavedModel directory")


def read_keras_config(path) -> dict:
    """The architecture JSON of a ``.keras`` or ``.h5`` file, read without running any model code."""
    kind = model_kind(path)
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise UserError(f"{path} holds weights only (no model_config): save the whole model")
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise UserError(f"cannot read model {path}: {exc}") from None


def unsafe_parts(config, known_classes=None) -> list[str]:
    """Names of layers/objects in a Keras config that would run user code when deserialised.

    A class passes when its module is Keras' own package (``keras`` or ``keras.*``, compared
    exactly: ``kerasevil`` does not pass), or it is a function Keras saved by name under
    ``builtins``, or it is one of Keras' module-less value markers (``__keras_tensor__`` ...).

    Parameters
    ----------
    config : dict
        Architecture JSON from :func:`read_keras_config`.
    known_classes : set of str, optional
        Class names Keras provides; needed for legacy ``.h5`` configs, which carry no module.
        Without it a module-less class other than a value marker is refused.

    Returns
    -------
    list of str
        Sorted descriptions such as ``"Lambda layer 'double'"``; empty when the config is safe.
    """
    found = {what for node in class_nodes(config) if (what := _unsafe_node(node, known_classes))}
    return sorted(found)


def _unsafe_node(node, known_classes):
    """Why one serialised object is refused, in words; None when it is Keras' own."""
    cls = node["class_name"]
    module = node.get("module")
    inner = node.get("config")
    name = inner.get("name", cls) if isinstance(inner, dict) else cls
    if cls == "Lambda":
        return f"Lambda layer '{printable(name)}'"
    if cls == "__lambda__":
        return "a stored Python function"
    if cls == "TFSMLayer":  # Keras >= 3.14 refuses it in safe_mode too; say why here
        return f"TFSMLayer '{printable(name)}' (loads a SavedModel from a path in the file)"
    if module:
        if isinstance(module, str) and (_keras_module(module) or (module, cls) in _PLAIN_OBJECTS):
            return None
        return f"custom object '{printable(cls)}' (module '{printable(module)}')"
    if cls in _VALUE_MARKERS or (known_classes is not None and cls in known_classes):
        return None
    return f"custom object '{printable(cls)}'"


def _keras_module(module) -> bool:
    return module == "keras" or module.startswith("keras.")


def class_nodes(node):
    """Every serialised object of a Keras config (a dict with a ``class_name``), depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("class_name"), str):
            yield node
        for v in node.values():
            yield from class_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from class_nodes(v)


def _keras_class_names() -> set:
    """Every public class name Keras can deserialise without user code."""
    from pipeline.backend.tf import tensorflow

    tensorflow()
    import keras

    names = {"Functional", "Sequential", "Model", "__tuple__", "__keras_tensor__", "__ellipsis__", "__slice__", "__numpy__", "__bytes__", "__tensor__",
             "DTypePolicy", "FloatDTypePolicy", "QuantizedDTypePolicy"}
    for mod in (keras.layers, keras.initializers, keras.regularizers, keras.constraints,
                keras.activations, keras.optimizers, keras.losses, keras.metrics, keras.dtype_policies):
        names.update(n for n in dir(mod) if not n.startswith("_"))
    return names


def check_safe(path, trust_model: bool) -> None:
    """Refuse a model whose loading would run its author's code, unless trusted.

    Reads the file as data only; called by the CLI before anything is written, and by
    :func:`load_model`.

    Parameters
    ----------
    path : str or Path
        ``.keras``/``.h5`` file or SavedModel directory.
    trust_model : bool
        ``--trust-model``: skip every check.

    Raises
    ------
    UnsafeModelError
        Lambda layers or custom objects in a Keras file, or ops outside the allowlist in a
        SavedModel (:func:`pipeline.inputs.graphscan.check_saved_model`).
    UserError
        The file cannot be read, or Keras is older than 3.14 (known ``safe_mode`` bypasses).
    """
    if trust_model:
        return
    kind = model_kind(path)
    if kind == "savedmodel":
        check_saved_model(path)
        return
    check_keras_version()
    known = _keras_class_names() if kind == "h5" else None
    bad = unsafe_parts(read_keras_config(path), known)
    if bad:
        raise UnsafeModelError(
            f"model {Path(path).name} contains {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}: "
            "loading it runs code from the file; pass --trust-model (or trust_model: true) if you trust it")


def check_keras_version(installed=None) -> None:
    """Refuse to load an untrusted Keras file with a Keras whose ``safe_mode`` can be bypassed.

    Parameters
    ----------
    installed : str, optional
        Version to judge; the installed ``keras`` distribution's by default (read from its
        metadata, without importing Keras). Nothing is checked when Keras is not installed.

    Raises
    ------
    UserError
        The version is older than :data:`SAFE_KERAS`.
    """
    if installed is None:
        from importlib import metadata

        try:
            installed = metadata.version("keras")
        except metadata.PackageNotFoundError:
            return  # loading will fail with its own message
    if release(installed) < SAFE_KERAS:
        wanted = ".".join(map(str, SAFE_KERAS))
        raise UserError(
            f"Keras {installed} has known safe_mode bypasses (CVE-2025-1550, CVE-2025-12060, "
            f"CVE-2026-1462): upgrade Keras (pip install 'keras>={wanted}') or pass --trust-model "
            "if you trust this model")


def load_model(path, trust_model: bool = False, precision: str = "float32", log=None):
    """Load a model for analysis.

    Parameters
    ----------
    path : str or Path
        ``.keras``/``.h5`` file or SavedModel directory.
    trust_model : bool
        Allow Lambda layers, custom objects and SavedModel ops outside the allowlist (runs code
        stored in the file).
    precision : {"float32", "mixed_float16", "mixed_bfloat16"}
        ``compute.precision``: the layers of a functional or Sequential Keras model compute in
        float16/bfloat16 (:func:`with_precision`); SavedModels and subclassed models stay float32.
    log : callable, optional
        Receives the one-line notes about the precision (e.g. ``ctx.log``); none are shown without it.

    Returns
    -------
    KerasModel or pipeline.inputs.savedmodel.GraphModel
    """
    if model_kind(path) == "savedmodel":
        from pipeline.inputs.savedmodel import GraphModel
        from pipeline.backend.tf import tensorflow

        tensorflow()
        graph = GraphModel(path, trust_model=trust_model)  # checks the graph before loading it
        return with_precision(graph, precision, log)
    check_safe(path, trust_model)
    from pipeline.backend.tf import tensorflow

    tensorflow()
    import keras

    layer_names = contextlib.nullcontext()
    if trust_model:
        # Lambda layers in .keras files need unsafe deserialisation to be enabled globally.
        keras.config.enable_unsafe_deserialization()
        _import_custom_modules(read_keras_config(path))
        # A subclassed model is rebuilt by running its __init__: layers created without a name get
        # conv2d, conv2d_1... from a per-process counter, so without fresh counters their addresses
        # would depend on what the process loaded before (extract and maximize would disagree).
        layer_names = fresh_layer_names()
    try:
        with layer_names:
            model = keras.models.load_model(path, compile=False, safe_mode=not trust_model)
    except Exception as exc:  # Keras raises many types here; all mean "this file cannot be used"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = msg.split(" Full object config")[0]  # Keras appends the whole config to this line
        raise UserError(f"cannot load model {Path(path).name}: {msg}") from None
    return with_precision(KerasModel(model, name=Path(path).stem), precision, log)


def with_precision(model, precision, log=None):
    """``model`` computing under ``precision`` (``compute.precision``), its outputs still float32.

    A functional or Sequential :class:`KerasModel` becomes a mixed-precision copy
    (:func:`pipeline.inputs.precision.mixed_clone`); any other model (a SavedModel's
    ``GraphModel``, a subclassed model, one Keras cannot clone) is returned as it is, in float32,
    with a one-line note to ``log``. On a machine without a GPU a note says mixed precision is
    usually slower there.
    """
    if precision == FLOAT32:
        return model
    say = log or (lambda msg: None)
    if not isinstance(model, KerasModel) or model._taps is not None:
        what = "this SavedModel" if not isinstance(model, KerasModel) else f"the subclassed model {model.name}"
        say(not_applicable(precision, what))
        return model
    try:
        clone = mixed_clone(model.model, precision)
    except Exception as exc:  # Keras raises many types for a model it cannot rebuild from its config
        reason = first_line(exc, 120)
        say(not_applicable(precision, f"model {model.name} cannot be copied ({reason}) and"))
        return model
    from pipeline.backend.tf import gpus

    if not gpus():
        say(cpu_note(precision))
    return KerasModel(clone, name=model.name, precision=precision)


def _import_custom_modules(config) -> None:
    """Import the modules a trusted model's custom classes come from, so their
    ``@keras.saving.register_keras_serializable`` decorators run before Keras looks them up
    (Keras itself imports only its own packages). ``__main__`` cannot be imported: such a class
    must be moved to a module on ``PYTHONPATH``; Keras then reports it as not found."""
    modules = {node["module"] for node in class_nodes(config)
               if isinstance(node.get("module"), str) and node["module"]}
    for module in sorted(modules):
        if module.split(".")[0] in ("keras", "builtins", "numpy", "__main__") or module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # the module's own code may fail in any way
            raise UserError(f"cannot import module '{module}' that the model's custom objects come from "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            "put it on PYTHONPATH") from None


class KerasModel:
    """A Keras 3 model whose layers, including those of nested sub-models, can be tapped.

    Parameters
    ----------
    model : keras.Model
        A built functional, Sequential or subclassed model. A subclassed model (its own
        ``call``) is tapped through its tracked sub-layers while ``call`` runs
        (:mod:`pipeline.inputs.subclassed`); its input shape comes from its build config.
    name : str
        Shown in reports.
    precision : str
        The compute dtype policy the layers of ``model`` were given (:func:`with_precision`); when it
        is not float32, :meth:`build_extractor` casts what it returns to float32.
    """

    def __init__(self, model, name="model", precision=FLOAT32):
        self.model = model
        self.name = name
        self.precision = precision
        self._taps = None
        if functional(model) is None:
            from pipeline.inputs.subclassed import CallTaps

            self._taps = CallTaps(model, name)
            self.input_shape, self.layers = self._taps.input_shape, self._taps.layers
            self._by_name = self._taps.sublayers
            return
        if len(model.inputs) != 1:
            raise UserError(f"model {name} has {len(model.inputs)} inputs: only single-image-input models are supported")
        shape = tuple(model.inputs[0].shape[1:])
        if len(shape) != 3:
            raise UserError(f"model {name} input shape {shape} is not an image (H, W, C)")
        self.input_shape = shape
        self.layers = [info for info, _ in _walk_layers(model, "")]
        self._by_name = {info.name: layer for info, layer in _walk_layers(model, "")}

    def build_extractor(self, layer_names):
        """Return ``fn(x) -> (list of layer outputs, logits)`` for use inside a ``tf.function``.

        Logits are the pre-softmax values when the model ends in a softmax (a Dense layer with
        softmax activation, an ``Activation('softmax')`` or a ``Softmax`` layer).
        """
        unknown = [n for n in layer_names if n not in self._by_name]
        if unknown:
            raise UserError(f"unknown layer '{unknown[0]}' (see `python -m pipeline layers MODEL`)")
        if self._taps is not None:
            return self._taps.build_extractor(layer_names)
        wanted = set(layer_names)
        outputs = getattr(self.model, "outputs", None)
        out_layer = producer(outputs[0]) if outputs else None  # its softmax is left out of the logits
        model = self.model

        def extract(x):
            taps = {}
            logits = _tapped_call(model, x, wanted, "", taps, pre_softmax=out_layer)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            return [taps[n] for n in layer_names], logits

        return extract if self.precision == FLOAT32 else float32_outputs(extract, self.precision)


def _tapped_call(model, x, wanted, prefix, taps, pre_softmax=None):
    """Run ``model`` on ``x`` in inference mode, recording outputs of the layers named in ``wanted``.

    Nested functional sub-models are run layer by layer so their inner layers can be tapped.
    """
    graph = functional(model)
    if graph is None:
        return model(x, training=False)

    def operation_fn(op):
        def call(*args, **kwargs):
            name = prefix + op.name
            if takes_training(op):
                kwargs["training"] = False
            if functional(op) is not None and any(w.startswith(name + "/") for w in wanted):
                y = _tapped_call(op, args[0], wanted, name + "/", taps)
            elif op is pre_softmax:
                y = without_softmax(op, args, kwargs)
                if y is None:
                    y = op(*args, **kwargs)
            else:
                y = op(*args, **kwargs)
            if name in wanted and name not in taps:
                taps[name] = y
            return y

        return call

    outputs = run_graph(graph, x, operation_fn)
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs


def _walk_layers(model, prefix):
    """Yield ``(LayerInfo, layer)`` for every layer, descending into functional sub-models."""
    for layer in model.layers:
        name = prefix + layer.name
        if functional(layer) is not None and layer is not model:
            yield _info(layer, name), layer
            yield from _walk_layers(layer, name + "/")
            continue
        yield _info(layer, name), layer


def _info(layer, name) -> LayerInfo:
    cls = type(layer).__name__
    if cls == "InputLayer":
        return LayerInfo(name, cls, tuple(layer.output.shape[1:]), False, "input layer")
    try:
        out = layer.output
    except (AttributeError, ValueError) as exc:
        return LayerInfo(name, cls, None, False, f"output not defined ({str(exc).splitlines()[0][:60]})")
    if isinstance(out, (list, tuple)):
        return LayerInfo(name, cls, None, False, "several outputs")
    shape = tuple(out.shape[1:])
    ok, reason = analysable_shape(shape)
    if ok and "float" not in str(out.dtype):
        ok, reason = False, f"dtype {out.dtype}"
    return LayerInfo(name, cls, shape, ok, reason)
