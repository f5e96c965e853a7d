// The audit log (admins only): newest first, filtered by user and action, older pages on demand,
// and the whole log as JSON lines.

import { api } from "../api.js";
import { formatDateTime, onLocaleChange } from "../i18n.js";
import { el, errorText, fill, ready, say, startPage } from "../shell.js";

const PAGE = 100;
const $ = (x) => document.getElementById(x);
const form = $("audit-filters");
// every action the server records (AuditEvent.action), with its label's key
const ACTIONS = {
  login: "audit.action.login",
  login_failed: "audit.action.login_failed",
  logout: "audit.action.logout",
  study_viewed: "audit.action.study_viewed",
  instance_downloaded: "audit.action.instance_downloaded",
  frame_downloaded: "audit.action.frame_downloaded",
  reidentify: "audit.action.reidentify",
  consultation_created: "audit.action.consultation_created",
  consultation_changed: "audit.action.consultation_changed",
  partner_changed: "audit.action.partner_changed",
  user_changed: "audit.action.user_changed",
  share_created: "audit.action.share_created",
  share_revoked: "audit.action.share_revoked",
  token_created: "audit.action.token_created",
  token_revoked: "audit.action.token_revoked",
};
const OUTCOMES = { ok: "audit.outcome.ok", failed: "audit.outcome.failed", denied: "audit.outcome.denied" };
let before = null;
let events = [];

function row(e) {
  const action = ACTIONS[e.action] ? el("span", { i18n: ACTIONS[e.action], title: e.action }) : el("span", { text: e.action });
  const target = [e.target_kind, e.target].filter(Boolean).join(" ");
  return el(
    "tr",
    { dataset: { action: e.action } },
    el("td", { class: "small", text: formatDateTime(e.at), title: e.at }),
    el("td", { text: e.user || "—" }),
    el("td", {}, action),
    el("td", { class: "small", text: target, title: e.detail ? JSON.stringify(e.detail) : "" }),
    el("td", { class: "small", text: e.address || "" }),
    el("td", {}, OUTCOMES[e.outcome] ? el("span", { i18n: OUTCOMES[e.outcome] }) : el("span", { text: e.outcome })),
  );
}

function query(extra = {}) {
  const q = new URLSearchParams();
  if (form.elements.user.value.trim()) q.set("user", form.elements.user.value.trim());
  if (form.elements.action.value) q.set("action", form.elements.action.value);
  for (const [k, v] of Object.entries(extra)) q.set(k, v);
  return q;
}

async function load(more = false) {
  if (!more) {
    before = null;
    events = [];
  }
  const q = query({ limit: String(PAGE) });
  if (before) q.set("before", String(before));
  try {
    const data = await api(`/api/audit?${q}`);
    events = events.concat(data.items || []);
    before = data.next_before || null;
    fill(document.querySelector("#audit tbody"), events.map(row));
    $("audit-empty").hidden = events.length > 0;
    $("audit-more").hidden = !before;
    const exportQuery = query();
    $("audit-export").href = `/api/audit.jsonl${exportQuery.toString() ? `?${exportQuery}` : ""}`;
    say($("audit-error"), "");
  } catch (err) {
    say($("audit-error"), errorText(err));
  }
}

await startPage();
fill(
  form.elements.action,
  el("option", { value: "", i18n: "filter.any" }),
  Object.entries(ACTIONS).map(([value, key]) => el("option", { value, i18n: key })),
);
form.addEventListener("submit", (e) => {
  e.preventDefault();
  load();
});
$("audit-more").addEventListener("click", () => load(true));
onLocaleChange(() => fill(document.querySelector("#audit tbody"), events.map(row)));
await load();
ready();
