"""Embed stage, runner side: t-SNE and UMAP maps of images and of neurons, per layer, with quality.

Writes ``embeddings/images.parquet`` (layer, method, index, x, y), ``embeddings/neurons.parquet``
(layer, method, channel, x, y) and ``embeddings/quality.parquet`` (layer, of, method,
trustworthiness, knn_accuracy, n_points, fallback).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.stages.base import Outputs, Stage
from pipeline.storage.arrays import layer_array, open_activations


def _params(cfg):
    return {"embed": cfg.embed.model_dump(mode="json"), "seed": cfg.seed}


def _embed_one(features, method, cfg):
    from pipeline.analysis import embedding as E

    e = cfg.embed
    kw = {"random_state": cfg.seed, "max_fit": e.max_fit}
    kw.update({"perplexity": e.perplexity} if method == "tsne" else {"n_neighbors": e.n_neighbors})
    if cfg.engine == "dask" and len(features) > e.max_fit:  # the rest placed on the workers, same map
        from pipeline.engines import dask_embed

        return dask_embed.embed(features, method, cfg, **kw)
    return E.embed(features, method, **kw)


def _quality(features, xy, labels, cfg, of, method, layer):
    from pipeline.analysis import embedding as E

    return {"layer": layer, "of": of, "method": method, "n_points": len(xy),
            "fallback": len(xy) < E.MIN_POINTS,
            "trustworthiness": E.trustworthiness_sampled(features, xy, random_state=cfg.seed),
            "knn_accuracy": E.knn_accuracy(xy, labels, random_state=cfg.seed) if labels is not None else np.nan}


def embed_layer(acts, layer, labels, cfg, advance=None):
    """All configured embeddings of one layer: (image rows, neuron rows, quality rows).

    ``advance(1)`` (optional) is called after each map.
    """
    from pipeline.analysis import embedding as E

    e = cfg.embed
    images, neurons, quality = [], [], []
    if "images" in e.of:
        feats = E.prepare_features(acts, pca=e.pca, random_state=cfg.seed)
        # A layer whose units are all constant or NaN gives no features: nothing to embed.
        methods = e.methods if feats.shape[1] else []
        for method in methods:
            xy = _embed_one(feats, method, cfg)
            images.append(E.image_embedding_table(layer, method, xy))
            quality.append(_quality(feats, xy, labels, cfg, "images", method, layer))
            if advance is not None:
                advance(1)
    if "neurons" in e.of:
        profiles, keep = E.neuron_features(acts, random_state=cfg.seed)
        channels = np.flatnonzero(keep)
        if len(channels):
            # Rows are already z-scored per unit: Euclidean distance then tracks correlation,
            # which re-standardising the image columns would distort.
            feats = E.prepare_features(profiles[keep], pca=e.pca, random_state=cfg.seed, standardize=False)
            for method in e.methods:
                xy = _embed_one(feats, method, cfg)
                neurons.append(E.neuron_embedding_table(layer, method, xy, channels))
                quality.append(_quality(feats, xy, None, cfg, "neurons", method, layer))
                if advance is not None:
                    advance(1)
    return images, neurons, quality


def run(ctx):
    from pipeline.analysis import embedding as E
    from pipeline.progress import progress

    cfg, store = ctx.cfg, ctx.store
    root, names, infos = open_activations(store)
    labels = ctx.catalog.read("dataset")["label"].to_numpy()
    n_images = len(labels)
    labels = labels if (labels >= 0).any() else None
    if "umap" in cfg.embed.methods:
        took = E.warm_up_umap(approximate=min(n_images, cfg.embed.max_fit) >= E.UMAP_EXACT_BELOW)
        ctx.log(f"embed: UMAP start-up (numba compilation, once per process) took {took:.1f} s")
    images, neurons, quality = [], [], []
    per_layer = len(cfg.embed.methods) * (("images" in cfg.embed.of) + ("neurons" in cfg.embed.of))
    bar = progress(total=len(names) * per_layer, unit="maps", desc="embed")
    for layer in names:
        bar.set_postfix_str(layer)
        # Pooled activations (N, C) fit in memory; the per-image maps never are loaded here.
        acts = np.asarray(layer_array(root, infos[layer], "mean")[:], dtype=np.float32)
        im, ne, q = embed_layer(acts, layer, labels, cfg, advance=bar.update)
        bar.update(per_layer - len(q))  # maps not made (constant units): counted as done
        if not im and not ne:
            ctx.log(f"embed: {layer}: every unit is constant or NaN; nothing to embed, skipped")
        images += im
        neurons += ne
        quality += q
        for row in q:
            ctx.log(f"embed: {layer} {row['of']} {row['method']}: trustworthiness "
                    f"{row['trustworthiness']:.3f}" + (f", kNN accuracy {row['knn_accuracy']:.3f}"
                                                        if np.isfinite(row["knn_accuracy"]) else ""))
        if len(acts) < E.MIN_POINTS:
            ctx.log(f"embed: only {len(acts)} images: t-SNE/UMAP need at least {E.MIN_POINTS}; "
                    "stored a PCA layout instead (marked fallback)")
    bar.close()
    return Outputs({"image_embeddings": _concat(images, ["layer", "method", "index", "x", "y"]),
                    "neuron_embeddings": _concat(neurons, ["layer", "method", "channel", "x", "y"]),
                    "embedding_quality": pd.DataFrame(quality)},
                   {"layers": len(names), "methods": list(cfg.embed.methods)})


def _concat(frames, columns):
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


STAGE = Stage(name="embed", deps=("extract",), params=_params,
              outputs=("image_embeddings", "neuron_embeddings", "embedding_quality"),
              run=run, version="1")
