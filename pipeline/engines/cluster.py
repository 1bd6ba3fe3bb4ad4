"""The Dask engine: one client per process, and row blocks whose passes run on the cluster.

``engine: dask`` runs the heavy stages on Dask distributed instead of in this process:

- **extract** (:mod:`pipeline.engines.dask_extract`): the dataset is split into shards, the extract
  stage's chunk groups; every worker loads the model once and writes its shards straight into
  ``activations.zarr.partial``.
- **cluster**: :func:`row_blocks` gives the statistics code (:mod:`pipeline.analysis.neurons`) row blocks
  that fit one accumulator per block on the workers and merge them here in row order; the
  bootstrap runs its resamples in parallel passes. CKA between layers
  (:class:`pipeline.analysis.layerstats.MinibatchCKA`) reads a bounded row sample and runs here, as on the
  local engine.
- **embed** (:mod:`pipeline.engines.dask_embed`): the map is fitted on a sample here, the rest placed in
  parallel chunks on the workers.

Every one of these gives bit-for-bit the arrays and tables of the local engine: shards are the
local engine's chunk groups (same batches, same padding), row blocks are the local engine's
chunks, and partial results are merged in the order the local engine accumulates them.

``workers: N`` (no ``scheduler``) starts a ``LocalCluster`` of N single-threaded worker
processes; ``scheduler: ADDRESS`` joins an existing cluster. The run directory, the model and the
images must then be at the same paths on every machine (shared storage).
"""
from __future__ import annotations

import logging
import math
import os
from collections import deque

import numpy as np

from pipeline.backend.tf import TF_ENV

#: Set in every worker process before TensorFlow can be imported (see DESIGN.md on oneDNN).
WORKER_ENV = dict(TF_ENV)

#: Rows per block of the statistics passes: the local engine's chunk size (``chunker``), so the
#: partial results are the ones the local engine accumulates.
BLOCK_ROWS = 4096

_ACTIVE = {}  # the process's client: {"key": (scheduler, workers), "client": Client, "cluster": LocalCluster}


def default_workers() -> int:
    """Worker processes of a LocalCluster when ``workers`` is not given: the cores, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def client_for(cfg):
    """The Dask client for ``cfg``'s engine keys, started (or connected) on first use.

    One client per process, shared by the stages of a run; :func:`close_client` ends it (and the
    LocalCluster it started). With ``scheduler`` set this joins that cluster; otherwise it starts
    a LocalCluster of ``workers`` processes, one thread each, with :data:`WORKER_ENV` set.
    """
    key = (cfg.scheduler, cfg.workers)
    if _ACTIVE.get("key") == key and _ACTIVE["client"].status == "running":
        return _ACTIVE["client"]
    close_client()
    client, cluster = _connect(cfg.scheduler, cfg.workers)
    _ACTIVE.update(key=key, client=client, cluster=cluster)
    return client


def _connect(scheduler, workers):
    from distributed import Client, LocalCluster

    from pipeline.errors import UserError

    if scheduler:
        try:
            return Client(scheduler), None  # waits distributed.comm.timeouts.connect (30 s)
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    cluster = LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                           env=dict(WORKER_ENV), dashboard_address=None, silence_logs=logging.ERROR)
    return Client(cluster), cluster


def close_client() -> None:
    """Close this process's client, and the LocalCluster it started (not a cluster it joined)."""
    client, cluster = _ACTIVE.pop("client", None), _ACTIVE.pop("cluster", None)
    _ACTIVE.clear()
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def describe(client) -> str:
    """``"2 Dask workers (local cluster)"`` or ``"… at tcp://host:8786"`` for the progress log."""
    n = n_workers(client)
    where = "local cluster" if _ACTIVE.get("cluster") is not None else f"scheduler {client.scheduler.address}"
    return f"{n} Dask worker{'s' * (n != 1)} ({where})"


def n_workers(client) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


def ordered(submit, count, window):
    """Results of ``submit(i).result()`` for ``i`` in ``range(count)``, in order.

    At most ``window`` tasks are in flight, so the memory held by finished, not yet consumed
    results stays bounded however many tasks there are; the cluster keeps working on the
    others while the caller waits for the next one in order.
    """
    pending, submitted = deque(), 0
    while submitted < min(window, count):
        pending.append(submit(submitted))
        submitted += 1
    while pending:
        future = pending.popleft()
        result = future.result()
        future.release()
        if submitted < count:
            pending.append(submit(submitted))
            submitted += 1
        yield result


# --------------------------------------------------------------------------- statistics


def row_blocks(client):
    """A drop-in for :func:`pipeline.storage.arrays.chunker` whose passes run on ``client``."""
    def make(arrays, rows=BLOCK_ROWS):
        return RowBlocks(client, arrays, rows)

    return make


class RowBlocks:
    """Row blocks of one or several stored arrays, with passes that run on a Dask cluster.

    Called, it is exactly ``chunker(arrays, rows)``: an iterator over float32 blocks read here.
    The statistics code also finds two methods on it (see :func:`pipeline.analysis.neurons.fold`):

    ``reduce(new, update)``
        Fits a fresh accumulator per block on the workers (``new()``, or ``first.empty_like()``
        once the first block's is known, for accumulators that must share its state) and
        merges them here with ``merge`` in row order: bit-for-bit the sequential pass.
    ``map_passes(fn, items, group)``
        Runs ``fn(chunks, sublist)`` over contiguous sublists of ``items`` (at most ``group``
        long, and at least one per worker) on the workers, each a whole pass over the blocks;
        yields the results in item order.

    Workers read the blocks themselves (zarr arrays pickle as their path), so the store must be
    on storage they share.
    """

    def __init__(self, client, arrays, rows=BLOCK_ROWS):
        self.client, self.arrays, self.rows = client, arrays, int(rows)
        first = arrays[0] if isinstance(arrays, (list, tuple)) else arrays
        self.n = int(first.shape[0])

    def __call__(self):
        from pipeline.storage.arrays import chunker

        return chunker(self.arrays, self.rows)()

    @property
    def starts(self):
        return range(0, self.n, self.rows)

    def _window(self):
        return 2 * n_workers(self.client) + 1

    def reduce(self, new, update):
        starts = list(self.starts)
        if not starts:
            return new()
        # Shipped once per worker, not once per task.
        [payload] = self.client.scatter([(self.arrays, self.rows, new, update)], hash=False)
        first = self.client.submit(_fit_block, payload, starts[0], None, pure=False).result()
        template = first.empty_like() if hasattr(first, "empty_like") else None
        [template_f] = self.client.scatter([template], hash=False)
        acc = new().merge(first)

        def submit(i):
            return self.client.submit(_fit_block, payload, starts[i + 1], template_f, pure=False)

        for part in ordered(submit, len(starts) - 1, self._window()):
            acc.merge(part)
        return acc

    def map_passes(self, fn, items, group):
        items = list(items)
        if not items:
            return
        count = max(math.ceil(len(items) / max(1, group)), min(len(items), n_workers(self.client)))
        pieces = [p.tolist() for p in np.array_split(np.arange(len(items)), count)]
        [payload] = self.client.scatter([(self.arrays, self.rows, fn)], hash=False)
        futures = [self.client.submit(_run_pass, payload, [items[i] for i in piece], pure=False)
                   for piece in pieces]
        for future in futures:  # in order; the client holds one piece's results at a time
            yield from future.result()
            future.release()


def _read_block(arrays, rows, start):
    """The block the local chunker yields at ``start`` (float32, one array or a list)."""
    if isinstance(arrays, (list, tuple)):
        return [np.asarray(a[start:start + rows], dtype=np.float32) for a in arrays]
    return np.asarray(arrays[start:start + rows], dtype=np.float32)


def _fit_block(payload, start, template):
    arrays, rows, new, update = payload
    acc = new() if template is None else template.empty_like()
    update(acc, _read_block(arrays, rows, start), start)
    return acc


def _run_pass(payload, items):
    from pipeline.storage.arrays import chunker

    arrays, rows, fn = payload
    return list(fn(chunker(arrays, rows), items))
