"""Benchmark the Dask engine's extraction: throughput with 1 and 2 workers, peak memory per worker.

Run from the repository root::

    python tests/benchmarks/bench_distributed.py            # N = 2048 and 4N = 8192 images (~5 min on 2 cores)
    python tests/benchmarks/bench_distributed.py --quick    # N = 512, a smoke run (~2 min)

What is measured, all in the same run on the same machine:

1. Throughput of the extract stage on a folder of PNGs (64x64 RGB, decoded by Pillow) through the
   mini-ResNet of ``bench_extract.py`` (eight analysed layers), with the local engine and with a
   LocalCluster of 1 and of 2 single-threaded worker processes, started the way the tool starts
   it. The stage is the tool's own (``Runner(...).run(only="extract")``), each run in a fresh
   interpreter (so start-up is paid every time and peak RSS is that run's own), at N and at 4N
   images. The *steady* rate counts images per second once the model is loaded and traced
   everywhere: for the local engine from the end of the first batch to the end of the last one
   (timed by the stage's own progress bar, ``harness.watch_progress``); on Dask from the first shard's start
   to the last shard's end (Dask's task stream; every worker loaded and traced the model before,
   while the client checked the images). The *whole-stage* rate ``4N / t(4N)`` includes start-up
   (cluster, TensorFlow import in every worker, model load, image check). Marginal CPU time per
   image, ``(CPU(4N) - CPU(N)) / 3N`` over the client and all workers, is printed as well: other
   work on a shared machine moves wall-clock rates a lot, CPU time much less. Each run is repeated
   (``--repeats``, default 2; configurations interleaved) and the best kept. Shards are
   ``extract.chunk_rows = 512`` rows (8 batches of 64): N gives 4 shards, 4N 16.
2. Peak memory per worker: each worker process's ``ru_maxrss`` at the end of the run, at N and 4N.
   It includes TensorFlow itself (about 1.3 GB); what matters is that it does not grow with N.
   The client's own peak (it never imports TensorFlow) is printed too.
3. The 2-worker arrays are compared bit for bit with the local engine's.

Data are generated with ``numpy.random.default_rng(0)`` under a ``tempfile.mkdtemp()`` removed at
the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness  # first: oneDNN off and the repository on sys.path, before TensorFlow is imported
import numpy as np

CHUNK_ROWS = 512


def log(msg):
    harness.log(msg, stream=sys.stderr)


# --------------------------------------------------------------------------- one run (child process)


# Run on the workers by client.run: defined in __main__, so Dask ships them by value and a worker
# needs nothing of this folder importable.
def _peak_kb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_seconds():
    return time.process_time()


def child(spec_path):
    """Run the extract stage once as described in the JSON spec; print timings and peaks as JSON."""
    from pipeline.config import make_config
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    spec = json.loads(Path(spec_path).read_text())
    cfg = make_config(spec["config"])
    cluster = client = None
    if cfg.engine == "dask":
        from distributed import Client, LocalCluster

        from pipeline.engines.cluster import WORKER_ENV

        import logging

        cluster = LocalCluster(n_workers=spec["workers"], threads_per_worker=1, processes=True,
                               env=dict(WORKER_ENV), dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
        cfg.scheduler = cluster.scheduler_address
    stamps = []  # when each batch of the local engine is back, from the stage's progress bar
    t0 = time.perf_counter()
    if client is None:
        with harness.watch_progress("extract", on_update=lambda n: stamps.append(time.perf_counter())):
            Runner(cfg, all_stages()).run(only="extract", force=True)
    else:
        from distributed import get_task_stream

        with get_task_stream(client) as stream:
            Runner(cfg, all_stages()).run(only="extract", force=True)
    seconds = time.perf_counter() - t0
    n, bs = cfg.data.limit, cfg.extract.batch_size
    if client is None:  # from the end of the first batch (model loaded, graph traced) to the last
        steady = (n - bs) / (stamps[-1] - stamps[0])
    else:  # from the first shard's start to the last one's end (every worker warm: see dask_extract)
        spans = [(s["start"], s["stop"]) for t in stream.data if t["key"].startswith("extract_shard")
                 for s in t["startstops"] if s["action"] == "compute"]
        steady = n / (max(b for _, b in spans) - min(a for a, _ in spans))
    out = {"seconds": seconds, "steady": steady, "client_peak_kb": harness.peak_kb(), "cpu": time.process_time()}
    if client is not None:
        out["worker_peak_kb"] = sorted(client.run(_peak_kb).values())
        out["cpu"] += sum(client.run(_cpu_seconds).values())
        from pipeline.engines.cluster import close_client

        close_client()
        client.close()
        cluster.close()
    harness.emit(out)


def run_child(tmp, tag, config, workers=None):
    spec = Path(tmp) / f"{tag}.json"
    spec.write_text(json.dumps({"config": config, "workers": workers}))
    return harness.run_child([sys.executable, __file__, "--child", spec], f"run {tag}").json()


# --------------------------------------------------------------------------- driver


def save_assets(tmp, n_max):
    """In a child process, so the driver stays small: Linux keeps ``ru_maxrss`` across fork + exec,
    and the children's peaks must be their own."""
    import bench_extract as B

    from pipeline.backend.tf import tensorflow

    tensorflow()
    B.build_model().save(Path(tmp) / "mini_resnet.keras")
    rng = np.random.default_rng(0)
    x = B.make_images(rng, n_max)
    B.write_folder(Path(tmp) / "images", x, rng.integers(0, B.CLASSES, n_max))


def make_assets(tmp, n_max):
    harness.run_child([sys.executable, __file__, "--make-assets", tmp, n_max], "making the assets")
    return str(Path(tmp) / "mini_resnet.keras"), str(Path(tmp) / "images")


def config(tmp, name, model, folder, n, engine):
    return {"name": name, "out": str(Path(tmp) / name), "model": model, "engine": engine,
            "data": {"images": folder, "limit": n}, "layers": "auto",
            "extract": {"batch_size": 64, "chunk_rows": CHUNK_ROWS}}


def same_arrays(a, b):
    import zarr

    ga, gb = zarr.open_group(str(Path(a) / "activations.zarr"), mode="r"), zarr.open_group(
        str(Path(b) / "activations.zarr"), mode="r")

    def keys(g, prefix=""):
        out = []
        for name, m in g.members():
            out += keys(m, f"{prefix}{name}/") if isinstance(m, zarr.Group) else [prefix + name]
        return sorted(out)

    return keys(ga) == keys(gb) and all(np.array_equal(ga[k][:], gb[k][:]) for k in keys(ga))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 512 instead of 2048")
    ap.add_argument("--n", type=int, help="images in the small run (the large one has 4x)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration and size; the fastest is kept")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--make-assets", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.make_assets:
        return save_assets(args.make_assets[0], int(args.make_assets[1]))
    n = args.n or (512 if args.quick else 2048)
    tmp = tempfile.mkdtemp(prefix="bench_distributed_")
    try:
        log(f"making {4 * n} PNGs and the model under {tmp} …")
        model, folder = make_assets(tmp, 4 * n)
        engines = [("local engine", "local", None), ("dask, 1 worker", "dask", 1), ("dask, 2 workers", "dask", 2)]
        best, runs, all_runs = {}, {}, {}
        for rep in range(args.repeats):  # configurations interleaved, so a busy spell hits them all
            for label, engine, workers in engines:
                for size in (n, 4 * n):
                    tag = f"{engine}{workers or ''}_{size}"
                    log(f"round {rep + 1}/{args.repeats}, {label}: {size} images …")
                    res = run_child(tmp, tag, config(tmp, tag, model, folder, size, engine), workers)
                    runs[(engine, workers, size)] = Path(tmp) / tag
                    key = (label, size)
                    all_runs.setdefault(key, []).append(res)
                    if key not in best or res["steady"] > best[key]["steady"]:
                        best[key] = res
        rows = []
        for label, engine, workers in engines:
            res = {size: best[(label, size)] for size in (n, 4 * n)}
            rows.append((label, workers, res, max(res[n]["steady"], res[4 * n]["steady"])))
        cpu = {label: min(r["cpu"] for r in all_runs[(label, 4 * n)]) - min(r["cpu"] for r in all_runs[(label, n)])
               for label, _, _ in engines}
        report(n, rows, cpu, same_arrays(runs[("local", None, 4 * n)], runs[("dask", 2, 4 * n)]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(n, rows, cpu, identical):
    base = rows[0][3]
    print(f"\nExtract stage, mini-ResNet 64x64x3 (8 layers), PNG folder, batch 64, shards of {CHUNK_ROWS} rows; "
          f"{os.cpu_count()} cores.")
    print(f"N = {n}, 4N = {4 * n}. Steady rate: images per second once the model is loaded and traced "
          "everywhere (local: first to last batch; dask: first shard start to last shard end), best of N and 4N "
          "over the repeats. Whole-stage: 4N / t(4N), start-up included (cluster, TensorFlow import per worker, "
          "model load, image check).\n")
    print(f"{'engine':<16} {'t(N) s':>8} {'t(4N) s':>8} {'whole-stage img/s':>18} {'steady img/s':>13} "
          f"{'vs local':>9} {'CPU ms/img':>11}")
    for label, workers, res, steady in rows:
        whole = 4 * n / res[4 * n]["seconds"]
        print(f"{label:<16} {res[n]['seconds']:>8.1f} {res[4 * n]['seconds']:>8.1f} {whole:>18.0f} "
              f"{steady:>13.0f} {steady / base:>8.2f}x {1000 * cpu[label] / (3 * n):>11.2f}")
    print("(CPU ms/img: (CPU(4N) - CPU(N)) / 3N, process CPU time of the client and all workers, all threads, "
          "least over the repeats; less sensitive than wall time to other work on the machine)")
    print("\nPeak RSS (MB)")
    print(f"{'engine':<16} {'per worker at N':>22} {'per worker at 4N':>22} {'client at N / 4N':>18}")
    for label, workers, res, _ in rows:
        def mb(kb):
            return f"{kb / 1024:.0f}"

        if workers:
            at_n = " / ".join(mb(k) for k in res[n]["worker_peak_kb"])
            at_4n = " / ".join(mb(k) for k in res[4 * n]["worker_peak_kb"])
        else:
            at_n = at_4n = "-"
        client = f"{mb(res[n]['client_peak_kb'])} / {mb(res[4 * n]['client_peak_kb'])}"
        print(f"{label:<16} {at_n:>22} {at_4n:>22} {client:>18}")
    print("\n(local engine: the client column is the one process, TensorFlow included; dask: the client never "
          "imports TensorFlow, each worker does.)")
    print(f"2-worker arrays identical to the local engine's: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
