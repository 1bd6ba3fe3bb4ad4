"""The run configuration: a validated YAML file (or CLI flags) with documented defaults.

Unknown or mistyped keys are errors that name the key; every default lives here and in the README.
"""
from __future__ import annotations

import difflib
import math
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import UserError

REDUCTIONS = ("mean", "max")
MAX_SIDE = 8192  # px: image sides beyond this are a typo (or an attack), not a model input
STAGES = ("extract", "embed", "cluster", "probe", "maximize", "report")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    images: Optional[str] = None
    npz: Optional[str] = None
    size: Union[Literal["auto"], tuple[Annotated[int, Field(ge=1, le=MAX_SIDE)], Annotated[int, Field(ge=1, le=MAX_SIDE)]]] = "auto"
    color: Literal["auto", "grey", "rgb"] = "auto"
    limit: Optional[int] = Field(default=None, ge=1)
    scale: str = "1/255"
    max_pixels: Optional[int] = Field(default=None, ge=1)
    follow_symlinks: bool = False   # also follow links leading out of the image folder (loops are still cut)

    @field_validator("scale")
    @classmethod
    def _scale_is_readable(cls, v):
        a, b = parse_scale(v)
        if not (math.isfinite(a) and math.isfinite(b)) or a == 0:
            raise ValueError("must be a finite, non-zero scale such as 1/255, unit, symmetric or none")
        return v


BatchSize = Union[Literal["auto"], Annotated[int, Field(ge=1, le=8192)]]


def batch_or(value, fallback: int) -> int:
    """A batch size as a number: ``value``, or ``fallback`` where it is ``"auto"`` (e.g. the size an
    earlier stage recorded, or the default, for code that needs a number without probing)."""
    return int(fallback) if value == "auto" else int(value)


class ExtractConfig(_Section):
    # Images per compiled forward pass, bounded (the last batch is padded to it). "auto" grows it
    # on the model until throughput stops improving or memory runs out; the choice is recorded.
    batch_size: BatchSize = 64
    reduce: list[Literal["mean", "max"]] = ["mean", "max"]
    spatial_samples: int = Field(default=0, ge=0, le=4096)
    dtype: Literal["float32", "float16"] = "float32"
    thumbnail_size: int = Field(default=64, ge=0, le=1024)
    chunk_rows: int = Field(default=1024, ge=1, le=1 << 20)


class EmbedConfig(_Section):
    methods: list[Literal["tsne", "umap"]] = ["tsne", "umap"]
    of: list[Literal["images", "neurons"]] = ["images", "neurons"]
    pca: int = Field(default=50, ge=2, le=4096)
    max_fit: int = Field(default=10000, ge=100)
    perplexity: float = Field(default=30.0, gt=0, le=10000)
    n_neighbors: int = Field(default=15, ge=2, le=10000)


class ClusterConfig(_Section):
    method: Literal["agglomerative", "kmeans", "hdbscan"] = "agglomerative"
    n_clusters: Union[Literal["auto"], Annotated[int, Field(ge=2)]] = "auto"
    metric: Literal["correlation"] = "correlation"
    bootstrap: int = Field(default=20, ge=0, le=10000)
    top_k: int = Field(default=9, ge=1, le=1000)
    reduction: Literal["mean", "max"] = "mean"
    # CKA between layers: minibatch unbiased HSIC on a seeded sample of at most cka_rows images
    # (null = all) in groups of cka_batch rows; memory does not depend on the layer widths.
    cka_rows: Optional[int] = Field(default=4096, ge=4)
    cka_batch: int = Field(default=256, ge=4, le=8192)
    # A layer with more units is not clustered (its C x C float64 correlation would be too big);
    # its units get cluster -1 and the log says so. CKA still covers it.
    max_units: int = Field(default=8192, ge=2, le=32768)   # 32768^2 float64 = 8.6 GB


class MaximizeConfig(_Section):
    # Per layer: the top-K units (highest dataset maximum) plus every cluster direction; "all" is
    # every unit of every layer (hours on a CPU for a deep model).
    units: Union[Literal["all"], str, list[int]] = "top:4"
    steps: int = Field(default=256, ge=1, le=100000)
    size: int = Field(default=128, ge=8, le=MAX_SIDE)
    clusters: bool = True
    classes: bool = True
    batch_size: BatchSize = 32     # images optimised together; "auto" as for extract
    learning_rate: float = Field(default=0.05, gt=0, le=100)
    layers: Union[Literal["all", "last"], list[str]] = "all"
    # Image parameterisation: Fourier (Lucid's default) or raw pixels.
    param: Literal["fourier", "pixel"] = "fourier"
    # Decorrelate RGB colours (ignored for grey models).
    decorrelate: bool = True
    # Robustness transforms for unit and cluster images: Lucid's pad/jitter/scale/rotate chain scaled
    # to the image size, pad/jitter only, or none. Class images use pad/jitter unless this is none.
    transforms: Literal["standard", "jitter", "none"] = "standard"
    # Lucid's redirected ReLU gradient, so units silent on the grey start image can still move.
    relu_redirect: bool = True
    # Stop starting new batches after this many seconds; a rerun renders what is missing.
    max_seconds: Optional[float] = Field(default=480, gt=0)


class ComputeConfig(_Section):
    """How the compiled hot loops (extraction forward, maximization step) run on the device."""
    # XLA (jit_compile) for the extraction forward and the maximization step: "auto" times both
    # ways on the model at start-up and keeps the faster; an op XLA cannot compile falls back.
    xla: Literal["auto", "on", "off"] = "auto"
    # Compute dtype of the model's layers; activations, reductions and statistics stay float32.
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"


def compute_params(cfg, xla=True) -> dict:
    """The ``compute`` keys a stage's parameters include: ``precision`` when it is not float32 and,
    for stages ``compute.xla`` acts on, ``xla`` when it is not auto. Only then, so run directories
    made before the keys (or with the defaults) keep their parameters; ``auto``'s choice is recorded
    by the stage instead."""
    params = {}
    if cfg.compute.precision != "float32":
        params["precision"] = cfg.compute.precision
    if xla and cfg.compute.xla != "auto":
        params["xla"] = cfg.compute.xla
    return params


class ReportConfig(_Section):
    out: Optional[str] = None                          # default reports/<name>
    units_per_page: int = Field(default=64, ge=1, le=10000)      # unit gallery pagination
    thumbnail_size: int = Field(default=64, ge=8, le=1024)  # px, longer side of dataset thumbnails in the report
    image_size: int = Field(default=128, ge=16, le=MAX_SIDE)  # px, longer side of copied maximization images
    top_images: int = Field(default=9, ge=1, le=100)    # dataset images shown per unit / cluster
    examples: int = Field(default=12, ge=1, le=1000)    # per class: most confident / most confused images
    atlas_grid: int = Field(default=14, ge=2, le=128)  # activation-atlas cells per side
    atlas_points: int = Field(default=20000, ge=100)   # images sampled for an atlas (bounds memory)
    explorer: bool = True                              # interactive maps on the layer pages (Bokeh, stored in js/)
    explorer_max_points: int = Field(default=50000, ge=100)  # more images: a seeded sample is shown (and said so)
    explorer_thumbnail_size: int = Field(default=48, ge=8, le=512)   # px, longer side of a hover thumbnail in the sprite sheets


class ProbeConfig(_Section):
    """The shortcut finder (``probe`` stage): counterfactual probes and the per-class verdicts."""
    probes: list[Literal["grayscale", "hue_rotation", "channel_shuffle", "patch_shuffle", "blur",
                         "centre_mask", "background_mask"]] = [
        "grayscale", "hue_rotation", "channel_shuffle", "patch_shuffle", "blur", "centre_mask",
        "background_mask"]
    max_images: Optional[int] = Field(default=1000, ge=1)   # seeded class-stratified sample (8 forward passes each)
    bootstrap: int = Field(default=1000, ge=100, le=100000)            # resamples for the confidence intervals
    confidence: float = Field(default=0.95, gt=0.5, lt=1)     # interval level (percentile bootstrap)
    patch_grid: int = Field(default=4, ge=2, le=64)               # patch_shuffle: grid x grid patches
    blur_sigma: float = Field(default=0.02, gt=0, le=0.5)     # blur: Gaussian sigma, fraction of the image side
    mask_fraction: float = Field(default=0.5, gt=0, lt=1)     # masks: side of the centre box, fraction
    min_images: int = Field(default=10, ge=2)                 # fewer (correct) images in a class: inconclusive
    min_effect: float = Field(default=0.2, gt=0, lt=1)        # a cue matters when its break rate's CI is above this
    examples: int = Field(default=4, ge=1, le=100)                 # example images per probe under probes/


class RemedyConfig(_Section):
    """``python -m pipeline remedy``: fine-tune a copy of the model against the cue the shortcut finder flagged."""
    # null = the cue flagged for most classes (colour or texture); set it to remedy a cue that was not flagged.
    cue: Optional[Literal["colour", "texture"]] = None
    # Counterfactual augmentations; null = by cue: colour -> hue_rotation, grayscale, channel_shuffle;
    # texture -> blur, patch_blur.
    augment: Optional[list[Literal["hue_rotation", "grayscale", "channel_shuffle", "blur", "patch_blur"]]] = None
    strength: float = Field(default=0.8, ge=0, le=1)        # share of training images replaced by a counterfactual, each epoch
    epochs: int = Field(default=8, ge=1, le=1000)
    learning_rate: float = Field(default=1e-3, gt=0, le=10)  # Adam
    batch_size: int = Field(default=32, ge=1, le=8192)
    # Which layers train: all | last:K (the last K layers with weights) | names / glob patterns.
    layers: Union[Literal["all"], str, list[str]] = "all"
    freeze_batchnorm: bool = True                            # BatchNorm layers keep their statistics (inference mode)
    split: float = Field(default=0.5, gt=0, lt=1)            # fraction of the labelled images fine-tuned on (seeded,
                                                             # class-stratified); the rest is held out for the verdict
    # Stages run on the remedied model: auto = those the original run finished.
    stages: Union[Literal["auto"], list[Literal["extract", "embed", "cluster", "probe", "maximize", "report"]]] = "auto"

    @field_validator("layers")
    @classmethod
    def _layers_spec(cls, v):
        if isinstance(v, str) and v != "all":
            if not v.startswith("last:") or not v[5:].isdigit() or int(v[5:]) < 1:
                raise ValueError("must be all, last:K (K >= 1) or a list of layer names / glob patterns")
        return v


class Config(_Section):
    name: str = "run"
    out: Optional[str] = None
    seed: int = Field(default=0, ge=0, lt=2**32)   # numpy seeds are unsigned 32-bit
    model: str
    trust_model: bool = False
    data: DataConfig
    layers: Union[Literal["auto", "all"], list[str]] = "auto"
    extract: ExtractConfig = ExtractConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    maximize: MaximizeConfig = MaximizeConfig()
    report: ReportConfig = ReportConfig()
    probe: ProbeConfig = ProbeConfig()
    remedy: RemedyConfig = RemedyConfig()
    compute: ComputeConfig = ComputeConfig()
    # Where the heavy stages run: this process (local) or a Dask cluster (dask). They give the
    # same arrays and tables; none of these keys is part of any stage's parameters.
    engine: Literal["local", "dask"] = "local"
    workers: Optional[int] = Field(default=None, ge=1, le=1024)   # dask: start a LocalCluster of this many processes
    scheduler: Optional[str] = None                      # dask: address of an existing cluster's scheduler
    # The plan printed before a run warns (and says what to cut) when its estimate exceeds this.
    budget_minutes: float = Field(default=60.0, gt=0)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v):
        if not v or "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError("must be a plain folder name (no slashes)")
        return v

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("data/runs") / self.name

    @property
    def report_dir(self) -> Path:
        return Path(self.report.out) if self.report.out else Path("reports") / self.name


def hash_json(obj) -> str:
    """Stable short hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _known_keys(model_cls, loc):
    """The keys allowed at a location of the config, for "did you mean" hints."""
    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "tuple", "dict"}


def _describe(error, model_cls=Config) -> str:
    # Union members add their type name to the location ("n_clusters.literal['auto']"): drop it.
    loc = [p for p in error["loc"] if isinstance(p, str) and "[" not in p and p not in _TYPE_TAGS
           and not p.startswith("constrained-")]
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        known = _known_keys(model_cls, loc)
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
        return f"unknown config key '{dotted}'{suffix}"
    if error["type"] == "missing":
        return f"missing config key '{dotted}'"
    # Union errors repeat per branch; the first message is the clearest one.
    return f"config key '{dotted}': {error['msg']} (got {error.get('input')!r})"


def _most_specific(errors):
    """Of a union's per-branch errors, the one about a bound ("greater than or equal to 2"), which
    says more than "input should be 'auto'"."""
    return next((e for e in errors if e["type"] != "literal_error" and not e["type"].endswith("_type")),
                errors[0])


def make_config(raw: dict, base_dir: Path | None = None) -> Config:
    """Validate a config mapping.

    Parameters
    ----------
    raw : dict
        Parsed YAML (or flags turned into the same shape).
    base_dir : Path, optional
        Relative paths for ``model``, ``data.images``, ``data.npz`` are resolved against it
        (the folder of the config file), so a config works from any working directory.

    Returns
    -------
    Config

    Raises
    ------
    UserError
        One line naming the first offending key.
    """
    if not isinstance(raw, dict):
        raise UserError("config must be a YAML mapping of keys to values")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe(_most_specific(exc.errors()))) from None
    if not cfg.data.images and not cfg.data.npz:
        raise UserError("config 'data' needs 'images' (a folder) or 'npz' (a file)")
    if cfg.data.images and cfg.data.npz:
        raise UserError("config 'data' takes 'images' or 'npz', not both")
    check_engine(cfg)
    if base_dir is not None:
        cfg = _resolve_paths(cfg, Path(base_dir))
    return cfg


def check_engine(cfg: Config) -> None:
    """``workers`` and ``scheduler`` belong to ``engine: dask``, and exclude each other."""
    for key in ("workers", "scheduler"):
        if getattr(cfg, key) is not None and cfg.engine != "dask":
            raise UserError(f"config key '{key}' needs engine: dask (the engine is {cfg.engine})")
    if cfg.workers is not None and cfg.scheduler is not None:
        raise UserError("config keys 'workers' and 'scheduler' exclude each other: 'workers' starts a "
                        "local cluster, 'scheduler' joins an existing one (which has its own workers)")


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def res(p):
        return None if p is None else str((base / p) if not Path(p).is_absolute() else Path(p))

    cfg.model = res(cfg.model)
    cfg.data.images = res(cfg.data.images)
    cfg.data.npz = res(cfg.data.npz)
    if cfg.out:
        cfg.out = res(cfg.out)
    if cfg.report.out:
        cfg.report.out = res(cfg.report.out)
    return cfg


def load_config(path) -> Config:
    """Read and validate a YAML config file (relative paths are relative to the file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"config {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, whatever YAML says
        raise UserError(f"config {path} is not valid YAML{where}: {problem}") from None
    return make_config(raw, base_dir=path.parent)


def parse_scale(scale: str) -> tuple[float, float]:
    """Turn the ``data.scale`` preprocessing into ``x * a + b`` on pixels in [0, 255].

    Accepts a fraction (``1/255``), a number, or a named preprocessing:
    ``unit`` ([0, 1]), ``symmetric``/``tf`` ([-1, 1]), ``none``/``raw`` ([0, 255]).
    """
    named = {"unit": (1 / 255, 0.0), "symmetric": (2 / 255, -1.0), "tf": (2 / 255, -1.0),
             "none": (1.0, 0.0), "raw": (1.0, 0.0)}
    s = str(scale).strip().lower()
    if s in named:
        return named[s]
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den), 0.0
        return float(s), 0.0
    except (ValueError, ZeroDivisionError):
        raise UserError(f"config key 'data.scale': cannot read {scale!r} "
                        f"(use a number like 1/255 or one of {', '.join(named)})") from None
