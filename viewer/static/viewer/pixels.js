// Lossless frames and local window/level.
//
// The server packs a frame's values into an 8-bit greyscale PNG (imaging/pixels.py): the bytes
// of v = value - offset as byte planes of Rows x Columns stacked top to bottom, most significant
// first (X-Imx-Planes: 1 to 4); modality value = (v + offset) * slope + intercept (PS3.3 C.11.1).
// The PNG is decoded by the browser (createImageBitmap with no colour conversion and no
// premultiplication, then an OffscreenCanvas), and windowed here through a lookup table over the
// frame's value range (PS3.3 C.11.2: LINEAR, LINEAR_EXACT, SIGMOID), the same formulas as
// imaging/render.py, so the canvas matches the server's rendered frame.

const BITMAP_OPTIONS = { colorSpaceConversion: "none", premultiplyAlpha: "none" };
const MAX_LUT = 1 << 22; // above this range, values are windowed one by one

/** Decodes a packed-frame response into {width, height, values, offset, slope, intercept, low, high, color, rgba}. */
export async function decodePacked(response) {
  const h = response.headers;
  const color = h.get("X-Imx-Color") === "1";
  const planes = Number(h.get("X-Imx-Planes") || "1");
  const offset = Number(h.get("X-Imx-Offset") || "0");
  const slope = Number(h.get("X-Imx-Slope") || "1");
  const intercept = Number(h.get("X-Imx-Intercept") || "0");
  const [low, high] = (h.get("X-Imx-Range") || "0,0").split(",").map(Number);
  const voiSize = Number(h.get("X-Imx-Voi") || "0");
  const blob = await response.blob();
  const bitmap = await createImageBitmap(blob, BITMAP_OPTIONS);
  const cw = bitmap.width;
  const ch = bitmap.height;
  const canvas = new OffscreenCanvas(cw, ch);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, cw, ch).data;
  if (color) return { width: cw, height: ch, color, rgba, offset: 0, slope: 1, intercept: 0, low: 0, high: 255 };
  const width = cw;
  const height = (ch - (voiSize ? Math.ceil(voiSize / cw) : 0)) / planes;
  const n = width * height;
  let values;
  if (planes === 1) {
    values = new Uint16Array(n);
    for (let i = 0, j = 0; i < n; i++, j += 4) values[i] = rgba[j];
  } else if (planes === 2) {
    values = new Uint16Array(n);
    const lo = n * 4;
    for (let i = 0, j = 0; i < n; i++, j += 4) values[i] = (rgba[j] << 8) | rgba[lo + j];
  } else {
    values = planes === 3 ? new Uint32Array(n) : new Float64Array(n);
    for (let i = 0, j = 0; i < n; i++, j += 4) {
      let v = 0;
      for (let p = 0; p < planes; p++) v = v * 256 + rgba[p * n * 4 + j];
      values[i] = v;
    }
  }
  let voi = null; // the VOI LUT's grey level per packed value, in the rows after the planes
  if (voiSize) {
    voi = new Uint8Array(voiSize);
    for (let i = 0, j = planes * n * 4; i < voiSize; i++, j += 4) voi[i] = rgba[j];
  }
  return { width, height, color, values, offset, slope, intercept, low, high, voi };
}

/** The modality value of packed value `v`. */
export function modalityValue(frame, v) {
  return (v + frame.offset) * frame.slope + frame.intercept;
}

/** The frame's range window (dcmtk's min-max window, as imaging/render.py uses without a window). */
export function rangeWindow(frame) {
  const a = frame.low * frame.slope + frame.intercept;
  const b = frame.high * frame.slope + frame.intercept;
  const lo = Math.min(a, b);
  const hi = Math.max(a, b);
  return { center: (lo + hi + 1) / 2, width: Math.max(hi - lo + 1, 1), fn: "LINEAR" };
}

/**
 * The default view of a frame shown through its VOI LUT (no window in the object): the table
 * itself ({table: true}), with the LINEAR window over where its output rises from its lowest to
 * its highest level, which a window drag starts from and the overlay shows.
 */
export function tableWindow(frame) {
  const t = frame.voi;
  let lo = 0;
  while (lo < t.length - 1 && t[lo + 1] === t[0]) lo++;
  let hi = t.length - 1;
  while (hi > lo && t[hi - 1] === t[t.length - 1]) hi--;
  const a = modalityValue(frame, lo);
  const b = modalityValue(frame, hi);
  return { center: (a + b + 1) / 2, width: Math.max(Math.abs(b - a) + 1, 1), fn: "LINEAR", table: true };
}

/** Display value 0..1 of modality value x (PS3.3 C.11.2.1.2 and C.11.2.1.3). */
function voi(x, c, w, fn) {
  if (fn === "SIGMOID") return 1 / (1 + Math.exp((-4 * (x - c)) / w));
  let y;
  if (fn === "LINEAR_EXACT") y = (x - c) / w + 0.5;
  else if (w <= 1) return x > c - 0.5 ? 1 : 0;
  else y = (x - (c - 0.5)) / (w - 1) + 0.5;
  return y < 0 ? 0 : y > 1 ? 1 : y;
}

const LITTLE = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
function grey(g) {
  return LITTLE ? 0xff000000 | (g << 16) | (g << 8) | g : (g << 24) | (g << 16) | (g << 8) | 0xff;
}

/** A lookup table from packed value (0..range) to an RGBA pixel as one Uint32. */
export function buildLut(frame, { center, width, fn = "LINEAR", invert = false, table = false }) {
  const range = frame.high - frame.low;
  const size = range + 1;
  const lut = new Uint32Array(size);
  if (table && frame.voi) {
    for (let v = 0; v < size; v++) lut[v] = grey(invert ? 255 - frame.voi[v] : frame.voi[v]);
    return lut;
  }
  // packed value v stands for stored value v + offset (offset is the frame's lowest value)
  for (let v = 0; v < size; v++) {
    let y = voi((v + frame.offset) * frame.slope + frame.intercept, center, width, fn);
    if (invert) y = 1 - y;
    lut[v] = grey(Math.round(y * 255));
  }
  return lut;
}

/**
 * Windows `frame` into `imageData` (same size). Greyscale through a LUT (built when the range
 * allows); colour copied (inverted on request).
 */
export function renderFrame(frame, imageData, win, cache = {}) {
  const out = new Uint32Array(imageData.data.buffer);
  if (frame.color) {
    const src = frame.rgba;
    const dst = imageData.data;
    if (win.invert) {
      for (let i = 0; i < src.length; i += 4) {
        dst[i] = 255 - src[i];
        dst[i + 1] = 255 - src[i + 1];
        dst[i + 2] = 255 - src[i + 2];
        dst[i + 3] = 255;
      }
    } else dst.set(src);
    return;
  }
  const values = frame.values;
  const n = values.length;
  if (frame.high - frame.low < MAX_LUT && !(values instanceof Float64Array)) {
    const key = `${win.center}|${win.width}|${win.fn}|${win.invert}|${Boolean(win.table)}`;
    let lut = cache.key === key && cache.frame === frame ? cache.lut : null;
    if (!lut) {
      lut = buildLut(frame, win);
      cache.key = key;
      cache.frame = frame;
      cache.lut = lut;
    }
    for (let i = 0; i < n; i++) out[i] = lut[values[i]];
    return;
  }
  for (let i = 0; i < n; i++) {
    let y = voi((values[i] + frame.offset) * frame.slope + frame.intercept, win.center, win.width, win.fn);
    if (win.invert) y = 1 - y;
    out[i] = grey(Math.round(y * 255));
  }
}
