"""``python -m pipeline remedy RUN``: fine-tune a copy of the model against its flagged shortcut, re-analyse, compare.

The I/O around the pure parts (:mod:`.augment`, :mod:`.split`, :mod:`.finetune`, :mod:`.evaluate`):

1. refuse, before anything is written, what cannot be remedied (not a Keras file, unsafe without
   ``--trust-model``, no finished probe stage, no labels, a grey model for a colour cue) and stop
   with exit 0 when nothing was flagged (unless ``remedy.cue`` forces a cue);
2. under the locks of the original run and of the remedy's folder: split the labelled images
   (seeded, class-stratified), record the original model's logits on every labelled image and on
   each probe of it, fine-tune a copy (the user's file is only read), save it with plain Keras,
   reload it and record its logits the same way;
3. run the pipeline on the remedied model over the same images (the stages the original run
   finished) into the remedy's folder, which is a run directory of its own;
4. write the before -> after tables, ``remedy.json`` and the offline page, and the comparison of
   the two runs (``pipeline.compare`` when installed).

It is a command rather than a runner stage because its output is a second run directory (with
stages of its own) and a model file, and because it must not run unless asked: a stage would be
made stale, and rerun, by every change upstream.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import STAGES, batch_or, hash_json
from pipeline.errors import UserError

from pipeline.remedy.layout import (ACCURACY, CLUSTERS, HISTORY, MODEL, REPORT, SPLIT, SUMMARY,
                                     VERDICTS)


@dataclass
class Target:
    """What will be remedied, decided before anything is written."""

    cfg: object
    out: Path
    cue: str
    forced: bool
    dataset: pd.DataFrame
    classes: object
    verdicts: pd.DataFrame
    stages: list
    size: tuple
    channels: int


def _log(msg):
    print(f"remedy: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- checks


def check(cfg, out=None, log=_log) -> Target | None:
    """Everything that can be refused, refused now; None when nothing was flagged (nothing to do).

    Raises
    ------
    UserError
        One line saying why the run cannot be remedied.
    """
    from pipeline.inputs.models import check_safe, model_kind
    from pipeline.orchestration.runner import Runner
    from pipeline.shortcuts.verdicts import read_classes
    from pipeline.stages import all_stages
    from pipeline.storage.catalog import Catalog
    from pipeline.storage.rundir import check_writable, owned
    from pipeline.storage.store import RunStore
    from pipeline.remedy.evaluate import flagged_cue

    kind = model_kind(cfg.model)
    if kind not in ("keras", "h5"):
        raise UserError(f"remedy fine-tunes Keras model files (.keras, .h5); {Path(cfg.model).name} is a "
                        f"{'SavedModel' if kind == 'savedmodel' else kind}: export it as .keras to remedy it")
    check_safe(cfg.model, cfg.trust_model)
    run_dir = cfg.out_dir
    if not owned(run_dir):
        raise UserError(f"{run_dir} is not a run directory (no manifest.json): run the pipeline first")
    catalog = Catalog(RunStore(run_dir))
    runner = Runner(cfg, all_stages())
    probe = runner.by_name["probe"]
    if catalog.stage_record("probe").get("status") != "done":
        raise UserError(f"{run_dir} has no finished probe stage (the shortcut finder): run "
                        f"`python -m pipeline probe {run_dir}` first")
    status, reason = runner.state(probe)
    if status != "done":
        log(f"warning: the probe stage of {run_dir} is {status} ({reason}); its verdicts are the ones recorded")
    dataset = catalog.require("dataset")
    classes = read_classes(dataset, catalog.read("manifest", default={}))
    if not (dataset["label"] >= 0).any():
        raise UserError(f"{run_dir}: the images are unlabelled; a remedy fine-tunes on labelled images "
                        "(class sub-folders or an .npz with y)")
    verdicts = catalog.read("bias_verdicts")
    if verdicts is None or not len(verdicts):
        why = catalog.summary("probe").get("class_metrics") or "no per-class verdicts were recorded"
        raise UserError(f"{run_dir}: {why}; a remedy needs the per-class shortcut verdicts")
    forced = cfg.remedy.cue is not None
    cue = cfg.remedy.cue or flagged_cue(verdicts)
    if cue is None:
        shown = ", ".join(f"{r.class_name}: {r.verdict}" for r in verdicts.itertuples())
        log(f"nothing was flagged in {run_dir} ({shown}); no remedy trained "
            "(set remedy.cue: colour or texture in the config to force one)")
        return None
    from pipeline.inputs.models import load_model
    from pipeline.extraction.plan import input_geometry

    size, channels = input_geometry(load_model(cfg.model, cfg.trust_model), cfg.data)
    if cue == "colour" and channels != 3 and not cfg.remedy.augment:
        raise UserError("the model takes grey images: there is no colour to randomise (remedy.cue: texture?)")
    out = Path(out) if out else run_dir / "remedy"
    if out.resolve() == run_dir.resolve():
        raise UserError("the remedied run needs its own folder: --out must differ from the run directory")
    check_writable(out)
    done = [s for s in STAGES if catalog.stage_record(s).get("status") == "done"]
    wanted = done if cfg.remedy.stages == "auto" else list(cfg.remedy.stages)
    return Target(cfg, out, cue, forced, dataset, classes, verdicts, _with_deps(wanted, runner), size, channels)


def _with_deps(names, runner) -> list:
    """``names`` plus extract, probe and every stage they need, in pipeline order."""
    wanted, todo = set(), list(names) + ["extract", "probe"]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += list(runner.by_name[name].deps)
    return [s for s in STAGES if s in wanted]


# --------------------------------------------------------------------------- the whole remedy


def remedy(cfg, out=None, force=False, debug=False, log=_log):
    """Remedy the run of ``cfg``; returns the remedy's summary (``remedy.json``) or None.

    Parameters
    ----------
    cfg : pipeline.config.Config
        The original run (its ``out`` is the run directory); ``cfg.remedy`` the settings.
    out : path, optional
        The remedied run directory (default ``<run>/remedy``).
    force : bool
        Fine-tune again and rerun every stage of the remedied run even when up to date.
    """
    from pipeline.storage.rundir import hold

    target = check(cfg, out, log)
    if target is None:
        return None
    with hold(cfg.out_dir), hold(target.out):
        return _remedy_locked(target, force, debug, log)


def _remedy_locked(t, force, debug, log):
    from pipeline.storage.store import RunStore

    cfg, store = t.cfg, RunStore(t.out)
    t0 = time.perf_counter()
    fingerprint = _fingerprint(t)
    old = store.read_json(SUMMARY) or {}
    reuse = (not force and old.get("fingerprint") == fingerprint and store.exists(MODEL)
             and all(store.exists(n) for n in (VERDICTS, ACCURACY, SPLIT)))
    _print_plan(t, reuse)
    if reuse:
        log(f"the fine-tuned model in {t.out} is up to date (same model, images, settings and seed): reused")
        summary = old
    else:
        summary = _fine_tune_and_evaluate(t, store, fingerprint, log)
    seconds_fit = time.perf_counter() - t0
    after_cfg = remedied_config(cfg, t.out)
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    runner = Runner(after_cfg, [s for s in all_stages() if s.name in t.stages], debug=debug)
    analyses = [s for s in t.stages if s != "report"]
    for name in analyses:   # the report comes after the comparison, so that it links it
        runner.run(only=name, force=force)
    summary.update(_after_analysis(t, store, summary))
    summary["compare"] = _compare(cfg.out_dir, t.out, cfg.seed, log)
    if "report" in t.stages:
        runner.run(only="report", force=force or bool(summary["compare"]))
        from pipeline.storage.catalog import Catalog
        from pipeline.storage.store import RunStore

        had_report = Catalog(RunStore(cfg.out_dir)).stage_record("report").get("status") == "done"
        if summary["compare"] and had_report:   # the original run's report links the comparison too
            Runner(cfg, all_stages(), debug=debug).run(only="report", force=True)
    summary["seconds"] = {"fine_tune_and_evaluate": round(seconds_fit, 2) if not reuse else
                          old.get("seconds", {}).get("fine_tune_and_evaluate"),
                          "total": round(time.perf_counter() - t0, 2)}
    from pipeline.remedy.page import write_page

    summary["page"] = str(write_page(t.out, cfg.out_dir, summary))
    store.write_json(SUMMARY, summary)
    log(f"page: {Path(summary['page']).resolve()}")
    return summary


def remedied_config(cfg, out):
    """The remedied model's run: the original's settings, its model, its own folder and report."""
    raw = cfg.model_dump(mode="json")
    out = Path(out)
    raw.update(model=str(out / MODEL), out=str(out), name=f"{cfg.name}-remedied")
    raw["report"] = dict(raw["report"], out=str(out / REPORT))
    from pipeline.config import make_config

    return make_config(raw)


def _fingerprint(t) -> str:
    from pipeline.storage.hashing import file_hash

    data = t.dataset[["index", "label"]].to_numpy().tolist()
    cfg = t.cfg
    return hash_json({"model": file_hash(cfg.model), "images": data, "remedy": cfg.remedy.model_dump(mode="json"),
                      "probe": cfg.probe.model_dump(mode="json"), "scale": cfg.data.scale, "seed": cfg.seed,
                      "cue": t.cue, "data": cfg.data.model_dump(mode="json")})


# --------------------------------------------------------------------------- fine-tune and evaluate


def _fine_tune_and_evaluate(t, store, fingerprint, log):
    from pipeline.config import parse_scale
    from pipeline.inputs.models import load_model
    from pipeline.remedy import evaluate
    from pipeline.remedy.augment import Counterfactuals, for_cue
    from pipeline.remedy.finetune import finetune, outputs_probabilities
    from pipeline.remedy.split import split_rows
    from pipeline.shortcuts.probes import make_probes

    cfg, rc = t.cfg, t.cfg.remedy
    labelled = np.flatnonzero(t.dataset["label"].to_numpy() >= 0)
    labels = t.dataset["label"].to_numpy()[labelled]
    train, held = split_rows(labels, rc.split, cfg.seed)
    log(f"cue: {t.cue}{' (forced by remedy.cue)' if t.forced else ''}; {len(train)} images to fine-tune on, "
        f"{len(held)} held out for the verdict (seed {cfg.seed})")
    pixels = _load_pixels(cfg, t.dataset, labelled, t.size, t.channels)
    index = t.dataset["index"].to_numpy()[labelled]
    probes = [p for p in make_probes(cfg.probe) if p.applicable(t.channels)]
    groups = {p.name: p.group for p in probes}
    scale = parse_scale(cfg.data.scale)

    wrapped = load_model(cfg.model, cfg.trust_model)   # a copy in memory: the user's file is only read
    batch_size = batch_or(cfg.extract.batch_size, 64)
    before = _passes(wrapped, pixels, index, probes, scale, cfg.seed, batch_size)
    model = wrapped.model
    from_logits = not outputs_probabilities(model, _logits_fn(wrapped),
                                            pixels[:8].astype(np.float32) * scale[0] + scale[1])
    augment = Counterfactuals(for_cue(t.cue, rc.augment), rc.strength)
    log(f"fine-tuning ({', '.join(a.name for a in augment.augmentations)}, strength {rc.strength:g}, "
        f"{rc.epochs} epochs, learning rate {rc.learning_rate:g})")
    result = finetune(model, pixels[train], labels[train], index[train], augment, scale=scale, epochs=rc.epochs,
                      learning_rate=rc.learning_rate, batch_size=rc.batch_size, layers=rc.layers,
                      freeze_batchnorm=rc.freeze_batchnorm, seed=cfg.seed, from_logits=from_logits,
                      log=lambda m: log(f"fine-tune {m}"))
    _save_model(model, store)
    remedied = load_model(store.path(MODEL), cfg.trust_model)   # plain Keras, as a user will load it
    after = _passes(remedied, pixels, index, probes, scale, cfg.seed, batch_size)

    from pipeline.shortcuts.verdicts import Rules, shortcut_tables

    rules = Rules.from_config(cfg.probe)
    names = t.classes.names

    def verdicts(logits):
        sub = {k: v[held] for k, v in logits.items() if k != "original"}
        return shortcut_tables(labels[held], names, logits["original"][held], sub, groups, cfg.seed, rules)[1]

    v_before, v_after = verdicts(before), verdicts(after)
    change = evaluate.verdict_change(v_before, v_after)
    splits = np.where(np.isin(np.arange(len(labels)), held), "held-out", "fine-tuned")
    acc = evaluate.accuracy_table(labels, splits, before, after, groups, cfg.seed, cfg.probe.bootstrap,
                                  cfg.probe.confidence)
    acc = acc.sort_values("split", key=lambda s: s != "held-out", kind="stable").reset_index(drop=True)
    store.write_table(SPLIT, pd.DataFrame({"index": index, "label": labels, "split": splits}))
    store.write_table(VERDICTS, change)
    store.write_table(ACCURACY, acc)
    store.write_table(HISTORY, pd.DataFrame(result.history))
    for r in change.itertuples():
        log(f"{r.class_name}: {r.verdict_before} -> {r.verdict_after} (held-out)")
    orig, probed = evaluate.group_accuracy(acc, "held-out", "original"), evaluate.group_accuracy(acc, "held-out", t.cue)
    log(f"held-out accuracy: originals {orig[0]:.3f} -> {orig[1]:.3f}; {t.cue} probes {probed[0]:.3f} -> {probed[1]:.3f}")
    return {"fingerprint": fingerprint, "run": str(cfg.out_dir), "remedied_run": str(store.root),
            "model": str(store.path(MODEL)), "original_model": str(cfg.model), "cue": t.cue, "forced": t.forced,
            "augment": [a.name for a in augment.augmentations], "settings": rc.model_dump(mode="json"),
            "seed": cfg.seed, "images": {"fine-tuned": int(len(train)), "held-out": int(len(held))},
            "trained_layers": result.trained, "from_logits": result.from_logits,
            "fine_tune_seconds": round(result.seconds, 2),
            "flagged": {"before": evaluate.count_flagged(v_before, t.cue), "after": evaluate.count_flagged(v_after, t.cue),
                        "classes": int(len(v_before))},
            "heldout_accuracy": {"original": list(orig), t.cue: list(probed)}}


def _load_pixels(cfg, dataset, rows, size, channels):
    from pipeline.inputs.dataset import pixel_loader

    load = pixel_loader(cfg.data, dataset, size, channels)
    bs = max(batch_or(cfg.extract.batch_size, 64), 64)
    return np.concatenate([load(rows[i:i + bs]) for i in range(0, len(rows), bs)]) if len(rows) else \
        np.zeros((0, *size, channels), np.uint8)


def _logits_fn(wrapped):
    import tensorflow as tf

    extract = wrapped.build_extractor([])
    return tf.function(lambda x: extract(x)[1], reduce_retracing=True)


def _passes(wrapped, pixels, index, probes, scale, seed, batch_size):
    """``{"original": (N, K), probe: (N, K)}`` logits, probes seeded exactly as in the probe stage."""
    fn = _logits_fn(wrapped)
    a, b = np.float32(scale[0]), np.float32(scale[1])
    out = {"original": []} | {p.name: [] for p in probes}
    for start in range(0, len(pixels), batch_size):
        batch, idx = pixels[start:start + batch_size], index[start:start + batch_size]
        out["original"].append(np.asarray(fn(batch.astype(np.float32) * a + b)))
        for p in probes:
            out[p.name].append(np.asarray(fn(p(batch, idx, seed).astype(np.float32) * a + b)))
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def _save_model(model, store):
    """Save with plain Keras (``keras.models.load_model`` needs no custom objects), atomically."""
    with tempfile.TemporaryDirectory(dir=store.root) as tmp:
        path = Path(tmp) / MODEL
        model.save(path)
        store.write_bytes(MODEL, path.read_bytes())


# --------------------------------------------------------------------------- after the re-analysis


def _after_analysis(t, store, summary):
    """Cluster changes and whole-run figures from the two run directories."""
    from pipeline.remedy.evaluate import cluster_changes
    from pipeline.storage.results import Run

    before, after = Run(t.cfg.out_dir), Run(store.root)
    out = {"stages": t.stages}
    if before.probe_units is not None and after.probe_units is not None and before.clusters is not None:
        table = cluster_changes(t.cue, before.probe_units, after.probe_units, before.clusters, after.clusters,
                                before.maximize, after.maximize)
        store.write_table(CLUSTERS, table)
        out["clusters_changed"] = int(len(table))
    if after.bias_verdicts is not None and len(after.bias_verdicts):
        out["all_images_verdicts"] = {
            "before": before.bias_verdicts.set_index("class_name")["verdict"].to_dict(),
            "after": after.bias_verdicts.set_index("class_name")["verdict"].to_dict(),
            "note": "the probe stage's sample of all analysed images, fine-tuned ones included"}
    return out


def _compare(run_a, run_b, seed, log):
    """The page of ``pipeline.compare.compare_runs`` of the original and the remedied run (its default
    folder, in the remedied run), or None when the runs cannot be compared (said in one line)."""
    from pipeline.compare import compare_runs

    try:
        return str(compare_runs(run_a, run_b, seed=seed).page)
    except UserError as exc:
        log(f"comparison skipped: {exc}")
        return None


# --------------------------------------------------------------------------- plan


def _print_plan(t, reuse):
    """The remedy's time estimate: fine-tuning, the before/after passes and the re-analysis's stages."""
    try:
        lines = estimate(t, reuse).lines()
    except UserError:
        raise
    except Exception as exc:   # the estimate is advice; the remedy still runs
        lines = [f"plan: no estimate ({type(exc).__name__}: {str(exc)[:200]})"]
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def estimate(t, reuse=False):
    """A :class:`pipeline.orchestration.planning.Plan` with ``fine-tune`` and ``evaluate`` lines first."""
    from pipeline.inputs.autolayers import choose
    from pipeline.inputs.models import load_model
    from pipeline.extraction.plan import layer_kinds
    from pipeline.orchestration.planning import StageEstimate, make_plan, warm_up

    cfg, rc = t.cfg, t.cfg.remedy
    model = load_model(cfg.model, cfg.trust_model)
    names = [n for n, _ in choose(model, cfg.layers)]
    n_images = len(t.dataset)
    warm = warm_up(model, names, layer_kinds(model, names), t.size, t.channels, cfg, n_images)
    plan = make_plan(cfg, model, choose(model, cfg.layers), warm, n_images, len(t.classes), t.stages, t.size)
    n = int((t.dataset["label"] >= 0).sum())
    n_train = int(round(rc.split * n))
    passes = 1 + len(cfg.probe.probes)
    # A training step: forward + backward (the act-max step) plus the optimizer and augmentation.
    fit = 0.0 if reuse else rc.epochs * n_train * warm.actmax_step * 2.0 + 2 * warm.compile_actmax
    evaluate = 0.0 if reuse else 2 * passes * n * warm.forward * 1.5 + 2 * warm.compile_forward
    plan.stages[:0] = [StageEstimate("fine-tune", f"{rc.epochs} epochs x {n_train} images"
                                     + (" (up to date: reused)" if reuse else ""), fit, warm.memory_actmax),
                       StageEstimate("evaluate", f"2 models x {n} images x {passes} passes", evaluate,
                                     warm.memory_forward)]
    plan.header[0] = plan.header[0].replace("plan:", "remedy plan:", 1)
    return plan
