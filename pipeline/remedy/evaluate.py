"""Before -> after tables of a remedy: verdicts, accuracies and the clusters that changed most.

Pure numpy/pandas on logits and on the two runs' tables; :mod:`pipeline.remedy.run` produces
those. Intervals are paired percentile-bootstrap intervals over images (the same resamples for
before and after, :class:`pipeline.shortcuts.verdicts.Bootstrap`), seeded.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.shortcuts.verdicts import CUES, Bootstrap

FLAGGED = {"relies on colour": "colour", "relies on texture": "texture"}

VERDICT_CHANGE_COLUMNS = ["class", "class_name", "verdict_before", "verdict_after", "n", "accuracy_before",
                          "accuracy_after",
                          *[f"{c}_{s}_{w}" for c in CUES for w in ("before", "after")
                            for s in ("lost", "ci_low", "ci_high")],
                          "reason_before", "reason_after"]
ACCURACY_COLUMNS = ["split", "probe", "group", "n", "accuracy_before", "before_ci_low", "before_ci_high",
                    "accuracy_after", "after_ci_low", "after_ci_high", "change", "change_ci_low", "change_ci_high"]
CLUSTER_CHANGE_COLUMNS = ["layer", "cluster", "size", "cue", "sensitivity_before", "sensitivity_after", "change",
                          "path_before", "cluster_after", "overlap_after", "path_after"]


def flagged_cue(verdicts) -> str | None:
    """The cue most classes are flagged for (``colour`` or ``texture``; ties: colour), or None."""
    if verdicts is None or not len(verdicts):
        return None
    counts = verdicts["verdict"].map(FLAGGED).value_counts()
    return str(max(counts.index, key=lambda c: (counts[c], c == "colour"))) if len(counts) else None


def verdict_change(before, after) -> pd.DataFrame:
    """One row per class: both verdicts and every cue's ``signal_lost`` with its interval, before and after.

    ``before`` and ``after`` are :func:`pipeline.shortcuts.verdicts.shortcut_tables` verdict tables
    of the same images.
    """
    keep = ["class", "class_name", "verdict", "n", "accuracy", "reason",
            *[f"{c}_{s}" for c in CUES for s in ("lost", "ci_low", "ci_high")]]
    merged = before[keep].merge(after[keep].drop(columns=["class_name", "n"]), on="class", suffixes=("_before", "_after"))
    return merged.reindex(columns=VERDICT_CHANGE_COLUMNS)


def count_flagged(verdicts, cue) -> int:
    return int((verdicts["verdict"] == f"relies on {cue}").sum())


def accuracy_table(labels, splits, before, after, groups, seed=0, n_boot=1000, confidence=0.95) -> pd.DataFrame:
    """Accuracy before and after, per split and pass, with intervals and the paired change.

    Parameters
    ----------
    labels : (N,) int
    splits : (N,) str
        Which part each image is in (``held-out``, ``fine-tuned``).
    before, after : dict
        ``{pass name: (N, K) logits}``; ``original`` first, then each probe, same keys.
    groups : dict
        ``{probe name: group}``.
    seed, n_boot, confidence : bootstrap settings.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`ACCURACY_COLUMNS`; the ``probe`` of the originals is ``original``.
    """
    labels, splits = np.asarray(labels), np.asarray(splits)
    rows = []
    for split in dict.fromkeys(splits.tolist()):
        sel = splits == split
        boot = Bootstrap(int(sel.sum()), n_boot, [int(seed), 0xACC], confidence)
        for name in before:
            right = [np.asarray(z[sel]).argmax(axis=1) == labels[sel] for z in (before[name], after[name])]
            cols = np.stack([right[0], right[1], right[1].astype(float) - right[0]], axis=1).astype(np.float64)
            point, reps = boot.sums(cols)
            n = max(int(sel.sum()), 1)
            iv = boot.interval(point / n, reps / n)
            rows.append({"split": split, "probe": name, "group": "original" if name == "original" else groups[name],
                         "n": int(sel.sum()), "accuracy_before": iv.value[0], "before_ci_low": iv.low[0],
                         "before_ci_high": iv.high[0], "accuracy_after": iv.value[1], "after_ci_low": iv.low[1],
                         "after_ci_high": iv.high[1], "change": iv.value[2], "change_ci_low": iv.low[2],
                         "change_ci_high": iv.high[2]})
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def group_accuracy(table, split, group) -> tuple[float, float]:
    """Mean accuracy before and after over the passes of ``group`` in ``split`` (``original`` too)."""
    rows = table[(table["split"] == split) & (table["group"] == group)]
    return float(rows["accuracy_before"].mean()), float(rows["accuracy_after"].mean())


def cluster_changes(cue, units_before, units_after, clusters_before, clusters_after=None, images_before=None,
                    images_after=None, top=6) -> pd.DataFrame:
    """The neuron clusters of the original model whose sensitivity to ``cue`` changed most.

    Fine-tuning keeps every unit, so a cluster of the original model is followed through its
    member units: its sensitivity after is the mean of the same units' sensitivities in the
    remedied model. Its image "after" is that of the remedied model's cluster (same layer) sharing
    the most members with it (``overlap_after``: Jaccard index), when one was rendered.

    Parameters
    ----------
    cue : str
        ``colour``, ``texture`` or ``shape``.
    units_before, units_after : DataFrame
        The runs' ``probe_units`` tables.
    clusters_before, clusters_after : DataFrame
        The runs' ``clusters`` tables (``clusters_after`` optional).
    images_before, images_after : DataFrame, optional
        The runs' ``maximize`` indexes.
    top : int

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CLUSTER_CHANGE_COLUMNS`, largest ``|change|`` first; paths relative to each run.
    """
    column = f"{cue}_sensitivity"
    live = clusters_before[(clusters_before["cluster"] >= 0) & ~clusters_before["dead"].astype(bool)]
    live = live[["layer", "channel", "cluster"]]
    sens = live.merge(units_before[["layer", "channel", column]], on=["layer", "channel"]).merge(
        units_after[["layer", "channel", column]], on=["layer", "channel"], suffixes=("_before", "_after"))
    if sens.empty:
        return pd.DataFrame(columns=CLUSTER_CHANGE_COLUMNS)
    table = sens.groupby(["layer", "cluster"], sort=True).agg(
        size=("channel", "size"), sensitivity_before=(f"{column}_before", "mean"),
        sensitivity_after=(f"{column}_after", "mean")).reset_index()
    table["cue"] = cue
    table["change"] = table["sensitivity_after"] - table["sensitivity_before"]
    table = table.dropna(subset=["change"])
    table = table.reindex(table["change"].abs().sort_values(ascending=False, kind="stable").index).head(top)
    table["path_before"] = [_image(images_before, r.layer, r.cluster) for r in table.itertuples()]
    matches = [_best_match(live, clusters_after, r.layer, r.cluster) for r in table.itertuples()]
    table["cluster_after"] = [m[0] for m in matches]
    table["overlap_after"] = [m[1] for m in matches]
    table["path_after"] = [_image(images_after, r.layer, m[0]) if m[0] is not None else None
                           for r, m in zip(table.itertuples(), matches)]
    return table.reset_index(drop=True).reindex(columns=CLUSTER_CHANGE_COLUMNS)


def _image(index, layer, cluster):
    if index is None or not len(index) or cluster is None:
        return None
    hit = index[(index["kind"] == "cluster") & (index["layer"] == layer) & (index["cluster"] == cluster)]
    return str(hit["path"].iloc[0]) if len(hit) else None


def _best_match(live_before, clusters_after, layer, cluster):
    """``(cluster of the remedied model, Jaccard overlap)`` sharing most members, or ``(None, nan)``."""
    if clusters_after is None or not len(clusters_after):
        return None, np.nan
    members = set(live_before[(live_before["layer"] == layer) & (live_before["cluster"] == cluster)]["channel"])
    after = clusters_after[(clusters_after["layer"] == layer) & (clusters_after["cluster"] >= 0)]
    best, score = None, 0.0
    for c, group in after.groupby("cluster", sort=True):
        other = set(group["channel"])
        j = len(members & other) / max(len(members | other), 1)
        if j > score:
            best, score = int(c), j
    return best, (score if best is not None else np.nan)
