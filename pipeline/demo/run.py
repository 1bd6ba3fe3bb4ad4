"""``python -m pipeline demo``: the embedded story of a classifier that relies on colour, not shape.

The shapes dataset is generated in code; in its training split each class mostly has its own
colour, in the analysis split colours are random. A small CNN trained on it (cached under
``data/demo``) is then analysed by every stage.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import make_config


def demo_config(assets, out=None):
    """The demo's config: every stage with settings sized for a 2-core CPU."""
    raw = {
        "name": "demo",
        "out": str(out) if out else "data/runs/demo",
        "seed": 0,
        "model": str(assets["model"]),
        "data": {"images": str(assets["images"]), "scale": "1/255"},
        "layers": "auto",
        "extract": {"batch_size": 64, "spatial_samples": 4},
        # 128 steps at a higher rate match 256 steps at 0.05 on this small model, in half the time.
        "maximize": {"steps": 128, "learning_rate": 0.2, "units": "all", "max_seconds": None},
        # The remedy of the planted colour shortcut (`python -m pipeline remedy data/runs/demo`): the demo's
        # model learned on 3e-3 and keeps learning shape at that rate; 12 epochs on the 400 fine-tune images.
        "remedy": {"epochs": 12, "learning_rate": 3e-3},
    }
    return make_config(raw)


def run_demo(out=None, force=False, debug=False, data_dir="data/demo", remedy=True):
    """Generate/train the demo assets if needed, run every stage, remedy the colour shortcut
    (``remedy=False`` skips it), print where the results are."""
    from pipeline.demo.data import ensure_demo_assets
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    def log(msg):
        print(f"demo: {msg}", file=sys.stderr, flush=True)

    assets = ensure_demo_assets(Path(data_dir), log=log)
    cfg = demo_config(assets, out)
    runner = Runner(cfg, all_stages(), debug=debug)
    from pipeline.orchestration.planning import print_plan

    print_plan(cfg, runner, force=force)
    runner.run(force=force)
    print(f"run directory: {cfg.out_dir}")
    if remedy:
        from pipeline.remedy.run import remedy as remedy_run

        summary = remedy_run(cfg, force=force, debug=debug)
        if summary is not None:
            print(f"remedied model: {summary['model']} (before -> after: {Path(summary['page']).resolve()})")
    report = cfg.report_dir / "index.html"
    if report.exists():
        print(f"report: {report.resolve()}")
    print(f"load it in Python: pipeline.load_run({str(cfg.out_dir)!r})")
    return cfg
