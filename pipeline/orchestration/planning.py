"""``python -m pipeline plan``: the work every stage will do, its time and memory, before doing it.

The estimate rests on two measurements taken on this machine at start-up — one compiled forward
batch at the extraction batch size, and one forward+backward batch at the maximization batch
size and image size (the cost of one activation-maximization step) — and on simple cost models
for the numpy stages (floating-point operations timed against a matrix product measured here).
Memory is the process's resident size after the warm-up plus what each stage adds (chunk
buffers, correlation matrices, CKA Gram matrices, embeddings). Figures are estimates: the plan
says so, and ``tests/benchmarks/bench_real_models.py`` compares them with measured runs.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.storage.catalog import Catalog

#: Calibration on the 2-core reference machine, fitted to the default runs of MobileNetV2 (160 px)
#: and ResNet50 (224 px) on 2000 images (tests/benchmarks/bench_real_models.py): seconds per
#: embedded point and method (t-SNE/UMAP), UMAP's one-off numba compilation, the act-max step's
#: overhead over a bare forward+backward (parameterisation, transforms, Adam), seconds per report
#: page, the pixel-decoding cost per megapixel, and the cluster stage's per-layer costs.
EMBED_SECONDS_PER_POINT = 3.2e-3
UMAP_COMPILE_SECONDS = 35.0
ACTMAX_OVERHEAD = 1.3
CLUSTER_FIT_SECONDS_PER_UNIT2 = 2.5e-7   # one linkage + silhouette curve, per squared live unit
CLUSTER_SECONDS_PER_IMAGE_LAYER = 3.5e-3  # per layer and image: moments, resamples, summaries, probes
REPORT_SECONDS_PER_PAGE = 0.2
DECODE_SECONDS_PER_MEGAPIXEL = 0.01
#: Measured peak resident size over the estimate built from the warm-up (1.65 on MobileNetV2,
#: 1.77 on ResNet50: t-SNE/UMAP, the act-max loop's saved activations and Adam state).
MEMORY_FACTOR = 1.7
EXPECTED_CLUSTERS = 4   # per layer, before the cluster stage has run (auto picks 2–12; few on random weights)


@dataclass
class StageEstimate:
    """One stage's line of the plan."""

    name: str
    work: str
    seconds: float
    memory: float = 0.0          # bytes, peak resident size while the stage runs
    cuts: list = field(default_factory=list)   # what to change to make it cheaper
    note: str = ""


@dataclass
class Plan:
    """The plan of a run: what each stage does, its estimated time and peak memory."""

    header: list
    stages: list
    budget_minutes: float

    @property
    def total_seconds(self):
        return sum(s.seconds for s in self.stages)

    @property
    def peak_memory(self):
        return max((s.memory for s in self.stages), default=0.0)

    def lines(self) -> list[str]:
        """The plan as printed: a header, one row per stage, the total and what to cut."""
        out = list(self.header)
        width = max([len(s.work) for s in self.stages] + [10])
        out.append(f"  {'stage':<9} {'work':<{width}}  {'time':>9}  {'memory':>8}")
        for s in self.stages:
            out.append(f"  {s.name:<9} {s.work:<{width}}  {duration(s.seconds):>9}  {gigabytes(s.memory):>8}"
                       + (f"  ({s.note})" if s.note else ""))
        out.append(f"  {'total':<9} {'':<{width}}  {duration(self.total_seconds):>9}  "
                   f"{gigabytes(self.peak_memory):>8} peak  (estimates)")
        if self.total_seconds > 60 * self.budget_minutes:
            out.append(f"  over the budget of {self.budget_minutes:g} min (budget_minutes); to cut:")
            for s in sorted(self.stages, key=lambda s: -s.seconds)[:3]:
                for cut in s.cuts[:2]:
                    out.append(f"    {s.name}: {cut}")
        return out


def duration(seconds) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def gigabytes(n) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**28 else f"{n / 2**20:.0f} MB"


# --------------------------------------------------------------------------- counting


def count_images(data_cfg):
    """``(number of images, number of classes)`` the run will use, without decoding any image."""
    from pipeline.inputs import images

    if data_cfg.npz:
        with images.open_npz(data_cfg.npz, data_cfg.max_pixels) as x:  # headers only: nothing decompressed
            n, classes = len(x), 0
    else:
        n = len(images.list_image_folder(data_cfg.images, data_cfg.follow_symlinks)[0])
        classes = len(images.list_classes(data_cfg.images))
    return (min(n, data_cfg.limit) if data_cfg.limit and n else n), classes


# --------------------------------------------------------------------------- measuring


def rss() -> float:
    """Resident memory of this process, in bytes (0 where it cannot be read)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def matmul_flops() -> float:
    """Floating-point operations per second of a float64 matrix product here (numpy's BLAS)."""
    a = np.random.default_rng(0).random((384, 384))
    a @ a
    t0 = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 384**3 / max(time.perf_counter() - t0, 1e-6)


@dataclass
class Warmup:
    """What the warm-up measured (seconds per image; bytes)."""

    forward: float
    actmax_step: float
    compile_forward: float
    compile_actmax: float
    memory_forward: float
    memory_actmax: float
    device: str
    precision: str = "float32"  # what the model computed in (compute.precision, if it applied)


def warm_up(model, names, kinds, size, channels, cfg, n_images=None) -> Warmup:
    """Time one compiled forward batch and one forward+backward batch (an act-max step) on ``model``."""
    import tensorflow as tf

    from pipeline.config import batch_or, parse_scale
    from pipeline.extraction.forward import make_forward
    from pipeline.backend.tf import gpus

    extract_bs = batch_or(cfg.extract.batch_size, 64)  # auto: timed at the default (the stage probes its own)
    bs = min(extract_bs, n_images or extract_bs)  # extract never pads beyond N
    forward = make_forward(model.build_extractor(names), kinds, cfg.extract.reduce, parse_scale(cfg.data.scale))
    pixels = np.random.default_rng(0).integers(0, 256, (bs, *size, channels), dtype=np.uint8)
    compile_fwd, t_fwd = _twice(lambda: forward(pixels))
    mem_fwd = rss()

    from pipeline.maximize.render import input_size

    h, w, c = input_size(model, cfg.maximize.size)
    mb = batch_or(cfg.maximize.batch_size, 32)
    deepest = model.build_extractor([names[-1]])
    a, b = parse_scale(cfg.data.scale)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs, _ = deepest(x * (255.0 * a) + b)
            total = tf.reduce_sum(tf.reduce_mean(tf.cast(outputs[0], tf.float32), axis=0))
        return tape.gradient(total, x)

    x = tf.constant(np.random.default_rng(1).random((mb, h, w, c), dtype=np.float32))
    compile_mx, t_step = _twice(lambda: step(x).numpy())
    devices = gpus()
    return Warmup(forward=t_fwd / bs, actmax_step=t_step / mb, compile_forward=compile_fwd,
                  compile_actmax=compile_mx, memory_forward=mem_fwd, memory_actmax=rss(),
                  device=", ".join(devices) if devices else "CPU",
                  precision=getattr(model, "precision", "float32"))


def _precision(warm) -> str:
    return "" if warm.precision == "float32" else f" in {warm.precision}"


def _twice(fn):
    """``(first call incl. compilation, steady-state time)``: the second of two timed calls."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    return first, time.perf_counter() - t0


# --------------------------------------------------------------------------- the plan


def make_plan(cfg, model, choice, warm, n_images, n_classes, stages, size, clusters_per_layer=None) -> Plan:
    """Estimate every stage in ``stages`` (names) for this config, model and measured warm-up.

    Parameters
    ----------
    cfg : Config
    model : KerasModel or GraphModel
    choice : list of (str, str)
        The analysed layers with their reasons (:func:`pipeline.inputs.autolayers.choose`).
    warm : Warmup
    n_images, n_classes : int
    stages : sequence of str
        The stages that will run (the others are left out of the plan).
    size : (int, int)
        Input height and width.
    clusters_per_layer : dict, optional
        Known cluster counts (from a finished cluster stage); otherwise an expected count.
    """
    shapes = {i.name: i.output_shape for i in model.layers}
    names = [n for n, _ in choice]
    units = {n: int(shapes[n][-1]) for n in names}
    est = {
        "extract": lambda: _extract(cfg, warm, n_images, names, units, size),
        "embed": lambda: _embed(cfg, n_images, names, units),
        "cluster": lambda: _cluster(cfg, n_images, names, units, matmul_flops()),
        "probe": lambda: _probe(cfg, n_images, warm),
        # One class image per model output, as the stage renders them (1000 for an ImageNet head on
        # 3 folders of images), not per class of the data.
        "maximize": lambda: _maximize(cfg, names, units, _outputs(model) or n_classes, warm, clusters_per_layer or {}),
        "report": lambda: _report(cfg, n_images, names, units),
    }
    total_units = sum(units.values())
    from pipeline.inputs.autolayers import summary_line

    header = [f"plan: {n_images} images, {len(names)} layers ({total_units:,} units), "
              f"warm-up on {warm.device}{_precision(warm)}: forward {warm.forward * 1e3:.1f} ms/image, "
              f"act-max step {warm.actmax_step * 1e3:.1f} ms/image",
              f"  layers: {summary_line(model.layers, choice, cfg.layers)}"]
    estimates = [est[s]() for s in stages if s in est]
    for e in estimates:
        e.memory *= MEMORY_FACTOR
    return Plan(header, estimates, cfg.budget_minutes)


def _extract(cfg, warm, n, names, units, size):
    ex = cfg.extract
    h, w = size
    decode = n * DECODE_SECONDS_PER_MEGAPIXEL * h * w / 1e6 / max(1, (os.cpu_count() or 1))
    seconds = warm.compile_forward + n * warm.forward + decode
    stored = sum(units.values()) * len(ex.reduce) * 4
    return StageEstimate("extract", f"{n} images x {len(names)} layers, batch {ex.batch_size}", seconds,
                         warm.memory_forward + 2 * ex.chunk_rows * stored,
                         ["data.limit: N (a seeded, class-stratified sample)", "layers: [fewer names]"])


def _embed(cfg, n, names, units):
    e = cfg.embed
    maps, points = 0, 0.0
    for name in names:
        for of in e.of:
            m = min(n, e.max_fit) if of == "images" else (units[name] if units[name] >= 5 else 0)
            if m:
                maps += len(e.methods)
                points += m * len(e.methods) + (n - m if of == "images" and n > m else 0) * 0.2
    seconds = points * EMBED_SECONDS_PER_POINT + (UMAP_COMPILE_SECONDS if "umap" in e.methods else 0)
    memory = 6e8 + min(n, e.max_fit) * max(e.pca, max(units.values(), default=1)) * 8 * 3
    return StageEstimate("embed", f"{len(names)} layers x {maps // max(len(names), 1)} maps "
                         f"({'/'.join(e.methods)} of {'/'.join(e.of)})", seconds, memory,
                         ["embed.methods: [tsne] (or [umap])", "embed.of: [images]"])


def _cluster(cfg, n, names, units, flops):
    c = cfg.cluster
    passes = 1 + c.bootstrap + 2  # correlation, bootstrap resamples, unit and cluster summaries
    live = [min(u, c.max_units) for u in units.values()]
    corr = sum(passes * 2 * n * u * u for u in live)
    probes = sum(5 * 100 * 2 * min(n, 5000) * u * 10 for u in live)   # 5-fold logistic regression
    m, b = min(n, c.cka_rows or n), c.cka_batch
    cka = 2 * m * b * sum(live) + len(live) ** 2 * m * 2 * b * 2
    fits = (1 + c.bootstrap) * sum(CLUSTER_FIT_SECONDS_PER_UNIT2 * u * u for u in live)
    seconds = (corr + probes + cka) / flops + fits + CLUSTER_SECONDS_PER_IMAGE_LAYER * n * len(names)
    widest = max(live, default=1)
    memory = 4e8 + 4 * 8 * widest**2 + len(live) * m * 2 * b * 4 + 4096 * widest * 4
    return StageEstimate("cluster", f"{len(names)} layers, up to {widest} units each, bootstrap {c.bootstrap}",
                         seconds, memory, ["cluster.bootstrap: 5", "layers: [fewer names]"])


def _probe(cfg, n, warm):
    p = cfg.probe
    m = min(n, p.max_images or n)
    seconds = (len(p.probes) + 1) * m * warm.forward * 1.2 + warm.compile_forward
    return StageEstimate("probe", f"{len(p.probes)} probes + originals x {m} images", seconds,
                         warm.memory_forward, ["probe.max_images: 500", "probe.probes: [grayscale, patch_shuffle]"])


def maximize_images(cfg, names, units, n_classes, clusters_per_layer):
    """How many act-max images the stage plans: ``(per layer dict, classes)``."""
    from pipeline.maximize import plan as mplan

    mx = cfg.maximize
    how = mplan.parse_units(mx.units)
    chosen = mplan.choose_layers(mx.layers, names, {n: "map" for n in names})
    per_layer = {}
    for name in chosen:
        u = units[name] if how[0] == "all" else (min(how[1], units[name]) if how[0] == "top"
                                                 else len([c for c in how[1] if c < units[name]]))
        k = clusters_per_layer.get(name, EXPECTED_CLUSTERS) if mx.clusters else 0
        per_layer[name] = u + k
    return per_layer, (n_classes if mx.classes else 0)


def _maximize(cfg, names, units, n_classes, warm, clusters_per_layer):
    mx = cfg.maximize
    per_layer, classes = maximize_images(cfg, names, units, n_classes, clusters_per_layer)
    images = sum(per_layer.values()) + classes
    groups = sum(1 for v in per_layer.values() if v) + (1 if classes else 0)
    full = (images * mx.steps * warm.actmax_step * ACTMAX_OVERHEAD
            + groups * warm.compile_actmax * ACTMAX_OVERHEAD)
    seconds, note = full, ""
    if mx.max_seconds and full > mx.max_seconds:
        seconds = mx.max_seconds + warm.compile_actmax
        share = max(0, min(images, int(images * mx.max_seconds / full)))
        note = f"budget maximize.max_seconds={mx.max_seconds:g}: about {share} of {images} images, rest on a rerun"
    return StageEstimate("maximize", f"{images} images ({len(per_layer)} layers, {classes} classes), "
                         f"{mx.steps} steps", seconds, warm.memory_actmax,
                         ["maximize.units: top:2 / maximize.layers: last", "maximize.max_seconds: 300",
                          "maximize.steps: 128"], note)


def _report(cfg, n, names, units):
    r = cfg.report
    pages = 3 + sum(2 + math.ceil(u / r.units_per_page) for u in units.values())
    seconds = pages * REPORT_SECONDS_PER_PAGE + n * 5e-4 * len(names)
    return StageEstimate("report", f"about {pages} pages", seconds, 5e8 + n * 48 * 48 * 3,
                         ["report.explorer: false"])


def _outputs(model) -> int:
    """The model's number of outputs (its last layer's width), or 0 when unknown."""
    try:
        shape = model.layers[-1].output_shape
        return int(shape[-1]) if shape else 0
    except (TypeError, IndexError):
        return 0


def plan_run(cfg, stages, clusters_per_layer=None) -> Plan:
    """Load the model, choose its layers, warm up and estimate ``stages`` (names) of ``cfg``."""
    from pipeline.inputs.autolayers import choose
    from pipeline.inputs.models import load_model
    from pipeline.extraction.plan import input_geometry, layer_kinds

    # in the stages' precision: on a CPU, mixed_float16 measured 1.5-2x slower than float32 (MobileNetV2)
    model = load_model(cfg.model, cfg.trust_model, cfg.compute.precision)
    size, channels = input_geometry(model, cfg.data)
    choice = choose(model, cfg.layers)
    names = [n for n, _ in choice]
    n_images, n_classes = count_images(cfg.data)
    n_classes = n_classes or _outputs(model)
    warm = warm_up(model, names, layer_kinds(model, names), size, channels, cfg, n_images)
    return make_plan(cfg, model, choice, warm, n_images, n_classes, stages, size, clusters_per_layer)


def known_clusters(store):
    """Clusters per layer of a finished cluster stage (the maximize estimate uses them), or None."""
    table = Catalog(store).read("cluster_summary")
    if table is None:
        return None
    return table.groupby("layer").size().to_dict() if "layer" in table else None


def print_plan(cfg, runner, only=None, from_stage=None, force=False):
    """Print the plan of the stages ``runner`` is about to run on stderr.

    The estimate is advice: a model it cannot time (an unusual SavedModel, an op without a
    gradient) still runs, with a one-line note instead of the table. User errors (a missing
    model or folder) are raised as they would be by the run itself.
    """
    import sys

    from pipeline.errors import UserError

    stages = [s.name for s in runner.plan(only, from_stage, force)]
    if not stages:
        return
    try:
        lines = plan_run(cfg, stages, known_clusters(runner.store)).lines()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (see docstring)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        lines = [f"plan: no estimate ({type(exc).__name__}: {first})"]
    for line in lines:
        print(line, file=sys.stderr, flush=True)
