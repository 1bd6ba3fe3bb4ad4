"""The page of a comparison folder (``python -m pipeline compare``), built from that folder only.

Same rules as the run report: a static, offline page under the report's Content-Security-Policy
(no script at all), names escaped by Jinja2's autoescape, figures drawn with math text off, links
relative so the folder can be moved with the reports it points to.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report import figures as figs
from pipeline.report.csp import CSP
from pipeline.storage.catalog import COMPARISON, Catalog
from pipeline.storage.store import RunStore
from pipeline.version import __version__

TEMPLATE = "compare.html"


def build_compare_page(folder, final=None) -> Path:
    """Write ``index.html``, ``style.css`` and the figures of a comparison folder.

    Parameters
    ----------
    folder : path
        The comparison folder (its tables already written), possibly still a ``.partial`` build.
    final : path, optional
        Where the folder will be published; links to the runs' reports are relative to it.

    Returns
    -------
    pathlib.Path
        The page.
    """
    from pipeline.report.build import STATIC, _environment

    folder = Path(folder)
    final = Path(final) if final is not None else folder
    catalog = Catalog(RunStore(folder), COMPARISON)
    summary = catalog.read("compare_summary")
    cka = catalog.read("compare_cka")
    curves = catalog.read("compare_layers")
    files = {}
    if cka is not None and len(cka):
        files["cka.png"] = _png(_cross_heatmap(cka, summary))
    if curves is not None and curves[["probe_accuracy", "knn_accuracy"]].notna().any().any():
        files["curves.png"] = _png(_curves(curves, summary))
    catalog.write("compare_figures", files)
    ctx = {"csp": CSP, "version": __version__, "s": summary, "figures": {k: f"img/{k}" for k in files},
           "links": {r: _link(summary[f"run_{r}"].get("report"), final) for r in ("a", "b")},
           "pairs": summary.get("layer_pairs", []),
           "clusters": _records(catalog.read("compare_clusters")),
           "accuracy": _records(catalog.read("compare_accuracy")),
           "verdicts": _records(catalog.read("compare_verdicts"))}
    html = _environment().get_template(TEMPLATE).render(**ctx)
    RunStore(folder).write_bytes("index.html", html.encode("utf-8"))
    RunStore(folder).write_bytes("style.css", (STATIC / "style.css").read_bytes())
    return folder / "index.html"


def _link(target, final):
    if not target:
        return None
    return os.path.relpath(target, Path(final).resolve()).replace(os.sep, "/")


def _records(table):
    if table is None:
        return []
    out = []
    for row in table.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    figs.save_png(fig, buf)
    return buf.getvalue()


def _cross_heatmap(cka: pd.DataFrame, summary):
    rows = list(dict.fromkeys(cka.sort_values("position_a")["layer_a"]))
    cols = list(dict.fromkeys(cka.sort_values("position_b")["layer_b"]))
    matrix = cka.pivot(index="layer_a", columns="layer_b", values="cka").reindex(index=rows, columns=cols).to_numpy()
    with figs.style():
        fig = figs.figure(min(11.0, max(4.2, 0.5 * len(cols) + 2.8)), min(10.0, max(3.8, 0.45 * len(rows) + 2.2)))
        ax = fig.add_subplot()
        ax.grid(False)
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), [figs.short(c, 18) for c in cols], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), [figs.short(r, 18) for r in rows])
        if len(rows) * len(cols) <= 144:
            for i in range(len(rows)):
                for j in range(len(cols)):
                    v = matrix[i, j]
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                                color="black" if v > 0.6 else "white")
        for _, r in cka[cka["paired"]].iterrows():
            ax.add_patch(_box(cols.index(r["layer_b"]), rows.index(r["layer_a"])))
        ax.set_xlabel(f"B: {figs.short(summary['run_b']['name'], 40)}")
        ax.set_ylabel(f"A: {figs.short(summary['run_a']['name'], 40)}")
        ax.set_title("Linear CKA, every layer of A × every layer of B")
        fig.colorbar(im, ax=ax, shrink=0.8, label="CKA")
    return fig


def _box(x, y):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#e8590c", linewidth=1.8)


def _curves(curves: pd.DataFrame, summary):
    with figs.style():
        fig = figs.figure(6.4, 3.6)
        ax = fig.add_subplot()
        for run, colour in (("a", "#1f77b4"), ("b", "#d62728")):
            part = curves[curves["run"] == run].sort_values("position")
            name = figs.short(summary[f"run_{run}"]["name"], 24)
            for column, style, label in (("probe_accuracy", "-", "probe"), ("knn_accuracy", "--", "kNN")):
                values = part[column].to_numpy(dtype=float)
                if np.isfinite(values).any():
                    ax.plot(part["depth"], values, style, marker="o", markersize=4, color=colour,
                            label=f"{run.upper()} {name}: {label}")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("relative depth (first analysed layer = 0, last = 1)")
        ax.set_ylabel("accuracy")
        ax.set_title("Class information per layer, both runs")
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    return fig
