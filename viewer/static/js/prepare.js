// "Prepare for consultation": loads every series' thumbnail, viewer metadata and lossless frames
// of some studies, so that the browser's cache holds them before the consultation (the server
// marks them immutable) and the viewer opens them without waiting on a slow link.

import { api } from "./api.js";

/** Runs `jobs` (functions returning promises) at most `limit` at a time; resolves when all ended. */
async function pool(jobs, limit) {
  let next = 0;
  async function worker() {
    while (next < jobs.length) {
      const job = jobs[next++];
      await job();
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, jobs.length) }, worker));
}

async function fetchBody(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  await r.arrayBuffer(); // read to the end: only a complete body is cached
}

const enc = encodeURIComponent;

/**
 * Loads everything of `studyUids` into the cache; `onProgress({done, total, phase})` is called as
 * it goes (phase "metadata", then "pixels"). Resolves to {total, failed}.
 */
export async function prepareStudies(studyUids, onProgress = () => {}, { concurrency = 6 } = {}) {
  let done = 0;
  let failed = 0;
  let total = 0;
  const report = (phase) => onProgress({ done, total, phase });
  const step = (phase) => async (fn) => {
    try {
      await fn();
    } catch {
      failed += 1;
    }
    done += 1;
    report(phase);
  };

  // the studies' series
  const series = [];
  for (const uid of studyUids) {
    try {
      const study = await api(`/api/studies/${enc(uid)}`);
      for (const s of study.series || []) series.push({ study: uid, series: s.series_uid, thumbnail: s.thumbnail_url, count: s.num_instances || 0 });
    } catch {
      failed += 1;
    }
  }
  // thumbnails and viewer metadata: two per series
  total = series.length * 2;
  report("metadata");
  const frames = [];
  const meta = step("metadata");
  await pool(
    series.flatMap((s) => [
      () => meta(() => fetchBody(s.thumbnail)),
      () =>
        meta(async () => {
          const m = await api(`/api/viewer/series/${enc(s.study)}/${enc(s.series)}`);
          for (const inst of m.instances || []) {
            const n = Math.max(1, Number(inst.frames) || 1);
            for (let f = 1; f <= n; f++) frames.push(`/api/pixels/${enc(s.study)}/${enc(s.series)}/${enc(inst.sop_uid)}/${f}`);
          }
        }),
    ]),
    concurrency,
  );
  // lossless frames
  total += frames.length;
  report("pixels");
  const pix = step("pixels");
  await pool(
    frames.map((url) => () => pix(() => fetchBody(url))),
    concurrency,
  );
  return { total, failed };
}
