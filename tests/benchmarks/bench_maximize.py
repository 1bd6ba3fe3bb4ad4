"""Benchmark: activation-maximization units per second and image quality, ours vs tf-keras-vis.

Run as ``python tests/benchmarks/bench_maximize.py`` (tf-keras-vis is needed only here:
``pip install tf-keras-vis``; version 0.8.7 works with Keras 3 through ``tf.keras``).

Both methods maximise the channel mean of every unit of the demo model's last conv layer
(``conv3``, 64 units, 32x32 RGB) for the same number of steps, in the same process:

- tf-keras-vis ``ActivationMaximization`` with its defaults (pixel space 0-255, jitter 4,
  rotate 1 degree, total-variation and L1 regularisers, RMSprop 1.0), eager, one unit per call,
  as its documentation shows. The demo model wants [0, 1] inputs, so it gets a ``Rescaling``
  layer in front: tf-keras-vis then works in the 0-255 range its defaults are tuned for.
  It is slow, so only ``--vis-units`` units are timed and units/s is computed from them.
- ``pipeline.maximize``: batched (``--batch``), one compiled graph per batch, Fourier
  parameterisation, Lucid's transforms, Adam.

Quality: the activation each final 8-bit image reaches divided by the unit's maximum over the
demo's analysis images (``score``), and (activation − mean) / std (``z``); medians over units
whose dataset max is clearly positive.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import harness  # noqa: F401 - first: oneDNN off and the repository on sys.path, before TensorFlow
import numpy as np


def dataset_activations(keras, model, layer, image_dir):
    """Channel means of ``layer`` over the demo's analysis images (scaled by 1/255)."""
    from PIL import Image

    files = sorted(Path(image_dir).rglob("*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255.0
    sub = keras.Model(model.inputs[0], model.get_layer(layer).output)
    return sub.predict(x, batch_size=128, verbose=0).mean(axis=(1, 2))


def run_tf_keras_vis(keras, tf, model, layer, units, steps, seed, regularizers=True):
    """tf-keras-vis defaults (optionally without its regularisers), one unit per call; returns (seconds, images)."""
    from tf_keras_vis.activation_maximization import ActivationMaximization

    inp = keras.Input(model.inputs[0].shape[1:])
    pixels_model = keras.Model(inp, keras.Model(model.inputs[0], model.get_layer(layer).output)(
        keras.layers.Rescaling(1 / 255.0)(inp)))
    vis = ActivationMaximization(pixels_model, clone=False)
    tf.random.set_seed(seed)
    np.random.seed(seed)
    images = []
    start = time.perf_counter()
    for unit in units:
        kwargs = {} if regularizers else {"regularizers": []}
        image = vis(lambda out, u=unit: tf.reduce_mean(out[..., u], axis=[1, 2]), steps=steps, **kwargs)
        images.append(np.clip(np.rint(np.asarray(image)[0]), 0, 255).astype(np.uint8))
    return time.perf_counter() - start, np.stack(images)


def run_ours(pipeline_model, layer, units, steps, batch, learning_rate, seed):
    """Our batched compiled loop; returns (seconds with compile, seconds after compile, uint8 images)."""
    from pipeline.maximize import objectives as obj
    from pipeline.maximize import plan
    from pipeline.maximize.render import Renderer

    renderer = Renderer(pipeline_model, lambda u: obj.channel(layer, u), steps=steps, learning_rate=learning_rate)
    seeds = [plan.image_seed(seed, "unit", layer, u) for u in units]
    images, first_batch = [], None
    start = time.perf_counter()
    for i in range(0, len(units), batch):
        result = renderer(seeds[i:i + batch], units[i:i + batch])
        images.append(result.images)
        if first_batch is None:
            first_batch = time.perf_counter() - start
    total = time.perf_counter() - start
    images = np.concatenate(images)
    # Steady state: the same batches again, graph already compiled.
    start = time.perf_counter()
    for i in range(0, len(units), batch):
        renderer(seeds[i:i + batch], units[i:i + batch])
    steady = time.perf_counter() - start
    return total, steady, np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def quality(keras, model, layer, units, images_uint8, acts):
    """(median score, median z) of uint8 images for ``units`` against dataset activations ``acts``."""
    from pipeline.maximize import quality as q

    sub = keras.Model(model.inputs[0], model.get_layer(layer).output)
    reached = sub.predict(images_uint8.astype(np.float32) / 255.0, verbose=0).mean(axis=(1, 2))
    reached = reached[np.arange(len(units)), units]
    score, z, valid = q.scores(reached, q.column_stats(acts[:, units]))
    return np.nanmedian(score), np.nanmedian(z), int(valid.sum()), score


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--vis-units", type=int, default=8, help="units timed for tf-keras-vis (slow)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05, help="ours (config default 0.05)")
    parser.add_argument("--layer", default="conv3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vis-no-regularizers", action="store_true",
                        help="also run tf-keras-vis without its TV/L1 regularisers (tuned for VGG16's large activations)")
    args = parser.parse_args(argv)

    from pipeline.demo.data import ensure_demo_assets
    from pipeline.inputs.models import load_model
    from pipeline.backend.tf import tensorflow

    tf = tensorflow()
    import keras

    assets = ensure_demo_assets("data/demo", log=lambda m: print(f"demo: {m}", file=sys.stderr))
    ours_model = load_model(assets["model"])
    model = ours_model.model
    n_units = model.get_layer(args.layer).output.shape[-1]
    size = "x".join(str(s) for s in model.inputs[0].shape[1:3])
    acts = dataset_activations(keras, model, args.layer, assets["images"])
    all_units = list(range(n_units))
    vis_units = all_units[:args.vis_units]

    try:
        import tf_keras_vis

        vis_name = f"tf-keras-vis {tf_keras_vis.__version__} (eager, 1 unit/call)"
    except ImportError:
        sys.exit("tf-keras-vis is not installed: pip install tf-keras-vis")
    print(f"tf-keras-vis: {len(vis_units)} units x {args.steps} steps …", file=sys.stderr, flush=True)
    vis_seconds, vis_images = run_tf_keras_vis(keras, tf, model, args.layer, vis_units, args.steps, args.seed)
    print(f"ours: {n_units} units x {args.steps} steps …", file=sys.stderr, flush=True)
    ours_total, ours_steady, ours_images = run_ours(ours_model, args.layer, all_units, args.steps, args.batch,
                                                    args.learning_rate, args.seed)

    vis_q = quality(keras, model, args.layer, vis_units, vis_images, acts)
    extra = []
    if args.vis_no_regularizers:
        print("tf-keras-vis without regularisers …", file=sys.stderr, flush=True)
        sec, images = run_tf_keras_vis(keras, tf, model, args.layer, vis_units, args.steps, args.seed, False)
        extra = [("tf-keras-vis, regularizers=[]", len(vis_units), sec, len(vis_units) / sec,
                  quality(keras, model, args.layer, vis_units, images, acts))]
    ours_q = quality(keras, model, args.layer, all_units, ours_images, acts)
    ours_q_same = quality(keras, model, args.layer, vis_units, ours_images[:len(vis_units)], acts)
    vis_rate = len(vis_units) / vis_seconds
    rows = [
        (vis_name, len(vis_units), vis_seconds, vis_rate, vis_q), *extra,
        (f"pipeline.maximize (batch {args.batch}, compiled; incl. compile)", n_units, ours_total,
         n_units / ours_total, ours_q),
        ("pipeline.maximize (same, graph already compiled)", n_units, ours_steady, n_units / ours_steady, ours_q),
        (f"pipeline.maximize on tf-keras-vis's {len(vis_units)} units", len(vis_units), np.nan, np.nan, ours_q_same),
    ]
    print(f"\nlayer {args.layer} of the demo model ({n_units} units, {size} px), {args.steps} steps, "
          f"dataset = {len(acts)} analysis images, ours lr {args.learning_rate}")
    print(f"{'method':<58} {'units':>5} {'seconds':>8} {'units/s':>8} {'median score':>12} {'median z':>9}")
    for name, units, seconds, rate, (score, z, n_valid, _) in rows:
        sec = f"{seconds:8.1f}" if np.isfinite(seconds) else f"{'':>8}"
        rte = f"{rate:8.2f}" if np.isfinite(rate) else f"{'':>8}"
        print(f"{name:<58} {units:>5} {sec} {rte} {score:12.2f} {z:9.1f}")
    print(f"speed-up (units/s, incl. compile): {n_units / ours_total / vis_rate:.0f}x; "
          f"graph compiled: {n_units / ours_steady / vis_rate:.0f}x")
    print(f"units with score >= 1: tf-keras-vis {np.mean(vis_q[3] >= 1):.0%}, ours {np.nanmean(ours_q[3] >= 1):.0%} "
          f"(score = activation / dataset max, units whose dataset max is clearly positive)")


if __name__ == "__main__":
    main()
