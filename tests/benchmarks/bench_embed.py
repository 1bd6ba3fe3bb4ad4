"""Benchmark image t-SNE (``pipeline.analysis.embedding.tsne_2d``) against scikit-learn's TSNE on the same data.

Run from the repository root::

    python tests/benchmarks/bench_embed.py              # N = 50,000 (~9 min on 2 idle cores, ~19 min at load 5-8)
    python tests/benchmarks/bench_embed.py --quick      # smoke run (N = 6000, max_fit 3000), ~3 min
    python tests/benchmarks/bench_embed.py --data blobs # synthetic manifold clusters instead of images

What is measured, all in the same run on the same machine:

- Data (default ``--data shapes``): ``pipeline.demo.data.make_shapes(N, seed=0)`` (32x32 RGB,
  4 shapes with a colour shortcut) passed through a fixed random two-layer conv feature map
  (3x3 conv 3->32 stride 2, ReLU, 3x3 conv 32->256 stride 2, ReLU, spatial mean), i.e. pooled
  activations of an untrained CNN, N x 256 float32. ``--data blobs``: 10 clusters, each a 3-D
  latent manifold mapped into 256-D by a random ReLU layer, plus Gaussian noise.
- Features: ``prepare_features(x, pca=50, random_state=0)`` once; every method embeds the same
  (N, 50) float32 matrix. Its time is reported but not charged to any method.
- Methods: ours with the default ``max_fit=10000`` (a ``TSNEMap`` fitted on a seeded 10k sample,
  FFT gradients, n_jobs=1; the rest placed with its ``transform``, openTSNE's ``prepare_partial`` +
  ``optimize``, in chunks of 10k),
  run twice, just before and just after scikit-learn, to bracket load changes (the headline ratio
  uses the slower of the two); ours with ``max_fit=N`` (a full openTSNE fit of all points, run
  last); ``sklearn.manifold.TSNE(n_components=2, init="pca", random_state=0, n_jobs=2)``
  (Barnes-Hut, learning_rate="auto", max_iter=1000: its defaults).
- Scores: ``trustworthiness_sampled(feats, xy, sample=2000, random_state=0)`` (the same 2000 rows
  for every method, 10 neighbours) and, for context, ``knn_accuracy(xy, labels)``.
- Wall seconds, process CPU seconds (all threads), CPU/wall (below 1 for our single-threaded
  runs means other jobs took the core) and peak RSS during each method (VmHWM reset before each;
  Linux only). Our fit and placement seconds come from ``tsne_2d``'s ``profile`` hook.

The machine is shared, so absolute seconds move with its load; the ratios are from one run.
"""
from __future__ import annotations

import argparse
import os
import time

import harness  # first: puts the repository on sys.path
import numpy as np

from harness import log, ok
from pipeline.analysis import embedding


# --------------------------------------------------------------------------- data


def _conv_relu(x, w, b, stride):
    """'same'-padded 3x3 conv with ``stride`` + ReLU, by im2col (x: (n, h, w, c) float32)."""
    from numpy.lib.stride_tricks import sliding_window_view

    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    win = sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::stride, ::stride]  # (n, h', w', c, 3, 3)
    n, h, wd = win.shape[:3]
    cols = np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(n * h * wd, -1)
    return np.maximum(cols @ w + b, 0).reshape(n, h, wd, -1)


def shapes_features(n, seed=0, block=2000):
    """Pooled activations of a fixed random 2-layer CNN over ``make_shapes(n, seed)``: (n, 256), labels."""
    from pipeline.demo.data import make_shapes

    images, labels = make_shapes(n, seed)[:2]
    rng = np.random.default_rng(1234)
    w1 = rng.normal(0, np.sqrt(2 / 27), (27, 32)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w2 = rng.normal(0, np.sqrt(2 / 288), (288, 256)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 256).astype(np.float32)
    out = np.empty((n, 256), dtype=np.float32)
    for i in range(0, n, block):
        x = images[i:i + block].astype(np.float32) / 127.5 - 1.0
        h = _conv_relu(_conv_relu(x, w1, b1, 2), w2, b2, 2)            # (b, 8, 8, 256)
        out[i:i + block] = h.mean(axis=(1, 2))
    return out, np.asarray(labels)


def blob_features(n, seed=0, dim=256, clusters=10, latent=3, noise=0.3):
    """10 clusters, each a curved 3-D manifold in 256-D (random ReLU layer) plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    w = rng.normal(0, 1, (clusters, latent, dim)).astype(np.float32)
    centre = rng.normal(0, 2.0, (clusters, dim)).astype(np.float32)
    z = rng.normal(0, 1, (n, latent)).astype(np.float32)
    x = np.maximum(np.einsum("nl,nld->nd", z, w[labels]) + centre[labels], 0)
    x += rng.normal(0, noise, x.shape).astype(np.float32)
    return x.astype(np.float32), labels


# --------------------------------------------------------------------------- measurement


class Phases:
    """Wall seconds of the openTSNE fit and of each placed chunk, from ``tsne_2d``'s public ``profile`` hook."""

    def __init__(self):
        self.fit = self.place = 0.0
        self.n_place = 0

    def __call__(self, phase, n_points, seconds):
        if phase == "fit":
            self.fit += seconds
        else:
            self.place += seconds
            self.n_place += 1


def measure(name, fn):
    """Run ``fn()``; return a dict with xy, wall/CPU seconds, peak RSS, load around it."""
    log(f"  {name} ...")
    harness.reset_peak_rss()
    rss0 = harness.status_kb("VmRSS")
    load0 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    xy, extra = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = harness.status_kb("VmHWM")
    res = {"name": name, "xy": np.asarray(xy, dtype=np.float32), "wall": wall, "cpu": cpu,
           "rss_inc_mb": (peak - rss0) / 1024 if peak and rss0 else float("nan"),
           "load": (load0, os.getloadavg()[0]), **extra}
    log(f"    {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS +{res['rss_inc_mb']:.0f} MB, "
        f"load {res['load'][0]:.1f} -> {res['load'][1]:.1f}")
    return res


def run_ours(feats, max_fit):
    def fn():
        phases = Phases()
        xy = embedding.tsne_2d(feats, random_state=0, max_fit=max_fit, profile=phases)
        return xy, {"fit_s": phases.fit, "place_s": phases.place, "n_place": phases.n_place}
    return fn


def run_sklearn(feats, n_jobs):
    def fn():
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, init="pca", random_state=0, n_jobs=n_jobs)
        xy = tsne.fit_transform(feats)
        return xy, {"n_iter": int(tsne.n_iter_), "kl": float(tsne.kl_divergence_)}
    return fn


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="number of points (default 50000)")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=6000, max_fit=3000")
    ap.add_argument("--data", choices=("shapes", "blobs"), default="shapes")
    ap.add_argument("--max-fit", type=int, default=10_000, help="our subsample size (default 10000, the library default)")
    ap.add_argument("--sklearn-jobs", type=int, default=2, help="n_jobs for sklearn's TSNE (default 2)")
    args = ap.parse_args()
    n, max_fit = (6000, 3000) if args.quick else (args.n, args.max_fit)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    import openTSNE
    import sklearn

    log(f"bench_embed: N={n}, data={args.data}, max_fit={max_fit}, sklearn {sklearn.__version__}, "
        f"openTSNE {openTSNE.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"load {load_start[0]:.1f}")

    t0 = time.perf_counter()
    x, labels = (shapes_features if args.data == "shapes" else blob_features)(n, seed=0)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = embedding.prepare_features(x, pca=50, random_state=0)
    t_prep = time.perf_counter() - t0
    log(f"data {x.shape} in {t_data:.1f} s; prepare_features -> {feats.shape} in {t_prep:.1f} s")

    runs = {}
    runs["ours"] = measure(f"ours, max_fit={max_fit} (run 1)", run_ours(feats, max_fit))
    runs["sk"] = measure(f"sklearn TSNE (Barnes-Hut, n_jobs={args.sklearn_jobs})",
                         run_sklearn(feats, args.sklearn_jobs))
    runs["ours2"] = measure(f"ours, max_fit={max_fit} (run 2)", run_ours(feats, max_fit))
    runs["full"] = measure(f"ours, max_fit=N={n} (full fit)", run_ours(feats, n))
    same = np.array_equal(runs["ours"]["xy"], runs["ours2"]["xy"])

    log("scoring (trustworthiness on the same 2000-row sample, 10 neighbours; kNN accuracy) ...")
    for r in runs.values():
        r["trust"] = embedding.trustworthiness_sampled(feats, r["xy"], sample=2000, random_state=0)
        r["knn"] = embedding.knn_accuracy(r["xy"], labels, random_state=0)

    # conservative: the slower of the two runs that bracket sklearn's
    worst = max(runs["ours"]["wall"], runs["ours2"]["wall"])
    sk, full = runs["sk"], runs["full"]
    ratio, ratio_full = sk["wall"] / worst, sk["wall"] / full["wall"]
    cpu_ours = max(runs["ours"]["cpu"], runs["ours2"]["cpu"])
    d_ours, d_full = runs["ours"]["trust"] - sk["trust"], full["trust"] - sk["trust"]

    print()
    print(f"{'method':<44} {'wall s':>7} {'CPU s':>7} {'CPU/wall':>8} {'load':>9} {'RSS+ MB':>8} "
          f"{'trust':>7} {'kNN acc':>8}")
    for key, label in (("ours", f"ours max_fit={max_fit} (run 1)"), ("ours2", f"ours max_fit={max_fit} (run 2)"),
                       ("full", f"ours max_fit=N (full fit, N={n})"),
                       ("sk", f"sklearn TSNE BH n_jobs={args.sklearn_jobs} ({sk['n_iter']} it)")):
        r = runs[key]
        load = f"{r['load'][0]:.1f}-{r['load'][1]:.1f}"
        print(f"{label:<44} {r['wall']:>7.1f} {r['cpu']:>7.1f} {r['cpu'] / r['wall']:>8.2f} {load:>9} {r['rss_inc_mb']:>8.0f} "
              f"{r['trust']:>7.4f} {r['knn']:>8.3f}")
    print()
    rows = [
        (f"speed sklearn / ours (max_fit={max_fit}, slower of 2)", f"{ratio:.2f}x", ">=1.5x", ok(ratio >= 1.5)),
        ("speed sklearn / ours (full fit)", f"{ratio_full:.2f}x", ">=1.5x", ok(ratio_full >= 1.5)),
        (f"CPU sklearn / ours (max_fit={max_fit}, larger of 2)", f"{sk['cpu'] / cpu_ours:.2f}x", "-", "-"),
        ("CPU sklearn / ours (full fit)", f"{sk['cpu'] / full['cpu']:.2f}x", "-", "-"),
        (f"trust ours (max_fit={max_fit}) - sklearn", f"{runs['ours']['trust']:.4f} - {sk['trust']:.4f} = {d_ours:+.4f}",
         ">=-0.01", ok(d_ours >= -0.01)),
        ("trust ours (full fit) - sklearn", f"{full['trust']:.4f} - {sk['trust']:.4f} = {d_full:+.4f}",
         ">=-0.01", ok(d_full >= -0.01)),
        ("ours run 1 == run 2 (bit-identical)", str(same), "True", ok(same)),
    ]
    harness.print_checks(rows, widths=(48, 32, 8))
    print()
    for key in ("ours", "ours2", "full"):
        r = runs[key]
        print(f"- {r['name']}: openTSNE fit {r['fit_s']:.1f} s, placement {r['place_s']:.1f} s "
              f"({r['n_place']} chunks), other {r['wall'] - r['fit_s'] - r['place_s']:.1f} s.")
    print(f"- Data: {args.data} ({'make_shapes + random 2-layer conv, spatial mean' if args.data == 'shapes' else '10 manifold clusters'}), "
          f"{x.shape[0]} x {x.shape[1]} -> PCA {feats.shape[1]}; generation {t_data:.0f} s, "
          f"prepare_features {t_prep:.1f} s (not charged to any method).")
    print("- ours is single-threaded by design (n_jobs=1, 750 iterations: 250 exaggerated + 500); "
          f"sklearn used n_jobs={args.sklearn_jobs} and its OpenMP gradient threads "
          f"({sk['n_iter']} iterations). Trust target: ours no more than 0.01 below sklearn.")
    print("\n".join(harness.machine_lines(load_start, t_start)))


if __name__ == "__main__":
    main()
