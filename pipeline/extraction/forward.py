"""The extract stage's computation: one compiled multi-output forward pass per batch, reduced on the device.

Feature maps ``(B, H, W, C)`` become ``(B, C)`` per reduction (mean, max over H and W) before they
leave the device, so only a few floats per unit and image are copied back. Vector outputs are
kept as they are (key ``value``). Nothing here reads or writes files.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import first_line
from pipeline.storage.arrays import layer_path


def spatial_positions(seed, layer_index, image_indices, height, width, k) -> np.ndarray:
    """Seeded random ``(row, col)`` positions per image, independent of batching.

    Each image's positions depend only on (seed, layer, image index), so a resumed or
    re-batched run samples the same places.
    """
    out = np.empty((len(image_indices), k, 2), dtype=np.int32)
    for i, idx in enumerate(image_indices):
        rng = np.random.default_rng([seed, layer_index, int(idx)])
        flat = rng.choice(height * width, size=k, replace=k > height * width)
        out[i, :, 0], out[i, :, 1] = np.divmod(flat, width)
    return out


def thumbnail_shape(size, limit):
    """Thumbnail (height, width): the image scaled down so its longer side is at most ``limit``."""
    h, w = size
    f = min(1.0, limit / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def two_stage(shape) -> bool:
    """Whether a map of static ``shape`` (B, H, W, C) reduces faster over H first, then W.

    TensorFlow's CPU kernel for a reduction over the two middle axes of NHWC slows down on maps
    with many channels per position: on a 2-core VM, mean + max of a 32x56x56x256 map took 19.8 ms
    at once and 11.1 ms in two steps (XLA: 11.2), 28x28x512 13.1 vs 5.8, 14x14x1024 4.8 vs 3.1, and
    32x32x64 (batch 64) 2.0 vs 1.7. Two steps lose on very large or very small maps (112x112x64
    17.2 vs 20.4, 7x7x2048 1.6 vs 1.8) and tie on small ones (16x16x64, 14x14x256), hence the
    bounds: 14x14 to 56x56 positions and at least 64k values per image.
    """
    if len(shape) != 4 or None in tuple(shape[1:]):
        return False
    positions = shape[1] * shape[2]
    return 196 <= positions <= 3136 and positions * shape[3] >= 65536


def large_map(shape) -> bool:
    """Whether a map of static ``shape`` (B, H, W, C) has more than 56x56 positions.

    Such maps are reduced by other kernels (:func:`spatial_mean`, :func:`spatial_max`): on a
    2-core VM mean + max of a 32x112x112x64 map took 17.0 ms with TensorFlow's reductions and
    11.0 ms as a matrix product and a max-pool (32x112x112x32: 8.2 vs 6.5). On smaller maps the two
    reductions, each on one core, run side by side and the multi-threaded kernels gain nothing
    (32x56x56x256: 7.9 vs 9.5 ms; 64x32x32x64: 1.6 vs 1.7).
    """
    return len(shape) == 4 and None not in tuple(shape[1:3]) and shape[1] * shape[2] > 3136


def spatial_mean(y, split=True):
    """Mean of ``y`` over axes 1 and 2 (``(B, H, W, C) -> (B, C)``).

    With ``split``: a :func:`large_map` as one batched matrix product of the ``(B, H*W, C)`` map
    with a ``1/(H*W)`` row, a :func:`two_stage` map over H and then W, others at once. The
    XLA-compiled summaries (``split=False``) keep one reduction.
    """
    import tensorflow as tf

    shape = tuple(y.shape)
    if split and large_map(shape):
        batch, channels, positions = tf.shape(y)[0], tf.shape(y)[3], shape[1] * shape[2]
        row = tf.fill([batch, 1, positions], tf.constant(1.0 / positions, y.dtype))
        return tf.reshape(tf.matmul(row, tf.reshape(y, [batch, positions, channels])), [batch, channels])
    if split and two_stage(shape):
        return tf.reduce_mean(tf.reduce_mean(y, axis=1), axis=1)
    return tf.reduce_mean(y, axis=[1, 2])


def spatial_max(y, split=True):
    """Max of ``y`` over axes 1 and 2 (``(B, H, W, C) -> (B, C)``).

    With ``split``: a :func:`large_map` max-pooled with one window over the whole map, a
    :func:`two_stage` map over H and then W, others at once. The XLA-compiled summaries
    (``split=False``) keep one reduction.
    """
    import tensorflow as tf

    shape = tuple(y.shape)
    if split and large_map(shape):
        window = shape[1:3]
        return tf.reshape(tf.nn.max_pool2d(y, window, window, "VALID"), [tf.shape(y)[0], tf.shape(y)[3]])
    if split and two_stage(shape):
        return tf.reduce_max(tf.reduce_max(y, axis=1), axis=1)
    return tf.reduce_max(y, axis=[1, 2])


def make_forward(extractor, layer_kinds, reductions, scale, dtype="float32", spatial_samples=0,
                 thumb=None, jit=None, jit_model=False):
    """Compile the per-batch computation.

    Parameters
    ----------
    extractor : callable
        ``extractor(x) -> (layer outputs, logits)`` from the model adapter.
    layer_kinds : dict
        ``{layer: "map" | "vector"}``, the order of ``extractor``'s outputs.
    reductions : list of str
    scale : (float, float)
        Pixels in [0, 255] become ``x * a + b`` (the model's own input range).
    dtype : str
        Storage dtype; the cast happens on the device.
    spatial_samples : int
    thumb : (int, int), optional
        Also return ``thumbnails`` (uint8, this size) so reports need not reopen the images.
    jit : bool, optional
        Compile the summaries (reductions, casts, non-finite checks) with XLA, the model itself
        not. XLA fuses the mean and the max of a map into one pass over it (on 2 CPU cores, the
        benchmark's mini-ResNet, batch 64, 7 maps: about 6.5 ms of CPU per batch instead of
        10.5 ms). Default (``None``): on a GPU yes, on a CPU no, as Keras' own
        ``jit_compile="auto"`` decides: with TensorFlow 2.21 the XLA-compiled summaries killed the
        process with SIGSEGV in about 1 CPU run in 10 (3 of 45 runs of a small CNN; 0 of 55
        without XLA). If XLA cannot compile the summaries (first call), they run without it.
    jit_model : bool
        Compile the model part too (``compute.xla``), as one XLA cluster of its own (the
        summaries stay per map). Slower on CPUs as measured above, often faster on GPUs: the
        extract stage times both at start-up (:mod:`pipeline.extraction.tuning`). If XLA cannot
        compile the model (an op without an XLA kernel; first call), it runs without XLA and
        ``forward.xla_error`` says why.

    Returns
    -------
    callable
        ``forward(pixels_uint8, positions, valid=None) -> (dict of arrays, dict of non-finite counts)``;
        ``positions`` is a list with one ``(B, k, 2)`` int32 array per map layer (empty if k = 0);
        only the first ``valid`` rows (default all) are returned and checked, so a padded last
        batch reuses the compiled graph. ``forward.jit`` says whether XLA compiles the summaries,
        ``forward.jit_model`` whether it compiles the model (``forward.xla_error``: why not, when
        it was asked to and could not).
    """
    import tensorflow as tf

    from pipeline.backend.autobatch import cpu_only

    if jit is None:
        jit = not cpu_only()
    a, b = float(scale[0]), float(scale[1])
    layers = list(layer_kinds)
    out_dtype = tf.float16 if dtype == "float16" else tf.float32

    def count_nonfinite(summary, y, rows):
        # A full is_finite pass over every feature map costs as much as the reductions. The sum of
        # a summary computed from y (its means) is finite exactly when y holds no NaN/Inf (bar
        # overflow, which only sends us to the exact count), so the exact count of non-finite
        # elements runs only when something is wrong. Rows past ``valid`` (padding) are masked,
        # not sliced off: XLA needs static shapes.
        def mask(t):
            return tf.reshape(rows, [-1] + [1] * (len(t.shape) - 1))

        finite = tf.math.is_finite(tf.reduce_sum(tf.where(mask(summary), summary, tf.zeros_like(summary))))
        return tf.cond(finite, lambda: tf.constant(0, tf.int64),
                       lambda: tf.math.count_nonzero(tf.logical_and(mask(y), ~tf.math.is_finite(y)), dtype=tf.int64))

    def map_summary(y, rows, split=True):
        """One feature map's reductions and non-finite count (what XLA compiles, one map at a time)."""
        y = tf.cast(y, tf.float32)
        means = spatial_mean(y, split)
        reduced = {r: means if r == "mean" else spatial_max(y, split) for r in reductions}
        return reduced, count_nonfinite(means, y, rows)

    def summarise(outputs, logits, positions, valid, per_map):
        """Layer outputs -> the stored arrays and the non-finite counts."""
        rows = tf.range(tf.shape(logits)[0]) < valid
        arrays, bad = {}, {}
        p = 0
        for name, y in zip(layers, outputs):
            layer = layer_path(name)
            if layer_kinds[name] == "map":
                reduced, bad[name] = per_map(y, rows)
                for r in reductions:
                    arrays[f"{layer}/{r}"] = tf.cast(reduced[r], out_dtype)
                if spatial_samples:
                    y = tf.cast(y, tf.float32)
                    arrays[f"{layer}/spatial"] = tf.cast(tf.gather_nd(y, positions[p], batch_dims=1), out_dtype)
                    p += 1
            else:
                flat = tf.reshape(tf.cast(y, tf.float32), [tf.shape(y)[0], -1])
                bad[name] = count_nonfinite(flat, flat, rows)
                arrays[f"{layer}/value"] = tf.cast(flat, out_dtype)
        logits = tf.cast(tf.reshape(logits, [tf.shape(logits)[0], -1]), tf.float32)
        bad["logits"] = count_nonfinite(logits, logits, rows)
        arrays["logits"] = logits
        return arrays, bad

    def build(use_jit, use_jit_model=False):
        # One XLA cluster per map, not one for all: each map's reductions start as soon as the map
        # exists and overlap the layers after it (a single cluster waited for every map and then
        # ran alone on one core: slower in wall time than no XLA at all).
        per_map = (tf.function(lambda y, rows: map_summary(y, rows, split=False), jit_compile=True) if use_jit
                   else map_summary)
        model = tf.function(extractor, jit_compile=True) if use_jit_model else extractor

        # Callers pad the last batch to the full batch size, so this traces once.
        @tf.function
        def forward(pixels, positions, valid):
            outputs, logits = model(tf.cast(pixels, tf.float32) * a + b)
            arrays, bad = summarise(outputs, logits, positions, valid, per_map)
            if thumb is not None:
                small = tf.image.resize(tf.cast(pixels, tf.float32), thumb, method="area")
                arrays["thumbnails"] = tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)
            return arrays, bad

        return forward

    compiled = build(jit, jit_model)
    xla_failures = (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.InternalError)

    def run(pixels, positions=(), valid=None):
        nonlocal compiled
        valid = len(pixels) if valid is None else valid
        args = (pixels, list(positions), tf.constant(valid, tf.int32))
        while True:
            try:
                arrays, bad = compiled(*args)
                break
            except xla_failures as exc:
                if run.calls or not (run.jit or run.jit_model):
                    raise
                # XLA could not compile it: the same graph without XLA for the model first, then
                # without it for the summaries too
                if run.jit_model:
                    run.jit_model, run.xla_error = False, first_line(exc)
                else:
                    run.jit = False
                compiled = build(run.jit, run.jit_model)
        run.calls += 1
        return ({k: v.numpy()[:valid] for k, v in arrays.items()}, {k: int(v) for k, v in bad.items()})

    run.jit, run.jit_model, run.xla_error, run.calls = bool(jit), bool(jit_model), None, 0
    return run
