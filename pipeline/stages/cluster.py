"""Cluster stage, runner side: neuron clusters, per-unit and per-cluster tables, per-layer figures.

Writes ``clusters.parquet`` (one row per neuron), ``cluster_summary.parquet`` (one row per
cluster, with its centroid direction) and ``layers.parquet`` (separability per layer and the CKA
matrix between layers). Activations are read in row chunks; nothing holds all of them at once.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.stages.base import Outputs, Stage
from pipeline.storage.arrays import chunker, layer_array, open_activations


def _params(cfg):
    return {"cluster": cfg.cluster.model_dump(mode="json"), "seed": cfg.seed}


def cluster_layer(chunks, n_images, image_labels, cfg, *, n_units=None):
    """Cluster one layer's units; returns (per-unit table, per-cluster table, clusterer, notes).

    A layer of more than ``cluster.max_units`` units (``n_units``) is not clustered: see
    :func:`unclustered_layer`.
    """
    from pipeline.analysis.neurons import NeuronClusterer, bootstrap_stability, correlation_streaming, dead_units

    c = cfg.cluster
    if n_units is not None and n_units > c.max_units:
        return unclustered_layer(chunks, n_units, image_labels, cfg)
    corr, stats = correlation_streaming(chunks)
    dead = dead_units(stats)
    clusterer = NeuronClusterer(method=c.method, n_clusters=c.n_clusters, random_state=cfg.seed)
    labels = clusterer.fit_predict(corr)
    units, summary = _tables(chunks, corr, labels, dead, stats, image_labels, c.top_k)
    notes = [clusterer.note_] if getattr(clusterer, "note_", "") else []
    if c.bootstrap and (~dead).sum() >= 3 and n_images >= 3 and len(summary) > 1:
        stab = bootstrap_stability(chunks, clusterer, n_images, n_boot=c.bootstrap, random_state=cfg.seed)
        units["stability"] = stab.per_unit(labels)
        summary["stability"] = [stab.cluster[k] if 0 <= k < len(stab.cluster) else np.nan
                                for k in summary["cluster"]]
        summary.attrs["mean_ari"] = stab.mean_ari
    return units, summary, clusterer, notes


def unclustered_layer(chunks, n_units, image_labels, cfg):
    """The tables of a layer too wide to cluster: every unit gets cluster -1, no cluster rows.

    Clustering needs the ``C x C`` float64 correlation (and one per bootstrap resample): 8192
    units are 0.5 GB, 30,000 units 7 GB. Rather than allocate that (or crash),
    the per-unit figures (dead, mean, std, max, top images, selectivity) are computed in ``O(C)``
    memory and a note says which key to raise. CKA between layers still covers the layer.
    """
    from pipeline.analysis.neurons import dead_units, unit_moments

    c = cfg.cluster
    stats = unit_moments(chunks)
    units, summary = _tables(chunks, np.zeros((0, 0)), np.full(n_units, -1, dtype=np.int64),
                             dead_units(stats), stats, image_labels, c.top_k)
    note = (f"{n_units} units, more than cluster.max_units = {c.max_units}: not clustered (every unit "
            f"gets cluster -1; the {n_units} x {n_units} correlation alone would take "
            f"{8 * n_units**2 / 2**30:.1f} GB); raise cluster.max_units to cluster it")
    return units, summary, None, [note]


def _tables(chunks, corr, labels, dead, stats, image_labels, top_k):
    """Per-unit and per-cluster tables of one layer, stability left NaN (the bootstrap fills it)."""
    from pipeline.analysis.neurons import cluster_summary, unit_summary

    units = unit_summary(chunks, image_labels, top_k=top_k)
    units.insert(1, "cluster", labels)
    units.insert(2, "dead", dead)
    units["stability"] = np.nan
    summary = cluster_summary(chunks, corr, labels, stats, image_labels=image_labels, top_k=top_k)
    summary["stability"] = np.nan
    return units, summary


def run(ctx):
    from functools import partial

    from pipeline.analysis.layerstats import layer_figures, layer_table, minibatch_cka
    from pipeline.progress import progress

    cfg, store = ctx.cfg, ctx.store
    blocks = _row_blocks(ctx)
    root, names, infos = open_activations(store)
    dataset = ctx.catalog.read("dataset")
    labels = dataset["label"].to_numpy()
    image_labels = labels if (labels >= 0).any() else None
    n = len(dataset)
    unit_tables, cluster_tables, figures = [], [], {}
    bar = progress(names, desc="cluster", unit="layers")
    for layer in bar:
        bar.set_postfix_str(layer)
        arr = layer_array(root, infos[layer], cfg.cluster.reduction)
        units, summary, clusterer, notes = cluster_layer(blocks(arr), n, image_labels, cfg,
                                                         n_units=int(arr.shape[1]))
        for note in notes:
            ctx.log(f"cluster: {layer}: {note}")
        if units["dead"].all():
            ctx.log(f"cluster: {layer}: every unit is dead (constant or NaN); no clusters")
        units.insert(0, "layer", layer)
        summary.insert(0, "layer", layer)
        summary["mean_ari"] = summary.attrs.get("mean_ari", np.nan)
        unit_tables.append(units)
        cluster_tables.append(summary)
        figures[layer] = layer_figures(arr, image_labels, dead=units["dead"].to_numpy(),
                                       clusters=units["cluster"].to_numpy(), random_state=cfg.seed)
        figures[layer]["silhouette_k"] = float(getattr(clusterer, "silhouette_", np.nan) or np.nan)
        curve = getattr(clusterer, "silhouette_curve_", None) or {}
        figures[layer]["k_tried"] = [int(k) for k in curve]
        figures[layer]["silhouette_curve"] = [float(v) for v in curve.values()]
        ctx.log(f"cluster: {layer}: {int((~units['dead']).sum())} live units in "
                f"{figures[layer]['n_clusters']} clusters, probe accuracy "
                f"{figures[layer]['probe_accuracy']:.3f}")
    arrays = [layer_array(root, infos[l], cfg.cluster.reduction) for l in names]
    cka = None
    if len(names) > 1 and n > 3:
        # Here on both engines: CKA reads a bounded, seeded row sample (cluster.cka_rows) one layer
        # at a time, so the Dask engine gives the same matrix without merging partial results.
        cka = minibatch_cka(arrays, batch_size=cfg.cluster.cka_batch, max_rows=cfg.cluster.cka_rows,
                            random_state=cfg.seed,
                            progress=partial(progress, desc="cluster CKA", unit="layer reads"))
    table = layer_table(figures, cka)
    for col in ("silhouette_k", "k_tried", "silhouette_curve"):
        table[col] = [figures[l][col] for l in table["layer"]]
    return Outputs({"clusters": pd.concat(unit_tables, ignore_index=True),
                    "cluster_summary": pd.concat(cluster_tables, ignore_index=True),
                    "layers": table},
                   {"layers": len(names), "clusters": int(sum(len(t) for t in cluster_tables)),
                    "probe_accuracy": {l: _num(figures[l]["probe_accuracy"]) for l in names}})


def _row_blocks(ctx):
    """``chunker`` for the local engine; on Dask, row blocks whose passes run on the workers
    (same blocks, partial results merged in the same order: the same tables)."""
    if ctx.cfg.engine != "dask":
        return chunker
    from pipeline.engines import cluster as distributed

    client = distributed.client_for(ctx.cfg)
    ctx.log(f"cluster: statistics on {distributed.describe(client)}")
    return distributed.row_blocks(client)


def _num(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


STAGE = Stage(name="cluster", deps=("extract",), params=_params,
              outputs=("clusters", "cluster_summary", "layers"), run=run, version="1")
