// gradwatch's TensorBoard tab: layers (input at top) x steps heatmap of log10(metric), findings on the
// timeline, drill-downs (click a cell: that layer over time, and the depth profile at that step), runs
// side by side on one colour scale. Plain ES module, no dependencies: TensorBoard loads it in an iframe
// and calls render(). After drawing, each panel carries data-rows / data-cols / data-n-layers /
// data-n-steps and <body data-state="drawn">, so a test (or a person with devtools) can check what is shown.

const LABEL_W = 150;          // px for layer names left of the heatmap
const MAX_RUNS_DEFAULT = 4;
const REFRESH_MS = 30000;
const TB_DEFAULT_SAMPLES = 1000;  // tensorboard --samples_per_plugin scalars=N, default N     // how often the run list is checked for new steps   // runs drawn side by side when the tab opens (all, if there are no more)
// viridis, 9 stops: perceptually uniform and readable in grey scale
const STOPS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
  [92, 200, 99], [170, 220, 50], [253, 231, 37]];
const ZERO_RGB = [40, 40, 40];      // value <= 0: no logarithm (e.g. dead_frac = 0)
const MISSING_RGB = [238, 238, 238]; // no value collected there
const INF_RGB = [255, 0, 255];      // +inf / -inf

const state = { runs: [], selected: [], metric: null, agg: "median", panels: [], finding: null };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

async function getJSON(path, params) {
  const url = path + "?" + new URLSearchParams(params).toString();
  const resp = await fetch(url);
  const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}

function decodeF32(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

function colour(t) {  // t in [0, 1] -> [r, g, b]
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((c, j) => Math.round(c + f * (STOPS[i + 1][j] - c)));
}

function valueRGB(v, lo, hi) {
  if (Number.isNaN(v)) return MISSING_RGB;
  if (!Number.isFinite(v)) return INF_RGB;
  if (v <= 0) return ZERO_RGB;
  return colour((Math.log10(v) - lo) / (hi - lo));
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(2) : v.toPrecision(3);
}

export async function render() {
  const link = el("link", { rel: "stylesheet", href: "style.css" });
  document.head.append(link);
  document.body.dataset.state = "loading";
  const root = el("div", { id: "gw-root" });
  document.body.append(root);
  let listing;
  try {
    listing = await getJSON("runs", {});
  } catch (err) {
    root.append(el("div", { class: "gw-error" }, `gradwatch: ${err.message}`));
    document.body.dataset.state = "error";
    return;
  }
  state.runs = listing.runs;
  state.agg = listing.aggregates[0];
  if (!state.runs.length) {
    root.append(el("div", { class: "gw-empty" }, "No gradwatch runs yet: train with gradwatch.watch(model, log_dir=...) " +
      "or the Lightning GradWatchCallback, or run `gradwatch demo`."));
    document.body.dataset.state = "drawn";
    return;
  }
  state.selected = state.runs.length <= MAX_RUNS_DEFAULT ? state.runs.map((r) => r.run) : [state.runs[0].run];
  const metrics = [...new Set(state.runs.flatMap((r) => r.metrics))];
  state.metric = metrics.includes(listing.default_metric) ? listing.default_metric : metrics[0];

  const metricSel = el("select", { id: "gw-metric", onchange: (e) => { state.metric = e.target.value; draw(); } },
    ...metrics.map((m) => el("option", { value: m }, m)));
  metricSel.value = state.metric;
  const aggSel = el("select", { id: "gw-agg", onchange: (e) => { state.agg = e.target.value; draw(); } },
    ...listing.aggregates.map((a) => el("option", { value: a }, a)));
  const runBoxes = el("div", { class: "gw-runs" }, ...state.runs.map((r) => {
    const box = el("input", { type: "checkbox", value: r.run, "data-run": r.run, onchange: () => {
      state.selected = [...runBoxes.querySelectorAll("input:checked")].map((i) => i.value);
      draw();
    } });
    box.checked = state.selected.includes(r.run);
    return el("label", {}, box, " " + r.run);
  }));
  root.append(
    el("div", { class: "gw-controls" },
      el("label", {}, "metric", metricSel),
      el("label", { title: "what one cell shows when it covers several steps or layers" }, "cell value", aggSel),
      el("span", { class: "gw-note" }, "colour = log10(value); click a cell for its layer over time and the depth profile at that step")),
    el("div", { class: "gw-controls" }, el("label", {}, "runs"), runBoxes),
    el("div", { class: "gw-colorbar", id: "gw-colorbar" }),
    el("div", { class: "gw-panels", id: "gw-panels" }),
    el("div", { class: "gw-drill" },
      el("div", { class: "gw-chart", id: "gw-layer-chart" }),
      el("div", { class: "gw-chart", id: "gw-profile-chart" })),
  );
  window.addEventListener("resize", () => { clearTimeout(state.resizeTimer); state.resizeTimer = setTimeout(draw, 200); });
  await draw();
  setInterval(refresh, REFRESH_MS);
}

// A run still training gets new steps: redraw when a shown run's last step moved (finished runs never redraw).
async function refresh() {
  if (document.hidden) return;
  let listing;
  try { listing = await getJSON("runs", {}); } catch (err) { return; }
  const last = (runs) => JSON.stringify(runs.filter((r) => state.selected.includes(r.run)).map((r) => [r.run, r.last_step]));
  const changed = last(listing.runs) !== last(state.runs) || listing.runs.length !== state.runs.length;
  state.runs = listing.runs;
  if (changed) await draw();
}

async function draw() {
  const token = (state.drawToken = (state.drawToken || 0) + 1);
  document.body.dataset.state = "loading";
  const panels = document.getElementById("gw-panels");
  const runs = state.selected.filter((r) => state.runs.find((x) => x.run === r && x.metrics.includes(state.metric)));
  const n = Math.max(1, runs.length);
  const perRow = Math.min(n, Math.max(1, Math.floor(panels.clientWidth / 480)));
  const plotW = Math.max(200, Math.floor((panels.clientWidth - 16 * (perRow - 1)) / perRow) - LABEL_W - 4);
  const results = await Promise.all(runs.map(async (run) => {
    const info = state.runs.find((x) => x.run === run);
    const nLayers = info.layers[state.metric] || 1;
    const plotH = Math.min(720, Math.max(120, nLayers * 14));
    try {
      const [heat, findings] = await Promise.all([
        getJSON("heatmap", { run, metric: state.metric, agg: state.agg, width: plotW, height: plotH }),
        getJSON("findings", { run }),
      ]);
      return { run, heat, findings: findings.findings, plotW, plotH };
    } catch (err) {
      return { run, error: err.message };
    }
  }));
  if (token !== state.drawToken) return;  // a newer draw() started meanwhile
  // one colour scale for every run shown: a fix is visible as a colour change, not a rescaled legend
  const ranges = results.filter((r) => r.heat && r.heat.decades).map((r) => r.heat.decades);
  const lo = ranges.length ? Math.min(...ranges.map((d) => d[0])) : -1;
  const hi = ranges.length ? Math.max(...ranges.map((d) => d[1])) : 0;
  drawColorbar(lo, hi);
  panels.replaceChildren();
  if (!results.length) panels.append(el("div", { class: "gw-empty" }, `No selected run has ${state.metric}.`));
  state.panels = results.map((r) => drawPanel(panels, r, lo, hi));
  document.body.dataset.state = "drawn";
  document.body.dataset.metric = state.metric;
}

function drawColorbar(lo, hi) {
  const bar = document.getElementById("gw-colorbar");
  const c = el("canvas", { width: 320, height: 14, id: "gw-colorbar-canvas" });
  const ctx = c.getContext("2d");
  for (let x = 0; x < 320; x++) {
    const [r, g, b] = colour(x / 319);
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, 14);
  }
  const sw = (rgb) => el("span", { class: "gw-legend-swatch", style: `background: rgb(${rgb.join(",")})` });
  bar.replaceChildren(el("span", {}, `log10(${state.metric}):  1e${lo}`), c, el("span", {}, `1e${hi}`),
    el("span", { class: "gw-note" }, sw(ZERO_RGB), "≤ 0", sw(MISSING_RGB), "not collected", sw(INF_RGB), "inf"));
  bar.dataset.lo = lo;
  bar.dataset.hi = hi;
}

function drawPanel(parent, res, lo, hi) {
  const panel = el("div", { class: "gw-panel", "data-run": res.run });
  parent.append(panel);
  panel.append(el("h2", {}, res.run));
  if (res.error) {
    panel.append(el("div", { class: "gw-error" }, res.error));
    return null;
  }
  const h = res.heat;
  const [rows, cols] = h.shape;
  Object.assign(panel.dataset, { rows, cols, nLayers: h.n_layers, nSteps: h.n_steps, layersPerRow: h.layers_per_row,
    stepsPerColumn: h.steps_per_column });
  const steps = h.n_steps ? `steps ${h.step_first[0]}–${h.step_last[cols - 1]} (${h.n_steps} collected)` : "no steps";
  panel.append(el("div", { class: "gw-sub" }, `${h.n_layers} layers × ${steps}` +
    (h.layers_per_row > 1 || h.steps_per_column > 1 ? `; one cell = ${h.layers_per_row} layer(s) × ${h.steps_per_column} step(s), ${h.agg}` : "")));
  if (h.n_steps === TB_DEFAULT_SAMPLES) {  // TensorBoard's reservoir may have dropped steps
    panel.append(el("div", { class: "gw-note gw-samples" }, `TensorBoard keeps ${TB_DEFAULT_SAMPLES} steps per tag by default: ` +
      "if this run collected more, start it with --samples_per_plugin scalars=1000000 to see them all."));
  }
  const values = decodeF32(h.values);
  const cellH = Math.max(1, Math.floor(res.plotH / Math.max(1, rows)));
  const H = cellH * rows, W = res.plotW;
  Object.assign(panel.dataset, { cellH, labelW: LABEL_W });
  const canvas = el("canvas", { width: LABEL_W + W, height: H + 18, class: "gw-heatmap", "data-run": res.run });
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(W, H);
  for (let y = 0; y < H; y++) {
    const i = Math.min(rows - 1, Math.floor(y / cellH));
    for (let x = 0; x < W; x++) {
      const j = Math.min(cols - 1, Math.floor((x * cols) / W));
      const [r, g, b] = valueRGB(values[i * cols + j], lo, hi);
      const o = 4 * (y * W + x);
      img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, LABEL_W, 0);
  // findings: the layers the selected (default: latest) finding names are marked on the layer axis
  const findings = res.findings || [];
  const latest = findings.length ? findings[findings.length - 1] : null;
  const named = new Set((state.finding && state.finding.run === res.run ? state.finding.f : latest)?.layers || []);
  drawLayerAxis(ctx, h.rows, cellH, named);
  drawStepAxis(ctx, h, W, H);
  const wrap = el("div", { class: "gw-heat-wrap" });
  const markers = el("div", { class: "gw-markers", style: `margin-left: ${LABEL_W}px; width: ${W}px` });
  const first = h.step_first[0], last = h.step_last[cols - 1];
  for (const f of findings) {
    const x = last > first ? ((f.step - first) / (last - first)) * W : 0;
    const m = el("div", { class: "gw-marker" + (f.kinds.length ? "" : " gw-healthy"), style: `left: ${x}px`,
      title: f.headline, "data-step": f.step });
    m.addEventListener("click", () => { state.finding = { run: res.run, f }; draw().then(() => showFinding(res.run, f)); });
    markers.append(m);
  }
  panel.dataset.findings = findings.length;
  const tip = el("div", { class: "gw-tooltip" });
  wrap.append(canvas, tip);
  panel.append(markers, wrap);
  if (state.finding && state.finding.run === res.run) panel.append(el("div", { class: "gw-finding" }, state.finding.f.text));
  const cellAt = (ev) => {
    const rect = canvas.getBoundingClientRect();
    const x = ev.clientX - rect.left - LABEL_W, y = ev.clientY - rect.top;
    const i = Math.floor(y / cellH);
    if (i < 0 || i >= rows) return null;
    const j = x < 0 ? null : Math.min(cols - 1, Math.floor((x * cols) / W));
    return { i, j, x, y };
  };
  canvas.addEventListener("mousemove", (ev) => {
    const c = cellAt(ev);
    if (!c || c.j === null) { tip.style.display = "none"; return; }
    const row = h.rows[c.i];
    const layer = row.last_layer !== row.layer ? `${row.layer} … ${row.last_layer}` : row.layer;
    const s0 = h.step_first[c.j], s1 = h.step_last[c.j];
    tip.textContent = `${layer}\nstep ${s0 === s1 ? s0 : `${s0}–${s1}`}\n${state.metric} = ${fmt(values[c.i * cols + c.j])}`;
    Object.assign(tip.style, { display: "block", left: `${LABEL_W + c.x + 12}px`, top: `${c.y + 12}px` });
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  canvas.addEventListener("click", (ev) => {
    const c = cellAt(ev);
    if (!c) return;
    showLayer(res.run, h.rows[c.i].layer);
    if (c.j !== null) showProfile(res.run, h.step_first[c.j]);
  });
  return panel;
}

function drawLayerAxis(ctx, rows, cellH, named) {
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  const every = Math.max(1, Math.ceil(12 / cellH));  // a label every 12 px at least
  rows.forEach((row, i) => {
    const hit = named.has(row.layer);
    if (hit) {
      ctx.fillStyle = "#d32f2f";
      ctx.fillRect(LABEL_W - 5, i * cellH, 4, Math.max(1, cellH));
    }
    if (i % every && !hit) return;
    ctx.fillStyle = hit ? "#d32f2f" : "#333";
    let name = row.layer;
    while (ctx.measureText(name).width > LABEL_W - 10 && name.length > 4) name = "…" + name.slice(2);
    ctx.textAlign = "right";
    ctx.fillText(name, LABEL_W - 8, Math.max(6, i * cellH + cellH / 2));  // the first label stays whole
  });
}

function drawStepAxis(ctx, h, W, H) {
  const cols = h.shape[1];
  ctx.fillStyle = "#333";
  ctx.textBaseline = "top";
  const ticks = Math.max(2, Math.floor(W / 90));
  for (let t = 0; t < ticks; t++) {
    const x = Math.round((t / (ticks - 1)) * (W - 1));
    const j = Math.min(cols - 1, Math.floor((x * cols) / W));
    ctx.textAlign = t === 0 ? "left" : t === ticks - 1 ? "right" : "center";
    ctx.fillText(String(h.step_first[j]), LABEL_W + x, H + 3);
  }
}

function showFinding(run, f) {
  const panel = document.querySelector(`.gw-panel[data-run="${CSS.escape(run)}"]`);
  panel?.querySelector(".gw-finding")?.scrollIntoView({ block: "nearest" });
}

async function showLayer(run, layer) {
  const box = document.getElementById("gw-layer-chart");
  box.dataset.state = "loading";
  try {
    const d = await getJSON("layer", { run, layer });
    const series = Object.entries(d.series).map(([name, s]) => ({ name, steps: s.steps, values: s.values }));
    const shown = state.layerShown || (state.layerShown = new Set(DEFAULT_LAYER_SERIES));
    shown.add(state.metric);
    const redraw = () => logChart(box, `${layer} over time (${run})`, series, "step", false, shown, redraw);
    redraw();
    box.dataset.layer = layer;
    box.dataset.run = run;
    box.dataset.series = series.length;
    box.dataset.state = "drawn";
  } catch (err) {
    box.replaceChildren(el("div", { class: "gw-error" }, err.message));
    box.dataset.state = "error";
  }
}

async function showProfile(run, step) {
  const box = document.getElementById("gw-profile-chart");
  box.dataset.state = "loading";
  try {
    const d = await getJSON("profile", { run, metric: state.metric, step });
    const idx = d.layers.map((_, i) => i);
    logChart(box, `${state.metric} by depth at step ${d.step} (${run}): input left, output right`,
      [{ name: state.metric, steps: idx, values: d.values, labels: d.layers }], "layer (depth order)", true);
    box.dataset.step = d.step;
    box.dataset.state = "drawn";
  } catch (err) {
    box.replaceChildren(el("div", { class: "gw-error" }, err.message));
    box.dataset.state = "error";
  }
}

// the layer chart starts with these (and the heatmap's metric); the legend shows or hides any other
const DEFAULT_LAYER_SERIES = ["grad_norm", "grad_to_weight", "grad_max_abs", "update_ratio"];
const LINE_COLOURS = ["#1976d2", "#d32f2f", "#388e3c", "#f57c00", "#7b1fa2", "#0097a7", "#5d4037", "#c2185b", "#455a64", "#afb42b"];

// A small SVG chart with a log10 y axis (decade grid lines). Values <= 0 or missing are left out and counted.
function logChart(box, title, series, xlabel, bars, shown = null, redraw = null) {
  const all = series;
  if (shown) series = series.filter((s) => shown.has(s.name));
  const NS = "http://www.w3.org/2000/svg";
  const W = Math.max(400, box.clientWidth || 480), H = 260, L = 56, R = 10, T = 8, B = 34;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  const pos = series.flatMap((s) => s.values.filter((v) => v !== null && v > 0));
  const xs = series.flatMap((s) => s.steps);
  const skipped = series.reduce((n, s) => n + s.values.filter((v) => v === null || v <= 0).length, 0);
  const legend = el("div", { class: "gw-note gw-legend" });
  box.replaceChildren(el("h2", {}, title), svg, legend);
  box.dataset.visible = series.length;
  if (shown) {  // a legend entry per series; click to show or hide it
    all.forEach((s) => {
      const k = series.indexOf(s);
      const item = el("span", { class: "gw-legend-item" + (k < 0 ? " gw-off" : ""), "data-series": s.name,
        style: k < 0 ? "" : `color: ${LINE_COLOURS[k % LINE_COLOURS.length]}` }, `■ ${s.name}`);
      item.addEventListener("click", () => { if (shown.has(s.name)) shown.delete(s.name); else shown.add(s.name); redraw(); });
      legend.append(item);
    });
  }
  if (!pos.length) { legend.append(" no positive values to draw on a log axis"); return; }
  let lo = Math.floor(Math.log10(Math.min(...pos))), hi = Math.ceil(Math.log10(Math.max(...pos)));
  if (hi === lo) hi = lo + 1;
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  // bars: one band per x (0..n-1), so no bar hangs over the axis labels
  const px = bars ? (x) => L + ((x - x0 + 0.5) / (x1 - x0 + 1)) * (W - L - R) : (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (v) => T + (1 - (Math.log10(v) - lo) / (hi - lo)) * (H - T - B);
  const step = Math.max(1, Math.ceil((hi - lo) / 8));
  for (let d = lo; d <= hi; d += step) {
    add("line", { x1: L, x2: W - R, y1: py(10 ** d), y2: py(10 ** d), class: "grid" });
    add("text", { x: L - 4, y: py(10 ** d) + 4, "text-anchor": "end" }, `1e${d}`);
  }
  add("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  add("text", { x: px(x0), y: H - B + 14, "text-anchor": bars ? "middle" : "start" }, String(x0));
  add("text", { x: px(x1), y: H - B + 14, "text-anchor": bars ? "middle" : "end" }, String(x1));
  add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, xlabel);
  series.forEach((s, k) => {
    const colour = LINE_COLOURS[k % LINE_COLOURS.length];
    if (bars) {
      const bw = Math.max(1, ((W - L - R) / (x1 - x0 + 1)) * 0.8);
      s.steps.forEach((x, i) => {
        const v = s.values[i];
        if (v === null || v <= 0) return;
        const r = add("rect", { x: px(x) - bw / 2, y: py(v), width: bw, height: Math.max(0, H - B - py(v)), fill: colour });
        const t = document.createElementNS(NS, "title");
        t.textContent = `${s.labels ? s.labels[i] : x}: ${fmt(v)}`;
        r.append(t);
      });
    } else {
      let d = "", pen = false;  // a gap where a value has no logarithm
      s.steps.forEach((x, i) => {
        const v = s.values[i];
        if (v === null || v <= 0) { pen = false; return; }
        d += `${pen ? "L" : "M"}${px(x).toFixed(1)},${py(v).toFixed(1)} `;
        pen = true;
      });
      add("path", { d: d.trim(), fill: "none", stroke: colour, "stroke-width": 1.5, "data-series": s.name });
    }
  });
  if (skipped) legend.append(` (${skipped} zero or missing value(s) not drawn: no logarithm)`);
}
