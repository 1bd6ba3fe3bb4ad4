"""Extract stage, runner side: plan the batches, stream them through the device, store chunks.

Arrays are built in ``activations.zarr.partial`` one batch-aligned chunk at a time; each
finished batch is recorded in ``extract.progress.json`` *after* its chunks are written. A killed
run resumes with the batches not recorded (rewriting any half-written chunk), and the store is
renamed to ``activations.zarr`` only when every batch is in.
"""
from __future__ import annotations

import numpy as np

from pipeline.config import hash_json, parse_scale
from pipeline.dataset import build_dataset, pixel_loader
from pipeline.errors import UserError
from pipeline.extraction import BatchRunner, ChunkWriter, create_array, stream_groups
from pipeline.forward import layer_path, make_forward, output_keys, spatial_positions, thumbnail_shape
from pipeline.models import load_model, model_kind
from pipeline.runner import Stage, file_hash, listing_hash

ZARR = "activations.zarr"
PROGRESS = "extract.progress.json"


def _params(cfg):
    return {"data": cfg.data.model_dump(mode="json", exclude={"images", "npz"}),
            "layers": cfg.layers, "extract": cfg.extract.model_dump(mode="json"), "seed": cfg.seed}


def _inputs(cfg):
    data = cfg.data.npz or cfg.data.images
    from pathlib import Path

    if not Path(data).exists():
        raise UserError(f"data not found: {data}")
    model_kind(cfg.model)
    return {"model": file_hash(cfg.model),
            "data": file_hash(data) if cfg.data.npz else listing_hash(data)}


def input_geometry(model, data_cfg):
    """Model input ``(height, width)`` and channels, with ``data.size``/``data.color`` overrides."""
    h, w, c = model.input_shape
    if data_cfg.size != "auto":
        h, w = data_cfg.size
    if h is None or w is None:
        raise UserError("the model accepts any image size: set data.size: [height, width] in the config")
    if data_cfg.color != "auto":
        c = 1 if data_cfg.color == "grey" else 3
    if c not in (1, 3):
        raise UserError(f"model input has {c} channels: only grey (1) and RGB (3) images are supported "
                        "(set data.color if the model accepts either)")
    return (int(h), int(w)), int(c)


def layer_kinds(model, names) -> dict:
    shapes = {i.name: i.output_shape for i in model.layers}
    return {n: ("map" if len(shapes[n]) == 3 else "vector") for n in names}


def _chosen_layers(ctx, model):
    """The configured layers, each logged with the reason it was chosen."""
    from pipeline.autolayers import choose, summary_line

    choice = choose(model, ctx.cfg.layers)
    ctx.log(f"extract: {summary_line(model.layers, choice, ctx.cfg.layers)}")
    if len(choice) <= 24:  # `layers: all` on a deep model would print hundreds of lines
        for name, why in choice:
            ctx.log(f"  {name}: {why}")
    return [n for n, _ in choice]


def run(ctx):
    if ctx.cfg.engine == "dask":  # shards on Dask workers; same arrays (pipeline.dask_extract)
        from pipeline import dask_extract

        return dask_extract.run(ctx)
    cfg, store = ctx.cfg, ctx.store
    from pipeline.tfsetup import gpus

    model = load_model(cfg.model, cfg.trust_model)
    devices = gpus()
    ctx.log(f"extract: running on {', '.join(devices) if devices else 'CPU (no GPU visible to TensorFlow)'}")
    size, channels = input_geometry(model, cfg.data)
    names = _chosen_layers(ctx, model)
    kinds = layer_kinds(model, names)
    plan = hash_json({"params": _params(cfg), "inputs": _inputs(cfg), "layers": names})

    progress = store.read_json(PROGRESS, default={})
    if progress.get("plan") != plan or not store.exists(ZARR + ".partial"):
        progress = _start(ctx, plan, size, channels)
    dataset = store.read_table("dataset.parquet")
    if len(dataset) == 0:
        raise UserError("no usable images: every input was skipped (see skipped.csv)")

    root = _open_arrays(ctx, model, names, kinds, len(dataset), size, channels, fresh=not progress["done"])
    _stream(ctx, model, names, kinds, dataset, root, progress, size, channels)
    bad = {k: v for k, v in progress["nonfinite"].items() if v}
    root.attrs["nonfinite"] = progress["nonfinite"]
    store.publish_dir(ZARR)
    store.remove(PROGRESS)
    for layer, count in bad.items():
        ctx.log(f"warning: layer {layer} produced {count} NaN/Inf values (stored as they are; "
                "later stages treat affected units as dead)")
    return {"images": int(len(dataset)), "skipped": int(len(store.read_table("skipped.csv"))),
            "layers": names, "nonfinite": bad, "classes": progress["classes"]}


def _start(ctx, plan, size, channels):
    """Fresh start: validate the dataset, write its tables, clear any stale partial arrays."""
    cfg, store = ctx.cfg, ctx.store
    store.discard_partial(ZARR)
    ctx.log("extract: checking images…")
    dataset, skipped, classes = build_dataset(cfg.data, size, channels, cfg.seed)
    store.write_table("dataset.parquet", dataset)
    store.write_table("skipped.csv", skipped)
    if len(skipped):
        ctx.log(f"extract: {len(skipped)} input(s) skipped, reasons in {store.path('skipped.csv')}")
    # Kept with the progress: a resumed run does not list the images again, yet reports the classes.
    progress = {"plan": plan, "done": [], "nonfinite": {}, "classes": classes}
    store.write_json(PROGRESS, progress)
    return progress


def chunk_rows(ex) -> int:
    """Rows per stored chunk: a whole number of batches, about ``extract.chunk_rows``.

    Large chunks keep zarr writes cheap and the file count low; a killed run redoes at most one
    chunk's batches.
    """
    return ex.batch_size * max(1, round(ex.chunk_rows / ex.batch_size))


def _open_arrays(ctx, model, names, kinds, n, size, channels, fresh):
    import zarr

    path = ctx.store.partial_dir(ZARR)
    if not fresh:
        return zarr.open_group(str(path), mode="r+")
    root = zarr.open_group(str(path), mode="w")
    ex = ctx.cfg.extract
    rows = chunk_rows(ex)
    shapes = {i.name: i.output_shape for i in model.layers}
    for layer in names:
        c = shapes[layer][-1] if kinds[layer] == "map" else int(np.prod(shapes[layer]))
        keys = [k for k in output_keys({layer: kinds[layer]}, ex.reduce, ex.spatial_samples) if k != "logits"]
        for key in keys:
            if key.endswith("/spatial"):
                shape, dtype = (n, ex.spatial_samples, c), ex.dtype
            elif key.endswith("/spatial_pos"):
                shape, dtype = (n, ex.spatial_samples, 2), "int32"
            else:
                shape, dtype = (n, c), ex.dtype
            create_array(root, key, shape, rows, dtype)
    root.attrs.update({
        "layers": {l: {"kind": kinds[l], "shape": list(shapes[l]), "path": layer_path(l),
                       "type": next(i.type for i in model.layers if i.name == l)} for l in names},
        "layer_order": names, "reductions": list(ex.reduce), "n_images": n,
        "input_size": list(size), "channels": channels, "scale": ctx.cfg.data.scale,
        "model": model.name, "spatial_samples": ex.spatial_samples,
    })
    return root


def chunk_groups(n, ex) -> list[tuple[int, int]]:
    """``(start, stop)`` rows of every chunk group: one stored chunk, a whole number of batches."""
    rows = chunk_rows(ex)
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def _batch_runner(cfg, model, names, kinds, size):
    """``run_batch(pixels, start, n) -> (arrays, bad)``: the compiled forward pass of one batch.

    A :class:`pipeline.extraction.BatchRunner`. The last batch is padded to the batch size so
    the compiled graph is reused, not retraced; never beyond ``n``, the number of images (6
    images with ``batch_size: 8192`` are one batch of 6).
    """
    ex = cfg.extract
    thumb = thumbnail_shape(size, ex.thumbnail_size) if ex.thumbnail_size else None
    as_is = thumb == tuple(size)  # inputs no larger than thumbnail_size are their own thumbnails
    forward = make_forward(model.build_extractor(names), kinds, ex.reduce, parse_scale(cfg.data.scale),
                           ex.dtype, ex.spatial_samples, None if as_is else thumb)
    maps = [(li, l) for li, l in enumerate(names) if kinds[l] == "map"]
    shapes = {i.name: i.output_shape for i in model.layers}

    def positions(start, rows):  # of the padded batch: every row gets positions, as the graph needs
        return [spatial_positions(cfg.seed, li, range(start, start + rows), shapes[l][0], shapes[l][1],
                                  ex.spatial_samples) for li, l in maps]

    return BatchRunner(forward, ex.batch_size, positions if ex.spatial_samples else None,
                       [f"{layer_path(l)}/spatial_pos" for _, l in maps], thumbnails_as_is=as_is)


def _stream(ctx, model, names, kinds, dataset, root, progress, size, channels):
    from pipeline.progress import progress as progress_bar

    cfg, ex = ctx.cfg, ctx.cfg.extract
    n = len(dataset)
    groups = chunk_groups(n, ex)
    done = set(progress["done"])
    todo = [g for g in range(len(groups)) if g not in done]
    run_batch = _batch_runner(cfg, model, names, kinds, size)
    load = pixel_loader(cfg.data, dataset, size, channels)
    writer = ChunkWriter(root, progress_recorder(ctx.store, progress), n, chunk_rows(ex))
    bar = progress_bar(total=n, initial=n - sum(groups[g][1] - groups[g][0] for g in todo), unit="img",
                       desc="extract")
    try:
        stream_groups(run_batch, load, groups, todo, n, ex.batch_size, writer, bar.update)
    finally:
        writer.close()
        bar.close()


def progress_recorder(store, progress):
    """``record(group, bad)`` for :class:`ChunkWriter`: add the group to ``extract.progress.json``.

    Called in the writer thread once the group's chunks are on disk, so the file never lists a
    group a killed run did not finish.
    """
    def record(group, bad):
        progress["done"].append(group)
        for k, v in bad.items():
            progress["nonfinite"][k] = progress["nonfinite"].get(k, 0) + v
        store.write_json(PROGRESS, progress)

    return record


STAGE = Stage(name="extract", deps=(), params=_params, inputs=_inputs,
              outputs=("dataset.parquet", "skipped.csv", ZARR), run=run, version="1")
