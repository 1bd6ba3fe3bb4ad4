"""The remedy's offline page: verdicts, accuracies and changed clusters, before -> after, in one place.

Built from the two run directories only, with the report's Content-Security-Policy (nothing from
the network, no script) and autoescaping (class and layer names come from the user's files). The
maximization images it shows are copied next to it, so the folder can be zipped and mailed.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pandas as pd

from pipeline.report.csp import CSP

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<title>Remedy: {{ s.cue }} — before → after</title>
<link rel="stylesheet" href="style.css"></head>
<body>
<h1>Remedy of a {{ s.cue }} shortcut: before → after</h1>
<p>A copy of <code>{{ model_name }}</code> was fine-tuned for {{ s.settings.epochs }} epochs on {{ s.images["fine-tuned"] }}
labelled images with counterfactual augmentation ({{ s.augment | join(", ") }}; {{ (100 * s.settings.strength) | round | int }} %
of the images per epoch, seed {{ s.seed }}){% if s.forced %}, the cue forced by <code>remedy.cue</code>{% endif %};
layers trained: {{ s.trained_layers | join(", ") }}. The verdicts and accuracies below are measured on the
{{ s.images["held-out"] }} held-out images it never trained on.</p>
<p class="headline">{{ s.cue | capitalize }} reliance flagged for <b>{{ s.flagged.before }}</b> of {{ s.flagged.classes }} classes
before, <b>{{ s.flagged.after }}</b> after.
Held-out accuracy on the originals {{ pct(s.heldout_accuracy.original[0]) }} → <b>{{ pct(s.heldout_accuracy.original[1]) }}</b>;
under the {{ s.cue }} probes {{ pct(s.heldout_accuracy[s.cue][0]) }} → <b>{{ pct(s.heldout_accuracy[s.cue][1]) }}</b>.</p>
<p>Links: {% for label, href in links %}<a href="{{ href }}">{{ label }}</a>{% if not loop.last %} · {% endif %}{% endfor %}</p>

<h2>Verdicts per class (held-out images)</h2>
<table><tr><th>class</th><th>before</th><th>after</th>{% for c in cues %}<th>{{ c }}: signal lost before</th><th>after</th>{% endfor %}</tr>
{% for r in verdicts %}<tr><td>{{ r.class_name }}</td><td>{{ r.verdict_before }}</td><td>{{ r.verdict_after }}</td>
{% for c in cues %}<td>{{ ci(r, c, "before") }}</td><td>{{ ci(r, c, "after") }}</td>{% endfor %}</tr>
{% endfor %}</table>

<h2>Accuracy before → after</h2>
<p>On the originals and under each probe, with 95 % intervals; <i>change</i> is the paired difference.
A drop on the originals is collateral damage of the remedy.</p>
<table><tr><th>images</th><th>pass</th><th>cue removed</th><th>n</th><th>before</th><th>after</th><th>change</th></tr>
{% for r in accuracy %}<tr class="{{ 'worse' if r.change_ci_high < 0 else ('better' if r.change_ci_low > 0 else '') }}">
<td>{{ r.split }}</td><td>{{ r.probe }}</td><td>{{ r.group }}</td><td>{{ r.n }}</td>
<td>{{ pct(r.accuracy_before) }} [{{ pct(r.before_ci_low) }}, {{ pct(r.before_ci_high) }}]</td>
<td>{{ pct(r.accuracy_after) }} [{{ pct(r.after_ci_low) }}, {{ pct(r.after_ci_high) }}]</td>
<td>{{ signed(r.change) }} [{{ signed(r.change_ci_low) }}, {{ signed(r.change_ci_high) }}]</td></tr>
{% endfor %}</table>

<h2>Clusters whose {{ s.cue }} sensitivity changed most</h2>
{% if clusters %}<p>A cluster of the original model, followed through its member units (fine-tuning keeps every unit):
its mean {{ s.cue }} sensitivity before and after. Its maximization image before; after, the image of the remedied
model's cluster sharing most of its members (overlap = Jaccard index).</p>
<table><tr><th>layer</th><th>cluster</th><th>units</th><th>sensitivity before</th><th>after</th><th>image before</th><th>image after</th></tr>
{% for r in clusters %}<tr><td>{{ r.layer }}</td><td>{{ r.cluster }}</td><td>{{ r.size }}</td>
<td>{{ num(r.sensitivity_before) }}</td><td>{{ num(r.sensitivity_after) }}</td>
<td>{% if r.img_before %}<img src="{{ r.img_before }}" alt="before" width="96">{% else %}not rendered{% endif %}</td>
<td>{% if r.img_after %}<img src="{{ r.img_after }}" alt="after" width="96"><br>cluster {{ r.cluster_after }}, overlap {{ num(r.overlap_after) }}{% else %}not rendered{% endif %}</td></tr>
{% endfor %}</table>{% else %}<p>Not computed: the runs have no cluster or probe tables.</p>{% endif %}

<h2>Fine-tuning</h2>
<table><tr><th>epoch</th><th>loss</th><th>accuracy (augmented training images)</th><th>counterfactual images</th><th>seconds</th></tr>
{% for r in history %}<tr><td>{{ r.epoch }}</td><td>{{ num(r.loss) }}</td><td>{{ pct(r.accuracy) }}</td><td>{{ r.augmented }}</td><td>{{ num(r.seconds) }}</td></tr>{% endfor %}
</table>
<p>Settings: {% for k, v in s.settings.items() %}<code>remedy.{{ k }}: {{ v }}</code> {% endfor %}</p>
</body></html>
"""

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:14px;text-align:left}
tr.worse td{background:#fde8e8}tr.better td{background:#e8f6e8}.headline{font-size:17px}img{image-rendering:pixelated}
"""


def _pct(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def _signed(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f}"


def _num(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _ci(row, cue, when):
    v, lo, hi = (row.get(f"{cue}_{s}_{when}") for s in ("lost", "ci_low", "ci_high"))
    return "–" if v is None or pd.isna(v) else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def _records(store_root, name):
    path = Path(store_root) / name
    return pd.read_parquet(path).to_dict("records") if path.exists() else []


def write_page(remedied_run, original_run, summary) -> Path:
    """Write ``<remedied_run>/before-after/index.html`` (built aside, then renamed); return its path."""
    import jinja2

    from pipeline.remedy import layout
    from pipeline.storage.store import RunStore

    remedied_run, original_run = Path(remedied_run), Path(original_run)
    store = RunStore(remedied_run)
    store.discard_partial(layout.PAGE)
    root = store.partial_dir(layout.PAGE)
    (root / "img").mkdir(exist_ok=True)
    clusters = _records(remedied_run, layout.CLUSTERS)
    for i, r in enumerate(clusters):
        r["img_before"] = _copy(original_run, r.get("path_before"), root, f"img/before_{i}.png")
        r["img_after"] = _copy(remedied_run, r.get("path_after"), root, f"img/after_{i}.png")
    page = root.parent / layout.PAGE   # where the page will be once published
    links = [("this remedied model's full report", remedied_run / layout.REPORT / "index.html"),
             ("the original run's report", _report_of(original_run)),
             ("comparison of the two runs", summary.get("compare") and Path(summary["compare"]))]
    links = [(label, os.path.relpath(p, page)) for label, p in links if p and Path(p).exists()]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_TEMPLATE).render(
        s=summary, csp=CSP, model_name=Path(summary["original_model"]).name, links=links,
        cues=("colour", "texture", "shape"), verdicts=_records(remedied_run, layout.VERDICTS),
        accuracy=_records(remedied_run, layout.ACCURACY), clusters=clusters,
        history=_records(remedied_run, layout.HISTORY), pct=_pct, signed=_signed, num=_num, ci=_ci)
    (root / "index.html").write_text(html, encoding="utf-8")
    (root / "style.css").write_text(_CSS, encoding="utf-8")
    store.publish_dir(layout.PAGE)
    return page / "index.html"


def _copy(run, relative, root, name):
    if not relative:
        return None
    source = Path(run) / relative
    if not source.is_file():
        return None
    shutil.copyfile(source, root / name)
    return name


def _report_of(run):
    from pipeline.storage.catalog import Catalog
    from pipeline.storage.store import RunStore

    info = Catalog(RunStore(run)).read("report_summary") or {}
    index = info.get("index") or (Path(info["out"]) / "index.html" if info.get("out") else None)
    return Path(index) if index else None
