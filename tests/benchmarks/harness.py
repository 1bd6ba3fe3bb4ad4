"""What the benchmarks share: measured child processes, peak-RSS readings, stage timing, printed tables.

Every benchmark imports this first (``python tests/benchmarks/bench_x.py`` puts this folder on
``sys.path``); importing it puts the repository root and ``tests/`` on ``sys.path`` and turns
oneDNN off (and sets the rest of the pipeline's TensorFlow environment) before anything imports
TensorFlow.

Measuring in a child process is the rule for memory: Linux keeps ``ru_maxrss`` across fork and
exec, so a peak read in a process that already built data or imported TensorFlow is not the
measured code's own. :func:`run_measured` runs one child and reads its wall time, CPU time and
``ru_maxrss`` (``os.wait4``), and samples the RSS of the child and its descendants (workers it
starts). A child reports its own figures with :func:`emit`; :func:`run_child` reads them back.
Linux only (``/proc``, ``os.wait4``).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Before any TensorFlow import: oneDNN's gradient of a strided 1x1 conv can crash on CPU.
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
for _path in (str(ROOT), str(TESTS)):  # the pipeline package, and zoo / test modules benchmarks reuse
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The rest of the pipeline's TensorFlow environment (its CPU allocator among them), as users get it:
# baselines measured in the same process run under it too.
from pipeline.backend.tf import set_env  # noqa: E402  (needs the repository on sys.path)

set_env()


def log(msg="", stream=None):
    """Print a progress line at once (flushed), to stdout unless ``stream`` is given."""
    print(msg, file=stream or sys.stdout, flush=True)


# --------------------------------------------------------------------------- child processes


def child_env(**extra):
    """Environment of every measured child: oneDNN off, plain progress lines, the repository importable.

    Parameters
    ----------
    **extra : str
        Further variables, overriding these.

    Returns
    -------
    dict
    """
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2", PIPELINE_PROGRESS="plain")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def descendants(pid):
    """``pid`` and every process below it, from ``/proc/<pid>/task/<tid>/children``."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                try:
                    todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
                except OSError:
                    pass
        except OSError:
            pass
    return found


def status_kb(field="VmRSS", pid="self"):
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM``, ...) in KB, or ``None`` if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process tree every ``interval`` seconds; ``peak_kb`` is the largest sum."""

    def __init__(self, pid, interval=0.5):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb, self.max_procs = pid, interval, 0, 1
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.interval):
            pids = descendants(self.pid)
            self.peak_kb = max(self.peak_kb, sum(status_kb("VmRSS", p) or 0 for p in pids))
            self.max_procs = max(self.max_procs, len(pids))


@dataclass
class ChildResult:
    """What one child process did: exit code, wall/CPU seconds, peak RSS, its output."""

    returncode: int
    wall: float
    cpu: float = 0.0
    maxrss_kb: int = 0          # the child's own ru_maxrss (os.wait4)
    tree_peak_kb: int = 0       # sampled sum over the child and its descendants
    max_procs: int = 1
    stdout: str = ""
    stderr: list = field(default_factory=list)

    @property
    def peak_gb(self):
        """The larger of the child's own peak and the sampled tree's, in GiB."""
        return max(self.maxrss_kb, self.tree_peak_kb) / 2**20

    def json(self):
        """The last line of the child's stdout as JSON (what :func:`emit` printed)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_measured(argv, echo=False, prefix="    | "):
    """Run ``argv`` as a child in the repository root; measure its time and memory.

    Parameters
    ----------
    argv : list of str
    echo : bool, default=False
        Print each stderr line as it comes (with ``prefix``) as well as keeping it: long runs show
        their progress.
    prefix : str
        Put before echoed lines.

    Returns
    -------
    ChildResult
        ``cpu`` is user + system time of the child alone (``os.wait4``, unlike ``RUSAGE_CHILDREN``
        which sums every child this process ever waited for).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=str(ROOT), bufsize=1)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    err_lines, out_chunks = [], []

    def pump_err():
        for line in proc.stderr:
            err_lines.append(line.rstrip("\n"))
            if echo:
                log(f"{prefix}{line.rstrip()}")

    # Both pipes are drained at once: a child filling one while we block on the other would hang.
    readers = [threading.Thread(target=pump_err, daemon=True),
               threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stopped.set()
    for r in readers:
        r.join(timeout=30)
    sampler.join(timeout=5)
    return ChildResult(proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
                       sampler.peak_kb, sampler.max_procs, "".join(out_chunks), err_lines)


def run_child(argv, what):
    """:func:`run_measured` without echo; exits the benchmark with the child's stderr tail if it failed.

    Parameters
    ----------
    argv : list of str
    what : str
        Names the child in the failure message.

    Returns
    -------
    ChildResult
        ``.json()`` gives what the child passed to :func:`emit`.
    """
    result = run_measured(argv)
    if result.returncode:
        sys.exit(f"{what} failed ({result.returncode}):\n" + "\n".join(result.stderr)[-3000:])
    return result


def emit(values):
    """In a child: print ``values`` as one JSON line on stdout, the line :meth:`ChildResult.json` reads."""
    print(json.dumps(values), flush=True)


# --------------------------------------------------------------------------- this process's memory


def peak_kb():
    """This process's peak RSS so far, in KB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss():
    """Reset this process's VmHWM (Linux >= 4.0), so a later ``status_kb("VmHWM")`` is the peak from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --------------------------------------------------------------------------- stage timing


class _Watched:
    """A stage's progress bar passed through, calling back on ``update`` and ``close``."""

    def __init__(self, bar, on_update, on_close):
        self._bar, self._on_update, self._on_close = bar, on_update, on_close

    def update(self, n=1):
        if self._on_update:  # first: the time is the end of the step, not of the bar's own drawing
            self._on_update(n)
        return self._bar.update(n)

    def close(self):
        try:
            return self._bar.close()
        finally:
            if self._on_close:
                self._on_close()

    def __iter__(self):
        for item in self._bar:
            yield item

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._bar.__exit__(*exc)
        finally:
            if self._on_close:
                self._on_close()

    def __getattr__(self, name):
        return getattr(self._bar, name)


@contextlib.contextmanager
def watch_progress(desc, on_open=None, on_update=None, on_close=None):
    """Call back when the progress bar named ``desc`` opens, advances and closes.

    Every stage reports its loop through :func:`pipeline.progress.progress` (looked up at call
    time), so this times a stage's loop from outside without wrapping any of the stage's own
    functions. The extract stage opens its bar (``desc="extract"``) just before its batch loop,
    advances it once per batch as the batch's results are back, and closes it after the last
    chunk write finished.

    Parameters
    ----------
    desc : str
        The bar to watch (a stage name); other bars are left alone.
    on_open : callable, optional
        Called with no argument just before the bar is created.
    on_update : callable, optional
        Called with the step count on each ``update``, before the bar draws.
    on_close : callable, optional
        Called with no argument after the bar closed.
    """
    from pipeline import progress as module

    make = module.progress

    def progress(*args, **kwargs):
        if kwargs.get("desc") != desc:
            return make(*args, **kwargs)
        if on_open:
            on_open()
        return _Watched(make(*args, **kwargs), on_update, on_close)

    module.progress = progress
    try:
        yield
    finally:
        module.progress = make


# --------------------------------------------------------------------------- printed results


def ok(flag):
    """``"yes"`` or ``"NO"``: the last column of a checks table."""
    return "yes" if flag else "NO"


def print_checks(rows, widths=(48, 28, 8)):
    """Print ``(metric, value, target, ok)`` rows under a header, columns at least ``widths`` wide."""
    widths = [max([w, *(len(str(r[i])) for r in rows)]) for i, w in enumerate(widths)]
    print(f"{'metric':<{widths[0]}} {'value':<{widths[1]}} {'target':<{widths[2]}} ok")
    for metric, value, target, flag in rows:
        print(f"{metric:<{widths[0]}} {value:<{widths[1]}} {target:<{widths[2]}} {flag}")


def machine_lines(load_start, t_start, busy_note=None):
    """The closing notes of a benchmark: load average around it and its total time.

    Parameters
    ----------
    load_start : tuple
        ``os.getloadavg()`` when the benchmark started.
    t_start : float
        ``time.perf_counter()`` when it started.
    busy_note : str, optional
        Appended when the 1-minute load exceeded the CPU count at start or end (a shared machine:
        say which figure to trust); without it the line says "(shared machine)".

    Returns
    -------
    list of str
        Lines starting with ``"- "``.
    """
    load_end = os.getloadavg()
    cpus = os.cpu_count() or 1
    line = f"- Load average (1 min) at start / end: {load_start[0]:.1f} / {load_end[0]:.1f} on {cpus} CPUs"
    if busy_note is None:
        line += " (shared machine)."
    elif max(load_start[0], load_end[0]) > cpus:
        line += "; " + busy_note
    else:
        line += "."
    return [line, f"- Total benchmark time {time.perf_counter() - t_start:.0f} s."]
