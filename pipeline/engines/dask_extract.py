"""The extract stage on Dask: shards of the dataset run on workers that write ``activations.zarr``.

The client (this process) does what the local engine does before and after the batch loop: it
scans the dataset, writes ``dataset.parquet``/``skipped.csv``, creates every array of
``activations.zarr.partial`` and, at the end, records the non-finite counts and publishes the
store. It never imports TensorFlow: the model is loaded on the workers only (one of them
describes its layers and outputs first), so a GPU machine's client takes no device memory.

A shard is a run of consecutive chunk groups of the local engine (each group whole batches and
one stored chunk), so two shards never write the same zarr chunk and the arrays are bit-for-bit
the local engine's (same batch boundaries, last batch padded the same way). A worker keeps the
loaded model and the compiled forward pass for the whole run (a per-process cache) and streams
its shard's groups like the local engine, writing an atomic done marker
``extract.shards/<group>.json`` after each group's chunks; the client folds the markers into
``extract.progress.json`` as shards finish (it is the only writer of that file). A rerun skips
the groups with markers; a worker that dies mid-shard has its shard rerun elsewhere by Dask,
which skips the groups already marked and rewrites the others from scratch.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline.config import hash_json
from pipeline.storage.catalog import Catalog, path as artifact_path

SHARDS = artifact_path("extract_shards")

_SESSIONS = {}  # per worker process: the loaded model of the current run (one entry)


def marker(group) -> str:
    return f"{SHARDS}/{int(group):06d}.json"


# --------------------------------------------------------------------------- client side


def run(ctx):
    """The extract stage's ``run`` for ``engine: dask``; returns the same summary as the local one."""
    from distributed import as_completed

    from pipeline.engines import cluster as distributed
    from pipeline.storage.arrays import ensure_array
    from pipeline.progress import progress as progress_bar
    from pipeline.extraction import plan as X
    from pipeline.extraction.steps import begin, dataset_of, finish
    from pipeline.extraction.tuning import default_record, resolved, reused_line

    cfg, store = ctx.cfg, ctx.store
    client = distributed.client_for(cfg)
    job = _job(cfg, store)
    inputs = X.input_hashes(cfg)  # a listing of every image: once
    model_key = hash_json({"params": X.extract_params(cfg), "inputs": inputs, "model": job["config"]["model"]})
    info = _describe_on_every_worker(client, job, model_key)
    devices = info["devices"]
    ctx.log(f"extract: running on {distributed.describe(client)}; a worker sees "
            f"{', '.join(devices) if devices else 'CPU only (no GPU visible to TensorFlow)'}")
    for note in info.get("notes", ()):
        ctx.log(f"extract: {note}")
    names, kinds, size, channels = info["names"], info["kinds"], tuple(info["size"]), info["channels"]
    plan = hash_json({"params": X.extract_params(cfg), "inputs": inputs, "layers": names})

    progress = store.read_json(X.PROGRESS, default={})
    if progress.get("plan") != plan or not store.exists(X.ZARR + ".partial"):
        store.remove(SHARDS)
        progress = begin(ctx, plan, size, channels)
    _adopt_markers(store, progress, _stamp(plan, progress))
    n = len(dataset_of(ctx))
    record = progress.get("compute") or default_record(cfg)
    if record is None:  # batch_size auto / compute.xla: decided once, on a worker, then kept
        record, lines = client.submit(tune_on_worker, job, model_key, n, pure=False).result()
        for line in lines:
            ctx.log(line)
    elif reused_line(cfg, record):
        ctx.log(reused_line(cfg, record))
    progress["compute"] = record
    cfg = resolved(cfg, record)  # what the workers run: numbers, on/off
    ctx, job, ex = replace(ctx, cfg=cfg), _job(cfg, store), cfg.extract
    fresh = not progress["done"]
    if fresh:  # arrays recreated: markers for the old ones (a killed client's tasks may still run) don't count
        progress["store"] = uuid.uuid4().hex[:12]
        store.write_json(X.PROGRESS, progress)
    stamp = _stamp(plan, progress)
    model = SimpleNamespace(layers=info["layers"], name=info["name"])
    root = X.open_arrays(ctx, model, names, kinds, n, size, channels, fresh=fresh)
    rows = X.chunk_rows(ex)
    for key, (row_shape, dtype) in info["extra_arrays"].items():  # created up front: workers never create arrays
        ensure_array(root, key, n, tuple(row_shape), rows, dtype)

    groups = X.chunk_groups(n, ex)
    done = set(progress["done"])
    todo = [g for g in range(len(groups)) if g not in done]
    bar = progress_bar(total=n, initial=n - sum(groups[g][1] - groups[g][0] for g in todo), unit="img",
                       desc="extract")
    futures = [client.submit(extract_shard, job, model_key, shard, stamp, pure=False)
               for shard in shards(todo, distributed.n_workers(client))]
    saved = time.monotonic()
    try:
        for future in as_completed(futures):
            for group, bad in future.result():
                _record(progress, group, bad)
                bar.update(groups[group][1] - groups[group][0])
            future.release()
            if time.monotonic() - saved > 1.0:
                store.write_json(X.PROGRESS, progress)
                saved = time.monotonic()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        store.write_json(X.PROGRESS, progress)
        bar.close()
    client.run(drop_sessions)

    store.remove(SHARDS)
    return finish(ctx, root, progress, names, n)


def shards(todo, workers, most=8) -> list[list[int]]:
    """Runs of consecutive chunk groups, one task each: about 4 per worker, at most ``most`` groups.

    A task streams its groups like the local engine (the next group is computed while the last one
    is written), so the per-task start and the last write are paid once per run of groups; the
    runs stay short enough to balance the workers and to make a lost worker's redo small.
    """
    size = max(1, min(most, -(-len(todo) // (4 * max(1, workers)))))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _describe_on_every_worker(client, job, model_key) -> dict:
    """Every worker loads the model now, in parallel (and while the client scans the images);
    the first one to finish describes the layout."""
    from distributed import as_completed

    workers = list(client.scheduler_info().get("workers", {})) or [None]
    futures = [client.submit(describe_model, job, model_key, workers=[w] if w else None,
                             allow_other_workers=True, pure=False) for w in workers]
    try:
        return next(iter(as_completed(futures))).result()
    finally:
        for future in futures:
            future.release()


def _job(cfg, store) -> dict:
    """What a worker needs to know: the config with absolute paths, the run directory, our cwd."""
    raw = cfg.model_dump(mode="json")
    raw["model"] = os.path.abspath(raw["model"])
    for key in ("images", "npz"):
        if raw["data"][key]:
            raw["data"][key] = os.path.abspath(raw["data"][key])
    return {"config": raw, "out": str(Path(store.root).resolve()), "cwd": os.getcwd()}


def _stamp(plan, progress) -> str:
    """What a done marker must carry to count: the plan and the generation of the partial store."""
    return f"{plan}/{progress.get('store', '')}"


def _record(progress, group, bad):
    progress["done"].append(int(group))
    for k, v in bad.items():
        progress["nonfinite"][k] = progress["nonfinite"].get(k, 0) + int(v)


def _adopt_markers(store, progress, stamp):
    """Fold in shards finished by workers after the client last saved progress (it was killed)."""
    folder = store.path(SHARDS)
    if not folder.is_dir():
        return
    done = set(progress["done"])
    for path in sorted(folder.glob("*.json")):
        try:
            rec = store.read_json(f"{SHARDS}/{path.name}")
            group = int(path.stem)
        except (ValueError, OSError):
            continue  # a foreign or unreadable file: the shard is simply redone
        if rec.get("stamp") == stamp and group not in done:
            _record(progress, group, rec["bad"])
            done.add(group)


# --------------------------------------------------------------------------- worker side


def _session(job, model_key):
    """This worker's model, layers and compiled forward pass for the run; loaded once per process."""
    from pipeline.backend.tf import set_env

    set_env()  # before anything imports TensorFlow
    sess = _SESSIONS.get(model_key)
    if sess is not None:
        return sess
    drop_sessions()
    from pipeline.config import Config
    from pipeline.inputs.autolayers import choose
    from pipeline.inputs.models import load_model
    from pipeline.extraction import plan as X
    from pipeline.backend.tf import gpus

    cfg = Config.model_validate(job["config"])
    notes = []  # the precision's one-line notes: the client prints them (describe_model)
    model = load_model(cfg.model, cfg.trust_model, cfg.compute.precision, notes.append)
    size, channels = X.input_geometry(model, cfg.data)
    names = [n for n, _ in choose(model, cfg.layers)]
    kinds = X.layer_kinds(model, names)
    sess = SimpleNamespace(cfg=cfg, model=model, names=names, kinds=kinds, size=size, channels=channels,
                           runners={}, devices=gpus(),
                           data=None, notes=notes)
    _SESSIONS[model_key] = sess
    return sess


def _runner(sess, cfg):
    """The compiled batch runner for ``cfg``'s (resolved) batch size and XLA choice, kept per worker."""
    from pipeline.extraction import plan as X

    key = (cfg.extract.batch_size, cfg.compute.xla)
    if key not in sess.runners:
        sess.runners[key] = X.batch_runner(cfg, sess.model, sess.names, sess.kinds, sess.size)
    return sess.runners[key]


def tune_on_worker(job, model_key, n):
    """``extract.batch_size: auto`` / ``compute.xla`` decided on a worker's device: ``(record, log lines)``."""
    from pipeline.extraction.tuning import decide

    sess = _session(job, model_key)
    lines = []
    record, _ = decide(sess.cfg, sess.model, sess.names, sess.kinds, sess.size, sess.channels, n, lines.append)
    return record, lines


def drop_sessions():
    """Forget the cached model (run on every worker when extraction ends, to free its memory)."""
    _SESSIONS.clear()


def describe_model(job, model_key) -> dict:
    """Load the model on a worker and say what the client needs to lay out the store."""
    from pipeline.config import batch_or
    from pipeline.extraction.tuning import resolved

    sess = _session(job, model_key)
    bs = min(batch_or(sess.cfg.extract.batch_size, 64), 64)  # only shapes are needed: a large batch_size must not cost memory here
    run_batch = _runner(sess, resolved(sess.cfg, {"batch_size": bs, "xla": False}))
    arrays, _ = run_batch(np.zeros((bs, *sess.size, sess.channels), np.uint8), 0, bs)
    extra = {k: (list(arrays[k].shape[1:]), "float32" if k == "logits" else "uint8")
             for k in ("logits", "thumbnails") if k in arrays}
    return {"layers": list(sess.model.layers), "name": sess.model.name, "names": sess.names,
            "kinds": sess.kinds, "size": list(sess.size), "channels": sess.channels,
            "extra_arrays": extra, "devices": sess.devices, "notes": sess.notes}


def _shard_data(job, sess, cfg, stamp):
    """The dataset table and pixel loader of the run (re-read when ``dataset.parquet`` changes)."""
    from pipeline.inputs.dataset import pixel_loader
    from pipeline.extraction import plan as X
    from pipeline.storage.store import RunStore

    store = RunStore(job["out"])
    stamp = (job["out"], stamp, Catalog(store).path("dataset").stat().st_mtime_ns, cfg.extract.batch_size)
    if sess.data is None or sess.data.stamp != stamp:
        dataset = Catalog(store).read("dataset")
        if "path" in dataset and not sess.cfg.data.npz:  # relative to the client's working directory
            dataset["path"] = [p if os.path.isabs(p) else os.path.join(job["cwd"], p) for p in dataset["path"]]
        load = pixel_loader(cfg.data, dataset, sess.size, sess.channels)
        sess.data = SimpleNamespace(stamp=stamp, n=len(dataset), load=load,
                                    groups=X.chunk_groups(len(dataset), cfg.extract))
    return sess.data


def extract_shard(job, model_key, groups, stamp):
    """Extract a shard (a run of chunk groups) into the partial store.

    Returns ``[(group, non-finite counts), ...]``. Idempotent: groups with a done marker of this
    plan and store (``stamp``) are skipped, the others are rewritten whole, each marked done once
    its chunks are on disk.
    """
    import zarr

    from pipeline.extraction.loop import ChunkWriter, stream_groups
    from pipeline.extraction import plan as X
    from pipeline.storage.store import RunStore

    from pipeline.config import Config

    sess = _session(job, model_key)
    cfg = Config.model_validate(job["config"])  # batch size and XLA resolved by the client
    store = RunStore(job["out"])
    results, todo = {}, []
    for group in groups:
        rec = store.read_json(marker(group))
        if rec and rec.get("stamp") == stamp:
            results[group] = rec["bad"]
        else:
            todo.append(group)
    if todo:
        data = _shard_data(job, sess, cfg, stamp)
        root = zarr.open_group(str(store.path(X.ZARR + ".partial")), mode="r+")

        def record(g, bad):  # in the writer thread, once the group's chunks are all on disk
            bad = {k: int(v) for k, v in bad.items()}
            store.write_json(marker(g), {"stamp": stamp, "bad": bad})
            results[g] = bad

        # The local engine's loop (pipeline.extraction.loop), only the record of a finished group differs.
        writer = ChunkWriter(root, record, data.n, X.chunk_rows(cfg.extract))
        stream_groups(_runner(sess, cfg), data.load, data.groups, todo, data.n, cfg.extract.batch_size, writer)
    return [(g, results[g]) for g in groups]
