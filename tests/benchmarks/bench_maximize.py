"""Benchmark: the maximize stage vs tf-keras-vis, units per second and image quality, on two models.

Run as ``python tests/benchmarks/bench_maximize.py`` (tf-keras-vis is needed only here:
``pip install tf-keras-vis``; version 0.8.7 works with Keras 3 through ``tf.keras``). Several
minutes on 2 CPU cores. ``--cases demo,xception`` picks the cases, ``--steps`` (256),
``--vis-units`` (4), ``--seed``, ``--vis-no-regularizers`` (one more tf-keras-vis row).

Cases, one after the other in one process:

(a) ``demo``: the demo model (``ensure_demo_assets("data/demo")``), layer ``conv3``, 64 units,
    32x32 RGB, inputs in [0, 1] (``data.scale: 1/255``), its 800 analysis images.
(b) ``xception``: ``tests/zoo.py: mini_xception(classes=4)`` (separable convolutions, BatchNorm,
    residual adds), 64x64 grey, inputs in [-1, 1] (``data.scale: symmetric``), trained for 4 epochs
    on 1200 grey 64 px shape images (``make_shapes``; BatchNorm momentum 0.9 so the moving
    statistics settle in so short a training) so its units mean something; 400 held-out
    grey PNGs in class folders are the run's images. Model and images are cached under
    ``data/benchmarks/`` keyed by their settings, so a rerun skips the training. Layer ``add4``
    (the last residual sum), 128 units.

Ours = the maximize stage itself, through the public command line run in this process
(``pipeline.cli.main``): a config with ``maximize: {units: all, layers: [LAYER], clusters: false,
classes: false, steps: STEPS, batch_size: auto, max_seconds: null}``, defaults otherwise (top-level
``layers: [LAYER]`` only keeps the untimed extraction small). ``extract`` and ``cluster`` (which
maximize requires) run first, untimed and reused by a rerun; then ``maximize/`` is deleted and
``maximize CONFIG --force`` is timed with a wall clock around the call: model load, batch-size
search, compilation, rendering, PNG writing and scoring are all in (Python and TensorFlow
start-up are not: this process has them already, as it has for tf-keras-vis). Units/s = units
rendered / those seconds. Median score and share >= 1 come from the stage's own
``maximize/index.parquet`` (rows with ``score_valid``); the batch size (and whatever else the stage
decided) from ``manifest.json`` -> stages -> maximize -> summary -> compute, printed as it is.

tf-keras-vis: ``ActivationMaximization`` with its defaults (pixel space 0-255, jitter, rotation,
total-variation and L1 regularisers, RMSprop), eager, one unit per call as its documentation shows,
on a model with a ``Rescaling`` layer in front so it works in the 0-255 pixels its defaults are
tuned for (``Rescaling(1/255)``, resp. ``Rescaling(2/255, -1)`` on the grey input). It is slow, so
only the first ``--vis-units`` units are timed and units/s is computed from them.

Quality, one definition for both: ``score`` = the channel mean the final 8-bit image reaches /
the channel mean's maximum over the run's images (:mod:`pipeline.maximize.quality`, NaN where that
maximum is not clearly positive); medians and the share >= 1 over units with a valid score. The
bench recomputes it for the stage's PNGs too, which must agree with the stage's own index.
Targets (issue 16): ours / tf-keras-vis units/s >= 20x and the stage's median score >= 1.8 on both.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import harness  # noqa: F401 - first: oneDNN off and the repository on sys.path, before TensorFlow
import numpy as np

BENCH_DIR = harness.ROOT / "data" / "benchmarks"
XCEPTION = dict(version=2, classes=4, size=64, n_train=1200, epochs=4, n_images=400, batch_size=32,
                learning_rate=1e-3, bn_momentum=0.9)
TARGET_RATIO, TARGET_SCORE = 20.0, 1.8


# --------------------------------------------------------------------------- models and images


def grey(x):
    """RGB uint8 (N, H, W, 3) -> grey uint8 (N, H, W, 1), ITU-R 601 luma as Pillow's ``convert("L")``."""
    return np.rint(x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).clip(0, 255) \
        .astype(np.uint8)[..., None]


def ensure_xception(seed, log):
    """The trained grey mini-Xception and its held-out image folder, built once per settings.

    Returns
    -------
    dict
        ``model`` (``.keras``), ``images`` (``<class>/<index:05d>.png``, grey), ``info`` (dict).
    """
    import keras

    settings = dict(XCEPTION, seed=seed, keras=keras.__version__)  # the cache key
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = BENCH_DIR / f"mini_xception-{key}"
    if (folder / "info.json").exists():
        return {"model": folder / "model.keras", "images": folder / "images",
                "info": json.loads((folder / "info.json").read_text())}
    from PIL import Image

    import zoo
    from pipeline.demo.data import make_shapes

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s = XCEPTION
    x, y, names = make_shapes(s["n_train"], [seed, 1], size=s["size"])
    x_held, y_held, _ = make_shapes(s["n_images"], [seed, 2], size=s["size"])
    x, x_held = grey(x), grey(x_held)
    keras.utils.set_random_seed(seed)
    model = zoo.mini_xception(size=s["size"], classes=s["classes"])
    for layer in model.layers:  # Keras' 0.99 leaves the moving statistics far off after 150 steps: chance accuracy
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = s["bn_momentum"]
    model.compile(optimizer=keras.optimizers.Adam(s["learning_rate"]), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    log(f"training mini-Xception: {s['n_train']} grey {s['size']} px images x {s['epochs']} epochs …")
    t0 = time.perf_counter()
    model.fit(x.astype(np.float32) / 127.5 - 1, y, batch_size=s["batch_size"], epochs=s["epochs"], verbose=0)
    train_seconds = time.perf_counter() - t0
    _, accuracy = model.evaluate(x_held.astype(np.float32) / 127.5 - 1, y_held, verbose=0)
    model.save(tmp / "model.keras")
    for i, (image, label) in enumerate(zip(x_held, y_held)):
        (tmp / "images" / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0], mode="L").save(tmp / "images" / names[label] / f"{i:05d}.png")
    info = dict(settings, held_out_accuracy=round(float(accuracy), 4), train_seconds=round(train_seconds, 1))
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"mini-Xception trained in {train_seconds:.0f} s, held-out accuracy {accuracy:.3f}; cached in {folder}")
    return {"model": folder / "model.keras", "images": folder / "images", "info": info}


def cases(names, seed, log):
    """The benchmark cases: name, description, model file, image folder, layer, ``data.scale``."""
    from pipeline.config import parse_scale
    from pipeline.demo.data import ensure_demo_assets

    out = []
    for name in names:
        if name == "demo":
            assets = ensure_demo_assets("data/demo", log=lambda m: log(f"demo: {m}"))
            out.append(dict(name="demo", model_name="demo model (shapes CNN, RGB)", model=assets["model"],
                            images=assets["images"], layer="conv3", scale="1/255"))
        elif name == "xception":
            assets = ensure_xception(seed, log)
            acc = assets["info"]["held_out_accuracy"]
            out.append(dict(name="xception", model_name=f"mini-Xception (grey, 4 classes, held-out acc {acc:.2f})",
                            model=assets["model"], images=assets["images"], layer="add4", scale="symmetric"))
        else:
            sys.exit(f"unknown case {name!r} (cases: demo, xception)")
    for case in out:
        case["ab"] = parse_scale(case["scale"])
    return out


def load_pixels(files, channels):
    """uint8 (N, H, W, channels) from PNG files."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    x = np.stack([np.asarray(Image.open(f).convert(mode)) for f in files])
    return x[..., None] if channels == 1 else x


def channel_means(keras, model, layer, pixels_uint8, ab):
    """Channel means of ``layer`` on uint8 pixels scaled by ``x * a + b``; (N, C)."""
    sub = keras.Model(model.inputs[0], model.get_layer(layer).output)
    x = pixels_uint8.astype(np.float32) * ab[0] + ab[1]
    return sub.predict(x, batch_size=128, verbose=0).mean(axis=(1, 2))


def quality(keras, model, case, units, images_uint8, acts):
    """Scores of uint8 images for ``units`` against dataset channel means ``acts`` (N, C): (score, valid)."""
    from pipeline.maximize import quality as q

    reached = channel_means(keras, model, case["layer"], images_uint8, case["ab"])
    reached = reached[np.arange(len(units)), units]
    score, _, valid = q.scores(reached, q.column_stats(acts[:, units]))
    return score, valid


def summarise(score, valid):
    """(median score, share >= 1) over the units with a valid score."""
    s = np.asarray(score, float)[np.asarray(valid, bool)]
    if not len(s):
        return np.nan, np.nan
    return float(np.median(s)), float(np.mean(s >= 1))


# --------------------------------------------------------------------------- the two methods


def cli(argv):
    """``pipeline.cli.main(argv)`` in this process, its stdout ("run directory: …") sent to stderr."""
    from pipeline.cli import main as cli_main

    with contextlib.redirect_stdout(sys.stderr):
        return cli_main(argv)


def run_stage(case, steps, seed, log):
    """Extract + cluster (untimed, reused), then the timed maximize stage; returns a dict of results."""
    import pandas as pd

    import zoo

    folder = BENCH_DIR / "maximize" / case["name"]
    folder.mkdir(parents=True, exist_ok=True)
    maximize = dict(units="all", layers=[case["layer"]], clusters=False, classes=False, steps=steps,
                    batch_size="auto", max_seconds=None)
    config = zoo.write_config(folder, Path(case["model"]).resolve(), name=f"bench_maximize_{case['name']}",
                              seed=seed, layers=[case["layer"]],
                              data={"images": str(Path(case["images"]).resolve()), "scale": case["scale"]},
                              maximize=maximize)
    run_dir = folder / "run"
    for stage in ("extract", "cluster"):
        log(f"{case['name']}: {stage} (untimed) …")
        if cli([stage, str(config)]):
            sys.exit(f"{case['name']}: `python -m pipeline {stage} {config}` failed")
    shutil.rmtree(run_dir / "maximize", ignore_errors=True)  # no image reused from an earlier run
    log(f"{case['name']}: maximize (timed) …")
    t0 = time.perf_counter()
    code = cli(["maximize", str(config), "--force"])
    seconds = time.perf_counter() - t0
    if code:
        sys.exit(f"{case['name']}: `python -m pipeline maximize {config} --force` failed ({code})")
    record = json.loads((run_dir / "manifest.json").read_text())["stages"]["maximize"]
    index = pd.read_parquet(run_dir / "maximize" / "index.parquet")
    index = index[(index["kind"] == "unit") & (index["layer"] == case["layer"])].sort_values("channel")
    return dict(seconds=seconds, stage_seconds=record.get("seconds"), summary=record.get("summary", {}),
                compute=record.get("summary", {}).get("compute"), index=index, run_dir=run_dir, config=config)


def run_tf_keras_vis(keras, tf, model, case, units, steps, seed, regularizers=True):
    """tf-keras-vis defaults (optionally without its regularisers), one unit per call; (seconds, uint8 images)."""
    from tf_keras_vis.activation_maximization import ActivationMaximization

    a, b = case["ab"]
    inp = keras.Input(model.inputs[0].shape[1:])
    pixels_model = keras.Model(inp, keras.Model(model.inputs[0], model.get_layer(case["layer"]).output)(
        keras.layers.Rescaling(a, b)(inp)))
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


# --------------------------------------------------------------------------- one case


def run_case(keras, tf, case, args, vis_name, log):
    """Both methods on one case; prints its table and returns ``(ratio, our median score)``."""
    from pipeline.inputs.models import load_model

    model = load_model(str(case["model"])).model
    shape = model.inputs[0].shape[1:]
    channels = int(shape[-1])
    n_units = int(model.get_layer(case["layer"]).output.shape[-1])
    files = sorted(Path(case["images"]).rglob("*.png"))
    acts = channel_means(keras, model, case["layer"], load_pixels(files, channels), case["ab"])
    all_units = list(range(n_units))
    vis_units = all_units[:args.vis_units]

    ours = run_stage(case, args.steps, args.seed, log)
    index = ours["index"]
    rendered = int(ours["summary"].get("rendered", len(index)))
    stage_score, stage_share = summarise(index["score"], index["score_valid"])
    ours_pngs = load_pixels([ours["run_dir"] / p for p in index["path"]], channels)
    units_done = index["channel"].astype(int).tolist()
    bench_score, bench_valid = quality(keras, model, case, units_done, ours_pngs, acts)
    same = np.isin(units_done, vis_units)

    log(f"{case['name']}: tf-keras-vis {len(vis_units)} units x {args.steps} steps …")
    vis_seconds, vis_images = run_tf_keras_vis(keras, tf, model, case, vis_units, args.steps, args.seed)
    rows = [(vis_name, len(vis_units), vis_seconds, summarise(*quality(keras, model, case, vis_units, vis_images,
                                                                        acts)))]
    if args.vis_no_regularizers:
        log(f"{case['name']}: tf-keras-vis without regularisers …")
        sec, images = run_tf_keras_vis(keras, tf, model, case, vis_units, args.steps, args.seed, False)
        rows.append(("tf-keras-vis, regularizers=[]", len(vis_units), sec,
                     summarise(*quality(keras, model, case, vis_units, images, acts))))
    vis_rate = len(vis_units) / vis_seconds
    ours_rate = rendered / ours["seconds"]
    rows += [
        ("maximize stage (CLI in-process; index.parquet)", rendered, ours["seconds"], (stage_score, stage_share)),
        ("  same PNGs scored by this bench", len(units_done), np.nan, summarise(bench_score, bench_valid)),
        (f"  same, on tf-keras-vis's {len(vis_units)} units", int(same.sum()), np.nan,
         summarise(bench_score[same], bench_valid[same])),
    ]
    px = "x".join(str(int(s)) for s in shape[:2])
    print(f"\n== {case['name']}: {case['model_name']}, layer {case['layer']}, {n_units} units, {px} px "
          f"{'grey' if channels == 1 else 'RGB'}, {args.steps} steps; dataset max over {len(acts)} images "
          f"(data.scale {case['scale']})")
    print(f"{'method':<52} {'units':>5} {'seconds':>8} {'units/s':>8} {'median score':>12} {'share>=1':>8}")
    for name, units, seconds, (score, share) in rows:
        sec = f"{seconds:8.1f}" if np.isfinite(seconds) else f"{'':>8}"
        rate = f"{units / seconds:8.3f}" if np.isfinite(seconds) else f"{'':>8}"
        print(f"{name:<52} {units:>5} {sec} {rate} {score:12.2f} {share:8.0%}")
    ratio = ours_rate / vis_rate
    print(f"ratio ours / tf-keras-vis (units/s): {ratio:.1f}x")
    print(f"stage seconds in manifest.json: {ours['stage_seconds']} (timed around the CLI call: "
          f"{ours['seconds']:.1f}); summary: images {ours['summary'].get('images')}, "
          f"median_score {ours['summary'].get('median_score')}")
    compute = ours["compute"] or {}
    print(f"batch size {compute.get('batch_size')}; XLA: "
          f"{compute.get('xla', 'not recorded in summary.compute')}")
    print(f"summary.compute: {json.dumps(compute)}")
    return ratio, stage_score, abs(stage_score - summarise(bench_score, bench_valid)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--vis-units", type=int, default=4, help="units timed for tf-keras-vis (slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="demo,xception", help="comma-separated: demo, xception")
    parser.add_argument("--vis-no-regularizers", action="store_true",
                        help="also run tf-keras-vis without its TV/L1 regularisers (tuned for VGG16's large activations)")
    args = parser.parse_args(argv)
    load_start, t_start = os.getloadavg(), time.perf_counter()

    def log(msg):
        harness.log(msg, sys.stderr)

    from pipeline.backend.tf import gpus, tensorflow

    tf = tensorflow()
    import keras

    try:
        import tf_keras_vis
    except ImportError:
        sys.exit("tf-keras-vis is not installed: pip install tf-keras-vis")
    vis_name = f"tf-keras-vis {tf_keras_vis.__version__} (defaults, eager, 1 unit/call)"
    chosen = cases([c.strip() for c in args.cases.split(",") if c.strip()], args.seed, log)
    results = {c["name"]: run_case(keras, tf, c, args, vis_name, log) for c in chosen}

    devices = gpus()
    print(f"\ndevice: {', '.join(devices) if devices else f'CPU, {len(os.sched_getaffinity(0))} cores'}; "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}")
    checks = []
    for name, (ratio, score, gap) in results.items():
        checks += [(f"{name}: units/s ours / tf-keras-vis", f"{ratio:.1f}x", f">= {TARGET_RATIO:.0f}x",
                    harness.ok(ratio >= TARGET_RATIO)),
                   (f"{name}: median score of the stage", f"{score:.2f}", f">= {TARGET_SCORE}",
                    harness.ok(score >= TARGET_SCORE)),
                   (f"{name}: |stage median - bench recomputation|", f"{gap:.3f}", "<= 0.01", harness.ok(gap <= 0.01))]
    print()
    harness.print_checks(checks)
    for line in harness.machine_lines(load_start, t_start,
                                      "units/s are low on a loaded machine (both methods share it)"):
        print(line)


if __name__ == "__main__":
    main()
