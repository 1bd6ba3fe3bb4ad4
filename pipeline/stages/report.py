"""Report stage: the static HTML report of a run, written outside the run directory.

The report folder (``report.out``, default ``reports/<name>``) is built beside its final place
and published by rename; the run directory only gets ``report.json``, a small marker recording
where the report is, so the runner can tell the stage is done.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.stages.base import Outputs, Stage
from pipeline.storage.catalog import Catalog
from pipeline.storage.hashing import file_hash
from pipeline.storage.store import RunStore

REPORT_PACKAGE = Path(__file__).resolve().parent.parent / "report"


def _params(cfg):
    return {"report": cfg.report.model_dump(mode="json"), "name": cfg.name,
            "out": str(cfg.report_dir)}


def _inputs(cfg):
    # Templates and the stylesheet are code too: editing them makes the report stale.
    inputs = {"templates": file_hash(REPORT_PACKAGE / "templates"), "static": file_hash(REPORT_PACKAGE / "static")}
    # A new comparison (`python -m pipeline compare`) makes the report stale, so the index links it.
    registry = Catalog(RunStore(cfg.out_dir)).path("comparisons")
    if registry.is_file():
        inputs["comparisons"] = file_hash(registry)
    return inputs


def run(ctx):
    from pipeline.report.build import build_report

    out = Path(ctx.cfg.report_dir)
    result = build_report(ctx.store.root, out, title=ctx.cfg.name, options=ctx.cfg.report, log=ctx.log)
    for note in result.notes:
        ctx.log(f"report: {note}")
    summary = {"path": str(out.resolve()), "index": str(result.index.resolve()), "pages": result.pages,
               "thumbnails": result.images, "bytes": result.bytes}
    ctx.log(f"report: {result.index.resolve()}")
    return Outputs({"report_summary": summary}, summary)


# Extract and cluster are required; embed, probe and maximize are shown when present, and a rerun of
# any of them makes the report stale.
STAGE = Stage(name="report", deps=("extract", "cluster"),
              optional=("embed", "probe", "maximize"), params=_params, inputs=_inputs,
              outputs=("report_summary",), run=run, version="1")
