"""``compare_runs``: read two run directories, compute the comparison, write its folder and page.

All reading goes through each run's catalog; the comparison folder is built as ``<out>.partial``
and published by one rename (:class:`~pipeline.storage.store.RunStore`), and an existing folder is
replaced only when this command wrote it.
"""
from __future__ import annotations

import hashlib
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.compare import analysis as an
from pipeline.errors import UserError
from pipeline.storage.catalog import COMPARISON, Catalog
from pipeline.storage.rundir import foreign_folder
from pipeline.storage.store import RunStore
from pipeline.version import __version__

MARKER = ".pipeline-compare.json"
UNIT_ROWS = 10_000  # images used at most for the unit correlations (seeded sample of the matched ones)


@dataclass
class CompareResult:
    """What :func:`compare_runs` wrote and computed.

    Attributes
    ----------
    out : pathlib.Path
        The comparison folder.
    page : pathlib.Path
        Its ``index.html``.
    summary : dict
        ``compare.json``: runs, image matching, layer pairs, headline figures, notes.
    cka, units, clusters, layers, accuracy, verdicts : pandas.DataFrame
        The tables of the folder (``cka.parquet``, ``units.parquet``, ``cluster_matches.parquet``,
        ``layer_curves.parquet``, ``accuracy.parquet``, ``verdicts.parquet``).
    notes : list of str
        What was left out or restricted, one sentence each (also in ``summary["notes"]``).
    """

    out: Path
    page: Path
    summary: dict
    cka: pd.DataFrame
    units: pd.DataFrame
    clusters: pd.DataFrame
    layers: pd.DataFrame
    accuracy: pd.DataFrame
    verdicts: pd.DataFrame
    notes: list = field(default_factory=list)


def default_out(run_a, run_b) -> Path:
    """``<RUN_B>/comparisons/<name of A>-<hash of A's path>``: in the later run, one folder per run A."""
    from pipeline.report.names import slug

    name = _run_name(run_a)
    tag = hashlib.sha256(str(Path(run_a).resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    folder = f"{slug(name).rsplit('-', 1)[0]}-{tag}"
    return Catalog(RunStore(run_b)).path("comparison_folders", folder)


def compare_runs(run_a, run_b, out=None, *, seed=0, min_overlap=an.MIN_OVERLAP, n_boot=1000, cka_rows=4096,
                 cka_batch=256, unit_rows=UNIT_ROWS, log=None) -> CompareResult:
    """Compare two runs over the same images (two models, two checkpoints, before/after a fix).

    Parameters
    ----------
    run_a, run_b : str or pathlib.Path
        Run directories with at least the extract stage done. Their images are matched by content
        hash (``dataset.parquet``'s ``content_hash``; for older runs computed from the recorded
        paths). ``b`` is read as the later or fixed model: differences are B − A.
    out : str or pathlib.Path, optional
        The comparison folder; default :func:`default_out` (``<run_b>/comparisons/<name of A>-<hash>``).
        Refused when it exists and was not written by this function.
    seed : int, default=0
        Seeds the CKA sample and grouping, the unit-correlation sample and the bootstraps.
    min_overlap : float, default=0.5
        Share of the smaller run's images that must be found in the other run (and at least 10
        images); otherwise :class:`~pipeline.errors.UserError`. With fewer than all, the comparison
        uses the intersection and says so (``summary["matching"]["note"]``).
    n_boot : int, default=1000
        Paired bootstrap resamples for the accuracy and verdict differences.
    cka_rows, cka_batch : int
        As the cluster stage's ``cka_rows`` / ``cka_batch``.
    unit_rows : int, default=10000
        Matched images used at most for the per-unit correlations (a seeded sample).
    log : callable, optional
        ``log(message)``; default prints to stderr.

    Returns
    -------
    CompareResult

    Raises
    ------
    UserError
        Not run directories, the extract stage missing, different image sets, or ``out`` not ours.

    Examples
    --------
    >>> from pipeline.compare import compare_runs
    >>> result = compare_runs("data/runs/before", "data/runs/after")       # doctest: +SKIP
    >>> result.cka.pivot(index="layer_a", columns="layer_b", values="cka")  # doctest: +SKIP
    """
    from pipeline.storage.results import Run
    from pipeline.storage.rundir import hold

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    runs = [Run(run_a), Run(run_b)]
    for run in runs:
        run.catalog.require("dataset")
        run.catalog.require("activations")
    out = Path(out) if out is not None else default_out(run_a, run_b)
    _check_replaceable(out)
    with ExitStack() as locks:
        for path in dict.fromkeys(Path(r).resolve() for r in (run_a, run_b)):
            locks.enter_context(hold(path))
        return _compare(runs, out, seed, min_overlap, n_boot, cka_rows, cka_batch, unit_rows, log)


def _compare(runs, out, seed, min_overlap, n_boot, cka_rows, cka_batch, unit_rows, log):
    from pipeline.inputs.dataset import recorded_hashes

    a, b = runs
    notes = []
    matching = an.match_images(recorded_hashes(a.dataset), recorded_hashes(b.dataset), min_overlap=min_overlap)
    if matching.note:
        log(f"compare: {matching.note}")
        notes.append(matching.note)
    log(f"compare: {matching.n} images; run A {a.path} ({len(a.layer_names)} layers), "
        f"run B {b.path} ({len(b.layer_names)} layers)")

    names_a, views_a = _layer_views(a, matching.rows_a)
    names_b, views_b = _layer_views(b, matching.rows_b)
    cka = an.cross_cka(views_a, views_b, batch_size=cka_batch, max_rows=cka_rows, seed=seed)
    pairs = an.pair_layers(names_a, names_b, cka)
    units = _units(views_a, views_b, names_a, names_b, pairs, matching.n, unit_rows, seed)
    cka_table = _cka_table(names_a, names_b, cka, pairs)
    clusters = an.cluster_counterparts(a.clusters, units, b.clusters)
    if a.clusters is None:
        notes.append("run A has no clusters.parquet (cluster stage not run): no cluster counterparts")
    curves = an.layer_curves(a.layers, b.layers, a.layer_names, b.layer_names)
    accuracy, why = _accuracy(a, b, matching, n_boot, seed)
    notes += why
    verdicts, why = _verdicts(a, b, n_boot, seed)
    notes += why
    for note in notes[1 if matching.note else 0:]:
        log(f"compare: {note}")

    summary = _summary(a, b, matching, pairs, cka_table, units, clusters, accuracy, verdicts, notes, seed, out)
    tables = {"compare_cka": cka_table, "compare_units": units, "compare_clusters": clusters,
              "compare_layers": curves, "compare_accuracy": accuracy, "compare_verdicts": verdicts}
    _write(out, tables, summary)
    _register(runs, out, summary)
    log(f"compare: {out / 'index.html'}")
    return CompareResult(out=out, page=out / "index.html", summary=summary, cka=cka_table, units=units,
                         clusters=clusters, layers=curves, accuracy=accuracy, verdicts=verdicts, notes=notes)


def _run_name(path) -> str:
    manifest = Catalog(RunStore(path)).read("manifest", default={}) or {}
    return str((manifest.get("config") or {}).get("name") or Path(path).resolve().name)


def _layer_views(run, rows):
    from pipeline.storage.arrays import open_activations, stored_array

    root, order, infos = open_activations(run.store)
    names, views = [], []
    for layer in order:
        array, _ = stored_array(root, infos[layer], "mean")
        if array is not None:
            names.append(layer)
            views.append(an.RowView(array, rows))
    return names, views


def _units(views_a, views_b, names_a, names_b, pairs, n, unit_rows, seed):
    rng = np.random.default_rng([int(seed), 0x0417])
    sample = np.sort(rng.choice(n, unit_rows, replace=False)) if n > unit_rows else np.arange(n)
    parts = []
    for layer_a, layer_b, why in pairs:
        if layer_b is None:
            continue
        xa = views_a[names_a.index(layer_a)][sample]
        xb = views_b[names_b.index(layer_b)][sample]
        part = an.best_matches(xa.reshape(len(xa), -1), xb.reshape(len(xb), -1))
        part.insert(0, "layer_a", layer_a)
        part.insert(1, "layer_b", layer_b)
        part.insert(2, "pair_rule", why)
        parts.append(part)
    columns = ["layer_a", "layer_b", "pair_rule", "channel", "best_channel", "best_corr", "second_corr", "mutual"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def _cka_table(names_a, names_b, cka, pairs):
    chosen = {(p[0], p[1]) for p in pairs}
    rows = [{"layer_a": la, "layer_b": lb, "position_a": i, "position_b": j, "cka": float(cka[i, j]),
             "paired": (la, lb) in chosen} for i, la in enumerate(names_a) for j, lb in enumerate(names_b)]
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "position_a", "position_b", "cka", "paired"])


def _classes(run):
    from pipeline.shortcuts.verdicts import read_classes

    return read_classes(run.dataset, run.manifest)


def _correct(run, rows, classes):
    """Whether the run's model is right on ``rows`` (None with the reason when outputs are not classes)."""
    try:
        logits = run.logits()
    except (KeyError, UserError):
        return None, "no stored logits"
    why = classes.mismatch(int(logits.shape[1]))
    if why:
        return None, why
    predicted = an.RowView(logits, rows).read().argmax(axis=1)
    return predicted == run.dataset["label"].to_numpy()[rows], None


def _accuracy(a, b, matching, n_boot, seed):
    notes = []
    classes_a, classes_b = _classes(a), _classes(b)
    correct = []
    for name, run, rows, classes in (("A", a, matching.rows_a, classes_a), ("B", b, matching.rows_b, classes_b)):
        ok, why = _correct(run, rows, classes)
        if why:
            notes.append(f"run {name}: no accuracy ({why})")
        correct.append(ok)
    labels = a.dataset["label"].to_numpy()[matching.rows_a]
    names_a = [classes_a.names.get(int(k)) for k in labels]
    names_b = [classes_b.names.get(int(k)) for k in b.dataset["label"].to_numpy()[matching.rows_b]]
    if names_a != names_b:
        notes.append("the two runs label some of the same images with different class names: per-class rows "
                     "follow run A's labels, each model is scored against its own run's labels")
    table = an.accuracy_table(classes_a.names, labels, *correct, n_boot=n_boot, seed=seed)
    return table, notes


def _verdicts(a, b, n_boot, seed):
    notes = []
    outcomes, why = _outcomes(a, b)
    if why:
        notes.append(f"verdict differences have no paired interval: {why}")
    table = an.verdict_table(a.bias_verdicts, b.bias_verdicts, outcomes, names_a=_classes(a).names,
                             names_b=_classes(b).names, n_boot=n_boot, seed=seed, note=why)
    if a.bias_verdicts is None or b.bias_verdicts is None:
        missing = " and ".join(n for n, r in (("A", a), ("B", b)) if r.bias_verdicts is None)
        notes.append(f"run {missing} has no shortcut verdicts (probe stage not run)")
    return table, notes


def _outcomes(a, b):
    """Both runs' probe decisions on the images probed in both, or ``(None, why not)``."""
    from pipeline.inputs.dataset import recorded_hashes

    tables = [a.probe_predictions, b.probe_predictions]
    for name, run, table in (("A", a, tables[0]), ("B", b, tables[1])):
        if table is None:
            done = run.catalog.stage_record("probe").get("status") == "done"
            return None, (f"run {name} has no per-image probe outcomes"
                          + (" (its probe stage ran before probe_predictions were stored: rerun it with "
                             "`python -m pipeline probe RUN --force`)" if done else " (probe stage not run)"))
    for name, run in (("A", a), ("B", b)):
        if run.bias_verdicts is None or run.bias_verdicts.empty:
            return None, f"run {name} has no per-class verdicts"
    wide = []
    for run, table in zip((a, b), tables):
        hashes = pd.Series(recorded_hashes(run.dataset), index=run.dataset["index"].to_numpy())
        table = table[table["label"] >= 0]
        pivot = table.pivot_table(index="index", columns="probe", values="predicted", aggfunc="first")
        pivot["label"] = table.groupby("index")["label"].first()
        pivot["hash"] = hashes.reindex(pivot.index).to_numpy()
        groups = dict(zip(table["probe"], table["group"]))
        wide.append((pivot.drop_duplicates("hash").set_index("hash"), groups))
    (pa, ga), (pb, gb) = wide
    common = pa.index.intersection(pb.index, sort=False)
    probes = [p for p in ga if p != "original" and p in gb]
    if len(common) < an.MIN_IMAGES or not probes:
        return None, f"only {len(common)} images were probed in both runs"
    pa, pb = pa.loc[common], pb.loc[common]
    outcomes = tuple(an.ProbeOutcomes(labels=p["label"].to_numpy(np.int64), original=p["original"].to_numpy(np.int64),
                                      probed={q: p[q].to_numpy(np.int64) for q in probes},
                                      groups={q: g[q] for q in probes})
                     for p, g in ((pa, ga), (pb, gb)))
    return outcomes, None


def _summary(a, b, matching, pairs, cka, units, clusters, accuracy, verdicts, notes, seed, out):
    def report(run):
        info = run.catalog.read("report_summary") or {}
        return info.get("index")

    per_pair = []
    for layer_a, layer_b, why in pairs:
        part = units[(units["layer_a"] == layer_a)] if not units.empty else units
        r = part["best_corr"].to_numpy(dtype=np.float64) if len(part) else np.array([])
        value = cka[(cka["layer_a"] == layer_a) & (cka["layer_b"] == layer_b)]["cka"]
        per_pair.append({"layer_a": layer_a, "layer_b": layer_b, "rule": why,
                         "cka": float(value.iloc[0]) if len(value) else None,
                         "median_best_corr": float(np.nanmedian(r)) if np.isfinite(r).any() else None,
                         "mutual_share": float(part["mutual"].mean()) if len(part) else None})
    overall = accuracy[accuracy["class"] == -1]
    acc = overall.iloc[0].to_dict() if len(overall) else {}
    changed = verdicts.drop_duplicates("class_name") if not verdicts.empty else verdicts

    def num(x):
        return None if x is None or (isinstance(x, float) and not np.isfinite(x)) else float(x)

    return {
        "generator": "pipeline compare", "version": __version__, "seed": int(seed),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "out": str(out.resolve()),
        "run_a": {"path": str(a.path.resolve()), "name": _run_name(a.path), "layers": a.layer_names,
                  "report": report(a)},
        "run_b": {"path": str(b.path.resolve()), "name": _run_name(b.path), "layers": b.layer_names,
                  "report": report(b)},
        "matching": matching.record(), "layer_pairs": per_pair,
        "clusters": {"with_counterpart": int(clusters["has_counterpart"].sum()) if len(clusters) else 0,
                     "total": int(len(clusters)), "rule": f"median best-match r of the members >= {an.COUNTERPART}"},
        "accuracy": {k: num(acc.get(k)) for k in ("accuracy_a", "accuracy_b", "difference", "diff_ci_low",
                                                  "diff_ci_high")},
        "verdicts": {"classes": int(len(changed)), "changed": int(changed["changed"].sum()) if len(changed) else 0},
        "notes": notes,
    }


def _check_replaceable(out: Path) -> None:
    why = foreign_folder(out, MARKER)
    if why == "file":
        raise UserError(f"comparison folder {out} is a file; choose another --out")
    if why:
        raise UserError(f"{out} exists and was not written by `python -m pipeline compare`; choose another --out "
                        "(a new or empty folder) — nothing was changed")


def _write(out: Path, tables: dict, summary: dict) -> None:
    from pipeline.report.compare_page import build_compare_page

    store = RunStore(out.parent)
    store.discard_partial(out.name)
    built = store.partial_dir(out.name)
    try:
        catalog = Catalog(RunStore(built), COMPARISON)
        for name, table in tables.items():
            catalog.write(name, table)
        catalog.write("compare_summary", summary)
        build_compare_page(built, final=out)
        RunStore(built).write_json(MARKER, {"generator": "pipeline compare", "version": __version__})
    except BaseException:
        store.discard_partial(out.name)
        raise
    store.publish_dir(out.name)


def _register(runs, out: Path, summary: dict) -> None:
    """Record the comparison in both runs' ``comparisons.json``, so their reports can link it."""
    entry_for = {"a": summary["run_b"], "b": summary["run_a"]}
    for role, run in zip(("a", "b"), runs):
        listed = run.catalog.read("comparisons", default=None) or []
        listed = [e for e in listed if isinstance(e, dict) and e.get("path") != str(out.resolve())]
        listed.append({"path": str(out.resolve()), "role": role, "other": entry_for[role]["path"],
                       "other_name": entry_for[role]["name"], "created": summary["created"]})
        run.catalog.write("comparisons", json.loads(json.dumps(listed)))
