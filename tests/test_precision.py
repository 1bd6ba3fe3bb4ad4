"""Mixed precision (``compute.precision``): float16/bfloat16 layers, float32 results, close to float32.

Run on the CPU (TensorFlow has float16 and bfloat16 CPU kernels for every layer used here), on a
small model with the parts real image models have: BatchNorm with non-trivial statistics,
separable and depthwise convolutions, a strided 1x1 shortcut, a residual add and a softmax head.

Tolerances, and why. float16 keeps 11 significant bits (rounding error 2^-11 = 4.9e-4 per
operation), bfloat16 8 (2^-8 = 3.9e-3); errors accumulate over the layers. Measured here (CPU,
TensorFlow 2.21), each tolerance 3-10x the measurement (errors grow with depth):

==============================================  ============  =============
quantity (tolerance)                            float16       bfloat16
==============================================  ============  =============
extracted mean/max arrays: max |error| / max    1.9e-3 (1e-2) 1.4e-2 (4e-2)
|value|, worst layer and reduction
Spearman correlation of the units' dataset      1.000 (0.99)  1.000 (0.99)
means, worst layer
objective on fixed images: max |error| / max    2.4e-5 (1e-2) 3.2e-4 (4e-2)
|value|
input-gradient cosine, worst image (live unit)  0.9991 (0.99) 0.9972 (0.98)
32-step render, gain over the start image:      2.1e-3 (0.02) 5.0e-2 (0.15)
max |gain error| / max gain
==============================================  ============  =============

bfloat16's gradient bound is lower than 0.99 because on a deeper model (the 64x64 mini-Xception,
last separable convolution) its worst cosine was 0.987 (float16: 0.998).
"""
import numpy as np
import pytest
from scipy.stats import spearmanr

import zoo
from pipeline.inputs import precision as P
from pipeline.inputs.models import KerasModel, load_model, with_precision

SIZE = 32
LAYERS = ["stem_relu", "sep_relu", "add", "dw", "out"]
TOLERANCE = {  # see the module docstring
    "mixed_float16": {"rel": 1e-2, "rank": 0.99, "cos": 0.99, "gain": 0.02},
    "mixed_bfloat16": {"rel": 4e-2, "rank": 0.99, "cos": 0.98, "gain": 0.15},
}


def bfloat16_kernels(tf):
    """None when this machine's TensorFlow runs a bfloat16 convolution on the CPU, else why not."""
    try:
        x = tf.ones([1, 4, 4, 2], tf.bfloat16)
        tf.nn.conv2d(x, tf.ones([3, 3, 2, 2], tf.bfloat16), 1, "SAME").numpy()
        tf.nn.depthwise_conv2d(x, tf.ones([3, 3, 2, 1], tf.bfloat16), [1, 1, 1, 1], "SAME").numpy()
    except Exception as exc:  # NotFoundError / InvalidArgumentError: no kernel registered
        return f"no bfloat16 CPU kernels in this TensorFlow build ({type(exc).__name__})"
    return None


@pytest.fixture(scope="module", params=P.MIXED)
def policy(request, tf):
    if request.param == "mixed_bfloat16" and (why := bfloat16_kernels(tf)):
        pytest.skip(why)
    return request.param


def residual_model(keras):
    """32x32 RGB: conv-BN-ReLU stem, separable conv-BN-ReLU + max pool added to a strided 1x1 conv,
    depthwise conv, softmax head."""
    layers = keras.layers
    inp = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    shortcut = layers.Conv2D(16, 1, strides=2, name="short")(x)
    y = layers.SeparableConv2D(16, 3, padding="same", name="sep")(x)
    y = layers.BatchNormalization(name="sep_bn")(y)
    y = layers.ReLU(name="sep_relu")(y)
    y = layers.MaxPooling2D(3, strides=2, padding="same", name="pool")(y)
    x = layers.Add(name="add")([y, shortcut])
    x = layers.DepthwiseConv2D(3, activation="relu", name="dw")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, layers.Dense(5, activation="softmax", name="out")(x), name="residual")


@pytest.fixture(scope="module")
def base(keras):
    keras.utils.set_random_seed(0)
    return KerasModel(zoo.randomize_batchnorm(residual_model(keras)), name="residual")


@pytest.fixture(scope="module")
def mixed(base, policy):
    notes = []
    model = with_precision(base, policy, notes.append)
    return model, notes


def scale_free_error(reference, got):
    """max |got - reference| / max |reference|: the error relative to the layer's own scale."""
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return np.abs(got - reference).max() / np.abs(reference).max()


# --------------------------------------------------------------------------- the copy


@pytest.mark.parametrize("build", [residual_model, zoo.nested, zoo.sequential, zoo.batchnorm, zoo.depthwise],
                         ids=["residual", "nested", "sequential", "batchnorm", "depthwise"])
def test_the_copy_has_the_same_layers_and_weights_and_computes_in_the_policy(keras, policy, build):
    original = build() if build is not residual_model else build(keras)
    copy = P.mixed_clone(original, policy)
    compute = P.compute_dtypes(copy)
    assert list(compute) == list(P.compute_dtypes(original))  # names (nested ones too), in order
    assert [w.path for w in copy.weights] == [w.path for w in original.weights]
    for a, b in zip(original.weights, copy.weights):
        assert b.dtype == "float32"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    half = policy.removeprefix("mixed_")
    convs = [n for n, layer in _named_layers(copy) if type(layer).__name__.endswith("Conv2D")]
    assert convs and all(compute[n] == half for n in convs)
    for name, layer in _named_layers(copy):  # a softmax head stays float32, as Keras advises
        if getattr(getattr(layer, "activation", None), "__name__", "") == "softmax":
            assert compute[name] == "float32"


def _named_layers(model, prefix=""):
    for layer in model.layers:
        yield prefix + layer.name, layer
        if hasattr(layer, "layers"):
            yield from _named_layers(layer, prefix + layer.name + "/")


def test_a_pipeline_model_keeps_its_layer_list_and_says_the_cpu_is_slower(base, mixed, policy, tf):
    model, notes = mixed
    assert model.precision == policy and base.precision == "float32"
    assert model.layers == base.layers  # names, types, shapes, analysable: what `layers` lists and taps
    if not tf.config.list_physical_devices("GPU"):
        assert notes == [P.cpu_note(policy)]
        assert "usually slower" in notes[0] and "\n" not in notes[0]


def test_float32_leaves_the_model_and_the_stage_parameters_as_they_were(base):
    from pipeline.config import Config
    from pipeline.extraction.plan import extract_params
    from pipeline.stages import maximize, probe

    notes = []
    assert with_precision(base, "float32", notes.append) is base and notes == []
    plain = Config.model_validate({"model": "m.keras", "data": {"images": "x"}})
    half = Config.model_validate({"model": "m.keras", "data": {"images": "x"},
                                  "compute": {"precision": "mixed_float16"}})
    for params in (extract_params, probe._params, maximize._params):
        assert "precision" not in params(plain)  # run directories made before the key stay up to date
        assert params(half)["precision"] == "mixed_float16"


# --------------------------------------------------------------------------- extraction


def test_extracted_means_and_maxima_stay_within_tolerance_and_are_float32(base, mixed, policy):
    from pipeline.extraction.forward import make_forward

    model, _ = mixed
    kinds = {n: "vector" if n == "out" else "map" for n in LAYERS}
    pixels = np.random.default_rng(0).integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8)

    def extract(m):
        outputs, bad = make_forward(m.build_extractor(LAYERS), kinds, ["mean", "max"], (1 / 255, 0.0))(pixels)
        assert not any(bad.values())
        return outputs

    reference, got = extract(base), extract(model)
    assert set(got) == set(reference) and len(got) == 2 * 4 + 2  # four maps x (mean, max), out, logits
    tol = TOLERANCE[policy]
    for key, values in got.items():
        assert values.dtype == np.float32, key
        assert scale_free_error(reference[key], values) <= tol["rel"], key
        rho = spearmanr(reference[key].mean(axis=0), values.mean(axis=0)).statistic
        assert rho >= tol["rank"], key


# --------------------------------------------------------------------------- maximization


def objective_and_gradient(tf, model, layer, images, factor=1.0):
    """The channel objective (image i -> unit i) and its gradient w.r.t. the images, in a tf.function."""
    from pipeline.maximize import objectives as obj

    extract = model.build_extractor([layer])
    units = list(range(len(images)))

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs, _ = extract(x)
            values = factor * obj.channel(layer, units)({layer: outputs[0]})
            total = tf.reduce_sum(values)
        return outputs[0], values, tape.gradient(total, x)

    output, values, grad = run(tf.constant(images))
    return output.dtype, values.numpy(), grad.numpy().reshape(len(images), -1)


def cosines(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_objective_and_gradient_direction_stay_close(tf, base, mixed, policy):
    images = np.random.default_rng(1).random((16, SIZE, SIZE, 3), dtype=np.float32)
    _, v32, g32 = objective_and_gradient(tf, base, "sep_relu", images)
    dtype, v, g = objective_and_gradient(tf, mixed[0], "sep_relu", images)
    assert dtype == tf.float32 and v.dtype == g.dtype == np.float32
    assert scale_free_error(v32, v) <= TOLERANCE[policy]["rel"]
    live = v32 > 0.05 * v32.max()  # a silent unit (ReLU off everywhere) has no gradient to compare
    assert live.sum() >= 8
    assert cosines(g32[live], g[live]).min() >= TOLERANCE[policy]["cos"]


def test_float16_gradients_of_a_tiny_objective_do_not_underflow(tf, base):
    """Loss scaling: gradients ~1e-7 per activation would be float16 zeros without it."""
    images = np.random.default_rng(1).random((16, SIZE, SIZE, 3), dtype=np.float32)
    model = with_precision(base, "mixed_float16")
    _, v32, g32 = objective_and_gradient(tf, base, "sep_relu", images, factor=1e-4)
    _, _, g = objective_and_gradient(tf, model, "sep_relu", images, factor=1e-4)
    live = v32 > 0.05 * v32.max()
    assert np.isfinite(g).all()
    assert (g[live] == 0).mean() <= (g32[live] == 0).mean() + 0.01
    assert cosines(g32[live], g[live]).min() >= TOLERANCE["mixed_float16"]["cos"]


def test_a_short_render_reaches_the_float32_score(base, mixed, policy):
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    units = [0, 3, 7, 12]

    def render(model):
        return Renderer(model, obj.channel("sep_relu", units), steps=32, learning_rate=0.2)(units)

    reference, got = render(base), render(mixed[0])
    for field in ("images", "values", "initial", "trace"):
        assert getattr(got, field).dtype == np.float32, field
    gain, gain32 = got.values - got.initial, reference.values - reference.initial
    assert (gain32 > 0).all() and (gain > 0).all()  # the render climbs ...
    assert scale_free_error(gain32, gain) <= TOLERANCE[policy]["gain"]  # ... as far


# --------------------------------------------------------------------------- models it cannot apply to


def test_a_savedmodel_runs_in_float32_with_a_one_line_note(keras, tmp_path):
    from pipeline.inputs.savedmodel import GraphModel

    path = zoo.save(zoo.sequential(), tmp_path / "exported", "savedmodel")
    notes = []
    model = load_model(path, precision="mixed_float16", log=notes.append)
    assert isinstance(model, GraphModel)
    assert notes == [P.not_applicable("mixed_float16", "this SavedModel")]
    assert "functional and Sequential" in notes[0] and notes[0].endswith("runs in float32")


def test_a_subclassed_model_runs_in_float32_with_a_one_line_note(keras):
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.conv = keras.layers.Conv2D(4, 3, name="conv")
            self.pool = keras.layers.GlobalAveragePooling2D(name="pool")

        def call(self, x):
            return self.pool(self.conv(x))

    net = Net()
    net(np.zeros((1, 8, 8, 3), np.float32))
    notes = []
    model = with_precision(KerasModel(net, name="net"), "mixed_bfloat16", notes.append)
    assert model.precision == "float32"
    assert notes == [P.not_applicable("mixed_bfloat16", "the subclassed model net")]


def test_a_model_keras_cannot_copy_runs_in_float32_with_a_one_line_note(keras):
    class Shift(keras.layers.Layer):  # no config: Keras cannot rebuild it
        def __init__(self, amount, **kwargs):
            super().__init__(**kwargs)
            self.amount = amount

        def call(self, x):
            return x + self.amount

        def get_config(self):
            raise NotImplementedError("Shift has no config")

    inp = keras.Input((8, 8, 3))
    out = keras.layers.Conv2D(2, 3, name="conv")(Shift(1.0, name="shift")(inp))
    notes = []
    model = with_precision(KerasModel(keras.Model(inp, out), name="shifty"), "mixed_float16", notes.append)
    assert model.precision == "float32"
    assert len(notes) == 1 and "model shifty cannot be copied" in notes[0] and "\n" not in notes[0]
    assert notes[0].endswith("runs in float32")
