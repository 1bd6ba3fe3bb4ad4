"""Activation maximization: objectives, transforms, the compiled render loop, scores and the stage.

Tiny models are built in the tests (16-32 px, a few dozen steps) so the file runs in about a
minute on two CPU cores.
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.maximize import plan, quality
from pipeline.storage.catalog import Catalog
from pipeline.storage.store import RunStore


# --------------------------------------------------------------------------- objectives


def _acts():
    """Two images, a 2x2 map with 3 channels (values 0..23) and logits for 3 classes."""
    from pipeline.maximize.objectives import LOGITS

    return {"conv": np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3),
            LOGITS: np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]], np.float32)}


def test_channel_neuron_direction_and_class_values_match_hand_computation(tf):
    from pipeline.maximize import objectives as obj

    acts = _acts()
    # Channel means: image 0 -> [4.5, 5.5, 6.5], image 1 -> [16.5, 17.5, 18.5].
    np.testing.assert_allclose(obj.channel("conv", 1)(acts), [5.5, 17.5])
    np.testing.assert_allclose(obj.channel("conv", [0, 2])(acts), [4.5, 18.5])  # one unit per image
    np.testing.assert_allclose(obj.neuron("conv", 2, x=1, y=0)(acts), [5.0, 17.0])
    np.testing.assert_allclose(obj.direction("conv", [0.0, 1.0, 0.0])(acts), obj.channel("conv", 1)(acts))
    np.testing.assert_allclose(obj.direction("conv", [[1.0, 0, 0], [0, 0, 2.0]])(acts), [4.5, 37.0])
    np.testing.assert_allclose(obj.class_logit([2, 0])(acts), [3.0, 0.0])
    logprob = obj.class_logprob(2)(acts).numpy()
    np.testing.assert_allclose(np.exp(logprob), obj.class_probability(2)(acts), rtol=1e-6)
    assert obj.channel("conv", 1).layers == ("conv",) and obj.class_logit(0).layers == (obj.LOGITS,)


def test_objective_arithmetic_returns_new_objectives_and_applies_multipliers(tf):
    from pipeline.maximize import objectives as obj

    acts = _acts()
    a, b = obj.channel("conv", 0), obj.class_logit(1)
    va, vb = a(acts).numpy(), b(acts).numpy()
    cases = {
        "2 * a": (2 * a, 2 * va), "a * 3": (a * 3, 3 * va), "a / 4": (a / 4, va / 4),
        "a + b": (a + b, va + vb), "a - b": (a - b, va - vb), "-a": (-a, -va),
        "1 - a": (1 - a, 1 - va), "a + 0.5": (a + 0.5, va + 0.5), "a * b": (a * b, va * vb),
        "0.5 * a - 2 * b": (0.5 * a - 2 * b, 0.5 * va - 2 * vb),
    }
    for name, (combined, expected) in cases.items():
        np.testing.assert_allclose(combined(acts), expected, rtol=1e-6, err_msg=name)
    # The operands are untouched (xplique's in-place multiplier bug).
    scaled = a * 10
    np.testing.assert_allclose(a(acts), va)
    assert scaled is not a and a.name == "channel(conv, 0)"
    assert set((a + b).layers) == {"conv", obj.LOGITS}


def test_diversity_penalises_similar_images(tf):
    from pipeline.maximize import objectives as obj

    rng = np.random.default_rng(0)
    same = np.repeat(rng.random((1, 4, 4, 3)), 3, axis=0).astype(np.float32)
    different = rng.random((3, 4, 4, 3)).astype(np.float32) ** np.array([1, 4, 9])[:, None, None, None]
    d_same = obj.diversity("conv")({"conv": same}).numpy()
    d_diff = obj.diversity("conv")({"conv": different}).numpy()
    np.testing.assert_allclose(d_same, -2 / 3, rtol=1e-5)  # two identical partners, cosine 1, / batch 3
    assert (d_diff > d_same).all()


# --------------------------------------------------------------------------- params and transforms


@pytest.mark.parametrize("shape", [(16, 16, 3), (15, 21, 3), (12, 20, 1)])
def test_parameterisations_give_images_in_unit_range(tf, shape):
    from pipeline.maximize import params

    h, w, c = shape
    for p in (params.fourier(h, w, c), params.pixel(h, w, c, decorrelate=True)):
        raw = np.stack([p.init(np.random.default_rng(s)) for s in range(2)]) * 100  # far from the start
        img = p(raw).numpy()
        assert img.shape == (2, h, w, c) and np.isfinite(img).all()
        assert img.min() >= 0 and img.max() <= 1
    start = params.fourier(h, w, c)(params.fourier(h, w, c).init(np.random.default_rng(0))[None]).numpy()
    assert abs(start.mean() - 0.5) < 0.05  # Lucid's small init starts near mid-grey


def test_transforms_keep_track_of_size_and_randomness(tf):
    from pipeline.maximize import transforms as T

    rng = np.random.default_rng(0)
    img = rng.random((2, 10, 10, 3)).astype(np.float32)
    assert T.pad(3)(img).shape == (2, 16, 16, 3)
    # Jitter crops d pixels at an offset per image: u = 0 -> top-left, u -> 1 -> bottom-right.
    out = T.jitter(2)(img, np.array([[0.0, 0.0], [0.99, 0.99]], np.float32)).numpy()
    np.testing.assert_array_equal(out[0], img[0, :8, :8])
    np.testing.assert_array_equal(out[1], img[1, 2:, 2:])
    # Scale 1 and rotation 0 are the identity; other draws keep the size.
    np.testing.assert_allclose(T.random_scale(1.0, 1.0)(img, np.zeros((2, 1), np.float32)), img, atol=1e-6)
    np.testing.assert_allclose(T.random_rotate(10)(img, np.full((2, 1), 0.5, np.float32)), img, atol=1e-6)
    assert T.random_rotate(10)(img, np.ones((2, 1), np.float32)).shape == img.shape
    np.testing.assert_array_equal(T.crop_or_pad(6, 12)(img)[:, :, 1:11], img[:, 2:8])
    chain = T.compose([T.standard(32), T.crop_or_pad(32, 32)])
    assert chain.n_random == 6
    big = rng.random((2, 32, 32, 3)).astype(np.float32)
    assert chain(big, rng.random((2, 6)).astype(np.float32)).shape == (2, 32, 32, 3)
    assert T.jitter_only(32).n_random == 4


def test_a_chain_of_geometric_transforms_samples_the_image_once(tf):
    """compose fuses pad/jitter/scale/rotate/crop into one warp: exact for whole-pixel moves, and
    within interpolation error of the step-by-step chain when scaling and rotating."""
    from pipeline.maximize import transforms as T

    rng = np.random.default_rng(1)
    img = tf.nn.avg_pool2d(rng.random((3, 40, 40, 3)).astype(np.float32), 5, 1, "SAME").numpy()

    def chain(fuse, moves_only=False):
        parts = [T.pad(4), T.jitter(3)] + ([] if moves_only else [T.random_scale(), T.random_rotate(10)])
        return T.compose(parts + [T.jitter(2), T.crop_or_pad(36, 38)], fuse=fuse)

    u = rng.random((3, 6)).astype(np.float32)
    fused, stepwise = chain(True)(img, u).numpy(), chain(False)(img, u).numpy()
    assert fused.shape == stepwise.shape == (3, 36, 38, 3)
    assert np.abs(fused - stepwise).mean() < 0.01 and np.abs(fused - stepwise).max() < 0.15
    assert not np.array_equal(fused, stepwise)  # rotation interpolates once instead of twice
    u = rng.random((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(chain(True, True)(img, u), chain(False, True)(img, u))
    # A non-geometric transform between two runs splits the fusion and still applies.
    darken = T.Transform(lambda images, u: images * 0.5, 0, "darken")
    both = T.compose([T.pad(2), T.jitter(4), darken, T.crop_or_pad(40, 40)])  # u = 0.5: jitter back by 2
    np.testing.assert_allclose(both(img, np.full((3, 2), 0.5, np.float32)), img * 0.5, atol=1e-6)


# --------------------------------------------------------------------------- rendering


def _stripes(h, w, shift=0, period=4):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.cos(2 * np.pi * (xx + yy + shift) / period)


@pytest.fixture(scope="module")
def detector(keras):
    """A conv layer whose channel 0 is a planted red diagonal-stripe detector; channels 1-3 random."""
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 5, activation="relu", name="det")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(x))
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.2, (5, 5, 3, 4)).astype(np.float32)
    kernel[..., 0] = 0
    kernel[:, :, 0, 0] = 0.2 * _stripes(5, 5)  # red stripes: the pattern channel 0 detects
    det = model.get_layer("det")
    det.set_weights([kernel, np.zeros(4, np.float32)])
    return model


def test_planted_detector_image_beats_the_dataset_and_shows_the_pattern(detector, keras):
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    scale = (2 / 255, -1.0)  # this model wants [-1, 1]: optimisation happens in that space
    rng = np.random.default_rng(1)
    pixels = np.concatenate([rng.integers(0, 256, (48, 16, 16, 3)),  # noise
                             np.repeat(rng.integers(0, 256, (16, 1, 1, 3)), 16, 1).repeat(16, 2)])  # flat colours
    layer_out = keras.Model(detector.inputs[0], detector.get_layer("det").output)
    acts = layer_out(pixels.astype(np.float32) * scale[0] + scale[1]).numpy().mean(axis=(1, 2))
    stats = quality.column_stats(acts)

    renderer = Renderer(detector, lambda units: obj.channel("det", units), steps=64, learning_rate=0.1, scale=scale)
    result = renderer(seeds=[0, 1], targets=[0, 1])
    score, _, valid = quality.scores(result.values, stats.take([0, 1]))
    assert valid[0] and score[0] >= 1.0, f"planted unit reached {score[0]:.2f} of the dataset max"

    def looks_like_the_pattern(img):
        """Mean over 5x5 windows of the (positive part of the) red channel's correlation with the kernel.

        Channel-mean images tile the pattern with phase slips (no single stripe phase suits every
        position), so windows are compared, not the whole image with one global stripe pattern.
        """
        red, pattern = img[..., 0], _stripes(5, 5).ravel()
        corr = [np.corrcoef(red[i:i + 5, j:j + 5].ravel(), pattern)[0, 1] for i in range(12) for j in range(12)
                if red[i:i + 5, j:j + 5].std() > 1e-6]
        return float(np.mean(np.maximum(corr, 0)))

    planted, other = looks_like_the_pattern(result.images[0]), looks_like_the_pattern(result.images[1])
    assert planted > 0.1 and planted > 2 * other, (planted, other)


def test_objective_rises_and_the_same_seed_gives_the_same_image_in_any_batch(detector, tf):
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    renderer = Renderer(detector, lambda units: obj.channel("det", units), steps=24, learning_rate=0.05)
    a = renderer(seeds=[3, 4, 5], targets=[1, 0, 3])  # (unit 2 is far below zero on grey: it needs more steps)
    assert (a.values > a.initial).all()
    assert a.trace[-4:].mean() > a.trace[:4].mean()  # the optimised (transformed) objective too
    b = renderer(seeds=[9, 3], targets=[0, 1])  # seed 3 again, now in another batch position
    np.testing.assert_array_equal(a.images[0], b.images[1])
    assert a.values[0] == b.values[1]
    assert np.isfinite(a.images).all() and a.images.min() >= 0 and a.images.max() <= 1
    c = renderer(seeds=[4], targets=[1])
    assert not np.array_equal(a.images[0], c.images[0])  # another seed, another image


def test_the_xla_compiled_step_is_reproducible_and_falls_back_when_an_op_has_no_kernel(detector, tf):
    from pipeline.inputs.models import KerasModel
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    xla = Renderer(detector, lambda units: obj.channel("det", units), steps=16, jit_compile=True)
    a, b = xla(seeds=[3, 4], targets=[0, 1]), xla(seeds=[3], targets=[0])
    assert xla.jit_compile and xla.xla_error is None
    np.testing.assert_array_equal(a.images[0], b.images[0])  # same seed, same image, under XLA too
    assert (a.values > a.initial).all()
    plain = Renderer(detector, lambda units: obj.channel("det", units), steps=16)(seeds=[3, 4], targets=[0, 1])
    assert np.abs(plain.values - a.values).max() < 0.25 * np.abs(plain.values).max()  # same optimisation

    class NoKernel(KerasModel):
        """The model behind an identity warp: an op with a gradient but no XLA kernel."""

        def build_extractor(self, names):
            inner = super().build_extractor(names)

            def run(x):
                return inner(tf.raw_ops.ImageProjectiveTransformV3(
                    images=x, transforms=tf.constant([[1.0, 0, 0, 0, 1.0, 0, 0, 0]]), output_shape=tf.shape(x)[1:3], fill_value=0.0,
                    interpolation="NEAREST", fill_mode="CONSTANT"))
            return run

    def renderer(jit):
        return Renderer(NoKernel(detector, name="det"), lambda units: obj.channel("det", units), steps=16,
                        jit_compile=jit)

    fallback = renderer(True)
    c = fallback(seeds=[3, 4], targets=[0, 1])
    assert not fallback.jit_compile and "ImageProjectiveTransformV3" in fallback.xla_error, fallback.xla_error
    np.testing.assert_array_equal(c.images, renderer(False)(seeds=[3, 4], targets=[0, 1]).images)


@pytest.mark.parametrize("kernel,strides,padding", [(1, 1, "SAME"), (3, 1, "SAME"), (3, 1, "VALID"), (5, 1, "VALID"),
                                                     (1, 2, "SAME"), (3, 2, "VALID"), (2, 1, "SAME")])
def test_the_step_s_convolution_input_gradient_equals_tensorflow_s(tf, kernel, strides, padding):
    """Plain convolutions get their input gradient from a forward convolution (faster on CPUs);
    strided ones and even SAME kernels keep TensorFlow's; either way the numbers are the same."""
    from pipeline.maximize.gradients import step_gradients

    rng = np.random.default_rng(kernel * 10 + strides)
    x = tf.constant(rng.normal(size=(2, 11, 9, 3)).astype(np.float32))
    w = tf.constant(rng.normal(size=(kernel, kernel, 3, 4)).astype(np.float32))

    @tf.function
    def grad(swap):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, w, strides, padding)
            total = tf.reduce_sum(tf.sin(y))  # an uneven gradient at every output
        if swap:
            with step_gradients(redirect=False):
                return tape.gradient(total, x)
        return tape.gradient(total, x)

    np.testing.assert_allclose(grad(True).numpy(), grad(False).numpy(), rtol=1e-4, atol=1e-5)
    ops = {op.type for op in grad.get_concrete_function(True).graph.get_operations()}
    assert ("Conv2DBackpropInput" in ops) == (strides > 1 or kernel % 2 == 0), ops  # the swap took place


def test_silent_relu_units_still_move_with_the_redirected_gradient(keras, tf):
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(1, 3, activation="relu", name="c")
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(conv(inp)))
    kernel = np.zeros((3, 3, 3, 1), np.float32)
    kernel[1, 1, 0, 0] = 1.0  # fires on red above 0.8: silent on the mid-grey start image
    conv.set_weights([kernel, np.array([-0.8], np.float32)])
    runs = {flag: Renderer(model, obj.channel("c", 0), steps=32, transform=None, relu_redirect=flag)([0])
            for flag in (False, True)}
    assert runs[False].values[0] == 0.0 and runs[True].values[0] > 0.01


def test_grey_and_any_size_models(keras, tf):
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    for shape, size, expect in [((12, 20, 1), 64, (12, 20, 1)), ((None, None, 1), 16, (16, 16, 1))]:
        inp = keras.Input(shape)
        x = keras.layers.Conv2D(3, 3, activation="relu", name="c")(inp)
        model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
        kernel = np.random.default_rng(0).normal(0, 0.3, (3, 3, 1, 3)).astype(np.float32)
        kernel -= kernel.mean(axis=(0, 1, 2))  # zero-sum edge detectors: active (bias) on the grey start
        model.get_layer("c").set_weights([kernel, np.full(3, 0.1, np.float32)])
        result = Renderer(model, lambda units: obj.channel("c", units), steps=16, size=size)([0, 1], [0, 2])
        assert result.images.shape == (2,) + expect
        assert np.isfinite(result.images).all() and 0 <= result.images.min() and result.images.max() <= 1
        assert (result.values > result.initial).all()


def test_model_with_preprocessing_and_batchnorm_in_inference_mode(keras, tf):
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inp)  # the model takes raw pixels
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    bn = model.get_layer("bn")
    bn.set_weights([np.full(4, 2.0), np.full(4, 0.5), np.full(4, 0.3), np.full(4, 4.0)])  # gamma, beta, mean, var
    renderer = Renderer(model, lambda units: obj.channel("bn", units), steps=24, scale=(1.0, 0.0))
    result = renderer([0, 1, 2, 3], [0, 1, 2, 3])
    assert (result.values > result.initial).all()  # pre-ReLU BatchNorm outputs, can be negative
    assert np.isfinite(result.images).all() and 0 <= result.images.min() and result.images.max() <= 1
    # BatchNorm ran with its moving statistics: the values match an inference-mode forward pass.
    bn_out = keras.Model(model.inputs[0], bn.output)(result.images * 255.0, training=False).numpy()
    np.testing.assert_allclose(result.values, bn_out.mean(axis=(1, 2))[np.arange(4), np.arange(4)], rtol=1e-4)
    class_run = Renderer(model, obj.class_logprob, steps=24, scale=(1.0, 0.0),
                         measures=(obj.class_probability,))([0, 1, 2], [0, 1, 2])
    assert class_run.measures.shape == (1, 3) and (class_run.values > class_run.initial).all()
    np.testing.assert_allclose(np.exp(class_run.values), class_run.measures[0], rtol=1e-4)


def test_class_objective_makes_the_demo_model_sure_of_each_class(tf):
    from pipeline.demo.data import make_shapes, train_demo_model
    from pipeline.maximize import objectives as obj
    from pipeline.maximize import transforms as T
    from pipeline.maximize.render import Renderer

    x, y, _ = make_shapes(480, seed=0)
    model = train_demo_model(x, y, seed=0, epochs=4)
    renderer = Renderer(model, obj.class_logprob, transform=T.jitter_only(32), steps=96, learning_rate=0.2,
                        measures=(obj.class_logit, obj.class_probability))
    result = renderer(seeds=[0, 1, 2, 3], targets=[0, 1, 2, 3])
    probs = model.predict(result.images, verbose=0)[np.arange(4), np.arange(4)]
    assert (probs > 0.9).all(), probs
    np.testing.assert_allclose(result.measures[1], probs, atol=1e-3)


# --------------------------------------------------------------------------- scores and planning


def test_scores_flag_ratios_where_the_dataset_max_is_not_positive():
    acts = np.array([[0.0, -5.0, 1.0, 3.0], [2.0, -4.0, 1.0, -2.0], [1.0, -3.0, 1.0, 0.1]])
    stats = quality.column_stats(acts, chunk=2)  # chunked moments equal the whole-array ones
    np.testing.assert_allclose(stats.mean, acts.mean(0))
    np.testing.assert_allclose(stats.std, acts.std(0))
    score, z, valid = quality.scores(np.array([4.0, -1.0, 2.0, 6.0]), stats)
    assert valid.tolist() == [True, False, True, True]
    assert score[0] == 2.0 and np.isnan(score[1]) and score[3] == 2.0
    assert np.isfinite(z[1]) and np.isnan(z[2])  # spread-based figure exists for unit 1, not for a constant unit
    directions = np.array([[1.0, 0, 0, 0], [0, 0.5, 0, 0.5]])
    both = quality.column_stats(acts, directions)
    np.testing.assert_allclose(both.max[4:], (acts @ directions.T).max(0))


def test_unit_selection_and_batches():
    assert plan.select_units("all", np.zeros(3)) == [0, 1, 2]
    assert plan.select_units("top:2", np.array([1.0, np.nan, 5.0, 3.0])) == [2, 3]
    assert plan.select_units([5, 1, 1], np.zeros(4)) == [1]
    with pytest.raises(UserError, match="maximize.units.*top:K"):
        plan.parse_units("best:3")
    assert [len(b) for b in plan.batches(list(range(70)), 32)] == [24, 24, 22]
    assert plan.choose_layers("last", ["a", "b", "dense"], {"a": "map", "b": "map", "dense": "vector"}) == ["b"]
    with pytest.raises(UserError, match="'nope' was not extracted"):
        plan.choose_layers(["nope"], ["a"], {"a": "map"})
    assert plan.image_seed(0, "unit", "conv", 3) == plan.image_seed(0, "unit", "conv", 3)
    assert plan.image_seed(0, "unit", "conv", 3) != plan.image_seed(1, "unit", "conv", 3)


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def extracted_run(tmp_path, keras):
    """A tiny model and dataset, extracted; returns a function making configs for it."""
    from pipeline.config import make_config
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import extract

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(5, 3, activation="relu", name="conv_a")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(x)).save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), y=np.arange(24) % 3,
             class_names=np.array(["a", "b", "c"]))

    def config(**maximize):
        raw = {"name": "mx", "out": str(tmp_path / "run"), "model": str(tmp_path / "m.keras"),
               "data": {"npz": str(tmp_path / "d.npz")}, "layers": ["conv_a"],
               "maximize": {"steps": 8, "batch_size": 4, **maximize}}
        return make_config(raw)

    Runner(config(), [extract.STAGE]).run()
    return config


def _run_stage(cfg):
    """The maximize stage alone, its outputs written as the runner writes them (no manifest)."""
    from pipeline.orchestration.runner import write_outputs
    from pipeline.stages import maximize
    from pipeline.stages.base import Context

    ctx = Context(cfg, RunStore(cfg.out_dir))
    return write_outputs(ctx.catalog, maximize.run(ctx)), ctx.store


def test_stage_writes_index_and_pngs_and_resumes(extracted_run):
    from PIL import Image

    from pipeline.stages import maximize

    cfg = extracted_run(units="top:2")
    centroid = [0.0, 0.6, 0.8, 0.0, 0.0]
    pd.DataFrame({"layer": ["conv_a", "conv_a"], "cluster": [0, -1], "size": [2, 1],
                  "centroid": [centroid, [1.0, 0, 0, 0, 0]]}).to_parquet(cfg.out_dir / "cluster_summary.parquet")
    summary, store = _run_stage(cfg)
    index = Catalog(store).read("maximize")
    assert list(index.columns) == maximize.COLUMNS
    assert index["kind"].value_counts().to_dict() == {"unit": 2, "class": 3, "cluster": 1}  # noise cluster skipped
    assert summary["rendered"] == 6 and summary["reused"] == 0
    units = index[index["kind"] == "unit"]
    assert units["path"].str.fullmatch(r"maximize/conv_a/unit_\d{4}\.png").all()
    classes = index[index["kind"] == "class"]
    assert classes["class_name"].tolist() == ["a", "b", "c"] and classes["probability"].between(0, 1).all()
    for path in index["path"]:
        with Image.open(store.path(path)) as im:
            assert im.size == (16, 16)
    valid = index["score_valid"]
    assert np.isnan(index.loc[~valid, "score"]).all() and np.isfinite(index.loc[valid, "score"]).all()

    again, _ = _run_stage(cfg)  # nothing missing: nothing rendered, same table
    assert again["rendered"] == 0
    pd.testing.assert_frame_equal(Catalog(store).read("maximize"), index)

    more, _ = _run_stage(extracted_run(units="all"))  # three more units, the rest reused
    assert more["rendered"] == 3 and more["images"] == 9

    changed, _ = _run_stage(extracted_run(units="all", steps=9))  # other render parameters: redo all
    assert changed["rendered"] == 9


def test_stage_time_budget_leaves_the_rest_for_a_rerun(extracted_run, capsys):
    cfg = extracted_run(units="all", classes=False, clusters=False, max_seconds=1e-9, batch_size=2)
    first, store = _run_stage(cfg)
    assert first["missing"] == 5 and first["images"] == 0
    assert "time budget" in capsys.readouterr().err
    done, _ = _run_stage(extracted_run(units="all", classes=False, clusters=False, batch_size=2))
    assert done["rendered"] == 5 and done["images"] == 5


def test_stage_definition():
    from pipeline.stages import maximize

    assert maximize.STAGE.name == "maximize" and maximize.STAGE.outputs == ("maximize",)
    assert maximize.STAGE.deps == ("extract",) and maximize.STAGE.optional == ("cluster",)


def test_maximize_runs_without_the_cluster_stage_and_adds_cluster_images_once_it_has_run(extracted_run, capsys):
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    cfg = extracted_run(units="all", classes=False)
    runner = Runner(cfg, all_stages())
    assert runner.run(only="maximize") == [("maximize", "done")]
    assert "(cluster stage not run); no cluster images" in capsys.readouterr().err
    index = Catalog(RunStore(cfg.out_dir)).read("maximize")
    assert set(index["kind"]) == {"unit"} and len(index) == 5

    runner.run(only="cluster")
    assert runner.state(runner.by_name["maximize"]) == ("stale", "upstream stage 'cluster' changed")
    runner.run(only="maximize")
    index = Catalog(RunStore(cfg.out_dir)).read("maximize")
    clusters = (Catalog(RunStore(cfg.out_dir)).read("cluster_summary")["cluster"] >= 0).sum()
    assert clusters >= 1
    assert (index["kind"] == "cluster").sum() == clusters and (index["kind"] == "unit").sum() == 5
    record = runner.manifest()["stages"]["maximize"]["summary"]
    assert record["rendered"] == clusters   # the unit images were reused
