"""Comparing two runs over the same images: pure numpy/pandas, no files.

:mod:`pipeline.compare.run` reads both run directories and calls these; each function here takes
arrays and tables and returns arrays and tables, so it can be tested on hand-made numbers.

The numbers
-----------
- **Image matching** (:func:`match_images`): images are the same when their content hashes
  (``dataset.parquet``'s ``content_hash``) are equal, whatever their paths or positions.
- **Cross-model CKA** (:func:`cross_cka`): linear CKA between every layer of A and every layer of
  B on the matched images, with the width-independent unbiased minibatch estimator of the cluster
  stage (:class:`pipeline.analysis.layerstats.MinibatchCKA`).
- **Best-match correlation** (:func:`best_matches`): for each unit of A, the unit of B whose pooled
  activations correlate most with it over the matched images (Li, Yosinski, Clune, Lipson &
  Hopcroft 2016, "Convergent learning"), and whether the match is mutual.
- **Cluster counterparts** (:func:`cluster_counterparts`): a neuron cluster of A has a counterpart
  in B when the median best-match correlation of its members is at least ``threshold`` (0.5).
- **Paired differences** (:func:`accuracy_table`, :func:`verdict_table`): A and B are scored on
  the same resamples of the matched images (percentile bootstrap), so the interval of B − A
  accounts for the pairing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import UserError

MIN_OVERLAP = 0.5     # of the smaller run's images, matched by content hash
MIN_IMAGES = 10       # matched images needed at least
COUNTERPART = 0.5     # median best-match r of a cluster's members
SAME_NAME_SLACK = 0.05


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Matching:
    """Which rows of A and B show the same images, in one common order.

    Attributes
    ----------
    rows_a, rows_b : numpy.ndarray of int64
        Dataset rows of A and of B; ``rows_a[i]`` and ``rows_b[i]`` are the same image. Sorted by
        A's row.
    n_a, n_b : int
        Images in each run.
    identical : bool
        Both runs hold exactly the same images (maybe in another order).
    duplicates_a, duplicates_b : int
        Rows whose image appears earlier in the same run (only the first is matched).
    note : str or None
        Said when the comparison uses an intersection (printed and stored in ``compare.json``).
    """

    rows_a: np.ndarray
    rows_b: np.ndarray
    n_a: int
    n_b: int
    identical: bool
    duplicates_a: int = 0
    duplicates_b: int = 0
    note: str | None = None

    @property
    def n(self) -> int:
        return len(self.rows_a)

    def record(self) -> dict:
        return {"rule": f"content hash; at least {MIN_IMAGES} images and the given share of the smaller run",
                "n_a": self.n_a, "n_b": self.n_b, "n_matched": self.n, "identical": self.identical,
                "duplicates_a": self.duplicates_a, "duplicates_b": self.duplicates_b, "note": self.note}


def match_images(hash_a, hash_b, *, min_overlap=MIN_OVERLAP, min_images=MIN_IMAGES) -> Matching:
    """Match the images of two runs by content hash.

    Parameters
    ----------
    hash_a, hash_b : sequence of str
        One content hash per dataset row.
    min_overlap : float, default=0.5
        The matched images must be at least this share of the smaller run's images.
    min_images : int, default=10
        And at least this many.

    Returns
    -------
    Matching
        With a ``note`` whenever the two sets are not the same.

    Raises
    ------
    UserError
        Fewer matched images than the rule asks: the runs are not over the same images.

    Examples
    --------
    >>> m = match_images(["x", "y", "z"] * 4 + list("abcdefghij"), list("abcdefghij") + ["w"],
    ...                  min_images=5)
    >>> m.n, m.identical
    (10, False)
    """
    hash_a, hash_b = [pd.Series(np.asarray(h, dtype=object)) for h in (hash_a, hash_b)]
    first_a, first_b = ~hash_a.duplicated(), ~hash_b.duplicated()
    pos_b = pd.Series(np.flatnonzero(first_b.to_numpy()), index=hash_b[first_b].to_numpy())
    rows_a = np.flatnonzero((first_a & hash_a.isin(pos_b.index)).to_numpy())
    rows_b = pos_b.loc[hash_a.iloc[rows_a].to_numpy()].to_numpy() if len(rows_a) else np.zeros(0, np.int64)
    n_a, n_b, n = len(hash_a), len(hash_b), len(rows_a)
    dup_a, dup_b = int((~first_a).sum()), int((~first_b).sum())
    smaller = min(n_a, n_b)
    if n < min_images or n < min_overlap * smaller:
        raise UserError(f"the two runs are not over the same images: only {n} of their {n_a} and {n_b} images are "
                        f"the same (matched by content hash); compare needs at least {min_images} and "
                        f"{min_overlap:.0%} of the smaller run — analyse both models on the same image folder "
                        "or .npz")
    identical = n == n_a == n_b and not dup_a and not dup_b
    note = None
    if not identical:
        note = (f"compared on the {n} images found in both runs (run A has {n_a}, run B has {n_b}; matched by "
                "content hash)")
        if dup_a or dup_b:
            note += f"; repeated images counted once ({dup_a} in A, {dup_b} in B)"
    return Matching(rows_a.astype(np.int64), np.asarray(rows_b, dtype=np.int64), n_a, n_b, identical,
                    dup_a, dup_b, note)


class RowView:
    """Rows ``rows`` of an ``(N, ...)`` array (zarr or numpy), read only when indexed.

    ``view[i]`` is ``array[rows[i]]``; :class:`~pipeline.analysis.layerstats.MinibatchCKA` reads
    its sample through it, so the matched rows of two runs line up without copying either.
    """

    def __init__(self, array, rows):
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *tuple(array.shape)[1:])

    def __getitem__(self, which):
        wanted = self.rows[which]
        unique, inverse = np.unique(np.atleast_1d(wanted), return_inverse=True)
        if hasattr(self.array, "get_orthogonal_selection"):
            block = self.array.get_orthogonal_selection((unique,) + (slice(None),) * (len(self.shape) - 1))
        else:
            block = np.asarray(self.array)[unique]
        out = np.asarray(block)[inverse.reshape(-1)]
        return out if np.ndim(wanted) else out[0]

    def read(self) -> np.ndarray:
        return self[np.arange(self.shape[0])]


# --------------------------------------------------------------------------- representations


def cross_cka(arrays_a, arrays_b, *, batch_size=256, max_rows=4096, seed=0) -> np.ndarray:
    """Linear CKA of every layer of A with every layer of B over the same rows.

    Parameters
    ----------
    arrays_a, arrays_b : sequence of (N, C) array-like
        The layers of each run, row ``i`` the same image in all of them (e.g. :class:`RowView`).
    batch_size, max_rows, seed
        As :class:`pipeline.analysis.layerstats.MinibatchCKA` (the cluster stage's defaults).

    Returns
    -------
    numpy.ndarray of shape (L_a, L_b)
        The cross block of the CKA matrix of all the layers together; 1 where a layer of B is a
        linear (orthogonal, scaled) image of a layer of A; NaN for a layer constant on the sample.
    """
    from pipeline.analysis.layerstats import MinibatchCKA

    arrays_a, arrays_b = list(arrays_a), list(arrays_b)
    cka = MinibatchCKA(batch_size=batch_size, max_rows=max_rows, random_state=seed).fit(arrays_a + arrays_b)
    return cka.cka_[:len(arrays_a), len(arrays_a):]


def pair_layers(names_a, names_b, cka, *, slack=SAME_NAME_SLACK) -> list:
    """The layer of B each layer of A is matched with for the unit comparison.

    The layer of B with the same name when it exists and its CKA is within ``slack`` of the best
    of the row (same architecture, two checkpoints); otherwise the layer of B with the highest CKA.

    Returns
    -------
    list of (str, str or None, str)
        ``(layer of A, layer of B, why)``; ``None`` when the whole row is NaN.
    """
    pairs = []
    for i, a in enumerate(names_a):
        row = np.asarray(cka[i], dtype=np.float64)
        if not np.isfinite(row).any():
            pairs.append((a, None, "no CKA (constant layer)"))
            continue
        best = int(np.nanargmax(row))
        if a in names_b and np.isfinite(row[names_b.index(a)]) and row[names_b.index(a)] >= row[best] - slack:
            pairs.append((a, a, "same name"))
        else:
            pairs.append((a, names_b[best], "highest CKA"))
    return pairs


def _standardised(x):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = np.where(np.isfinite(x), x, np.nan)
    mean = np.nanmean(x, axis=0) if len(x) else np.zeros(x.shape[1])
    z = np.nan_to_num(x - mean)
    std = np.sqrt((z ** 2).mean(axis=0)) if len(x) else np.zeros(x.shape[1])
    scale = np.maximum(np.abs(mean), np.abs(x).max(axis=0, initial=0.0) if len(x) else 0.0)
    alive = (std > 4 * np.finfo(np.float32).eps * scale) & (std > 0) & ~np.isnan(x).any(axis=0)
    return np.where(alive, z / np.where(alive, std, 1.0), 0.0), alive


def correlation(xa, xb) -> np.ndarray:
    """Pearson correlation of every column of ``xa`` ``(n, C_a)`` with every column of ``xb``.

    Returns
    -------
    numpy.ndarray of shape (C_a, C_b)
        NaN for a column that is constant (the scale-free dead-unit rule of the cluster stage) or
        holds NaN/Inf.
    """
    za, alive_a = _standardised(xa)
    zb, alive_b = _standardised(xb)
    r = np.clip(za.T @ zb / max(len(za), 1), -1.0, 1.0)
    r[~alive_a] = np.nan
    r[:, ~alive_b] = np.nan
    return r


def best_matches(xa, xb) -> pd.DataFrame:
    """For each unit of A, the most correlated unit of B (convergent learning, Li et al. 2016).

    Parameters
    ----------
    xa, xb : (n, C_a), (n, C_b) array-like
        Pooled activations of one layer of each model over the same images, in the same order.

    Returns
    -------
    pandas.DataFrame
        One row per unit of A: ``channel``, ``best_channel`` (-1 when none), ``best_corr`` (Pearson
        r, NaN for a dead unit), ``second_corr`` (the runner-up: a one-to-one match stands out),
        ``mutual`` (A's unit is also the best match of its B unit).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(50, 3))
    >>> best_matches(x, x[:, ::-1])["best_channel"].tolist()
    [2, 1, 0]
    """
    r = correlation(xa, xb)
    n_a, n_b = r.shape
    filled = np.where(np.isnan(r), -np.inf, r)
    best = filled.argmax(axis=1) if n_b else np.zeros(n_a, np.int64)
    best_corr = filled[np.arange(n_a), best] if n_b else np.full(n_a, -np.inf)
    second = np.sort(filled, axis=1)[:, -2] if n_b > 1 else np.full(n_a, -np.inf)
    back = filled.argmax(axis=0) if n_a else np.zeros(n_b, np.int64)
    dead = ~np.isfinite(best_corr)
    mutual = ~dead & (back[best] == np.arange(n_a)) if n_b else np.zeros(n_a, bool)
    return pd.DataFrame({"channel": np.arange(n_a), "best_channel": np.where(dead, -1, best).astype(np.int64),
                         "best_corr": np.where(dead, np.nan, best_corr),
                         "second_corr": np.where(np.isfinite(second), second, np.nan), "mutual": mutual})


def cluster_counterparts(clusters_a, units, clusters_b=None, *, threshold=COUNTERPART) -> pd.DataFrame:
    """Which neuron clusters of A have a counterpart in B.

    Parameters
    ----------
    clusters_a : pandas.DataFrame
        A's ``clusters.parquet`` (``layer``, ``channel``, ``cluster``; -1 = dead/noise, left out).
    units : pandas.DataFrame
        :func:`best_matches` rows of every paired layer with ``layer_a``, ``layer_b`` columns.
    clusters_b : pandas.DataFrame, optional
        B's ``clusters.parquet``: then also the cluster of B most members' best matches fall in.
    threshold : float, default=0.5
        A cluster has a counterpart when the median best-match r of its members is at least this.

    Returns
    -------
    pandas.DataFrame
        One row per cluster of A: ``layer_a``, ``cluster``, ``size``, ``layer_b``, ``median_corr``,
        ``min_corr``, ``mutual_share``, ``has_counterpart``, ``cluster_b`` (-1 when unknown),
        ``cluster_b_share``.
    """
    columns = ["layer_a", "cluster", "size", "layer_b", "median_corr", "min_corr", "mutual_share",
               "has_counterpart", "cluster_b", "cluster_b_share"]
    if clusters_a is None or units is None or units.empty:
        return pd.DataFrame(columns=columns)
    of_b = {}
    if clusters_b is not None:
        of_b = {(l, int(c)): int(k) for l, c, k in clusters_b[["layer", "channel", "cluster"]].itertuples(index=False)}
    joined = clusters_a[clusters_a["cluster"] >= 0][["layer", "channel", "cluster"]].merge(
        units.rename(columns={"layer_a": "layer"}), on=["layer", "channel"], how="inner")
    rows = []
    for (layer, cluster), part in joined.groupby(["layer", "cluster"], sort=False):
        r = part["best_corr"].to_numpy(dtype=np.float64)
        median = float(np.nanmedian(r)) if np.isfinite(r).any() else np.nan
        layer_b = part["layer_b"].iloc[0]
        targets = [of_b.get((layer_b, int(c)), -1) for c in part["best_channel"]]
        targets = [t for t in targets if t >= 0]
        top, share = -1, np.nan
        if targets:
            values, counts = np.unique(targets, return_counts=True)
            top, share = int(values[counts.argmax()]), float(counts.max() / len(part))
        rows.append({"layer_a": layer, "cluster": int(cluster), "size": len(part), "layer_b": layer_b,
                     "median_corr": median, "min_corr": float(np.nanmin(r)) if np.isfinite(r).any() else np.nan,
                     "mutual_share": float(part["mutual"].mean()),
                     "has_counterpart": bool(np.isfinite(median) and median >= threshold),
                     "cluster_b": top, "cluster_b_share": share})
    return pd.DataFrame(rows, columns=columns)


def layer_curves(layers_a, layers_b, order_a, order_b) -> pd.DataFrame:
    """The per-layer separability curves of both runs in one long table.

    Parameters
    ----------
    layers_a, layers_b : pandas.DataFrame or None
        Each run's ``layers.parquet`` (computed by its cluster stage on *all* its images).
    order_a, order_b : list of str
        Each run's layer order (input to output).

    Returns
    -------
    pandas.DataFrame
        ``run`` (``a``/``b``), ``layer``, ``position``, ``depth`` (0 = first analysed layer, 1 = last),
        ``probe_accuracy``, ``knn_accuracy``, ``class_silhouette`` (NaN when not computed).
    """
    figures = ["probe_accuracy", "knn_accuracy", "class_silhouette"]
    parts = []
    for run, table, order in (("a", layers_a, order_a), ("b", layers_b, order_b)):
        frame = pd.DataFrame({"run": run, "layer": list(order), "position": np.arange(len(order))})
        frame["depth"] = frame["position"] / max(len(order) - 1, 1)
        if table is not None and not table.empty:
            frame = frame.merge(table.reindex(columns=["layer", *figures]), on="layer", how="left")
        parts.append(frame.reindex(columns=["run", "layer", "position", "depth", *figures]))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- decisions, paired


def _onehot(values, classes):
    return (np.asarray(values)[:, None] == np.asarray(classes)[None, :]).astype(np.float64)


def accuracy_table(class_names, labels, correct_a, correct_b, *, n_boot=1000, seed=0,
                   confidence=0.95) -> pd.DataFrame:
    """Accuracy of A and B on the same images, overall and per class, with the paired interval.

    Parameters
    ----------
    class_names : dict
        ``{code: name}``.
    labels : (n,) int
        Class codes of the matched images (-1 = unlabelled, left out).
    correct_a, correct_b : (n,) bool or None
        Whether each model is right on each image; None when that model's outputs are not classes.

    Returns
    -------
    pandas.DataFrame
        ``class`` (-1 = all), ``class_name`` (``all``), ``n``, ``accuracy_a``, ``accuracy_b``,
        ``difference`` (B − A), ``diff_ci_low``, ``diff_ci_high``.
    """
    from pipeline.shortcuts.verdicts import Bootstrap

    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    labels = labels[keep]
    nan = np.full(len(labels), np.nan)
    ca = nan if correct_a is None else np.asarray(correct_a, dtype=np.float64)[keep]
    cb = nan if correct_b is None else np.asarray(correct_b, dtype=np.float64)[keep]
    classes = np.unique(labels)
    member = np.concatenate([np.ones((len(labels), 1)), _onehot(labels, classes)], axis=1)
    boot = Bootstrap(len(labels), n_boot, [int(seed), 0xC0A7], confidence)
    point, reps = boot.sums(np.concatenate([member, member * ca[:, None], member * cb[:, None]], axis=1))
    q = member.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = [point[i * q:(i + 1) * q] / point[:q] for i in (1, 2)]
        reps_diff = (reps[:, 2 * q:] - reps[:, q:2 * q]) / reps[:, :q]
    diff = boot.interval(acc[1] - acc[0], reps_diff)
    codes = [-1, *[int(k) for k in classes]]
    return pd.DataFrame({"class": codes, "class_name": ["all", *[class_names.get(k, str(k)) for k in codes[1:]]],
                         "n": point[:q].astype(np.int64), "accuracy_a": acc[0], "accuracy_b": acc[1],
                         "difference": diff.value, "diff_ci_low": diff.low, "diff_ci_high": diff.high})


@dataclass(frozen=True)
class ProbeOutcomes:
    """One run's decisions on the probed images, in the matched order.

    Attributes
    ----------
    labels : (n,) int
        Class codes (the run's own; >= 0).
    original : (n,) int
        Predicted output on the originals.
    probed : dict
        ``{probe name: (n,) predicted output}``.
    groups : dict
        ``{probe name: cue group}``.
    """

    labels: np.ndarray
    original: np.ndarray
    probed: dict
    groups: dict


def cue_loss_samples(outcomes: ProbeOutcomes, boot):
    """Each cue's ``signal_lost`` per class on the sample and on ``boot``'s resamples.

    The same formula as the probe stage's verdicts (:func:`pipeline.shortcuts.verdicts.cue_losses`),
    from the per-image decisions; two runs given the same ``boot`` are paired image by image.

    Returns
    -------
    classes : numpy.ndarray
    point : dict
        ``{cue: (K,)}``.
    reps : dict
        ``{cue: (n_boot, K)}``.
    """
    from pipeline.shortcuts.verdicts import cue_losses

    labels = np.asarray(outcomes.labels, dtype=np.int64)
    classes = np.unique(labels)
    onehot = _onehot(labels, classes)
    correct = np.asarray(outcomes.original) == labels
    columns = [onehot * correct[:, None]]
    names = list(outcomes.probed)
    for name in names:
        pred = np.asarray(outcomes.probed[name])
        columns += [onehot * (correct & (pred == labels))[:, None], _onehot(pred, classes) * correct[:, None]]
    point, reps = boot.sums(np.concatenate(columns, axis=1))
    k = len(classes)

    def split(values, i):
        return values[..., i * k:(i + 1) * k]

    good, good_r = split(point, 0), split(reps, 0)
    sums = {n: (split(point, 1 + 2 * j), split(point, 2 + 2 * j)) for j, n in enumerate(names)}
    sums_r = {n: (split(reps, 1 + 2 * j), split(reps, 2 + 2 * j)) for j, n in enumerate(names)}
    return (classes, cue_losses(sums, outcomes.groups, good, good.sum()),
            cue_losses(sums_r, outcomes.groups, good_r, good_r.sum(axis=1, keepdims=True)))


VERDICT_COLUMNS = ["class_name", "cue", "verdict_a", "verdict_b", "changed", "lost_a", "lost_a_ci_low",
                   "lost_a_ci_high", "lost_b", "lost_b_ci_low", "lost_b_ci_high", "difference", "diff_ci_low",
                   "diff_ci_high", "n_paired", "note"]


def verdict_table(verdicts_a, verdicts_b, outcomes=None, *, names_a=None, names_b=None, n_boot=1000, seed=0,
                  confidence=0.95, note=None) -> pd.DataFrame:
    """The shortcut verdicts of A and B side by side, per class and cue, with the paired difference.

    Parameters
    ----------
    verdicts_a, verdicts_b : pandas.DataFrame or None
        Each run's ``bias_verdicts.parquet`` (their own intervals are shown as they are).
    outcomes : (ProbeOutcomes, ProbeOutcomes), optional
        Both runs' decisions on the same probed images (same order). Without them the difference is
        shown with no interval and ``note`` says why.
    names_a, names_b : dict
        ``{code: class name}`` of each run (classes are matched by name).
    note : str, optional
        Why there is no paired interval.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`VERDICT_COLUMNS`; one row per class (by name) and cue (colour, texture,
        shape). ``difference`` = lost_b − lost_a of that cue's ``signal_lost``; its interval is the
        percentile interval of the difference over paired resamples of the matched probed images.
    """
    from pipeline.shortcuts.verdicts import CUES, Bootstrap

    def by_name(table):
        if table is None or table.empty:
            return {}
        return {str(r["class_name"]): r for r in table.to_dict("records")}

    va, vb = by_name(verdicts_a), by_name(verdicts_b)
    paired = {}
    n_paired = 0
    if outcomes is not None:
        a, b = outcomes
        n_paired = len(a.labels)
        boot = Bootstrap(n_paired, n_boot, [int(seed), 0xC0B5], confidence)
        ka, pa, ra = cue_loss_samples(a, boot)
        kb, pb, rb = cue_loss_samples(b, boot)
        pos_b = {names_b.get(int(k), str(k)): j for j, k in enumerate(kb)}
        for i, k in enumerate(ka):
            name = names_a.get(int(k), str(k))
            j = pos_b.get(name)
            if j is None:
                continue
            for cue in CUES:
                if cue in pa and cue in pb:
                    iv = boot.interval(np.array([pb[cue][j] - pa[cue][i]]), (rb[cue][:, j] - ra[cue][:, i])[:, None])
                    paired[(name, cue)] = (float(iv.value[0]), float(iv.low[0]), float(iv.high[0]))
    rows = []
    for name in sorted(set(va) | set(vb), key=lambda n: (n not in va, n)):
        ra_, rb_ = va.get(name, {}), vb.get(name, {})
        for cue in CUES:
            la, lb = ra_.get(f"{cue}_lost", np.nan), rb_.get(f"{cue}_lost", np.nan)
            diff, low, high = paired.get((name, cue), (lb - la, np.nan, np.nan))
            why = "" if (name, cue) in paired else (note or "no paired outcomes for this class")
            rows.append({"class_name": name, "cue": cue, "verdict_a": ra_.get("verdict"),
                         "verdict_b": rb_.get("verdict"), "changed": ra_.get("verdict") != rb_.get("verdict"),
                         "lost_a": la, "lost_a_ci_low": ra_.get(f"{cue}_ci_low", np.nan),
                         "lost_a_ci_high": ra_.get(f"{cue}_ci_high", np.nan), "lost_b": lb,
                         "lost_b_ci_low": rb_.get(f"{cue}_ci_low", np.nan),
                         "lost_b_ci_high": rb_.get(f"{cue}_ci_high", np.nan), "difference": diff,
                         "diff_ci_low": low, "diff_ci_high": high,
                         "n_paired": n_paired if (name, cue) in paired else 0, "note": why})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)
