"""Every artifact of a run directory, named once: where it lives, what it holds, which stage makes it.

Stages, the runner, the report and :func:`pipeline.load_run` refer to artifacts by name
(``"dataset"``, ``"clusters"``…) and read or write them through a :class:`Catalog`; only this
module spells their paths, and only it and :class:`~pipeline.storage.store.RunStore` touch the files.
The layout inside ``activations.zarr`` is :mod:`pipeline.storage.arrays`.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError


@dataclass(frozen=True)
class Artifact:
    """One file or folder of a run directory.

    Attributes
    ----------
    name : str
        How code refers to it (also the attribute of :func:`pipeline.load_run`'s result for tables).
    path : str
        Relative to the run directory.
    kind : {"table", "json", "zarr", "folder", "file"}
        Tables are parquet (or CSV when the path ends in ``.csv``); folders hold files the stage
        writes one by one (PNGs).
    stage : str
        The stage that writes it (``runner`` for the manifest).
    about : str
        One line for people (the README's run-directory table says more).
    """

    name: str
    path: str
    kind: str
    stage: str
    about: str


ARTIFACTS = (
    Artifact("manifest", "manifest.json", "json", "runner", "config, and per stage its hashes, status and summary"),
    Artifact("dataset", "dataset.parquet", "table", "extract", "one row per image used: path, label, source_label, split"),
    Artifact("skipped", "skipped.csv", "table", "extract", "inputs not used, with the reason"),
    Artifact("activations", "activations.zarr", "zarr", "extract", "per-layer activations, logits, thumbnails"),
    Artifact("extract_progress", "extract.progress.json", "json", "extract", "finished chunk groups (while running)"),
    Artifact("extract_shards", "extract.shards", "folder", "extract", "Dask shards' done markers (while running)"),
    Artifact("image_embeddings", "embeddings/images.parquet", "table", "embed", "t-SNE/UMAP position of every image per layer"),
    Artifact("neuron_embeddings", "embeddings/neurons.parquet", "table", "embed", "t-SNE/UMAP position of every unit per layer"),
    Artifact("embedding_quality", "embeddings/quality.parquet", "table", "embed", "trustworthiness and kNN accuracy of the maps"),
    Artifact("clusters", "clusters.parquet", "table", "cluster", "one row per unit: statistics, cluster, stability"),
    Artifact("cluster_summary", "cluster_summary.parquet", "table", "cluster", "one row per cluster"),
    Artifact("layers", "layers.parquet", "table", "cluster", "one row per layer: separability, CKA, probe accuracy"),
    Artifact("bias", "bias.parquet", "table", "probe", "shortcut finder: class x probe effects with intervals"),
    Artifact("bias_verdicts", "bias_verdicts.parquet", "table", "probe", "shortcut verdict per class"),
    Artifact("probe_units", "probe_units.parquet", "table", "probe", "each unit's sensitivity to each probe"),
    Artifact("probe_clusters", "probe_clusters.parquet", "table", "probe", "each cluster's sensitivity to each probe"),
    Artifact("probe_predictions", "probe_predictions.parquet", "table", "probe",
             "per probed image and probe (original included): label and predicted output"),
    Artifact("probe_examples", "probes/index.parquet", "table", "probe", "the probe example images"),
    Artifact("probe_images", "probes", "folder", "probe", "example images: original and each probe"),
    Artifact("maximize", "maximize/index.parquet", "table", "maximize", "one row per rendered image"),
    Artifact("maximize_images", "maximize", "folder", "maximize", "activation-maximization PNGs, partial indexes"),
    Artifact("report_summary", "report.json", "json", "report", "where the report was written, pages and sizes"),
    Artifact("comparison_folders", "comparisons", "folder", "compare",
             "default home of `python -m pipeline compare A B` folders (in B), one per run A"),
    Artifact("comparisons", "comparisons.json", "json", "compare",
             "comparisons made with this run (`python -m pipeline compare`): where they are"),
    # In a remedied model's run directory (`python -m pipeline remedy RUN` makes RUN/remedy/).
    Artifact("remedy_model", "model.keras", "file", "remedy", "the fine-tuned copy, saved with plain Keras"),
    Artifact("remedy_summary", "remedy.json", "json", "remedy",
             "cue, augmentations, settings, split sizes, headline figures, seconds"),
    Artifact("remedy_split", "remedy_split.parquet", "table", "remedy", "index, label, split (fine-tuned | held-out)"),
    Artifact("remedy_verdicts", "remedy_verdicts.parquet", "table", "remedy",
             "per class, held-out images: verdicts and cue losses before / after"),
    Artifact("remedy_accuracy", "remedy_accuracy.parquet", "table", "remedy",
             "per split and pass: accuracy before / after, paired change, 95 % intervals"),
    Artifact("remedy_clusters", "remedy_clusters.parquet", "table", "remedy",
             "the original's clusters whose cue sensitivity changed most"),
    Artifact("remedy_history", "remedy_history.parquet", "table", "remedy",
             "per fine-tune epoch: loss, accuracy, counterfactual images, seconds"),
    Artifact("remedy_page", "before-after", "folder", "remedy", "the offline before -> after page"),
    Artifact("remedy_report", "report", "folder", "remedy", "the remedied run's own report"),
)

BY_NAME = {a.name: a for a in ARTIFACTS}
TABLES = tuple(a.name for a in ARTIFACTS if a.kind == "table")

#: The files of a comparison folder (``python -m pipeline compare RUN_A RUN_B``), read and written
#: with ``Catalog(RunStore(folder), COMPARISON)``; the README's "Comparing two runs" says more.
COMPARISON = (
    Artifact("compare_summary", "compare.json", "json", "compare",
             "both runs, the image matching (rule, counts, note), layer pairs, headline figures"),
    Artifact("compare_cka", "cka.parquet", "table", "compare", "linear CKA of every layer of A x every layer of B"),
    Artifact("compare_units", "units.parquet", "table", "compare",
             "per unit of A: its best-matching unit of B (Pearson r) in the paired layer"),
    Artifact("compare_clusters", "cluster_matches.parquet", "table", "compare",
             "per neuron cluster of A: median best-match r of its members, counterpart in B or not"),
    Artifact("compare_layers", "layer_curves.parquet", "table", "compare",
             "per run and layer: probe / kNN accuracy and silhouette (from each run's layers table)"),
    Artifact("compare_accuracy", "accuracy.parquet", "table", "compare",
             "accuracy of A and B overall and per class on the matched images, paired difference"),
    Artifact("compare_verdicts", "verdicts.parquet", "table", "compare",
             "shortcut verdicts side by side, per class and cue: signal lost, difference, paired 95 % CI"),
    Artifact("compare_figures", "img", "folder", "compare", "the comparison page's figures"),
)
COMPARISON_BY_NAME = {a.name: a for a in COMPARISON}


def artifact(name) -> Artifact:
    """The artifact called ``name``; a programming error (KeyError) when there is none."""
    return BY_NAME[name]


def path(name, *parts) -> str:
    """Relative path of artifact ``name``, or of ``parts`` inside a folder artifact."""
    base = BY_NAME[name].path
    return "/".join((base, *map(str, parts))) if parts else base


class Catalog:
    """Typed reading and writing of a run directory's artifacts, by name.

    Parameters
    ----------
    store : pipeline.storage.store.RunStore
        The run directory's store (it does the atomic writes).
    artifacts : sequence of Artifact, optional
        The artifacts it knows; default those of a run directory (:data:`ARTIFACTS`), or
        :data:`COMPARISON` for a comparison folder.
    """

    def __init__(self, store, artifacts=None):
        self.store = store
        self._by_name = BY_NAME if artifacts is None else {a.name: a for a in artifacts}

    def _path(self, name, *parts) -> str:
        base = self._by_name[name].path
        return "/".join((base, *map(str, parts))) if parts else base

    def path(self, name, *parts):
        """Absolute path of an artifact (or of a file inside a folder artifact)."""
        return self.store.path(self._path(name, *parts))

    def exists(self, name, *parts) -> bool:
        return self.store.exists(self._path(name, *parts))

    def read(self, name, default=None):
        """A table as a DataFrame, JSON as Python objects, the zarr store as a read-only group;
        ``default`` when the artifact is absent."""
        a = self._by_name[name]
        if not self.store.exists(a.path):
            return default
        if a.kind == "table":
            return self.store.read_table(a.path)
        if a.kind == "json":
            return self.store.read_json(a.path, default=default)
        if a.kind == "zarr":
            return self.store.open_zarr(a.path)
        raise TypeError(f"{name} is a {a.kind}: open it at its path()")

    def require(self, name, why=""):
        """Like :meth:`read`, with a one-line error naming the stage to run when it is absent."""
        value = self.read(name)
        if value is None:
            a = self._by_name[name]
            raise UserError(f"{self.store.root} has no {a.path} yet{why}: run the {a.stage} stage first")
        return value

    def write(self, name, value) -> None:
        """Write an artifact atomically: a table (DataFrame), JSON, or a whole folder
        (``{relative path: bytes}``, built beside it and published by one rename)."""
        a = self._by_name[name]
        if a.kind == "table":
            self.store.write_table(a.path, value)
        elif a.kind == "json":
            self.store.write_json(a.path, value)
        elif a.kind == "folder":
            self._write_folder(a.path, value)
        else:
            raise TypeError(f"{name} is a {a.kind} store: build it with partial_dir")

    def _write_folder(self, folder, files) -> None:
        self.store.discard_partial(folder)
        built = self.store.partial_dir(folder).name
        for relative, data in files.items():
            self.store.write_bytes(f"{built}/{relative}", data)
        self.store.publish_dir(folder)

    def write_bytes(self, name, relative, data: bytes) -> None:
        """Write one file inside folder artifact ``name`` atomically (a PNG, a partial index)."""
        self.store.write_bytes(self._path(name, relative), data)

    def remove(self, name, *parts) -> None:
        self.store.remove(self._path(name, *parts))

    def stage_record(self, stage) -> dict:
        """What the manifest recorded for ``stage`` (status, hashes, summary), or ``{}``."""
        manifest = self.read("manifest", default={}) or {}
        return (manifest.get("stages") or {}).get(stage) or {}

    def summary(self, stage) -> dict:
        """The summary ``stage`` returned when it last finished (``{}`` if it never did)."""
        return self.stage_record(stage).get("summary") or {}
