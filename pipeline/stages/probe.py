"""Probe stage (the shortcut finder): does the model decide by colour, texture or shape?

Runs the model on a seeded, class-stratified sample of the analysed images, once as they are and
once per counterfactual probe (:mod:`pipeline.shortcuts.probes`), with the same multi-output forward pass
as the extract stage (the extracted layers, channel means). From the logits it computes per class
and probe the accuracy / logit / break-rate changes with bootstrap intervals and a verdict per
class (:mod:`pipeline.shortcuts.verdicts`); from the activations, each unit's sensitivity to each probe.

Writes
------
``bias.parquet``           one row per (class, probe): see ``pipeline.shortcuts.verdicts.BIAS_COLUMNS``
``bias_verdicts.parquet``  one row per class: verdict, effect size and interval, cue, reason
``probe_units.parquet``    one row per unit: layer, channel, colour/texture/shape_sensitivity,
                           ``<probe>_sensitivity`` per probe
``probe_clusters.parquet`` per neuron cluster, mean of its units (only when ``clusters.parquet``
                           exists; ``clusters.parquet`` itself is never modified — the report
                           joins, or calls ``pipeline.shortcuts.verdicts.cluster_sensitivity`` on the current
                           tables)
``probe_predictions.parquet`` one row per (probed image, pass): ``index`` (dataset row), ``label``,
                           ``probe`` (``original`` or the probe's name), ``group`` (``original``,
                           ``colour``, ``texture``, ``shape``, ``context``), ``predicted`` (argmax
                           output): the per-image outcomes behind the class tables, so that
                           ``python -m pipeline compare`` can pair two runs image by image
``probes/``                ``examples.png`` (rows: example images; columns: original, each probe),
                           ``<probe>.png`` (the same examples under one probe), ``index.parquet``

Unlabelled images, or classes the model's outputs cannot be read as (output ``k`` is class ``k``
only when the class codes are the user's own labels and there are as many outputs as declared
classes: :meth:`pipeline.shortcuts.verdicts.Classes.mismatch`), skip the class tables, which are then written
empty, with the reason logged and in the manifest summary (``class_metrics``); unit sensitivities
are computed in every case.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd

from pipeline.config import compute_params
from pipeline.stages.base import Outputs, Stage
from pipeline.storage.catalog import path as artifact_path
from pipeline.storage.hashing import file_hash

OUTPUTS = ("bias", "bias_verdicts", "probe_units", "probe_predictions", "probe_images")


def _params(cfg):
    # compute.xla does not act on the probe's forward passes (make_forward's default decides their summaries)
    return {"probe": cfg.probe.model_dump(mode="json"), "seed": cfg.seed, **compute_params(cfg, xla=False)}


def _inputs(cfg):
    return {"model": file_hash(cfg.model)}


def sample_rows(labels, max_images, seed) -> np.ndarray:
    """Positions of the probed images: a seeded class-stratified sample, in dataset order."""
    from pipeline.inputs.images import stratified_sample

    return stratified_sample(np.asarray(labels), max_images, seed)


def class_support(labels, n_outputs, classes=None):
    """``None`` when per-class metrics can be computed, else the reason they cannot.

    Parameters
    ----------
    labels : array of int
        Class codes of the probed images (-1 = unlabelled).
    n_outputs : int
        Width of the model's logits.
    classes : pipeline.shortcuts.verdicts.Classes, optional
        The run's classes (:func:`pipeline.shortcuts.verdicts.read_classes`); without it, the distinct labels.

    Returns
    -------
    str or None
    """
    from pipeline.shortcuts.verdicts import Classes

    labels = np.asarray(labels)
    if not (labels >= 0).any():
        return "the images are unlabelled"
    if classes is None:
        present = [int(v) for v in np.unique(labels[labels >= 0])]
        classes = Classes({k: str(k) for k in present}, present == list(range(len(present))))
    return classes.mismatch(n_outputs)


def run(ctx):
    from pipeline.shortcuts import verdicts as bias
    from pipeline.shortcuts.probes import make_probes

    cfg, catalog = ctx.cfg, ctx.catalog
    dataset = catalog.read("dataset")
    rows = sample_rows(dataset["label"].to_numpy(), cfg.probe.max_images, cfg.seed)
    model, names, kinds, size, channels = _model(ctx)
    probes = make_probes(cfg.probe)
    active = [p for p in probes if p.applicable(channels)]
    skipped = {p.name: f"not applicable: the model takes {channels}-channel (grey) images"
               for p in probes if not p.applicable(channels)}
    for name, why in skipped.items():
        ctx.log(f"probe: {name}: {why}")
    ctx.log(f"probe: {len(rows)} images x {len(active) + 1} passes ({', '.join(p.name for p in active)})")

    logits, probed, units, examples = _forward_all(ctx, model, names, kinds, size, channels, dataset, rows, active)
    groups = {p.name: p.group for p in probes}
    unit_table = units.table(groups)

    labels = dataset["label"].to_numpy()[rows]
    classes = bias.read_classes(dataset, catalog.read("manifest", default={}))
    why_not = class_support(labels, logits.shape[1], classes)
    summary = {"images": int(len(rows)), "probes": [p.name for p in active],
               "not_applicable": sorted(skipped)}
    if why_not:
        ctx.log(f"probe: per-class metrics skipped: {why_not}; unit sensitivities computed")
        table, verdicts = pd.DataFrame(columns=bias.BIAS_COLUMNS), pd.DataFrame(columns=bias.VERDICT_COLUMNS)
        summary["class_metrics"] = f"skipped: {why_not}"
    else:
        table, verdicts = _class_tables(ctx, classes, labels, logits, probed, groups, skipped)
        summary["verdicts"] = {r["class_name"]: r["verdict"] for r in verdicts.to_dict("records")}
    clusters = catalog.read("clusters")
    by_cluster = None  # removes a table an earlier run joined with clusters that are gone now
    if clusters is not None:
        by_cluster = bias.cluster_sensitivity(unit_table, clusters)
        # Which neuron clusters were joined: the report can tell whether they are still current.
        summary["clusters_fingerprint"] = catalog.stage_record("cluster").get("fingerprint")
    for r in verdicts.to_dict("records"):
        ctx.log(f"probe: {r['class_name']}: {r['verdict']} "
                f"(effect {r['effect_size']:.2f} [{r['effect_ci_low']:.2f}, {r['effect_ci_high']:.2f}])")
    per_image = prediction_table(dataset["index"].to_numpy()[rows], dataset["label"].to_numpy()[rows],
                                 logits, probed, groups)
    return Outputs({"probe_units": unit_table, "bias": table, "bias_verdicts": verdicts,
                    "probe_predictions": per_image, "probe_clusters": by_cluster,
                    "probe_images": _example_files(examples, active, channels)},
                   summary)


PREDICTION_COLUMNS = ["index", "label", "probe", "group", "predicted"]


def prediction_table(index, labels, logits, probed, groups) -> pd.DataFrame:
    """``probe_predictions``: one row per probed image and pass, the original first.

    Parameters
    ----------
    index, labels : (n,) int
        Dataset rows and class codes (-1 = unlabelled) of the probed images.
    logits : (n, K) float
        On the originals.
    probed : dict
        ``{probe name: (n, K) logits}``.
    groups : dict
        ``{probe name: group}``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`PREDICTION_COLUMNS`; ``predicted`` is the argmax output (read as a class only
        where outputs are classes, as for the class tables).
    """
    parts = []
    for name, z in {"original": logits, **probed}.items():
        parts.append(pd.DataFrame({"index": np.asarray(index, np.int64), "label": np.asarray(labels, np.int64),
                                   "probe": name, "group": "original" if name == "original" else groups[name],
                                   "predicted": np.asarray(z).argmax(axis=1).astype(np.int64)}))
    return pd.concat(parts, ignore_index=True)[PREDICTION_COLUMNS]


def _model(ctx):
    from pipeline.inputs.models import load_model
    from pipeline.storage.arrays import open_activations
    from pipeline.extraction.plan import input_geometry

    cfg = ctx.cfg
    model = load_model(cfg.model, cfg.trust_model, cfg.compute.precision, lambda note: ctx.log(f"probe: {note}"))
    size, channels = input_geometry(model, cfg.data)
    _, names, infos = open_activations(ctx.store)
    return model, names, {n: infos[n]["kind"] for n in names}, size, channels


def _class_tables(ctx, classes, labels, logits, probed, groups, skipped):
    from pipeline.shortcuts import verdicts as bias

    cfg = ctx.cfg
    keep = labels >= 0
    rules = bias.Rules.from_config(cfg.probe)
    sub = {k: v[keep] for k, v in probed.items()}
    return bias.shortcut_tables(labels[keep], classes.names, logits[keep], sub, groups, cfg.seed, rules, skipped)


def _forward_all(ctx, model, names, kinds, size, channels, dataset, rows, probes):
    """Logits ``(n, K)`` on the originals, ``{probe: (n, K)}``, unit sensitivities and examples."""
    from pipeline.shortcuts.verdicts import UnitSensitivity
    from pipeline.config import batch_or, parse_scale
    from pipeline.inputs.dataset import pixel_loader
    from pipeline.extraction.forward import make_forward
    from pipeline.progress import progress

    cfg = ctx.cfg
    forward = make_forward(model.build_extractor(names), kinds, ["mean"], parse_scale(cfg.data.scale))
    load = pixel_loader(cfg.data, dataset, size, channels)
    index = dataset["index"].to_numpy()
    keys = {l: _key(l, kinds[l]) for l in names}
    units, logits, probed = UnitSensitivity(), [], {p.name: [] for p in probes}
    examples = _example_rows(dataset["label"].to_numpy()[rows], cfg.probe.examples)
    shown = {"original": []} | {p.name: [] for p in probes}
    bs = batch_or(cfg.extract.batch_size, (ctx.catalog.summary("extract").get("compute") or {}).get("batch_size") or 64)
    bar = progress(total=len(rows), unit="img", desc="probe")
    for start in range(0, len(rows), bs):
        batch = rows[start:start + bs]
        pixels = load(batch)
        base, _ = forward(pixels)
        logits.append(base["logits"])
        outs = {}
        pick = [i - start for i in examples if start <= i < start + len(batch)]
        shown["original"] += [pixels[i] for i in pick]
        for p in probes:
            changed = p(pixels, index[batch], cfg.seed)
            outs[p.name], _ = forward(changed)
            probed[p.name].append(outs[p.name]["logits"])
            shown[p.name] += [changed[i] for i in pick]
        for l in names:
            units.update(l, base[keys[l]], {p: o[keys[l]] for p, o in outs.items()})
        bar.update(len(batch))
    bar.close()
    cat = (lambda parts: np.concatenate(parts).astype(np.float32))
    return cat(logits), {k: cat(v) for k, v in probed.items()}, units, shown


def _key(layer, kind):
    """The forward pass's array of a layer's per-unit values (channel means, or a dense layer's values)."""
    from pipeline.storage.arrays import layer_path

    return f"{layer_path(layer)}/{'mean' if kind == 'map' else 'value'}"


def _example_rows(labels, k) -> list:
    """Positions (into the sample) of ``k`` example images: the first of each class in turn."""
    labels = np.asarray(labels)
    order = []
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for depth in range(k):
        for members in by_class:
            if depth < len(members) and len(order) < k:
                order.append(int(members[depth]))
    return sorted(order)


def _example_files(shown, probes, channels, cell=96) -> dict:
    """The ``probes/`` folder: ``examples.png`` (grid), ``<probe>.png`` (strips), ``index.parquet``."""
    from PIL import Image

    def strip(images):
        row = np.concatenate([_upscale(im, cell) for im in images], axis=1)
        return row[..., 0] if channels == 1 else row

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
        return buf.getvalue()

    columns = ["original", *[p.name for p in probes]]
    files, entries = {}, []
    if shown["original"]:
        grid = np.concatenate([strip([shown[c][i] for c in columns]) for i in range(len(shown["original"]))], axis=0)
        files["examples.png"] = png(grid)
        for c in columns:
            files[f"{c}.png"] = png(strip(shown[c]))
        descriptions = {p.name: (p.group, p.description) for p in probes}
        entries = [{"probe": c, "group": descriptions.get(c, ("", ""))[0],
                    "description": descriptions.get(c, ("", "the images as analysed"))[1],
                    "path": artifact_path("probe_images", f"{c}.png")} for c in columns]
    index = io.BytesIO()
    pd.DataFrame(entries, columns=["probe", "group", "description", "path"]).to_parquet(index, index=False)
    files["index.parquet"] = index.getvalue()
    return files


def _upscale(image, cell):
    f = max(1, cell // max(image.shape[:2]))
    return np.repeat(np.repeat(np.asarray(image, dtype=np.uint8), f, axis=0), f, axis=1)


STAGE = Stage(name="probe", deps=("extract",), params=_params, inputs=_inputs, outputs=OUTPUTS, run=run,
              version="1")
