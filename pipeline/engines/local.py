"""The extract stage in this process: the model on this machine's device, batches streamed through it.

Arrays are built in ``activations.zarr.partial`` one batch-aligned chunk group at a time; each
finished group is recorded in ``extract.progress.json`` *after* its chunks are written. A killed
run resumes with the groups not recorded (rewriting any half-written chunk), and the store is
renamed to ``activations.zarr`` only when every group is in.
"""
from __future__ import annotations

from dataclasses import replace

from pipeline.config import hash_json
from pipeline.extraction.loop import ChunkWriter, stream_groups
from pipeline.extraction.plan import (PROGRESS, ZARR, batch_runner, chosen_layers, chunk_groups, chunk_rows,
                                      extract_params, input_geometry, input_hashes, layer_kinds, open_arrays)
from pipeline.extraction.steps import begin, dataset_of, finish
from pipeline.extraction.tuning import decide, default_record, resolved, reused_line
from pipeline.inputs.dataset import pixel_loader
from pipeline.inputs.models import load_model


def run(ctx):
    """The extract stage's ``run`` for ``engine: local``; returns the stage summary."""
    from pipeline.backend.tf import gpus

    cfg, store = ctx.cfg, ctx.store
    model = load_model(cfg.model, cfg.trust_model, cfg.compute.precision, lambda note: ctx.log(f"extract: {note}"))
    devices = gpus()
    ctx.log(f"extract: running on {', '.join(devices) if devices else 'CPU (no GPU visible to TensorFlow)'}")
    size, channels = input_geometry(model, cfg.data)
    names = chosen_layers(ctx, model)
    kinds = layer_kinds(model, names)
    plan = hash_json({"params": extract_params(cfg), "inputs": input_hashes(cfg), "layers": names})

    progress = store.read_json(PROGRESS, default={})
    if progress.get("plan") != plan or not store.exists(ZARR + ".partial") or not _compute_of(ctx, progress):
        progress = begin(ctx, plan, size, channels)
    dataset = dataset_of(ctx)
    record, forward = _compute_of(ctx, progress), None
    if record is None:  # a fresh start: batch size and XLA decided once, then kept
        record, forward = decide(cfg, model, names, kinds, size, channels, len(dataset), ctx.log)
    elif reused_line(cfg, record):
        ctx.log(reused_line(cfg, record))
    if progress.get("compute") != record:
        progress["compute"] = record
        store.write_json(PROGRESS, progress)
    ctx = replace(ctx, cfg=resolved(cfg, progress["compute"]))  # what the loop runs: numbers, on/off
    root = open_arrays(ctx, model, names, kinds, len(dataset), size, channels, fresh=not progress["done"])
    stream(ctx, model, names, kinds, dataset, root, progress, size, channels, forward)
    return finish(ctx, root, progress, names, len(dataset))


def _compute_of(ctx, progress):
    """The recorded batch size and XLA decision of this extraction (a progress file from before
    they were recorded, with a fixed batch size and XLA off, had the config's)."""
    return progress.get("compute") or (default_record(ctx.cfg) if progress.get("plan") else None)


def stream(ctx, model, names, kinds, dataset, root, progress, size, channels, forward=None):
    """Every chunk group not yet done, through the device and onto disk, with a progress bar."""
    from pipeline.progress import progress as progress_bar

    cfg, ex = ctx.cfg, ctx.cfg.extract
    n = len(dataset)
    groups = chunk_groups(n, ex)
    done = set(progress["done"])
    todo = [g for g in range(len(groups)) if g not in done]
    run_batch = batch_runner(cfg, model, names, kinds, size, forward)
    load = pixel_loader(cfg.data, dataset, size, channels)
    writer = ChunkWriter(root, progress_recorder(ctx.store, progress), n, chunk_rows(ex))
    bar = progress_bar(total=n, initial=n - sum(groups[g][1] - groups[g][0] for g in todo), unit="img",
                       desc="extract")
    try:
        stream_groups(run_batch, load, groups, todo, n, ex.batch_size, writer, bar.update)  # closes the writer
    finally:
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
