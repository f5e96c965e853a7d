// A "share" button for a study: creates an expiring read-only link (POST /api/studies/{uid}/share)
// and shows it to copy.

import { api } from "./api.js";
import { formatDateTime, t } from "./i18n.js";
import { el, errorText } from "./shell.js";

export const SHARE_HOURS = 72;

/** A button that makes a share link for `studyUid` and shows it next to itself. */
export function shareButton(studyUid) {
  const out = el("span", { class: "share-out small", role: "status" });
  const button = el("button", {
    type: "button",
    class: "secondary share",
    i18n: "share.create",
    i18nTitle: "share.create_hint",
    on: {
      click: async () => {
        button.disabled = true;
        try {
          const made = await api(`/api/studies/${encodeURIComponent(studyUid)}/share`, { method: "POST", body: { hours: SHARE_HOURS } });
          const url = new URL(made.url, location.origin).href;
          out.replaceChildren(
            el("span", { text: t("share.made", { until: formatDateTime(made.expires_at) }) }),
            " ",
            el("input", { class: "share-url", value: url, readOnly: true, size: 40, i18nAriaLabel: "share.link", on: { focus: (e) => e.target.select() } }),
          );
        } catch (err) {
          out.replaceChildren(el("span", { class: "error", text: errorText(err) }));
        } finally {
          button.disabled = false;
        }
      },
    },
  });
  return el("span", { class: "share-box" }, button, out);
}
