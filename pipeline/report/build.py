"""Build the whole report into ``<out>.partial`` and publish it by rename.

A reader never sees a half-written report: the previous one stays in place until the new one is
complete. A folder that exists but was not written by this tool is never replaced.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.version import __version__
from pipeline.errors import UserError
from pipeline.report.csp import CSP
from pipeline.storage.rundir import foreign_folder
from pipeline.storage.store import RunStore

MARKER = ".pipeline-report.json"
TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

@dataclass(frozen=True)
class ReportResult:
    index: Path
    pages: int
    images: int
    bytes: int
    seconds: float
    notes: tuple


def build_report(run_dir, out_dir, *, title=None, options=None, log=None) -> ReportResult:
    """Write the static report of ``run_dir`` to ``out_dir`` (``index.html`` + per-layer/class pages).

    Parameters
    ----------
    run_dir : path
        A run directory with at least the extract stage done; other tables are optional.
    out_dir : path
        The report folder (replaced atomically; refused if it exists and is not a report).
    title : str, optional
        Defaults to the run's name.
    options : ReportConfig, optional
    log : callable, optional

    Examples
    --------
    >>> build_report("data/runs/demo", "reports/demo")          # doctest: +SKIP
    ReportResult(index=PosixPath('reports/demo/index.html'), ...)
    """
    from pipeline.config import ReportConfig
    from pipeline.progress import progress
    from pipeline.report.assets import Assets
    from pipeline.report.data import load_report_data
    from pipeline.report.pages import Site, class_pages, index_page, layer_pages

    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    options = options or ReportConfig()
    target = Path(out_dir)
    _check_replaceable(target)
    data = load_report_data(run_dir, title)
    store = RunStore(target.parent)
    store.discard_partial(target.name)
    root = store.partial_dir(target.name)
    try:
        assets = Assets(root, data, options)
        site = Site(data, assets, options)
        site.report_dir = target.resolve()  # where the pages will be: relative links to comparisons
        site.explorer = _explorer(site, root, options)
        pages = [index_page(site)]
        for layer in site.layers:
            pages += layer_pages(site, layer)
        pages += class_pages(site)
        env = _environment()
        common = _common(site, assets)
        for name, template, ctx in progress(pages, desc="report", unit="pages"):
            html = env.get_template(template).render(**{**common, **ctx}, page_file=name)
            (root / name).write_text(html, encoding="utf-8")
        images = assets.flush()
        _write_css(root, site)
        (root / MARKER).write_text(json.dumps({"generator": "pipeline", "version": __version__,
                                               "run": str(Path(run_dir).resolve())}, indent=2))
    except BaseException:
        store.discard_partial(target.name)
        raise
    store.publish_dir(target.name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    log(f"report: {len(pages)} pages, {images} thumbnails, {size / 1e6:.1f} MB")
    return ReportResult(index=target / "index.html", pages=len(pages), images=images, bytes=size,
                        seconds=round(time.perf_counter() - t0, 2), notes=tuple(data.notes))


def _explorer(site, root, options):
    """The interactive explorer of the layer pages, or None (switched off, or Bokeh not installed)."""
    from pipeline.report import explorer

    if not options.explorer:
        return None
    if not explorer.available():
        site.data.notes.append("interactive explorer not written: the bokeh package is not installed "
                               "(pip install bokeh); the static maps are shown")
        return None
    return explorer.Explorer(site, root)


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an earlier report (or an empty folder)."""
    why = foreign_folder(target, MARKER)
    if why == "file":
        raise UserError(f"report folder {target} is a file; choose another report.out")
    if why:
        raise UserError(f"report folder {target} exists and was not written by this tool; "
                        "choose another report.out or remove it")


def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_fmt_num, pct=_fmt_pct, secs=_fmt_secs, shape=_fmt_shape, ci=_fmt_ci)
    return env


def _common(site, assets):
    return {"csp": CSP, "scripts": [], "version": __version__, "run_title": site.data.title, "nav": site.nav(),
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "run_name": site.data.path.name, "pixelated": 0 < assets.thumb_px < 56,
            "notes": site.data.notes}


def _write_css(root, site):
    """The static stylesheet plus one swatch colour per class (matching the figures)."""
    css = (STATIC / "style.css").read_text()
    swatches = "".join(
        f".swatch-{i}{{background:#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}}}\n"
        for i, (r, g, b) in enumerate(site.colours.values()))
    (root / "style.css").write_text(css + "\n/* class colours, as in the figures */\n" + swatches)


def _fmt_num(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def _fmt_ci(iv, digits=2):
    """``{"value", "low", "high"}`` -> ``0.53 [0.48–0.58]`` (``—`` without an estimate)."""
    if not iv or iv.get("value") is None:
        return "—"
    text = f"{iv['value']:.{digits}f}"
    if iv.get("low") is not None and iv.get("high") is not None:
        text += f" [{iv['low']:.{digits}f}–{iv['high']:.{digits}f}]"
    return text


def _fmt_pct(x, digits=1):
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def _fmt_secs(x):
    if x is None:
        return "—"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def _fmt_shape(shape):
    return "—" if not shape else "×".join("?" if s is None else str(s) for s in shape)
