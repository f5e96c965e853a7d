#!/usr/bin/env python3
"""Viewer benchmark: first image and whole series over emulated slow links, and local
window/level time, in Debian's headless chromium (Playwright).

Run by hand (it is not a test)::

    .venv/bin/python bench/viewer.py                  # 100-slice 512x512 CT
    .venv/bin/python bench/viewer.py --slices 50 --skip-slow-series

What it does:

1. Starts ``imx serve`` on a fresh data folder (free loopback ports), adds a specialist who may
   see all studies, sends a synthetic 100-slice CT (512x512, 16-bit, noisy like a real scan) with
   storescu, and waits until the preview queue is empty (no background rendering during runs).
2. For each link -- 1 Mbit/s with 300 ms round trip, 10 Mbit/s with 100 ms, and unthrottled --
   opens ``/viewer?study=UID`` in a fresh browser context with its cache disabled and the link
   emulated through CDP ``Network.emulateNetworkConditions``, and reads the viewer's hooks:
   ``firstImageAt`` (first image drawn: the quick lossy frame), ``firstLosslessAt`` and
   ``seriesReadyAt`` (every slice lossless), all from navigation start; the first-image figure
   is the median of five openings (``--repeat`` more than the one that waits for the series).
   The whole series at
   1 Mbit/s takes minutes; ``--skip-slow-series`` leaves it out.
3. Window/level frame time: in the page, a synthetic 512x512 CT (12 bits) and a 2048x2500 CR
   (16 bits) are windowed into an ImageData through ``viewer/static/viewer/pixels.js`` (the
   viewer's own code) and put on a canvas, 60 times with changing windows; median and p95 in ms.

The last line: ``first image 1M/300ms X.XX s, 10M/100ms Y.YY s; series ready 10M/100ms Z.Z s
(1M/300ms W s, local V s); W/L 512x512 CT A.AA ms, 2048x2500 CR B.BB ms``.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from browser import CHROMIUM, CHROMIUM_ARGS, ViewerServer  # noqa: E402
from test_viewer_browser import make_ct  # noqa: E402

PASSWORD = "bench-pass-1"
LINKS = [("1M/300ms", 1000, 300), ("10M/100ms", 10_000, 100), ("local", None, 0)]

WINDOW_BENCH = """async ([w, h, bits, runs]) => {
  const { renderFrame } = await import('/static/viewer/pixels.js');
  const n = w * h;
  const values = new Uint16Array(n);
  let seed = 7;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    const r = Math.hypot(x - w / 2, y - h / 2) / (w / 2);
    const v = (r < 0.85 ? 0.55 : 0.05) * (1 << bits) + ((seed >> 8) % 64) - 32;
    values[y * w + x] = Math.max(0, Math.min((1 << bits) - 1, v));
  }
  const frame = { width: w, height: h, color: false, values, offset: 0, slope: 1,
                  intercept: bits === 12 ? -1024 : 0, low: 0, high: (1 << bits) - 1 };
  const canvas = document.createElement('canvas');
  canvas.width = w; canvas.height = h;
  document.body.append(canvas);
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(w, h);
  const times = [];
  const cache = {};
  for (let i = 0; i < runs + 5; i++) {
    const win = { center: 40 + i * 3, width: 400 + i * 7, fn: 'LINEAR', invert: false };
    const t0 = performance.now();
    renderFrame(frame, img, win, cache);
    ctx.putImageData(img, 0, 0);
    const dt = performance.now() - t0;
    if (i >= 5) times.push(dt);
  }
  canvas.remove();
  times.sort((a, b) => a - b);
  return { median: times[Math.floor(times.length / 2)], p95: times[Math.floor(times.length * 0.95)] };
}"""


def wait_previews(server: ViewerServer, timeout: float = 300.0) -> None:
    db = server.data_dir / "index.sqlite3"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as c:
            (pending,) = c.execute("SELECT count(*) FROM instance WHERE preview_status IS NULL").fetchone()
        if pending == 0:
            return
        time.sleep(0.5)
    raise SystemExit("the preview queue did not empty in time")


def open_once(browser, server: ViewerServer, study: str, kbit: float | None, latency: float, whole: bool, wait_s: float) -> dict:  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        r = page.request.post(f"{server.base_url}/api/login", data={"name": "spec", "password": PASSWORD})
        assert r.ok, r.text()
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        if kbit is not None:
            rate = kbit * 1000 / 8
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": latency, "downloadThroughput": rate, "uploadThroughput": rate})
        page.goto(f"{server.base_url}/viewer?study={study}")
        page.wait_for_function("() => window.__imx && window.__imx.firstImageAt !== null", timeout=120_000)
        out = {"first": page.evaluate("() => window.__imx.firstImageAt") / 1000}
        page.wait_for_function("() => window.__imx.firstLosslessAt !== null", timeout=120_000)
        out["lossless"] = page.evaluate("() => window.__imx.firstLosslessAt") / 1000
        out["ready"] = None
        if whole:
            page.wait_for_function("() => window.__imx.seriesReadyAt !== null", timeout=wait_s * 1000)
            out["ready"] = page.evaluate("() => window.__imx.seriesReadyAt") / 1000
        return out
    finally:
        context.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--skip-slow-series", action="store_true", help="do not wait for the whole series at 1 Mbit/s")
    ap.add_argument("--repeat", type=int, default=4, help="extra openings per link for the median first-image time")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="imx-bench-viewer-"))
    server = ViewerServer(tmp / "data")
    try:
        server.start()
        server.add_user("spec", PASSWORD, "specialist", all_studies=True)
        files = make_ct(tmp / "ct", args.slices, size=512, seed=3)
        t0 = time.monotonic()
        study = server.send_ct(files=files).study_uid
        print(f"sent {len(files)} CT slices in {time.monotonic() - t0:.1f} s; waiting for the preview queue")
        wait_previews(server)
        results: dict[str, dict] = {}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                for name, kbit, latency in LINKS:
                    whole = not (name == "1M/300ms" and args.skip_slow_series)
                    firsts = [open_once(browser, server, study, kbit, latency, False, 0)["first"] for _ in range(args.repeat)]
                    r = open_once(browser, server, study, kbit, latency, whole, wait_s=900)
                    r["first"] = statistics.median([*firsts, r["first"]])
                    results[name] = r
                    ready = f"{r['ready']:.1f} s" if r["ready"] is not None else "not measured"
                    print(f"{name:>10}: first image (median) {r['first']:.2f} s, first lossless {r['lossless']:.2f} s, series ready {ready}")
                context = browser.new_context()
                page = context.new_page()
                r = page.request.post(f"{server.base_url}/api/login", data={"name": "spec", "password": PASSWORD})
                page.goto(f"{server.base_url}/viewer")
                ct = page.evaluate(WINDOW_BENCH, [512, 512, 12, 60])
                cr = page.evaluate(WINDOW_BENCH, [2048, 2500, 16, 60])
                context.close()
            finally:
                browser.close()
        print(f"window/level 512x512 CT: median {ct['median']:.2f} ms, p95 {ct['p95']:.2f} ms")
        print(f"window/level 2048x2500 CR: median {cr['median']:.2f} ms, p95 {cr['p95']:.2f} ms")
        slow_ready = results["1M/300ms"]["ready"]
        print(
            f"first image 1M/300ms {results['1M/300ms']['first']:.2f} s, 10M/100ms {results['10M/100ms']['first']:.2f} s; "
            f"series ready 10M/100ms {results['10M/100ms']['ready']:.1f} s "
            f"(1M/300ms {f'{slow_ready:.0f} s' if slow_ready is not None else 'not measured'}, local {results['local']['ready']:.1f} s); "
            f"W/L 512x512 CT {ct['median']:.2f} ms, 2048x2500 CR {cr['median']:.2f} ms"
        )
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
