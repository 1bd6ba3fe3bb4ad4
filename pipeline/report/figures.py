"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Each function returns a ``Figure``; :func:`save_png` writes it. Text from the run (layer and
class names) is drawn with math parsing off, so a ``$`` in a name is just a dollar sign.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

GREY = (0.62, 0.62, 0.62)
STYLE = {
    "text.parse_math": False, "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
    "axes.edgecolor": "#888888", "savefig.facecolor": "white", "figure.facecolor": "white",
}


@contextmanager
def style():
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> None:
    fig.savefig(path, format="png", dpi=100)


def palette(n):
    """``n`` distinct RGB colours (floats in [0, 1]), the same for every figure of the report."""
    import matplotlib

    if n <= 10:
        return [tuple(c) for c in matplotlib.colormaps["tab10"].colors[:max(n, 1)]]
    if n <= 20:
        return [tuple(c) for c in matplotlib.colormaps["tab20"].colors[:n]]
    cmap = matplotlib.colormaps["hsv"]
    return [tuple(cmap(i / n)[:3]) for i in range(n)]


def cluster_palette(n):
    """Cluster colours: distinct from the class palette, so a cluster is never read as a class."""
    import matplotlib

    base = list(matplotlib.colormaps["Dark2"].colors) + list(matplotlib.colormaps["tab20b"].colors)
    if n <= len(base):
        return [tuple(c) for c in base[:max(n, 1)]]
    cmap = matplotlib.colormaps["turbo"]
    return [tuple(cmap(i / n)[:3]) for i in range(n)]


def short(text, width=28):
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def depth_curve(layers, series, chance=None):
    """Accuracy per layer, in model order: how class information builds up with depth.

    Parameters
    ----------
    layers : list of str
    series : dict of str to list of float
        Curve label -> one value per layer (NaN = not computed).
    chance : float, optional
        Dashed line at the majority-class rate.
    """
    with style():
        fig = figure(max(4.8, 0.55 * len(layers) + 2.5), 3.4)
        ax = fig.add_subplot()
        x = np.arange(len(layers))
        for (name, values), marker in zip(series.items(), "osD^v<>"):
            values = np.asarray(values, dtype=float)
            if np.isfinite(values).any():
                ax.plot(x, values, marker=marker, label=name, linewidth=1.8, markersize=5)
        if chance is not None:
            ax.axhline(chance, color=GREY, linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
        ax.set_xticks(x, [short(l, 18) for l in layers], rotation=35 if len(layers) > 5 else 0, ha="right"
                      if len(layers) > 5 else "center")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("layer (input → output)")
        ax.set_ylabel("accuracy")
        ax.set_title("Class information per layer")
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    return fig


def cka_heatmap(layers, matrix):
    """Linear CKA between every pair of layers (1 = same representation up to rotation/scale)."""
    with style():
        n = len(layers)
        size = min(9.0, max(3.8, 0.45 * n + 2.2))
        fig = figure(size + 0.9, size)
        ax = fig.add_subplot()
        ax.grid(False)
        im = ax.imshow(np.asarray(matrix, dtype=float), vmin=0, vmax=1, cmap="viridis")
        labels = [short(l, 18) for l in layers]
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    v = matrix[i][j]
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                                color="black" if v > 0.6 else "white")
        ax.set_title("Layer similarity (linear CKA)")
        fig.colorbar(im, ax=ax, shrink=0.8, label="CKA")
    return fig


def confusion(class_names, matrix):
    """Row-normalised confusion matrix: true class (rows) vs predicted (columns)."""
    with style():
        n = len(class_names)
        size = min(9.0, max(3.6, 0.5 * n + 2.0))
        fig = figure(size + 0.9, size)
        ax = fig.add_subplot()
        ax.grid(False)
        m = np.asarray(matrix, dtype=float)
        rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
        labels = [short(c, 16) for c in class_names]
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if rows[i, j] > 0.55 else "black")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title("Confusion (counts; colour = share of the row)")
        fig.colorbar(im, ax=ax, shrink=0.8, label="share of true class")
    return fig


def _point_size(n):
    return float(np.clip(900 / max(n, 1) ** 0.75, 2, 40))


def scatter_by_class(xy, labels, class_names, title, method):
    """Images in a 2-D embedding, one colour per class (grey = unlabelled)."""
    with style():
        fig = figure(5.6, 4.6)
        ax = fig.add_subplot()
        ax.grid(False)
        xy = np.asarray(xy, dtype=float)
        labels = np.asarray(labels)
        colours = palette(len(class_names))
        s = _point_size(len(xy))
        unl = labels < 0
        if unl.any():
            ax.scatter(xy[unl, 0], xy[unl, 1], s=s, color=GREY, alpha=0.6, linewidths=0, label="unlabelled",
                       rasterized=True)
        for i, (label, name) in enumerate(class_names.items()):
            sel = labels == label
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=colours[i], alpha=0.75, linewidths=0,
                           label=short(name, 22) if i < 20 else None, rasterized=True)
        _embedding_axes(ax, method, title)
        if 0 < len(class_names) <= 20 or unl.any():
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False,
                      markerscale=max(1.0, 6 / np.sqrt(s)), title="class")
    return fig


def scatter_by_cluster(xy, clusters, title, method):
    """Units in a 2-D embedding, coloured by cluster; ``×`` = dead or unclustered; ids at centres."""
    with style():
        fig = figure(5.0, 4.6)
        ax = fig.add_subplot()
        ax.grid(False)
        xy = np.asarray(xy, dtype=float)
        clusters = np.asarray(clusters)
        ids = sorted(int(c) for c in np.unique(clusters) if c >= 0)
        colours = cluster_palette(len(ids))
        s = _point_size(len(xy)) * 2.5
        none = clusters < 0
        if none.any():
            ax.scatter(xy[none, 0], xy[none, 1], s=s, marker="x", color=GREY, linewidths=1,
                       label="dead / unclustered")
        for colour, c in zip(colours, ids):
            sel = clusters == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=colour, alpha=0.85, linewidths=0.4,
                       edgecolors="white")
            cx, cy = np.median(xy[sel], axis=0)
            ax.annotate(str(c), (cx, cy), fontsize=8, fontweight="bold", ha="center", va="center",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colour, alpha=0.85))
        _embedding_axes(ax, method, title)
        if none.any():
            ax.legend(loc="lower right", fontsize=7, frameon=False)
    return fig


def _embedding_axes(ax, method, title):
    name = {"tsne": "t-SNE", "umap": "UMAP"}.get(method, str(method))
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)


def silhouette_curve(k_tried, scores, chosen=None):
    """How the number of clusters was chosen: silhouette per candidate k."""
    with style():
        fig = figure(4.2, 2.8)
        ax = fig.add_subplot()
        ax.plot(k_tried, scores, marker="o", markersize=4, linewidth=1.5)
        if chosen is not None and chosen in list(k_tried):
            i = list(k_tried).index(chosen)
            ax.plot([chosen], [scores[i]], marker="o", markersize=10, fillstyle="none", color="crimson",
                    label=f"chosen k = {chosen}")
            ax.legend(fontsize=8, frameon=False)
        ax.set_xlabel("number of clusters k")
        ax.set_ylabel("silhouette")
        ax.set_title("Choosing k")
    return fig


CUE_COLOURS = {"colour": "#fde2e2", "texture": "#fdf0d5", "shape": "#dff3e4", "context": "#e8edf3"}


def signal_lost(probes, groups, class_names, values, lows, highs, colours, threshold=None):
    """How much of each class's signal each probe removes, with bootstrap-interval whiskers.

    Parameters
    ----------
    probes : list of str
        In display order (grouped by cue); a shaded band marks each cue's probes.
    groups : list of str
        The cue of each probe (``colour``, ``texture``, ``shape``, ``context``).
    class_names : list of str
    values, lows, highs : arrays of shape (n_probes, n_classes)
        ``signal_lost`` and its interval (NaN = probe not applicable).
    colours : list of RGB
        One per class (the report's class palette).
    threshold : float, optional
        The verdict's ``min_effect``: a dashed line.

    With more than ten classes the bars become dots (one per class) and a median tick.
    """
    values, lows, highs = (np.asarray(a, dtype=float) for a in (values, lows, highs))
    n_p, n_k = values.shape
    with style():
        fig = figure(max(5.5, 0.95 * n_p + 2.6), 3.6)
        ax = fig.add_subplot()
        ax.grid(axis="x", visible=False)
        x = np.arange(n_p)
        for group in dict.fromkeys(groups):
            at = [i for i, g in enumerate(groups) if g == group]
            ax.axvspan(min(at) - 0.5, max(at) + 0.5, color=CUE_COLOURS.get(group, "#f2f2f2"), zorder=0, lw=0)
            ax.text(np.mean(at), 1.07, group, ha="center", va="bottom", fontsize=8, color="#555555")
        if n_k <= 10:
            width = 0.8 / max(n_k, 1)
            for k in range(n_k):
                pos = x - 0.4 + width * (k + 0.5)
                v = values[:, k]
                err = np.vstack([np.clip(v - lows[:, k], 0, None), np.clip(highs[:, k] - v, 0, None)])
                err = np.where(np.isfinite(err), err, 0.0)
                ax.bar(pos, np.nan_to_num(v), width=width * 0.92, color=colours[k], label=short(class_names[k], 22),
                       yerr=err, error_kw={"elinewidth": 0.9, "capsize": 1.5, "ecolor": "#333333"}, zorder=2)
        else:
            rng = np.random.default_rng(0)
            for i in range(n_p):
                v = values[i][np.isfinite(values[i])]
                ax.scatter(i + rng.uniform(-0.25, 0.25, len(v)), v, s=8, color="#4c72b0", alpha=0.6, zorder=2,
                           linewidths=0)
                if len(v):
                    ax.plot([i - 0.32, i + 0.32], [np.median(v)] * 2, color="black", linewidth=1.6, zorder=3)
        for i in range(n_p):
            if not np.isfinite(values[i]).any():
                ax.text(i, 0.03, "n/a", ha="center", fontsize=8, color="#777777")
        if threshold is not None:
            ax.axhline(threshold, color="#b91c1c", linestyle="--", linewidth=1, zorder=1,
                       label=f"verdict threshold ({threshold:g})")
        if n_k <= 10 or threshold is not None:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False,
                      title="class" if n_k <= 10 else None)
        ax.set_xticks(x, [short(p.replace("_", " "), 16) for p in probes], rotation=20 if n_p > 5 else 0,
                      ha="right" if n_p > 5 else "center")
        ax.set_xlim(-0.5, n_p - 0.5)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("signal lost (0 = none, 1 = all)")
        ax.set_title("What each probe removes from each class's signal", pad=16)
    return fig
