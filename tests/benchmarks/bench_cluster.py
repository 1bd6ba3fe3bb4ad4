"""Benchmark the memory of streaming unit correlation (cluster stage) against the number of images.

Run from the repository root::

    python tests/benchmarks/bench_cluster.py             # N = 50,000 and 4N = 200,000 rows x 512 units (~2 min)
    python tests/benchmarks/bench_cluster.py --quick     # smoke run, N = 8192

What is measured: ``correlation_streaming(chunker(zarr_array))`` exactly as the cluster stage calls
it (``pipeline.storage.arrays.chunker``, 4096 rows per block) over a float32 zarr array on
disk of shape (N, 512) and (4N, 512), chunked (4096, 512) with zarr's default codecs. Each
measurement runs in a fresh interpreter that imports numpy, zarr and the pipeline modules, opens
the array, and then records a baseline ``ru_maxrss`` before computing. Reported per run:

- raw peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the child) and the
  increment over the baseline;
- tracemalloc peak (a separate child, tracing started after the baseline, so its overhead is
  not in the RSS or time numbers);
- wall and process CPU seconds of the computation (all threads: BLAS and zarr's decoder).

For context the same is measured for ``np.corrcoef(a[:], rowvar=False)`` (the whole array loaded,
then numpy's float64 covariance). The two results are compared at N on the live units.

Data: ``numpy.random.default_rng(0)``; activations-like: ReLU of a rank-32 latent mix plus noise,
with 8 dead (all-zero) units; written block by block under a ``tempfile.mkdtemp()`` that is
removed at the end (``--keep`` keeps it).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path
from harness import log, ok

UNITS, ROWS, DEAD = 512, 4096, 8


# --------------------------------------------------------------------------- data


def write_array(path, n, seed=0):
    """(n, UNITS) float32 zarr array, chunks (ROWS, UNITS), written one chunk at a time."""
    import numpy as np
    import zarr

    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (32, UNITS)).astype(np.float32) / np.sqrt(32)
    bias = rng.normal(0, 0.5, UNITS).astype(np.float32)
    arr = zarr.open_array(str(path), mode="w", shape=(n, UNITS), chunks=(ROWS, UNITS), dtype="float32",
                          fill_value=0)
    for start in range(0, n, ROWS):
        m = min(ROWS, n - start)
        z = rng.normal(0, 1, (m, 32)).astype(np.float32)
        block = np.maximum(z @ mix + bias + rng.normal(0, 0.5, (m, UNITS)).astype(np.float32), 0)
        block[:, :DEAD] = 0.0
        arr[start:start + m] = block
    return arr


def dir_mb(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


# --------------------------------------------------------------------------- child


def child_main(mode, path, out_npy):
    """In a fresh interpreter: compute ``mode`` over the zarr array at ``path``; print JSON."""
    import tracemalloc
    import warnings

    import numpy as np
    import zarr

    from pipeline.analysis.neurons import correlation_streaming
    from pipeline.storage.arrays import chunker

    method, trace = mode.split("-") if "-" in mode else (mode, None)
    arr = zarr.open_array(str(path), mode="r")
    gc.collect()
    base_kb = harness.peak_kb()
    if trace:
        tracemalloc.start()
    c0, t0 = time.process_time(), time.perf_counter()
    if method == "stream":
        corr, stats = correlation_streaming(chunker(arr, rows=ROWS))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dead units: division by zero -> NaN
            full = arr[:]
            corr = np.corrcoef(full, rowvar=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    trace_peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    peak_kb = harness.peak_kb()
    if out_npy != "-":
        np.save(out_npy, corr)
    harness.emit({"base_kb": base_kb, "peak_kb": peak_kb, "seconds": seconds, "cpu": cpu,
                  "trace_peak": trace_peak, "shape": list(arr.shape)})


def run_child(mode, path, out_npy="-"):
    argv = [sys.executable, __file__, "--child", mode, path, out_npy]
    return harness.run_child(argv, f"child {mode} {path}").json()


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="rows of the small array (default 50000; the large one has 4N)")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=8192")
    ap.add_argument("--keep", action="store_true", help="keep the temporary zarr arrays")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(*args.child)

    import numpy as np
    import zarr

    n = 8192 if args.quick else args.n
    sizes = {"N": n, "4N": 4 * n}
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    log(f"bench_cluster: N={n}, 4N={4 * n}, {UNITS} units, zarr {zarr.__version__}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, load {load_start[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    try:
        paths = {}
        for tag, rows in sizes.items():
            t0 = time.perf_counter()
            paths[tag] = tmp / f"acts_{tag}.zarr"
            write_array(paths[tag], rows, seed=0)
            log(f"wrote {tag}: ({rows}, {UNITS}) float32, {dir_mb(paths[tag]):.0f} MB on disk, "
                f"{time.perf_counter() - t0:.1f} s")
        res = {}
        for method in ("stream", "corrcoef"):
            for tag in sizes:
                out = tmp / f"corr_{method}_{tag}.npy" if tag == "N" else "-"
                log(f"  {method} {tag} ...")
                r = run_child(method, paths[tag], out)
                r["trace_peak"] = run_child(f"{method}-trace", paths[tag])["trace_peak"]
                res[method, tag] = r
                log(f"    {r['seconds']:.2f} s, peak RSS {r['peak_kb'] / 1024:.0f} MB "
                    f"(+{(r['peak_kb'] - r['base_kb']) / 1024:.0f} MB), tracemalloc peak "
                    f"{r['trace_peak'] / 2**20:.0f} MB")
        a = np.load(tmp / "corr_stream_N.npy")
        b = np.load(tmp / "corr_corrcoef_N.npy")
        live = ~np.isnan(np.diag(a))
        max_diff = float(np.abs(a[np.ix_(live, live)] - b[np.ix_(live, live)]).max())
        dead_ok = int((~live).sum()) == DEAD and bool(np.isnan(b[~live][:, 0]).all())
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    def mb(kb):
        return kb / 1024

    print()
    print(f"{'method':<28} {'rows':>8} {'seconds':>8} {'CPU s':>7} {'krows/s':>8} {'base MB':>8} {'peak MB':>8} "
          f"{'incr MB':>8} {'tracemalloc MB':>15}")
    for (method, tag), r in res.items():
        label = {"stream": "correlation_streaming", "corrcoef": "np.corrcoef (full load)"}[method]
        rows = sizes[tag]
        print(f"{label + ' ' + tag:<28} {rows:>8} {r['seconds']:>8.2f} {r['cpu']:>7.2f} {rows / r['seconds'] / 1e3:>8.0f} "
              f"{mb(r['base_kb']):>8.0f} {mb(r['peak_kb']):>8.0f} {mb(r['peak_kb'] - r['base_kb']):>8.0f} "
              f"{r['trace_peak'] / 2**20:>15.1f}")
    print()

    def growth(method, key):
        f = {"raw": lambda r: r["peak_kb"], "incr": lambda r: r["peak_kb"] - r["base_kb"],
             "trace": lambda r: r["trace_peak"]}[key]
        lo, hi = f(res[method, "N"]), f(res[method, "4N"])
        return lo, hi, hi / lo - 1

    rows = []
    for key, label, unit in (("raw", "peak RSS (raw)", 1024), ("incr", "peak RSS increment over baseline", 1024),
                             ("trace", "tracemalloc peak", 2**20)):
        lo, hi, g = growth("stream", key)
        rows.append((f"streaming {label} N -> 4N", f"{lo / unit:.0f} -> {hi / unit:.0f} MB ({g:+.1%})", "<15%",
                     ok(g < 0.15)))
    t_n, t_4n = res["stream", "N"]["seconds"], res["stream", "4N"]["seconds"]
    rows.append(("streaming time 4N / N", f"{t_4n / t_n:.2f}x", "~4x", "-"))
    for key, label, unit in (("incr", "peak RSS increment", 1024), ("trace", "tracemalloc peak", 2**20)):
        lo, hi, g = growth("corrcoef", key)
        rows.append((f"np.corrcoef {label} N -> 4N (context)", f"{lo / unit:.0f} -> {hi / unit:.0f} MB ({g:+.1%})",
                     "-", "-"))
    for tag in sizes:
        s, c = res["stream", tag], res["corrcoef", tag]
        rows.append((f"memory np.corrcoef / streaming at {tag} (incr)",
                     f"{(c['peak_kb'] - c['base_kb']) / max(s['peak_kb'] - s['base_kb'], 1):.1f}x", "-", "-"))
        rows.append((f"time np.corrcoef / streaming at {tag} (wall; CPU)",
                     f"{c['seconds'] / s['seconds']:.2f}x; {c['cpu'] / s['cpu']:.2f}x", "-", "-"))
    rows.append(("max |r_stream - r_corrcoef| at N (live units)", f"{max_diff:.1e}", "<1e-5", ok(max_diff < 1e-5)))
    rows.append((f"dead units NaN in both ({DEAD} planted)", str(dead_ok), "True", ok(dead_ok)))
    harness.print_checks(rows, widths=(50, 30, 8))
    print()
    print("- Each row is a fresh interpreter; 'base' is ru_maxrss after importing numpy, zarr and the "
          "pipeline modules and opening the array; 'incr' = peak - base. tracemalloc numbers come from a "
          "second child with tracing on (numpy reports its buffers to tracemalloc), so they do not "
          "slow the timed run.")
    print(f"- Streaming reads {ROWS}-row float32 blocks via chunker; each block is upcast to float64 in "
          "StreamingMoments (partial_fit), centred, multiplied in float32, merged into a float64 (C, C) sum. "
          "np.corrcoef holds the float32 array plus a float64 copy.")
    print("\n".join(harness.machine_lines(load_start, t_start)))


if __name__ == "__main__":
    main()
