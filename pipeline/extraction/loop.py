"""The batch loop of extraction, one for both engines: load ahead, run the device, write behind.

Three things run at once, in their own threads, so the device never waits on the other two:

- a loader thread reads (and, for image folders, decodes) the next batches, at most ``depth``
  ahead of the device (:func:`prefetched`);
- device threads run the compiled forward pass (``run_batch``), ``run_batch.inflight`` batches
  at once (two on a CPU, one on a GPU), while the calling thread collects their results in
  batch order;
- a writer thread compresses and stores the previous chunk group (:class:`ChunkWriter`).

The local extract stage and the Dask workers both call :func:`stream_groups`; only what they
record when a group is on disk differs (the progress file, or a per-shard done marker). Nothing
here imports TensorFlow: ``run_batch`` brings the device.

:func:`observe` lets a caller (a benchmark, a profiler) see every step of every loop run in this
process while it is inside, without changing what runs: ``with observe(events.append):
Runner(cfg, stages).run(only="extract")``.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from pipeline.storage.arrays import chunk_files, ensure_array, zarr_put


class Event(NamedTuple):
    """One timed step of an extraction loop, as :func:`observe` reports it.

    Attributes
    ----------
    step : str
        ``start`` (the loop begins; ``start == end``), ``load`` (loader thread: read a batch's
        pixels), ``prepare`` (loader thread: padding, spatial positions), ``wait-load`` (the calling
        thread waiting for the loader), ``forward`` (a device thread: the compiled forward pass and
        its copy back; on a CPU two may overlap), ``wait-write`` (the calling thread waiting for the
        previous group's write),
        ``write`` (writer thread: a group concatenated, compressed and stored), ``record`` (writer
        thread: the group's record, e.g. the progress file), ``loop`` (from ``start`` to the last
        group recorded and the writer stopped).
    start, end : float
        ``time.perf_counter()`` seconds.
    cpu : float
        ``time.process_time()`` at ``end``: CPU seconds of the whole process, all threads.
    rows : int
        Images in the batch (``load``, ``prepare``, ``forward``) or chunk group (``write``, ``record``).
    group : int
        The chunk group (-1 for ``start`` and ``loop``).
    thread : str
        Name of the thread the step ran in.
    """

    step: str
    start: float
    end: float
    cpu: float
    rows: int = 0
    group: int = -1
    thread: str = ""


_observers: list = []


@contextlib.contextmanager
def observe(callback):
    """Call ``callback(event)`` with an :class:`Event` for each step of every loop run while inside.

    Parameters
    ----------
    callback : callable
        Called in the thread that ran the step (the loader, the device or the writer thread),
        right after it: keep it short (``list.append`` is thread-safe).

    Notes
    -----
    The loop checks for observers once per step; with none, nothing is timed.
    """
    _observers.append(callback)
    try:
        yield callback
    finally:
        _observers.remove(callback)


def _emit(step, start, rows=0, group=-1):
    event = Event(step, start, time.perf_counter(), time.process_time(), rows, group,
                  threading.current_thread().name)
    for callback in tuple(_observers):
        callback(event)


def _clock():
    """``time.perf_counter()`` when someone observes, else 0 (no timing cost)."""
    return time.perf_counter() if _observers else 0.0


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
    inflight : int
        Batches :func:`stream_groups` runs through ``forward`` at once once it is traced (see
        :func:`pipeline.extraction.plan.inflight`).
    """

    def __init__(self, forward, batch_size, positions=None, position_keys=(), thumbnails_as_is=False,
                 inflight=1):
        self.forward, self.batch_size = forward, batch_size
        self.positions, self.position_keys = positions, list(position_keys)
        self.thumbnails_as_is, self.inflight = thumbnails_as_is, inflight

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


WRITER_NICE = 19  # niceness of the writer's threads (0: as the rest of the process)


def _in_background():
    """Give the calling thread the lowest CPU priority (Linux: niceness is per thread).

    The writer's compression then runs on the CPU time TensorFlow's threads leave idle instead of
    taking it from them: on a CPU-bound machine the forward pass keeps its cores, and a group's
    write only has to finish before the next group is ready (the device waits for it then, and
    the cores it leaves idle go to the writer). Where threads cannot be reniced, nothing changes.
    """
    if WRITER_NICE:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


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
        self.puts = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="extract-writer", initializer=_in_background)
        self.stores = ThreadPoolExecutor(2, thread_name_prefix="extract-store", initializer=_in_background)
        self.pending = None

    def submit(self, group, start, parts, bad):
        """Queue group ``group`` (``parts``: key -> list of per-batch arrays) for writing at row ``start``."""
        t0 = _clock()
        self.wait()  # a write error surfaces at the next group, not at the end of the run
        if t0:
            _emit("wait-write", t0, group=group)
        self.pending = self.pool.submit(self._write, group, start, parts, dict(bad))

    def _write(self, group, start, parts, bad):
        t0 = _clock()
        values = {key: pieces[0] if len(pieces) == 1 else np.concatenate(pieces) for key, pieces in parts.items()}
        puts = {key: self._put(key, value) for key, value in values.items()}  # creation stays sequential
        # The largest array first: its write is the longest job and sets when the group is done.
        order = sorted(values, key=lambda key: values[key].nbytes, reverse=True)
        list(self.stores.map(lambda key: puts[key](start, values[key]), order))  # re-raises the first error
        rows = len(next(iter(values.values()))) if values else 0
        if t0:
            _emit("write", t0, rows, group)
            t0 = time.perf_counter()
        self.record(group, bad)
        if t0:
            _emit("record", t0, rows, group)

    def _put(self, key, value):
        if key not in self.puts:  # one zarr lookup per array per run, not per chunk
            ensure_array(self.root, key, self.n, value.shape[1:], self.rows, value.dtype)
            array = self.root[key]
            self.puts[key] = chunk_files(array) or zarr_put(array)
        return self.puts[key]

    def wait(self):
        """Block until the write in flight (if any) is on disk and recorded."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self):
        """Finish the last write, then stop the threads (also after an error: nothing half-recorded).

        :func:`stream_groups` calls it; calling it again does nothing.
        """
        try:
            self.wait()
        finally:
            self.pool.shutdown()
            self.stores.shutdown()


def stream_groups(run_batch, load, groups, todo, n, batch_size, writer, advance=None):
    """Run every batch of the chunk groups ``todo``, hand each finished group to ``writer``, close it.

    Parameters
    ----------
    run_batch : BatchRunner
        Its ``prepare`` runs in the loader thread, its ``run`` in the device threads: the first
        batch alone (it traces the compiled graph), then up to ``run_batch.inflight`` at once.
        Results are collected in order, so the stored arrays do not depend on ``inflight``.
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
        Closed on the way out (after the last group is recorded, or after an error).
    advance : callable, optional
        Called with the number of images after each batch (a progress bar).
    """
    begun = _clock()
    if begun:
        _emit("start", begun)

    def load_batch(item):  # in the loader thread
        g, start, stop = item
        t0 = _clock()
        pixels = load(np.arange(start, stop))
        if t0:
            _emit("load", t0, stop - start, g)
            t0 = time.perf_counter()
        prepared = run_batch.prepare(pixels, start, n)
        if t0:
            _emit("prepare", t0, stop - start, g)
        return prepared

    def forward(item, prepared):  # in a device thread
        t0 = _clock()
        result = run_batch.run(prepared)
        if t0:
            _emit("forward", t0, item[2] - item[1], item[0])
        return result

    parts, bad_total, collected = {}, {}, 0

    def collect(item, result):  # in this thread, in batch order
        nonlocal parts, bad_total, collected
        collected += 1
        (g, start, stop), (arrays, bad) = item, result
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
        for k, v in bad.items():
            bad_total[k] = bad_total.get(k, 0) + v
        if advance is not None:
            advance(stop - start)
        if stop == groups[g][1]:
            writer.submit(g, groups[g][0], parts, bad_total)
            parts, bad_total = {}, {}

    inflight = run_batch.inflight
    device = ThreadPoolExecutor(inflight, thread_name_prefix="extract-device")
    running = deque()
    try:
        # closing(): an error in this loop stops the loader at once, not when the traceback is freed.
        with contextlib.closing(prefetched(batch_plan(groups, todo, batch_size), load_batch,
                                           depth=max(2, inflight))) as batches:
            t0 = _clock()
            for item, prepared in batches:
                if t0:
                    _emit("wait-load", t0, item[2] - item[1], item[0])
                running.append((item, device.submit(forward, item, prepared)))
                # Each loop's first batch alone: on a new runner its call traces the graph (and may
                # fall back from XLA), which concurrent first calls would do twice.
                while running and (len(running) >= inflight or not collected):
                    head, future = running.popleft()
                    collect(head, future.result())
                t0 = _clock()
            while running:
                head, future = running.popleft()
                collect(head, future.result())
    finally:
        device.shutdown(wait=True, cancel_futures=True)
        writer.close()
    if begun:
        _emit("loop", begun)

