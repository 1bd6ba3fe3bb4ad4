"""Benchmark: ``python -m pipeline remedy`` on the demo's colour-shortcut model, end to end.

Target (issue 15): fine-tuning, the before/after passes and the re-analysis of the remedied model
(every stage the demo ran) and the comparison in at most 3 minutes on 2 CPU cores.

    python tests/benchmarks/bench_remedy.py [--out DIR]

The demo run is made first if needed (``python -m pipeline demo``, not timed; the demo's model
is trained once and cached under data/demo); then the remedy runs in a measured child process
with ``--force``, so nothing is reused. Prints the seconds and the before -> after figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import harness
from harness import log, ok, print_checks, run_measured

TARGET_SECONDS = 180


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/runs/bench-remedy", help="the demo run directory to use (made if missing)")
    args = p.parse_args(argv)
    load0, t0 = os.getloadavg(), time.perf_counter()
    run = Path(args.out)
    if not (run / "manifest.json").exists():
        log(f"making the demo run in {run} (not timed)")
        demo = run_measured([sys.executable, "-c", "from pipeline.demo.run import run_demo; "
                             f"run_demo(out={str(run)!r}, remedy=False)"])
        if demo.returncode:
            sys.exit("the demo run failed:\n" + "\n".join(demo.stderr[-20:]))
    log("remedy (measured, --force)")
    result = run_measured([sys.executable, "-m", "pipeline", "remedy", str(run), "--force"], echo=False)
    if result.returncode:
        sys.exit("the remedy failed:\n" + "\n".join(result.stderr[-20:]))
    summary = json.loads((run / "remedy" / "remedy.json").read_text())
    import pandas as pd

    acc = pd.read_parquet(run / "remedy" / "remedy_accuracy.parquet")
    verdicts = pd.read_parquet(run / "remedy" / "remedy_verdicts.parquet")
    held = acc[acc["split"] == "held-out"].set_index("probe")
    print()
    print("per class (held-out images): " + "; ".join(
        f"{r.class_name}: {r.verdict_before} -> {r.verdict_after}" for r in verdicts.itertuples()))
    print(held[["group", "accuracy_before", "accuracy_after", "change", "change_ci_low", "change_ci_high"]]
          .round(3).to_string())
    print()
    f = summary["flagged"]
    seconds = summary["seconds"]
    print_checks([
        ("end to end (wall, child process)", f"{result.wall:.0f} s", f"<= {TARGET_SECONDS} s",
         ok(result.wall <= TARGET_SECONDS)),
        ("  of which fine-tune + before/after passes", f"{seconds['fine_tune_and_evaluate']:.0f} s", "", ""),
        ("  of which fine-tuning alone", f"{summary['fine_tune_seconds']:.0f} s", "", ""),
        ("peak RSS", f"{result.peak_gb:.2f} GB", "", ""),
        ("classes flagged 'relies on colour' (held-out)", f"{f['before']} -> {f['after']} of {f['classes']}",
         "most cleared", ok(f["after"] <= f["classes"] // 2)),
        ("held-out accuracy, originals", "{:.3f} -> {:.3f}".format(*summary["heldout_accuracy"]["original"]),
         "no collapse", ok(summary["heldout_accuracy"]["original"][1] >= summary["heldout_accuracy"]["original"][0] - 0.05)),
        ("held-out accuracy, colour probes", "{:.3f} -> {:.3f}".format(*summary["heldout_accuracy"]["colour"]),
         "large rise", ok(summary["heldout_accuracy"]["colour"][1] - summary["heldout_accuracy"]["colour"][0] > 0.15)),
    ])
    for line in harness.machine_lines(load0, t0):
        print(line)


if __name__ == "__main__":
    main()
