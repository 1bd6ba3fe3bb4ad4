"""The plan of an extraction, the same for both engines: which layers and arrays, how many rows per
chunk and batch, and the compiled per-batch computation.

The local engine (:mod:`pipeline.engines.local`) and the Dask engine
(:mod:`pipeline.engines.dask_extract`) both build their work from these, so their arrays are
bit-for-bit the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import compute_params, parse_scale
from pipeline.errors import UserError
from pipeline.extraction.forward import make_forward, spatial_positions, thumbnail_shape
from pipeline.extraction.loop import BatchRunner
from pipeline.inputs.models import model_kind
from pipeline.storage.arrays import create_array, layer_arrays, layer_path
from pipeline.storage.catalog import path as artifact_path
from pipeline.storage.hashing import file_hash, listing_hash

ZARR = artifact_path("activations")
PROGRESS = artifact_path("extract_progress")


def extract_params(cfg) -> dict:
    """The config values that change the extracted arrays (the extract stage's ``params``).

    ``compute.xla`` changes them only by float rounding; with ``compute.precision`` it is included
    only when not the default (:func:`pipeline.config.compute_params`).
    """
    return {"data": cfg.data.model_dump(mode="json", exclude={"images", "npz"}),
            "layers": cfg.layers, "extract": cfg.extract.model_dump(mode="json"), "seed": cfg.seed,
            **compute_params(cfg)}


def input_hashes(cfg) -> dict:
    """Fingerprints of the model file and the dataset (the extract stage's ``inputs``)."""
    data = cfg.data.npz or cfg.data.images

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
    """``{layer: "map" | "vector"}``: feature maps ``(H, W, C)`` are reduced, vectors kept."""
    shapes = {i.name: i.output_shape for i in model.layers}
    return {n: ("map" if len(shapes[n]) == 3 else "vector") for n in names}


def chosen_layers(ctx, model):
    """The configured layers, each logged with the reason it was chosen."""
    from pipeline.inputs.autolayers import choose, summary_line

    choice = choose(model, ctx.cfg.layers)
    ctx.log(f"extract: {summary_line(model.layers, choice, ctx.cfg.layers)}")
    if len(choice) <= 24:  # `layers: all` on a deep model would print hundreds of lines
        for name, why in choice:
            ctx.log(f"  {name}: {why}")
    return [n for n, _ in choice]


def chunk_rows(ex) -> int:
    """Rows per stored chunk: a whole number of batches, about ``extract.chunk_rows``.

    Large chunks keep zarr writes cheap and the file count low; a killed run redoes at most one
    chunk's batches.
    """
    return ex.batch_size * max(1, round(ex.chunk_rows / ex.batch_size))


def chunk_groups(n, ex) -> list[tuple[int, int]]:
    """``(start, stop)`` rows of every chunk group: one stored chunk, a whole number of batches."""
    rows = chunk_rows(ex)
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def open_arrays(ctx, model, names, kinds, n, size, channels, fresh):
    """``activations.zarr.partial``: reopened to resume, or created with every layer's arrays.

    ``logits`` and ``thumbnails`` are created on their first write (their widths are known
    only then); the root attributes describe the layers for every later reader.
    """
    import zarr

    path = ctx.store.partial_dir(ZARR)
    if not fresh:
        return zarr.open_group(str(path), mode="r+")
    root = zarr.open_group(str(path), mode="w")
    ex = ctx.cfg.extract
    rows = chunk_rows(ex)
    shapes = {i.name: i.output_shape for i in model.layers}
    for layer in names:
        width = shapes[layer][-1] if kinds[layer] == "map" else int(np.prod(shapes[layer]))
        for key, (row_shape, dtype) in layer_arrays(layer, kinds[layer], width, ex.reduce, ex.spatial_samples,
                                                    ex.dtype).items():
            create_array(root, key, (n, *row_shape), rows, dtype)
    root.attrs.update({
        "layers": {l: {"kind": kinds[l], "shape": list(shapes[l]), "path": layer_path(l),
                       "type": next(i.type for i in model.layers if i.name == l)} for l in names},
        "layer_order": names, "reductions": list(ex.reduce), "n_images": n,
        "input_size": list(size), "channels": channels, "scale": ctx.cfg.data.scale,
        "model": model.name, "spatial_samples": ex.spatial_samples,
    })
    return root


def _thumbnail(size, ex):
    """``(thumbnail shape or None, as_is)``: inputs no larger than thumbnail_size are their own thumbnails."""
    thumb = thumbnail_shape(size, ex.thumbnail_size) if ex.thumbnail_size else None
    return thumb, thumb == tuple(size)


def build_forward(cfg, model, names, kinds, size, jit_model=None):
    """The compiled per-batch computation (:func:`pipeline.extraction.forward.make_forward`) of this config.

    ``jit_model`` (XLA for the model part) defaults to ``compute.xla: on``; ``auto`` is decided
    before (:mod:`pipeline.extraction.tuning`) and counts as off here. With ``on`` the summaries
    are XLA-compiled too; otherwise only on a GPU (``make_forward``'s default).
    """
    ex, on = cfg.extract, cfg.compute.xla == "on"
    thumb, as_is = _thumbnail(size, ex)
    return make_forward(model.build_extractor(names), kinds, ex.reduce, parse_scale(cfg.data.scale),
                        ex.dtype, ex.spatial_samples, None if as_is else thumb,
                        jit=True if on else None, jit_model=on if jit_model is None else jit_model)


def batch_runner(cfg, model, names, kinds, size, forward=None):
    """``run_batch(pixels, start, n) -> (arrays, bad)``: the compiled forward pass of one batch.

    A :class:`pipeline.extraction.loop.BatchRunner`. The last batch is padded to the batch size so
    the compiled graph is reused, not retraced; never beyond ``n``, the number of images (6
    images with ``batch_size: 8192`` are one batch of 6). ``extract.batch_size`` must be a number
    here (``auto`` is resolved first: :mod:`pipeline.extraction.tuning`); ``forward`` reuses a
    :func:`build_forward` already compiled (by the start-up probe).
    """
    ex = cfg.extract
    _, as_is = _thumbnail(size, ex)
    forward = forward or build_forward(cfg, model, names, kinds, size)
    maps = [(li, l) for li, l in enumerate(names) if kinds[l] == "map"]
    shapes = {i.name: i.output_shape for i in model.layers}

    def positions(start, rows):  # of the padded batch: every row gets positions, as the graph needs
        return [spatial_positions(cfg.seed, li, range(start, start + rows), shapes[l][0], shapes[l][1],
                                  ex.spatial_samples) for li, l in maps]

    return BatchRunner(forward, ex.batch_size, positions if ex.spatial_samples else None,
                       [f"{layer_path(l)}/spatial_pos" for _, l in maps], thumbnails_as_is=as_is,
                       inflight=inflight())


def inflight() -> int:
    """Batches the extraction loop runs through the compiled forward at once: 2 on a CPU, 1 on a GPU.

    On a CPU one batch leaves cores idle between and inside its layers (small ops, the copies
    back, the loop's own Python): a second batch in flight fills them. Measured on 2 cores,
    mini-ResNet, batch 64: the stage's forward alone went from 0.89x to 0.98x of a bare compiled
    forward run one batch at a time. A GPU runs one graph at a time and the auto batch size
    already fills its memory, which a second batch would need twice.
    """
    from pipeline.backend.autobatch import cpu_only

    return 2 if cpu_only() else 1
