// The viewer's tools: window presets, measurements (length, angle) and the keyboard map.

import { formatNumber, t } from "../js/i18n.js";

/** CT window presets (centre/width in HU), with their keys. */
export const PRESETS = [
  { id: "brain", key: "2", center: 40, width: 80 },
  { id: "lung", key: "3", center: -600, width: 1500 },
  { id: "bone", key: "4", center: 400, width: 1800 },
  { id: "abdomen", key: "5", center: 60, width: 400 },
  { id: "soft", key: "6", center: 50, width: 350 },
];

/** Pointer tools (left button); the key selects one. */
export const TOOLS = [
  { id: "window", key: "w" },
  { id: "pan", key: "p" },
  { id: "zoom", key: "z" },
  { id: "scroll", key: "s" },
  { id: "length", key: "l" },
  { id: "angle", key: "a" },
];

/** The keyboard shortcuts, as the help overlay lists them: [keys, i18n key of what it does]. */
export const SHORTCUTS = [
  ["↑ ↓ / PgUp PgDn", "viewer.help.slice"],
  ["Home / End", "viewer.help.first_last"],
  ["W P Z S", "viewer.help.tools"],
  ["L / A", "viewer.help.measure"],
  ["0, 2–6", "viewer.help.presets"],
  ["I", "viewer.help.invert"],
  ["F / 1", "viewer.help.fit"],
  ["R", "viewer.help.reset"],
  ["C", "viewer.help.cine"],
  ["T", "viewer.help.tags"],
  ["Y", "viewer.help.sync"],
  ["Del", "viewer.help.clear"],
  ["?", "viewer.help.help"],
  ["Esc", "viewer.help.close"],
];

/**
 * The length between image points a and b ({x, y} in columns and rows): millimetres when the
 * pixel spacing is known (PixelSpacing is [row spacing, column spacing], PS3.3 10.7.1.3), else
 * pixels. Returns {value, unit: "mm" | "px", calibrated}.
 */
export function length(a, b, meta) {
  const dx = b.x - a.x;
  const dy = b.y - a.y;
  const ps = meta && meta.pixel_spacing;
  if (ps) return { value: Math.hypot(dx * ps[1], dy * ps[0]), unit: "mm", calibrated: !!meta.calibrated };
  return { value: Math.hypot(dx, dy), unit: "px", calibrated: false };
}

/** The angle at vertex b between rays b->a and b->c, in degrees (in physical space when spacing is known). */
export function angle(a, b, c, meta) {
  const ps = (meta && meta.pixel_spacing) || [1, 1];
  const v1 = [(a.x - b.x) * ps[1], (a.y - b.y) * ps[0]];
  const v2 = [(c.x - b.x) * ps[1], (c.y - b.y) * ps[0]];
  const n = Math.hypot(...v1) * Math.hypot(...v2);
  if (!n) return 0;
  const cos = Math.max(-1, Math.min(1, (v1[0] * v2[0] + v1[1] * v2[1]) / n));
  return (Math.acos(cos) * 180) / Math.PI;
}

/** The text of a length: "50.0 mm", "50.0 mm (detector)" for Imager Pixel Spacing, "100 px (uncalibrated)". */
export function lengthText(m) {
  if (m.unit === "mm") {
    const text = t("viewer.unit.mm", { value: formatNumber(m.value, { minimumFractionDigits: 1, maximumFractionDigits: 1 }) });
    return m.calibrated ? text : `${text} ${t("viewer.detector")}`;
  }
  return `${t("viewer.unit.px", { value: formatNumber(m.value, { maximumFractionDigits: 1 }) })} ${t("viewer.uncalibrated")}`;
}

export function angleText(deg) {
  return t("viewer.unit.deg", { value: formatNumber(deg, { minimumFractionDigits: 1, maximumFractionDigits: 1 }) });
}

/** Window centre/width text. */
export function windowText(win) {
  if (win.table) return t("viewer.window_voi_lut");
  const f = (v) => formatNumber(Math.round(v * 10) / 10, { maximumFractionDigits: 1 });
  return t("viewer.window_value", { center: f(win.center), width: f(win.width) });
}
