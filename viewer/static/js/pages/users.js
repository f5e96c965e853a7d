// Users (admins only): the list, adding a user, disabling or enabling one, granting a
// specialist all studies.

import { api } from "../api.js";
import { t } from "../i18n.js";
import { ROLE_KEYS, el, errorText, fill, ready, say, startPage } from "../shell.js";

const $ = (x) => document.getElementById(x);

async function change(name, body) {
  try {
    await api(`/api/users/${encodeURIComponent(name)}`, { method: "PATCH", body });
    say($("users-error"), "");
  } catch (err) {
    say($("users-error"), errorText(err));
  }
  await load();
}

function row(u) {
  const grant =
    u.role === "specialist"
      ? el("input", {
          type: "checkbox",
          checked: u.all_studies,
          i18nAriaLabel: "users.col.all_studies",
          on: { change: (e) => change(u.name, { all_studies: e.target.checked }) },
        })
      : el("span", { class: "muted", text: "—" });
  return el(
    "tr",
    { dataset: { user: u.name }, class: u.active ? "" : "inactive-row" },
    el("td", { class: u.active ? "" : "inactive", text: u.display_name ? `${u.name} (${u.display_name})` : u.name }),
    el("td", { i18n: ROLE_KEYS[u.role] || "role.unknown" }),
    el("td", { text: u.partner || "" }),
    el("td", {}, grant),
    el("td", { i18n: u.active ? "users.active" : "users.disabled" }),
    el(
      "td",
      {},
      el("button", {
        type: "button",
        class: "secondary toggle-active",
        i18n: u.active ? "users.disable" : "users.enable",
        on: { click: () => change(u.name, { active: !u.active }) },
      }),
    ),
  );
}

async function load() {
  try {
    const { users } = await api("/api/users");
    fill(document.querySelector("#users tbody"), users.map(row));
  } catch (err) {
    say($("users-error"), errorText(err));
  }
}

async function add(e) {
  e.preventDefault();
  const f = e.currentTarget;
  const body = { name: f.elements.name.value.trim(), role: f.elements.role.value, password: f.elements.password.value };
  if (body.role === "partner") body.partner = f.elements.partner.value.trim();
  try {
    await api("/api/users", { method: "POST", body });
    say($("add-user-msg"), t("users.added", { name: body.name }), "ok");
    f.reset();
    syncPartner();
    await load();
  } catch (err) {
    say($("add-user-msg"), errorText(err));
  }
}

function syncPartner() {
  const partner = $("u-partner");
  partner.disabled = $("u-role").value !== "partner";
  partner.required = !partner.disabled;
}

await startPage();
$("add-user").addEventListener("submit", add);
$("u-role").addEventListener("change", syncPartner);
syncPartner();
await load();
ready();
