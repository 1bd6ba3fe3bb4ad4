"""The report: static, offline, escaped, complete — checked as files and in a real browser.

One small run (a nested Keras model, a class folder named like an XSS payload, one broken file)
goes through extract and cluster; the report is built once from that run as it is (embed, probe
and maximize not run: "not computed") and once after embedding and maximization tables with the
contract's columns are added to it and the probe stage has run.
"""
import dataclasses
import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import zoo
from pipeline.shortcuts import verdicts as bias
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.report import build_report
from pipeline.report.names import class_page, layer_page, slug
from pipeline.report.shortcuts import readable
from pipeline.orchestration.runner import Runner
from pipeline.stages import cluster, extract, probe, report
from pipeline.storage.store import RunStore

EVIL = "<img src=x onerror=alert(1)>"
ESCAPED = html.escape(EVIL, quote=True)  # &lt;img src=x onerror=alert(1)&gt;


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(cfg, plain report dir, full report dir)`` of one small run."""
    root = tmp_path_factory.mktemp("report")
    zoo.image_folder(root / "images", classes=(EVIL, "b", "c"), per_class=4)
    (root / "images" / "b" / "broken.png").write_bytes(b"<not a png>")
    model = zoo.save(zoo.nested(), root / "model", "keras")
    zoo.write_config(root, model, root / "images", name="evil", cluster={"bootstrap": 3},
                     report={"out": str(root / "reports" / "plain"), "units_per_page": 2})
    cfg = load_config(root / "c.yaml")
    Runner(cfg, [extract.STAGE, cluster.STAGE, REPORT]).run()
    add_embeddings_and_maximize(cfg.out_dir)
    Runner(cfg, [extract.STAGE, probe.STAGE]).run(only="probe")
    full = root / "reports" / "full"
    build_report(cfg.out_dir, full, title="evil", options=cfg.report.model_copy(update={"out": str(full)}))
    return cfg, Path(cfg.report_dir), full


# The report stage on a run with only extract and cluster done: the runner refuses a stage whose
# declared upstream stages are missing, while the report itself shows missing tables as "not computed".
REPORT = dataclasses.replace(report.STAGE, deps=("extract", "cluster"))


def add_embeddings_and_maximize(run_dir):
    """What the embed and maximize stages write (contract columns), made up but well formed."""
    store = RunStore(run_dir)
    rng = np.random.default_rng(0)
    units = store.read_table("clusters.parquet")
    summary = store.read_table("cluster_summary.parquet")
    n = len(store.read_table("dataset.parquet"))
    images, neurons, quality, rows = [], [], [], []
    for layer, part in units.groupby("layer", sort=False):
        for method in ("tsne", "umap"):
            xy = rng.normal(size=(n, 2))
            images.append(pd.DataFrame({"layer": layer, "method": method, "index": np.arange(n),
                                        "x": xy[:, 0], "y": xy[:, 1]}))
            xy = rng.normal(size=(len(part), 2))
            neurons.append(pd.DataFrame({"layer": layer, "method": method, "channel": part["channel"].to_numpy(),
                                         "x": xy[:, 0], "y": xy[:, 1]}))
            for of in ("images", "neurons"):
                quality.append({"layer": layer, "of": of, "method": method, "trustworthiness": 0.9,
                                "knn_accuracy": 0.5 if of == "images" else np.nan})
        for ch in part["channel"]:
            rows.append(_max_row(store, "unit", layer, channel=int(ch), size=160, rng=rng))
    for r in summary.itertuples():
        rows.append(_max_row(store, "cluster", r.layer, cluster=int(r.cluster), size=64, rng=rng))
    for k in range(3):
        rows.append(_max_row(store, "class", "out", klass=k, size=64, rng=rng))
    (Path(run_dir).parent / "outside.png").write_bytes((Path(run_dir) / rows[0]["path"]).read_bytes())
    rows[-1]["path"] = "../outside.png"  # outside the run directory: must never be copied
    store.write_table("embeddings/images.parquet", pd.concat(images, ignore_index=True))
    store.write_table("embeddings/neurons.parquet", pd.concat(neurons, ignore_index=True))
    store.write_table("embeddings/quality.parquet", pd.DataFrame(quality))
    store.write_table("maximize/index.parquet", pd.DataFrame(rows))


def _max_row(store, kind, layer, channel=-1, cluster=-1, klass=-1, size=64, rng=None):
    path = f"maximize/{slug(layer)}/{kind}_{max(channel, cluster, klass):03d}.png"
    store.path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(store.path(path))
    return {"kind": kind, "layer": layer, "channel": channel, "cluster": cluster, "class": klass, "seed": 0,
            "activation": 2.0, "dataset_max": 1.0 if channel != 1 else -0.5, "score": 2.0, "z_score": 3.5,
            "path": path}


def pages(folder):
    return sorted(Path(folder).glob("*.html"))


class Links(HTMLParser):
    """Every ``href``/``src`` and element ``id`` of a page."""

    def __init__(self):
        super().__init__()
        self.urls, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.urls.append(value)
            if name == "id":
                self.ids.add(value)


def parse(path):
    return parse_text(path.read_text())


def parse_text(text):
    p = Links()
    p.feed(text)
    return p


# ---------------------------------------------------------------- files


def test_stage_records_the_report_and_leaves_no_partial_build(built):
    cfg, plain, _ = built
    marker = json.loads((cfg.out_dir / "report.json").read_text())
    assert Path(marker["index"]) == (plain / "index.html").resolve()
    assert marker["pages"] == len(pages(plain))
    assert not Path(str(plain) + ".partial").exists()
    status = Runner(cfg, [extract.STAGE, cluster.STAGE, REPORT]).state(REPORT)
    # The fixture ran the probe stage after the report: the report now misses its section.
    assert status == ("stale", "upstream stage 'probe' changed"), status


def test_untrusted_class_name_is_escaped_in_every_page(built):
    _, plain, full = built
    for page in pages(plain) + pages(full):
        text = page.read_text()
        assert EVIL not in text, page.name
        assert "onerror=alert(1)>" not in text.replace(ESCAPED, ""), page.name
        assert ESCAPED in text, f"{page.name} does not show the class name"
        assert "Content-Security-Policy" in text and "default-src 'none'" in html.unescape(text)
        assert "unsafe-eval" not in text
        # Scripts only on pages with the interactive explorer, only as files of the report folder.
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", text, flags=re.S)
        assert len(scripts) == text.count("<script")
        for attrs, body in scripts:
            assert body == "" and re.fullmatch(r' src="(js|explorer)/[a-z0-9.-]+\.js"', attrs), (page.name, attrs)
        if scripts:
            assert "script-src 'self';" in html.unescape(text) and "unsafe-inline'; base-uri" in html.unescape(text)
        else:
            assert "script-src" not in text
    assert (full / class_page(EVIL)).exists() and "<" not in class_page(EVIL)


def test_every_layer_cluster_and_unit_of_the_tables_appears(built):
    cfg, _, full = built
    store = RunStore(cfg.out_dir)
    index = parse(full / "index.html")
    for layer in store.read_table("layers.parquet")["layer"]:
        assert layer_page(layer) in index.urls
    for r in store.read_table("cluster_summary.parquet").itertuples():
        assert f"cluster-{r.cluster}" in parse(full / layer_page(r.layer)).ids, (r.layer, r.cluster)
    units = store.read_table("clusters.parquet")
    for layer, part in units.groupby("layer"):
        gallery = [p for p in pages(full) if p.name.startswith(layer_page(layer)[:-5] + "-units-")]
        assert len(gallery) == -(-len(part) // 2)  # units_per_page: 2
        ids = set().union(*(parse(p).ids for p in gallery))
        assert {f"u{c}" for c in part["channel"]} == ids & {f"u{c}" for c in range(1000)}
    assert "/" not in layer_page("block/inner_conv") and layer_page("a/b") != layer_page("a-b")


def test_links_are_relative_and_resolve_inside_the_folder(built):
    _, plain, full = built
    for folder in (plain, full):
        for page in pages(folder):
            for url in parse(page).urls:
                parts = urlsplit(url)
                assert not parts.scheme and not parts.netloc and not url.startswith("/"), (page.name, url)
                target = (folder / unquote(parts.path)).resolve() if parts.path else page
                assert target.is_relative_to(folder.resolve()) and target.is_file(), (page.name, url)
                if parts.fragment:
                    assert parts.fragment in parse(target).ids, (page.name, url)


def test_missing_stages_say_not_computed_and_present_ones_are_shown(built):
    cfg, plain, full = built
    layer = layer_page("block/inner_conv")
    assert "Not computed: image maps" in (plain / layer).read_text()
    assert "not rendered" in (plain / layer).read_text()
    text = (full / layer).read_text()
    assert "Not computed" not in text and "img/fig/atlas-" in text
    shown = {p.name for p in (full / "img" / "max").iterdir()}
    assert len(shown) == len(pd.read_parquet(cfg.out_dir / "maximize/index.parquet")) - 1  # not ../outside.png
    assert max(max(Image.open(full / "img" / "max" / n).size) for n in shown) <= cfg.report.image_size
    assert "skipped" in (full / "index.html").read_text() and "broken.png" in (full / "index.html").read_text()
    assert "×max n/m" in "".join(p.read_text() for p in pages(full))  # unit 1: dataset max below zero


def section(page, start):
    """The HTML of the ``<section id=start>`` of a page."""
    text = page.read_text()
    begin = text.index(f'<section id="{start}">')
    return text[begin:text.index("</section>", begin)]


def test_wrong_cue_section_shows_every_verdict_escaped_with_intervals(built):
    cfg, plain, full = built
    assert "Not computed: the shortcut finder" in section(plain / "index.html", "wrong-cue")
    text = section(full / "index.html", "wrong-cue")
    verdicts = pd.read_parquet(cfg.out_dir / "bias_verdicts.parquet")
    assert len(verdicts) == 3 and text.count('<tr class="vrow">') == len(verdicts)
    rows = text.split('<tr class="vrow">')[1:]
    for r, row in zip(verdicts.sort_values("class").itertuples(), rows):
        assert html.escape(r.class_name, quote=True) in row and f">{r.verdict}</span>" in row
        for sentence in readable(r.reason):
            assert html.escape(sentence, quote=True) in row
        if np.isfinite(r.effect_size):
            assert f"{r.effect_size:.2f} [{r.effect_ci_low:.2f}–{r.effect_ci_high:.2f}]" in row
    assert ESCAPED in text and EVIL not in text
    assert not re.search(r"\d\.\d\d \[-?\d\.\d\d, ", text)  # intervals read 0.53 [0.48–0.58], not [0.48, 0.58]
    # Signal lost per probe: every (class, probe) of bias.parquet has a cell (n/a when not measurable).
    assert text.count('<td class="mono cell">') == len(pd.read_parquet(cfg.out_dir / "bias.parquet"))
    # The probe stage's example images are copied into the report, not shrunk to maximization size.
    examples = pd.read_parquet(cfg.out_dir / "probes/index.parquet")
    copied = sorted((full / "img" / "probe").iterdir())
    assert len(copied) == len(examples) + 1 and all(f"img/probe/{c.name}" in text for c in copied)
    assert Image.open(full / "img" / "probe" / "examples.png").size == \
        Image.open(cfg.out_dir / "probes" / "examples.png").size


def test_colour_sensitive_clusters_are_recomputed_and_link_to_their_cards(built):
    cfg, _, full = built
    store = RunStore(cfg.out_dir)
    expected = bias.colour_clusters(bias.cluster_sensitivity(store.read_table("probe_units.parquet"),
                                                             store.read_table("clusters.parquet")),
                                    store.read_table("maximize/index.parquet"))
    text = section(full / "index.html", "wrong-cue")
    links = [u for u in parse_text(text).urls if "#cluster-" in u]
    assert links == [f"{layer_page(r.layer)}#cluster-{r.cluster}" for r in expected.itertuples()]
    assert all(f"colour {r.colour_sensitivity:.2f}" in text for r in expected.itertuples())


def test_unit_and_cluster_cards_show_cue_sensitivity_when_probed(built):
    cfg, plain, full = built
    units = pd.read_parquet(cfg.out_dir / "probe_units.parquet")
    layer = "block/inner_conv"
    gallery = [p for p in pages(full) if p.name.startswith(layer_page(layer)[:-5] + "-units-")]
    text = "".join(p.read_text() for p in gallery)
    live = pd.read_parquet(cfg.out_dir / "clusters.parquet").query("layer == @layer and not dead")
    for ch in live["channel"]:
        row = units[(units["layer"] == layer) & (units["channel"] == ch)].iloc[0]
        assert f"colour {row.colour_sensitivity:.2f}" in text, ch
    assert "cue sensitivity" in (full / layer_page(layer)).read_text()
    plain_gallery = next(p for p in pages(plain) if p.name.startswith(layer_page(layer)[:-5] + "-units-"))
    assert "Not computed: colour / texture / shape sensitivity" in plain_gallery.read_text()
    assert "Not computed: colour / texture / shape sensitivity" in (plain / layer_page(layer)).read_text()


def test_verdict_badges_and_reasons_of_every_kind(built, tmp_path):
    """A made-up verdict table with each verdict and markup in the reason: badges, sentences, escaping."""
    cfg, _, _ = built
    run = tmp_path / "run"
    shutil.copytree(cfg.out_dir, run)
    names = pd.read_parquet(run / "dataset.parquet").drop_duplicates("label").sort_values("label")
    kinds = ["relies on colour", "relies on texture", "shape-driven"]
    rows = []
    for (label, name), verdict in zip(names[["label", "class_name"]].itertuples(index=False), kinds):
        rows.append({"class": label, "class_name": name, "verdict": verdict, "effect_size": 0.531,
                     "effect_ci_low": 0.478, "effect_ci_high": 0.584, "cue": verdict.split()[-1].split("-")[0],
                     "reason": "recolouring loses 0.53 [0.48, 0.58] of the class signal; <b>bold</b> claim",
                     "n": 40, "n_correct": 30, "accuracy": 0.75})
    rows[-1].update(verdict="inconclusive", cue=None, effect_size=np.nan, reason="only 3 images of this class (need 10)")
    RunStore(run).write_table("bias_verdicts.parquet", pd.DataFrame(rows).reindex(columns=bias.VERDICT_COLUMNS))
    table = pd.read_parquet(run / "bias.parquet")
    table["signal_lost"], table["signal_ci_low"], table["signal_ci_high"] = 0.5, 0.4, 0.625
    table.loc[table["probe"] == "grayscale", "applicable"] = False
    table.loc[table["probe"] == "grayscale", "note"] = "not applicable: <grey> images"
    RunStore(run).write_table("bias.parquet", table)
    build_report(run, tmp_path / "r")
    text = section(tmp_path / "r" / "index.html", "wrong-cue")
    assert "img/fig/shortcut-signal-lost.png" in text and (tmp_path / "r/img/fig/shortcut-signal-lost.png").is_file()
    assert text.count("0.50 [0.40–0.62]") == len(table) - len(names)  # one n/a per class
    assert text.count('title="not applicable: &lt;grey&gt; images">n/a') == len(names)
    for badge, verdict in [("colour", "relies on colour"), ("texture", "relies on texture"),
                           ("inconclusive", "inconclusive")]:
        assert f'<span class="verdict v-{badge}">{verdict}</span>' in text
    assert "0.53 [0.48–0.58]" in text and "Recolouring loses 0.53 [0.48–0.58] of the class signal." in text
    assert "&lt;b&gt;bold&lt;/b&gt; claim." in text and "<b>bold</b>" not in text
    assert "Only 3 images of this class (need 10)." in text


def test_readable_reasons():
    assert readable("recolouring loses 0.53 [0.48, 0.58] of the class signal; texture matters too") == [
        "Recolouring loses 0.53 [0.48–0.58] of the class signal.", "Texture matters too."]
    assert readable("a (near chance 0.25: only 3 probed): b") == ["A (near chance 0.25: only 3 probed).", "B."]
    assert readable(None) == [] and readable("") == []


def test_a_folder_not_written_by_the_report_is_never_replaced(built, tmp_path):
    cfg, _, _ = built
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not written by this tool"):
        build_report(cfg.out_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- browser


def test_the_checker_catches_each_kind_of_problem(browser, tmp_path):
    """Negative control: a page with a broken image, a remote image, a script and a file outside."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (tmp_path / "outside.css").write_text("body { color: red }")
    csp = "default-src 'none'; img-src 'self' data:; style-src 'self'"
    (folder / "p.html").write_text(
        f'<!doctype html><meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<link rel="stylesheet" href="../outside.css"><img src="missing.png">'
        '<img src="http://example.invalid/x.png"><script>console.log(1)</script>')
    found = browser.check((folder / "p.html").as_uri(), inside=folder.as_uri() + "/")
    assert found["broken"] == ["missing.png", "http://example.invalid/x.png"]
    assert any("Content Security Policy" in m for m in found["console"]), found["console"]
    assert any("ERR_FILE_NOT_FOUND" in m for m in found["console"]), found["console"]
    assert {u.rsplit("/", 1)[-1] for u in found["outside"]} == {"outside.css", "x.png"}


def test_every_page_opens_cleanly_in_chromium(built, browser):
    _, plain, full = built
    for folder in (plain, full):
        inside = folder.resolve().as_uri() + "/"
        for page in pages(folder):
            found = browser.check(page.resolve().as_uri(), inside)
            assert found["console"] == [], (page.name, found["console"])
            assert found["broken"] == [], (page.name, found["broken"])
            assert found["outside"] == [], (page.name, found["outside"])
            assert found["stylesheets"] == 1 and found["requests"] >= 2, (page.name, found)
        if folder == full:
            assert browser.check((folder / layer_page("block/inner_conv")).resolve().as_uri(), inside)["images"] > 5
