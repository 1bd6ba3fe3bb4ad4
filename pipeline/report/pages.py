"""Page builders: each turns the run's tables into the plain values one template shows.

Builders return ``(file name, template, context)``; they ask :class:`Assets` for image paths
as they go. Numbers stay numbers here (the templates format them), names stay raw strings (the
template engine escapes them).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report import figures as figs
from pipeline.report.atlas import atlas_cells, atlas_image
from pipeline.report.data import STAGE_ORDER
from pipeline.report.names import class_page, layer_page, slug, units_page
from pipeline.report.shortcuts import CueLookup, shortcut_section
from pipeline.report.values import integer as _int, num as _num

METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}
SKIPPED_ROWS = 100




def _list(x):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return []
    return [int(v) for v in list(x)]


class Site:
    """What every page shares: names, links, the maximize lookup, the assets."""

    def __init__(self, data, assets, options):
        self.data = data
        self.assets = assets
        self.options = options
        self.layers = _all_layers(data)
        self.max_units, self.max_clusters, self.max_classes = _maximize_lookup(data)
        if not (data.predictions and data.predictions.aligned):
            self.max_classes = {}  # output k's image is not class k's: never shown under a class name
        self.colours = dict(zip(data.class_names, figs.palette(len(data.class_names))))
        self.cues = CueLookup(data)  # colour / texture / shape sensitivity per unit and cluster
        self.explorer = None         # set by the build when the interactive maps are written
        self._unit_pos = {}  # (layer, channel) -> position in the layer's gallery
        if data.clusters is not None:
            for layer, part in data.clusters.groupby("layer", sort=False):
                for pos, ch in enumerate(np.sort(part["channel"].to_numpy())):
                    self._unit_pos[(layer, int(ch))] = pos

    # -- links --

    def class_link(self, label):
        label = _int(label)
        if label is None or label not in self.data.class_names:
            return None
        return {"name": self.data.class_names[label], "href": class_page(self.data.class_names[label])}

    def unit_href(self, layer, channel):
        pos = self._unit_pos.get((layer, channel), channel)
        return f"{units_page(layer, pos // self.options.units_per_page + 1)}#u{channel}"

    def nav(self):
        return {"layers": [{"name": l, "href": layer_page(l)} for l in self.layers],
                "classes": [{"name": n, "href": class_page(n)} for n in self.data.class_names.values()]}

    # -- images --

    def thumb(self, index, caption=None):
        """A dataset image as the templates show it."""
        index = int(index)
        ds = self.data.dataset
        row = ds.iloc[index] if 0 <= index < len(ds) else None
        cls = self.data.class_name(row["label"]) if row is not None else "?"
        file = Path(str(row["path"])).name if row is not None else ""
        return {"src": self.assets.dataset_image(index), "index": index, "cls": cls,
                "title": f"image {index} · {cls} · {file}", "caption": caption}

    def thumbs(self, indices, limit=None):
        return [self.thumb(i) for i in _list(indices)[:limit or self.options.top_images]]

    def max_image(self, row, name):
        """A maximization image with its quality figures, or None when not rendered."""
        if row is None:
            return None
        src = self.assets.run_image(row.get("path"), name)
        if src is None:
            return None
        dataset_max, score, z = _num(row.get("dataset_max")), _num(row.get("score")), _num(row.get("z_score"))
        valid = row.get("score_valid")
        if valid is None or pd.isna(valid):  # older index without the flag: judge by the dataset max
            valid = dataset_max is not None and dataset_max > 1e-6
        meaningful = score is not None and bool(valid)
        return {"src": src, "score": score if meaningful else None, "z": z,
                "activation": _num(row.get("activation")), "dataset_max": dataset_max,
                "probability": _num(row.get("probability"))}


def _all_layers(data):
    names = list(data.layer_names)
    for table in (data.layers, data.clusters, data.cluster_summary):
        if table is not None:
            names += [l for l in pd.unique(table["layer"]) if l not in names]
    return names


def _maximize_lookup(data):
    """Per unit / cluster / class: the maximize row with the lowest seed."""
    units, clusters, classes = {}, {}, {}
    table = data.maximize
    if table is None or table.empty or "kind" not in table:
        return units, clusters, classes
    if "seed" in table:
        table = table.sort_values("seed", kind="stable")
    for row in table.to_dict("records"):
        kind = row.get("kind")
        if kind == "unit" and _int(row.get("channel")) is not None:
            units.setdefault((row.get("layer"), _int(row["channel"])), row)
        elif kind == "cluster" and _int(row.get("cluster")) is not None:
            clusters.setdefault((row.get("layer"), _int(row["cluster"])), row)
        elif kind == "class":
            label = _class_label(row.get("class"), data.class_names)
            if label is None or label < 0:
                label = _class_label(row.get("class_name"), data.class_names)
            if label is not None:
                classes.setdefault(label, row)
    return units, clusters, classes


def _class_label(value, class_names):
    if isinstance(value, str):
        by_name = {v: k for k, v in class_names.items()}
        if value in by_name:
            return by_name[value]
    return _int(value)


# ---------------------------------------------------------------- index


def index_page(site):
    data = site.data
    ctx = {"summary": _summary(data), "stages": _stages(data), "skipped": _skipped(data),
           "layers": [_layer_row(site, l) for l in site.layers], "classes": _class_rows(site),
           "figures": _index_figures(site), "bias": bias_section(site), "comparisons": comparison_links(site)}
    return "index.html", "index.html", ctx


def comparison_links(site) -> list:
    """The comparisons made with this run (its ``comparisons.json``) whose page still exists, as relative
    links from the report folder: ``[{"other", "role", "href", "created"}]``."""
    import os

    report_dir = getattr(site, "report_dir", None)
    links = []
    for entry in site.data.comparisons:
        page = Path(str(entry.get("path", ""))) / "index.html"
        if not entry.get("path") or not page.is_file():
            continue
        href = os.path.relpath(page, report_dir) if report_dir is not None else page.as_uri()
        links.append({"other": str(entry.get("other_name") or entry.get("other") or "?"),
                      "role": "A" if entry.get("role") == "a" else "B", "href": href.replace(os.sep, "/"),
                      "created": str(entry.get("created") or "")})
    return links


def _summary(data):
    cfg = data.manifest.get("config") or {}
    source = (cfg.get("data") or {})
    attrs = dict(data.run.arrays.attrs)
    pred = data.predictions
    accuracy = None
    if pred is not None and pred.aligned:
        ok = data.labels >= 0
        accuracy = float((pred.predicted[ok] == data.labels[ok]).mean()) if ok.any() else None
    why_not = pred.why_not if pred is not None and data.labelled else None
    return {"model": cfg.get("model"), "model_name": attrs.get("model"),
            "data": source.get("images") or source.get("npz"), "images": len(data.dataset),
            "labelled": int((data.labels >= 0).sum()), "classes": len(data.class_names),
            "skipped": len(data.skipped), "layers": len(data.layer_names),
            "input_size": attrs.get("input_size"), "channels": attrs.get("channels"),
            "scale": attrs.get("scale"), "accuracy": accuracy,
            "outputs": None if pred is None else pred.n_outputs,
            "aligned": None if pred is None else pred.aligned, "why_not": sentence(why_not)}


def sentence(clause):
    """A lower-case clause as a sentence; names inside keep their case.

    Parameters
    ----------
    clause : str or None

    Returns
    -------
    str or None
        None for an empty clause.

    Examples
    --------
    >>> sentence("the images are unlabelled")
    'The images are unlabelled.'
    """
    if not clause:
        return None
    return clause[0].upper() + clause[1:] + ("" if clause[-1] in ".!?" else ".")


def _stages(data):
    stages = data.manifest.get("stages") or {}
    order = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
    return [{"name": s, "status": stages[s].get("status"), "finished": stages[s].get("finished_at"),
             "seconds": _num(stages[s].get("seconds"))} for s in order]


def _skipped(data):
    table = data.skipped
    if table is None or table.empty:
        return {"count": 0, "rows": [], "reasons": [], "more": 0}
    reasons = table["reason"].astype(str).str.split(":").str[0].value_counts()
    rows = [{"path": str(r["path"]), "reason": str(r["reason"])} for _, r in table.head(SKIPPED_ROWS).iterrows()]
    return {"count": len(table), "rows": rows, "more": max(0, len(table) - SKIPPED_ROWS),
            "reasons": [{"reason": k, "count": int(v)} for k, v in reasons.items()]}


def _quality(data, layer, of):
    q = data.quality
    if q is None or q.empty:
        return []
    rows = q[(q["layer"] == layer) & (q["of"] == of)]
    return [{"method": METHOD_NAMES.get(r["method"], r["method"]), "trust": _num(r.get("trustworthiness")),
             "knn": _num(r.get("knn_accuracy"))} for _, r in rows.sort_values("method").iterrows()]


def _layer_row(site, layer):
    data = site.data
    info = data.layer_info.get(layer, {})
    row = data.layer_row(layer) or {}
    return {"name": layer, "href": layer_page(layer), "type": info.get("type"),
            "shape": info.get("shape"), "units": _int(row.get("units")), "dead": _int(row.get("dead_units")),
            "clusters": _int(row.get("n_clusters")), "probe": _num(row.get("probe_accuracy")),
            "knn": _num(row.get("knn_accuracy")), "silhouette": _num(row.get("class_silhouette")),
            "cka_previous": _num(row.get("cka_previous")), "computed": bool(row),
            "quality": _quality(data, layer, "images")}


def _class_rows(site):
    data = site.data
    pred = data.predictions
    rows = []
    for i, (label, name) in enumerate(data.class_names.items()):
        sel = data.labels == label
        acc = float((pred.predicted[sel] == label).mean()) if pred is not None and pred.aligned and sel.any() \
            else None
        rows.append({"name": name, "href": class_page(name), "count": int(sel.sum()), "accuracy": acc,
                     "swatch": i})
    return rows


def _index_figures(site):
    data = site.data
    out = {"depth": None, "cka": None, "confusion": None}
    table = data.layers
    if table is not None and not table.empty:
        order = [l for l in site.layers if l in set(table["layer"])]
        table = table.set_index("layer").loc[order]
        series = {"linear probe": table["probe_accuracy"].tolist(), "kNN (k=5)": table["knn_accuracy"].tolist()}
        q = data.quality
        if q is not None and not q.empty:
            for method, part in q[q["of"] == "images"].groupby("method"):
                vals = part.set_index("layer")["knn_accuracy"].reindex(order)
                series[f"kNN in {METHOD_NAMES.get(method, method)} map"] = vals.tolist()
        if any(np.isfinite(np.asarray(v, dtype=float)).any() for v in series.values()):
            out["depth"] = site.assets.figure(figs.depth_curve(order, series, _chance(data)), "depth")
        if "cka" in table and len(order) > 1:
            rows = [r if isinstance(r, (list, np.ndarray)) and len(r) == len(table) else None for r in table["cka"]]
            if all(r is not None for r in rows):
                out["cka"] = site.assets.figure(figs.cka_heatmap(order, np.array(rows, dtype=float)), "cka")
    matrix = confusion_matrix(data)
    if matrix is not None:
        out["confusion"] = site.assets.figure(figs.confusion(list(data.class_names.values()), matrix), "confusion")
    return out


def _chance(data):
    """The majority-class rate (None without labelled images)."""
    labels = data.labels[data.labels >= 0]
    if not len(labels):
        return None
    return float(np.unique(labels, return_counts=True)[1].max() / len(labels))


def confusion_matrix(data):
    """Counts of true class (rows) by predicted class (columns), one row and column per declared class.

    Parameters
    ----------
    data : ReportData

    Returns
    -------
    numpy.ndarray of shape (K, K) or None
        In the order of ``data.class_names``. Classes without images keep their (empty) row, so
        the matrix reads like the class list. None unless the outputs are the classes.
    """
    pred = data.predictions
    if pred is None or not pred.aligned:
        return None
    k = len(data.class_names)
    true, predicted = data.class_index(data.labels), data.class_index(pred.predicted)
    ok = (true >= 0) & (predicted >= 0)
    matrix = np.zeros((k, k), int)
    np.add.at(matrix, (true[ok], predicted[ok]), 1)
    return matrix


def bias_section(site):
    """The shortcut finder's findings (see :mod:`.shortcuts`), or None while the probe stage has not run."""
    return shortcut_section(site)


# ---------------------------------------------------------------- layer pages


def layer_pages(site, layer):
    """The layer page and its paginated unit gallery."""
    units = site.data.units_of(layer)
    n = 0 if units is None else len(units)
    per = site.options.units_per_page
    pages = [{"href": units_page(layer, p + 1), "first": int(units["channel"].iloc[p * per]),
              "last": int(units["channel"].iloc[min(n, (p + 1) * per) - 1]), "number": p + 1}
             for p in range(math.ceil(n / per))]
    ctx = _layer_context(site, layer, pages)
    explorer = site.explorer.layer(layer) if site.explorer is not None else None
    ctx["explorer"] = explorer
    if explorer:
        from pipeline.report.csp import CSP_EXPLORER

        ctx.update(csp=CSP_EXPLORER, scripts=explorer["scripts"])
    out = [(layer_page(layer), "layer.html", ctx)]
    for page in pages:
        chunk = units.iloc[(page["number"] - 1) * per: page["number"] * per]
        out.append((page["href"], "units.html", {
            "layer": layer, "layer_href": layer_page(layer), "page": page, "pages": pages,
            "cues_available": site.cues.available, "units": [_unit_card(site, layer, r) for r in chunk.to_dict("records")]}))
    return out


def _neighbours(site, layer):
    i = site.layers.index(layer)
    prev = site.layers[i - 1] if i > 0 else None
    nxt = site.layers[i + 1] if i + 1 < len(site.layers) else None
    return ({"name": prev, "href": layer_page(prev)} if prev else None,
            {"name": nxt, "href": layer_page(nxt)} if nxt else None)


def _layer_context(site, layer, pages):
    data = site.data
    prev, nxt = _neighbours(site, layer)
    units = data.units_of(layer)
    dead = [] if units is None else [
        {"channel": int(r["channel"]), "href": site.unit_href(layer, int(r["channel"])), "dead": bool(r["dead"])}
        for r in units[units["cluster"] < 0].to_dict("records")]
    clusters = data.clusters_of(layer)
    return {"layer": layer, "row": _layer_row(site, layer), "prev": prev, "next": nxt, "unit_pages": pages,
            "images": _image_maps(site, layer), "neurons": _neuron_maps(site, layer),
            "neuron_quality": _quality(data, layer, "neurons"),
            "silhouette": _silhouette_figure(site, layer),
            "clusters": None if clusters is None else [_cluster_card(site, layer, r)
                                                       for r in clusters.to_dict("records")],
            "unclustered": dead, "cues_available": site.cues.available}


def _image_maps(site, layer):
    data = site.data
    emb = data.image_embeddings
    if emb is None:
        return None
    emb = emb[emb["layer"] == layer]
    out = []
    quality = {q["method"]: q for q in _quality(data, layer, "images")}
    for method, part in emb.groupby("method", sort=True):
        part = part.sort_values("index")
        index = part["index"].to_numpy().astype(np.int64)
        valid = (index >= 0) & (index < len(data.labels))
        part, index = part[valid], index[valid]
        xy = part[["x", "y"]].to_numpy(dtype=float)
        name = METHOD_NAMES.get(method, str(method))
        key = f"{slug(layer)}-{slug(method)}"
        scatter = site.assets.figure(figs.scatter_by_class(xy, data.labels[index], data.class_names,
                                                           f"{name} of images, coloured by class", method),
                                     f"images-{key}")
        out.append({"method": name, "scatter": scatter, "atlas": _atlas(site, layer, index, xy, key),
                    "quality": quality.get(name), "points": len(index)})
    return out


def _atlas(site, layer, index, xy, key):
    """The activation-atlas picture for one embedding (None without thumbnails)."""
    data, opt = site.data, site.options
    if site.assets.thumbs is None or len(index) == 0:
        return None
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(index), opt.atlas_points, replace=False)) if len(index) > opt.atlas_points \
        else np.arange(len(index))
    index, xy = index[keep], xy[keep]
    order = np.argsort(index, kind="stable")
    try:
        acts = np.asarray(data.run.activations(layer, "mean").oindex[index[order]], dtype=np.float32)
    except Exception:  # noqa: BLE001 - a layer without stored activations just gets no atlas
        return None
    acts = acts[np.argsort(order)]
    acts = np.nan_to_num(acts, nan=0.0, posinf=0.0, neginf=0.0)
    std = acts.std(axis=0)
    acts = (acts - acts.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)
    cells = atlas_cells(xy, acts, data.labels[index], opt.atlas_grid)
    thumbs = site.assets.read_thumbnails(index[c.member] for c in cells)
    picture = atlas_image(cells, opt.atlas_grid, {c.member: thumbs.get(int(index[c.member])) for c in cells},
                          site.colours, cell_px=max(32, min(64, 672 // opt.atlas_grid)))
    return site.assets.picture(picture, f"atlas-{key}")


def _neuron_maps(site, layer):
    data = site.data
    emb, units = data.neuron_embeddings, data.units_of(layer)
    if emb is None:
        return None
    emb = emb[emb["layer"] == layer]
    cluster_of = {} if units is None else dict(zip(units["channel"], units["cluster"]))
    out = []
    for method, part in emb.groupby("method", sort=True):
        part = part.sort_values("channel")
        clusters = [int(cluster_of.get(c, -1)) for c in part["channel"]]
        name = METHOD_NAMES.get(method, str(method))
        fig = figs.scatter_by_cluster(part[["x", "y"]].to_numpy(dtype=float), clusters,
                                      f"{name} of units, coloured by cluster", method)
        out.append({"method": name, "scatter": site.assets.figure(fig, f"units-{slug(layer)}-{slug(method)}")})
    return out


def _silhouette_figure(site, layer):
    row = site.data.layer_row(layer) or {}
    k, s = _list_float(row.get("k_tried")), _list_float(row.get("silhouette_curve"))
    if len(k) < 2 or len(k) != len(s):
        return None
    fig = figs.silhouette_curve([int(v) for v in k], s, _int(row.get("n_clusters")))
    return site.assets.figure(fig, f"silhouette-{slug(layer)}")


def _list_float(x):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return []
    return [float(v) for v in list(x)]


def _cluster_card(site, layer, row):
    c = int(row["cluster"])
    members = _list(row.get("members"))
    shown = members[:12]
    return {
        "id": c, "anchor": f"cluster-{c}", "size": _int(row.get("size")) or len(members),
        "mean_corr": _num(row.get("mean_corr")), "explained": _num(row.get("explained")),
        "selectivity": _num(row.get("class_selectivity")), "stability": _num(row.get("stability")),
        "top_class": site.class_link(row.get("top_class")),
        "dominant": [l for l in (site.class_link(v) for v in _list(row.get("dominant_classes"))) if l],
        "centroid": site.max_image(site.max_clusters.get((layer, c)), f"{slug(layer)}-cluster-{c}"),
        "members": [{"channel": m, "href": site.unit_href(layer, m),
                     "img": site.max_image(site.max_units.get((layer, m)), f"{slug(layer)}-unit-{m}")}
                    for m in shown],
        "more_members": len(members) - len(shown),
        "top_images": site.thumbs(row.get("top_indices")),
        "cues": site.cues.cluster(layer, c),
    }


def _unit_card(site, layer, row):
    ch = int(row["channel"])
    cluster = _int(row.get("cluster"))
    dead = bool(row.get("dead"))  # constant over the dataset: its "top" images and class are arbitrary
    return {
        "channel": ch, "anchor": f"u{ch}", "dead": dead,
        "cluster": None if cluster is None or cluster < 0 else
        {"id": cluster, "href": f"{layer_page(layer)}#cluster-{cluster}"},
        "img": site.max_image(site.max_units.get((layer, ch)), f"{slug(layer)}-unit-{ch}"),
        "top_images": [] if dead else site.thumbs(row.get("top_indices")),
        "selectivity": None if dead else _num(row.get("class_selectivity")),
        "top_class": None if dead else site.class_link(row.get("top_class")),
        "stability": _num(row.get("stability")), "mean": _num(row.get("mean")), "max": _num(row.get("max")),
        "cues": None if dead else site.cues.unit(layer, ch),
    }


# ---------------------------------------------------------------- class pages


def class_pages(site):
    return [(class_page(name), "class.html", _class_context(site, label, name))
            for label, name in site.data.class_names.items()]


def _class_context(site, label, name):
    data, k = site.data, site.options.examples
    members = np.flatnonzero(data.labels == label)
    pred = data.predictions
    ctx = {"name": name, "label": label, "count": len(members), "aligned": bool(pred and pred.aligned),
           "outputs": None if pred is None else pred.n_outputs, "accuracy": None,
           "why_not": None if pred is None else sentence(pred.why_not),
           "logit_image": site.max_image(site.max_classes.get(label), f"class-{slug(name)}"),
           "confident": [], "confused": [], "mistaken": [], "predicted_as": [],
           "units": _selective_units(site, label), "clusters": _class_clusters(site, label)}
    if pred is None or len(members) == 0:
        return ctx
    if pred.aligned:
        p = pred.p_label[members]
        ctx["accuracy"] = float((pred.predicted[members] == label).mean())
        for i in members[np.argsort(-p, kind="stable")[:k]]:
            ctx["confident"].append(site.thumb(i, f"p = {pred.p_label[i]:.2f}"))
        wrong = members[pred.predicted[members] != label]
        worst = wrong[np.argsort(pred.p_label[wrong], kind="stable")[:k]]
        for i in worst:
            ctx["confused"].append(site.thumb(i, f"→ {data.class_name(pred.predicted[i])} "
                                                 f"({pred.confidence[i]:.2f})"))
        others = np.flatnonzero((data.labels >= 0) & (data.labels != label) & (pred.predicted == label))
        for i in others[np.argsort(-pred.confidence[others], kind="stable")[:k]]:
            ctx["mistaken"].append(site.thumb(i, f"{data.class_name(data.labels[i])} ({pred.confidence[i]:.2f})"))
    else:
        conf = pred.confidence[members]
        for i in members[np.argsort(-conf, kind="stable")[:k]]:
            ctx["confident"].append(site.thumb(i, f"output {pred.predicted[i]} ({pred.confidence[i]:.2f})"))
        for i in members[np.argsort(conf, kind="stable")[:k]]:
            ctx["confused"].append(site.thumb(i, f"output {pred.predicted[i]} ({pred.confidence[i]:.2f})"))
        counts = pd.Series(pred.predicted[members]).value_counts().head(5)
        ctx["predicted_as"] = [{"output": int(o), "share": float(c / len(members))} for o, c in counts.items()]
    return ctx


def _selective_units(site, label, count=12):
    units = site.data.clusters
    if units is None or "top_class" not in units:
        return []
    rows = units[(units["top_class"] == label) & ~units["dead"].astype(bool)]
    rows = rows.sort_values("class_selectivity", ascending=False, kind="stable").head(count)
    return [{"layer": r["layer"], "channel": int(r["channel"]), "href": site.unit_href(r["layer"], int(r["channel"])),
             "selectivity": _num(r["class_selectivity"]),
             "img": site.max_image(site.max_units.get((r["layer"], int(r["channel"]))),
                                   f"{slug(r['layer'])}-unit-{int(r['channel'])}")}
            for r in rows.to_dict("records")]


def _class_clusters(site, label):
    table = site.data.cluster_summary
    if table is None or "top_class" not in table:
        return []
    rows = table[table["top_class"] == label].sort_values("class_selectivity", ascending=False, kind="stable")
    return [{"layer": r["layer"], "id": int(r["cluster"]), "size": _int(r["size"]),
             "href": f"{layer_page(r['layer'])}#cluster-{int(r['cluster'])}",
             "selectivity": _num(r["class_selectivity"])} for r in rows.head(12).to_dict("records")]
