"""The render step: where model, parameterisation, transforms and objective meet.

One ``tf.function`` holds the whole optimisation: a ``tf.while_loop`` over the steps, each step
drawing the batch through the parameterisation and the transforms, running the model, and
taking an Adam step *up* the sum of the per-image objective values. Images are independent
(every model op runs in inference mode, BatchNorm included), so each image climbs its own
objective unless the objective couples them (``diversity``).

Reproducibility: each image's initial raw numbers and all of its transform randomness come
from ``numpy.random.default_rng(seed)`` of its own seed, drawn before the graph runs. The same
seeds give the same images, whatever else shares the batch.

Examples
--------
>>> from pipeline.maximize import objectives as obj  # doctest: +SKIP
>>> r = Renderer(model, lambda units: obj.channel("conv3", units), steps=128)  # doctest: +SKIP
>>> result = r(seeds=[0, 1, 2, 3], targets=[0, 1, 2, 3])  # doctest: +SKIP
>>> result.images.shape, result.values.shape  # doctest: +SKIP
((4, 32, 32, 3), (4,))
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.backend.tf import tensorflow
from pipeline.errors import first_line
from pipeline.maximize import params as params_mod
from pipeline.maximize import transforms as tr
from pipeline.maximize.gradients import step_gradients
from pipeline.maximize.objectives import LOGITS, Objective

tf = tensorflow()

ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


@dataclass
class RenderResult:
    """What a render returns (numpy arrays, one entry per image).

    Attributes
    ----------
    images : ndarray
        ``(B, H, W, C)`` float32 in [0, 1], rounded to 8-bit levels (what a PNG stores).
    values : ndarray
        ``(B,)`` objective on the final, un-transformed, rounded image.
    initial : ndarray
        ``(B,)`` objective on the initial image.
    trace : ndarray
        ``(steps, B)`` objective at each step, on the transformed image that step optimised.
    measures : ndarray
        ``(M, B)``: the renderer's ``measures`` on the final image (``(0, B)`` without any).
    """

    images: np.ndarray
    values: np.ndarray
    initial: np.ndarray
    trace: np.ndarray
    measures: np.ndarray


def as_adapter(model):
    """The model adapter (``build_extractor``) for a pipeline model or a plain ``keras.Model``."""
    if hasattr(model, "build_extractor"):
        return model
    from pipeline.inputs.models import KerasModel

    return KerasModel(model, name=getattr(model, "name", "model"))


def input_size(model, size=128):
    """``(height, width, channels)`` to render: the model's fixed input size, ``size`` where it is free."""
    h, w, c = model.input_shape
    return int(h or size), int(w or size), int(c or 3)


class Renderer:
    """A compiled activation-maximization loop for one model and one kind of objective.

    Parameters
    ----------
    model : KerasModel, GraphModel or keras.Model
    objective : Objective or callable
        An objective, or ``objective(targets) -> Objective`` built from each call's ``targets``
        (a tensor), so one compiled graph serves every batch of units of a layer.
    param : Param, optional
        Default: :func:`params.image` (Fourier; colour-decorrelated for RGB) at the model's size.
    transform : Transform or "standard" or None
        Default ``"standard"``: :func:`transforms.standard` for the image size. Images are
        cropped or padded back to the model's input size after it.
    steps : int
    learning_rate : float
        Adam step size (Lucid's 0.05).
    scale : (float, float)
        Pixels ``p`` in [0, 255] enter the model as ``p * a + b`` (``parse_scale(data.scale)``).
    size : int
        Image size for models that accept any size.
    measures : sequence, optional
        Objectives (or ``targets -> Objective`` callables) evaluated on the final image only,
        e.g. the logit and probability of a class whose image maximises its log-probability.
    relu_redirect : bool
        Lucid's redirected ReLU gradient: where a ReLU passes no gradient at all for an image
        (the unit is silent on it, as on the grey start image), let through the part of the
        gradient that would raise its input. Without it such units never move.
    jit_compile : bool
        Compile the whole loop with XLA (warps then use gathers: :func:`transforms.for_xla`).
        If XLA cannot compile it (first call), the loop runs without XLA and ``xla_error`` says
        why. Same seeds give the same images for a given setting; the two settings differ by
        float rounding (and by the warp's exact gradient under XLA).
    """

    def __init__(self, model, objective, param=None, transform="standard", steps=256, learning_rate=0.05,
                 scale=(1 / 255, 0.0), size=128, measures=(), relu_redirect=True, jit_compile=False):
        self.model = as_adapter(model)
        self.height, self.width, self.channels = input_size(self.model, size)
        self.param = param or params_mod.image(self.height, self.width, self.channels)
        if transform == "standard":
            transform = tr.standard(max(self.height, self.width))
        self.transform = tr.compose([transform or tr.identity(), tr.crop_or_pad(self.height, self.width)])
        self.steps = int(steps)
        self.learning_rate = float(learning_rate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.relu_redirect = bool(relu_redirect)
        self._factory = _as_factory(objective)
        self._measures = [_as_factory(m) for m in measures]
        self._extractors = {}
        self.jit_compile = bool(jit_compile)
        self.xla_error = None
        self._compiled = self._compile()

    def _compile(self):
        # A partial (no __code__) makes TensorFlow count traces per renderer, not for all renderers together.
        return tf.function(functools.partial(Renderer._run, self), reduce_retracing=True, autograph=False,
                           jit_compile=self.jit_compile)

    # -- randomness, drawn outside the graph so it depends only on each image's seed --

    def _draw(self, seeds):
        raw, uniforms = [], []
        n_random = max(self.transform.n_random, 1)
        for seed in seeds:
            rng = np.random.default_rng(int(seed))
            raw.append(self.param.init(rng))
            uniforms.append(rng.random((self.steps, n_random), dtype=np.float32))
        return np.stack(raw), np.ascontiguousarray(np.stack(uniforms, axis=1))

    def __call__(self, seeds, targets=None) -> RenderResult:
        """Optimise one image per seed (and per target, when the objective takes targets)."""
        seeds = [int(s) for s in seeds]
        raw, uniforms = self._draw(seeds)
        if targets is None:
            targets = np.zeros(len(seeds), np.float32)
        targets = np.asarray(targets)
        if len(targets) != len(seeds):
            raise ValueError(f"{len(targets)} targets for {len(seeds)} seeds: give one target per image")
        layers = tuple(dict.fromkeys(n for f in [self._factory, *self._measures] for n in f(targets).layers))
        args = (tf.constant(raw), tf.constant(targets), tf.constant(uniforms), layers)
        try:
            out = self._compiled(*args)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.InternalError) as e:
            if not self.jit_compile:
                raise
            self.xla_error = first_line(e, 300)
            self.jit_compile = False  # an op without an XLA kernel: the same loop on TensorFlow's kernels
            self._compiled = self._compile()
            out = self._compiled(*args)
        return RenderResult(*(o.numpy() for o in out))

    # -- the graph --

    def _extractor(self, layers):
        names = tuple(n for n in layers if n != LOGITS)
        if names not in self._extractors:
            self._extractors[names] = self.model.build_extractor(list(names))
        return names, self._extractors[names]

    def _run(self, raw, targets, uniforms, layers):
        with tr.for_xla(self.jit_compile):
            return self._loop(raw, targets, uniforms, layers)

    def _loop(self, raw, targets, uniforms, layers):
        objective = self._factory(targets)
        measures = [m(targets) for m in self._measures]
        names, extract = self._extractor(layers)
        a, b = self.scale
        batch = tf.shape(raw)[0]

        def evaluate(images, objectives=(objective,)):
            outputs, logits = extract(images * (255.0 * a) + b)
            acts = dict(zip(names, outputs))
            acts[LOGITS] = logits
            values = [tf.broadcast_to(tf.cast(o(acts), tf.float32), [batch]) for o in objectives]
            return values[0] if len(values) == 1 else tf.stack(values)

        def step(i, raw, m, v, trace):
            with tf.GradientTape() as tape:
                tape.watch(raw)
                images = self.transform(self.param(raw), uniforms[i])
                values = evaluate(images)
                total = tf.reduce_sum(values)
            with step_gradients(self.relu_redirect):
                grad = tape.gradient(total, raw, unconnected_gradients="zero")
            t = tf.cast(i + 1, tf.float32)
            m = ADAM_BETA1 * m + (1 - ADAM_BETA1) * grad
            v = ADAM_BETA2 * v + (1 - ADAM_BETA2) * tf.square(grad)
            update = (m / (1 - ADAM_BETA1 ** t)) / (tf.sqrt(v / (1 - ADAM_BETA2 ** t)) + ADAM_EPS)
            return i + 1, raw + self.learning_rate * update, m, v, trace.write(i, values)

        initial = evaluate(_rounded(self.param(raw)))
        zeros = tf.zeros_like(raw)
        trace = tf.TensorArray(tf.float32, size=self.steps, element_shape=tf.TensorShape([None]))
        _, raw, _, _, trace = tf.while_loop(lambda i, *_: i < self.steps, step,
                                            (tf.constant(0), raw, zeros, zeros, trace), parallel_iterations=1)
        final = _rounded(self.param(raw))
        finals = evaluate(final, (objective, *measures))
        if not measures:
            return final, finals, initial, trace.stack(), tf.zeros([0, batch])
        return final, finals[0], initial, trace.stack(), finals[1:]


def _as_factory(objective):
    """``targets -> Objective`` from an objective (which ignores targets) or such a callable."""
    if isinstance(objective, Objective):
        return lambda targets: objective
    return objective


def _rounded(images):
    """Round to the 256 levels a PNG keeps, so scores describe the stored image."""
    return tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0) / 255.0


def render(model, objective, seeds=(0,), targets=None, **kwargs) -> RenderResult:
    """One-off render: build a :class:`Renderer` (``kwargs``) and run it once."""
    return Renderer(model, objective, **kwargs)(seeds, targets)
