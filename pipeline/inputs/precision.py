"""Mixed precision (``compute.precision``): a copy of a Keras model whose layers compute in float16/bfloat16.

Keras' mixed policies (``mixed_float16``, ``mixed_bfloat16``) keep every variable in float32 and
cast it to the compute dtype inside each layer's call; a layer casts its floating inputs to its
compute dtype, so a float32 image enters the copy unchanged. :func:`mixed_clone` rebuilds each layer
of a functional or Sequential model (nested ones included) from its config with the mixed policy,
under the same name, and copies the weights. Kept in float32, as Keras' mixed-precision guide
advises: softmax layers (``Softmax``, ``Activation('softmax')``, a layer with a softmax activation)
and any layer whose policy was not plain float32. BatchNormalization needs nothing: Keras computes
its statistics in float32 and casts only the result.

Everything handed to the rest of the pipeline stays float32: :func:`float32_outputs` wraps an
extractor so the tapped activations and the logits are cast right after the forward pass, before any
reduction, statistic or objective sees them (and the gradient of a float32 objective flows back
through the same casts).
"""
from __future__ import annotations

from pipeline.backend.keras_internals import producer

FLOAT32 = "float32"
MIXED = ("mixed_float16", "mixed_bfloat16")


def mixed_clone(model, policy):
    """A copy of a functional or Sequential ``keras.Model`` computing under ``policy``.

    Parameters
    ----------
    model : keras.Model
        Functional or Sequential; nested functional/Sequential sub-models are copied too.
    policy : {"mixed_float16", "mixed_bfloat16"}

    Returns
    -------
    keras.Model
        Same layer names, same weights (float32 variables), its own variables.

    Raises
    ------
    ValueError
        ``policy`` unknown, or the copy does not have the original's weights (shapes or count).
    Exception
        Whatever Keras raises for a model it cannot clone (a subclassed model, a layer whose
        config does not rebuild it).
    """
    if policy not in MIXED:
        raise ValueError(f"unknown mixed precision policy {policy!r}: use one of {', '.join(MIXED)}")
    clone = _clone(model, policy)
    _copy_weights(model, clone)
    return clone


def _clone(model, policy):
    """``model`` rebuilt layer by layer under ``policy`` (fresh weights); nested models likewise."""
    import keras

    def clone_layer(layer):
        if isinstance(layer, keras.Model):
            return _clone(layer, policy)  # a subclassed one raises: the whole model then stays float32
        config = layer.get_config()
        if not keeps_float32(layer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    inputs = None
    if not isinstance(model, keras.Sequential):  # a Sequential keeps its InputLayer's name itself
        # Keras names a cloned functional model's inputs after their tensors: keep the layers' names.
        inputs = keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=_input_name(t)), model.input)
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)


def _input_name(tensor):
    layer = producer(tensor)
    return layer.name if layer is not None else None


def keeps_float32(layer) -> bool:
    """Whether the mixed copy leaves ``layer`` as it is: a softmax, or not plain float32 to begin with."""
    policy = getattr(layer, "dtype_policy", None)
    if getattr(policy, "name", None) != FLOAT32:
        return True  # float64, integer, quantized or already mixed: the author chose it
    cls = type(layer).__name__
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    return cls == "Softmax" or activation == "softmax"


def _copy_weights(source, target) -> None:
    src, dst = source.weights, target.weights
    if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(src, dst)):
        raise ValueError(f"the mixed-precision copy has {len(dst)} weights, the model {len(src)}")
    for s, d in zip(src, dst):
        d.assign(s)


def compute_dtypes(model) -> dict:
    """``{layer name: compute dtype}`` of every layer, nested ones as ``outer/inner`` (for tests and logs)."""
    found = {}

    def walk(m, prefix):
        for layer in m.layers:
            found[prefix + layer.name] = getattr(layer, "compute_dtype", None)
            if hasattr(layer, "layers") and layer is not m:
                walk(layer, prefix + layer.name + "/")

    walk(model, "")
    return found


def float32_outputs(extract, policy):
    """Wrap ``extract(x) -> (outputs, logits)`` so every floating tensor it returns is float32.

    Under ``mixed_float16`` the backward pass is also scaled (loss scaling, as Keras does for
    training): the gradient reaching each returned tensor is multiplied by :data:`GRADIENT_SCALE`
    before it enters the float16 layers and divided by it again, in float32, at the input, so small
    gradients of a deep unit do not underflow to zero (float16's smallest normal is 6.1e-5). A
    gradient element that overflowed on the way (inf/NaN) is set to zero. The forward values are
    untouched; bfloat16 has float32's exponent range and needs no scaling.
    """
    from pipeline.backend.tf import tensorflow

    tf = tensorflow()
    scale = GRADIENT_SCALE if policy == "mixed_float16" else None

    def cast(t):
        if not t.dtype.is_floating or t.dtype == tf.float32:
            return t
        t = tf.cast(t, tf.float32)
        return _scaled_gradient(t, scale) if scale else t

    def extract32(x):
        outputs, logits = extract(_unscaled_gradient(x, scale) if scale else x)
        return [cast(o) for o in outputs], cast(logits)

    return extract32


#: Loss scale of the float16 backward pass (2^10: keeps ~10 more bits of small gradients, and leaves
#: gradients up to 64 per element room below float16's maximum of 65504).
GRADIENT_SCALE = 1024.0


def _scaled_gradient(t, scale):
    """``t`` unchanged; its gradient multiplied by ``scale``."""
    from pipeline.backend.tf import tensorflow

    tf = tensorflow()

    @tf.custom_gradient
    def identity(y):
        return tf.identity(y), lambda dy: dy * scale

    return identity(t)


def _unscaled_gradient(x, scale):
    """``x`` unchanged; its gradient divided by ``scale``, elements that overflowed set to zero."""
    from pipeline.backend.tf import tensorflow

    tf = tensorflow()

    @tf.custom_gradient
    def identity(y):
        def grad(dy):
            dy = dy / scale
            return tf.where(tf.math.is_finite(dy), dy, tf.zeros_like(dy))

        return tf.identity(y), grad

    return identity(x)


def not_applicable(precision, what) -> str:
    """The one-line note for a model that cannot be given a mixed policy (it runs in float32)."""
    return (f"compute.precision {precision} applies to Keras functional and Sequential models only; "
            f"{what} runs in float32")


def cpu_note(precision) -> str:
    """The one-line note when no GPU is visible (the precision is honoured all the same)."""
    return (f"compute.precision {precision}: mixed precision is meant for GPUs (tensor cores); on a CPU it "
            "is usually slower than float32 (applied anyway)")
