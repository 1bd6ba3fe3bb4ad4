"""The shortcut finder in the report: "Is the model relying on the wrong cue?".

Turns the probe stage's tables (``bias_verdicts.parquet``, ``bias.parquet``, ``probe_units.parquet``,
``probes/``) into plain values for ``index.html`` and into the cue sensitivities shown on unit and
cluster cards. Cluster sensitivities are recomputed from the current ``clusters.parquet``
(:func:`pipeline.shortcuts.verdicts.cluster_sensitivity`), never read from ``probe_clusters.parquet``, so they
always match the clusters the report shows.
"""
from __future__ import annotations

import re

import numpy as np

from pipeline.report.names import layer_page, slug
from pipeline.report.values import num as _num

CUES = ("colour", "texture", "shape")
GROUP_ORDER = ("colour", "texture", "shape", "context")
BADGES = {"relies on colour": "colour", "relies on texture": "texture", "shape-driven": "shape",
          "inconclusive": "inconclusive"}
HEADLINES = {
    "relies on colour": "Changing only the colours changes the model's decisions on this class.",
    "relies on texture": "Blurring away fine texture changes the decisions more than scrambling the shape does.",
    "shape-driven": "Only destroying the global shape changes the decisions; colour and blur leave them alone.",
    "inconclusive": "No single cue clearly drives the decisions on this class.",
}
PROBE_OF_CUE = {"colour": "recolouring", "texture": "blur", "shape": "patch shuffle"}
TOP_CLUSTERS = 6
TOP_UNITS = 12



def interval(value, low=None, high=None):
    """``{"value", "low", "high"}`` for the ``ci`` template filter (None when there is no estimate)."""
    value = _num(value)
    return None if value is None else {"value": value, "low": _num(low), "high": _num(high)}


# ---------------------------------------------------------------- readable reasons

_IV = re.compile(r"(-?\d+(?:\.\d+)?) \[(-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\]")


def readable(reason) -> list:
    """The verdict's ``reason`` as sentences: intervals as ``0.53 [0.48–0.58]``, one clause each.

    Examples
    --------
    >>> readable("recolouring loses 0.53 [0.48, 0.58] of the class signal; colour matters too")
    ['Recolouring loses 0.53 [0.48–0.58] of the class signal.', 'Colour matters too.']
    >>> readable("only 4 images (need 10): too few (see: below)")
    ['Only 4 images (need 10).', 'Too few (see: below).']
    """
    text = _IV.sub(lambda m: f"{m[1]} [{m[2]}–{m[3]}]", str(reason or "")).strip()
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and ch in ";:" and text[i + 1:i + 2] == " ":
            parts.append(text[start:i])
            start = i + 2
    parts.append(text[start:])
    out = []
    for part in (p.strip() for p in parts):
        if part:
            out.append(part[0].upper() + part[1:] + ("" if part[-1] in ".!?" else "."))
    return out


# ---------------------------------------------------------------- the section


def shortcut_section(site):
    """Values for the index's "wrong cue" section, or None when the probe stage has not run."""
    data = site.data
    if data.bias_verdicts is None and data.bias is None and data.probe_units is None:
        return None
    cfg = (data.manifest.get("config") or {}).get("probe") or {}
    summary = data.stage("probe").get("summary") or {}
    verdicts = _verdicts(site)
    counts = {}
    for v in verdicts:
        counts.setdefault(v["verdict"], []).append(v["name"])
    return {"level": round(100 * float(cfg.get("confidence", 0.95))), "min_effect": _num(cfg.get("min_effect")),
            "verdicts": verdicts, "counts": [{"verdict": k, "badge": BADGES.get(k, "inconclusive"), "classes": c}
                                             for k, c in counts.items()],
            "images": summary.get("images"), "why_no_classes": summary.get("class_metrics"),
            "probes": _probe_table(site), "chart": _chart(site, cfg), "examples": _examples(site),
            "clusters": _colour_clusters(site), "units": _colour_units(site),
            "has_units": data.probe_units is not None}


def _verdicts(site):
    table = site.data.bias_verdicts
    if table is None or table.empty:
        return []
    rows = []
    for r in table.sort_values("class", kind="stable").to_dict("records"):
        verdict = str(r.get("verdict"))
        link = site.class_link(r.get("class"))
        swatch = list(site.data.class_names).index(int(r["class"])) if link else None
        cues = [{"cue": c, "lost": interval(r.get(f"{c}_lost"), r.get(f"{c}_ci_low"), r.get(f"{c}_ci_high")),
                 "chosen": c == r.get("cue")} for c in CUES]
        rows.append({"name": str(r.get("class_name")), "link": link, "swatch": swatch, "verdict": verdict,
                     "badge": BADGES.get(verdict, "inconclusive"), "cue": r.get("cue") or None,
                     "effect": interval(r.get("effect_size"), r.get("effect_ci_low"), r.get("effect_ci_high")),
                     "cues": cues, "n": _int(r.get("n")), "n_correct": _int(r.get("n_correct")),
                     "accuracy": _num(r.get("accuracy")), "headline": HEADLINES.get(verdict),
                     "why": readable(r.get("reason"))})
    return rows


def _int(x):
    v = _num(x)
    return None if v is None else int(v)


def _probe_order(table):
    """Probes in cue order (colour, texture, shape, context, others), as in the stage's table."""
    seen = table.drop_duplicates("probe")[["probe", "group"]].to_dict("records")
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    seen.sort(key=lambda r: rank.get(r["group"], len(rank)))
    return [(str(r["probe"]), str(r["group"] or "")) for r in seen]


def _probe_table(site):
    """Per class, per probe: signal lost with its interval (``None`` = not applicable)."""
    table = site.data.bias
    if table is None or table.empty:
        return None
    probes = _probe_order(table)
    by = {(int(r["class"]), str(r["probe"])): r for r in table.to_dict("records")}
    rows = []
    for label in sorted({int(c) for c in table["class"]}):
        cells = []
        for probe, _ in probes:
            r = by.get((label, probe))
            applicable = r is not None and bool(r.get("applicable", True))
            cells.append({"lost": interval(r["signal_lost"], r.get("signal_ci_low"), r.get("signal_ci_high"))
                          if applicable else None,
                          "note": "" if r is None else str(r.get("note") or "")})
        name = next(str(r["class_name"]) for (k, _), r in by.items() if k == label)
        rows.append({"name": name, "link": site.class_link(label), "cells": cells})
    return {"probes": [{"name": p, "group": g} for p, g in probes], "rows": rows}


def _chart(site, cfg):
    from pipeline.report import figures as figs

    table = site.data.bias
    if table is None or table.empty:
        return None
    probes = _probe_order(table)
    labels = sorted({int(c) for c in table["class"]})
    shape = (len(probes), len(labels))
    values, lows, highs = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    pos = {p: i for i, (p, _) in enumerate(probes)}
    col = {k: j for j, k in enumerate(labels)}
    for r in table.to_dict("records"):
        if not bool(r.get("applicable", True)):
            continue
        i, j = pos[str(r["probe"])], col[int(r["class"])]
        values[i, j], lows[i, j], highs[i, j] = (_num(r.get(c)) if _num(r.get(c)) is not None else np.nan
                                                 for c in ("signal_lost", "signal_ci_low", "signal_ci_high"))
    if not np.isfinite(values).any():
        return None
    palette = site.colours
    colours = [palette.get(k, figs.GREY) for k in labels]
    names = [site.data.class_name(k) if k in site.data.class_names else
             str(table[table["class"] == k]["class_name"].iloc[0]) for k in labels]
    fig = figs.signal_lost([p for p, _ in probes], [g for _, g in probes], names, values, lows, highs, colours,
                           threshold=_num(cfg.get("min_effect", 0.2)))
    return site.assets.figure(fig, "shortcut-signal-lost")


def _examples(site):
    """The probe stage's example images, copied into the report (None when absent)."""
    data = site.data
    index = data.probe_examples
    grid = None
    if data.run.catalog.exists("probe_images", "examples.png"):
        grid = site.assets.run_image("probes/examples.png", "examples", max_size=1024, folder="probe")
    strips = []
    if index is not None:
        for r in index.to_dict("records"):
            src = site.assets.run_image(r.get("path"), slug(r.get("probe")), max_size=1024, folder="probe")
            strips.append({"name": str(r.get("probe")), "group": str(r.get("group") or ""),
                           "description": str(r.get("description") or ""), "src": src})
    if grid is None and not strips:
        return None
    return {"grid": grid, "columns": [s["name"] for s in strips], "strips": strips}


# ---------------------------------------------------------------- units and clusters


class CueLookup:
    """Colour / texture / shape sensitivity per unit and per (current) cluster; empty without the probe stage."""

    def __init__(self, data):
        self.units, self.clusters = {}, {}
        self.available = data.probe_units is not None
        units = data.probe_units
        if units is None or units.empty:
            return
        cols = [f"{c}_sensitivity" for c in CUES]
        if not set(cols) <= set(units.columns):
            self.available = False
            return
        for r in units[["layer", "channel", *cols]].to_dict("records"):
            self.units[(r["layer"], int(r["channel"]))] = _cue_values(r)
        if data.clusters is not None:
            from pipeline.shortcuts.verdicts import cluster_sensitivity

            for r in cluster_sensitivity(units, data.clusters).to_dict("records"):
                self.clusters[(r["layer"], int(r["cluster"]))] = _cue_values(r)

    def unit(self, layer, channel):
        return self.units.get((layer, int(channel)))

    def cluster(self, layer, cluster):
        return self.clusters.get((layer, int(cluster)))


def _cue_values(row):
    """``[{"cue", "value", "top"}]`` with the largest finite one marked, or None when all are NaN."""
    values = {c: _num(row.get(f"{c}_sensitivity")) for c in CUES}
    finite = {c: v for c, v in values.items() if v is not None}
    if not finite:
        return None
    top = max(finite, key=finite.get)
    return [{"cue": c, "value": v, "top": c == top} for c, v in values.items()]


def _colour_clusters(site):
    """The most colour-sensitive clusters (recomputed on the current clusters) with their images."""
    from pipeline.shortcuts import verdicts as bias

    data = site.data
    if data.probe_units is None or data.clusters is None or "colour_sensitivity" not in data.probe_units:
        return None
    index = data.maximize
    if index is not None and not {"kind", "layer", "cluster", "path"} <= set(index.columns):
        index = None
    table = bias.colour_clusters(bias.cluster_sensitivity(data.probe_units, data.clusters), index, TOP_CLUSTERS)
    summary = data.cluster_summary
    top_class = {} if summary is None or "top_class" not in summary else {
        (r["layer"], int(r["cluster"])): r["top_class"] for r in summary.to_dict("records")}
    out = []
    for r in table.to_dict("records"):
        layer, c = r["layer"], int(r["cluster"])
        row = site.max_clusters.get((layer, c))
        if row is None and isinstance(r.get("path"), str):
            row = {"path": r["path"]}
        out.append({"layer": layer, "id": c, "href": f"{layer_page(layer)}#cluster-{c}", "size": _int(r.get("size")),
                    "img": site.max_image(row, f"{slug(layer)}-cluster-{c}"), "cues": _cue_values(r),
                    "top_class": site.class_link(top_class.get((layer, c)))})
    return out


def _colour_units(site):
    """The units that move most under recolouring (live units only), linked to their cards."""
    data = site.data
    units = data.probe_units
    if units is None or "colour_sensitivity" not in units:
        return []
    rows = units.dropna(subset=["colour_sensitivity"])
    if data.clusters is not None:
        live = data.clusters[~data.clusters["dead"].astype(bool)][["layer", "channel"]]
        rows = rows.merge(live, on=["layer", "channel"], how="inner")
    rows = rows.sort_values("colour_sensitivity", ascending=False, kind="stable").head(TOP_UNITS)
    return [{"layer": r["layer"], "channel": int(r["channel"]), "value": _num(r["colour_sensitivity"]),
             "href": site.unit_href(r["layer"], int(r["channel"])) if data.clusters is not None else None}
            for r in rows.to_dict("records")]
