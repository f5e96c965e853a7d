// The image viewer: /viewer?study=UID[&prior=UID].
//
// Loading, for slow links: the series thumbnail at once, then the quick lossy frame (WebP: for
// the opening slice /api/viewer/first, asked for by boot.js with the study's metadata; for others
// /dicomweb/.../frames/N/rendered), then the lossless packed frame (/api/pixels/...) that is
// windowed here with no round trip, then the rest of the series in order of distance from the
// slice shown, a few requests at a time. Every frame URL is immutable, so the browser's cache
// keeps what was loaded.
//
// Test hooks: document.body.dataset.ready = "1" once the first series is set up;
// window.__imx = {firstImageAt, seriesReadyAt, lastWindowMs} (performance.now() values) and a few
// functions (setWindow, showSlice, state); the image canvas is `#view canvas` (1:1 at zoom 1).

import { toLogin } from "../js/api.js";
import { PRIOR, STUDY, chooseSeries, lossyBlob, priorRequest, studyRequest } from "./boot.js";
import { applyI18n, formatNumber, onLocaleChange, t } from "../js/i18n.js";
import { el, errorText, fill, ready, say, startPage } from "../js/shell.js";
import { decodePacked, rangeWindow, renderFrame, tableWindow } from "./pixels.js";
import { PRESETS, SHORTCUTS, TOOLS, angle, angleText, length, lengthText, windowText } from "./tools.js";

const LOSSLESS_CONCURRENCY = 4;
const SVG = "http://www.w3.org/2000/svg";

const hooks = { firstImageAt: null, seriesReadyAt: null, lastWindowMs: null, firstLosslessAt: null };
window.__imx = hooks;

class HttpError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

const q = (s) => encodeURIComponent(s);
const thumbUrl = (study, series) => `/dicomweb/studies/${q(study)}/series/${q(series)}/thumbnail`;
const pixelsUrl = (study, s) => `/api/pixels/${q(study)}/${q(s.inst.series_uid)}/${q(s.inst.sop_uid)}/${s.frame}`;

// -- one viewport: a series, its slices, its window, zoom and measurements ----------------------
class Pane {
  constructor(root, studyUid, onSlice) {
    this.root = root;
    this.studyUid = studyUid;
    this.onSlice = onSlice;
    this.series = null;
    this.slices = [];
    this.index = 0;
    this.win = null; // {center, width, fn, invert}
    this.userWindow = false;
    this.zoom = 1;
    this.panX = 0;
    this.panY = 0;
    this.fitted = true;
    this.measures = new Map(); // slice key -> [{kind, points}]
    this.draft = null;
    this.lutCache = {};
    this.inflight = 0;
    this.generation = 0;
    this.build();
  }

  build() {
    this.placeholder = el("img", { class: "vw-placeholder", alt: "", hidden: true });
    this.canvas = el("canvas", { class: "vw-image", width: 1, height: 1 });
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.setAttribute("class", "vw-overlay");
    this.labels = {};
    for (const side of ["top", "bottom", "left", "right"]) this.labels[side] = el("span", { class: `vw-orient vw-${side}` });
    this.info = {
      tl: el("div", { class: "vw-info vw-tl" }),
      bl: el("div", { class: "vw-info vw-bl" }),
      br: el("div", { class: "vw-info vw-br" }),
    };
    this.stage = el("div", { class: "vw-stage" }, this.placeholder, this.canvas);
    fill(this.root, this.stage, this.svg, ...Object.values(this.labels), ...Object.values(this.info));
  }

  key(i = this.index) {
    const s = this.slices[i];
    return s ? `${s.inst.sop_uid}/${s.frame}` : "";
  }

  get current() {
    return this.slices[this.index];
  }

  setSeries(series) {
    this.generation += 1;
    this.series = series;
    this.slices = [];
    for (const inst of series.instances) for (let f = 1; f <= inst.frames; f++) this.slices.push({ inst, frame: f, lossless: null, lossy: null, loading: false, lossyLoading: false });
    this.index = 0;
    this.userWindow = false;
    this.win = null;
    this.fitted = true;
    this.measures.clear();
    this.placeholder.src = thumbUrl(this.studyUid, series.series_uid);
    this.placeholder.hidden = false;
    this.readyReported = false;
    this.show(0);
  }

  // -- loading --------------------------------------------------------------------------------
  loadLossy(i, then = () => {}) {
    const s = this.slices[i];
    if (!s || s.lossy || s.lossless || s.lossyLoading) return then();
    s.lossyLoading = true;
    const gen = this.generation;
    lossyBlob(this.studyUid, s.inst, s.frame, this.userWindow ? this.win : null)
      .then((b) => createImageBitmap(b))
      .then((bitmap) => {
        if (gen !== this.generation) return;
        s.lossy = bitmap;
        if (i === this.index && !s.lossless) this.draw();
      })
      .catch(() => {})
      .finally(() => {
        s.lossyLoading = false;
        if (gen === this.generation) then();
      });
  }

  loadLossless(i) {
    const s = this.slices[i];
    if (!s || s.lossless || s.loading) return null;
    s.loading = true;
    this.inflight += 1;
    const gen = this.generation;
    return fetch(pixelsUrl(this.studyUid, s), { credentials: "same-origin" })
      .then((r) => (r.ok ? decodePacked(r) : Promise.reject(new HttpError(r.status))))
      .then((frame) => {
        if (gen !== this.generation) return;
        s.lossless = frame;
        if (s.lossy) {
          s.lossy.close?.();
          s.lossy = null;
        }
        if (i === this.index) this.draw();
        this.progress();
      })
      .catch((e) => {
        s.failed = true;
        if (i === this.index) showError(e);
      })
      .finally(() => {
        s.loading = false;
        this.inflight -= 1;
        if (gen === this.generation) this.pump();
      });
  }

  /** Starts lossless loads, nearest to the slice shown first, while fewer than the limit run. */
  pump() {
    while (this.inflight < LOSSLESS_CONCURRENCY) {
      let best = -1;
      let bestDistance = Infinity;
      for (let i = 0; i < this.slices.length; i++) {
        const s = this.slices[i];
        if (s.lossless || s.loading || s.failed) continue;
        const d = Math.abs(i - this.index);
        if (d < bestDistance) {
          bestDistance = d;
          best = i;
        }
      }
      if (best < 0) return;
      this.loadLossless(best);
    }
  }

  progress() {
    const done = this.slices.filter((s) => s.lossless).length;
    if (this === panes.main) {
      document.getElementById("progress").textContent = t("viewer.loaded", { done: formatNumber(done), total: formatNumber(this.slices.length) });
      if (done === this.slices.length && !this.readyReported) {
        this.readyReported = true;
        hooks.seriesReadyAt = performance.now();
      }
    }
  }

  // -- showing --------------------------------------------------------------------------------
  show(i) {
    if (!this.slices.length) return;
    const n = Math.max(0, Math.min(this.slices.length - 1, i));
    const delta = n - this.index;
    this.index = n;
    const s = this.current;
    // On a slow link nothing shares the line with what is needed now: first the quick lossy
    // frame, then this slice's lossless pixels alone, and only then the neighbours (pump runs
    // when a lossless load ends).
    const lossless = () => {
      if (n !== this.index || !this.loadLossless(n)) this.pump();
    };
    if (!s.lossless && !s.lossy) this.loadLossy(n, lossless);
    else lossless();
    this.draw();
    if (delta && this.onSlice) this.onSlice(this, delta);
  }

  defaultWindow(frame) {
    const meta = this.current.inst;
    if (meta.windows && meta.windows.length) return { center: meta.windows[0][0], width: meta.windows[0][1], fn: meta.voi_function || "LINEAR" };
    if (frame && frame.voi) return tableWindow(frame);
    return frame ? rangeWindow(frame) : null;
  }

  setWindow(win, user = true) {
    this.win = { ...this.win, ...win, fn: win.fn || (this.win && this.win.fn) || "LINEAR", table: false };
    if (!(this.win.width > 0)) this.win.width = 1;
    if (this.win.fn === "LINEAR" && this.win.width < 1) this.win.width = 1;
    this.userWindow = user;
    this.draw();
  }

  draw() {
    const s = this.current;
    if (!s) return;
    const meta = s.inst;
    const image = s.lossless || s.lossy;
    if (!image) {
      this.placeholder.hidden = false;
      this.layout(meta.columns, meta.rows);
      this.overlay();
      return;
    }
    if (this.canvas.width !== meta.columns || this.canvas.height !== meta.rows) {
      this.canvas.width = meta.columns;
      this.canvas.height = meta.rows;
      this.imageData = null;
    }
    if (!this.win || !this.userWindow) {
      const d = this.defaultWindow(s.lossless);
      if (d) this.win = { ...d, invert: this.win ? this.win.invert : false };
    }
    if (this.win && this.win.invert === undefined) this.win.invert = false;
    const started = performance.now();
    if (s.lossless) {
      if (!this.imageData || this.imageData.width !== meta.columns || this.imageData.height !== meta.rows) this.imageData = this.ctx.createImageData(meta.columns, meta.rows);
      const win = this.win || rangeWindow(s.lossless);
      renderFrame(s.lossless, this.imageData, { ...win, invert: this.effectiveInvert() }, this.lutCache);
      this.ctx.putImageData(this.imageData, 0, 0);
      hooks.lastWindowMs = performance.now() - started;
      if (hooks.firstLosslessAt === null && this === panes.main) hooks.firstLosslessAt = performance.now();
    } else {
      this.ctx.drawImage(image, 0, 0, meta.columns, meta.rows);
      this.canvas.style.filter = "";
    }
    this.placeholder.hidden = true;
    if (hooks.firstImageAt === null && this === panes.main) hooks.firstImageAt = performance.now();
    this.layout(meta.columns, meta.rows);
    this.overlay();
  }

  effectiveInvert() {
    const meta = this.current.inst;
    return Boolean(meta.invert) !== Boolean(this.win && this.win.invert);
  }

  layout(cols, rows) {
    const box = this.root.getBoundingClientRect();
    if (this.fitted && box.width && box.height) {
      this.zoom = Math.min(box.width / cols, box.height / rows);
      this.panX = (box.width - cols * this.zoom) / 2;
      this.panY = (box.height - rows * this.zoom) / 2;
    }
    const tf = `translate(${this.panX}px, ${this.panY}px) scale(${this.zoom})`;
    this.canvas.style.transform = tf;
    this.placeholder.style.transform = tf;
    this.placeholder.style.width = `${cols}px`;
    this.placeholder.style.height = `${rows}px`;
    this.canvas.classList.toggle("pixelated", this.zoom >= 2);
  }

  fit() {
    this.fitted = true;
    this.draw();
  }

  actualSize() {
    const meta = this.current && this.current.inst;
    if (!meta) return;
    const box = this.root.getBoundingClientRect();
    this.fitted = false;
    this.zoom = 1;
    this.panX = Math.round((box.width - meta.columns) / 2);
    this.panY = Math.round((box.height - meta.rows) / 2);
    this.draw();
  }

  zoomBy(factor, cx, cy) {
    const box = this.root.getBoundingClientRect();
    const x = cx === undefined ? box.width / 2 : cx;
    const y = cy === undefined ? box.height / 2 : cy;
    const z = Math.max(0.05, Math.min(40, this.zoom * factor));
    this.panX = x - ((x - this.panX) * z) / this.zoom;
    this.panY = y - ((y - this.panY) * z) / this.zoom;
    this.zoom = z;
    this.fitted = false;
    this.draw();
  }

  reset() {
    this.userWindow = false;
    this.win = null;
    this.fitted = true;
    this.draw();
  }

  toImage(clientX, clientY) {
    const box = this.root.getBoundingClientRect();
    return { x: (clientX - box.left - this.panX) / this.zoom, y: (clientY - box.top - this.panY) / this.zoom };
  }

  toScreen(p) {
    return { x: p.x * this.zoom + this.panX, y: p.y * this.zoom + this.panY };
  }

  // -- overlay: orientation labels, corner text, measurements --------------------------------
  overlay() {
    const s = this.current;
    const meta = s ? s.inst : null;
    const o = meta && meta.orientation;
    for (const side of ["top", "bottom", "left", "right"]) this.labels[side].textContent = o ? o[side] : "";
    if (!meta) return;
    const lines = [];
    if (this.series.description) lines.push(this.series.description);
    lines.push(t("viewer.slice", { n: formatNumber(this.index + 1), total: formatNumber(this.slices.length) }));
    if (meta.frames > 1) lines.push(t("viewer.frame", { n: formatNumber(s.frame), total: formatNumber(meta.frames) }));
    fill(this.info.tl, lines.map((l) => el("div", { text: l })));
    fill(this.info.bl, this.win ? el("div", { class: "vw-window", text: windowText(this.win) }) : null, s.lossless ? null : el("div", { class: "vw-lossy", text: t("viewer.lossy") }));
    fill(this.info.br, el("div", { class: "vw-zoom", text: t("viewer.zoom_value", { value: formatNumber(Math.round(this.zoom * 100)) }) }));
    this.drawMeasures();
  }

  drawMeasures() {
    const meta = this.current.inst;
    while (this.svg.firstChild) this.svg.firstChild.remove();
    const list = [...(this.measures.get(this.key()) || [])];
    if (this.draft) list.push(this.draft);
    for (const m of list) {
      const points = m.hover && m.kind === "angle" && m.points.length === 2 ? [...m.points, m.hover] : m.points;
      const pts = points.map((p) => this.toScreen(p));
      const g = document.createElementNS(SVG, "g");
      g.setAttribute("class", `vw-measure vw-${m.kind}`);
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", pts.map((p) => `${p.x},${p.y}`).join(" "));
      g.append(line);
      let text = "";
      if (m.kind === "length" && m.points.length === 2) text = lengthText(length(m.points[0], m.points[1], meta));
      if (m.kind === "angle" && points.length === 3) text = angleText(angle(points[0], points[1], points[2], meta));
      if (text) {
        const last = pts[pts.length - 1];
        const label = document.createElementNS(SVG, "text");
        label.setAttribute("x", String(last.x + 6));
        label.setAttribute("y", String(last.y - 6));
        label.setAttribute("class", "vw-measure-label");
        label.textContent = text;
        g.append(label);
      }
      this.svg.append(g);
    }
  }

  addMeasure(m) {
    const k = this.key();
    if (!this.measures.has(k)) this.measures.set(k, []);
    this.measures.get(k).push(m);
  }

  clearMeasures() {
    this.measures.delete(this.key());
    this.draft = null;
    this.drawMeasures();
  }
}

// -- the page -----------------------------------------------------------------------------------
const panes = { main: null, prior: null, active: null };
const state = { tool: "window", sync: true, cine: null };

function showError(e) {
  const box = document.getElementById("viewer-error");
  if (!e) return say(box, "");
  if (e.status === 404) return say(box, t("viewer.error.not_found"));
  if (e.status === 401) return toLogin();
  say(box, e.status ? errorText({ status: e.status, detail: e.detail }) : t("viewer.error.load"));
}

function seriesList(study) {
  const list = document.getElementById("series-list");
  const items = study.series.map((s) => {
    const count = s.instances.reduce((n, i) => n + (i.frames || 1), 0);
    const button = el(
      "button",
      { type: "button", class: "vw-series-item", dataset: { series: s.series_uid }, on: { click: () => selectSeries(s) } },
      el("img", { src: thumbUrl(study.study_uid, s.series_uid), alt: "", loading: "lazy", width: 96, height: 96 }),
      el("span", { class: "vw-series-text", text: [s.modality, s.number ?? "", s.description].filter((x) => x !== "").join(" · ") }),
      el("span", { class: "vw-series-count", text: t("viewer.images_count", { n: formatNumber(count) }) }),
    );
    return button;
  });
  fill(list, el("h2", { class: "visually-hidden", i18n: "viewer.series" }), items);
}

function markSeries(uid) {
  for (const b of document.querySelectorAll(".vw-series-item")) b.setAttribute("aria-current", b.dataset.series === uid ? "true" : "false");
}

function selectSeries(series) {
  stopCine();
  panes.main.setSeries(series);
  markSeries(series.series_uid);
  if (!document.getElementById("tags").hidden) loadTags();
}

function onSlice(pane, delta) {
  // the prior follows the current study (scrolling the prior alone lines the two up)
  if (state.sync && panes.prior && pane === panes.main && !panes.prior.root.hidden) panes.prior.show(panes.prior.index + delta);
  if (pane === panes.main && !document.getElementById("tags").hidden) loadTags();
}

function setTool(id) {
  state.tool = id;
  for (const b of document.querySelectorAll(".vw-tool")) b.setAttribute("aria-pressed", b.dataset.tool === id ? "true" : "false");
  for (const p of [panes.main, panes.prior]) if (p) p.draft = null;
}

function applyPreset(id) {
  const pane = panes.active;
  if (!pane || !pane.current) return;
  if (id === "default") {
    const invert = pane.win ? pane.win.invert : false;
    pane.userWindow = false;
    pane.win = { ...pane.defaultWindow(pane.current.lossless), invert };
    pane.draw();
    return;
  }
  const p = PRESETS.find((x) => x.id === id);
  if (p) pane.setWindow({ center: p.center, width: p.width, fn: "LINEAR" });
}

function toggleInvert() {
  const pane = panes.active;
  if (!pane || !pane.current) return;
  const win = pane.win || pane.defaultWindow(pane.current.lossless) || { center: 0, width: 1 };
  pane.win = { ...win, invert: !(pane.win && pane.win.invert) };
  document.getElementById("invert").setAttribute("aria-pressed", pane.win.invert ? "true" : "false");
  pane.draw();
}

function stopCine() {
  if (state.cine) clearInterval(state.cine);
  state.cine = null;
  document.getElementById("cine").setAttribute("aria-pressed", "false");
}

function toggleCine() {
  if (state.cine) return stopCine();
  const pane = panes.active;
  if (!pane || pane.slices.length < 2) return;
  const ms = (pane.current && pane.current.inst.frame_time) || 1000 / 15;
  state.cine = setInterval(() => pane.show((pane.index + 1) % pane.slices.length), Math.max(20, ms));
  document.getElementById("cine").setAttribute("aria-pressed", "true");
}

function toggleHelp(show) {
  const help = document.getElementById("help");
  const open = show === undefined ? help.hidden : show;
  help.hidden = !open;
  document.getElementById("help-toggle").setAttribute("aria-pressed", open ? "true" : "false");
  if (open) document.getElementById("help-close").focus();
}

function helpList() {
  fill(
    document.getElementById("help-list"),
    SHORTCUTS.flatMap(([keys, what]) => [el("dt", {}, el("kbd", { text: keys })), el("dd", { i18n: what })]),
    el("dt", {}, el("kbd", { text: t("viewer.help.wheel_keys") })),
    el("dd", { i18n: "viewer.help.wheel" }),
  );
}

// -- the tag panel ------------------------------------------------------------------------------
function tagValue(v) {
  if (v.BulkDataURI) return "…";
  if (v.InlineBinary) return "…";
  if (!v.Value) return "";
  if (v.vr === "SQ") return t("viewer.tag.items", { n: formatNumber(v.Value.length) });
  return v.Value.map((x) => (x && typeof x === "object" ? x.Alphabetic || x.Ideographic || JSON.stringify(x) : String(x))).join("\\");
}

let tagsFor = null;
async function loadTags() {
  const pane = panes.main;
  const s = pane && pane.current;
  if (!s || tagsFor === s.inst.sop_uid) return;
  tagsFor = s.inst.sop_uid;
  const body = document.querySelector("#tags tbody");
  try {
    const url = `/dicomweb/studies/${q(pane.studyUid)}/series/${q(s.inst.series_uid)}/instances/${q(s.inst.sop_uid)}/metadata`;
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/dicom+json" } });
    if (!r.ok) throw new HttpError(r.status);
    const [item] = await r.json();
    if (tagsFor !== s.inst.sop_uid) return;
    fill(
      body,
      Object.entries(item).map(([tag, v]) => el("tr", {}, el("td", { class: "vw-tag", text: `(${tag.slice(0, 4)},${tag.slice(4)})` }), el("td", { text: v.vr || "" }), el("td", { text: tagValue(v) }))),
    );
  } catch (e) {
    tagsFor = null;
    fill(body, el("tr", {}, el("td", { colspan: 3, i18n: "viewer.error.tags" })));
  }
}

function toggleTags() {
  const tags = document.getElementById("tags");
  tags.hidden = !tags.hidden;
  document.getElementById("tags-toggle").setAttribute("aria-pressed", tags.hidden ? "false" : "true");
  if (!tags.hidden) loadTags();
  for (const p of [panes.main, panes.prior]) if (p) p.draw();
}

// -- pointer and keyboard -----------------------------------------------------------------------
function bindPane(pane) {
  const root = pane.root;
  let drag = null;
  let frameRequested = false;
  const redraw = () => {
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(() => {
      frameRequested = false;
      pane.draw();
    });
  };
  root.addEventListener("pointerdown", (e) => {
    panes.active = pane;
    for (const p of [panes.main, panes.prior]) if (p) p.root.classList.toggle("active", p === pane);
    if (!pane.current) return;
    root.setPointerCapture(e.pointerId);
    const tool = e.button === 2 ? "window" : e.button === 1 ? "pan" : state.tool;
    const start = { x: e.clientX, y: e.clientY, index: pane.index, win: pane.win ? { ...pane.win } : pane.defaultWindow(pane.current.lossless) };
    drag = { tool, start, last: { x: e.clientX, y: e.clientY } };
    if (tool === "length") pane.draft = { kind: "length", points: [pane.toImage(e.clientX, e.clientY), pane.toImage(e.clientX, e.clientY)] };
    if (tool === "angle") {
      const p = pane.toImage(e.clientX, e.clientY);
      if (pane.draft && pane.draft.kind === "angle" && pane.draft.points.length === 2) pane.draft.points.push(p);
      else pane.draft = { kind: "angle", points: [p, p] };
      pane.drawMeasures();
    }
    e.preventDefault();
  });
  root.addEventListener("pointermove", (e) => {
    if (!drag) {
      if (pane.draft && pane.draft.kind === "angle" && pane.draft.points.length === 2) {
        pane.draft.hover = pane.toImage(e.clientX, e.clientY); // the second arm follows the pointer
        pane.drawMeasures();
      }
      return;
    }
    const dx = e.clientX - drag.last.x;
    const dy = e.clientY - drag.last.y;
    drag.last = { x: e.clientX, y: e.clientY };
    if (drag.tool === "window" && drag.start.win) {
      const frame = pane.current.lossless;
      const span = frame ? Math.abs((frame.high - frame.low) * frame.slope) : 4096;
      const k = Math.max(span / 1024, 0.05);
      const totalX = e.clientX - drag.start.x;
      const totalY = e.clientY - drag.start.y;
      pane.win = { ...drag.start.win, table: false, invert: pane.win ? pane.win.invert : false, center: drag.start.win.center + totalY * k, width: Math.max(1, drag.start.win.width + totalX * k) };
      pane.userWindow = true;
      redraw();
    } else if (drag.tool === "pan") {
      pane.panX += dx;
      pane.panY += dy;
      pane.fitted = false;
      redraw();
    } else if (drag.tool === "zoom") {
      pane.zoomBy(Math.exp(-dy / 200), drag.start.x - root.getBoundingClientRect().left, drag.start.y - root.getBoundingClientRect().top);
    } else if (drag.tool === "scroll") {
      pane.show(drag.start.index + Math.round((e.clientY - drag.start.y) / 8));
    } else if (drag.tool === "length" && pane.draft) {
      pane.draft.points[1] = pane.toImage(e.clientX, e.clientY);
      pane.drawMeasures();
    } else if (drag.tool === "angle" && pane.draft) {
      pane.draft.points[pane.draft.points.length - 1] = pane.toImage(e.clientX, e.clientY);
      pane.drawMeasures();
    }
  });
  const end = (e) => {
    if (!drag) return;
    if (drag.tool === "length" && pane.draft) {
      pane.draft.points[1] = pane.toImage(e.clientX, e.clientY);
      const [a, b] = pane.draft.points;
      if (Math.hypot(a.x - b.x, a.y - b.y) > 0.5) pane.addMeasure(pane.draft);
      pane.draft = null;
      pane.drawMeasures();
    }
    if (drag.tool === "angle" && pane.draft) {
      pane.draft.points[pane.draft.points.length - 1] = pane.toImage(e.clientX, e.clientY);
      if (pane.draft.points.length === 3) {
        delete pane.draft.hover;
        pane.addMeasure(pane.draft);
        pane.draft = null;
      }
      pane.drawMeasures();
    }
    drag = null;
  };
  root.addEventListener("pointerup", end);
  root.addEventListener("pointercancel", end);
  root.addEventListener("contextmenu", (e) => e.preventDefault());
  root.addEventListener(
    "wheel",
    (e) => {
      e.preventDefault();
      panes.active = pane;
      if (e.ctrlKey) {
        const box = root.getBoundingClientRect();
        pane.zoomBy(e.deltaY < 0 ? 1.1 : 1 / 1.1, e.clientX - box.left, e.clientY - box.top);
      } else if (e.deltaY) pane.show(pane.index + (e.deltaY > 0 ? 1 : -1));
    },
    { passive: false },
  );
}

function onKey(e) {
  if (e.target.closest && e.target.closest("input, select, textarea")) return;
  if (e.altKey || e.metaKey || e.ctrlKey) return;
  const pane = panes.active;
  const help = document.getElementById("help");
  if (e.key === "Escape") {
    if (!help.hidden) toggleHelp(false);
    else if (pane) {
      pane.draft = null;
      pane.drawMeasures();
    }
    return;
  }
  if (e.key === "?") return toggleHelp();
  if (!help.hidden || !pane) return;
  const k = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  const tool = TOOLS.find((x) => x.key === k);
  const preset = PRESETS.find((x) => x.key === k);
  const actions = {
    ArrowDown: () => pane.show(pane.index + 1),
    ArrowRight: () => pane.show(pane.index + 1),
    PageDown: () => pane.show(pane.index + Math.max(1, Math.round(pane.slices.length / 10))),
    ArrowUp: () => pane.show(pane.index - 1),
    ArrowLeft: () => pane.show(pane.index - 1),
    PageUp: () => pane.show(pane.index - Math.max(1, Math.round(pane.slices.length / 10))),
    Home: () => pane.show(0),
    End: () => pane.show(pane.slices.length - 1),
    i: toggleInvert,
    f: () => pane.fit(),
    1: () => pane.actualSize(),
    r: () => pane.reset(),
    c: toggleCine,
    t: toggleTags,
    y: toggleSync,
    0: () => applyPreset("default"),
    Delete: () => pane.clearMeasures(),
    Backspace: () => pane.clearMeasures(),
  };
  if (tool) setTool(tool.id);
  else if (preset) applyPreset(preset.id);
  else if (actions[k]) actions[k]();
  else return;
  e.preventDefault();
}

function toggleSync() {
  state.sync = !state.sync;
  document.getElementById("sync").setAttribute("aria-pressed", state.sync ? "true" : "false");
}

function bindToolbar() {
  for (const b of document.querySelectorAll(".vw-tool")) b.addEventListener("click", () => setTool(b.dataset.tool));
  const preset = document.getElementById("preset");
  preset.addEventListener("change", () => {
    if (preset.value) applyPreset(preset.value);
    preset.value = "";
  });
  document.getElementById("invert").addEventListener("click", toggleInvert);
  document.getElementById("fit").addEventListener("click", () => panes.active && panes.active.fit());
  document.getElementById("actual").addEventListener("click", () => panes.active && panes.active.actualSize());
  document.getElementById("reset").addEventListener("click", () => panes.active && panes.active.reset());
  document.getElementById("clear").addEventListener("click", () => panes.active && panes.active.clearMeasures());
  document.getElementById("cine").addEventListener("click", toggleCine);
  document.getElementById("sync").addEventListener("click", toggleSync);
  document.getElementById("tags-toggle").addEventListener("click", toggleTags);
  document.getElementById("help-toggle").addEventListener("click", () => toggleHelp());
  document.getElementById("help-close").addEventListener("click", () => toggleHelp(false));
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", () => {
    for (const p of [panes.main, panes.prior]) if (p && p.current) p.draw();
  });
}

// -- start ----------------------------------------------------------------------------------------
async function main() {
  panes.main = new Pane(document.getElementById("view"), STUDY, onSlice);
  panes.active = panes.main;
  bindPane(panes.main);
  bindToolbar();
  hooks.setWindow = (center, width, fn = "LINEAR") => (panes.active || panes.main).setWindow({ center, width, fn });
  hooks.showSlice = (i) => panes.main.show(i);
  hooks.actualSize = () => panes.main.actualSize();
  hooks.state = () => {
    const p = panes.main;
    const s = p.current;
    return {
      index: p.index,
      slices: p.slices.length,
      zoom: p.zoom,
      window: p.win,
      lossless: Boolean(s && s.lossless),
      loaded: p.slices.filter((x) => x.lossless).length,
      sop_uid: s ? s.inst.sop_uid : null,
      series_uid: p.series ? p.series.series_uid : null,
      frame: s ? s.frame : null,
    };
  };
  if (!STUDY) {
    await startPage();
    say(document.getElementById("viewer-error"), t("viewer.error.no_study"));
    ready();
    return;
  }
  const who = startPage();
  let study;
  try {
    study = await studyRequest;
  } catch (e) {
    await who;
    showError(e);
    ready();
    return;
  }
  const first = chooseSeries(study);
  if (first) {
    panes.main.setSeries(first); // the first image does not wait for the page's strings
    markSeries(first.series_uid);
  }
  await who;
  helpList();
  seriesList(study);
  if (panes.main.current) panes.main.draw(); // its corner texts, now in the page's language
  if (first) markSeries(first.series_uid);
  else showError(new HttpError(404));
  if (priorRequest) {
    try {
      const prior = await priorRequest;
      const series = chooseSeries(prior, first);
      if (series) {
        const root = document.getElementById("prior-view");
        root.hidden = false;
        document.getElementById("panes").classList.add("two");
        document.getElementById("sync").hidden = false;
        panes.prior = new Pane(root, PRIOR, onSlice);
        bindPane(panes.prior);
        panes.prior.setSeries(series);
        panes.main.draw();
      }
    } catch (e) {
      showError(e);
    }
  }
  onLocaleChange(() => {
    helpList();
    seriesList(study);
    for (const p of [panes.main, panes.prior]) if (p && p.current) p.draw();
  });
  applyI18n();
  ready();
}

main().catch((e) => {
  showError(e);
  ready();
});
