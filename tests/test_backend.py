"""pipeline.backend: one quiet TensorFlow import, and every private TF/Keras API behind a checked shim.

Each shim is shown to work on the installed versions (tiny models built here), to fall back where
its callers have a fallback, and, with an untested version, to warn exactly once per process.
Also: the facts that used to be copied (TensorFlow's environment, slug, softmax) are defined once.
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow is imported (DESIGN.md)

import configparser
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.backend import keras_internals as K
from pipeline.backend import tf_internals as T
from pipeline.backend import versions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fresh_checks(monkeypatch):
    """Forget which versions this process already checked (the check runs once per process)."""
    monkeypatch.setattr(versions, "_checked", {})


def _untested(monkeypatch, package, version):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda p: version if p == package else real(p))


def _functional_model(keras):
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, keras.layers.Conv2D(4, 1, name="inner_conv")(inner_in), name="inner")
    x = keras.Input((6, 6, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    b = inner(a)
    y = keras.layers.Add(name="add")([a, b])
    y = keras.layers.GlobalAveragePooling2D(name="pool")(y)
    y = keras.layers.Dense(2, name="dense")(y)
    return keras.Model(x, y)


# --------------------------------------------------------------------------- versions


def test_tested_ranges_are_setup_cfg_pins():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    text = cfg["options"]["install_requires"]
    pins = {name: (low, high) for name, low, high in re.findall(r"^\s*(tensorflow|keras)>=([\d.]+),<([\d.]+)", text, re.M)}
    assert pins == versions.TESTED


def test_installed_versions_are_in_range_and_do_not_warn(keras, fresh_checks):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert versions.check("tensorflow") and versions.check("keras")


@pytest.mark.parametrize("version, ok", [("2.18.0", True), ("2.21.3", True), ("2.22.0", False),
                                         ("2.22.0rc1", False), ("2.17.1", False), ("3.0", False)])
def test_range_bounds(monkeypatch, fresh_checks, version, ok):
    _untested(monkeypatch, "tensorflow", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert versions.check("tensorflow") is ok
    assert len(caught) == (0 if ok else 1)


def test_untested_keras_warns_once_and_the_shims_still_work(keras, monkeypatch, fresh_checks):
    _untested(monkeypatch, "keras", "3.99.0")
    model = _functional_model(keras)
    with pytest.warns(versions.UntestedVersionWarning) as caught:
        for _ in range(3):
            assert K.functional(model) is model
            assert K.producer(model.outputs[0]).name == "dense"
            assert K.takes_training(model.layers[1])
            assert K.model_edges(type("M", (), {"model": model})())
            with K.fresh_layer_names():
                pass
    assert len(caught) == 1
    assert "keras 3.99.0" in str(caught[0].message) and ">=3.14,<3.16" in str(caught[0].message)


def test_untested_tensorflow_warns_once_and_the_shims_still_work(tf, monkeypatch, fresh_checks):
    _untested(monkeypatch, "tensorflow", "2.30.0")
    with pytest.warns(versions.UntestedVersionWarning) as caught:
        for _ in range(3):
            assert T.is_registered_op("Conv2D")
            assert T.saved_model_proto().meta_graphs is not None
            with T.gradient_override("Relu", lambda op, grad: grad) as swapped:
                assert swapped
    assert len(caught) == 1
    assert "tensorflow 2.30.0" in str(caught[0].message)


# --------------------------------------------------------------------------- Keras shims


def test_functional_finds_the_graph_of_functional_and_sequential_models_only(keras):
    model = _functional_model(keras)
    assert K.functional(model) is model
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert K.functional(seq) is not None and K.functional(seq) is not seq

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Sub()
    sub(np.zeros((1, 4), np.float32))
    assert K.functional(sub) is None
    assert K.functional(object()) is None  # internals missing: "not a functional graph"


def test_run_graph_calls_each_operation_and_matches_the_model(keras):
    model = _functional_model(keras)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    seen = []

    def operation_fn(op):
        def call(*args, **kwargs):
            seen.append(op.name)
            return op(*args, **kwargs)

        return call

    out = K.run_graph(K.functional(model), x, operation_fn)
    out = out[0] if isinstance(out, (list, tuple)) else out
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    assert seen == ["conv", "inner", "add", "pool", "dense"]


def test_takes_training_and_producer(keras):
    model = _functional_model(keras)
    assert K.takes_training(keras.layers.Dropout(0.5))
    assert K.takes_training(object())  # unknown: Keras' default, pass training=False
    assert K.producer(model.outputs[0]) is model.get_layer("dense")
    assert K.producer(np.zeros(3)) is None


def test_model_edges_include_nested_models(keras):
    edges = K.model_edges(type("M", (), {"model": _functional_model(keras)})())
    assert ("conv", "inner") in edges and ("conv", "add") in edges
    assert ("inner/inner_conv", "add") in edges  # out of the nested model: its producing layer
    assert ("add", "pool") in edges and ("pool", "dense") in edges
    assert K.model_edges(object()) is None


def test_tracked_layers_lists_direct_sublayers_in_order(keras):
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.first = keras.layers.Dense(2, name="first")
            self.second = keras.layers.Dense(2, name="second")

        def call(self, x):
            return self.second(self.first(x))

    assert [l.name for l in K.tracked_layers(Block())] == ["first", "second"]
    assert K.tracked_layers(object()) == []


def test_fresh_layer_names_count_from_zero_and_restore_the_counters(keras):
    keras.layers.Dense(1, name=None)  # make sure the process counter is past zero
    before = keras.layers.Dense(1).name
    with K.fresh_layer_names():
        assert keras.layers.Dense(1).name == "dense"
    after = keras.layers.Dense(1).name
    assert int(after.rsplit("_", 1)[1]) == int(before.rsplit("_", 1)[1]) + 1


# --------------------------------------------------------------------------- TensorFlow shims


def _scaled(tf):
    module = tf.Module()
    module.inner = tf.Module()
    module.inner.w = tf.Variable(3.0, name="w")
    module.b = tf.Variable(1.0, name="b")
    fn = tf.function(lambda x: tf.nn.relu(x * module.inner.w + module.b)).get_concrete_function(
        tf.TensorSpec([None], tf.float32))
    return module, fn


def test_frozen_graph_def_has_constants_for_variables(tf, monkeypatch):
    module, fn = _scaled(tf)
    ops = {n.op for n in T.frozen_graph_def(fn).node}
    assert "ReadVariableOp" not in ops and "VarHandleOp" not in ops and "Relu" in ops
    import tensorflow.python.framework as framework

    public = framework.convert_to_constants.convert_variables_to_constants_v2
    # The private helpers moved: only the public function is left, and it is used.
    monkeypatch.setattr(framework, "convert_to_constants", type("M", (), {"convert_variables_to_constants_v2": public}))
    ops = {n.op for n in T.frozen_graph_def(fn, aggressive_inlining=True).node}
    assert "ReadVariableOp" not in ops and "Relu" in ops


def test_captures_and_tracked_variables(tf):
    module, fn = _scaled(tf)
    handles = {id(v.handle) for v in (module.inner.w, module.b)}
    assert {id(external) for external, _ in T.captures(fn)} == handles
    assert T.captures(object()) == []
    assert sorted(v.name for v in T.tracked_variables(module)) == ["b:0", "w:0"]


def test_gradient_override_swaps_and_restores(tf, monkeypatch):
    x = tf.constant([-1.0, 2.0])

    def grad():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.nn.relu(x))
        return tape.gradient(y, x).numpy().tolist()

    with T.gradient_override("Relu", lambda op, g: g * 5.0) as swapped:
        assert swapped and grad() == [5.0, 5.0]
    assert grad() == [0.0, 1.0]
    from tensorflow.python.framework import ops

    monkeypatch.setattr(ops, "_gradient_registry", None)  # registry moved: nothing changes
    with T.gradient_override("Relu", lambda op, g: g * 5.0) as swapped:
        assert not swapped


def test_registered_ops_and_saved_model_proto(tf):
    assert T.is_registered_op("Conv2D") and not T.is_registered_op("NoSuchOpAnywhere")
    proto = T.saved_model_proto()
    proto.ParseFromString(b"")
    assert len(proto.meta_graphs) == 0


def test_no_private_tf_or_keras_access_outside_backend():
    """Callers import only the shims: no TF/Keras private module or attribute outside pipeline/backend."""
    private = re.compile(r"tensorflow\.(python|core)|keras\.src|\._(keras_history|nodes_by_depth|run_through_graph|"
                         r"standardize_inputs|call_context_args|functional|flatten_layers|layers|trackable_children|"
                         r"gradient_registry|registry)\b|\"_(functional|flatten_layers|layers|call_context_args)\"")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "pipeline").rglob("*.py"))
             if "backend" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if private.search(line.split("#")[0]) and "``" not in line]
    assert found == []


# --------------------------------------------------------------------------- facts defined once


def test_tensorflow_environment_is_defined_once(monkeypatch):
    from pipeline.backend.tf import TF_ENV, set_env
    from pipeline.engines.cluster import WORKER_ENV

    ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    assert WORKER_ENV == TF_ENV == {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3",
                                    "TF_CPU_ALLOCATOR_USE_BFC": "1", "TF_CPU_BFC_MEM_LIMIT_IN_MB": str(ram_mb)}
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")  # the user's choice is kept
    set_env()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"


def test_cpu_tensors_come_from_tensorflows_pool_whose_limit_the_user_may_set(tmp_path):
    """The pipeline's TensorFlow allocates CPU tensors from its BFC pool (no mmap per batch): with the
    user's 200 MB limit a 400 MB tensor is refused with TensorFlow's own out-of-memory error."""
    import subprocess
    import sys

    code = ("from pipeline.backend.tf import tensorflow\n"
            "tf = tensorflow()\n"
            "tf.reduce_sum(tf.ones([25, 1024, 1024])).numpy()\n"   # 100 MB: within the limit
            "try:\n"
            "    tf.reduce_sum(tf.ones([100, 1024, 1024])).numpy()\n"
            "    print('allocated')\n"
            "except tf.errors.ResourceExhaustedError:\n"
            "    print('refused')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPU_")}

    def start(**extra):  # both interpreters at once: most of each one's time is importing TensorFlow
        return subprocess.Popen([sys.executable, "-c", code], env={**env, **extra}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    limited = start(TF_CPU_BFC_MEM_LIMIT_IN_MB="200")
    # The user's own allocator choice is kept: malloc has no such limit.
    plain = start(TF_CPU_ALLOCATOR_USE_BFC="0", TF_CPU_BFC_MEM_LIMIT_IN_MB="200")
    try:
        for proc, expected in ((limited, "refused"), (plain, "allocated")):
            out, err = proc.communicate(timeout=300)
            assert out.split() == [expected], err[-2000:]
    finally:
        limited.kill(), plain.kill()


def test_projector_folders_are_plain_names_or_the_report_slug():
    from pipeline.orchestration.export import folder_name
    from pipeline.report.names import slug

    assert folder_name("conv_b") == "conv_b" and folder_name("block1.conv") == "block1.conv"
    assert folder_name("outer/inner") == slug("outer/inner")
    names = ["a/b", "a_b", "a-b", "Conv", "conv", ".", "..", ""]
    assert len({folder_name(n) for n in names}) == len(names)
    assert all("/" not in folder_name(n) and folder_name(n) not in (".", "..", "") for n in names)


def test_one_softmax_for_verdicts_and_report():
    from pipeline.report import data
    from pipeline.shortcuts import verdicts

    assert data.softmax is verdicts.softmax
    p = verdicts.softmax(np.array([[0.0, 0.0], [1000.0, 0.0]], np.float32))
    np.testing.assert_allclose(p, [[0.5, 0.5], [1.0, 0.0]])
