"""Start-up decisions of an extraction: ``extract.batch_size: auto`` and ``compute.xla``.

Both are measured on the real compiled forward pass (:func:`pipeline.extraction.plan.build_forward`)
over synthetic pixels, before the first image is read, and recorded (:func:`decide` returns a
JSON-able record that the engines keep in ``extract.progress.json`` and the stage summary), so
a resumed run reuses them and writes the same arrays. :func:`resolved` turns the config into
the one the batch loop runs: a number for the batch size, ``on``/``off`` for XLA.

- ``batch_size: auto`` grows the batch (8, 16, … at most 1024 and the number of images, and on
  a CPU at most what half the available memory holds by a per-image estimate, for the two
  batches the loop runs at once) while images/s
  improves by 10 % or more (:func:`pipeline.backend.autobatch.search`).
- ``compute.xla: auto`` on a GPU compiles the model part with XLA as well and keeps it if it is
  faster at the chosen batch size; it is not even tried when the whole extraction is estimated
  to take less than :data:`XLA_WORTH_SECONDS` (an XLA compile of a deep model costs that much).
  On a CPU it stays off without a try (:data:`CPU_REASON`).
  ``on`` uses XLA unless it cannot compile the model (one log line, then without it).
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.backend import autobatch
from pipeline.extraction.plan import build_forward, inflight

START, CAP = 8, 1024          # extract batch sizes tried: 8, 16, ... 1024 (and never beyond the images)
XLA_WORTH_SECONDS = 30.0       # xla auto: a shorter extraction is not worth an XLA compile
XLA_MARGIN = 0.05              # xla auto: XLA must be this much faster to be kept (timing noise)
# Measured with TensorFlow 2.21 on 2 CPU cores: the XLA-compiled model ran 1.7-2.6x slower than
# TensorFlow's own kernels (tests/benchmarks/bench_extract.py), and timing it killed the process
# with SIGSEGV in about 1 run in 10 (a small CNN, repeated runs): a try could only lose.
CPU_REASON = "CPU: XLA's CPU convolutions are slower and its compile of a model can crash the process (not tried)"


def decide(cfg, model, names, kinds, size, channels, n, log) -> tuple[dict, object]:
    """Resolve ``extract.batch_size`` and ``compute.xla`` for this model and ``n`` images.

    Returns
    -------
    (dict, callable or None)
        The record (``batch_size``, ``xla``, and the probes' findings: ``batch_search``,
        ``xla_reason``, ``probe_seconds``) and the compiled forward at the chosen settings when
        a probe built it (the batch loop reuses it instead of compiling again).
    """
    ex, xla = cfg.extract, cfg.compute.xla
    t0 = time.perf_counter()
    probe = _Probe(cfg, model, names, kinds, size, channels)
    record = {}
    if ex.batch_size == "auto":
        # On a CPU the loop holds inflight() batches at once: each gets its share of the memory.
        memory = (autobatch.memory_cap(autobatch.model_bytes(model, (*size, channels)) * inflight())
                  if autobatch.cpu_only() else None)
        choice = autobatch.search(autobatch.timed(lambda b: probe.call(b, False)), start=START, cap=CAP,
                                  limit=n, memory=memory)
        batch = choice.size
        record["batch_search"] = choice.record()
        log(f"extract: batch size auto → {choice.line()}")
        rate = next((t.rate for t in choice.trials if t.size == batch and t.rate), None)
    else:
        batch, rate = min(int(ex.batch_size), n), None
    use_xla = False
    if xla == "on":
        use_xla = probe.compiles(batch)
        if not use_xla:
            record["xla_reason"] = f"XLA cannot compile this model: {probe.error}"
            log(f"extract: compute.xla: on, but XLA cannot compile this model ({probe.error}); "
                "it runs without XLA")
    elif xla == "auto":
        use_xla, record["xla_reason"] = _xla_auto(probe, batch, rate, n)
        log(f"extract: compute.xla auto → {'on' if use_xla else 'off'} ({record['xla_reason']})")
    record.update(batch_size=int(ex.batch_size) if ex.batch_size != "auto" else batch, xla=bool(use_xla),
                  probe_seconds=round(time.perf_counter() - t0, 2))
    return record, probe.keep(batch, use_xla)


def _xla_auto(probe, batch, rate, n) -> tuple[bool, str]:
    """XLA for the model when it is worth trying and measurably faster; the reason either way."""
    if autobatch.cpu_only():
        return False, CPU_REASON
    if rate is None:
        rate = batch / autobatch.timed(lambda b: probe.call(b, False), repeats=1)(batch)
    expected = n / rate
    if expected < XLA_WORTH_SECONDS:
        return False, (f"the forward passes take about {expected:.0f} s, under {XLA_WORTH_SECONDS:.0f} s: "
                       "not worth an XLA compile")
    t0 = time.perf_counter()
    if not probe.compiles(batch):
        return False, f"XLA cannot compile this model: {probe.error}"
    xla_rate = batch / autobatch.timed(lambda b: probe.call(b, True), warmup=0)(batch)
    cost = time.perf_counter() - t0
    faster = xla_rate > rate * (1 + XLA_MARGIN)
    ratio = xla_rate / rate if faster else rate / xla_rate
    return faster, (f"XLA {ratio:.1f}x {'faster' if faster else 'slower'}: {xla_rate:.0f} vs {rate:.0f} img/s "
                    f"at batch {batch}; compiling and timing it took {cost:.1f} s")


class _Probe:
    """Compiled forwards by (batch size, XLA), called on synthetic pixels; the chosen one is kept."""

    def __init__(self, cfg, model, names, kinds, size, channels):
        self.cfg, self.model, self.names, self.kinds = cfg, model, names, kinds
        self.size, self.channels = tuple(size), channels
        self.forwards, self.error = {}, None
        self.maps = sum(1 for l in names if kinds[l] == "map")

    def forward(self, batch, xla):
        key = (batch, xla)
        if key not in self.forwards:  # a new function per size: no retracing of one function
            self.forwards[key] = build_forward(self.cfg, self.model, self.names, self.kinds, self.size, jit_model=xla)
        return self.forwards[key]

    def call(self, batch, xla):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, *self.size, self.channels), dtype=np.uint8)
        k = self.cfg.extract.spatial_samples
        positions = [np.zeros((batch, k, 2), np.int32) for _ in range(self.maps)] if k else []
        self.forward(batch, xla)(pixels, positions, batch)

    def compiles(self, batch) -> bool:
        """Whether XLA compiles the model (the first call tries; the forward falls back on failure)."""
        self.call(batch, True)
        f = self.forwards[(batch, True)]
        if not f.jit_model:
            self.error = f.xla_error
            del self.forwards[(batch, True)]
        return f.jit_model

    def keep(self, batch, xla):
        """The forward at the chosen settings, if one was compiled; the others are freed."""
        chosen = self.forwards.get((batch, xla))
        self.forwards.clear()
        return chosen


def reused_line(cfg, record):
    """The log line of a resumed extraction that reuses the recorded batch size (``None`` if it was fixed)."""
    if cfg.extract.batch_size != "auto":
        return None
    return f"extract: batch size auto → {record['batch_size']} (recorded when this extraction started)"


def resolved(cfg, record):
    """``cfg`` with the recorded decisions: a number for ``extract.batch_size``, ``on``/``off`` for XLA."""
    ex = cfg.extract.model_copy(update={"batch_size": int(record["batch_size"])})
    compute = cfg.compute.model_copy(update={"xla": "on" if record["xla"] else "off"})
    return cfg.model_copy(update={"extract": ex, "compute": compute})


def default_record(cfg):
    """The decisions of a config that needs no probe (a fixed batch size, XLA off), else ``None``."""
    if cfg.extract.batch_size == "auto" or cfg.compute.xla != "off":
        return None
    return {"batch_size": int(cfg.extract.batch_size), "xla": False}
