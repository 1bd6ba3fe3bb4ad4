"""The report: static, offline, escaped, complete — checked as files and in a real browser.

One small run (a nested Keras model, a class folder named like an XSS payload, one broken file)
goes through extract and cluster; the report is built once from that run as it is (embed and
maximize not run: "not computed") and once after embedding and maximization tables with the
contract's columns are added to it.
"""
import fcntl
import html
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import zoo
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.report import build_report
from pipeline.report.names import class_page, layer_page, slug
from pipeline.runner import Runner
from pipeline.stages import cluster, extract, report
from pipeline.store import RunStore

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
    raw = {"name": "evil", "out": str(root / "run"), "model": model, "data": {"images": str(root / "images")},
           "cluster": {"bootstrap": 3}, "report": {"out": str(root / "reports" / "plain"), "units_per_page": 2}}
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(root / "c.yaml")
    Runner(cfg, [extract.STAGE, cluster.STAGE, report.STAGE]).run()
    add_embeddings_and_maximize(cfg.out_dir)
    full = root / "reports" / "full"
    build_report(cfg.out_dir, full, title="evil", options=cfg.report.model_copy(update={"out": str(full)}))
    return cfg, Path(cfg.report_dir), full


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
    p = Links()
    p.feed(path.read_text())
    return p


# ---------------------------------------------------------------- files


def test_stage_records_the_report_and_leaves_no_partial_build(built):
    cfg, plain, _ = built
    marker = json.loads((cfg.out_dir / "report.json").read_text())
    assert Path(marker["index"]) == (plain / "index.html").resolve()
    assert marker["pages"] == len(pages(plain))
    assert not Path(str(plain) + ".partial").exists()
    status = Runner(cfg, [extract.STAGE, cluster.STAGE, report.STAGE]).state(report.STAGE)
    assert status[0] == "done", status


def test_untrusted_class_name_is_escaped_in_every_page(built):
    _, plain, full = built
    for page in pages(plain) + pages(full):
        text = page.read_text()
        assert EVIL not in text, page.name
        assert "onerror=alert(1)>" not in text.replace(ESCAPED, ""), page.name
        assert ESCAPED in text, f"{page.name} does not show the class name"
        assert "Content-Security-Policy" in text and "default-src 'none'" in html.unescape(text)
        assert "<script" not in text
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


def test_a_folder_not_written_by_the_report_is_never_replaced(built, tmp_path):
    cfg, _, _ = built
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not written by this tool"):
        build_report(cfg.out_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- browser


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3/4, NUL-separated JSON).

    No websocket library is needed, nothing listens on a port, and nothing is injected into the
    pages: the checks run from outside, through the protocol.
    """

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe"]

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def wire():  # in the child: the protocol wants fd 3 for reading, fd 4 for writing
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome))
            os.dup2(a, 3)  # dup2 makes 3 and 4 inheritable, so they survive exec
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=wire, close_fds=False,  # close_fds would run after wire()
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id, self.events = b"", 0, []

    def call(self, method, params=None, session=None, timeout=20):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline):
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def wait_for(self, method, session, timeout=20):
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._read(deadline))

    def check(self, url, inside):
        """Open ``url``; return problems: console errors, broken images, requests outside ``inside``."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.events = []
        nav = self.call("Page.navigate", {"url": url}, session)
        assert not nav.get("errorText"), nav
        self.wait_for("Page.loadEventFired", session)
        images = self.call("Runtime.evaluate", {"returnByValue": True, "expression": (
            "JSON.stringify({broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => i.getAttribute('src')), count: document.images.length, css: document.styleSheets.length})")},
            session)
        found = json.loads(images["result"]["value"])
        time.sleep(0.1)
        self.call("Target.closeTarget", {"targetId": target})
        mine = [e for e in self.events if e.get("sessionId") == session]
        return {"console": [_message(e) for e in mine if _is_error(e)],
                "broken": found["broken"], "images": found["count"], "stylesheets": found["css"],
                "outside": [u for u in (e["params"]["request"]["url"] for e in mine
                                        if e.get("method") == "Network.requestWillBeSent")
                            if not (u.startswith(inside) or u.startswith("data:"))],
                "requests": sum(e.get("method") == "Network.requestWillBeSent" for e in mine)}

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self.profile, ignore_errors=True)


def _is_error(event):
    method, p = event.get("method"), event.get("params", {})
    return (method == "Runtime.exceptionThrown"
            or (method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"))
            or (method == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"))
            or method == "Network.loadingFailed")


def _message(event):
    p = event.get("params", {})
    return p.get("entry", {}).get("text") or p.get("errorText") or p.get("blockedReason") or json.dumps(p)[:200]


@pytest.fixture(scope="module")
def browser():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it when it can)")
    b = Chromium(binary)
    yield b
    b.close()


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
