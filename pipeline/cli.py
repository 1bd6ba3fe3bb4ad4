"""``python -m pipeline``: the command line. User errors print one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.backend.tf import set_env
from pipeline.config import STAGES
from pipeline.errors import UserError

STAGE_NAMES = STAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Look inside an image model: per-layer activations, embeddings, neuron clusters, "
                    "activation-maximization images and an offline HTML report.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="generate a dataset, train a small model, run every stage",
                       description="Generate the embedded shapes dataset (with a planted colour shortcut), "
                                   "train a small CNN on it (cached under data/demo), run every stage and "
                                   "print where the results are. Offline, CPU, a few minutes on 2 cores.")
    d.add_argument("--out", help="run directory (default data/runs/demo)")
    d.add_argument("--force", action="store_true", help="rerun every stage")

    r = sub.add_parser("run", help="run the pipeline from a config file or from flags",
                       description="Run every stage that is missing or stale. Give a CONFIG.yaml, or "
                                   "--model and --images/--npz for a run without a config file.")
    r.add_argument("config", nargs="?", help="YAML config (see README for every key)")
    r.add_argument("--model", help="model file (.keras, .h5) or SavedModel directory")
    r.add_argument("--images", help="image folder (class sub-folders = labels)")
    r.add_argument("--npz", help=".npz with x (N,H,W[,C]), optional y and class_names")
    r.add_argument("--layers", nargs="+", help="layer names or glob patterns (default: conv + dense layers)")
    r.add_argument("--out", help="run directory (default data/runs/<name>)")
    r.add_argument("--name", help="run name (default: the model file name)")
    r.add_argument("--limit", type=int, help="use at most this many images (seeded, class-stratified)")
    r.add_argument("--seed", type=int, help="random seed (default 0)")
    _stage_flags(r, with_selection=True)

    for name in STAGE_NAMES:
        s = sub.add_parser(name, help=f"run only the {name} stage",
                           description=f"Run the {name} stage of a run (given by its config or run directory).")
        s.add_argument("target", metavar="RUN_DIR_OR_CONFIG")
        _stage_flags(s, with_selection=False)

    st = sub.add_parser("status", help="which stages are done, stale or missing, and why",
                        description="Print each stage's state for a run directory (or config).")
    st.add_argument("target", metavar="RUN_DIR_OR_CONFIG")

    ly = sub.add_parser("layers", help="list a model's layers and which can be analysed",
                        description="List layer names (nested sub-models as outer/inner), types, output "
                                    "shapes and whether each can be analysed.")
    ly.add_argument("model", metavar="MODEL")
    ly.add_argument("--trust-model", action="store_true",
                    help="allow Lambda layers / custom objects (runs code from the model file)")
    pl = sub.add_parser("plan", help="what each stage will do, with time and memory estimates",
                        description="Print, per stage, the work it will do (layers, units, images, maps, "
                                    "act-max images), an estimated time from a short warm-up on this machine "
                                    "and a peak-memory estimate; over the budget, what to cut.")
    pl.add_argument("target", metavar="CONFIG_OR_RUN_DIR")
    pl.add_argument("--budget", type=float, metavar="MINUTES", help="warn above this many minutes (default: budget_minutes, 60)")
    pl.add_argument("--trust-model", action="store_true",
                    help="allow Lambda layers / custom objects (runs code from the model file)")
    ex = sub.add_parser("export", help="export a run for other tools (TensorBoard Projector)",
                        description="Write TensorBoard Projector files (tensors.tsv, metadata.tsv, sprite.png, "
                                    "projector_config.pbtxt) for one layer of a finished run.")
    ex.add_argument("format", choices=["projector"])
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--layer", required=True, help="layer name (see manifest or `status`)")
    ex.add_argument("--out", help="output folder (default RUN_DIR/projector/<layer>)")
    cp = sub.add_parser("compare", help="compare two runs over the same images (two models, before/after a fix)",
                        description="Compare two run directories over the same images: cross-model CKA, "
                                    "best-matching units, clusters with a counterpart, per-layer accuracy curves, "
                                    "accuracy and shortcut verdicts with paired 95 % intervals (B - A). Writes "
                                    "tables and an offline page.")
    cp.add_argument("run_a", metavar="RUN_A")
    cp.add_argument("run_b", metavar="RUN_B")
    cp.add_argument("--out", help="comparison folder (default RUN_B/comparisons/<name of A>-<hash>)")
    cp.add_argument("--seed", type=int, default=0, help="seeds the CKA sample and the bootstraps (default 0)")
    cp.add_argument("--min-overlap", type=float, default=0.5, metavar="SHARE",
                    help="share of the smaller run's images that must be in both (default 0.5); "
                         "fewer is refused, more but not all compares on the intersection")
    rm = sub.add_parser("remedy", help="fine-tune a copy of the model against its flagged shortcut, re-analyse, compare",
                        description="For a Keras model whose shortcut finder (probe stage) flagged colour or texture "
                                    "reliance: fine-tune a copy with counterfactual augmentation on a seeded split of "
                                    "the labelled images, save it as RUN/remedy/model.keras, run the pipeline on it "
                                    "over the same images and write the before -> after page (settings: remedy: in "
                                    "the config). The model file given is never modified.")
    rm.add_argument("target", metavar="RUN_DIR_OR_CONFIG")
    rm.add_argument("--out", help="the remedied run directory (default RUN_DIR/remedy)")
    rm.add_argument("--force", action="store_true", help="fine-tune again and rerun every stage of the remedied run")
    rm.add_argument("--trust-model", action="store_true",
                    help="allow Lambda layers / custom objects (runs code from the model file)")
    return p


def _stage_flags(p, with_selection):
    p.add_argument("--force", action="store_true", help="rerun even if up to date")
    p.add_argument("--trust-model", action="store_true",
                   help="allow Lambda layers / custom objects (runs code from the model file)")
    p.add_argument("--engine", choices=["local", "dask"],
                   help="where extract, cluster and embed run: this process or a Dask cluster "
                        "(default: the config's engine, local)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on the existing Dask cluster with this scheduler address (implies --engine dask)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="start a local Dask cluster of N worker processes (implies --engine dask)")
    if with_selection:
        p.add_argument("--only", choices=STAGE_NAMES, help="run just this stage")
        p.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, help="rerun this stage and all after it")


def _config_from(args):
    """A Config from a YAML file, a run directory's manifest, or --model/--images flags."""
    from pipeline.config import load_config, make_config

    target = getattr(args, "config", None) or getattr(args, "target", None)
    if target:
        path = Path(target)
        if path.is_dir():
            from pipeline.storage.catalog import Catalog
            from pipeline.storage.store import RunStore

            manifest = Catalog(RunStore(path)).read("manifest")
            if not manifest or "config" not in manifest:
                raise UserError(f"{path} is not a run directory (no manifest.json)")
            raw = dict(manifest["config"])
            raw["out"] = str(path)
            # Trust is given on this command line (or in the config file named on it), never
            # inherited from a manifest: whoever wrote the folder is not the user running now.
            raw.pop("trust_model", None)
            cfg = make_config(raw)
        else:
            cfg = load_config(path)
    else:
        if not args.model or not (args.images or args.npz):
            raise UserError("give a CONFIG.yaml, or --model and --images (or --npz)")
        raw = {"model": args.model, "data": {"images": args.images, "npz": args.npz},
               "name": args.name or Path(args.model).stem or "run"}
        for key in ("out", "seed"):
            if getattr(args, key, None) is not None:
                raw[key] = getattr(args, key)
        if args.layers:
            raw["layers"] = args.layers
        if args.limit is not None:  # --limit 0 is an error, not "all"
            raw["data"]["limit"] = args.limit
        cfg = make_config(raw)
    if getattr(args, "trust_model", False):
        cfg.trust_model = True
    _engine_flags(cfg, args)
    return cfg


def _engine_flags(cfg, args):
    """``--engine``, ``--scheduler``, ``--workers`` override the config's engine keys."""
    from pipeline.config import check_engine

    engine, scheduler, workers = (getattr(args, k, None) for k in ("engine", "scheduler", "workers"))
    if scheduler is not None and workers is not None:
        raise UserError("--scheduler and --workers exclude each other: --workers starts a local cluster, "
                        "--scheduler joins an existing one")
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    if engine == "local" and (scheduler is not None or workers is not None):
        raise UserError("--scheduler and --workers need the dask engine, not --engine local")
    if engine is not None:
        cfg.engine = engine
        if engine == "local":
            cfg.workers = cfg.scheduler = None
    if scheduler is not None or workers is not None:
        cfg.engine, cfg.scheduler, cfg.workers = "dask", scheduler, workers
    check_engine(cfg)


def _run(cfg, args, only=None, from_stage=None):
    from pipeline.inputs.models import check_safe
    from pipeline.storage.rundir import check_writable
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    check_safe(cfg.model, cfg.trust_model)  # refuse before anything is written or run
    check_writable(cfg.out_dir)

    runner = Runner(cfg, all_stages(), debug=args.debug)
    if getattr(args, "show_plan", False):
        from pipeline.orchestration.planning import print_plan

        print_plan(cfg, runner, only, from_stage, args.force)
    try:
        runner.run(only=only, from_stage=from_stage, force=args.force)
    finally:
        if cfg.engine == "dask":
            from pipeline.engines.cluster import close_client

            close_client()
    print(f"run directory: {cfg.out_dir}")
    return runner


def cmd_plan(args):
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    cfg = _config_from(args)
    runner = Runner(cfg, all_stages(), debug=args.debug)
    stages = [s.name for s in runner.plan()] or [s.name for s in runner.stages]
    if args.budget is not None:
        cfg.budget_minutes = args.budget
    from pipeline.orchestration.planning import known_clusters, plan_run

    for line in plan_run(cfg, stages, known_clusters(runner.store)).lines():
        print(line)


def cmd_run(args):
    cfg = _config_from(args)
    args.show_plan = True
    _run(cfg, args, only=args.only, from_stage=args.from_stage)


def cmd_stage(args):
    from pipeline.stages import all_stages

    if args.command not in [s.name for s in all_stages()]:
        raise UserError(f"stage '{args.command}' is not available in this version")
    cfg = _config_from(args)
    _run(cfg, args, only=args.command)


def cmd_status(args):
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import all_stages

    cfg = _config_from(args)
    if not cfg.out_dir.exists():
        raise UserError(f"run directory {cfg.out_dir} does not exist yet")
    from pipeline.storage.rundir import busy_message, locked

    if locked(cfg.out_dir):
        print(busy_message(cfg.out_dir).split(";")[0])
    for line in Runner(cfg, all_stages()).status_lines():
        print(line)


def cmd_layers(args):
    from pipeline.inputs.autolayers import choose, summary_line
    from pipeline.inputs.models import load_model

    model = load_model(args.model, args.trust_model)
    print(f"model {model.name}: input {tuple(model.input_shape)}")
    auto = dict(choose(model, "auto"))
    rows = [("name", "type", "output shape", "analysable")]
    for i in model.layers:
        verdict = (f"yes (auto: {auto[i.name]})" if i.name in auto else "yes") if i.analysable else f"no: {i.reason}"
        rows.append((i.name, i.type, str(i.output_shape), verdict))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    print(f"layers: auto picks {summary_line(model.layers, list(auto.items()), 'auto')}")


def cmd_export(args):
    from pipeline.orchestration.export import export_projector

    folder = export_projector(args.run_dir, args.layer, args.out)
    print(f"projector files: {folder}  (tensorboard --logdir {folder})")


def cmd_compare(args):
    from pipeline.compare import compare_runs

    if not 0 < args.min_overlap <= 1:
        raise UserError("--min-overlap must be in (0, 1]")
    result = compare_runs(args.run_a, args.run_b, args.out, seed=args.seed, min_overlap=args.min_overlap)
    for note in result.notes:
        print(f"note: {note}")
    print(f"comparison: {result.out}")
    print(f"page: {result.page}")


def cmd_remedy(args):
    from pipeline.remedy.run import remedy

    cfg = _config_from(args)
    summary = remedy(cfg, out=args.out, force=args.force, debug=args.debug)
    if summary is not None:
        print(f"remedied model: {summary['model']}")
        print(f"remedied run directory: {summary['remedied_run']}")
        print(f"before -> after: {Path(summary['page']).resolve()}")


def cmd_demo(args):
    from pipeline.demo.run import run_demo

    run_demo(out=args.out, force=args.force, debug=args.debug)


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "layers": cmd_layers, "demo": cmd_demo, "export": cmd_export,
            "remedy": cmd_remedy,
            "compare": cmd_compare,
            **{s: cmd_stage for s in STAGE_NAMES}}


def main(argv=None) -> int:
    set_env()  # TensorFlow's environment, before any command (or a library like umap) imports it
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if not args.command:
        _parser().print_help()
        return 2
    try:
        COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line unless --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error ({type(exc).__name__}: {first[:300]}); rerun with --debug for the "
              "traceback", file=sys.stderr)
        return 1
    return 0
