"""Interactive maps on the layer pages: pan, zoom, hover for the image, colour by any column, select.

Drawn by BokehJS in the reader's browser, still from static files:

- ``js/bokeh.min.js``, ``js/bokeh-gl.min.js`` — the library, copied once per report from the
  installed ``bokeh`` package (no CDN); ``js/explorer.js`` — this report's page logic;
- ``explorer/<layer>.js`` — per layer page, the Bokeh documents (``bokeh.embed.json_item``; numeric
  columns as base64 typed arrays) and the values the page logic needs (class names, colour
  options, per-unit images and links), pushed onto ``window.PIPELINE_EXPLORER``. Class columns
  hold a class's position in the class list (``ReportData.class_index``), so palettes and names
  have one entry per class whatever the labels are;
- ``img/sprites/<k>.jpg`` — the dataset thumbnails shown on hover, ``SHEET`` x ``SHEET`` per
  sheet: a sheet is requested only when a point on it is hovered or selected.

No inline script and no ``CustomJS`` (which compiles code at run time): the pages need
``script-src 'self'`` and no ``'unsafe-eval'``. BokehJS styles its shadow-DOM views with
``<style>`` elements, so explorer pages also allow ``style-src 'unsafe-inline'`` (see
:data:`pipeline.report.csp.CSP_EXPLORER`). More than ``report.explorer_max_points`` images: a
seeded sample (the same for every layer) is drawn and the page says so. Points are drawn with
WebGL (Bokeh falls back to canvas where WebGL is missing).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.report.names import slug
from pipeline.report.values import integer as _int, num as _num

SHEET = 32                      # thumbnails per sprite-sheet side
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}
GREY = "#9e9e9e"
CONTINUOUS = "viridis"
STATIC = Path(__file__).parent / "static"


def available() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def _hex(rgb):
    return "#" + "".join(f"{int(round(255 * float(v))):02x}" for v in rgb[:3])


def _viridis():
    import matplotlib

    cmap = matplotlib.colormaps[CONTINUOUS]
    return [_hex(cmap(i / 255)) for i in range(256)]


@dataclass
class Sample:
    """The dataset images shown in the explorers: ``indices`` (sorted) and their sprite positions."""

    indices: np.ndarray
    total: int

    @property
    def sampled(self) -> bool:
        return len(self.indices) < self.total

    def note(self):
        if not self.sampled:
            return None
        return (f"Showing a seeded random sample of {len(self.indices):,} of {self.total:,} images "
                f"(report.explorer_max_points).").replace(",", " ")


class Explorer:
    """Builds the explorer files of one report; one instance per build.

    Parameters
    ----------
    site : pipeline.report.pages.Site
    root : Path
        The report folder being built.
    """

    def __init__(self, site, root):
        self.site = site
        self.data = site.data
        self.options = site.options
        self.root = Path(root)
        n = len(self.data.dataset)
        limit = self.options.explorer_max_points
        seed = int((self.data.manifest.get("config") or {}).get("seed") or 0)
        if n > limit:
            idx = np.sort(np.random.default_rng([seed, 0xE7]).choice(n, limit, replace=False))
        else:
            idx = np.arange(n)
        self.sample = Sample(idx.astype(np.int64), n)
        self._sprite_pos = np.full(n, -1, np.int64)
        self._sprite_pos[idx] = np.arange(len(idx))
        self.sprites = None           # sprite geometry, once written
        self.pages = 0

    # -- files written once --

    def _library(self):
        """Copy BokehJS and the page logic into ``js/`` (once)."""
        if self.pages:
            return
        from bokeh.util.paths import bokehjs_path

        folder = self.root / "js"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("bokeh.min.js", "bokeh-gl.min.js"):
            shutil.copyfile(Path(bokehjs_path()) / "js" / name, folder / name)
        shutil.copyfile(STATIC / "explorer.js", folder / "explorer.js")

    def _write_sprites(self):
        """Sprite sheets of the sampled thumbnails (JPEG, cells aligned to 8 px blocks)."""
        if self.sprites is not None:
            return self.sprites
        assets = self.site.assets
        if assets.thumbs is None:
            self.sprites = {}
            return self.sprites
        from PIL import Image

        from pipeline.report.atlas import to_pil

        h, w = assets.thumbs.shape[1:3]
        box = self.options.explorer_thumbnail_size
        scale = min(1.0, box / max(h, w))
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
        per = SHEET * SHEET
        folder = self.root / "img" / "sprites"
        folder.mkdir(parents=True, exist_ok=True)
        idx = self.sample.indices
        for k, start in enumerate(range(0, len(idx), per)):
            part = idx[start:start + per]
            rows = math.ceil(len(part) / SHEET)
            sheet = Image.new("RGB", (SHEET * cw, rows * ch), (246, 248, 250))
            thumbs = assets.read_thumbnails(part)
            for j, i in enumerate(part):
                img = to_pil(thumbs[int(i)]).convert("RGB")
                if img.size != (cw, ch):
                    img = img.resize((cw, ch), Image.Resampling.LANCZOS)
                sheet.paste(img, ((j % SHEET) * cw, (j // SHEET) * ch))
            sheet.save(folder / f"{k}.jpg", format="JPEG", quality=85, optimize=True)
        self.sprites = {"url": "img/sprites/{k}.jpg", "per_sheet": per, "columns": SHEET, "width": cw,
                        "height": ch, "sheets": math.ceil(len(idx) / per)}
        return self.sprites

    # -- per layer --

    def layer(self, layer):
        """Write ``explorer/<layer>.js``; returns the template values (None when nothing to explore)."""
        images = self._images_doc(layer)
        neurons = self._neurons_doc(layer)
        if images is None and neurons is None:
            return None
        self._library()
        self.pages += 1
        key = slug(layer)
        rel = f"explorer/{key}.js"
        (self.root / "explorer").mkdir(exist_ok=True)
        lines = ["/* Interactive maps of one layer, read by js/explorer.js (data only). */",
                 "window.PIPELINE_EXPLORER = window.PIPELINE_EXPLORER || [];"]
        for spec in (images, neurons):
            if spec is not None:
                lines.append("window.PIPELINE_EXPLORER.push(" + _dumps(spec) + ");")
        (self.root / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return {"data": rel, "scripts": ["js/bokeh.min.js", "js/bokeh-gl.min.js", rel, "js/explorer.js"],
                "images": None if images is None else {"id": images["target"], "note": self.sample.note(),
                                                       "points": images["meta"]["points"]},
                "neurons": None if neurons is None else {"id": neurons["target"],
                                                         "points": neurons["meta"]["points"]}}

    # -- images --

    def _image_columns(self, layer):
        """``(rows, {method: (x, y)})`` of the sampled images in this layer's maps."""
        emb = self.data.image_embeddings
        if emb is None:
            return None, {}
        emb = emb[emb["layer"] == layer]
        maps, rows = {}, None
        for method, part in emb.groupby("method", sort=True):
            index = part["index"].to_numpy().astype(np.int64)
            ok = (index >= 0) & (index < self.sample.total)
            ok[ok] = self._sprite_pos[index[ok]] >= 0          # in the sample
            part = part[ok].drop_duplicates("index")
            maps[str(method)] = part.set_index("index")[["x", "y"]]
            rows = part["index"].to_numpy().astype(np.int64) if rows is None else \
                np.intersect1d(rows, part["index"].to_numpy().astype(np.int64))
        if rows is None or len(rows) == 0:
            return None, {}
        rows = np.sort(rows)
        return rows, {m: (xy.loc[rows, "x"].to_numpy(np.float32), xy.loc[rows, "y"].to_numpy(np.float32))
                      for m, xy in maps.items()}

    def _image_colours(self, layer, rows):
        """Colour options for images: ``[(option, column values)]``."""
        data = self.data
        out = []
        if data.class_names:
            values = data.class_index(data.labels[rows])
            out.append((self._class_option("class", "class"), values.astype(np.float32)))
        pred = data.predictions
        if pred is not None:
            if pred.aligned:
                option = self._class_option("pred", "predicted class")
                values = data.class_index(pred.predicted[rows])
            else:
                from pipeline.report.figures import palette as figs_palette

                k = pred.n_outputs
                option = _categorical("pred", "model output", [_hex(c) for c in figs_palette(k)],
                                      [f"output {c}" for c in range(k)])
                values = pred.predicted[rows]
            out.append((option, values.astype(np.float32)))
            if pred.aligned:
                right = np.where(data.labels[rows] >= 0, (pred.predicted[rows] == data.labels[rows]), -1)
                out.append((_categorical("right", "right or wrong", ["#d62728", "#2ca02c"], ["wrong", "right"],
                                         none="unlabelled"),
                            right.astype(np.float32)))
            out.append((_continuous("conf", "confidence", pred.confidence[rows]), pred.confidence[rows].astype(np.float32)))
        cluster = self._strongest_cluster(layer, rows)
        if cluster is not None:
            values, ids = cluster
            from pipeline.report.figures import cluster_palette

            top = max(ids) + 1 if ids else 1
            palette = [_hex(c) for c in cluster_palette(top)]
            out.append((_categorical("cluster", "most active unit cluster", palette,
                                     [f"cluster {c}" for c in range(top)], none="no live cluster"),
                        values.astype(np.float32)))
        return out

    def _class_option(self, column, label):
        """A colour option with one entry per class, in class order (values: :meth:`ReportData.class_index`)."""
        colours = self.site.colours
        return _categorical(column, label, [_hex(colours[c]) if c in colours else GREY for c in self.data.class_names],
                            list(self.data.class_names.values()))

    def _strongest_cluster(self, layer, rows, chunk=8192):
        """Per image, the unit cluster with the highest mean z-scored activation (None without data)."""
        units = self.data.units_of(layer)
        if units is None:
            return None
        live = units[(units["cluster"] >= 0) & ~units["dead"].astype(bool)]
        std = live["std"].to_numpy(float)
        live = live[np.isfinite(std) & (std > 0)]
        if live.empty:
            return None
        ids = sorted(int(c) for c in live["cluster"].unique())
        channels = live["channel"].to_numpy(np.int64)
        mean, std = live["mean"].to_numpy(np.float64), live["std"].to_numpy(np.float64)
        member = (live["cluster"].to_numpy()[:, None] == np.array(ids)[None, :]).astype(np.float64)
        member /= member.sum(axis=0, keepdims=True)
        try:
            acts = self.data.run.activations(layer, "mean")
        except Exception:  # noqa: BLE001 - no stored activations: no such colouring
            return None
        out = np.full(len(rows), -1.0)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            a = np.asarray(acts.oindex[part, :], dtype=np.float64)[:, channels]
            z = np.nan_to_num((a - mean) / std)
            out[start:start + len(part)] = np.array(ids)[np.argmax(z @ member, axis=1)]
        return out, ids

    def _images_doc(self, layer):
        rows, maps = self._image_columns(layer)
        if rows is None or not maps:
            return None
        sprites = self._write_sprites()
        colours = self._image_colours(layer, rows)
        columns = {"i": rows.astype(np.int32), "s": self._sprite_pos[rows].astype(np.int32)}
        for method, (x, y) in maps.items():
            columns[f"{method}_x"], columns[f"{method}_y"] = x, y
        for option, values in colours:
            columns[option["column"]] = values
        target = f"explore-images-{slug(layer)}"
        item, names = _document(columns, list(maps), target, len(rows), kind="images",
                                first=colours[0][0] if colours else None)
        meta = {"kind": "images", "points": int(len(rows)), "total": self.sample.total, **names,
                "colours": [o for o, _ in colours],
                "classes": {str(i): v for i, v in enumerate(self.data.class_names.values())},  # by position
                "sprites": sprites, "pixelated": 0 < self.site.assets.thumb_px < 56}
        return {"target": target, "item": item, "meta": meta}

    # -- neurons --

    def _neurons_doc(self, layer):
        data, site = self.data, self.site
        emb = data.neuron_embeddings
        if emb is None:
            return None
        emb = emb[emb["layer"] == layer]
        if emb.empty:
            return None
        maps, channels = {}, None
        for method, part in emb.groupby("method", sort=True):
            part = part.drop_duplicates("channel").set_index("channel")
            maps[str(method)] = part
            ch = part.index.to_numpy(np.int64)
            channels = ch if channels is None else np.intersect1d(channels, ch)
        channels = np.sort(channels)
        if len(channels) == 0:
            return None
        columns = {"ch": channels.astype(np.int32)}
        for method, part in maps.items():
            columns[f"{method}_x"] = part.loc[channels, "x"].to_numpy(np.float32)
            columns[f"{method}_y"] = part.loc[channels, "y"].to_numpy(np.float32)
        units = data.units_of(layer)
        table = units.set_index("channel").reindex(channels) if units is not None else None
        colours = self._unit_colours(layer, channels, table)
        for option, values in colours:
            columns[option["column"]] = values
        target = f"explore-units-{slug(layer)}"
        item, names = _document(columns, list(maps), target, len(channels), kind="neurons",
                                first=colours[0][0] if colours else None)
        info = []
        for ch in channels:
            row = None if table is None else table.loc[int(ch)]
            img = site.max_image(site.max_units.get((layer, int(ch))), f"{slug(layer)}-unit-{int(ch)}")
            cluster = None if row is None else _int(row.get("cluster"))
            top_class = None if row is None else site.class_link(row.get("top_class"))
            info.append({"channel": int(ch), "img": img["src"] if img else None,
                         "href": site.unit_href(layer, int(ch)) if units is not None else None,
                         "cluster": cluster if cluster is not None and cluster >= 0 else None,
                         "top_class": top_class["name"] if top_class else None,
                         "selectivity": None if row is None else _num(row.get("class_selectivity")),
                         "top": [t["src"] for t in site.thumbs(None if row is None else row.get("top_indices"), 6)
                                 if t["src"]]})
        meta = {"kind": "neurons", "points": int(len(channels)), **names, "colours": [o for o, _ in colours],
                "units": info}
        return {"target": target, "item": item, "meta": meta}

    def _unit_colours(self, layer, channels, table):
        out = []
        data = self.data
        if table is not None:
            from pipeline.report.figures import cluster_palette

            cl = table["cluster"].to_numpy(np.float64)
            top = int(np.nanmax(cl)) + 1 if np.isfinite(cl).any() and np.nanmax(cl) >= 0 else 1
            out.append((_categorical("cluster", "cluster", [_hex(c) for c in cluster_palette(top)],
                                     [f"cluster {c}" for c in range(top)], none="dead / unclustered"),
                        cl.astype(np.float32)))
            if data.class_names and "top_class" in table:
                values = data.class_index(table["top_class"].to_numpy(np.float64))
                out.append((self._class_option("top_class", "top class"), values.astype(np.float32)))
            for col, label in (("class_selectivity", "class selectivity"), ("stability", "stability"),
                               ("mean", "mean activation"), ("max", "max activation")):
                if col in table:
                    values = table[col].to_numpy(np.float64)
                    out.append((_continuous(col, label, values), values.astype(np.float32)))
        probe = data.probe_units
        if probe is not None:
            part = probe[probe["layer"] == layer].drop_duplicates("channel").set_index("channel").reindex(channels)
            sens = [c for c in probe.columns if c.endswith("_sensitivity")]
            for col in sens:
                values = part[col].to_numpy(np.float64)
                if np.isfinite(values).any():
                    label = col[:-len("_sensitivity")].replace("_", " ") + " sensitivity"
                    out.append((_continuous(col, label, values), values.astype(np.float32)))
        return out




def _categorical(column, label, palette, labels, none="none / unlabelled"):
    """A colour option mapping integer ``k`` to ``palette[k]`` (negative or NaN: grey, called ``none``)."""
    palette = list(palette) or [GREY]
    return {"column": f"c_{column}", "label": label, "kind": "categorical", "palette": palette,
            "labels": list(labels)[:len(palette)], "low": -0.5, "high": len(palette) - 0.5,
            "low_color": GREY, "high_color": GREY, "none": none}


def _continuous(column, label, values):
    """A colour option on the viridis scale from the 2nd to the 98th percentile."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo, hi = (float(np.percentile(v, 2)), float(np.percentile(v, 98))) if len(v) else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, lo + 0.5
    palette = _viridis()
    return {"column": f"c_{column}", "label": label, "kind": "continuous", "palette": palette,
            "low": lo, "high": hi, "low_color": palette[0], "high_color": palette[-1]}


def _point_size(n):
    return float(np.clip(9 - 1.4 * math.log10(max(n, 1)), 2.5, 8))


def _document(columns, methods, target, n, kind, first):
    """One Bokeh document: a map per method over one shared source (so selections are linked)."""
    from bokeh.embed import json_item
    from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper, Row, TapTool
    from bokeh.plotting import figure

    prefix = f"{kind}"
    source = ColumnDataSource(columns, name=f"{prefix}-source")
    option = first or {"palette": ["#4c72b0"], "low": 0, "high": 1, "low_color": "#4c72b0",
                       "high_color": "#4c72b0", "column": None}
    mapper = LinearColorMapper(palette=option["palette"], low=option["low"], high=option["high"],
                               low_color=option["low_color"], high_color=option["high_color"], nan_color=GREY,
                               name=f"{prefix}-mapper")
    fill = {"field": option["column"], "transform": mapper} if option["column"] else "#4c72b0"
    size = _point_size(n) if kind == "images" else max(6.0, _point_size(n) + 2)
    tools = "pan,wheel_zoom,box_select,lasso_select,reset" if kind == "images" else "pan,wheel_zoom,reset"
    plots, renderers = [], []
    for method in methods:
        p = figure(height=460, sizing_mode="stretch_width", tools=tools, active_scroll="wheel_zoom",
                   output_backend="webgl", title=METHOD_NAMES.get(method, method), name=f"{prefix}-plot-{method}",
                   min_border=8)
        p.toolbar.logo = None
        p.axis.visible = False
        p.grid.visible = False
        r = p.scatter(f"{method}_x", f"{method}_y", source=source, size=size, fill_color=fill, line_color=None,
                      fill_alpha=0.8, nonselection_fill_alpha=0.08, nonselection_fill_color=fill,
                      selection_fill_alpha=1.0, selection_fill_color=fill, name=f"{prefix}-points-{method}")
        p.add_tools(HoverTool(tooltips=None, renderers=[r]))
        if kind == "neurons":
            p.add_tools(TapTool(renderers=[r]))
        plots.append(p)
        renderers.append(r.name)
    root = plots[0] if len(plots) == 1 else Row(children=plots, sizing_mode="stretch_width")
    return json_item(root, target=f"{target}-plot"), {"source": source.name, "mapper": mapper.name,
                                                      "renderers": renderers,
                                                      "methods": [METHOD_NAMES.get(m, m) for m in methods]}


def _dumps(obj) -> str:
    """JSON for a ``.js`` file: compact, and no ``</`` or line separators that could end a script."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_default)
    return text.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value) if np.isfinite(value) else None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
