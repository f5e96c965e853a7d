// The worklist: upcoming consultations with filters; times come formatted by the server in the
// user's language, in the user's zone and in the partner's.

import { api } from "../api.js";
import { browserZone, formatDateTime, locale, onLocaleChange, tn } from "../i18n.js";
import { el, errorText, fill, partnerOptions, ready, say, startPage, statusBadge } from "../shell.js";

const FILTERS = ["status", "partner", "modality", "from", "to"];
const form = document.getElementById("filters");
const table = document.getElementById("worklist");
const tbody = table.querySelector("tbody");
const errorBox = document.getElementById("worklist-error");

function filtersFromUrl() {
  const q = new URLSearchParams(location.search);
  for (const f of FILTERS) if (q.has(f)) form.elements[f].value = q.get(f);
}

function query() {
  const q = new URLSearchParams();
  for (const f of FILTERS) {
    const v = form.elements[f].value;
    if (v) q.set(f, v);
  }
  return q;
}

/** The scheduled time in one zone: the server's display string, else the browser's formatting. */
export function timeCell(item, which) {
  const s = item.scheduled && item.scheduled[which];
  if (s && s.display) return [el("span", { class: "time", text: s.display }), el("span", { class: "zone", text: s.zone || "" })];
  if (!item.scheduled_at) return [el("span", { class: "muted", i18n: "worklist.unscheduled" })];
  const zone = which === "partner" ? item.partner && item.partner.time_zone : undefined;
  return [el("span", { class: "time", text: formatDateTime(item.scheduled_at, { timeZone: zone }) }), el("span", { class: "zone", text: zone || "" })];
}

export function readyCell(ready) {
  return ready
    ? el("span", { class: "ready-yes" }, "✓ ", el("span", { i18n: "images.ready" }))
    : el("span", { class: "ready-no" }, "… ", el("span", { i18n: "images.incomplete" }));
}

function studiesCell(studies) {
  const modalities = [...new Set(studies.flatMap((s) => s.modalities || []))].join(", ");
  return el("span", {}, modalities, " ", el("span", { class: "muted small", text: `(${tn("worklist.n_studies", studies.length)})` }));
}

function row(item) {
  const studies = item.studies || [];
  return el(
    "tr",
    { dataset: { id: String(item.id), status: item.status } },
    el("td", {}, timeCell(item, "viewer")),
    el("td", {}, timeCell(item, "partner")),
    el("td", { text: (item.partner && item.partner.name) || "" }),
    el("td", { text: (item.patient && item.patient.pseudonym) || "" }),
    el("td", {}, studiesCell(studies)),
    el("td", { class: "question", text: item.question || "" }),
    el("td", { text: (item.specialists || []).join(", ") }),
    el("td", {}, statusBadge(item.status)),
    el("td", {}, readyCell(item.images_ready)),
    el("td", {}, el("a", { href: `/consultations/${item.id}`, class: "open", i18n: "worklist.open" })),
  );
}

let latest = 0; // answers can arrive out of order (a reset and a submit in a row): the last asked wins

async function load() {
  const q = query();
  const filters = q.toString();
  history.replaceState(null, "", filters ? `?${filters}` : location.pathname);
  q.set("locale", locale());
  if (browserZone()) q.set("tz", browserZone());
  const mine = ++latest;
  try {
    const data = await api(`/api/worklist?${q}`);
    if (mine !== latest) return;
    const items = (data && data.items) || [];
    fill(tbody, items.map(row));
    document.getElementById("worklist-empty").hidden = items.length > 0;
    say(errorBox, "");
  } catch (err) {
    if (mine !== latest) return;
    fill(tbody);
    say(errorBox, errorText(err));
  }
  table.dataset.shown = filters; // the filters the rows on screen answer
}

const who = await startPage();
if (who.role !== "partner") await partnerOptions(form.elements.partner);
filtersFromUrl();
if (who.role === "partner" || who.role === "admin") document.getElementById("new-consultation").hidden = false;
if (who.role === "partner") form.elements.partner.closest("label").hidden = true;
form.addEventListener("submit", (e) => {
  e.preventDefault();
  load();
});
form.addEventListener("reset", () => setTimeout(load));
onLocaleChange(load);
await load();
ready();
