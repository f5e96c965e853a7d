// The login page: name and password to POST /api/login, then back to where the user was going.

import { forgetMe } from "../api.js";
import { t } from "../i18n.js";
import { ready, say, startPage } from "../shell.js";

function nextPath() {
  const next = new URLSearchParams(location.search).get("next") || "/";
  // only a path on this site (never //host or a scheme)
  return next.startsWith("/") && !next.startsWith("//") && !next.includes("\\") ? next : "/";
}

function waitSeconds(response, detail) {
  const header = Number(response.headers.get("Retry-After"));
  if (Number.isFinite(header) && header > 0) return Math.ceil(header);
  const m = /(\d+)\s*s/.exec(detail || "");
  return m ? Number(m[1]) : null;
}

let countdown = null;

/** Refuses the form for `seconds`, counting down in the message. */
function waitBeforeRetry(seconds) {
  const error = document.getElementById("login-error");
  const button = document.getElementById("login-submit");
  clearInterval(countdown);
  let left = seconds;
  const tick = () => {
    if (left <= 0) {
      clearInterval(countdown);
      button.disabled = false;
      say(error, "");
      return;
    }
    button.disabled = true;
    say(error, t("login.too_many", { seconds: left }));
    left -= 1;
  };
  tick();
  countdown = setInterval(tick, 1000);
}

async function submit(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const error = document.getElementById("login-error");
  const button = document.getElementById("login-submit");
  const name = form.elements.name.value.trim();
  const password = form.elements.password.value;
  if (!name || !password) {
    say(error, t("login.missing"));
    return;
  }
  button.disabled = true;
  say(error, "");
  try {
    const r = await fetch("/api/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ name, password }),
    });
    if (r.ok) {
      forgetMe();
      location.assign(nextPath());
      return;
    }
    let detail = "";
    try {
      detail = (await r.json()).detail || "";
    } catch {
      detail = "";
    }
    if (r.status === 401) say(error, t("login.wrong"));
    else if (r.status === 429) {
      const s = waitSeconds(r, typeof detail === "string" ? detail : "");
      if (s) {
        waitBeforeRetry(s);
        return;
      }
      say(error, t("login.too_many_later"));
    } else if (r.status === 422) say(error, t("login.missing"));
    else say(error, typeof detail === "string" && detail ? detail : t("error.server"));
    form.elements.password.select();
    button.disabled = false;
  } catch {
    say(error, t("error.network"));
    button.disabled = false;
  }
}

await startPage({ anonymous: true });
document.getElementById("login-form").addEventListener("submit", submit);
ready();
