// One consultation: question, studies with their series' thumbnails, priors, specialists, the
// opinion (form for the assigned specialist), the sending hospital's own identifiers, and
// "prepare for consultation", which loads every image of its studies into the browser's cache.

import { api, me } from "../api.js";
import { displayQuery, formatNumber, onLocaleChange, t, tn } from "../i18n.js";
import { prepareStudies } from "../prepare.js";
import { el, errorText, fill, personName, ready, say, startPage, statusBadge } from "../shell.js";
import { shareButton } from "../share.js";

const id = Number(location.pathname.split("/").filter(Boolean).pop());
const $ = (x) => document.getElementById(x);
const SPECIALIST_STATUSES = new Set(["in_review", "answered"]);
const SEX_KEYS = { M: "sex.male", F: "sex.female", O: "sex.other" };
let item = null;
let who = null;

function momentText(m) {
  return m ? [el("span", { text: m.display }), el("span", { class: "zone", text: m.zone })] : [el("span", { class: "muted", i18n: "worklist.unscheduled" })];
}

function viewerLink(studyUid, prior) {
  const q = new URLSearchParams({ study: studyUid });
  if (prior) q.set("prior", prior);
  return `/viewer?${q}`;
}

function series(studyUid, s) {
  return el(
    "li",
    {},
    el(
      "a",
      { href: `${viewerLink(studyUid)}&series=${encodeURIComponent(s.series_uid)}` },
      el(
        "figure",
        {},
        el("img", { src: s.thumbnail_url, alt: "", loading: "lazy", width: 112, height: 112 }),
        el("figcaption", { text: [s.modality, s.number != null ? `#${s.number}` : "", s.description || ""].filter(Boolean).join(" ") }),
        el("figcaption", { text: tn("study.n_images", s.num_instances || 0) }),
      ),
    ),
  );
}

async function study(s) {
  const box = el(
    "div",
    { class: "study", dataset: { study: s.study_uid } },
    el(
      "div",
      { class: "study-head" },
      el("strong", { text: s.date_display || s.date || "" }),
      el("span", { text: s.description || "" }),
      el("span", { class: "muted", text: (s.modalities || []).join(", ") }),
      el("span", { class: "muted small", text: `${tn("study.n_series", s.num_series || 0)}, ${tn("study.n_images", s.num_instances || 0)}` }),
      el("a", { class: "button open-viewer", href: viewerLink(s.study_uid), i18n: "study.open" }),
      shareButton(s.study_uid),
    ),
  );
  const thumbs = el("ul", { class: "thumbs" });
  box.append(thumbs);
  try {
    const detail = await api(`/api/studies/${encodeURIComponent(s.study_uid)}?${displayQuery()}`);
    fill(thumbs, (detail.series || []).map((x) => series(s.study_uid, x)));
  } catch (err) {
    box.append(el("p", { class: "message error", text: errorText(err) }));
  }
  return box;
}

async function priors(studies) {
  const own = new Set(studies.map((s) => s.study_uid));
  const seen = new Map();
  for (const s of studies) {
    try {
      const found = await api(`/api/studies/${encodeURIComponent(s.study_uid)}/priors?${displayQuery()}`);
      for (const p of found.priors || []) if (!own.has(p.study_uid) && !seen.has(p.study_uid)) seen.set(p.study_uid, p);
    } catch {
      /* no priors shown for a study that cannot be read */
    }
  }
  const first = studies[0] && studies[0].study_uid;
  fill(
    $("c-priors"),
    [...seen.values()].map((p) =>
      el(
        "li",
        { dataset: { study: p.study_uid } },
        el("span", { text: `${p.date_display || p.date || ""} ${p.description || ""} ${(p.modalities || []).join(", ")} ` }),
        el("a", { href: viewerLink(p.study_uid), i18n: "study.open" }),
        " · ",
        first ? el("a", { href: viewerLink(first, p.study_uid), i18n: "study.compare" }) : null,
      ),
    ),
  );
  $("c-priors-empty").hidden = seen.size > 0;
}

function showOpinion() {
  const has = Boolean(item.opinion);
  $("c-opinion").hidden = !has;
  $("c-opinion").textContent = item.opinion || "";
  $("c-opinion-none").hidden = has;
  const may = item.can ? item.can.opinion : who.role === "admin";
  $("opinion-form").hidden = !may;
  if (may && has && !$("opinion-text").value) $("opinion-text").value = item.opinion;
}

function showFacts() {
  $("c-number").textContent = `#${item.id}`;
  fill($("c-status"), statusBadge(item.status));
  $("c-question").textContent = item.question || "";
  $("c-partner").textContent = item.partner ? item.partner.name : "";
  $("c-patient").textContent = (item.patient && item.patient.pseudonym) || "";
  const sex = item.patient && item.patient.sex;
  fill($("c-sex"), sex ? el("span", { i18n: SEX_KEYS[sex] || "sex.other" }) : "");
  $("c-birth").textContent = (item.patient && (item.patient.birth_date_display || item.patient.birth_date)) || "—";
  fill($("c-time-viewer"), momentText(item.scheduled && item.scheduled.viewer));
  fill($("c-time-partner"), momentText(item.scheduled && item.scheduled.partner));
  fill(
    $("c-images"),
    item.images_ready
      ? el("span", { class: "ready-yes" }, "✓ ", el("span", { i18n: "images.ready" }))
      : el("span", { class: "ready-no" }, "… ", el("span", { i18n: "images.incomplete" })),
  );
  $("c-specialists").textContent = (item.specialists || []).join(", ") || "—";
  const o = item.original;
  $("c-original").hidden = !o;
  if (o) {
    $("c-orig-name").textContent = personName(o.patient_name) || "—";
    $("c-orig-id").textContent = o.patient_id || "—";
    $("c-orig-accession").textContent = o.accession || "—";
  }
  $("status-select").value = item.status;
  showOpinion();
}

async function loadSpecialists() {
  if (!(item.can && item.can.assign)) return;
  $("assign-form").hidden = false;
  try {
    const { users } = await api("/api/users");
    const select = $("assign-names");
    fill(
      select,
      users
        .filter((u) => u.role === "specialist" && u.active)
        .map((u) => el("option", { value: u.name, text: u.display_name ? `${u.display_name} (${u.name})` : u.name, selected: (item.specialists || []).includes(u.name) })),
    );
  } catch (err) {
    say($("manage-msg"), errorText(err));
  }
}

async function load() {
  try {
    item = await api(`/api/consultations/${id}?${displayQuery()}`);
  } catch (err) {
    say($("c-error"), errorText(err));
    $("c-body").hidden = true;
    return false;
  }
  say($("c-error"), "");
  $("c-body").hidden = false;
  showFacts();
  const studies = item.studies || [];
  fill($("c-studies"), await Promise.all(studies.map((s) => study(s))));
  await priors(studies);
  const manage = who.role === "admin" || (item.can && item.can.opinion);
  $("c-manage").hidden = !manage;
  // an assigned specialist moves a consultation only to "in review" or "answered"
  for (const o of $("status-select").options) o.hidden = o.disabled = who.role !== "admin" && !SPECIALIST_STATUSES.has(o.value) && o.value !== item.status;
  await loadSpecialists();
  return true;
}

async function change(path, body, msgBox, okKey) {
  try {
    const changed = await api(`/api/consultations/${id}/${path}?${displayQuery()}`, { method: "POST", body });
    item = { can: item.can, original: item.original, ...changed }; // what the caller may do stays
    showFacts();
    say(msgBox, t(okKey), "ok");
  } catch (err) {
    say(msgBox, errorText(err));
  }
}

who = await startPage();
$("opinion-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("opinion-text").value.trim();
  if (!text) {
    say($("opinion-msg"), t("consultation.opinion_empty"));
    return;
  }
  $("opinion-submit").disabled = true;
  await change("opinion", { text }, $("opinion-msg"), "consultation.opinion_saved");
  $("opinion-submit").disabled = false;
});
$("status-form").addEventListener("submit", (e) => {
  e.preventDefault();
  change("status", { status: $("status-select").value }, $("manage-msg"), "consultation.saved");
});
$("assign-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const names = [...$("assign-names").selectedOptions].map((o) => o.value);
  change("assign", { specialists: names }, $("manage-msg"), "consultation.saved");
});
$("prepare").addEventListener("click", async () => {
  const button = $("prepare");
  button.disabled = true;
  $("prepare-progress").hidden = false;
  const bar = $("prepare-bar");
  const status = $("prepare-status");
  const result = await prepareStudies(
    (item.studies || []).map((s) => s.study_uid),
    ({ done, total, phase }) => {
      bar.max = Math.max(total, 1);
      bar.value = done;
      status.textContent = t(phase === "metadata" ? "prepare.metadata" : "prepare.progress", { done: formatNumber(done), total: formatNumber(total) });
    },
  );
  status.textContent = result.failed
    ? t("prepare.done_with_errors", { total: formatNumber(result.total), failed: formatNumber(result.failed) })
    : t("prepare.done", { total: formatNumber(result.total) });
  document.body.dataset.prepared = result.failed ? "partial" : "1";
  button.disabled = false;
});
onLocaleChange(load);
await me();
await load();
ready();
