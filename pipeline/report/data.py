"""Everything the report shows, read from the run directory only (never the user's image files).

Tables of stages that have not run are ``None``; the pages then say "not computed".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.shortcuts.verdicts import read_classes, softmax
from pipeline.config import STAGES
from pipeline.errors import UserError

STAGE_ORDER = STAGES
OPTIONAL = {  # attribute -> catalog name
    "quality": "embedding_quality",
    "bias": "bias",                      # the shortcut finder (probe stage), per class x probe
    "bias_verdicts": "bias_verdicts",    # ... and its verdict per class
    "probe_units": "probe_units",        # ... each unit's sensitivity to each probe
    "probe_examples": "probe_examples",  # ... and its example images, one strip per probe
}


@dataclass
class Predictions:
    """The model's outputs on the analysed images, softmaxed.

    ``aligned`` says whether output ``k`` can be read as class ``k`` (the class codes are the
    user's own labels and there are as many outputs as declared classes); only then are accuracy,
    confusion and "most confused" examples meaningful. Otherwise ``why_not`` says why.
    """

    predicted: np.ndarray          # (N,) argmax output
    confidence: np.ndarray         # (N,) probability of the predicted output
    p_label: np.ndarray | None     # (N,) probability of the true label (aligned only; NaN unlabelled)
    n_outputs: int
    aligned: bool
    why_not: str | None = None     # one clause: why outputs are not read as classes


@dataclass
class ReportData:
    """A run directory opened for the report."""

    run: object
    title: str
    manifest: dict
    dataset: pd.DataFrame
    skipped: pd.DataFrame
    layer_names: list
    layer_info: dict
    class_names: dict              # code -> name, every declared class (also those without images)
    labels: np.ndarray             # (N,) class codes, -1 = unlabelled
    classes: object = None         # pipeline.shortcuts.verdicts.Classes: also whether codes are the user's labels
    clusters: pd.DataFrame | None = None
    cluster_summary: pd.DataFrame | None = None
    layers: pd.DataFrame | None = None
    image_embeddings: pd.DataFrame | None = None
    neuron_embeddings: pd.DataFrame | None = None
    quality: pd.DataFrame | None = None
    maximize: pd.DataFrame | None = None
    bias: pd.DataFrame | None = None
    bias_verdicts: pd.DataFrame | None = None
    probe_units: pd.DataFrame | None = None
    probe_examples: pd.DataFrame | None = None
    predictions: Predictions | None = None
    notes: list = field(default_factory=list)
    comparisons: list = field(default_factory=list)  # comparisons.json: `python -m pipeline compare` folders

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def class_index(self, values) -> np.ndarray:
        """Position of each class code in ``class_names``.

        Per-class arrays (palettes, legends) are sized by the number of classes and indexed by
        this position, never by the code itself: codes of old runs can be sparse (``3000000``).

        Parameters
        ----------
        values : array-like of int or float
            Class codes (labels, predictions, ``top_class``); NaN allowed.

        Returns
        -------
        numpy.ndarray of int64
            Same shape; -1 for unlabelled, NaN or codes that are not a class.
        """
        codes = np.fromiter(self.class_names, dtype=np.int64, count=len(self.class_names))
        order = np.argsort(codes, kind="stable")
        values = np.asarray(values, dtype=np.float64)
        out = np.full(values.shape, -1, dtype=np.int64)
        known = np.isfinite(values)
        if len(codes) and known.any():
            v = values[known].astype(np.int64)
            at = np.clip(np.searchsorted(codes[order], v), 0, len(codes) - 1)
            out[known] = np.where(codes[order][at] == v, order[at], -1)
        return out

    def class_name(self, label) -> str:
        if label is None or pd.isna(label) or int(label) < 0:
            return "unlabelled"
        return self.class_names.get(int(label), f"class {int(label)}")

    def layer_row(self, layer) -> dict | None:
        if self.layers is None:
            return None
        rows = self.layers[self.layers["layer"] == layer]
        return None if rows.empty else rows.iloc[0].to_dict()

    def units_of(self, layer) -> pd.DataFrame | None:
        if self.clusters is None:
            return None
        return self.clusters[self.clusters["layer"] == layer].sort_values("channel")

    def clusters_of(self, layer) -> pd.DataFrame | None:
        if self.cluster_summary is None:
            return None
        return self.cluster_summary[self.cluster_summary["layer"] == layer].sort_values("cluster")

    def stage(self, name) -> dict:
        return (self.manifest.get("stages") or {}).get(name) or {}


def load_report_data(run_dir, title=None) -> ReportData:
    """Open ``run_dir`` (needs the extract stage; everything else is optional)."""
    from pipeline.storage.results import Run

    run = Run(run_dir)
    run.catalog.require("dataset")
    manifest = run.manifest or {}
    dataset = run.dataset.reset_index(drop=True)
    labels = dataset["label"].to_numpy().astype(np.int64)
    classes = read_classes(dataset, manifest)
    skipped = run.skipped if run.skipped is not None else pd.DataFrame(columns=["path", "reason"])
    data = ReportData(
        run=run, title=title or (manifest.get("config") or {}).get("name") or run.path.name,
        manifest=manifest, dataset=dataset, skipped=skipped,
        layer_names=run.layer_names, layer_info=run.layers_info, class_names=classes.names, labels=labels,
        classes=classes,
        clusters=run.clusters, cluster_summary=run.cluster_summary, layers=run.layers,
        image_embeddings=run.image_embeddings, neuron_embeddings=run.neuron_embeddings,
        maximize=run.maximize)
    for attr, name in OPTIONAL.items():
        setattr(data, attr, getattr(run, name))
    data.predictions = predictions(run, labels, classes)
    listed = run.catalog.read("comparisons", default=None)
    data.comparisons = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    return data


def predictions(run, labels, classes, rows=8192) -> Predictions | None:
    """The model's predictions, read as classes only when output ``k`` is class ``k``.

    Parameters
    ----------
    run : pipeline.storage.results.Run
    labels : (N,) int
        Class codes (-1 = unlabelled).
    classes : pipeline.shortcuts.verdicts.Classes
        Decides whether outputs are classes (:meth:`~pipeline.shortcuts.verdicts.Classes.mismatch`).
    rows : int
        Logits softmaxed per chunk, so memory stays bounded for large runs.

    Returns
    -------
    Predictions or None
        None without stored logits, with fewer than 2 outputs, or when they do not cover the images.
    """
    try:
        logits = run.logits()
    except (KeyError, UserError):
        return None
    n, k = logits.shape
    if k < 2 or n != len(labels):
        return None
    why_not = classes.mismatch(k)
    aligned = why_not is None
    predicted, confidence = np.zeros(n, np.int64), np.zeros(n)
    p_label = np.full(n, np.nan) if aligned else None
    for start in range(0, n, rows):
        p = softmax(logits[start:start + rows])
        p = np.where(np.isfinite(p), p, 0.0)
        predicted[start:start + len(p)] = p.argmax(axis=1)
        confidence[start:start + len(p)] = p.max(axis=1)
        if aligned:
            lab = labels[start:start + len(p)]
            ok = lab >= 0
            p_label[start:start + len(p)][ok] = p[np.flatnonzero(ok), lab[ok]]
    return Predictions(predicted, confidence, p_label, int(k), aligned, why_not)
