"""Decide which stages must run, run them in order, and record what was done in ``manifest.json``.

The rule is DVC's: a stage is up to date when the hash of its parameters, of its inputs (files
or upstream stages) and the code version all match what the manifest recorded, and its outputs
exist. Anything else is stale, with the reason.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

from pipeline.version import __version__
from pipeline.codeversion import code_version
from pipeline.config import Config, hash_json
from pipeline.errors import UserError
from pipeline.storage.rundir import MANIFEST, hold
from pipeline.storage.store import RunStore
from pipeline.stages.base import Context, Outputs, Stage
from pipeline.storage.catalog import Catalog, path as artifact_path


class Runner:
    """Runs the stages of one config.

    Parameters
    ----------
    cfg : Config
    stages : list of Stage
        In pipeline order.
    """

    def __init__(self, cfg: Config, stages, debug=False):
        self.cfg = cfg
        self.stages = list(stages)
        self.by_name = {s.name: s for s in self.stages}
        self.store = RunStore(cfg.out_dir)
        self.debug = debug
        self._input_cache = {}

    # -- fingerprints --

    def manifest(self) -> dict:
        return self.store.read_json(MANIFEST, default={"stages": {}}) or {"stages": {}}

    def _inputs(self, stage) -> dict:
        if stage.name not in self._input_cache:
            self._input_cache[stage.name] = stage.inputs(self.cfg)
        return self._input_cache[stage.name]

    def expected(self, stage) -> dict:
        """What the manifest must say for ``stage`` to be up to date.

        An upstream stage counts by the fingerprint it recorded when it last finished (what
        this stage actually read), not by what it would record now.
        """
        inputs = dict(self._inputs(stage))
        recorded = self.manifest()["stages"]
        for dep in stage.deps:
            rec = recorded.get(dep, {})
            inputs[f"stage:{dep}"] = (rec.get("fingerprint") if rec.get("status") == "done"
                                      else None) or self.fingerprint(self.by_name[dep])
        for dep in stage.optional:
            rec = recorded.get(dep, {})
            inputs[f"stage:{dep}"] = rec.get("fingerprint") if rec.get("status") == "done" else "absent"
        return {
            "params_hash": hash_json(stage.params(self.cfg)),
            "input_hashes": inputs,
            "code_version": f"{__version__}/{stage.version}/{code_version(stage.run.__module__)}",
        }

    def fingerprint(self, stage) -> str:
        return hash_json(self.expected(stage))

    def state(self, stage, manifest=None) -> tuple[str, str]:
        """``(status, reason)`` with status ``done``, ``stale`` or ``missing``."""
        manifest = manifest or self.manifest()
        rec = manifest["stages"].get(stage.name)
        if not rec or rec.get("status") != "done":
            return "missing", "never finished" if not rec else f"last attempt {rec.get('status')}"
        missing = [o for o in stage.outputs if not Catalog(self.store).exists(o)]
        if missing:
            return "missing", f"output {artifact_path(missing[0])} is missing"
        for dep in stage.deps:
            dep_status, _ = self.state(self.by_name[dep], manifest)
            if dep_status != "done":
                return "stale", f"upstream stage '{dep}' is {dep_status}"
        exp = self.expected(stage)
        if rec.get("code_version") != exp["code_version"]:
            return "stale", f"code version changed ({rec.get('code_version')} -> {exp['code_version']})"
        if rec.get("params_hash") != exp["params_hash"]:
            return "stale", "parameters changed"
        old = rec.get("input_hashes", {})
        for key, value in exp["input_hashes"].items():
            if old.get(key) != value:
                what = f"upstream stage '{key[6:]}' changed" if key.startswith("stage:") else f"input '{key}' changed"
                return "stale", what
        partial = _partial(rec)
        if partial:
            return "partial", partial
        return "done", f"finished {rec.get('finished_at', '?')}"

    # -- running --

    def plan(self, only=None, from_stage=None, force=False) -> list[Stage]:
        """The stages to run, in order."""
        names = [s.name for s in self.stages]
        for n in (only, from_stage):
            if n is not None and n not in names:
                raise UserError(f"unknown stage '{n}' (stages: {', '.join(names)})")
        if from_stage:
            return self.stages[names.index(from_stage):]
        manifest = self.manifest()
        chosen = [self.by_name[only]] if only else self.stages
        if force:
            return list(chosen)
        planned = []
        for s in chosen:
            # a stage reruns when it is not done, or when something it reads (even optionally) reruns
            upstream = set(s.deps) | set(s.optional)
            if self.state(s, manifest)[0] != "done" or upstream & {p.name for p in planned}:
                planned.append(s)
        return planned

    def run(self, only=None, from_stage=None, force=False) -> list[tuple[str, str]]:
        """Run what is needed; return ``(stage, outcome)`` pairs.

        Holds the run directory's lock throughout (:func:`pipeline.storage.rundir.hold`): a second
        writer is refused, and a folder the pipeline did not write is never written.
        """
        with hold(self.store.root):
            return self._run_locked(only, from_stage, force)

    def _run_locked(self, only, from_stage, force):
        planned = {s.name for s in self.plan(only, from_stage, force)}
        results = []
        for stage in self.stages:
            if stage.name not in planned:
                status, reason = self.state(stage)
                if status == "done" and (only is None or stage.name == only):
                    results.append((stage.name, "skipped (up to date)"))
                    print(f"{stage.name}: up to date, skipped", file=sys.stderr)
                continue
            for dep in stage.deps:
                if self.state(self.by_name[dep])[0] == "missing":
                    raise UserError(f"stage '{stage.name}' needs '{dep}' first: "
                                    f"run `python -m pipeline {dep} ...` or the whole pipeline")
            results.append((stage.name, self._run_one(stage)))
        return results

    def _run_one(self, stage) -> str:
        exp = self.expected(stage)
        manifest = self.manifest()
        manifest["stages"][stage.name] = {**exp, "status": "running",
                                          "started_at": _now()}
        manifest["config"] = self.cfg.model_dump(mode="json")
        self.store.write_json(MANIFEST, manifest)
        print(f"{stage.name}: running", file=sys.stderr, flush=True)
        ctx = Context(self.cfg, self.store, self.debug)
        t0 = time.perf_counter()
        try:
            summary = write_outputs(Catalog(self.store), stage.run(ctx))
        except BaseException as exc:
            manifest = self.manifest()
            manifest["stages"][stage.name]["status"] = "failed" if isinstance(exc, Exception) else "interrupted"
            manifest["stages"][stage.name]["error"] = str(exc)[:500]
            self.store.write_json(MANIFEST, manifest)
            raise
        seconds = round(time.perf_counter() - t0, 2)
        manifest = self.manifest()
        manifest["stages"][stage.name] = {**exp, "status": "done", "finished_at": _now(),
                                          "seconds": seconds, "summary": summary,
                                          "fingerprint": hash_json(exp)}
        self.store.write_json(MANIFEST, manifest)
        print(f"{stage.name}: done in {seconds:.1f} s", file=sys.stderr, flush=True)
        return "done"

    def status_lines(self) -> list[str]:
        manifest = self.manifest()
        lines = []
        for stage in self.stages:
            status, reason = self.state(stage, manifest)
            lines.append(f"{stage.name:<9} {status:<8} {reason}")
        return lines


def write_outputs(catalog, result) -> dict:
    """Write what a stage's ``run`` returned (:class:`~pipeline.stages.base.Outputs`) through
    ``catalog``; return the summary for the manifest (a plain dict result is the summary)."""
    if not isinstance(result, Outputs):
        return result or {}
    for name, value in result.artifacts.items():
        if value is None:
            catalog.remove(name)
        else:
            catalog.write(name, value)
    return result.summary


def _partial(rec):
    """Why a finished stage is only partly done (e.g. a time budget left images unrendered), or ``""``."""
    summary = rec.get("summary") or {}
    missing = summary.get("missing") or 0
    if not missing:
        return ""
    total = (summary.get("images") or 0) + missing
    return (f"({total - missing} of {total} rendered) the time budget ran out; run the stage again to "
            "render the rest (finished images are kept)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
