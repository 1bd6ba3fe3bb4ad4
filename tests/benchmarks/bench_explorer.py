"""Benchmark the report's interactive explorer at scale: build time, page size, Chromium load time.

Run from the repository root::

    python tests/benchmarks/bench_explorer.py                 # 100 000 images, all drawn (~2-3 min)
    python tests/benchmarks/bench_explorer.py --points 20000 --max-points 50000

A synthetic run (no model: dataset, thumbnails, activations, image and unit embeddings, clusters,
probe sensitivities written directly by ``tests/test_explorer.py:synthetic_run``) is reported
with ``report.explorer_max_points`` set to ``--max-points`` (default: all points drawn), then the
layer page is opened in headless Chromium (software WebGL, as on a machine without a GPU) from
``file://``, driven by Playwright as in the tests (``tests/browser.py``: the system chromium, no
browser download). Printed:

- build: seconds for the whole report (all pages, figures, sprite sheets, explorer data);
- page: bytes a reader's browser loads for one layer page before any hover (HTML, BokehJS, the
  layer's explorer data; sprite sheets load on hover only), and the sprite sheets' total;
- load: seconds to the page's load event, and to both explorers drawn (``data-ready``);
- then a point is hovered and the console errors / requests outside the folder are counted.

Everything is written under a ``tempfile.mkdtemp()`` that is removed at the end.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import harness  # noqa: F401 - first: the repository and tests/ on sys.path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--max-points", type=int, default=None, help="report.explorer_max_points (default: all)")
    args = parser.parse_args()

    import browser
    import test_explorer

    if browser.missing():
        sys.exit(browser.missing())
    tmp = Path(tempfile.mkdtemp(prefix="bench-explorer-"))
    chromium = browser.launch()
    try:
        f = test_explorer.build_and_open(tmp, args.points, chromium, max_points=args.max_points or args.points)
    finally:
        chromium.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"images                 {f['points']:>10,}")
    print(f"build (whole report)   {f['build_s']:>10.1f} s")
    print(f"report folder          {f['report_mb']:>10.1f} MB  (sprite sheets {f['sprites_mb']:.1f} MB)")
    print(f"layer page loads       {f['page_mb']:>10.1f} MB  (explorer data {f['data_mb']:.1f} MB)")
    print(f"load event             {f['load_s']:>10.2f} s")
    print(f"explorers drawn        {f['ready_s']:>10.2f} s")
    print(f"console errors         {len(f['errors']):>10}  outside requests {len(f['outside'])}")


if __name__ == "__main__":
    main()
