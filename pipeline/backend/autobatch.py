"""``batch_size: auto``: the batch size that keeps the device busy, found by timing the real computation.

Engine-neutral and model-neutral: :func:`search` grows a batch size over powers of two and only
needs a callable ``measure(size) -> seconds`` (one call of the compiled computation at that
size, or an out-of-memory error). Extraction and maximization each wrap their own compiled
step in :func:`timed` and cap the sizes by :func:`memory_cap`; tests drive :func:`search` with
fakes.

The rule: start small (``start``), double while the number of items per second improves by at
least ``min_gain`` (10 %); stop at the first size that gains less (keep the one before it: the
same speed for less memory and padding), at ``cap`` or the number of items, at the size memory
allows, when the probe has used its time, or at the first out-of-memory error
(``tf.errors.ResourceExhaustedError`` or ``MemoryError``), backing off to the last size that
worked (halving below ``start`` if even that failed).

Examples
--------
>>> fake = lambda b: 0.01 + 0.001 * b          # fixed cost per call + cost per item
>>> choice = search(fake, start=8, cap=1024)
>>> choice.size, choice.reason
(64, '128: +7 % throughput, stopped')
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

MIN_GAIN = 0.10          # a size must raise items/s by this much to be worth its memory
PROBE_SECONDS = 20.0     # a search starts no new size after this many seconds of probing
MEMORY_SHARE = 0.5       # of the memory available now, what a batch may be estimated to take


@dataclass(frozen=True)
class Trial:
    """One size tried: its seconds per call and items per second, or why it failed."""

    size: int
    seconds: float | None = None
    rate: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Choice:
    """What :func:`search` decided.

    Attributes
    ----------
    size : int
        The batch size to use.
    reason : str
        Why the search stopped there, e.g. ``"256: +4 % throughput, stopped"``.
    trials : tuple of Trial
        Every size tried, in order.
    seconds : float
        Wall time the search took (warm-ups and compilations included).
    """

    size: int
    reason: str
    trials: tuple = field(default_factory=tuple)
    seconds: float = 0.0

    def record(self) -> dict:
        """A JSON-able record for the manifest."""
        return {"size": self.size, "reason": self.reason, "seconds": round(self.seconds, 2),
                "trials": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(t).items()}
                           for t in self.trials]}

    def line(self) -> str:
        """``128 (256: +4 % throughput, stopped; tried 8-256 in 3.1 s)``."""
        sizes = [t.size for t in self.trials]
        tried = (f"tried {min(sizes)}-{max(sizes)}" if len(set(sizes)) > 1 else f"tried {sizes[0]}") if sizes else ""
        cost = f"{tried} in {self.seconds:.1f} s" if tried else f"{self.seconds:.1f} s"
        return f"{self.size} ({self.reason}; {cost})"


def is_out_of_memory(exc) -> bool:
    """``MemoryError``, or TensorFlow's ``ResourceExhaustedError`` (checked without importing TF)."""
    if isinstance(exc, MemoryError):
        return True
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    return errors is not None and isinstance(exc, errors.ResourceExhaustedError)


def candidates(start, cap, limit=None, memory=None) -> list[int]:
    """Sizes to try: ``start, 2*start, …`` up to ``cap``, the item count ``limit`` and ``memory``.

    ``limit`` itself ends the list when it falls between two powers (100 images: 8 … 64, 100):
    one batch of every item is a size worth trying. The memory cap only ever cuts.
    """
    top = max(1, min(cap, limit or cap))
    if memory is not None:
        top = max(1, min(top, memory))
    sizes, s = [], max(1, min(start, top))
    while s <= top:
        sizes.append(s)
        s *= 2
    if limit is not None and limit == top and sizes[-1] != top:
        sizes.append(top)
    return sizes


def search(measure, *, start=8, cap=1024, limit=None, memory=None, min_gain=MIN_GAIN,
           max_seconds=PROBE_SECONDS, clock=time.perf_counter, patience=0) -> Choice:
    """Grow the batch size until throughput stops improving or memory runs out.

    Parameters
    ----------
    measure : callable
        ``measure(size) -> seconds`` for one call at ``size`` items (warm-up done by the caller,
        e.g. with :func:`timed`); may raise an out-of-memory error (:func:`is_out_of_memory`),
        which ends the search. Other errors propagate.
    start, cap : int
        First size tried; largest size ever tried.
    limit : int, optional
        The number of items (images, units): no batch is larger.
    memory : int, optional
        Largest size the memory estimate allows (:func:`memory_cap`).
    min_gain : float
        Relative items/s gain a doubling must bring to be kept.
    max_seconds : float or None
        No new size is tried once the search has taken this long.
    clock : callable
        Wall clock (tests may pass a fake).
    patience : int
        Doublings that raise items/s by less than ``min_gain`` (but raise it) tried before
        stopping: short timings are noisy, and a gain can show only one doubling later.

    Returns
    -------
    Choice
    """
    t0 = clock()
    sizes = candidates(start, cap, limit, memory)
    trials, best, last, spared = [], None, None, 0

    def done(size, reason):
        return Choice(size, reason, tuple(trials), clock() - t0)

    if len(sizes) == 1:  # nothing to choose between: no need to time it
        return done(sizes[0], _why_top(sizes[0], cap, limit, memory))
    for size in sizes:
        if best is not None and max_seconds is not None:
            spent = clock() - t0
            next_cost = last[1] * size / last[0]  # a measure costs about in proportion to its size
            if spent + next_cost > max_seconds:
                return done(best.size, f"probe time limit ({max_seconds:g} s) reached before {size}")
        began = clock()
        trial = _attempt(measure, size, trials)
        if trial is None:
            if best is not None:
                return done(best.size, f"{size}: out of memory, backed off")
            return _back_off(measure, size, trials, t0, clock)
        last = (size, clock() - began)
        if best is not None and trial.rate < best.rate * (1 + min_gain):
            gain = trial.rate / best.rate - 1
            if trial.rate > best.rate and spared < patience:
                spared += 1
                continue
            return done(best.size, f"{size}: {gain * 100:+.0f} % throughput, stopped")
        best, spared = trial, 0
    if trials[-1].size != best.size:  # the last sizes were spared, and none gained enough
        return done(best.size, f"{trials[-1].size}: {(trials[-1].rate / best.rate - 1) * 100:+.0f} % throughput, "
                               "stopped")
    return done(best.size, _why_top(best.size, cap, limit, memory))


def _why_top(size, cap, limit, memory):
    """Why the largest candidate is where the search ended."""
    if size == limit:
        return f"all {limit} items in one batch"
    if memory is not None and memory < min(cap, limit or cap):
        return "the memory estimate allows no more"
    return f"still gaining at the cap {cap}"


def _attempt(measure, size, trials):
    """``measure(size)`` as a :class:`Trial` added to ``trials``; ``None`` when it ran out of memory."""
    try:
        seconds = max(float(measure(size)), 1e-9)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        trials.append(Trial(size, error="out of memory"))
        return None
    trial = Trial(size, seconds, size / seconds)
    trials.append(trial)
    return trial


def _back_off(measure, failed, trials, t0, clock):
    """Even the first size ran out of memory: halve until one works (or size 1 fails too)."""
    size = failed // 2
    while size >= 1:
        if _attempt(measure, size, trials) is not None:
            return Choice(size, f"{failed}: out of memory, backed off", tuple(trials), clock() - t0)
        size //= 2
    raise MemoryError(f"out of memory even at batch size 1 (tried {', '.join(str(t.size) for t in trials)})")


def timed(call, warmup=1, repeats=2, clock=time.perf_counter):
    """``measure(size)`` for :func:`search`: ``call(size)`` ``warmup`` times, then the fastest of ``repeats``.

    ``call(size)`` runs the real computation once at that size (compiling it on its first call);
    the fastest repeat is the least disturbed by whatever else shares the machine.
    """
    def measure(size):
        for _ in range(warmup):
            call(size)
        best = float("inf")
        for _ in range(repeats):
            t = clock()
            call(size)
            best = min(best, clock() - t)
        return best

    return measure


def activation_bytes(shapes, side=1, itemsize=4) -> int:
    """Bytes of one item's tensors of these ``shapes`` (no batch axis); unknown dims count as ``side``."""
    total = 0
    for shape in shapes:
        dims = [side if d is None else int(d) for d in (shape or ())]
        total += math.prod(dims) if dims else 0
    return itemsize * total


def model_bytes(model, input_shape) -> int:
    """Float32 bytes of one image's input (``(h, w, c)``) and every layer output of ``model`` (its
    ``LayerInfo`` layers): what a forward pass may hold per image. An upper bound (TensorFlow frees
    intermediate outputs as it goes); unknown dimensions count as the input's longer side."""
    shapes = [tuple(input_shape)] + [layer.output_shape for layer in model.layers]
    return activation_bytes(shapes, side=max(input_shape[:2]))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (psutil, else ``/proc/meminfo``), or ``None``."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_cap(bytes_per_item, available=None, share=MEMORY_SHARE) -> int | None:
    """Largest batch whose estimated memory (``bytes_per_item`` each) fits ``share`` of ``available``.

    On a GPU the device's own out-of-memory error is the guard (host RAM says nothing about it);
    on a CPU running out of host memory must not be the way to find the limit, so this caps first.
    ``None`` when nothing is known.
    """
    available = available_memory() if available is None else available
    if not available or not bytes_per_item or bytes_per_item <= 0:
        return None
    return max(1, int(available * share // bytes_per_item))


def cpu_only() -> bool:
    """True when TensorFlow sees no GPU (or is not imported): host memory is the device memory."""
    tf = sys.modules.get("tensorflow")
    if tf is None or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return True
    return not tf.config.list_physical_devices("GPU")
