"""The interactive explorer of the layer pages, in a real browser, on runs written directly (no model).

``synthetic_run`` writes the tables and arrays the report reads (dataset, thumbnails, activations,
image and unit embeddings, clusters, probe sensitivities) for any number of images, so the same
code serves the fast tests, the 100k-point test (marked ``slow``, not in the default run) and
``tests/benchmarks/bench_explorer.py``.
"""
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ReportConfig
from pipeline.report import build_report
from pipeline.report.names import layer_page
from pipeline.storage.store import RunStore
from test_report import EVIL

CLASSES = (EVIL, "square", "circle", "cross")
LAYERS = {"conv_a": 8, "conv_b": 12}


# ---------------------------------------------------------------- a run written directly


def synthetic_run(root, n, seed=0, thumb=32):
    """A run directory with ``n`` images in 4 classes, two layers, embeddings, clusters, probes."""
    import zarr

    rng = np.random.default_rng(seed)
    root = Path(root)
    store = RunStore(root)
    store.root.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, len(CLASSES), n)
    store.write_table("dataset.parquet", pd.DataFrame({
        "index": np.arange(n), "path": [f"img/{i}.png" for i in range(n)], "label": labels,
        "class_name": [CLASSES[k] for k in labels]}))
    store.write_json("manifest.json", {"config": {"name": "synthetic", "seed": seed}, "stages": {
        s: {"status": "done", "finished_at": "2026-01-01T00:00:00+00:00", "seconds": 1.0}
        for s in ("extract", "embed", "cluster", "probe")}})
    group = zarr.open_group(str(root / "activations.zarr"), mode="w")
    group.attrs.update({"layers": {l: {"kind": "map", "shape": [8, 8, c], "path": l, "type": "Conv2D"}
                                   for l, c in LAYERS.items()},
                        "layer_order": list(LAYERS), "n_images": n, "input_size": [thumb, thumb], "channels": 3,
                        "scale": "1/255", "model": "synthetic"})
    rows = min(n, 8192)
    thumbs = group.create_array("thumbnails", shape=(n, thumb, thumb, 3), chunks=(rows, thumb, thumb, 3),
                                dtype="uint8", fill_value=0)
    colours = np.array([[220, 40, 40], [40, 160, 60], [40, 80, 220], [230, 200, 40]], np.uint8)
    yy, xx = np.mgrid[:thumb, :thumb]
    for start in range(0, n, rows):
        lab = labels[start:start + rows]
        r = rng.uniform(thumb * 0.15, thumb * 0.4, len(lab))[:, None, None]
        disk = (yy - thumb / 2) ** 2 + (xx - thumb / 2) ** 2 < r ** 2
        block = np.full((len(lab), thumb, thumb, 3), 24, np.uint8)
        block[disk] = colours[np.repeat(lab, disk.sum(axis=(1, 2)))]
        thumbs[start:start + len(lab)] = block
    images, neurons, clusters, probe = [], [], [], []
    centres = rng.normal(scale=6, size=(len(CLASSES), 2))
    for layer, c in LAYERS.items():
        acts = rng.normal(size=(n, c)).astype(np.float32) + labels[:, None] * 0.3
        group.create_array(f"{layer}/mean", shape=(n, c), chunks=(rows, c), dtype="float32", fill_value=0)[:] = acts
        for method in ("tsne", "umap"):
            xy = centres[labels] + rng.normal(size=(n, 2))
            images.append(pd.DataFrame({"layer": layer, "method": method, "index": np.arange(n),
                                        "x": xy[:, 0], "y": xy[:, 1]}))
            xy = rng.normal(size=(c, 2))
            neurons.append(pd.DataFrame({"layer": layer, "method": method, "channel": np.arange(c),
                                         "x": xy[:, 0], "y": xy[:, 1]}))
        top = np.argsort(-acts, axis=0)[:9].T
        clusters.append(pd.DataFrame({
            "layer": layer, "channel": np.arange(c), "cluster": np.arange(c) % 3, "dead": False,
            "mean": acts.mean(axis=0), "std": acts.std(axis=0), "max": acts.max(axis=0),
            "top_indices": list(top), "class_selectivity": rng.random(c), "top_class": rng.integers(0, 4, c),
            "stability": rng.random(c)}))
        probe.append(pd.DataFrame({"layer": layer, "channel": np.arange(c), "colour_sensitivity": rng.random(c),
                                   "texture_sensitivity": rng.random(c), "shape_sensitivity": rng.random(c),
                                   "grayscale_sensitivity": rng.random(c)}))
    store.write_table("embeddings/images.parquet", pd.concat(images, ignore_index=True))
    store.write_table("embeddings/neurons.parquet", pd.concat(neurons, ignore_index=True))
    store.write_table("clusters.parquet", pd.concat(clusters, ignore_index=True))
    store.write_table("probe_units.parquet", pd.concat(probe, ignore_index=True))
    return root


def explorer_specs(report, layer):
    """The specs ``explorer/<layer>.js`` pushes, as Python objects."""
    page = (report / layer_page(layer)).read_text()
    data = re.search(r'<script src="(explorer/[^"]+)"', page)[1]
    text = (report / data).read_text()
    return [json.loads(m) for m in re.findall(r"^window\.PIPELINE_EXPLORER\.push\((.*)\);$", text, flags=re.M)]


# ---------------------------------------------------------------- driving the page


def open_explorer(chromium, path, timeout=120):
    """Open a layer page and wait until every explorer on it has drawn (``data-ready``).

    Returns the :class:`browser.Page`, with ``load_seconds`` (to the load event) and
    ``ready_seconds`` (to the explorers drawn) since the navigation started.
    """
    page = chromium.open(path, timeout=timeout)
    page.ready_seconds = page.wait_for(
        "Array.from(document.querySelectorAll('.explorer')).every(e => e.dataset.ready)", timeout,
        "the explorer did not finish drawing")
    return page


def hover_a_point(page, which=0, step=10):
    """Move the pointer over the first map of explorer ``which`` until a point is hovered."""
    page.eval(f"document.querySelectorAll('.explorer')[{which}].scrollIntoView()")
    box = page.rect(".explorer .xp-plot", which)
    for y in range(int(box["top"]) + 40, int(box["bottom"]) - 20, step):
        for x in range(int(box["left"]) + 20, int(box["left"] + box["width"] / 2) - 40, step):
            page.move(x, y)
            if page.eval(f"document.querySelectorAll('.explorer')[{which}].dataset.hover"):
                return x, y
    raise AssertionError("no point found under the pointer")


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    run = synthetic_run(root / "run", 600)
    out = root / "report"
    build_report(run, out, options=ReportConfig(explorer_max_points=400, units_per_page=5))
    return run, out


def test_hovering_an_image_shows_its_thumbnail_from_file_urls(report, browser):
    run, out = report
    page = open_explorer(browser, out / layer_page("conv_a"))
    try:
        hover_a_point(page)
        # The sprite sheet is fetched when the card first shows; wait for it rather than race it.
        page.wait_for("""(() => { const c = Array.from(document.querySelectorAll('.xp-card')).find(c => !c.hidden);
            const img = c && c.querySelector('img'); return !!img && img.complete && img.naturalWidth > 0; })()""",
                      timeout=10, message="the hovered image's thumbnail never loaded")
        card = page.eval("""(() => { const c = Array.from(document.querySelectorAll('.xp-card')).find(c => !c.hidden);
            const img = c.querySelector('img');
            return {index: c.dataset.index, text: c.textContent, src: img.getAttribute('src'),
                    loaded: img.complete && img.naturalWidth > 0}; })()""")
        assert card["loaded"] and re.fullmatch(r"img/sprites/\d+\.jpg", card["src"]), card
        label = pd.read_parquet(run / "dataset.parquet")["class_name"][int(card["index"])]
        assert f"image {card['index']}" in card["text"] and label in card["text"]
        errors, outside = page.problems(out.resolve().as_uri() + "/")
        assert errors == [] and outside == []
        # The class name is text, never markup (one class is named like an XSS payload).
        assert page.eval("document.querySelectorAll('.explorer img[src=x], .xp-card img[src=x]').length") == 0
    finally:
        page.close()


def test_selection_lists_the_selected_images_and_colour_switches(report, browser):
    _, out = report
    page = open_explorer(browser, out / layer_page("conv_a"))
    try:
        page.eval("""(() => { const d = Bokeh.documents.find(d => d.get_model_by_name('images-source'));
                      d.get_model_by_name('images-source').selected.indices = [0, 1, 2, 5, 8]; })()""")
        listed = page.eval("""(() => { const e = document.querySelector('.explorer');
            return {n: e.dataset.selected, cells: e.querySelectorAll('.xp-cell').length,
                    indices: e.querySelector('.xp-indices').value}; })()""")
        assert listed["n"] == "5" and listed["cells"] == 5 and len(listed["indices"].split(", ")) == 5
        options = page.eval("Array.from(document.querySelector('.explorer select').options).map(o => o.text)")
        assert options == ["class", "most active unit cluster"]
        page.eval("""(() => { const s = document.querySelector('.explorer select'); s.value = '1';
                      s.dispatchEvent(new Event('change')); })()""")
        assert page.eval("document.querySelector('.explorer').dataset.colour") == "c_cluster"
        page.pause(0.3)
        assert page.problems(out.resolve().as_uri() + "/")[0] == []
    finally:
        page.close()


def test_clicking_a_unit_opens_its_card(report, browser):
    _, out = report
    page = open_explorer(browser, out / layer_page("conv_b"))
    try:
        options = page.eval("Array.from(document.querySelectorAll('.explorer')[1].querySelector('select').options)"
                            ".map(o => o.text)")
        assert {"cluster", "top class", "colour sensitivity", "grayscale sensitivity"} <= set(options)
        x, y = hover_a_point(page, which=1, step=6)
        channel = int(page.eval("document.querySelectorAll('.explorer')[1].dataset.hover"))
        shown = page.eval("Array.from(document.querySelectorAll('.xp-card')).filter(c => !c.hidden)"
                          ".map(c => Array.from(c.querySelectorAll('img')).map(i => i.naturalWidth > 0))")
        assert shown and all(shown[0]) and len(shown[0]) >= 2  # top images (no maximization image here)
        page.click(x, y)
        href = page.wait_for_url(lambda url: "#u" in url, timeout=10)  # the card opens on its gallery page
        assert href.endswith(f"{layer_page('conv_b')[:-5]}-units-{channel // 5 + 1}.html#u{channel}"), href
    finally:
        page.close()


def test_a_seeded_sample_beyond_the_limit_and_the_page_says_so(report):
    _, out = report
    specs = {l: explorer_specs(out, l) for l in LAYERS}
    images = [s for s in specs["conv_a"] if s["meta"]["kind"] == "images"][0]
    assert images["meta"]["points"] == 400 and images["meta"]["total"] == 600
    assert "Showing a seeded random sample of 400 of 600 images" in (out / layer_page("conv_a")).read_text()
    assert [s["meta"]["points"] for s in specs["conv_b"]] == [400, LAYERS["conv_b"]]
    sheets = sorted((out / "img" / "sprites").iterdir())
    assert len(sheets) == 1 and images["meta"]["sprites"]["sheets"] == 1
    # BokehJS is stored once, beside the pages, and no page refers to anything outside the folder.
    assert sorted(p.name for p in (out / "js").iterdir()) == ["bokeh-gl.min.js", "bokeh.min.js", "explorer.js"]
    assert "cdn." not in (out / layer_page("conv_a")).read_text()


def test_explorer_off_leaves_pages_without_scripts(tmp_path):
    run = synthetic_run(tmp_path / "run", 50)
    build_report(run, tmp_path / "r", options=ReportConfig(explorer=False))
    assert not (tmp_path / "r" / "js").exists()
    assert all("<script" not in p.read_text() for p in (tmp_path / "r").glob("*.html"))


# ---------------------------------------------------------------- 100k points


def build_and_open(tmp_path, n, chromium, max_points=None):
    """Build a report of an ``n``-image synthetic run; returns the figures the benchmark prints."""
    run = synthetic_run(tmp_path / "run", n)
    options = ReportConfig(**({"explorer_max_points": max_points} if max_points else {}))
    t0 = time.perf_counter()
    result = build_report(run, tmp_path / "report", options=options)
    build = time.perf_counter() - t0
    out = tmp_path / "report"
    page_file = out / layer_page("conv_a")
    data = out / re.search(r'<script src="(explorer/[^"]+)"', page_file.read_text())[1]
    loaded = [out / "js" / "bokeh.min.js", out / "js" / "bokeh-gl.min.js", out / "js" / "explorer.js", data, page_file]
    page = open_explorer(chromium, page_file, timeout=300)
    try:
        hover_a_point(page, step=4)
        errors, outside = page.problems(out.resolve().as_uri() + "/")
        return {"points": n, "build_s": build, "report_mb": result.bytes / 1e6,
                "page_mb": sum(p.stat().st_size for p in loaded) / 1e6, "data_mb": data.stat().st_size / 1e6,
                "sprites_mb": sum(p.stat().st_size for p in (out / "img" / "sprites").iterdir()) / 1e6,
                "load_s": page.load_seconds, "ready_s": page.ready_seconds, "errors": errors, "outside": outside}
    finally:
        page.close()


@pytest.mark.slow
def test_100k_points_open_in_chromium_in_reasonable_time(tmp_path, browser):
    figures = build_and_open(tmp_path, 100_000, browser, max_points=100_000)
    print(figures)
    assert figures["errors"] == [] and figures["outside"] == []
    assert figures["ready_s"] < 30 and figures["build_s"] < 300
