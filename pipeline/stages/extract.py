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
from pipeline.forward import layer_path, make_forward, output_keys, spatial_positions, thumbnail_shape
from pipeline.models import load_model, model_kind, select_layers
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


def run(ctx):
    cfg, store = ctx.cfg, ctx.store
    from pipeline.tfsetup import gpus

    model = load_model(cfg.model, cfg.trust_model)
    devices = gpus()
    ctx.log(f"extract: running on {', '.join(devices) if devices else 'CPU (no GPU visible to TensorFlow)'}")
    size, channels = input_geometry(model, cfg.data)
    names = select_layers(model.layers, cfg.layers)
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
            "layers": names, "nonfinite": bad}


def _start(ctx, plan, size, channels):
    """Fresh start: validate the dataset, write its tables, clear any stale partial arrays."""
    cfg, store = ctx.cfg, ctx.store
    store.discard_partial(ZARR)
    ctx.log("extract: checking images…")
    dataset, skipped = build_dataset(cfg.data, size, channels, cfg.seed)
    store.write_table("dataset.parquet", dataset)
    store.write_table("skipped.csv", skipped)
    if len(skipped):
        ctx.log(f"extract: {len(skipped)} input(s) skipped, reasons in {store.path('skipped.csv')}")
    progress = {"plan": plan, "done": [], "nonfinite": {}}
    store.write_json(PROGRESS, progress)
    return progress


def _open_arrays(ctx, model, names, kinds, n, size, channels, fresh):
    import zarr

    path = ctx.store.partial_dir(ZARR)
    if not fresh:
        return zarr.open_group(str(path), mode="r+")
    root = zarr.open_group(str(path), mode="w")
    ex = ctx.cfg.extract
    shapes = {i.name: i.output_shape for i in model.layers}
    for layer in names:
        c = shapes[layer][-1] if kinds[layer] == "map" else int(np.prod(shapes[layer]))
        keys = [k for k in output_keys({layer: kinds[layer]}, ex.reduce, ex.spatial_samples) if k != "logits"]
        for key in keys:
            if key.endswith("/spatial"):
                shape, chunks, dtype = (n, ex.spatial_samples, c), (ex.batch_size, ex.spatial_samples, c), ex.dtype
            elif key.endswith("/spatial_pos"):
                shape, chunks, dtype = (n, ex.spatial_samples, 2), (ex.batch_size, ex.spatial_samples, 2), "int32"
            else:
                shape, chunks, dtype = (n, c), (ex.batch_size, c), ex.dtype
            root.create_array(key, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    root.attrs.update({
        "layers": {l: {"kind": kinds[l], "shape": list(shapes[l]), "path": layer_path(l),
                       "type": next(i.type for i in model.layers if i.name == l)} for l in names},
        "layer_order": names, "reductions": list(ex.reduce), "n_images": n,
        "input_size": list(size), "channels": channels, "scale": ctx.cfg.data.scale,
        "model": model.name, "spatial_samples": ex.spatial_samples,
    })
    return root


def _create_logits(root, n, k, batch_size):
    if "logits" not in root:
        root.create_array("logits", shape=(n, k), chunks=(batch_size, k), dtype="float32", fill_value=0)
    return root["logits"]


def _stream(ctx, model, names, kinds, dataset, root, progress, size, channels):
    import tensorflow as tf
    from tqdm import tqdm

    cfg, ex = ctx.cfg, ctx.cfg.extract
    n, bs = len(dataset), ex.batch_size
    batches = [(i, min(i + bs, n)) for i in range(0, n, bs)]
    done = set(progress["done"])
    todo = [b for b, _ in enumerate(batches) if b not in done]
    thumb = thumbnail_shape(size, ex.thumbnail_size) if ex.thumbnail_size else None
    forward = make_forward(model.build_extractor(names), kinds, ex.reduce, parse_scale(cfg.data.scale),
                           ex.dtype, ex.spatial_samples, thumb)
    if thumb is not None and "thumbnails" not in root:
        root.create_array("thumbnails", shape=(n, *thumb, channels), chunks=(bs, *thumb, channels),
                          dtype="uint8", fill_value=0)
    load = pixel_loader(cfg.data, dataset, size, channels)
    maps = [(li, l) for li, l in enumerate(names) if kinds[l] == "map"]
    shapes = {i.name: i.output_shape for i in model.layers}

    def gen():
        for b in todo:
            start, stop = batches[b]
            yield b, load(np.arange(start, stop))

    data = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec((), tf.int64), tf.TensorSpec((None, size[0], size[1], channels), tf.uint8)))
    data = data.prefetch(2)
    bar = tqdm(total=n, initial=n - sum(batches[b][1] - batches[b][0] for b in todo), unit="img",
               desc="extract", disable=None, dynamic_ncols=True)
    for b, pixels in data:
        b = int(b)
        start, stop = batches[b]
        positions = [spatial_positions(cfg.seed, li, range(start, stop), shapes[l][0], shapes[l][1],
                                       ex.spatial_samples) for li, l in maps] if ex.spatial_samples else []
        arrays, bad = forward(pixels, positions)
        for (li, l), pos in zip(maps, positions):
            arrays[f"{layer_path(l)}/spatial_pos"] = pos
        _create_logits(root, n, arrays["logits"].shape[1], bs)
        for key, value in arrays.items():
            root[key][start:stop] = value
        progress["done"].append(b)
        for k, v in bad.items():
            progress["nonfinite"][k] = progress["nonfinite"].get(k, 0) + v
        ctx.store.write_json(PROGRESS, progress)
        bar.update(stop - start)
    bar.close()


STAGE = Stage(name="extract", deps=(), params=_params, inputs=_inputs,
              outputs=("dataset.parquet", "skipped.csv", ZARR), run=run, version="1",
              modules=("pipeline.forward", "pipeline.dataset", "pipeline.images", "pipeline.models",
                       "pipeline.savedmodel"))
