/* pipeline report: the interactive maps of a layer page.
 *
 * Reads the specs that explorer/<layer>.js pushed onto window.PIPELINE_EXPLORER and draws each with
 * BokehJS (js/bokeh.min.js). Everything else is plain DOM: the colour menu and legend, the hover
 * card (dataset thumbnail from a sprite sheet, or a unit's maximization image and top images), the
 * list of selected images, the jump to a unit's card. No network, no eval, no inline script; text
 * from the run (class names) is only ever set with textContent.
 */
(function () {
  "use strict";

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  function fmt(v, digits) {
    return v == null || !isFinite(v) ? "—" : Number(v).toFixed(digits == null ? 2 : digits);
  }

  /* A dataset thumbnail cut out of its sprite sheet: an <img> of the sheet in a clipping box. */
  function sprite(meta, pos, scale) {
    const sp = meta.sprites;
    if (!sp || !sp.sheets || pos == null || pos < 0) return el("span", "xp-noimg", "no thumbnail");
    const sheet = Math.floor(pos / sp.per_sheet), cell = pos % sp.per_sheet;
    const col = cell % sp.columns, row = Math.floor(cell / sp.columns);
    const box = el("span", "xp-sprite");
    box.style.width = sp.width * scale + "px";
    box.style.height = sp.height * scale + "px";
    const img = el("img", meta.pixelated ? "px" : "");
    img.alt = "";
    img.src = sp.url.replace("{k}", String(sheet));
    img.style.width = sp.columns * sp.width * scale + "px";
    img.style.left = -col * sp.width * scale + "px";
    img.style.top = -row * sp.height * scale + "px";
    box.appendChild(img);
    return box;
  }

  function legend(box, option) {
    box.replaceChildren();
    if (!option) return;
    if (option.kind === "categorical") {
      const n = option.labels.length, shown = Math.min(n, 24);
      for (let k = 0; k < shown; k++) {
        const item = el("span", "xp-key");
        const sw = el("span", "xp-swatch");
        sw.style.background = option.palette[k];
        item.append(sw, document.createTextNode(option.labels[k]));
        box.appendChild(item);
      }
      if (n > shown) box.appendChild(el("span", "xp-key muted", "+" + (n - shown) + " more"));
      const none = el("span", "xp-key");
      const sw = el("span", "xp-swatch");
      sw.style.background = option.low_color;
      none.append(sw, document.createTextNode(option.none || "none"));
      box.appendChild(none);
    } else {
      const bar = el("span", "xp-gradient");
      const p = option.palette, stops = [];
      for (let i = 0; i < p.length; i += 32) stops.push(p[i]);
      stops.push(p[p.length - 1]);
      bar.style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
      box.append(el("span", "xp-key", fmt(option.low, 3)), bar, el("span", "xp-key", fmt(option.high, 3)),
                 el("span", "xp-key muted", "(2nd–98th percentile)"));
    }
  }

  function recolour(doc, meta, option) {
    const mapper = doc.get_model_by_name(meta.mapper);
    mapper.setv({palette: option.palette, low: option.low, high: option.high,
                 low_color: option.low_color, high_color: option.high_color});
    const spec = {field: option.column, transform: mapper};
    for (const name of meta.renderers) {
      const r = doc.get_model_by_name(name);
      for (const g of [r.glyph, r.selection_glyph, r.nonselection_glyph, r.hover_glyph]) {
        if (g && typeof g === "object" && g.properties && g.properties.fill_color) g.fill_color = spec;
      }
    }
  }

  function controls(box, doc, meta) {
    const bar = box.querySelector(".xp-controls");
    const keys = el("div", "xp-legend");
    if (meta.colours.length) {
      const label = el("label", "xp-label", "Colour by ");
      const select = el("select");
      meta.colours.forEach(function (o, i) { const opt = el("option", null, o.label); opt.value = String(i); select.appendChild(opt); });
      select.addEventListener("change", function () {
        const option = meta.colours[Number(select.value)];
        recolour(doc, meta, option);
        legend(keys, option);
        box.dataset.colour = option.column;
      });
      label.appendChild(select);
      bar.appendChild(label);
      legend(keys, meta.colours[0]);
      box.dataset.colour = meta.colours[0].column;
    }
    bar.appendChild(keys);
  }

  /* The card that follows the pointer while it is over a point. */
  function hoverCard(box, src, meta) {
    const card = el("div", "xp-card");
    card.hidden = true;
    document.body.appendChild(card);
    let mouse = {x: 0, y: 0};
    const plot = box.querySelector(".xp-plot");
    plot.addEventListener("mousemove", function (e) { mouse = {x: e.clientX, y: e.clientY}; place(); });
    plot.addEventListener("mouseleave", function () { card.hidden = true; box.dataset.hover = ""; });
    function place() {
      if (card.hidden) return;
      const w = card.offsetWidth, h = card.offsetHeight;
      let x = mouse.x + 16, y = mouse.y + 16;
      if (x + w > window.innerWidth - 8) x = mouse.x - w - 16;
      if (y + h > window.innerHeight - 8) y = Math.max(8, window.innerHeight - h - 8);
      card.style.left = x + "px";
      card.style.top = y + "px";
    }
    src.inspect.connect(function () {
      const hits = src.inspected.indices;
      if (!hits.length) { card.hidden = true; box.dataset.hover = ""; return; }
      const row = hits[0];
      card.replaceChildren();
      if (meta.kind === "images") imageCard(card, src, meta, row);
      else unitCard(card, meta, row);
      if (hits.length > 1) card.appendChild(el("div", "xp-more", "+" + (hits.length - 1) + " more under the pointer"));
      card.hidden = false;
      box.dataset.hover = String(row);
      place();
    });
    return card;
  }

  function imageCard(card, src, meta, row) {
    const d = src.data;
    const index = d.i[row];
    card.appendChild(sprite(meta, d.s[row], 2));
    const label = d.c_class != null ? d.c_class[row] : -1;
    const name = label >= 0 ? (meta.classes[String(label)] || "class " + label) : "unlabelled";
    card.appendChild(el("div", "xp-title", "image " + index));
    card.appendChild(el("div", "xp-line", name));
    if (d.c_pred != null) {
      const opt = meta.colours.find(function (o) { return o.column === "c_pred"; });
      const p = d.c_pred[row];
      card.appendChild(el("div", "xp-line", "→ " + (opt && opt.labels[p] != null ? opt.labels[p] : p) +
                          (d.c_conf != null ? " (" + fmt(d.c_conf[row]) + ")" : "")));
    }
    if (d.c_cluster != null && d.c_cluster[row] >= 0) card.appendChild(el("div", "xp-line muted", "most active: cluster " + d.c_cluster[row]));
    card.dataset.index = String(index);
  }

  function unitCard(card, meta, row) {
    const u = meta.units[row];
    if (u.img) { const img = el("img", "xp-max"); img.alt = ""; img.src = u.img; card.appendChild(img); }
    else card.appendChild(el("span", "xp-noimg", "not rendered"));
    card.appendChild(el("div", "xp-title", "unit " + u.channel + (u.cluster != null ? " · cluster " + u.cluster : "")));
    if (u.top_class) card.appendChild(el("div", "xp-line", "prefers " + u.top_class + " (selectivity " + fmt(u.selectivity) + ")"));
    if (u.top.length) {
      const strip = el("div", "xp-top");
      for (const s of u.top) { const img = el("img", meta.pixelated ? "px" : ""); img.alt = ""; img.src = s; strip.appendChild(img); }
      card.appendChild(strip);
    }
    if (u.href) card.appendChild(el("div", "xp-line muted", "click to open its card"));
    card.dataset.channel = String(u.channel);
  }

  /* Box / lasso selection: how many, which classes, the first thumbnails, every index to copy. */
  function selectionList(box, src, meta) {
    const panel = box.querySelector(".xp-selection");
    if (!panel) return;
    const LIMIT = 120;
    src.selected.properties.indices.change.connect(function () {
      const rows = src.selected.indices;
      panel.replaceChildren();
      box.dataset.selected = String(rows.length);
      if (!rows.length) { panel.hidden = true; return; }
      panel.hidden = false;
      const d = src.data;
      const head = el("div", "xp-selhead");
      head.appendChild(el("b", null, rows.length + " image" + (rows.length === 1 ? "" : "s") + " selected"));
      const clear = el("button", "xp-clear", "clear");
      clear.type = "button";
      clear.addEventListener("click", function () { src.selected.indices = []; });
      head.appendChild(clear);
      panel.appendChild(head);
      if (d.c_class != null) {
        const counts = new Map();
        for (const r of rows) counts.set(d.c_class[r], (counts.get(d.c_class[r]) || 0) + 1);
        const line = el("div", "xp-counts");
        Array.from(counts.entries()).sort(function (a, b) { return b[1] - a[1]; }).slice(0, 12).forEach(function (kv) {
          const name = kv[0] >= 0 ? (meta.classes[String(kv[0])] || "class " + kv[0]) : "unlabelled";
          line.appendChild(el("span", "chip", name + ": " + kv[1]));
        });
        panel.appendChild(line);
      }
      const grid = el("div", "xp-grid");
      const sorted = Array.from(rows).sort(function (a, b) { return d.i[a] - d.i[b]; });
      for (const r of sorted.slice(0, LIMIT)) {
        const fig = el("figure", "xp-cell");
        fig.appendChild(sprite(meta, d.s[r], 1));
        const label = d.c_class != null && d.c_class[r] >= 0 ? (meta.classes[String(d.c_class[r])] || "") : "";
        fig.appendChild(el("figcaption", null, "#" + d.i[r]));
        fig.title = "image " + d.i[r] + (label ? " · " + label : "");
        grid.appendChild(fig);
      }
      panel.appendChild(grid);
      if (rows.length > LIMIT) panel.appendChild(el("p", "muted small", "First " + LIMIT + " shown, by index."));
      const text = el("textarea", "xp-indices");
      text.readOnly = true;
      text.rows = 2;
      text.value = sorted.map(function (r) { return d.i[r]; }).join(", ");
      const cap = el("label", "small muted", "Dataset indices (rows of dataset.parquet), to copy into a notebook:");
      panel.append(cap, text);
    });
  }

  /* Neuron maps: a click on a unit opens its card in the unit gallery. */
  function clickToCard(src, meta) {
    src.selected.properties.indices.change.connect(function () {
      const rows = src.selected.indices;
      if (rows.length !== 1) return;
      const u = meta.units[rows[0]];
      if (u && u.href) window.location.href = u.href;
    });
  }

  function mount(spec) {
    const box = document.getElementById(spec.target);
    if (!box) return;
    const status = box.querySelector(".xp-status");
    const t0 = performance.now();
    Bokeh.embed.embed_item(spec.item, spec.target + "-plot").then(function () {
      const doc = Bokeh.documents.find(function (d) { return d.get_model_by_id(spec.item.root_id) != null; });
      const src = doc.get_model_by_name(spec.meta.source);
      controls(box, doc, spec.meta);
      hoverCard(box, src, spec.meta);
      if (spec.meta.kind === "images") selectionList(box, src, spec.meta);
      else clickToCard(src, spec.meta);
      if (status) status.hidden = true;
      box.dataset.ready = String(Math.round(performance.now() - t0));
    }).catch(function (err) {
      if (status) status.textContent = "The interactive view could not be drawn (" + err + "); the figures below show the same maps.";
      box.dataset.ready = "failed";
      console.error(err);
    });
  }

  (window.PIPELINE_EXPLORER || []).forEach(mount);
})();
