// What every page shares: the header (navigation by role, language switcher, user, log out),
// the start of a page (who is logged in, which language) and a small DOM helper.

import { api, forgetMe, me, toLogin } from "./api.js";
import { LANGUAGE_NAMES, LANGUAGES, applyI18n, initI18n, locale, onLocaleChange, setLocale, t } from "./i18n.js";

/**
 * Makes an element: el("a", {href: "/", i18n: "nav.worklist"}, child, ...).
 * `i18n` (and `i18nTitle`, `i18nAriaLabel`, `i18nPlaceholder`) set data-i18n* keys; `text` sets
 * text; `on` maps events to handlers; `class`, `dataset` and other keys set attributes/properties.
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "i18n") {
      node.dataset.i18n = v;
      node.textContent = t(v);
    } else if (k === "i18nTitle") {
      node.dataset.i18nTitle = v;
      node.title = t(v);
    } else if (k === "i18nAriaLabel") {
      node.dataset.i18nAriaLabel = v;
      node.setAttribute("aria-label", t(v));
    } else if (k === "i18nPlaceholder") {
      node.dataset.i18nPlaceholder = v;
      node.placeholder = t(v);
    } else if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
  return node;
}

/** Removes the children of `node` and appends `children`. */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** Shows `message` (or hides it when empty) in a role=alert / role=status element. */
export function say(node, message, kind = "error") {
  node.textContent = message || "";
  node.hidden = !message;
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind === "ok");
}

/** The translated message of an API error (the server's detail when it says more). */
export function errorText(err) {
  if (!err) return "";
  if (err.status === 403) return err.detail ? `${t("error.forbidden")} ${err.detail}` : t("error.forbidden");
  if (err.status === 404) return t("error.not_found");
  if (err.status >= 500) return t("error.server");
  if (err.detail) return err.detail;
  return t("error.network");
}

export const STATUS_KEYS = {
  requested: "status.requested",
  images_complete: "status.images_complete",
  in_review: "status.in_review",
  answered: "status.answered",
};
export const ROLE_KEYS = { admin: "role.admin", specialist: "role.specialist", partner: "role.partner", share: "role.share" };

/** Fills a <select> with the partner hospitals' names (after its first, "any" option). */
export async function partnerOptions(select) {
  try {
    const { partners } = await api("/api/partners");
    const any = select.options[0];
    fill(select, any, partners.map((p) => el("option", { value: p.name, text: p.name })));
  } catch {
    /* the filter then offers only "any" */
  }
}

/** A person's name from a DICOM PN value (PS3.5 6.2: family^given^middle^prefix^suffix, up to
 * three component groups separated by "="), as "prefix given middle family suffix" per group. */
export function personName(pn) {
  if (!pn) return "";
  return String(pn)
    .split("=")
    .filter((g) => g.replace(/\^/g, "").trim())
    .map((g) => {
      const [family = "", given = "", middle = "", prefix = "", suffix = ""] = g.split("^");
      return [prefix, given, middle, family, suffix].map((x) => x.trim()).filter(Boolean).join(" ");
    })
    .join(" / ");
}

/** A status badge for a consultation's status. */
export function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, i18n: STATUS_KEYS[status] || "status.unknown" });
}

function languageSwitcher() {
  const select = el(
    "select",
    { id: "language", i18nAriaLabel: "nav.language", i18nTitle: "nav.language" },
    LANGUAGES.map((code) => el("option", { value: code, lang: code, text: LANGUAGE_NAMES[code] })),
  );
  select.value = locale();
  select.addEventListener("change", async () => {
    await setLocale(select.value);
  });
  onLocaleChange((code) => {
    select.value = code;
  });
  return el("label", { class: "language" }, el("span", { class: "visually-hidden", i18n: "nav.language" }), select);
}

function navigation(who) {
  const links = [["/", "nav.worklist"]];
  if (who.role === "admin" || who.role === "partner" || (who.role === "specialist" && who.all_studies)) links.push(["/studies", "nav.studies"]);
  if (who.role === "admin") links.push(["/admin/users", "nav.users"], ["/admin/audit", "nav.audit"]);
  const here = location.pathname;
  return el(
    "nav",
    { i18nAriaLabel: "nav.main" },
    el(
      "ul",
      {},
      links.map(([href, key]) => {
        const current = href === "/" ? here === "/" || here.startsWith("/consultations/") : here.startsWith(href);
        return el("li", {}, el("a", { href, i18n: key, "aria-current": current ? "page" : null }));
      }),
    ),
  );
}

async function logout() {
  try {
    await api("/api/logout", { method: "POST", redirect: false });
  } catch {
    /* the session may be gone already */
  }
  forgetMe();
  location.assign("/login");
}

/** The header of a page; `who` is null on the login page. */
export function renderHeader(who) {
  const header = document.getElementById("app-header");
  if (!header) return;
  const brand = el("a", { href: "/", class: "brand", i18n: "app.name" });
  const right = el("div", { class: "header-right" }, languageSwitcher());
  if (who) {
    right.append(
      el("span", { class: "who", id: "who" }, el("span", { class: "who-name", text: who.name }), " · ", el("span", { i18n: ROLE_KEYS[who.role] || "role.unknown" })),
      el("button", { type: "button", id: "logout", class: "secondary", i18n: "nav.logout", on: { click: logout } }),
    );
  }
  fill(header, brand, who ? navigation(who) : null, right);
}

/**
 * Starts a page: finds who is logged in (or sends them to log in), sets the language, draws the
 * header. Returns the /api/me JSON (null when `anonymous` is allowed and nobody is logged in).
 */
export async function startPage({ anonymous = false } = {}) {
  const who = await me();
  if (!who && !anonymous) {
    toLogin();
    return new Promise(() => {}); // the page is going away
  }
  await initI18n(who ? who.locale : null);
  renderHeader(who);
  applyI18n();
  return who;
}

/** Tells tests and users the page is ready. */
export function ready() {
  document.body.dataset.ready = "1";
  document.body.setAttribute("aria-busy", "false");
}
