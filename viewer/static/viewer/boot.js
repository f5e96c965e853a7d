// The viewer's first requests, started as soon as this small module (no imports) arrives, before
// the rest of the viewer's modules: on a link with 300 ms round trips that saves one of them.
// viewer.js imports the same module instance and picks the answers up.

const params = new URLSearchParams(location.search);
const q = encodeURIComponent;
export const LOSSY_QUALITY = 50; // WebP: 10 kB for a 512x512 CT slice (JPEG at 60: 19 kB)

async function getJson(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  let detail = "";
  if (!r.ok) {
    try {
      detail = (await r.json()).detail || "";
    } catch {
      /* not JSON */
    }
    throw Object.assign(new Error(detail || `HTTP ${r.status}`), { status: r.status, detail });
  }
  return r.json();
}

/** The series a viewport opens with: the one like `like` (same modality, nearest size), else the largest. */
export function chooseSeries(study, like) {
  const images = study.series.filter((s) => s.instances.length);
  if (!images.length) return null;
  if (like) {
    const same = images.filter((s) => s.modality === like.modality);
    const gap = (s) => Math.abs(s.instances.length - like.instances.length);
    if (same.length) return same.reduce((a, b) => (gap(b) < gap(a) ? b : a));
  }
  return images.reduce((a, b) => (b.instances.length > a.instances.length ? b : a));
}

/** The quick lossy frame (PS3.18 rendered, WebP) of a slice; with the user's window when LINEAR. */
export function lossyUrl(study, inst, frame, win) {
  let u = `/dicomweb/studies/${q(study)}/series/${q(inst.series_uid)}/instances/${q(inst.sop_uid)}/frames/${frame}/rendered?quality=${LOSSY_QUALITY}`;
  if (win && win.fn === "LINEAR") u += `&window=${win.center},${win.width}`;
  return u;
}

function fetchLossy(url) {
  return fetch(url, { credentials: "same-origin", headers: { Accept: "image/webp, image/jpeg;q=0.9" } }).then((r) =>
    r.ok ? r.blob() : Promise.reject(Object.assign(new Error(`HTTP ${r.status}`), { status: r.status })),
  );
}

export const STUDY = params.get("study");
export const PRIOR = params.get("prior");
export const studyRequest = STUDY ? getJson(`/api/viewer/study/${q(STUDY)}`) : null;
export const priorRequest = PRIOR ? getJson(`/api/viewer/study/${q(PRIOR)}`) : null;
studyRequest?.catch(() => {});
priorRequest?.catch(() => {});

// the lossy frame of the slice the viewer opens with, asked for together with the study's list
// (the server chooses it as chooseSeries does: first slice of the largest series)
const first = STUDY
  ? fetch(`/api/viewer/first/${q(STUDY)}?quality=${LOSSY_QUALITY}`, { credentials: "same-origin", headers: { Accept: "image/webp" } })
      .then(async (r) => {
        if (!r.ok) return null;
        const h = r.headers;
        return { sop: h.get("X-Imx-Sop"), frame: Number(h.get("X-Imx-Frame") || "1"), blob: await r.blob() };
      })
      .catch(() => null)
  : Promise.resolve(null);
let firstTaken = false;

/**
 * The lossy frame of slice (inst, frame) as a Blob: the early answer when it is that slice and no
 * window of the user's applies, else /dicomweb/.../rendered.
 */
export async function lossyBlob(study, inst, frame, win) {
  if (!firstTaken && !win && study === STUDY) {
    firstTaken = true;
    const early = await first;
    if (early && early.sop === inst.sop_uid && early.frame === frame) return early.blob;
  }
  return fetchLossy(lossyUrl(study, inst, frame, win));
}
