"""The batch loop of extraction, one for both engines: load ahead, run the device, write behind.

Three things run at once, each in its own thread, so the device never waits on the other two:

- a loader thread reads (and, for image folders, decodes) the next batches, at most ``depth``
  ahead of the device (:func:`prefetched`);
- the calling thread runs the compiled forward pass of the current batch (``run_batch``);
- a writer thread compresses and stores the previous chunk group (:class:`ChunkWriter`).

The local extract stage and the Dask workers both call :func:`stream_groups`; only what they
record when a group is on disk differs (the progress file, or a per-shard done marker). Nothing
here imports TensorFlow: ``run_batch`` brings the device.
"""
from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class BatchRunner:
    """``runner(pixels, start, n) -> (arrays, bad)``: one batch through the compiled forward pass.

    Split in two so that only the device work is on the critical path: :meth:`prepare` (host
    side: pad, sample spatial positions, take thumbnails that need no resizing) runs in the
    loader thread, :meth:`run` (the forward pass and its copy back) in the caller's.

    Parameters
    ----------
    forward : callable
        ``forward(pixels, positions, valid) -> (arrays, bad)``, as :func:`pipeline.extraction.forward.make_forward`.
    batch_size : int
        A batch is padded to ``min(batch_size, n)`` rows, so the compiled graph is traced once
        and never for more rows than there are images.
    positions : callable, optional
        ``positions(start, rows) -> [(rows, k, 2) int32 per map layer]``: spatial samples.
    position_keys : list of str
        Array name of each map layer's positions (``<layer>/spatial_pos``).
    thumbnails_as_is : bool
        The thumbnails are the input pixels (thumbnail size = input size; an area resize to the
        same size is the identity), so they are taken on the host and ``forward`` makes none.
    """

    def __init__(self, forward, batch_size, positions=None, position_keys=(), thumbnails_as_is=False):
        self.forward, self.batch_size = forward, batch_size
        self.positions, self.position_keys = positions, list(position_keys)
        self.thumbnails_as_is = thumbnails_as_is

    def prepare(self, pixels, start, n):
        """Host work for the batch of rows ``start...``: ``(padded pixels, positions, valid, host arrays)``."""
        valid, target = len(pixels), min(self.batch_size, n)
        host = {"thumbnails": pixels} if self.thumbnails_as_is else {}
        if valid < target:
            pixels = np.concatenate([pixels, np.zeros((target - valid, *pixels.shape[1:]), pixels.dtype)])
        positions = self.positions(start, len(pixels)) if self.positions else []
        for key, pos in zip(self.position_keys, positions):
            host[key] = pos[:valid]
        return pixels, positions, valid, host

    def run(self, prepared):
        """The forward pass of a prepared batch; its arrays (``valid`` rows) and non-finite counts."""
        pixels, positions, valid, host = prepared
        arrays, bad = self.forward(pixels, positions, valid)
        arrays.update(host)
        return arrays, bad

    def __call__(self, pixels, start, n):
        return self.run(self.prepare(pixels, start, n))


def batch_plan(groups, todo, batch_size) -> list[tuple[int, int, int]]:
    """``(group, start, stop)`` rows of every batch of the chunk groups ``todo``, in order.

    Parameters
    ----------
    groups : list of (int, int)
        ``(start, stop)`` rows of every chunk group (whole batches, one stored chunk each).
    todo : list of int
        The groups to run.
    batch_size : int
    """
    return [(g, start, min(start + batch_size, groups[g][1]))
            for g in todo for start in range(groups[g][0], groups[g][1], batch_size)]


def prefetched(items, load, depth=2):
    """Yield ``(item, load(item))`` for each item, loading in one background thread.

    Parameters
    ----------
    items : iterable
    load : callable
        Runs in the loader thread; an exception it raises is raised here, at its item.
    depth : int
        Loads started ahead of the item being consumed. Memory holds at most ``depth + 1``
        loaded items; one thread keeps the loads in order and off the consumer's cores
        (decoding fans out further inside ``load`` where it is worth it).

    Notes
    -----
    Leaving the loop early (an error downstream, ``break``) cancels the loads not started and
    waits for the one running, so no thread outlives the loop.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="extract-loader")
    pending = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) > depth:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def create_array(root, key, shape, rows, dtype):
    """Create ``root[key]`` of ``shape`` in chunks of ``rows`` rows, the way every extracted array is stored.

    Zstandard level 1, not zarr's default level 3: on real activations and thumbnails it keeps
    all but 1-2 % of the compression (ratios 1.16 vs 1.18 on ResNet50 activations, 1.38 vs 1.38
    on MobileNetV2 thumbnails) at 1.15-3x the speed, and on a CPU compression takes its time
    from the forward pass.
    """
    import zarr

    return root.create_array(key, shape=shape, chunks=(rows, *shape[1:]), dtype=dtype, fill_value=0,
                             compressors=zarr.codecs.ZstdCodec(level=1))


def ensure_array(root, key, n, row_shape, rows, dtype):
    """Create ``root[key]`` (``n`` rows, chunks of ``rows``) unless it exists."""
    if key not in root:
        create_array(root, key, (n, *row_shape), rows, dtype)


def writable(array):
    """``array`` set to store every chunk as given.

    By default zarr compares each chunk with the fill value first, to skip storing empty ones:
    a full extra pass over the data (a quarter of a chunk write's CPU time). Extracted chunks
    are almost never all zero, and storing one that is gives the same values on reading.
    """
    with_config = getattr(array, "with_config", None)  # zarr >= 3.1; older: the default, just slower
    return with_config({"write_empty_chunks": True}) if with_config else array


class ChunkWriter:
    """Stores finished chunk groups in a background thread, then records each one.

    One group is in flight at a time: the device computes the next group while the previous
    one is concatenated, compressed and stored, its arrays two at a time (the last group of a run
    or of a Dask shard is written while the device waits: both cores then serve it).
    ``record(group, bad)`` runs in the writer thread only after all of the group's arrays are on
    disk, so a killed run never counts a half-written chunk.

    Parameters
    ----------
    root : zarr.Group
        The partial store. Arrays missing from it (``logits``, ``thumbnails``: their width is
        known only after the first batch) are created on their first write, ``n`` rows in
        chunks of ``rows``.
    record : callable
        ``record(group, bad)``, e.g. writes the progress file or a Dask shard's done marker.
    n, rows : int
    """

    def __init__(self, root, record, n, rows):
        self.root, self.record, self.n, self.rows = root, record, n, rows
        self.handles = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="extract-writer")
        self.stores = ThreadPoolExecutor(2, thread_name_prefix="extract-store")
        self.pending = None

    def submit(self, group, start, parts, bad):
        """Queue group ``group`` (``parts``: key -> list of per-batch arrays) for writing at row ``start``."""
        self.wait()  # a write error surfaces at the next group, not at the end of the run
        self.pending = self.pool.submit(self._write, group, start, parts, dict(bad))

    def _write(self, group, start, parts, bad):
        values = {key: pieces[0] if len(pieces) == 1 else np.concatenate(pieces) for key, pieces in parts.items()}
        handles = [self._handle(key, value) for key, value in values.items()]  # creation stays sequential

        def store(handle, value):
            handle[start:start + len(value)] = value

        list(self.stores.map(store, handles, values.values()))  # re-raises the first error
        self.record(group, bad)

    def _handle(self, key, value):
        if key not in self.handles:  # one zarr lookup per array per run, not per chunk
            ensure_array(self.root, key, self.n, value.shape[1:], self.rows, value.dtype)
            self.handles[key] = writable(self.root[key])
        return self.handles[key]

    def wait(self):
        """Block until the write in flight (if any) is on disk and recorded."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self):
        """Finish the last write, then stop the thread (also after an error: nothing half-recorded)."""
        try:
            self.wait()
        finally:
            self.pool.shutdown()
            self.stores.shutdown()


def stream_groups(run_batch, load, groups, todo, n, batch_size, writer, advance=None):
    """Run every batch of the chunk groups ``todo`` and hand each finished group to ``writer``.

    Parameters
    ----------
    run_batch : BatchRunner
        Its ``prepare`` runs in the loader thread, its ``run`` in this one.
    load : callable
        ``load(rows) -> uint8 (B, H, W, C)`` for dataset positions ``rows``; runs in the loader thread.
    groups : list of (int, int)
        ``(start, stop)`` rows of every chunk group.
    todo : list of int
        Groups to run, in order.
    n : int
        Images in the dataset.
    batch_size : int
    writer : ChunkWriter
    advance : callable, optional
        Called with the number of images after each batch (a progress bar).
    """
    def load_batch(item):  # in the loader thread
        _, start, stop = item
        return run_batch.prepare(load(np.arange(start, stop)), start, n)

    parts, bad_total = {}, {}
    # closing(): an error in this loop stops the loader at once, not when the traceback is freed.
    with contextlib.closing(prefetched(batch_plan(groups, todo, batch_size), load_batch)) as batches:
        for (g, start, stop), prepared in batches:
            arrays, bad = run_batch.run(prepared)
            for key, value in arrays.items():
                parts.setdefault(key, []).append(value)
            for k, v in bad.items():
                bad_total[k] = bad_total.get(k, 0) + v
            if advance is not None:
                advance(stop - start)
            if stop == groups[g][1]:
                writer.submit(g, groups[g][0], parts, bad_total)
                parts, bad_total = {}, {}
