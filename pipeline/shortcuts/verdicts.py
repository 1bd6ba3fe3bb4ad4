"""Shortcut metrics: what each counterfactual probe does to the model's decisions, and a verdict per class.

Everything here is pure numpy/pandas on the model's logits and activations; the ``probe`` stage
(:mod:`pipeline.stages.probe`) produces those and writes the tables.

What is measured, per class and probe
-------------------------------------
For the images of class ``k`` (label ``k`` is read as output ``k``):

- ``accuracy``, ``accuracy_probed``, ``accuracy_drop``: top-1 accuracy on the originals and on
  the probed images, and the difference;
- ``logit_drop``, ``prob_drop``: mean fall of the true class's logit / softmax probability;
- ``flip_rate``: fraction of images whose predicted class changes;
- ``break_rate``: among the images of the class the model gets right, the fraction the probe
  makes wrong;
- ``signal_lost``: how much of the model's ability to pick out class ``k`` the probe destroys,
  chance-corrected (below). 0: the probed decisions still separate class ``k`` from the others as
  well as before; 1: they say nothing about it any more.

Intervals are percentile-bootstrap intervals (``n_boot`` resamples of the probed images, seeded).
Every statistic is a ratio of sums over images, and every class, probe and cue is computed on the
same resamples, so differences between probes are paired.

Why not simply the accuracy drop
--------------------------------
Analysis images are often chosen so that a suspected cue is *uninformative* (the demo's have
random colours). There a colour-driven model is right only where the colour happens to match
(about chance); recolouring breaks those decisions but makes as many others right by luck, so
its accuracy hardly drops although every decision depends on colour. Conditioning on the
decisions the model got right asks the counterfactual question directly: "had this image's
colour been different, would the model still have been right?"

A raw break rate has the opposite blind spot: a probe that pushes *every* image into one class
(blur makes every shape look like a circle to some models) never breaks that class. Hence
``signal_lost = 1 - clip(J, 0, 1)`` with Youden's ``J = R - G`` computed on correctly classified
images: ``R`` = the share of class ``k``'s images still called ``k`` after the probe, ``G`` = the
share of the other classes' images the probe sends to ``k``. For a probe that erases every cue,
``R = G`` whatever the class, so ``signal_lost = 1`` even for the class it sinks into.

Verdict rules (per class)
-------------------------
Cues and their probes: **colour** = grayscale, hue rotation, channel shuffle (their mean);
**texture** = blur (keeps colour and coarse shape, removes fine texture); **shape** = patch
shuffle (keeps colours, local texture and the exact pixel histogram, destroys the global shape).
Masks are reported, not used in verdicts. A cue *matters* when the lower end of its
``signal_lost`` interval exceeds ``min_effect``; "A beats B" when the lower end of the paired
interval of ``lost_A - lost_B`` is above 0.

1. fewer than ``min_images`` images, or fewer than ``min_images`` correctly classified ones →
   **inconclusive** (too few decisions to measure);
2. colour matters → **relies on colour**;
3. texture matters and beats shape (texture survives patch shuffling, shape does not) →
   **relies on texture**; when 2 and 3 both hold, the larger loss wins and the reason names the
   other;
4. shape matters, beats both colour and texture, and neither of those matters →
   **shape-driven** (patch shuffling also adds edges at the patch borders, which a texture
   model reads as texture: only when blur leaves the decision alone is a patch-shuffle loss
   evidence for shape);
5. otherwise **inconclusive**, with the reason (nothing matters; blur and patch shuffle matter
   equally …).

Colour is judged on its own effect, not against blur or shape: a model can use colour *and*
shape (the demo's does: it is right on most random-colour images, yet recolouring loses a third
to a half of its class signal), and models trained on noisy images often lose much under blur
too; requiring colour to beat either would hide exactly such a shortcut. The price: recolouring
produces colours a model may never have met (grayscale, hue-rotated paint), and a model whose
shape detectors only work for the colours it was trained on is flagged as well — its decisions do
depend on colour. Blur is the texture cue and is always weighed against patch shuffling, because
a blurred shape model loses some detail too. ``effect_size`` is the ``signal_lost`` of the cue in
``cue`` (for inconclusive rows, the largest one), with its interval. When accuracy on the
originals is near chance the reason says so: only the decisions the model gets right are probed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

VERDICTS = ("relies on colour", "relies on texture", "shape-driven", "inconclusive")
CUES = ("colour", "texture", "shape")

BIAS_COLUMNS = ["class", "class_name", "probe", "group", "applicable", "n", "accuracy", "accuracy_probed",
                "accuracy_drop", "ci_low", "ci_high", "logit_drop", "logit_ci_low", "logit_ci_high",
                "prob_drop", "prob_ci_low", "prob_ci_high", "flip_rate", "n_correct", "break_rate",
                "break_ci_low", "break_ci_high", "signal_lost", "signal_ci_low", "signal_ci_high", "note"]
VERDICT_COLUMNS = ["class", "class_name", "verdict", "effect_size", "effect_ci_low", "effect_ci_high", "cue",
                   "reason", "n", "n_correct", "accuracy",
                   *[f"{c}_{s}" for c in CUES for s in ("lost", "ci_low", "ci_high")]]


@dataclass(frozen=True)
class Rules:
    """Thresholds of the verdict; see the module docstring.

    Attributes
    ----------
    min_images : int
        Fewer images (or fewer correctly classified images) in a class: inconclusive.
    min_effect : float
        A cue matters when the lower end of its ``signal_lost`` interval exceeds this.
    confidence : float
        Level of the percentile-bootstrap intervals.
    n_boot : int
        Bootstrap resamples.
    """

    min_images: int = 10
    min_effect: float = 0.2
    confidence: float = 0.95
    n_boot: int = 1000

    @classmethod
    def from_config(cls, probe_cfg) -> "Rules":
        return cls(min_images=probe_cfg.min_images, min_effect=probe_cfg.min_effect,
                   confidence=probe_cfg.confidence, n_boot=probe_cfg.bootstrap)


@dataclass(frozen=True)
class Interval:
    """An estimate on the sample and its bootstrap interval."""

    value: float
    low: float
    high: float

    @classmethod
    def nan(cls) -> "Interval":
        return cls(np.nan, np.nan, np.nan)


def softmax(logits) -> np.ndarray:
    """Probabilities over the last axis, in float64 (also the report's predictions)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- classes and outputs


@dataclass(frozen=True)
class Classes:
    """The classes of a run, and whether the model's output ``k`` may be read as class ``k``.

    Attributes
    ----------
    names : dict
        ``{code: name}`` for every declared class, also those without images. Runs with the
        extract stage's class list code classes ``0..K-1``; older runs keep their rows' labels.
    identity : bool
        Code ``k`` is the label ``k`` the user gave (folder position, ``.npz`` ``y`` value).
    source : dict
        ``{code: label as the user gave it}`` where known.

    Examples
    --------
    >>> Classes({0: "a", 1: "b", 2: "c"}, False, {0: 0, 1: 1, 2: 3000000}).mismatch(10)
    'the model has 10 outputs but the data has 3 classes labelled 0, 1, 3000000: predictions are not matched to labels'
    >>> Classes({0: "a", 1: "b"}, True, {0: 0, 1: 1}).mismatch(2) is None
    True
    """

    names: dict
    identity: bool = True
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def mismatch(self, n_outputs) -> str | None:
        """Why the model's outputs cannot be read as these classes, or None when they can.

        Output ``k`` is class ``k`` only when the codes are the user's own labels and there are as
        many outputs as declared classes; anything else would compare logits with the wrong class.
        """
        k = len(self.names)
        if k == 0:
            return "the images are unlabelled"
        if self.identity and n_outputs == k:
            return None
        labelled = f"{k} class{'es' if k != 1 else ''} labelled {_label_list(self)}"
        if n_outputs != k:
            return (f"the model has {n_outputs} output{'s' if n_outputs != 1 else ''} but the data has {labelled}: "
                    "predictions are not matched to labels")
        return (f"the data's {labelled.replace(' labelled', ' are labelled')}, not 0 to {k - 1} like the model's "
                f"{n_outputs} outputs: predictions are not matched to labels")


def _label_list(classes, shown=6) -> str:
    """The user's labels of the classes (their names where the label is unknown), shortened when long."""
    values = [str(classes.source.get(c, c if classes.identity else classes.names[c])) for c in classes.names]
    if len(values) > shown:
        values = values[:shown - 2] + ["…", values[-1]]
    return ", ".join(values)


def read_classes(dataset, manifest=None) -> Classes:
    """The run's classes from the extract stage's class list, or from the labelled rows of older runs.

    Parameters
    ----------
    dataset : pandas.DataFrame
        ``dataset.parquet``: ``label`` (code, -1 = unlabelled), ``class_name``, and in newer runs
        ``source_label`` (the label as the user gave it).
    manifest : dict, optional
        ``manifest.json``; its ``stages.extract.summary.classes`` is ``{"names": [...], "identity": bool}``.

    Returns
    -------
    Classes
        Old runs without the class list: the labels found in the rows, ``identity`` when they are
        exactly ``0..K-1`` (sparse labels, such as ``{0, 1, 3000000}``, are never read as outputs).
    """
    labelled = dataset[dataset["label"] >= 0]
    source_column = "source_label" if "source_label" in dataset.columns else "label"
    first = labelled.drop_duplicates("label").sort_values("label")
    source = {int(r["label"]): int(r[source_column]) for r in first.to_dict("records")}
    declared = (((manifest or {}).get("stages") or {}).get("extract") or {}).get("summary") or {}
    declared = declared.get("classes")
    if isinstance(declared, dict) and declared.get("names") is not None:
        names = {k: str(v) for k, v in enumerate(declared["names"])}
        identity = bool(declared.get("identity", True))
        if identity:
            source = {k: k for k in names}
        return Classes(names, identity, source)
    names = {int(r["label"]): str(r["class_name"]) if pd.notna(r["class_name"]) else str(int(r["label"]))
             for r in first.to_dict("records")}
    return Classes(names, list(names) == list(range(len(names))), source)


# --------------------------------------------------------------------------- bootstrap


class Bootstrap:
    """Paired percentile bootstrap of statistics that are ratios of per-image sums.

    Resample ``r`` draws ``n`` images with replacement, i.e. integer weights ``w_r``; a column
    ``x`` of per-image values then sums to ``w_r @ x``. The weights depend only on ``(n, n_boot,
    seed)``, so every call sees the same resamples and differences between statistics are paired.

    Examples
    --------
    >>> boot = Bootstrap(4, n_boot=200, seed=0)
    >>> point, reps = boot.sums(np.array([[1.0], [0.0], [1.0], [1.0]]))
    >>> float(point[0]), reps.shape
    (3.0, (200, 1))
    """

    BLOCK = 2_000_000  # weights held at once (rows x images)

    def __init__(self, n, n_boot=1000, seed=0, confidence=0.95):
        self.n, self.n_boot, self.seed, self.confidence = int(n), int(n_boot), seed, confidence

    def _weights(self):
        rng = np.random.default_rng(self.seed)
        rows = max(1, self.BLOCK // max(self.n, 1))
        for start in range(0, self.n_boot, rows):
            b = min(rows, self.n_boot - start)
            idx = rng.integers(0, self.n, size=(b, self.n)) + self.n * np.arange(b)[:, None]
            yield np.bincount(idx.ravel(), minlength=b * self.n).reshape(b, self.n).astype(np.float64)

    def sums(self, columns):
        """``(sample sums (q,), resample sums (n_boot, q))`` of ``columns`` ``(n, q)``."""
        columns = np.asarray(columns, dtype=np.float64)
        if self.n == 0:
            return columns.sum(axis=0), np.zeros((self.n_boot, columns.shape[1]))
        return columns.sum(axis=0), np.concatenate([w @ columns for w in self._weights()])

    def interval(self, point, reps):
        """Elementwise :class:`Interval` arrays from a statistic on the sample and on the resamples."""
        tail = 100 * (1 - self.confidence) / 2
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(reps).any(axis=0)
            low, high = np.full(np.shape(point), np.nan), np.full(np.shape(point), np.nan)
            if finite.any():
                low[finite], high[finite] = np.nanpercentile(reps[:, finite], [tail, 100 - tail], axis=0)
        return Interval(np.asarray(point, dtype=np.float64), low, high)


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _onehot(values, classes):
    return (np.asarray(values)[:, None] == np.asarray(classes)[None, :]).astype(np.float64)


# --------------------------------------------------------------------------- per class and probe


@dataclass
class _ProbeSums:
    """Sample and resample sums of one probe's per-class columns (each ``(…, K)``)."""

    correct_probed: tuple
    logit: tuple
    prob: tuple
    flip: tuple
    kept: tuple   # correct before and after
    into: tuple   # correct before, probed prediction = this class


def _probe_sums(boot, classes, labels, logits, probed_logits, correct):
    onehot = _onehot(labels, classes)
    rows = np.arange(len(labels))
    pred, pred_p = logits.argmax(axis=1), probed_logits.argmax(axis=1)
    correct_p = pred_p == labels
    columns = [onehot * correct_p[:, None],
               onehot * (logits[rows, labels] - probed_logits[rows, labels])[:, None],
               onehot * (softmax(logits)[rows, labels] - softmax(probed_logits)[rows, labels])[:, None],
               onehot * (pred != pred_p)[:, None],
               onehot * (correct & correct_p)[:, None],
               _onehot(pred_p, classes) * correct[:, None]]
    k = len(classes)
    point, reps = boot.sums(np.concatenate(columns, axis=1))
    return _ProbeSums(*[(point[i * k:(i + 1) * k], reps[:, i * k:(i + 1) * k]) for i in range(len(columns))])


def _signal_lost(kept, into, correct, total_correct):
    """``1 - clip(R - G, 0, 1)`` from sums (sample or resamples alike)."""
    recall = _ratio(kept, correct)
    false_in = _ratio(into - kept, total_correct - correct)
    return 1.0 - np.clip(recall - false_in, 0.0, 1.0)


def shortcut_tables(labels, class_names, logits, probed, groups, seed=0, rules=Rules(), not_applicable=None):
    """Per (class, probe) metrics and per-class verdicts.

    Parameters
    ----------
    labels : (N,) int
        True labels (>= 0) of the probed images; label ``k`` is output ``k``.
    class_names : dict
        ``{label: name}``.
    logits : (N, K) float
        The model's logits on the originals.
    probed : dict
        ``{probe name: (N, K) logits on the probed images}``, same image order.
    groups : dict
        ``{probe name: group}`` (``colour``, ``texture``, ``shape``, ``context``).
    seed : int
        Seeds the bootstrap.
    rules : Rules
    not_applicable : dict, optional
        ``{probe name: reason}`` for probes that could not run (colour probes on grey images);
        they get rows with ``applicable = False``, the reason in ``note`` and no numbers.

    Returns
    -------
    table : pandas.DataFrame
        One row per (class, probe), columns ``BIAS_COLUMNS``.
    verdicts : pandas.DataFrame
        One row per class, columns ``VERDICT_COLUMNS``.

    Raises
    ------
    ValueError
        When a label has no output to be read as (check :meth:`Classes.mismatch` first).
    """
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels {labels.min()}..{labels.max()} cannot be read as the model's "
                         f"{logits.shape[1]} outputs")
    classes = np.unique(labels)
    boot = Bootstrap(len(labels), rules.n_boot, [int(seed), 0xB1A5], rules.confidence)
    correct = logits.argmax(axis=1) == labels
    (n, n_r), (good, good_r) = [boot.sums(_onehot(labels, classes) * w[:, None])
                                for w in (np.ones(len(labels)), correct)]
    total, total_r = good.sum(), good_r.sum(axis=1, keepdims=True)
    sums = {name: _probe_sums(boot, classes, labels, logits, np.asarray(z, np.float64), correct)
            for name, z in probed.items()}
    names = {int(k): class_names.get(int(k), str(k)) for k in classes}
    table = _probe_rows(boot, classes, names, sums, groups, (n, n_r), (good, good_r), (total, total_r))
    for name, reason in (not_applicable or {}).items():
        table += [{"class": int(k), "class_name": names[int(k)], "probe": name, "group": groups.get(name, ""),
                   "applicable": False, "n": int(c), "note": reason} for k, c in zip(classes, n)]
    verdicts = _verdict_rows(boot, classes, names, sums, groups, (n, n_r), (good, good_r), (total, total_r),
                             logits.shape[1], rules)
    return (pd.DataFrame(table).reindex(columns=BIAS_COLUMNS).sort_values(["class", "probe"], kind="stable")
            .reset_index(drop=True), pd.DataFrame(verdicts).reindex(columns=VERDICT_COLUMNS))


def _probe_rows(boot, classes, names, sums, groups, n, good, total):
    rows = []
    iv = boot.interval
    for name, s in sums.items():
        acc = iv(_ratio(good[0], n[0]), _ratio(good[1], n[1]))
        acc_p = _ratio(s.correct_probed[0], n[0])
        drop = iv(_ratio(good[0] - s.correct_probed[0], n[0]), _ratio(good[1] - s.correct_probed[1], n[1]))
        logit = iv(_ratio(s.logit[0], n[0]), _ratio(s.logit[1], n[1]))
        prob = iv(_ratio(s.prob[0], n[0]), _ratio(s.prob[1], n[1]))
        brk = iv(_ratio(good[0] - s.kept[0], good[0]), _ratio(good[1] - s.kept[1], good[1]))
        lost = iv(_signal_lost(s.kept[0], s.into[0], good[0], total[0]),
                  _signal_lost(s.kept[1], s.into[1], good[1], total[1]))
        flip = _ratio(s.flip[0], n[0])
        for j, k in enumerate(classes):
            rows.append({"class": int(k), "class_name": names[int(k)], "probe": name, "group": groups[name],
                         "applicable": True, "n": int(n[0][j]), "accuracy": acc.value[j],
                         "accuracy_probed": acc_p[j], "accuracy_drop": drop.value[j], "ci_low": drop.low[j],
                         "ci_high": drop.high[j], "logit_drop": logit.value[j], "logit_ci_low": logit.low[j],
                         "logit_ci_high": logit.high[j], "prob_drop": prob.value[j], "prob_ci_low": prob.low[j],
                         "prob_ci_high": prob.high[j], "flip_rate": flip[j], "n_correct": int(good[0][j]),
                         "break_rate": brk.value[j], "break_ci_low": brk.low[j], "break_ci_high": brk.high[j],
                         "signal_lost": lost.value[j], "signal_ci_low": lost.low[j],
                         "signal_ci_high": lost.high[j], "note": ""})
    return rows


def cue_losses(sums, groups, good, total):
    """``{cue: signal_lost}`` (arrays over classes) from the mean sums of each cue's probes.

    ``sums`` maps probe names to ``(kept, into)`` sums; means of sums are sums of means, so a cue's
    loss is that of the average over its probes of each image's probed decision.
    """
    out = {}
    for cue in CUES:
        members = [v for name, v in sums.items() if groups.get(name) == cue]
        if members:
            kept = np.mean([m[0] for m in members], axis=0)
            into = np.mean([m[1] for m in members], axis=0)
            out[cue] = _signal_lost(kept, into, good, total)
    return out


def _verdict_rows(boot, classes, names, sums, groups, n, good, total, n_outputs, rules):
    point = cue_losses({k: (s.kept[0], s.into[0]) for k, s in sums.items()}, groups, good[0], total[0])
    reps = cue_losses({k: (s.kept[1], s.into[1]) for k, s in sums.items()}, groups, good[1], total[1])
    rows = []
    for j, k in enumerate(classes):
        effects = {c: _pick(boot.interval(point[c], reps[c]), j) for c in point}
        contrasts = {(a, b): _pick(boot.interval(point[a] - point[b], reps[a] - reps[b]), j)
                     for a in point for b in point if a != b}
        accuracy = float(good[0][j] / n[0][j]) if n[0][j] else np.nan
        verdict, cue, effect, reason = decide(effects, contrasts, int(n[0][j]), int(good[0][j]), accuracy,
                                              n_outputs, rules)
        row = {"class": int(k), "class_name": names[int(k)], "verdict": verdict, "effect_size": effect.value,
               "effect_ci_low": effect.low, "effect_ci_high": effect.high, "cue": cue, "reason": reason,
               "n": int(n[0][j]), "n_correct": int(good[0][j]), "accuracy": accuracy}
        for c in CUES:
            iv = effects.get(c, Interval.nan())
            row.update({f"{c}_lost": iv.value, f"{c}_ci_low": iv.low, f"{c}_ci_high": iv.high})
        rows.append(row)
    return rows


def _pick(iv, j) -> Interval:
    return Interval(float(iv.value[j]), float(iv.low[j]), float(iv.high[j]))


# --------------------------------------------------------------------------- verdicts


def _fmt(iv: Interval) -> str:
    return f"{iv.value:.2f} [{iv.low:.2f}, {iv.high:.2f}]"


def decide(effects, contrasts, n, n_correct, accuracy=np.nan, n_classes=None, rules=Rules()):
    """The verdict of one class from its cue evidence; see the module docstring for the rules.

    Parameters
    ----------
    effects : dict
        ``{cue: Interval}`` of ``signal_lost`` (cues not probed are missing).
    contrasts : dict
        ``{(a, b): Interval}`` of the paired differences ``lost_a - lost_b``.
    n, n_correct : int
        Images of the class, and how many of them the model classifies correctly.
    accuracy : float
        On the originals (only used to warn when it is near chance).
    n_classes : int, optional
        For the chance level in that warning.
    rules : Rules

    Returns
    -------
    verdict : str
        One of ``VERDICTS``.
    cue : str or None
        The cue the effect size belongs to.
    effect : Interval
    reason : str

    Examples
    --------
    >>> I = Interval
    >>> effects = {"colour": I(0.9, 0.8, 1.0), "texture": I(0.0, 0.0, 0.1), "shape": I(0.1, 0.0, 0.2)}
    >>> contrasts = {("texture", "shape"): I(-0.1, -0.2, 0.0), ("shape", "texture"): I(0.1, 0.0, 0.2)}
    >>> decide(effects, contrasts, n=100, n_correct=50)[0]
    'relies on colour'
    """
    if n < rules.min_images:
        return "inconclusive", None, Interval.nan(), f"only {n} images of this class (need {rules.min_images})"
    if n_correct < rules.min_images:
        return ("inconclusive", None, Interval.nan(),
                f"only {n_correct} of {n} images classified correctly (need {rules.min_images}): "
                "too few decisions to see what changes them")
    t = rules.min_effect

    def matters(cue):
        return cue in effects and effects[cue].low > t

    def beats(a, b):
        return (a, b) in contrasts and contrasts[(a, b)].low > 0

    evidence = _evidence(effects)
    caveat = ""
    if n_classes and np.isfinite(accuracy) and accuracy < 1.5 / n_classes:
        caveat = (f" (accuracy on the originals is {accuracy:.2f}, near chance {1 / n_classes:.2f}: "
                  f"only the {n_correct} images it gets right are probed)")
    colour = matters("colour")
    texture = matters("texture") and beats("texture", "shape")
    if colour and texture:
        first = "colour" if effects["colour"].value >= effects["texture"].value else "texture"
        other = "texture" if first == "colour" else "colour"
        return f"relies on {first}", first, effects[first], f"{evidence}; {other} matters too{caveat}"
    if colour:
        return "relies on colour", "colour", effects["colour"], f"{evidence}{caveat}"
    if texture:
        return ("relies on texture", "texture", effects["texture"],
                f"{evidence}; blur loses {_fmt(contrasts[('texture', 'shape')])} more than patch shuffling, "
                f"which keeps texture{caveat}")
    others = [c for c in ("colour", "texture") if c in effects]
    if matters("shape") and all(beats("shape", c) and not matters(c) for c in others):
        grey = " (colour not testable: grey images)" if "colour" not in effects else ""
        return "shape-driven", "shape", effects["shape"], f"{evidence}{grey}{caveat}"
    cue, effect = _largest(effects)
    return "inconclusive", cue, effect, _why_inconclusive(effects, t, matters) + (
        f": {evidence}" if evidence else "") + caveat


def _evidence(effects) -> str:
    what = {"colour": "recolouring", "texture": "blur", "shape": "patch shuffle"}
    return "; ".join(f"{what[c]} loses {_fmt(effects[c])} of the class signal" for c in CUES if c in effects)


def _largest(effects):
    if not effects:
        return None, Interval.nan()
    cue = max(effects, key=lambda c: effects[c].value)
    return cue, effects[cue]


def _why_inconclusive(effects, t, matters) -> str:
    if not effects:
        return "no colour, texture or shape probe was run"
    strong = [c for c in CUES if matters(c)]
    if not strong:
        return f"no probe clearly removes more than {t:g} of the class signal"
    if "shape" not in effects:
        return "patch shuffle was not run, so texture and shape cannot be told apart"
    if strong == ["texture", "shape"]:
        return "blur and patch shuffle both matter (texture and shape cannot be told apart)"
    return f"{' and '.join(strong)} {'matters' if len(strong) == 1 else 'matter'}, but not clearly more than the others"


# --------------------------------------------------------------------------- units and clusters


class UnitSensitivity:
    """Streaming per-unit sensitivity to each probe: mean |activation change| ÷ the unit's spread.

    For unit ``u`` and probe ``p``: ``mean_i |a_u(p(x_i)) - a_u(x_i)| / std_i a_u(x_i)`` over the
    probed images — how far, in units of its natural variation, the probe moves the unit on a
    typical image. Per image, not per population: on images where colour is random a colour unit's
    *average* does not move under recolouring, but each image's value does. Constant units get NaN.

    Examples
    --------
    >>> acc = UnitSensitivity()
    >>> acc.update("l", np.array([[0.], [2.]]), {"blur": np.array([[1.], [3.]])})
    >>> float(acc.table({"blur": "texture"})["texture_sensitivity"][0])
    1.0
    """

    def __init__(self):
        self._stats = {}   # layer -> [n, sum, sum of squares, {probe: sum |delta|}]

    def update(self, layer, original, probed) -> None:
        """Add a batch: ``original`` ``(B, C)`` and ``{probe: (B, C)}`` for the same images."""
        original = np.asarray(original, dtype=np.float64)
        st = self._stats.setdefault(layer, [0, 0.0, 0.0, {}])
        st[0] += len(original)
        st[1] = st[1] + original.sum(axis=0)
        st[2] = st[2] + (original ** 2).sum(axis=0)
        for name, values in probed.items():
            st[3][name] = st[3].get(name, 0.0) + np.abs(np.asarray(values, np.float64) - original).sum(axis=0)

    def table(self, groups) -> pd.DataFrame:
        """``layer, channel, colour/texture/shape_sensitivity, <probe>_sensitivity …``.

        A cue's sensitivity is the mean over its probes (NaN when none ran, e.g. colour on grey).
        """
        frames = []
        for layer, (n, s, ss, diffs) in self._stats.items():
            mean = s / n
            std = np.sqrt(np.maximum(ss / n - mean ** 2, 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                per = {p: np.where(std > 1e-6 * (np.abs(mean) + 1e-12), d / n / std, np.nan) for p, d in diffs.items()}
            frame = {"layer": layer, "channel": np.arange(len(mean))}
            for cue in CUES:
                parts = [v for p, v in per.items() if groups.get(p) == cue]
                frame[f"{cue}_sensitivity"] = np.mean(parts, axis=0) if parts else np.full(len(mean), np.nan)
            frame.update({f"{p}_sensitivity": v for p, v in per.items()})
            frames.append(pd.DataFrame(frame))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["layer", "channel", *[f"{c}_sensitivity" for c in CUES]])


def cluster_sensitivity(units, clusters) -> pd.DataFrame:
    """Mean unit sensitivities per neuron cluster (dead units and cluster -1 left out).

    ``units`` is ``probe_units.parquet``, ``clusters`` is ``clusters.parquet`` (the cluster
    stage's table, read only). The result has ``layer, cluster, size``, the ``*_sensitivity``
    means and ``dominant_cue`` (the largest of colour / texture / shape).
    """
    sens = [c for c in units.columns if c.endswith("_sensitivity")]
    keep = clusters[(clusters["cluster"] >= 0) & ~clusters["dead"].astype(bool)][["layer", "channel", "cluster"]]
    merged = keep.merge(units, on=["layer", "channel"], how="inner")
    if merged.empty:
        return pd.DataFrame(columns=["layer", "cluster", "size", *sens, "dominant_cue"])
    table = merged.groupby(["layer", "cluster"], sort=True).agg(
        size=("channel", "size"), **{c: (c, "mean") for c in sens}).reset_index()
    cues = table[[f"{c}_sensitivity" for c in CUES]].to_numpy(dtype=float)
    has = np.isfinite(cues).any(axis=1)
    best = np.argmax(np.where(np.isfinite(cues), cues, -np.inf), axis=1)
    table["dominant_cue"] = [CUES[b] if h else None for b, h in zip(best, has)]
    return table


def colour_clusters(probe_clusters, maximize_index=None, top=6) -> pd.DataFrame:
    """The ``top`` most colour-sensitive clusters, with their maximization image when rendered.

    For the report: ``probe_clusters`` is ``probe_clusters.parquet`` (or
    :func:`cluster_sensitivity` of the current tables), ``maximize_index`` is
    ``maximize/index.parquet``; the ``path`` column is relative to the run directory (None when
    that cluster was not rendered).
    """
    table = probe_clusters.dropna(subset=["colour_sensitivity"]).sort_values(
        "colour_sensitivity", ascending=False, kind="stable").head(top).reset_index(drop=True)
    table["path"] = None
    if maximize_index is not None and len(maximize_index) and len(table):
        images = maximize_index[maximize_index["kind"] == "cluster"][["layer", "cluster", "path"]]
        images = images.drop_duplicates(["layer", "cluster"])
        table = table.drop(columns="path").merge(images, on=["layer", "cluster"], how="left")
    return table
