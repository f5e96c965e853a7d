// The JSON API from the browser: the session cookie goes along, state-changing requests carry
// the session's CSRF token (X-CSRF-Token, from GET /api/me), and a 401 sends the user to the
// login page and back.

const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);
let mePromise = null;

/** An error answer of the API: `status` and the server's plain-words `detail`. */
export class ApiError extends Error {
  constructor(status, detail, response) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
    this.response = response;
  }
}

function detailOf(body) {
  if (!body) return "";
  const d = body.detail;
  if (Array.isArray(d)) return d.map((e) => e.msg || JSON.stringify(e)).join("; ");
  return typeof d === "string" ? d : d ? JSON.stringify(d) : "";
}

/** Who is logged in (the /api/me JSON), or null; fetched once per page. */
export function me({ refresh = false } = {}) {
  if (!mePromise || refresh) {
    mePromise = fetch("/api/me", { credentials: "same-origin", headers: { Accept: "application/json" } }).then(
      (r) => (r.ok ? r.json() : null),
      () => null,
    );
  }
  return mePromise;
}

/** Forgets the cached /api/me (after logging in or out). */
export function forgetMe() {
  mePromise = null;
}

/** Sends the browser to the login page, to come back to this page afterwards. */
export function toLogin() {
  const next = location.pathname + location.search;
  location.assign(`/login?next=${encodeURIComponent(next)}`);
}

/**
 * Calls the API: `api("/api/worklist")`, `api("/api/consultations", {method: "POST", body})`.
 * Returns the decoded JSON (null for an empty answer); throws ApiError for an error answer.
 */
export async function api(path, { method = "GET", body, headers = {}, redirect = true } = {}) {
  method = method.toUpperCase();
  const h = { Accept: "application/json", ...headers };
  if (!SAFE.has(method)) {
    const who = await me();
    if (who && who.csrf_token) h["X-CSRF-Token"] = who.csrf_token;
  }
  let payload;
  if (body !== undefined) {
    h["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers: h, body: payload, credentials: "same-origin" });
  const text = await r.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { detail: text };
    }
  }
  if (r.status === 401 && redirect) {
    toLogin();
    throw new ApiError(401, detailOf(data), r);
  }
  if (!r.ok) throw new ApiError(r.status, detailOf(data), r);
  return data;
}

/** Saves the user's preferences ({locale, time_zone}) when someone is logged in. */
export async function savePreferences(prefs) {
  const who = await me();
  if (!who) return null;
  const saved = await api("/api/me/preferences", { method: "PUT", body: prefs, redirect: false });
  if (saved) mePromise = Promise.resolve({ ...who, ...saved, csrf_token: saved.csrf_token || who.csrf_token });
  return saved;
}
