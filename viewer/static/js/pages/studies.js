// The study list (all studies for admins, a hospital's own for its users) and, for a hospital's
// users and admins, the form that requests a consultation on the studies picked in it.

import { api } from "../api.js";
import { applyI18n, formatDateTime, formatNumber, locale, onLocaleChange, t, tn } from "../i18n.js";
import { el, errorText, fill, partnerOptions, ready, say, startPage } from "../shell.js";
import { shareButton } from "../share.js";

const PAGE = 50;
const $ = (x) => document.getElementById(x);
const form = $("study-filters");
const picked = new Map(); // study uid -> patient pseudonym
let offset = 0;
let canRequest = false;

function pickBox(s) {
  const box = el("input", {
    type: "checkbox",
    class: "pick",
    value: s.study_uid,
    checked: picked.has(s.study_uid),
    i18nAriaLabel: "studies.col.pick",
    on: {
      change: (e) => {
        if (e.target.checked) picked.set(s.study_uid, s.patient);
        else picked.delete(s.study_uid);
        showPicked();
      },
    },
  });
  return box;
}

function row(s) {
  return el(
    "tr",
    { dataset: { study: s.study_uid, partner: s.partner || "" } },
    el("td", { class: "pick-col" }, canRequest ? pickBox(s) : null),
    el("td", { text: s.study_date_display || s.study_date || "" }),
    el("td", { text: s.patient || "" }),
    el("td", { text: s.partner || "" }),
    el("td", { text: s.description || "" }),
    el("td", { text: (s.modalities || []).join(", ") }),
    el("td", { class: "num", text: formatNumber(s.num_series || 0) }),
    el("td", { class: "num", text: formatNumber(s.num_instances || 0) }),
    el("td", { class: "small", text: formatDateTime(s.received_at) }),
    el("td", {}, el("a", { class: "button open-viewer", href: `/viewer?study=${encodeURIComponent(s.study_uid)}`, i18n: "study.open" }), " ", shareButton(s.study_uid)),
  );
}

function showPicked() {
  const patients = new Set(picked.values());
  $("nc-picked").textContent = picked.size
    ? tn("new.picked", picked.size) + (patients.size > 1 ? ` ${t("new.one_patient")}` : "")
    : t("new.none_picked");
  $("nc-submit").disabled = picked.size === 0;
}

async function load() {
  const q = new URLSearchParams({ limit: String(PAGE), offset: String(offset), locale: locale() });
  for (const f of ["q", "partner", "modality"]) if (form.elements[f].value.trim()) q.set(f, form.elements[f].value.trim());
  try {
    const data = await api(`/api/studies?${q}`);
    const rows = data.studies || [];
    fill(document.querySelector("#studies tbody"), rows.map(row));
    $("studies-empty").hidden = rows.length > 0;
    $("prev-page").disabled = offset === 0;
    $("next-page").disabled = rows.length < PAGE;
    $("page-info").textContent = rows.length ? t("pager.range", { from: formatNumber(offset + 1), to: formatNumber(offset + rows.length) }) : "";
    say($("studies-error"), "");
  } catch (err) {
    say($("studies-error"), errorText(err));
  }
}

async function request(e) {
  e.preventDefault();
  const msg = $("nc-msg");
  const question = $("nc-question").value.trim();
  const when = $("nc-when").value;
  if (!picked.size) return say(msg, t("new.none_picked"));
  if (!question || !when) return say(msg, t("new.missing"));
  $("nc-submit").disabled = true;
  try {
    const made = await api("/api/consultations", {
      method: "POST",
      body: { study_uids: [...picked.keys()], question, scheduled_at: when, time_zone: $("nc-zone").value },
    });
    location.assign(`/consultations/${made.id}`);
  } catch (err) {
    say(msg, errorText(err));
    $("nc-submit").disabled = false;
  }
}

const who = await startPage();
canRequest = who.role === "partner" || who.role === "admin";
if (location.pathname === "/consultations/new") {
  document.documentElement.dataset.i18nTitle = "page.new";
  $("studies-title").dataset.i18n = "new.title";
  applyI18n();
}
if (who.role === "partner") $("s-partner").closest("label").hidden = true;
else await partnerOptions($("s-partner"));
if (canRequest) {
  $("new-consultation").hidden = false;
  // the zone the time is entered in: the user's own, else this browser's when it is one of ours
  const zone = who.time_zone || Intl.DateTimeFormat().resolvedOptions().timeZone;
  if ([...$("nc-zone").options].some((o) => o.value === zone)) $("nc-zone").value = zone;
  $("nc-form").addEventListener("submit", request);
  showPicked();
} else {
  for (const c of document.querySelectorAll(".pick-col")) c.hidden = true;
}
form.addEventListener("submit", (e) => {
  e.preventDefault();
  offset = 0;
  load();
});
$("prev-page").addEventListener("click", () => {
  offset = Math.max(0, offset - PAGE);
  load();
});
$("next-page").addEventListener("click", () => {
  offset += PAGE;
  load();
});
onLocaleChange(() => {
  load();
  if (canRequest) showPicked();
});
await load();
ready();
