"""Nothing in an untrusted model runs: SavedModel graphs and Keras configs are checked as data.

A SavedModel is a program: its forward pass can write files (``tf.io.write_file``, ``tf.print`` to
``file://``) and ``tf.saved_model.load`` runs its resource initializers. The gate
(:mod:`pipeline.inputs.graphscan`) parses ``saved_model.pb`` and refuses every op outside an allowlist,
in the graph and in every function of its library, before TensorFlow loads anything. Printing to
stderr is allowed: it touches no file. A Keras config passes only classes from Keras' own package,
compared exactly.

Each hostile model below writes into a ``loot`` folder when it runs; the tests check that the
file is never there after a refusal.
"""
import os

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # before TensorFlow is imported (oneDNN gradient crash)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import zipfile  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.inputs import graphscan  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.errors import UnsafeModelError, UserError  # noqa: E402
from pipeline.inputs.models import (  # noqa: E402
    check_keras_version, check_safe, class_nodes, load_model, unsafe_parts)
from pipeline.inputs.savedmodel import GraphModel  # noqa: E402
from zoo import run_cli  # noqa: E402

L = keras.layers
IMAGES = [tf.TensorSpec((None, 8, 8, 3), tf.float32)]


# ------------------------------------------------------------------------ models built once


def save_module(path, forward, **children):
    """Save a tf.Module whose serving signature is ``forward``; return ``path``."""
    module = tf.Module()
    for name, child in children.items():
        setattr(module, name, child)
    module.forward = tf.function(forward, input_signature=IMAGES)
    tf.saved_model.save(module, str(path), signatures=module.forward)
    return path


class FileWritingResource(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer writes a file: it runs inside ``tf.saved_model.load``."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def _create_resource(self):
        return tf.raw_ops.HashTableV2(key_dtype=tf.int32, value_dtype=tf.float32)

    def _initialize(self):
        return tf.io.write_file(self.target, "written while loading")


def small_cnn():
    """A functional CNN with the parts real models have: BatchNorm, Dropout, regularizers."""
    x = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4),
                 kernel_constraint=keras.constraints.MaxNorm(2.0), name="conv")(x)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Dropout(0.2, name="drop")(L.GlobalAveragePooling2D(name="gap")(h))
    h = L.Dense(3, dtype=keras.DTypePolicy("float32"), name="logits")(h)
    return keras.Model(x, L.Softmax(name="probs")(h), name="cnn")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{name: SavedModel directory}`` and the ``loot`` folder hostile models write into."""
    root = tmp_path_factory.mktemp("models")
    loot = root / "loot"
    loot.mkdir()

    def writes(x):
        tf.io.write_file(str(loot / "forward.txt"), "written by the forward pass")
        return x * 2.0

    def prints_to_file(x):
        tf.print("batch", tf.shape(x), output_stream=f"file://{loot / 'printed.txt'}")
        return x * 2.0

    def prints_to_stderr(x):
        tf.print("batch", tf.shape(x))
        return tf.nn.relu(x)

    @tf.function
    def _traced_save(x):  # traced as __inference__traced_save_<n>, the saver's own name
        tf.io.write_file(str(loot / "hidden.txt"), "hidden behind the saver's name")
        return x

    keras.utils.set_random_seed(0)
    cnn = small_cnn()
    cnn.export(str(root / "keras_export"), verbose=False)
    tf.saved_model.save(cnn, str(root / "keras_saved"))
    paths = {
        "writes_file": save_module(root / "writes_file", writes),
        "prints_to_file": save_module(root / "prints_to_file", prints_to_file),
        "prints_to_stderr": save_module(root / "prints_to_stderr", prints_to_stderr),
        "initializer_writes": save_module(root / "initializer_writes", lambda x: x * 2.0,
                                          table=FileWritingResource(str(loot / "init.txt"))),
        "hidden_in_traced_save": save_module(root / "hidden_in_traced_save",
                                             lambda x: _traced_save(x) * 2.0),
        "keras_export": root / "keras_export",
        "keras_saved": root / "keras_saved",
    }
    return paths, loot


def rewritten(src, dst, edit):
    """A copy of SavedModel ``src`` at ``dst`` whose graph proto went through ``edit``."""
    shutil.copytree(src, dst)
    proto = graphscan.read_saved_model(dst)
    edit(proto)
    (dst / "saved_model.pb").write_bytes(proto.SerializeToString())
    return dst


# ------------------------------------------------------------------- hostile SavedModels


def test_a_forward_pass_that_writes_a_file_is_refused_before_loading(models):
    paths, loot = models
    message = r"SavedModel writes_file runs ops outside the safe list \(WriteFile in __inference_"
    with pytest.raises(UnsafeModelError, match=message + r".*pass --trust-model"):
        check_safe(paths["writes_file"], trust_model=False)
    with pytest.raises(UnsafeModelError, match=message):
        load_model(paths["writes_file"])
    with pytest.raises(UnsafeModelError, match=message):  # the loader checks too, not only the CLI
        GraphModel(paths["writes_file"])
    assert not (loot / "forward.txt").exists()


def test_trust_model_loads_it_anyway(models):
    paths, _ = models
    check_safe(paths["writes_file"], trust_model=True)
    assert isinstance(load_model(paths["writes_file"], trust_model=True), GraphModel)


def test_print_to_a_file_is_refused_and_print_to_stderr_allowed(models):
    paths, loot = models
    with pytest.raises(UnsafeModelError, match=r"\(PrintV2 to file://.*printed\.txt\)"):
        check_safe(paths["prints_to_file"], trust_model=False)
    assert not (loot / "printed.txt").exists()
    check_safe(paths["prints_to_stderr"], trust_model=False)  # stderr is no file: allowed


def test_an_initializer_that_writes_a_file_is_refused_at_check_time(models):
    paths, loot = models
    with pytest.raises(UnsafeModelError, match=r"WriteFile in __inference__initializer_\d+"):
        check_safe(paths["initializer_writes"], trust_model=False)
    with pytest.raises(UnsafeModelError, match="WriteFile"):
        load_model(paths["initializer_writes"])
    assert not (loot / "init.txt").exists()
    # Why the check must come first: loading alone (no forward pass) runs the initializer.
    try:
        load_model(paths["initializer_writes"], trust_model=True)
        assert (loot / "init.txt").read_text() == "written while loading"
    finally:
        (loot / "init.txt").unlink(missing_ok=True)


def test_a_write_hidden_in_a_function_named_like_the_saver_is_found(models):
    paths, loot = models
    with pytest.raises(UnsafeModelError, match=r"WriteFile in __inference__traced_save_\d+"):
        check_safe(paths["hidden_in_traced_save"], trust_model=False)
    assert not (loot / "hidden.txt").exists()


def test_a_second_function_under_the_saver_s_name_is_checked(models, tmp_path):
    paths, _ = models

    def add_a_twin(proto):
        library = proto.meta_graphs[0].graph_def.library
        saver = next(f for f in library.function if "_traced_save_" in f.signature.name)
        twin = library.function.add()
        twin.CopyFrom(saver)
        twin.node_def.add(name="evil", op="WriteFile")

    twins = rewritten(paths["keras_export"], tmp_path / "twins", add_a_twin)
    with pytest.raises(UnsafeModelError, match=r"SaveV2 in __inference__traced_save_\d+"):
        check_safe(twins, trust_model=False)  # with twins around, no saver function is skipped
    found = graphscan.unsafe_ops(graphscan.read_saved_model(twins))
    assert any(re.fullmatch(r"WriteFile in __inference__traced_save_\d+", f) for f in found)


def test_an_op_unknown_to_tensorflow_is_refused(models, tmp_path):
    paths, _ = models

    def use_a_custom_op(proto):
        for function in proto.meta_graphs[0].graph_def.library.function:
            for node in function.node_def:
                if node.op == "Relu":
                    node.op = "MyFastRelu"

    custom = rewritten(paths["prints_to_stderr"], tmp_path / "custom", use_a_custom_op)
    with pytest.raises(UnsafeModelError, match=r"MyFastRelu \(not a TensorFlow op\) in __inference"):
        check_safe(custom, trust_model=False)


def test_ops_added_to_the_graph_itself_are_found_and_named_in_one_line(models, tmp_path):
    paths, _ = models

    def add_nodes(proto):
        graph = proto.meta_graphs[0].graph_def
        graph.node.add(name="evil", op="WriteFile")
        graph.node.add(name="sneaky", op="Odd\nerror: all fine\x1b[2J")

    edited = rewritten(paths["keras_export"], tmp_path / "edited", add_nodes)
    with pytest.raises(UnsafeModelError) as refused:
        check_safe(edited, trust_model=False)
    message = str(refused.value)
    assert "WriteFile in the graph" in message
    assert r"Odd\nerror: all fine\x1b[2J (not a TensorFlow op) in the graph" in message
    assert "\n" not in message and "\x1b" not in message


def test_a_tf1_format_model_keeps_its_saver_checked(models, tmp_path):
    # Without an object graph TensorFlow loads through load_v1_in_v2, which runs the restore op.
    paths, _ = models
    tf1 = rewritten(paths["keras_export"], tmp_path / "tf1",
                    lambda proto: proto.meta_graphs[0].ClearField("object_graph_def"))
    with pytest.raises(UnsafeModelError, match="RestoreV2 in __inference__traced_restore_"):
        check_safe(tf1, trust_model=False)


def test_the_text_format_graph_is_checked_too(models, tmp_path):
    from google.protobuf import text_format

    paths, _ = models
    text = tmp_path / "text"
    shutil.copytree(paths["writes_file"], text)
    proto = graphscan.read_saved_model(text)
    (text / "saved_model.pb").unlink()
    (text / "saved_model.pbtxt").write_text(text_format.MessageToString(proto))
    with pytest.raises(UnsafeModelError, match="WriteFile"):
        check_safe(text, trust_model=False)


def test_a_graph_file_that_does_not_parse_is_a_one_line_user_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "saved_model.pb").write_bytes(b"\x0a\xff\xff\xff not a proto")
    with pytest.raises(UserError, match=r"^cannot read SavedModel broken: [^\n]+$"):
        check_safe(tmp_path / "broken", trust_model=False)


def test_the_cli_refuses_a_hostile_model_in_one_line(models):
    paths, loot = models
    result = run_cli("layers", paths["initializer_writes"])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        "error: SavedModel initializer_writes runs ops outside the safe list (WriteFile in")
    assert "Traceback" not in result.stderr
    assert not (loot / "init.txt").exists()


# ------------------------------------------------------------------ real SavedModels pass


def test_keras_saved_models_pass_with_their_saver_subgraph_excluded(models):
    paths, _ = models
    for name in ("keras_export", "keras_saved"):
        proto = graphscan.read_saved_model(paths[name])
        assert graphscan.unsafe_ops(proto) == [], name
        _, skipped = graphscan._saver_only(proto.meta_graphs[0])
        assert sorted(re.sub(r"_\d+$", "", f) for f in skipped) == [
            "__inference__traced_restore", "__inference__traced_save"], name


def test_the_cli_lists_the_layers_of_a_keras_export(models, capsys):
    paths, _ = models
    assert main(["layers", str(paths["keras_export"])]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "Conv2D" in out


def test_a_keras_model_saved_with_tf_saved_model_save_is_listed(models, capsys):
    paths, _ = models
    assert main(["layers", str(paths["keras_saved"])]) == 0
    assert "Conv2D" in capsys.readouterr().out


# -------------------------------------------------------------------------- Keras configs


def layer(module, class_name):
    return {"module": module, "class_name": class_name, "config": {"name": "x"}, "registered_name": None}


@pytest.mark.parametrize("module, class_name", [
    ("kerasevil.layers", "Dense"),                     # a prefix of "keras" is not Keras
    ("keras_evil", "Dense"),
    ("numpy.testing._private.utils", "measure"),       # numpy is not written by Keras 3.15
    ("numpy", "load"),
    ("builtins_evil", "function"),
    ("builtins", "eval"),                              # builtins only for functions saved by name
    ("os", "system"),
])
def test_module_names_are_compared_exactly(module, class_name):
    config = {"module": "keras", "class_name": "Functional",
              "config": {"layers": [layer("keras.layers", "Conv2D"), layer(module, class_name)]}}
    assert unsafe_parts(config) == [f"custom object '{class_name}' (module '{module}')"]


def test_a_keras_layer_that_loads_a_saved_model_is_refused():
    config = {"module": "keras", "class_name": "Functional", "config": {"layers": [
        {"module": "keras.layers", "class_name": "TFSMLayer", "config": {"name": "outside",
                                                                      "filepath": "/elsewhere"}}]}}
    assert unsafe_parts(config) == ["TFSMLayer 'outside' (loads a SavedModel from a path in the file)"]


def test_a_module_less_class_needs_to_be_a_known_keras_class():
    config = {"class_name": "Functional", "config": {"layers": [{"class_name": "Evil", "config": {}}]}}
    assert unsafe_parts(config, known_classes={"Functional", "Conv2D"}) == ["custom object 'Evil'"]
    assert unsafe_parts(config) == ["custom object 'Evil'", "custom object 'Functional'"]


def test_real_keras_configs_pass(tmp_path):
    model = small_cnn()
    # Loss and metric *functions* are written as module "builtins", class "function".
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.sparse_categorical_crossentropy,
                  metrics=[keras.metrics.sparse_categorical_accuracy])
    model.save(tmp_path / "cnn.keras")
    config = json.loads(zipfile.ZipFile(tmp_path / "cnn.keras").read("config.json"))
    assert ("builtins", "function") in {(n.get("module"), n["class_name"]) for n in class_nodes(config)}
    assert unsafe_parts(config) == []
    check_safe(tmp_path / "cnn.keras", trust_model=False)


@pytest.mark.parametrize("version, refused", [("3.8.0", True), ("3.13.2", True), ("3.14.0", False),
                                              ("3.15.1", False), ("4.0.0rc1", False)])
def test_keras_with_known_safe_mode_bypasses_is_refused(version, refused):
    if refused:
        with pytest.raises(UserError, match=rf"^Keras {version} has known safe_mode bypasses .*"
                                            r"upgrade Keras \(pip install 'keras>=3.14'\)"):
            check_keras_version(version)
    else:
        check_keras_version(version)


def test_old_keras_is_refused_before_reading_an_untrusted_file(tmp_path, monkeypatch):
    from importlib import metadata

    model = tmp_path / "cnn.keras"
    small_cnn().save(model)
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "3.13.0" if name == "keras" else real_version(name))
    with pytest.raises(UserError, match="Keras 3.13.0 has known safe_mode bypasses"):
        check_safe(model, trust_model=False)
    check_safe(model, trust_model=True)
