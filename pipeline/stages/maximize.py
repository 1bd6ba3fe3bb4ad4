"""Maximize stage, runner side: activation-maximization images for units, clusters and classes.

For each chosen layer, every chosen unit (``maximize.units``: ``all``, ``top:K`` or a list)
and every cluster centroid of ``cluster_summary.parquet`` becomes a direction in the layer's
channel space; batches of them are optimised together in one compiled graph per layer
(:mod:`pipeline.maximize.render`). Class logits get one more graph. Each image is stored as
``maximize/<layer>/unit_0007.png`` (``cluster_002.png``; classes ``maximize/logits/class_001.png``)
and described by one row of ``maximize/index.parquet``:

kind, layer, channel, cluster, class, class_name, seed, activation, dataset_max, score, z_score,
score_valid, dataset_mean, dataset_std, reduction, probability, path, params_hash

``activation`` is what the final PNG (un-transformed) reaches: the channel mean for units (the
extract stage's ``mean``), the projection on the cluster direction (``centroid / std``: the
cluster stage's centroids live in z-scored space), or the class logit. ``score`` = activation /
dataset max (NaN with ``score_valid`` False where the dataset max is ≤ ~0); ``z_score`` =
(activation − dataset mean) / dataset std. ``probability`` (class images only) is the model's
softmax probability of the class on the image. ``class_name`` is set only when output ``k`` is
class ``k`` (the class codes are the user's own labels and there are as many outputs as declared
classes: :meth:`pipeline.shortcuts.verdicts.Classes.mismatch`); otherwise it is empty and the image is output ``k``.

Class images maximise the class's log-probability rather than its bare logit: on the demo model
raising the 'triangle' logit raises the 'cross' logit faster, so a logit-only image is classified
as a cross. They use padding and jitter only: scale/rotation robustness cost the demo's 'square'
image most of its probability. ``maximize.transforms`` applies to unit and cluster images.

Resuming: each finished batch is added to ``maximize/<layer>.part.parquet``; a rerun with the
same render parameters (model, scale, seed, steps, size, learning rate, parameterisation,
transforms, code) renders only the images that are missing. Dataset statistics and scores are
recomputed from ``activations.zarr`` every time, so a new extract rescores without re-rendering.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pandas as pd

from pipeline.codeversion import code_version
from pipeline.config import compute_params, hash_json, parse_scale
from pipeline.errors import first_line
from pipeline.stages.base import Outputs, Stage
from pipeline.storage.arrays import open_activations, stored_array
from pipeline.storage.catalog import path as artifact_path
from pipeline.storage.hashing import file_hash

CLUSTERS = artifact_path("cluster_summary")
COLUMNS = ["kind", "layer", "channel", "cluster", "class", "class_name", "seed", "activation", "dataset_max",
           "score", "z_score", "score_valid", "dataset_mean", "dataset_std", "reduction", "probability", "path",
           "params_hash"]
_INT_COLUMNS = ("channel", "cluster", "class")



def _params(cfg):
    return {"maximize": cfg.maximize.model_dump(mode="json"), "seed": cfg.seed, "scale": cfg.data.scale,
            "cluster_reduction": cfg.cluster.reduction, **compute_params(cfg)}


def _render_hash(cfg):
    """What the pixels of an image depend on: a part file row is reused only if this matches."""
    mx = cfg.maximize
    code = code_version("pipeline.maximize.render")  # the renderer and all it imports shape the pixels
    key = {"model": file_hash(cfg.model), "scale": cfg.data.scale, "seed": cfg.seed,
           "render": mx.model_dump(mode="json", include={"steps", "size", "learning_rate", "param",
                                                         "decorrelate", "transforms", "relu_redirect"}),
           "classes": "logprob+jitter",
           "code": code}
    return hash_json({**key, **compute_params(cfg)})  # with auto, the XLA choice is kept in the part files


class _Group:
    """Images sharing one compiled graph: a layer's units and clusters, or the class logits."""

    def __init__(self, name, objective_layer, targets, stats, reduction):
        self.name, self.objective_layer, self.targets = name, objective_layer, targets
        self.stats, self.reduction = stats, reduction  # stats: one entry per target

    @property
    def part(self):
        return artifact_path("maximize_images", f"{self.name}.part.parquet")


def run(ctx):
    cfg, store = ctx.cfg, ctx.store
    root, order, infos = open_activations(store)
    groups = _plan(ctx, root, order, infos)
    params_hash = _render_hash(cfg)
    done, todo = _resume(store, groups, params_hash)
    rendered, missing, batching = _render_all(ctx, groups, todo, done, params_hash)
    index = _index(groups, done, params_hash)
    return Outputs({"maximize": index}, {**_summary(ctx, index, rendered, missing), "compute": batching})


# -- planning --


def _plan(ctx, root, order, infos):
    from pipeline.maximize import plan

    mx = ctx.cfg.maximize
    plan.parse_units(mx.units)
    kinds = {n: infos[n]["kind"] for n in order}
    clusters = _read_clusters(ctx) if mx.clusters else None
    groups = []
    for layer in plan.choose_layers(mx.layers, order, kinds):
        groups.append(_layer_group(ctx, root, infos[layer], layer, clusters))
    if mx.classes and "logits" in root:
        groups.append(_class_group(ctx, root))
    return [g for g in groups if g.targets]


def _layer_group(ctx, root, info, layer, clusters):
    from pipeline.maximize import plan, quality

    mx, seed = ctx.cfg.maximize, ctx.cfg.seed
    array, reduction = stored_array(root, info, "mean")
    if array is None:
        ctx.log(f"maximize: {layer}: no stored activations to score against; skipped")
        return _Group(info["path"], layer, [], None, None)
    if info["kind"] == "map" and reduction != "mean":
        ctx.log(f"maximize: {layer}: no 'mean' activations stored; scores compare with the stored '{reduction}'")
    n_channels = int(array.shape[1])
    directions = np.zeros((0, n_channels), np.float32)
    cluster_list = []
    if clusters is not None:
        rows = clusters[clusters["layer"] == layer]
        weights = _cluster_weights(root, info, rows, n_channels, ctx.cfg.cluster.reduction)
        cluster_list, skipped = plan.cluster_targets(layer, zip(rows["cluster"], weights), n_channels, seed)
        for note in skipped:
            ctx.log(f"maximize: {note}; skipped")
        directions = np.array([t.vector for t in cluster_list], np.float32).reshape(-1, n_channels)
    stats = quality.column_stats(array, directions)
    units = plan.unit_targets(layer, plan.select_units(mx.units, stats.max[:n_channels]), n_channels, seed)
    if isinstance(mx.units, list) and len(units) < len(set(mx.units)):
        ctx.log(f"maximize: {layer} has {n_channels} channels; channels ≥ {n_channels} of maximize.units skipped")
    index = [t.index for t in units] + list(range(n_channels, n_channels + len(cluster_list)))
    return _Group(info["path"], layer, units + cluster_list, stats.take(np.asarray(index, int)), reduction)


def _cluster_weights(root, info, rows, n_channels, reduction):
    """Cluster directions on raw activations: ``centroid / std``.

    The cluster stage's centroids are directions in z-scored activation space (of its
    ``cluster.reduction``), so the same direction on raw activations weights each unit by
    ``1 / std``; units without spread get weight 0.
    """
    from pipeline.maximize import quality

    if len(rows) == 0:
        return []
    array, _ = stored_array(root, info, reduction)
    std = quality.column_stats(array).std
    safe = np.where(np.isfinite(std) & (std > 0), std, np.inf)
    out = []
    for centroid in rows["centroid"]:
        c = np.asarray(centroid, np.float64).ravel()
        out.append(c / safe if c.size == n_channels else c)
    return out


def _read_clusters(ctx):
    table = ctx.catalog.read("cluster_summary")
    if table is None:
        ctx.log(f"maximize: no {CLUSTERS} (cluster stage not run); no cluster images")
        return None
    if not {"layer", "cluster", "centroid"} <= set(table.columns):
        ctx.log(f"maximize: {CLUSTERS} has no centroid column; no cluster images")
        return None
    return table


def _class_group(ctx, root):
    from pipeline.maximize import plan, quality
    from pipeline.maximize.objectives import LOGITS

    logits = root["logits"]
    targets = plan.class_targets(int(logits.shape[1]), ctx.cfg.seed, _output_names(ctx, int(logits.shape[1])))
    return _Group(plan.CLASSES, LOGITS, targets, quality.column_stats(logits), "logits")


def _output_names(ctx, n_outputs):
    """``{output: class name}`` when output ``k`` is class ``k``; else empty (images stay "output k")."""
    from pipeline.shortcuts.verdicts import read_classes

    ds = ctx.catalog.read("dataset")
    if ds is None or not {"label", "class_name"} <= set(ds.columns):
        return {}
    classes = read_classes(ds, ctx.catalog.read("manifest", default={}))
    why = classes.mismatch(n_outputs)
    if why:
        ctx.log(f"maximize: class images are named by output number: {why}")
        return {}
    return classes.names


# -- resuming and rendering --


def _resume(store, groups, params_hash):
    """Rows already rendered with the same parameters (by group and key), and what is left."""
    done, todo = {}, {}
    for g in groups:
        rows = store.read_table(g.part) if store.exists(g.part) else pd.DataFrame(columns=["key", "params_hash"])
        rows = rows[rows["params_hash"] == params_hash]
        done[g.name] = rows.drop_duplicates("key", keep="last")
        have = set(done[g.name]["key"])
        todo[g.name] = [t for t in g.targets if t.key not in have or not store.exists(t.path)]
    return done, todo


def _renderer(ctx, model, group, jit=False):
    """The compiled loop of a group: a direction objective for layers, log-probability for classes."""
    from pipeline.maximize import objectives as obj
    from pipeline.maximize import params, render, transforms

    mx = ctx.cfg.maximize
    h, w, c = render.input_size(model, mx.size)
    param = params.image(h, w, c, fft=mx.param == "fourier", decorrelate=mx.decorrelate)
    kind = "jitter" if group.objective_layer == obj.LOGITS and mx.transforms != "none" else mx.transforms
    transform = {"standard": transforms.standard, "jitter": transforms.jitter_only}.get(kind, lambda size: None)
    common = dict(param=param, transform=transform(max(h, w)), steps=mx.steps, learning_rate=mx.learning_rate,
                  scale=parse_scale(ctx.cfg.data.scale), size=mx.size, relu_redirect=mx.relu_redirect,
                  jit_compile=jit)
    if group.objective_layer == obj.LOGITS:
        return render.Renderer(model, obj.class_logprob, measures=(obj.class_logit, obj.class_probability), **common)
    layer = group.objective_layer
    return render.Renderer(model, lambda vectors: obj.direction(layer, vectors), **common)


def _render_all(ctx, groups, todo, done, params_hash):
    from pipeline.inputs.models import load_model
    from pipeline.progress import progress

    mx = ctx.cfg.maximize
    total = sum(len(v) for v in todo.values())
    if total == 0:
        return 0, 0, {"batch_size": _recorded_batch(done) or mx.batch_size}
    cfg = ctx.cfg
    model = load_model(cfg.model, cfg.trust_model, cfg.compute.precision, lambda note: ctx.log(f"maximize: {note}"))
    budget = Budget(mx.max_seconds)
    batch_size, batching = _batch_size(ctx, model, groups, todo, done)
    jit, xla = _xla(ctx, model, groups, todo, done, batch_size)
    batching.update(xla)
    bar = progress(total=total, unit="img", desc="maximize")
    rendered = 0
    for g in render_order(groups):
        if not todo[g.name]:
            continue
        renderer = _renderer(ctx, model, g, jit)
        for batch, size in _batches(todo[g.name], batch_size, budget):
            if not batch:
                bar.close()
                return rendered, total - rendered, batching
            t0 = time.monotonic()
            rows = _render_batch(ctx, renderer, batch, params_hash, size=size)
            if jit and renderer.xla_error:
                jit = False
                ctx.log(f"maximize: compute.xla: XLA cannot compile this model's step ({renderer.xla_error}); "
                        "it runs without XLA")
                batching.update({"xla": False, "xla_reason": f"fell back: {renderer.xla_error}"})
            rows["batch_size"] = batch_size  # kept with the images: a rerun renders the rest at this size
            rows["xla"] = renderer.jit_compile
            budget.record(size, time.monotonic() - t0)
            done[g.name] = pd.concat([done[g.name], rows], ignore_index=True).drop_duplicates("key", keep="last")
            ctx.store.write_table(g.part, done[g.name])
            rendered += len(batch)
            bar.update(len(batch))
    bar.close()
    return rendered, 0, batching


def _xla(ctx, model, groups, todo, done, batch_size):
    """``compute.xla`` for the act-max step: whether to compile it with XLA, and the record.

    ``on`` / ``off`` as said. ``auto``: what the images already rendered with these parameters
    used (the part files keep it); else, on a GPU, :func:`decide_xla` times short renders of the
    first group both ways; on a CPU, off without timing, as measured: on 2 cores the XLA-compiled
    step of a mini-Xception (64x64, batch 16) ran 4x slower after a 20 s compile.
    """
    mode = ctx.cfg.compute.xla
    if mode != "auto":
        return mode == "on", {"xla": mode == "on"}
    recorded = _recorded(done, "xla")
    if recorded is not None:
        return bool(recorded), {"xla": bool(recorded), "xla_reason": "as the images already rendered"}
    from pipeline.backend import autobatch

    if autobatch.cpu_only():
        return False, {"xla": False, "xla_reason": "CPU: XLA's convolution gradients are slower there (not timed)"}

    def measure(jit):
        call, renderer = _short_render(ctx, model, groups, todo, jit)
        call(batch_size)  # compiles
        if jit and renderer.xla_error:
            raise RuntimeError(renderer.xla_error)
        t0 = time.perf_counter()
        call(batch_size)
        return time.perf_counter() - t0

    use, reason = decide_xla(measure)
    ctx.log(f"maximize: compute.xla auto → {'on' if use else 'off'} ({reason})")
    return use, {"xla": use, "xla_reason": reason}


def decide_xla(measure, min_gain=0.05):
    """Keep XLA when it is at least ``min_gain`` faster.

    Parameters
    ----------
    measure : callable
        ``measure(jit) -> seconds`` of the same short render with and without XLA; an exception
        when XLA cannot compile it.

    Returns
    -------
    (bool, str)
        Whether to use XLA, and why.
    """
    off = measure(False)
    try:
        on = measure(True)
    except Exception as e:  # noqa: BLE001 - any compile failure means: run without XLA
        return False, f"XLA cannot compile the step: {first_line(e)}"
    if on < (1 - min_gain) * off:
        return True, f"XLA {off / on:.1f}x faster: {on:.2f} vs {off:.2f} s per short render"
    return False, f"XLA not faster: {on:.2f} vs {off:.2f} s per short render"


PROBE_STEPS = 8          # maximize.batch_size auto: optimisation steps per timed call
START, CAP = 8, 256      # batch sizes tried: 8, 16, ... 256 (and never more than a group's images)


def _batch_size(ctx, model, groups, todo, done):
    """``maximize.batch_size`` as a number, and the record for the summary.

    ``auto``: the size the images already rendered with these parameters were rendered at (the
    part files keep it), else the size :func:`pipeline.backend.autobatch.search` finds with
    short renders (:data:`PROBE_STEPS` steps) of the first group to render.
    """
    mx = ctx.cfg.maximize
    if mx.batch_size != "auto":
        return int(mx.batch_size), {"batch_size": int(mx.batch_size)}
    recorded = _recorded_batch(done)
    if recorded:
        ctx.log(f"maximize: batch size auto → {recorded} (as the images already rendered)")
        return recorded, {"batch_size": recorded, "batch_search": "reused from the images already rendered"}
    choice = _search_batch(ctx, model, groups, todo)
    ctx.log(f"maximize: batch size auto → {choice.line()}")
    return choice.size, {"batch_size": choice.size, "batch_search": choice.record()}


def _recorded_batch(done):
    """The batch size recorded in the part files' rows (of the current render parameters), or ``None``."""
    recorded = _recorded(done, "batch_size")
    return None if recorded is None else int(recorded)


def _recorded(done, column):
    """The last value of ``column`` in the part files' rows (of the current render parameters), or ``None``."""
    for rows in done.values():
        if column in rows and rows[column].notna().any():
            return rows[column].dropna().iloc[-1]
    return None


def _short_render(ctx, model, groups, todo, jit=False):
    """``(call, renderer)``: ``call(size)`` renders ``size`` images of the first group to render
    (its own targets, repeated) for :data:`PROBE_STEPS` steps, as the probes time it."""
    from dataclasses import replace

    first = next(g for g in render_order(groups) if todo[g.name])
    short = ctx.cfg.model_copy(update={"maximize": ctx.cfg.maximize.model_copy(update={"steps": PROBE_STEPS})})
    renderer = _renderer(replace(ctx, cfg=short), model, first, jit)
    targets = todo[first.name]

    def call(size):
        renderer(*_renderer_inputs([targets[i % len(targets)] for i in range(size)]))

    return call, renderer


def _renderer_inputs(targets):
    """``(seeds, targets)`` of a :class:`Renderer` call: class indices, or unit/cluster directions."""
    classes = targets[0].kind == "class"
    return [t.seed for t in targets], (np.array([t.index for t in targets]) if classes
                                       else np.stack([t.vector for t in targets]))


def _search_batch(ctx, model, groups, todo):
    """Time short renders of the first group to render at growing batch sizes (its own targets, repeated)."""
    from pipeline.backend import autobatch
    from pipeline.maximize.render import input_size

    mx = ctx.cfg.maximize
    call, _ = _short_render(ctx, model, groups, todo)
    memory = None
    if autobatch.cpu_only():  # forward, gradient and optimiser state of every layer, per image
        memory = autobatch.memory_cap(3 * autobatch.model_bytes(model, input_size(model, mx.size)))
    return autobatch.search(autobatch.timed(call), start=START, cap=CAP, patience=1,
                            limit=max(len(v) for v in todo.values()), memory=memory)


class Budget:
    """``maximize.max_seconds`` as a running check: how many images the next batch may hold.

    A compiled batch cannot be stopped halfway, so the budget is kept by sizing batches: the time
    per image of the last batch (compilation included, so it errs on the long side) says how many
    images fit in what is left. Before anything is measured a batch holds at most ``first``
    images, so even the first batch of a large model overruns the budget by little.
    """

    def __init__(self, seconds, first=4):
        self.deadline = None if not seconds else time.monotonic() + seconds
        self.first = first
        self.per_image = None

    def room(self, wanted):
        """Images (at most ``wanted``) that fit before the deadline; 0 when none does."""
        if self.deadline is None:
            return wanted
        left = self.deadline - time.monotonic()
        if left <= 0:
            return 0
        if self.per_image is None:
            return min(wanted, self.first)
        return min(wanted, int(left // self.per_image))

    def record(self, images, seconds):
        self.per_image = seconds / max(images, 1)


def _batches(targets, batch_size, budget):
    """``(batch, padded size)`` pairs; an empty batch means the budget ran out.

    Without a budget: equal batches (``plan.batches``), all padded to the first one's size so one
    compiled graph serves them. With one: each batch as large as the time left allows.
    """
    from pipeline.maximize import plan

    if budget.deadline is None:
        batches = plan.batches(targets, batch_size)
        yield from ((b, len(batches[0])) for b in batches)
        return
    queue = list(targets)
    while queue:
        n = budget.room(min(len(queue), batch_size))
        if n == 0:
            yield [], 0
            return
        batch, queue = queue[:n], queue[n:]
        yield batch, len(batch)


def render_order(groups):
    """Classes first, then the layers spread over depth (deepest, first, middle, quarters …).

    Under a time budget the images that are rendered then cover the whole network instead of
    its first layers only.
    """
    from pipeline.maximize.objectives import LOGITS

    classes = [g for g in groups if g.objective_layer == LOGITS]
    layers = [g for g in groups if g not in classes]
    return classes + [layers[i] for i in spread_indices(len(layers))]


def spread_indices(n):
    """``0..n-1`` reordered so every prefix is spread evenly: last, first, middle, quarters, …"""
    if n <= 2:
        return list(range(n))[::-1]
    order, seen = [n - 1, 0], {n - 1, 0}
    parts = 2
    while len(order) < n:
        for k in range(1, parts, 2):
            i = int(round(k * (n - 1) / parts))
            if i not in seen:
                order.append(i)
                seen.add(i)
        parts *= 2
        if parts > 4 * n:
            order += [i for i in range(n) if i not in seen]
            break
    return order


def _render_batch(ctx, renderer, batch, params_hash, size):
    """Render one batch (padded to ``size`` by repeating its last target), write PNGs, return rows."""
    padded = batch + [batch[-1]] * (size - len(batch))
    classes = batch[0].kind == "class"
    result = renderer(*_renderer_inputs(padded))
    activation = result.measures[0] if classes else result.values
    rows = []
    for i, t in enumerate(batch):
        ctx.store.write_bytes(t.path, _png(result.images[i]))
        rows.append({"key": t.key, "kind": t.kind, "layer": t.layer, "index": t.index, "class_name": t.class_name,
                     "seed": t.seed, "activation": float(activation[i]), "initial": float(result.initial[i]),
                     "probability": float(result.measures[1][i]) if classes else np.nan,
                     "path": t.path, "params_hash": params_hash})
    return pd.DataFrame(rows)


def _png(image) -> bytes:
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


# -- the index --


def _index(groups, done, params_hash):
    from pipeline.maximize import quality

    tables = []
    for g in groups:
        rows = done[g.name].set_index("key") if len(done[g.name]) else None
        keep = [i for i, t in enumerate(g.targets) if rows is not None and t.key in rows.index]
        if not keep:
            continue
        got = rows.loc[[g.targets[i].key for i in keep]]
        stats = g.stats.take(np.asarray(keep))
        score, z, valid = quality.scores(got["activation"].to_numpy(), stats)
        kinds = got["kind"].to_numpy()
        idx = got["index"].to_numpy()
        tables.append(pd.DataFrame({
            "kind": kinds, "layer": got["layer"].to_numpy(),
            "channel": np.where(kinds == "unit", idx, -1), "cluster": np.where(kinds == "cluster", idx, -1),
            "class": np.where(kinds == "class", idx, -1),
            "class_name": [g.targets[i].class_name for i in keep],
            "seed": got["seed"].to_numpy(np.int64), "activation": got["activation"].to_numpy(),
            "dataset_max": stats.max, "score": score, "z_score": z, "score_valid": valid,
            "dataset_mean": stats.mean, "dataset_std": stats.std, "reduction": g.reduction,
            "probability": got["probability"].to_numpy(float) if "probability" in got else np.nan,
            "path": got["path"].to_numpy(), "params_hash": params_hash}))
    index = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=COLUMNS)
    for col in _INT_COLUMNS:
        index[col] = pd.array(np.where(index[col].to_numpy() == -1, None, index[col].to_numpy()), dtype="Int64")
    index["class_name"] = index["class_name"].astype(object).where(index["class_name"].notna(), None)
    return index[COLUMNS]


def _summary(ctx, index, rendered, missing):
    if missing:
        ctx.log(f"maximize: time budget (maximize.max_seconds) reached with {missing} image(s) not rendered; "
                "run `python -m pipeline maximize RUN_DIR` again to render the rest (finished images are kept)")
    valid = index["score"].to_numpy(float)
    return {"images": int(len(index)), "rendered": int(rendered), "reused": int(len(index) - rendered),
            "missing": int(missing),
            "median_score": _round(np.nanmedian(valid) if np.isfinite(valid).any() else np.nan),
            "median_z_score": _round(np.nanmedian(index["z_score"].to_numpy(float))
                                     if np.isfinite(index["z_score"].to_numpy(float)).any() else np.nan),
            "score_not_meaningful": int((~index["score_valid"].astype(bool)).sum())}


def _round(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


# The cluster stage is optional: without it (or with maximize.clusters: false) units and classes are
# rendered and cluster directions are not (said in the log); once it runs, this stage reruns and
# renders only the cluster images (the rest are reused from the part files).
STAGE = Stage(name="maximize", deps=("extract",), optional=("cluster",), params=_params,
              outputs=("maximize",), run=run, version="1")
