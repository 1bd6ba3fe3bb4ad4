"""GraphModel: intermediate layers of a SavedModel directory, checked against the Keras model.

Each tiny model is built with Keras 3, exported with ``model.export(dir)`` and loaded back as a
graph. Keras 3 graphs name layer ``conv1``'s scope ``conv1_1``; GraphModel gives the Keras names
back, and nested models give ``inner/conv``.
"""
import os

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # before TensorFlow is imported (oneDNN gradient crash)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.errors import UserError  # noqa: E402
from pipeline.inputs.savedmodel import GraphModel  # noqa: E402

L = keras.layers


def sequential_cnn():
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        L.Conv2D(4, 3, activation="relu", name="conv1"),
        L.MaxPooling2D(name="pool"),
        L.Conv2D(5, 1, activation="relu", name="conv2"),
        L.Flatten(name="flat"),
        L.Dense(3, activation="softmax", name="probs"),
    ], name="seq")


def branched():
    x = keras.Input((8, 8, 3))
    stem = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(x)
    a = L.Conv2D(3, 3, padding="same", activation="relu", name="branch_a")(stem)
    b = L.Conv2D(1, 1, activation="relu", name="branch_b")(stem)
    mix = L.Conv2D(4, 1, name="mix")(L.Concatenate(name="cat")([a, b]))
    total = L.Add(name="sum")([mix, stem])
    pooled = L.GlobalAveragePooling2D(name="gap")(total)
    return keras.Model(x, L.Dense(3, activation="softmax", name="probs")(pooled), name="branched")


def nested():
    y = keras.Input((8, 8, 4))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(y)
    inner = keras.Model(y, L.Conv2D(2, 1, name="conv_b")(h), name="inner")
    x = keras.Input((8, 8, 3))
    h = inner(L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(x))
    probs = L.Dense(3, activation="softmax", name="probs")(L.GlobalAveragePooling2D(name="gap")(h))
    return keras.Model(x, probs, name="outer")


def batchnorm():
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        L.Conv2D(4, 3, name="conv1"),
        L.BatchNormalization(name="bn"),
        L.ReLU(name="relu"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(3, activation="softmax", name="probs"),
    ])
    rng = np.random.default_rng(1)  # moving statistics far from (0, 1), so bn is not identity
    gamma, beta, mean, var = (rng.uniform(0.5, 2.0, 4).astype("float32") for _ in range(4))
    model.get_layer("bn").set_weights([gamma, beta - 1.0, mean - 1.0, var])
    return model


def depthwise():
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        L.DepthwiseConv2D(3, padding="same", name="dw"),
        L.Conv2D(4, 1, activation="relu", name="pw"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(2, name="logits"),  # no softmax: the graph output is the logits
    ])


def inner_reference(model, x):
    """Keras outputs of the layers inside the nested model ``inner``."""
    inner = model.get_layer("inner")
    into = keras.Model(model.inputs[0], model.get_layer("conv1").output)(x)
    return {f"inner/{name}": keras.Model(inner.input, inner.get_layer(name).output)(into)
            for name in ("conv", "conv_b")}


# kind: (builder, layers compared with Keras, expected layer types, dense layer making logits)
CASES = {
    "sequential": (sequential_cnn, ["conv1", "conv2"], {"conv1": "Conv2D", "probs": "MatMul"},
                   "probs"),
    "branched": (branched, ["stem", "branch_a", "branch_b", "cat", "sum"],
                 {"branch_b": "Conv2D", "cat": "ConcatV2", "sum": "AddV2"}, "probs"),
    "nested": (nested, ["conv1", "inner/conv", "inner/conv_b", "inner"],
               {"inner/conv": "Conv2D", "inner": "Block"}, "probs"),
    "batchnorm": (batchnorm, ["conv1", "bn", "relu"], {"conv1": "Conv2D", "relu": "Relu"},
                  "probs"),
    "depthwise": (depthwise, ["dw", "pw"], {"dw": "DepthwiseConv2dNative", "pw": "Conv2D"},
                  "logits"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    """(kind, Keras model, GraphModel of its export)."""
    keras.utils.set_random_seed(0)
    model = CASES[request.param][0]()
    path = tmp_path_factory.mktemp(request.param) / "sm"
    model.export(str(path), verbose=False)
    return request.param, model, GraphModel(path)


def keras_outputs(kind, model, names, x):
    if kind == "nested":
        ref = inner_reference(model, x)
        ref["conv1"] = keras.Model(model.inputs[0], model.get_layer("conv1").output)(x)
        ref["inner"] = ref["inner/conv_b"]
        return [ref[n] for n in names]
    return [keras.Model(model.inputs[0], model.get_layer(n).output)(x) for n in names]


def random_images(batch, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 8, 8, 3)).astype("float32")


def test_keeps_the_keras_layer_names_and_types(exported):
    kind, _, graph_model = exported
    _, compared, types, dense = CASES[kind]
    names = [layer.name for layer in graph_model.layers]
    assert set(compared) | {dense} <= set(names)
    assert types == {layer.name: layer.type for layer in graph_model.layers if layer.name in types}
    assert graph_model.name == "sm" and graph_model.input_shape == (8, 8, 3)


def test_layers_are_in_graph_order_and_analysable(exported):
    kind, _, graph_model = exported
    names = [layer.name for layer in graph_model.layers]
    compared = CASES[kind][1]
    assert [n for n in names if n in compared] == compared  # builders list them in call order
    assert all(layer.analysable for layer in graph_model.layers)


@pytest.mark.parametrize("batch", [1, 5])
def test_extracted_outputs_equal_keras_outputs(exported, batch):
    kind, model, graph_model = exported
    names = CASES[kind][1]
    x = random_images(batch)
    outputs, _ = graph_model.build_extractor(names)(tf.constant(x))
    for name, got, want in zip(names, outputs, keras_outputs(kind, model, names, x)):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got.numpy(), np.asarray(want), atol=1e-5, err_msg=name)
        layer = next(layer for layer in graph_model.layers if layer.name == name)
        assert layer.output_shape == tuple(want.shape[1:])


def test_logits_are_the_pre_softmax_values(exported):
    kind, model, graph_model = exported
    dense = model.get_layer(CASES[kind][3])
    x = random_images(4, seed=1)
    features = keras.Model(model.inputs[0], dense.input)(x)
    kernel, bias = dense.get_weights()
    _, logits = graph_model.build_extractor([])(x)
    np.testing.assert_allclose(logits.numpy(), np.asarray(features) @ kernel + bias, atol=1e-5)
    assert graph_model.logits_from_softmax == (kind != "depthwise")


def test_gradients_reach_the_input_inside_a_tf_function(exported):
    kind, _, graph_model = exported
    name = CASES[kind][1][-1]
    extract = graph_model.build_extractor([name])
    image = tf.Variable(random_images(2, seed=2))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            (act,), logits = extract(image)
            score = tf.reduce_mean(act) + tf.reduce_mean(logits)
        return tape.gradient(score, image)

    grad = step().numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
    with tf.GradientTape() as tape:  # eagerly too
        (act,), _ = extract(image)
        score = tf.reduce_sum(act)
    assert np.abs(tape.gradient(score, image).numpy()).sum() > 0


def test_one_output_requested_twice_and_order_kept(exported):
    kind, model, graph_model = exported
    first, last = CASES[kind][1][0], CASES[kind][1][-1]
    x = random_images(3)
    (a, b, c), _ = graph_model.build_extractor([last, first, last])(x)
    np.testing.assert_array_equal(a.numpy(), c.numpy())
    want = keras_outputs(kind, model, [first], x)[0]
    np.testing.assert_allclose(b.numpy(), np.asarray(want), atol=1e-5)


def test_unknown_layer_names_it_and_lists_valid_ones(exported):
    _, _, graph_model = exported
    with pytest.raises(UserError, match=r"no layer 'nope' in SavedModel 'sm'; .* include: \w+"):
        graph_model.build_extractor(["nope"])


# --------------------------------------------------------------- graphs not made by Keras 3


class ScopedModule(tf.Module):
    """Ops in plain name scopes, as tf.keras 2 graphs have them (no extra ``_1`` suffixes)."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal((3, 3, 3, 4), [1, 2]),
                                  name="conv2d_1/kernel")
        self.dense = tf.Variable(tf.random.stateless_normal((4, 2), [3, 4]), name="dense/kernel")

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32)])
    def __call__(self, x):
        with tf.name_scope("model"):
            with tf.name_scope("conv2d_1"):
                h = tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "SAME"))
            with tf.name_scope("block"):
                with tf.name_scope("conv2d"):
                    h = tf.nn.conv2d(h, tf.ones((1, 1, 4, 4)) / 4, 1, "SAME")
                with tf.name_scope("relu"):
                    h = tf.nn.relu(h)
            with tf.name_scope("dense"):
                return tf.nn.softmax(tf.reduce_mean(h, [1, 2]) @ self.dense)


def test_plain_name_scopes_are_kept_as_they_are(tmp_path):
    module = ScopedModule()
    tf.saved_model.save(module, str(tmp_path / "plain"), signatures=module.__call__)
    graph_model = GraphModel(tmp_path / "plain")
    assert [layer.name for layer in graph_model.layers] == [
        "conv2d_1", "block/conv2d", "block/relu", "block", "dense"]
    x = random_images(2)
    (conv,), logits = graph_model.build_extractor(["conv2d_1"])(x)
    want = tf.nn.relu(tf.nn.conv2d(x, module.kernel, 1, "SAME"))
    np.testing.assert_allclose(conv.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), module(x).numpy(), atol=1e-6)


def test_names_ending_in_digits_and_a_shared_layer(tmp_path):
    # Keras 3 scopes here are c_1_1, c_2, s_1 and s_3: one suffix is removed from each.
    x = keras.Input((8, 8, 3))
    shared = L.Conv2D(3, 3, padding="same", name="s")
    h = L.Conv2D(3, 1, name="c")(L.Conv2D(3, 1, name="c_1")(x))
    keras.Model(x, shared(shared(h))).export(str(tmp_path / "sm"), verbose=False)
    names = [layer.name for layer in GraphModel(tmp_path / "sm").layers]
    assert names == ["c_1", "c", "s", "s@1"]


# ------------------------------------------------------------------------------ user errors


def test_a_directory_without_saved_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a SavedModel directory"):
        GraphModel(tmp_path)
    with pytest.raises(UserError, match="is not a SavedModel directory"):
        GraphModel(tmp_path / "missing")


def save_module(path, signature_fn=None):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    if signature_fn is not None:
        module.f = tf.function(signature_fn[0], input_signature=signature_fn[1])
    tf.saved_model.save(module, str(path), signatures=None if signature_fn is None else module.f)
    return path


def test_a_saved_model_without_signature_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no signature to call"):
        GraphModel(save_module(tmp_path / "nosig"))


def test_two_inputs_are_refused(tmp_path):
    spec = tf.TensorSpec((None, 8, 8, 3), tf.float32)
    path = save_module(tmp_path / "two", (lambda a, b: a + b, [spec, spec]))
    with pytest.raises(UserError, match="takes 2 inputs .* one image input"):
        GraphModel(path)


@pytest.mark.parametrize("spec", [tf.TensorSpec((None, 8), tf.float32),
                                  tf.TensorSpec((None, 8, 8, 3), tf.uint8)])
def test_an_input_that_is_not_a_float_image_batch_is_refused(tmp_path, spec):
    path = save_module(tmp_path / "bad", (lambda a: a + a, [spec]))
    with pytest.raises(UserError, match="need a float image batch"):
        GraphModel(path)
