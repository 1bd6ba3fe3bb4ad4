"""Benchmark the whole default pipeline on real architectures: time per stage, peak memory, the plan's estimate.

Run from the repository root::

    python tests/benchmarks/bench_real_models.py                    # MobileNetV2 + ResNet50, N = 2000 (about 1 h on 2 cores)
    python tests/benchmarks/bench_real_models.py --quick --models mobilenetv2   # check of the script (~15 min)
    python tests/benchmarks/bench_real_models.py --models resnet50 --keep /tmp/bench --markdown bench.md

What is measured. For each model, ``python -m pipeline run cfg.yaml`` runs in a child process
with the *default* configuration: the config holds only ``name``, ``out``, ``model``,
``data.images`` and ``report.out`` (no ``layers`` key: ``layers: auto``; every other setting is
the default, including the maximize time budget). Models are ``keras.applications`` with random
weights (nothing is downloaded), built and saved as ``.keras`` in a separate short child:

- MobileNetV2, ``input_shape=(160, 160, 3), classes=10``;
- ResNet50, ``input_shape=(224, 224, 3), classes=10``.

Images: N JPEGs (default 2000) in 10 class folders, generated with ``numpy.random.default_rng(0)``
at the largest input size of the selected models. Each class has planted structure the model can
pick up even with random weights: a class colour (hue of an elliptical blob and a tint of the whole
image), a class texture (stripes at a class orientation and frequency inside the blob) and a class
blob size, with per-image jitter of hue, position, phase and a noisy background.

Reported per model:

- per stage (from the run directory's ``manifest.json``: ``stages.<name>.seconds``, ``status``
  and ``summary``): seconds, share of the total wall time and the plan's estimate. The estimate is
  parsed from the plan the run prints on stderr before it starts (rows ``"  <stage> <work> <time>
  <memory>"``); "n/a" where it cannot be parsed. A row "start-up and plan" holds the wall time
  outside the stages (interpreter, TensorFlow import, model load, the plan's warm-up), so the
  shares add up to 100 %;
- total wall time of the child and its CPU time (user + system, from ``os.wait4``);
- peak RSS: the larger of the child's own ``ru_maxrss`` (``os.wait4``, exact) and the largest
  sum of VmRSS over the child and its descendants, sampled every 0.5 s from ``/proc``
  (so processes the run may start are counted too);
- ``python -m pipeline status RUN_DIR`` (it says ``partial (k of n rendered)`` when the maximize
  time budget ran out).

Targets (PASS/FAIL lines): whole default pipeline including the report <= 20 min for MobileNetV2
and <= 40 min for ResNet50; peak RSS <= 6 GB; no stage above half of the total wall time; every
stage done. With ``--quick`` (N = 200, 96 px inputs for both models) the same lines are printed,
but the targets are meant for the full run. The quick run still takes about 15 min on 2 shared
cores: the maximize stage's default time budget (480 s) does not shrink with N.

``--markdown PATH`` writes the same results as markdown (for the README). ``--keep DIR`` keeps
images, models, run directories and reports under DIR (otherwise a ``tempfile.mkdtemp()`` is
removed at the end). Linux only (``/proc``, ``os.wait4``).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import harness  # first: the repository and tests/ on sys.path
from harness import ChildResult, log, run_measured

import zoo

STAGES = ("extract", "embed", "cluster", "probe", "maximize", "report")
CLASSES = 10
MODELS = {  # name: (keras.applications attribute, input size, time target in minutes)
    "mobilenetv2": ("MobileNetV2", 160, 20),
    "resnet50": ("ResNet50", 224, 40),
}
QUICK_N, QUICK_SIZE, FULL_N = 200, 96, 2000
RSS_TARGET_GB = 6.0
MAX_STAGE_SHARE = 0.5
KEEP_MARKER = ".bench_real_models"


# --------------------------------------------------------------------------- data and models


def class_style(c):
    """The planted features of class ``c``: hue, stripe angle (radians), stripe period (px at 224), blob radius."""
    import math

    return {"hue": c / CLASSES, "angle": math.pi * ((c * 3) % CLASSES) / CLASSES,
            "period": (6.0, 11.0, 18.0)[c % 3], "radius": (0.22, 0.30, 0.38)[(c // 3) % 3]}


def make_image(rng, c, size):
    """One uint8 (size, size, 3) image of class ``c``: noisy tinted background, a textured class-coloured blob."""
    import numpy as np

    st = class_style(c)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hue = (st["hue"] + rng.normal(0, 0.02)) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9), np.float32) * 255
    tint = np.array(colorsys.hsv_to_rgb(hue, 0.25, 0.5), np.float32) * 255
    img = np.empty((size, size, 3), np.float32)
    img[:] = tint * rng.uniform(0.7, 1.1)
    img += rng.normal(0, 28, (size, size, 3))                                  # background noise
    cy, cx = rng.uniform(0.3, 0.7, 2)
    r = st["radius"] * rng.uniform(0.85, 1.15)
    ry, rx = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    angle = st["angle"] + rng.normal(0, 0.08)
    period = st["period"] / 224 * rng.uniform(0.9, 1.1)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    texture = rgb[None, None, :] * (0.45 + 0.55 * stripes[..., None])
    img[blob] = texture[blob] + rng.normal(0, 12, (int(blob.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder, n, size, seed=0):
    """``n`` JPEGs in ``CLASSES`` class folders (``n // CLASSES`` each, the remainder to the first ones)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for i in range(n):
        c = i % CLASSES
        sub = folder / f"class_{c:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_image(rng, c, size)).save(sub / f"img_{i:05d}.jpg", quality=90)
    return folder


def build_model_child(arch, size, path):
    """In a fresh interpreter: build ``keras.applications.<arch>`` with random weights and save it."""
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None, classes=CLASSES)
    model.save(path)
    print(json.dumps({"params": int(model.count_params()), "layers": len(model.layers)}))


def build_model(arch, size, path):
    """Build and save a model in a short child process (this process never imports TensorFlow)."""
    return harness.run_child([sys.executable, __file__, "--build-model", arch, size, path],
                             f"building {arch}").json()


def write_config(folder, name, model_path, images):
    """The default run's config: name, out, model, data.images and report.out only; ``(path, dict)``."""
    import yaml

    path = zoo.write_config(folder, model_path, images, file="cfg.yaml", report_out="report", name=name)
    return path, yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- measuring a child


def pipeline_status(run_dir):
    """Output of ``python -m pipeline status RUN_DIR`` (stdout, or the error on stderr)."""
    out = run_measured([sys.executable, "-m", "pipeline", "status", run_dir])
    text = out.stdout.strip() or "\n".join(out.stderr).strip()
    return text.splitlines() or [f"(no output, exit code {out.returncode})"]


# --------------------------------------------------------------------------- the plan and the manifest


_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}
_BYTES = {"MB": 2**20, "GB": 2**30}
_PLAN_ROW = re.compile(r"^  (?P<stage>[a-z_]+)\s.*?(?P<num>\d+(?:\.\d+)?) (?P<unit>s|min|h)\s{2,}"
                       r"(?P<mem>\d+(?:\.\d+)?) (?P<munit>MB|GB)\b")


def parse_plan(stderr_lines):
    """``{stage: (seconds, bytes)}`` from the plan printed before the run (and ``"total"``: the peak memory).

    Stages the plan lacks are absent.
    Robust by design: only the first row per stage name (and the first ``total`` row) counts, and
    a line that does not look like ``"  <stage> <work> <time> <memory>"`` is ignored.
    """
    est = {}
    for line in stderr_lines:
        if not line.startswith("  "):
            if est and ":" in line and line.split(":")[0] in STAGES:   # the stages have started
                break
            continue
        m = _PLAN_ROW.match(line)
        if m and m["stage"] in (*STAGES, "total") and m["stage"] not in est:
            est[m["stage"]] = (float(m["num"]) * _UNITS[m["unit"]], float(m["mem"]) * _BYTES[m["munit"]])
    return est


def read_manifest(run_dir):
    path = Path(run_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def short_summary(summary, width=90):
    """A one-line rendering of a stage's manifest summary: scalars, and counts of a dict of labels (truncated)."""
    if not isinstance(summary, dict):
        return ""
    parts = []
    for k, v in summary.items():
        if any(w in k for w in ("fingerprint", "hash", "path", "index")):
            continue
        if isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        elif isinstance(v, (int, bool)) or (isinstance(v, str) and len(v) <= 30):
            parts.append(f"{k}={v}")
        elif isinstance(v, dict) and v and all(isinstance(x, str) for x in v.values()):
            counts = {x: list(v.values()).count(x) for x in dict.fromkeys(v.values())}
            parts.append(f"{k}: " + " ".join(f"{x} x{c}" for x, c in counts.items()))
    text = ", ".join(parts)
    return text if len(text) <= width else text[:width - 1] + "…"


# --------------------------------------------------------------------------- one model


@dataclass
class ModelResult:
    name: str
    arch: str
    size: int
    target_min: float
    info: dict
    child: ChildResult
    manifest: dict
    plan: dict
    status: list
    run_dir: Path

    def stage_rows(self):
        """``(stage, seconds or None, status, plan seconds or None, summary)`` for every stage."""
        stages = self.manifest.get("stages", {})
        rows = []
        for s in STAGES:
            rec = stages.get(s, {})
            rows.append((s, rec.get("seconds"), rec.get("status", "missing"), self.plan.get(s, (None,))[0],
                         short_summary(rec.get("summary")) or (rec.get("error") or "")[:70]))
        return rows

    @property
    def stage_total(self):
        return sum(r[1] or 0.0 for r in self.stage_rows())

    def checks(self):
        """``(what, measured, target, passed)`` rows."""
        rows = self.stage_rows()
        wall = self.child.wall
        worst = max(rows, key=lambda r: r[1] or 0.0)
        share = (worst[1] or 0.0) / wall if wall else 0.0
        done = sum(r[2] == "done" for r in rows)
        return [
            (f"{self.arch}: whole default pipeline incl. report", fmt_duration(wall),
             f"<= {self.target_min:g} min", self.child.returncode == 0 and wall <= 60 * self.target_min),
            (f"{self.arch}: peak RSS", f"{self.child.peak_gb:.2f} GB", f"<= {RSS_TARGET_GB:g} GB",
             self.child.peak_gb <= RSS_TARGET_GB),
            (f"{self.arch}: largest stage share ({worst[0]})", f"{share:.0%}", f"<= {MAX_STAGE_SHARE:.0%}",
             worst[1] is not None and share <= MAX_STAGE_SHARE),   # no stage timed: nothing to pass
            (f"{self.arch}: every stage done (exit code {self.child.returncode})", f"{done} of {len(STAGES)}",
             f"{len(STAGES)} of {len(STAGES)}", done == len(STAGES) and self.child.returncode == 0),
        ]


def prepare_dir(folder):
    """Empty the run and report folders of a model (only those this script writes)."""
    for sub in ("run", "report"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def bench_model(name, work, images, size, echo):
    """Build the model, run the default pipeline on it in a measured child, collect everything."""
    arch, full_size, target = MODELS[name]
    folder = work / name
    prepare_dir(folder)
    model_path = folder / "model.keras"
    log(f"[{name}] building keras.applications.{arch}(input_shape=({size}, {size}, 3), weights=None, "
        f"classes={CLASSES}) ...")
    info = build_model(arch, size, model_path)
    cfg_path, cfg = write_config(folder, name, model_path, images)
    argv = [sys.executable, "-m", "pipeline", "run", str(cfg_path)]
    log(f"[{name}] {info['params']:,} parameters, {info['layers']} layers; running: "
        f"{' '.join(argv[1:])}  (config: {json.dumps(cfg)})")
    child = run_measured(argv, echo=echo)
    log(f"[{name}] exit code {child.returncode} after {fmt_duration(child.wall)}")
    return ModelResult(name, arch, size, target, info, child, read_manifest(cfg["out"]),
                       parse_plan(child.stderr), pipeline_status(cfg["out"]), Path(cfg["out"]))


# --------------------------------------------------------------------------- rendering


def fmt_duration(seconds):
    if seconds is None:
        return "n/a"
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def fmt_seconds(seconds):
    return "n/a" if seconds is None else f"{seconds:.1f}"


def table_rows(res):
    """The per-stage table of one model as strings: header + rows (stages, start-up, total)."""
    wall = res.child.wall
    head = ("stage", "seconds", "share of total", "plan estimate s", "status", "summary")
    body = []
    for stage, sec, status, est, summary in res.stage_rows():
        share = f"{sec / wall:.0%}" if sec is not None and wall else "n/a"
        body.append((stage, fmt_seconds(sec), share, fmt_seconds(est), status, summary))
    outside = wall - res.stage_total
    body.append(("start-up and plan", fmt_seconds(outside), f"{outside / wall:.0%}" if wall else "n/a",
                 "n/a", "", "interpreter, imports, model load, plan warm-up"))
    plan_sec, plan_mem = res.plan.get("total", (None, None))
    plan_peak = f" (plan: {plan_mem / 2**30:.1f} GB)" if plan_mem is not None else " (plan: n/a)"
    body.append(("total (wall)", fmt_seconds(wall), "100%", fmt_seconds(plan_sec), "",
                 f"CPU {res.child.cpu:.0f} s; peak RSS {res.child.peak_gb:.2f} GB{plan_peak}"))
    return head, body


def render_text(res):
    head, body = table_rows(res)
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    lines = [f"{res.arch} ({res.size}x{res.size}x3, {res.info['params']:,} parameters, random weights)"]
    for r in (head, *body):
        lines.append("  " + "  ".join(f"{v:<{w}}" if i in (0, 4, 5) else f"{v:>{w}}"
                                      for i, (v, w) in enumerate(zip(r, widths))).rstrip())
    lines.append(f"  wall {fmt_duration(res.child.wall)}, CPU {res.child.cpu:.0f} s, peak RSS "
                 f"{res.child.peak_gb:.2f} GB (own ru_maxrss {res.child.maxrss_kb / 2**20:.2f} GB, sampled tree "
                 f"{res.child.tree_peak_kb / 2**20:.2f} GB over at most {res.child.max_procs} process(es))")
    if not res.plan:
        lines.append("  plan estimate: n/a (no plan rows found on stderr)")
    lines.append(f"  $ python -m pipeline status {res.run_dir}")
    lines += [f"    {s}" for s in res.status]
    if res.child.returncode:
        lines.append(f"  the run failed (exit code {res.child.returncode}); last lines of its stderr:")
        lines += [f"    {s}" for s in res.child.stderr[-15:]]
    return lines


def render_markdown(res):
    head, body = table_rows(res)
    lines = [f"#### {res.arch} ({res.size}x{res.size}x3, {res.info['params']:,} parameters, random weights)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---", "---:", "---:", "---:", "---", "---"]) + "|"]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in body]
    lines += ["", f"Wall {fmt_duration(res.child.wall)}, CPU {res.child.cpu:.0f} s, peak RSS "
              f"{res.child.peak_gb:.2f} GB.", "", "`python -m pipeline status`:", "", "```", *res.status, "```"]
    if res.child.returncode:
        lines += ["", f"The run failed (exit code {res.child.returncode}):", "", "```", *res.child.stderr[-15:], "```"]
    return lines


def check_lines(results, markdown=False):
    rows = [c for r in results for c in r.checks()]
    if markdown:
        out = ["| check | measured | target | result |", "|---|---:|---:|---|"]
        return out + [f"| {w} | {m} | {t} | {'PASS' if ok else 'FAIL'} |" for w, m, t, ok in rows]
    width = max(len(w) for w, *_ in rows)
    return [f"{'PASS' if ok else 'FAIL'}  {w:<{width}}  {m:>10}  (target {t})" for w, m, t, ok in rows]


def environment_line(n, size_note):
    versions = []
    for pkg in ("tensorflow", "keras", "numpy"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    load = os.getloadavg()[0]
    return (f"N = {n} JPEGs in {CLASSES} class folders ({size_note}); {os.cpu_count()} CPUs, load {load:.1f}; "
            f"Python {platform.python_version()}, {', '.join(versions)}")


# --------------------------------------------------------------------------- main


def work_dir(keep):
    """The folder for images, models and runs: ``--keep DIR`` (created, or reused if this script made it)."""
    if not keep:
        return Path(tempfile.mkdtemp(prefix="bench_real_models_")), True
    folder = Path(keep).resolve()
    if folder.exists() and any(folder.iterdir()) and not (folder / KEEP_MARKER).exists():
        sys.exit(f"--keep {folder}: exists and was not made by this script; choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEEP_MARKER).write_text("made by tests/benchmarks/bench_real_models.py\n")
    return folder, False


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mobilenetv2,resnet50",
                    help=f"comma-separated, from {', '.join(MODELS)} (default: both)")
    ap.add_argument("--n", type=int, default=None, help=f"number of images (default {FULL_N}; --quick: {QUICK_N})")
    ap.add_argument("--quick", action="store_true",
                    help=f"check of the script: N={QUICK_N}, {QUICK_SIZE} px inputs for every model")
    ap.add_argument("--keep", metavar="DIR", help="keep images, models, run directories and reports under DIR")
    ap.add_argument("--markdown", metavar="PATH", help="also write the results as markdown to PATH")
    ap.add_argument("--no-echo", action="store_true", help="do not stream the runs' stderr")
    ap.add_argument("--build-model", nargs=3, metavar=("ARCH", "SIZE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.n is None:
        args.n = QUICK_N if args.quick else FULL_N
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.build_model:
        arch, size, path = args.build_model
        return build_model_child(arch, int(size), path)

    sizes = {m: QUICK_SIZE if args.quick else MODELS[m][1] for m in args.models}
    img_size = max(sizes.values())
    work, remove = work_dir(args.keep)
    t_start = time.perf_counter()
    try:
        log(f"bench_real_models: models {', '.join(args.models)}, N={args.n}, images {img_size} px, "
            f"work dir {work}{' (quick)' if args.quick else ''}")
        images = work / "images"
        shutil.rmtree(images, ignore_errors=True)
        t0 = time.perf_counter()
        write_images(images, args.n, img_size, seed=0)
        log(f"wrote {args.n} JPEGs ({img_size} px) in {time.perf_counter() - t0:.1f} s")
        results = [bench_model(m, work, images, sizes[m], echo=not args.no_echo) for m in args.models]
    finally:
        if remove:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")

    size_note = f"{img_size} px; inputs " + ", ".join(f"{MODELS[m][0]} {sizes[m]} px" for m in args.models)
    env = environment_line(args.n, size_note)
    quick_note = ("Quick run: the targets are for N = 2000 at the full input sizes" if args.quick else "")
    text = ["", env] + ([quick_note] if quick_note else [])
    for res in results:
        text += [""] + render_text(res)
    text += [""] + check_lines(results)
    text.append(f"benchmark time {fmt_duration(time.perf_counter() - t_start)}")
    log("\n".join(text))

    if args.markdown:
        md = [f"{env}." + (f" {quick_note}." if quick_note else ""), ""]
        for res in results:
            md += render_markdown(res) + [""]
        md += check_lines(results, markdown=True) + [""]
        Path(args.markdown).write_text("\n".join(md))
        log(f"markdown written to {args.markdown}")
    return 0 if all(ok for r in results for *_, ok in r.checks()) else 1


if __name__ == "__main__":
    sys.exit(main())
