// Static explorers of the bgem3 book (bgem3_lib/analysis/static_widgets.py writes their HTML and data).
// No kernel, no network: everything the page needs is in the page.
//
// Weight explorer (chapter 5): the page holds, per benchmark and language, every query's candidate scores
// (dense, sparse, ColBERT, float32) and its judgements. For weights w the score of a candidate is
// w_d*dense + w_s*sparse + w_c*colbert evaluated in float32 in that order (as bgem3_lib.retrieval.modes.fuse
// does in NumPy), a relevant candidate's rank counts the candidates scoring higher plus the equal ones in
// lower columns (the retriever's tie rule), and nDCG@k / Recall@k follow
// bgem3_lib.analysis.weight_search.evaluate_weights. The chart mirrors the chapter's matplotlib figure.
(function () {
  "use strict";
  const f32 = Math.fround;

  function decode(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }

  function prepare(set) {
    const d = decode(set.dense), s = decode(set.sparse), c = decode(set.colbert);
    const starts = [0];
    set.counts.forEach((n) => starts.push(starts[starts.length - 1] + n));
    return { d, s, c, starts, set };
  }

  // Mean metric over the queries of one set, for weights w (three numbers) and metric "ndcg@k" / "recall@k".
  function setMetric(p, w, metric) {
    const [kind, kText] = metric.split("@");
    const k = parseInt(kText, 10);
    const w0 = f32(w[0]), w1 = f32(w[1]), w2 = f32(w[2]);
    const { d, s, c, starts, set } = p;
    let total = 0;
    for (let q = 0; q < set.counts.length; q++) {
      const a = starts[q], n = set.counts[q];
      const score = new Float32Array(n);
      for (let j = 0; j < n; j++) {
        let x = f32(f32(w0 * d[a + j]) + f32(w1 * s[a + j]));
        score[j] = f32(x + f32(w2 * c[a + j]));
      }
      let value = 0;
      const cols = set.rel_cols[q], gains = set.rel_gains[q];
      for (let r = 0; r < cols.length; r++) {
        const own = score[cols[r]];
        let rank = 0;
        for (let j = 0; j < n; j++) {
          if (score[j] > own || (score[j] === own && j < cols[r])) rank++;
        }
        if (rank < k) value += kind === "ndcg" ? gains[r] / Math.log2(rank + 2) : (gains[r] > 0 ? 1 : 0);
      }
      if (kind === "ndcg") {
        let ideal = 0;
        const g = set.ideal[q];
        for (let i = 0; i < Math.min(k, g.length); i++) ideal += g[i] / Math.log2(i + 2);
        total += value / ideal;
      } else {
        total += value / set.n_relevant[q];
      }
    }
    return total / set.counts.length;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function el(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    for (const [key, v] of Object.entries(attrs || {})) e.setAttribute(key, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function draw(svg, labels, values, reference, metric, w) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const W = 900, H = 340, left = 60, right = 20, top = 40, bottom = 80;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);                   // scales with the page's width
    const sum = w[0] + w[1] + w[2];
    if (sum === 0) {
      svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "all three weights are 0: move a slider"));
      svg.dataset.values = "[]";
      return;
    }
    const lo = Math.min(...values, ...reference) - 0.05, hi = 1.0;
    const y = (v) => top + (H - top - bottom) * (hi - v) / (hi - lo);
    const step = (W - left - right) / values.length;
    for (let t = Math.ceil(lo * 10) / 10; t <= hi + 1e-9; t += 0.1) {
      svg.appendChild(el("line", { x1: left, x2: W - right, y1: y(t), y2: y(t), stroke: "#e5e5e5" }));
      svg.appendChild(el("text", { x: left - 6, y: y(t) + 4, "text-anchor": "end", "font-size": 11 }, t.toFixed(1)));
    }
    values.forEach((v, i) => {
      const x = left + i * step + step * 0.1;
      svg.appendChild(el("rect", { x, y: y(v), width: step * 0.8, height: Math.max(0, y(lo) - y(v)),
        fill: "#4c72b0", stroke: "black", "data-value": v }));
      svg.appendChild(el("line", { x1: x - step * 0.05, x2: x + step * 0.85, y1: y(reference[i]), y2: y(reference[i]),
        stroke: "black", "stroke-width": 2.5 }));
      svg.appendChild(el("text", { x: 0, y: 0, "font-size": 11, "text-anchor": "end",
        transform: `translate(${x + step * 0.4},${H - bottom + 14}) rotate(-45)` }, labels[i]));
    });
    const mean = values.reduce((a, b) => a + b, 0) / values.length;
    const refMean = reference.reduce((a, b) => a + b, 0) / reference.length;
    const ws = w.map((x) => x / sum);
    svg.appendChild(el("text", { x: W / 2, y: 20, "text-anchor": "middle", "font-size": 13, class: "bgem3-title" },
      `w = (${ws[0].toFixed(2)}, ${ws[1].toFixed(2)}, ${ws[2].toFixed(2)}): mean ${metric} ${mean.toFixed(3)} ` +
      `(paper's weights ${refMean.toFixed(3)})`));
    svg.appendChild(el("text", { x: 16, y: (top + H - bottom) / 2, "font-size": 12, "text-anchor": "middle",
      transform: `rotate(-90 16 ${(top + H - bottom) / 2})` }, metric));
    svg.appendChild(el("line", { x1: W - 190, x2: W - 170, y1: H - 20, y2: H - 20, stroke: "black", "stroke-width": 2.5 }));
    svg.appendChild(el("text", { x: W - 165, y: H - 16, "font-size": 11 }, "paper's all weights"));
    svg.dataset.values = JSON.stringify(values);
    svg.dataset.mean = String(mean);
  }

  function initExplorer(root) {
    const payload = JSON.parse(root.querySelector("script.bgem3-data").textContent);
    const sets = payload.sets.map(prepare);
    const sliders = [...root.querySelectorAll("input[data-weight]")];
    const buttons = [...root.querySelectorAll("button[data-metric]")];
    const svg = root.querySelector("svg.bgem3-chart");
    let metric = payload.metrics[0];
    function update() {
      const w = sliders.map((s) => parseFloat(s.value));
      sliders.forEach((s) => { s.nextElementSibling.textContent = parseFloat(s.value).toFixed(2); });
      const values = sets.map((p) => setMetric(p, w, metric));
      draw(svg, payload.labels, values, payload.reference_values[metric], metric, w);
      root.dataset.weights = JSON.stringify(w);
      root.dataset.metric = metric;
    }
    sliders.forEach((s) => s.addEventListener("input", update));
    buttons.forEach((b) => b.addEventListener("click", () => {
      metric = b.dataset.metric;
      buttons.forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
      update();
    }));
    root.bgem3 = { update, setMetric: (w, m) => sets.map((p) => setMetric(p, w, m)) };
    update();
  }

  function initSwitcher(root) {
    const names = JSON.parse(root.dataset.controls);
    const groups = names.map((n) => root.querySelector(`.bgem3-buttons[data-control="${CSS.escape(n)}"]`));
    const images = [...root.querySelectorAll("img[data-key]")];
    function show() {
      const key = JSON.stringify(groups.map((g) => g.querySelector("button[aria-pressed=true]").dataset.option));
      images.forEach((img) => { img.hidden = JSON.stringify(JSON.parse(img.dataset.key)) !== key; });
      root.dataset.shown = key;
    }
    groups.forEach((g) => g.querySelectorAll("button").forEach((b) => b.addEventListener("click", () => {
      g.querySelectorAll("button").forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
      show();
    })));
    show();
  }

  function init() {
    document.querySelectorAll(".bgem3-weight-explorer").forEach(initExplorer);
    document.querySelectorAll(".bgem3-image-switcher").forEach(initSwitcher);
  }
  if (typeof document !== "undefined") {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
    else init();
  }
  // Node (the test suite compares these numbers with bgem3_lib's): the pure part.
  if (typeof module !== "undefined" && module.exports) module.exports = { decode, prepare, setMetric };
})();
