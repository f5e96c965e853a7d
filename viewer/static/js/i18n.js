// UI languages: English, Russian and Chinese; Kazakh and Kyrgyz fall back to Russian.
//
// Strings live in flat JSON maps ("dotted.key": "text"): /static/i18n/<lang>.json, plus extra
// bundles a page asks for (<html data-i18n-bundles="viewer"> loads viewer-<lang>.json too).
// Markup carries keys, never text: data-i18n (text content), data-i18n-title,
// data-i18n-placeholder and data-i18n-aria-label; scripts call t(key, vars).
// The choice is kept in localStorage and, when someone is logged in, in their preferences
// (PUT /api/me/preferences), so it follows them to another browser.

export const LANGUAGES = ["en", "ru", "zh", "kk", "ky"];
const FALLBACK = { kk: "ru", ky: "ru" };
const STORAGE_KEY = "imx.locale";
// names of the languages in themselves, for the switcher
export const LANGUAGE_NAMES = { en: "English", ru: "Русский", zh: "中文", kk: "Қазақша", ky: "Кыргызча" };

let requested = "en"; // what the user chose (kk stays kk: the server formats dates in Kazakh)
let current = "en"; // the language of the strings shown
let strings = {};
let english = {};
const listeners = new Set();
const version = new URL(import.meta.url).searchParams.get("v") || "";

function bundles() {
  const extra = (document.documentElement.dataset.i18nBundles || "").split(/[\s,]+/).filter(Boolean);
  return ["", ...extra.map((b) => b + "-")];
}

async function loadStrings(lang) {
  const maps = await Promise.all(
    bundles().map(async (prefix) => {
      const url = new URL(`../i18n/${prefix}${lang}.json`, import.meta.url);
      url.search = version ? `?v=${version}` : "";
      const r = await fetch(url, { credentials: "same-origin" });
      return r.ok ? r.json() : {};
    }),
  );
  return Object.assign({}, ...maps);
}

/** The language whose strings are used for `code` ("kk" -> "ru"; unknown -> "en"). */
export function resolve(code) {
  const base = String(code || "").toLowerCase().split(/[-_]/)[0];
  if (FALLBACK[base]) return FALLBACK[base];
  return ["en", "ru", "zh"].includes(base) ? base : "en";
}

/** The translation of `key`, with {name} placeholders replaced from `vars`. */
export function t(key, vars) {
  let s = strings[key] ?? english[key] ?? key;
  if (vars) s = s.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
  return s;
}

/**
 * A count with its noun in the right plural form: `tn("study.n_images", 3)` uses the key
 * "study.n_images.<one|few|many|other>" chosen by the language's plural rules (CLDR), with {n}.
 */
export function tn(key, n, vars = {}) {
  let form = "other";
  try {
    form = new Intl.PluralRules(current).select(n);
  } catch {
    form = "other";
  }
  const k = `${key}.${form}` in strings || `${key}.${form}` in english ? `${key}.${form}` : `${key}.other`;
  return t(k, { n: formatNumber(n), ...vars });
}

/** The language the user chose (may be kk or ky). */
export function locale() {
  return requested;
}

/** The language of the strings shown (en, ru or zh). */
export function uiLanguage() {
  return current;
}

/** A BCP 47 tag for Intl formatting in the chosen language. */
export function intlLocale() {
  return { en: "en-US", ru: "ru-RU", zh: "zh-CN", kk: "kk-KZ", ky: "ky-KG" }[requested] || "en-US";
}

/** Puts translated text into the elements under `root` that carry data-i18n* attributes. */
export function applyI18n(root = document) {
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-aria-label]")) el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
  const title = document.documentElement.dataset.i18nTitle;
  if (title) document.title = `${t(title)} · ${t("app.name")}`;
}

/** Calls `fn(code)` after each change of language. Returns a function that stops it. */
export function onLocaleChange(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

async function switchTo(code) {
  const lang = resolve(code);
  // English is the fallback for keys a translation lacks: fetched once, and never twice for "en"
  const needEnglish = lang !== "en" && !Object.keys(english).length;
  const [map, en] = await Promise.all([loadStrings(lang), needEnglish ? loadStrings("en") : english]);
  english = lang === "en" ? map : en;
  strings = map;
  requested = LANGUAGES.includes(String(code).toLowerCase()) ? String(code).toLowerCase() : lang;
  current = lang;
  document.documentElement.lang = requested;
  applyI18n();
}

/**
 * Shows the UI in `code` and remembers the choice (localStorage; the user's preferences on the
 * server unless `persist` is false).
 */
export async function setLocale(code, { persist = true } = {}) {
  await switchTo(code);
  try {
    localStorage.setItem(STORAGE_KEY, requested);
  } catch {
    /* storage may be disabled: the choice then lasts for this page */
  }
  if (persist) {
    const { savePreferences } = await import("./api.js");
    await savePreferences({ locale: requested }).catch(() => {});
  }
  for (const fn of listeners) fn(requested);
}

/**
 * First choice of language for a page: the logged-in user's saved one, else this browser's last
 * choice, else the browser's language.
 */
export async function initI18n(saved) {
  let stored = null;
  try {
    stored = localStorage.getItem(STORAGE_KEY);
  } catch {
    stored = null;
  }
  const code = saved || stored || navigator.language || "en";
  await switchTo(code);
  return requested;
}

/** The browser's IANA time zone (the server's fallback when the user saved none). */
export function browserZone() {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "";
  } catch {
    return "";
  }
}

/** Query parameters asking the API for display strings in this language and zone. */
export function displayQuery() {
  const q = new URLSearchParams({ locale: requested });
  const zone = browserZone();
  if (zone) q.set("tz", zone);
  return q.toString();
}

/** A number in the chosen language's format. */
export function formatNumber(n, options) {
  return new Intl.NumberFormat(intlLocale(), options).format(n);
}

/** A date and time (a Date or ISO string) in the chosen language, in the browser's zone or `timeZone`. */
export function formatDateTime(value, { timeZone, dateOnly = false } = {}) {
  if (!value) return "";
  const d = value instanceof Date ? value : new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  const opts = dateOnly ? { dateStyle: "medium" } : { dateStyle: "medium", timeStyle: "short" };
  if (timeZone) opts.timeZone = timeZone;
  try {
    return new Intl.DateTimeFormat(intlLocale(), opts).format(d);
  } catch {
    return new Intl.DateTimeFormat("en-US", opts).format(d);
  }
}

/** A DICOM date (YYYYMMDD) in the chosen language. */
export function formatDicomDate(da) {
  const m = /^(\d{4})(\d{2})(\d{2})$/.exec(String(da || "").replace(/-/g, ""));
  if (!m) return da || "";
  return formatDateTime(new Date(Date.UTC(+m[1], +m[2] - 1, +m[3])), { timeZone: "UTC", dateOnly: true });
}
