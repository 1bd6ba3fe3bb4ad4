"""Progress of long loops: a tqdm bar with ETA on a terminal, a few plain log lines otherwise.

Every stage uses :func:`progress`, so the terminal-or-log decision is taken here only. When the
stream (stderr) is not a terminal (CI, a log file, a pipe) a redrawn bar would leave carriage-return
garbage, so :class:`PlainProgress` writes whole lines instead, e.g.::

    cluster: 12/53 layers, 3 min 10 s elapsed, about 10 min left
    cluster: 53/53 layers done in 13 min 20 s

The environment variable ``PIPELINE_PROGRESS`` overrides the choice: ``bar``, ``plain`` or ``off``.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "PIPELINE_PROGRESS"


def progress(iterable=None, *, total=None, desc="", unit="it", initial=0, file=None, clock=time.monotonic):
    """A tqdm-like progress object: ``update(n)``, ``set_postfix_str(s)``, ``close()``, ``with``, iteration.

    Parameters
    ----------
    iterable : iterable, optional
        Iterate over the result to advance by one per item (closed at the end).
    total : int, optional
        Expected number of steps (``len(iterable)`` if omitted and available); no ETA without it.
    desc, unit : str
        Shown as ``"<desc>: <n>/<total> <unit>"``.
    initial : int
        Steps already done (a resumed run); the ETA uses the rate of this run only.
    file : stream, optional
        Defaults to ``sys.stderr`` (looked up at call time). Its ``isatty()`` picks the bar.
    clock : callable
        Seconds, for the plain lines (tests pass a fake one).
    """
    stream = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    mode = os.environ.get(ENV, "").strip().lower()
    if mode == "bar" or (mode not in ("plain", "off") and _isatty(stream)):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream,
                    dynamic_ncols=True)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream,
                         clock=clock, silent=mode == "off")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """Whole log lines instead of a bar, never two within ``interval`` seconds: a line once a further
    10 % of ``total`` is done, or else once a tenth of the elapsed time passed without one; a final
    line on ``close()``. A loop shorter than ``interval`` writes the final line only; a run of any
    length writes a few tens of lines (about 55 for 10,000 steps of 1 s).
    """

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, file=None,
                 clock=time.monotonic, interval=10.0, step=0.1, silent=False):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = int(initial)
        self.file, self.clock, self.interval, self.step, self.silent = file, clock, interval, step, silent
        self.postfix = ""
        self.start = self.last_time = clock()
        self.last_n = self.n
        self.closed = False

    # -- the tqdm subset the stages use --

    def update(self, n=1):
        self.n += n
        if self.silent or self.closed or (self.total and self.n >= self.total):
            return  # the final line is written by close()
        now = self.clock()
        gap = now - self.last_time
        stepped = bool(self.total) and self.n - self.last_n >= self.step * self.total
        if gap >= self.interval and (stepped or gap >= (now - self.start) / 10):
            self._write(self.line(now))
            self.last_time, self.last_n = now, self.n

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = str(s)

    def close(self):
        if self.closed:
            return
        self.closed = True
        if not self.silent:
            self._write(self.final_line(self.clock()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    # -- the text --

    def _count(self):
        return f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"

    def _label(self):
        return f"{self.desc}: " if self.desc else ""

    def line(self, now) -> str:
        elapsed = now - self.start
        text = f"{self._label()}{self._count()}" + (f" ({self.postfix})" if self.postfix else "")
        text += f", {duration(elapsed)} elapsed"
        done = self.n - self.initial
        if self.total and done > 0 and elapsed > 0:
            text += f", about {eta(elapsed / done * (self.total - self.n))} left"
        return text

    def final_line(self, now) -> str:
        took = duration(now - self.start)
        if self.total and self.n < self.total:
            return f"{self._label()}stopped at {self._count()} after {took}"
        return f"{self._label()}{self._count()} done in {took}"

    def _write(self, text):
        print(text, file=self.file if self.file is not None else sys.stderr, flush=True)


def duration(seconds) -> str:
    """``"45 s"``, ``"3 min 10 s"``, ``"2 h 5 min"`` (parts that are zero are left out)."""
    s = int(round(max(0.0, seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    if h:
        return f"{h} h {m} min" if m else f"{h} h"
    if m:
        return f"{m} min {s} s" if s else f"{m} min"
    return f"{s} s"


def eta(seconds) -> str:
    """A remaining time, rounded like a person would: ``"40 s"``, ``"10 min"``, ``"1 h 20 min"``."""
    if seconds < 59.5:  # not "60 s"
        return f"{max(1, int(round(seconds)))} s"
    return duration(60 * round(seconds / 60))
