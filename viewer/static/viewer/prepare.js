// "Prepare for consultation": loads every frame of a study ahead into the browser's cache (the
// lossless frames are immutable, cached for a year), so the viewer later opens with no wait.
//
//   import { prepareStudy } from "/static/viewer/prepare.js";
//   await prepareStudy(studyUid, { onProgress: (done, total) => ..., signal });
//
// Resolves to {done, failed, total}; progress is reported after each frame.

export async function prepareStudy(studyUid, { onProgress = () => {}, concurrency = 4, signal } = {}) {
  const q = encodeURIComponent;
  const r = await fetch(`/api/viewer/study/${q(studyUid)}`, { credentials: "same-origin", headers: { Accept: "application/json" }, signal });
  if (!r.ok) throw Object.assign(new Error(`HTTP ${r.status}`), { status: r.status });
  const study = await r.json();
  const urls = [];
  for (const s of study.series) {
    for (const inst of s.instances) {
      for (let f = 1; f <= (inst.frames || 1); f++) urls.push(`/api/pixels/${q(studyUid)}/${q(s.series_uid)}/${q(inst.sop_uid)}/${f}`);
    }
  }
  let next = 0;
  let done = 0;
  let failed = 0;
  onProgress(0, urls.length);
  async function worker() {
    while (next < urls.length) {
      if (signal && signal.aborted) return;
      const url = urls[next++];
      try {
        const res = await fetch(url, { credentials: "same-origin", signal });
        if (!res.ok) failed += 1;
        await res.arrayBuffer(); // read to the end, so the cache keeps it
      } catch {
        failed += 1;
      }
      done += 1;
      onProgress(done, urls.length);
    }
  }
  await Promise.all(Array.from({ length: Math.max(1, concurrency) }, worker));
  return { done, failed, total: urls.length };
}
