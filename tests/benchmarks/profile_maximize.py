"""Where a maximize step's time goes: ablations of the step, and TensorFlow's own operator times.

Run as ``python tests/benchmarks/profile_maximize.py [--layer add4] [--batch 32] [--steps 32]``.

On the mini-Xception of ``tests/zoo.py`` (64x64 grey, separable convolutions, BatchNorm, residual
adds; random weights: timing does not depend on them) it times the compiled render loop of one
batch of units with the stage's defaults and with one part taken out at a time (rotation and
scale, every transform, the redirected ReLU gradient, the Fourier parameterisation), each after
its compile, the fastest of ``--repeats`` calls. Then it records one call under TensorFlow's
profiler and prints the operators' total times (the model's convolutions and their gradients,
the warps, the ReLU gradient, the FFT) as a share of the step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import tempfile
import time

import harness  # noqa: F401 - first: oneDNN off and the repository on sys.path, before TensorFlow
import numpy as np


def variants(size, channels):
    """``{name: Renderer keyword arguments}``: the defaults, then one part taken out at a time."""
    from pipeline.maximize import params, transforms

    return {
        "stage defaults": {},
        "no scale/rotate": {"transform": transforms.jitter_only(size)},
        "no transforms": {"transform": None},
        "no ReLU redirect": {"relu_redirect": False},
        "pixel parameterisation": {"param": params.pixel(size, size, channels)},
    }


def time_variant(model, layer, batch, steps, repeats, **kwargs):
    """(seconds of the first call, fastest later call) of one batch of ``batch`` units."""
    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    renderer = Renderer(model, lambda u: obj.channel(layer, u), steps=steps, scale=(2 / 255, -1.0), **kwargs)
    units = list(range(batch))
    t0 = time.perf_counter()
    renderer(units, units)
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        renderer(units, units)
        best = min(best, time.perf_counter() - t0)
    return first, best


def operator_times(model, layer, batch, steps):
    """``{operator type: milliseconds}`` of one compiled call, from TensorFlow's profiler trace."""
    import tensorflow as tf

    try:
        from tsl.profiler.protobuf import xplane_pb2
    except ImportError:  # where TensorFlow keeps it
        from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from pipeline.maximize import objectives as obj
    from pipeline.maximize.render import Renderer

    renderer = Renderer(model, lambda u: obj.channel(layer, u), steps=steps, scale=(2 / 255, -1.0))
    units = list(range(batch))
    renderer(units, units)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        renderer(units, units)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb").read())
    totals = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if line.name.startswith("tf_Compute"):  # operator events (Eigen's own threads nest inside them)
                for event in line.events:
                    totals[names[event.metadata_id].split(":")[-1]] += event.duration_ps / 1e9
    for nested in ("Process", "ParallelFor"):
        totals.pop(nested, None)
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="add4")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--top", type=int, default=16, help="operators listed")
    args = parser.parse_args(argv)

    import zoo

    from pipeline.inputs.models import KerasModel

    keras_model = zoo.mini_xception(classes=4)
    model = KerasModel(keras_model, name="mini_xception")
    load_start, t_start = harness.os.getloadavg(), time.perf_counter()
    harness.log(f"mini-Xception 64x64 grey, layer {args.layer}, batch {args.batch}, {args.steps} steps per call")
    harness.log(f"{'variant':<26} {'first call s':>12} {'ms/step':>8} {'vs defaults':>11}")
    base = None
    for name, kwargs in variants(64, 1).items():
        first, best = time_variant(model, args.layer, args.batch, args.steps, args.repeats, **kwargs)
        per_step = 1000 * best / args.steps
        base = base or per_step
        harness.log(f"{name:<26} {first:12.1f} {per_step:8.1f} {per_step / base:10.2f}x")
    totals = operator_times(model, args.layer, args.batch, args.steps)
    whole = sum(totals.values())
    harness.log(f"\noperators of one call (stage defaults): {whole:.0f} ms of operator time")
    for op, ms in totals.most_common(args.top):
        harness.log(f"  {op:<40} {ms:8.1f} ms {100 * ms / whole:5.1f} %")
    for line in harness.machine_lines(load_start, t_start):
        harness.log(line)


if __name__ == "__main__":
    main()
