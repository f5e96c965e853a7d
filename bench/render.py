#!/usr/bin/env python3
"""Render benchmark: thumbnails and full-size PNG and JPEG renders over HTTP, imx against Orthanc.

Run by hand (it is not a test)::

    .venv/bin/python bench/render.py                      # 200 CT instances, both servers
    .venv/bin/python bench/render.py --count 500 --corpus /tmp/ct-corpus --keep

What it does:

1. Takes the CT corpus of ``bench/ingest.py`` (512x512, 16-bit, ~512 KiB, studies of 100): its
   generator, or ``--corpus DIR`` (generated there when it holds no ``*.dcm``).
2. Starts ``imx serve`` and Orthanc (with Debian's DICOMweb plugin) on fresh data folders and free
   loopback ports, sends the corpus to both with ``storescu``, and waits until imx has rendered its
   preview queue (so background work does not run during the measurement).
3. Requests every instance, one request at a time over one keep-alive connection, per kind:

   - imx ``GET /api/series/{uid}/thumbnail`` (kept series thumbnails), ``GET
     /api/instances/{uid}/rendered`` (the kept 512 px JPEG preview), and, rendered on demand
     (parameters given, so nothing kept is used), ``?format=png`` and ``?format=jpeg`` at full size
     (then ``&window=40,400``: another window of the same instance, warm) for every other
     instance, and DICOMweb ``.../rendered`` for the others (each instance's first on-demand
     render is cold: nothing of it was parsed for one before);
   - Orthanc ``GET /instances/{id}/preview`` (PNG), DICOMweb ``GET .../instances/{uid}/rendered``
     (JPEG) and ``.../thumbnail`` when the plugin has it.

   A few requests warm each kind up first; no ETag is sent, so every answer is a full 200.
   Both servers run side by side, and the kinds compared take turns in blocks of 20 requests
   (``measure_interleaved``): a machine whose load changes during the run (other work, a shared
   CI box) then weighs on both alike, not on whichever ran then.
4. Prints per-request p50/p95 in ms and requests/s for each, then the ratios imx/Orthanc (time per
   request: below 1 means imx is faster). The last line is
   ``imx/orthanc p50: PNG X.XXx, JPEG Y.YYx (imx png A ms, jpeg B ms; orthanc preview C ms, rendered D ms)``.

Every process it starts is stopped and its temporary folders removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench  # noqa: E402  bench/ingest.py: the same corpus, servers and helpers

HOST = ingest_bench.HOST
DICOMWEB_PLUGIN = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)


def log(msg: str) -> None:
    print(msg, flush=True)


class ImxRender(ingest_bench.Imx):
    def __init__(self, workdir: Path, venv: Path, preview_workers: int) -> None:
        super().__init__(workdir, venv)
        self.preview_workers = preview_workers

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        cmd, env, cwd = super().command()
        env["IMX_PREVIEW_WORKERS"] = str(self.preview_workers)
        return cmd, env, cwd

    def pending(self) -> tuple[int, int]:
        """(instances, instances not yet rendered), read from the index (read-only)."""
        db = sqlite3.connect(
            f"file:{self.workdir / 'data' / 'index.sqlite3'}?mode=ro", uri=True, timeout=30
        )
        try:
            total = db.execute("SELECT count(*) FROM instance").fetchone()[0]
            waiting = db.execute(
                "SELECT count(*) FROM instance WHERE preview_status IS NULL AND quarantine IS NULL"
            ).fetchone()[0]
            return int(total), int(waiting)
        finally:
            db.close()

    def tree(self) -> list[tuple[str, str, str]]:
        """(SOP instance UID, study UID, series UID) of every instance, as imx holds them."""
        db = sqlite3.connect(
            f"file:{self.workdir / 'data' / 'index.sqlite3'}?mode=ro", uri=True, timeout=30
        )
        try:
            return list(
                db.execute(
                    "SELECT i.sop_uid, st.study_uid, se.series_uid FROM instance i"
                    " JOIN series se ON se.id = i.series_id JOIN study st ON st.id = se.study_id"
                    " ORDER BY i.id"
                )
            )
        finally:
            db.close()

    def uids(self) -> tuple[list[str], list[str]]:
        """(SOP instance UIDs, series UIDs) as imx holds them (pseudonymous)."""
        db = sqlite3.connect(
            f"file:{self.workdir / 'data' / 'index.sqlite3'}?mode=ro", uri=True, timeout=30
        )
        try:
            sops = [r[0] for r in db.execute("SELECT sop_uid FROM instance ORDER BY id")]
            series = [r[0] for r in db.execute("SELECT series_uid FROM series ORDER BY id")]
            return sops, series
        finally:
            db.close()


class OrthancRender(ingest_bench.Orthanc):
    def command(self) -> tuple[list[str], dict[str, str], Path]:
        cmd, env, cwd = super().command()
        cfg_path = Path(cmd[1])
        cfg = json.loads(cfg_path.read_text())
        plugin = next((p for p in DICOMWEB_PLUGIN if Path(p).exists()), None)
        if plugin is None:
            raise RuntimeError(
                "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
            )
        cfg["Plugins"] = [plugin]
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False}
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return cmd, env, cwd


class Client:
    """One keep-alive HTTP/1.1 connection; ``headers`` go with every request (imx: a token)."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.port = port
        self.headers = dict(headers or {})
        self.conn = http.client.HTTPConnection(HOST, port, timeout=120)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("GET", path, headers={**self.headers, **(headers or {})})
                r = self.conn.getresponse()
                return r.status, r.getheader("Content-Type", ""), r.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, path: str) -> object:
        status, _, body = self.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}")
        return json.loads(body)


@dataclass
class Figure:
    name: str
    times: list[float]  # seconds per request
    errors: int
    bytes: int

    @property
    def p50(self) -> float:
        return statistics.median(self.times) * 1000 if self.times else float("nan")

    @property
    def p95(self) -> float:
        if len(self.times) < 2:
            return self.p50
        return statistics.quantiles(self.times, n=20, method="inclusive")[18] * 1000

    @property
    def rate(self) -> float:
        total = sum(self.times)
        return len(self.times) / total if total else 0.0

    def line(self) -> str:
        avg = self.bytes // max(1, len(self.times))
        err = f", {self.errors} errors" if self.errors else ""
        return f"{self.name:<34} p50 {self.p50:7.2f} ms  p95 {self.p95:7.2f} ms  {self.rate:7.1f}/s  ({len(self.times)} requests, {avg // 1024} KiB avg{err})"


def measure(name: str, client: Client, paths: list[str], expect: str, warmup: int = 5) -> Figure:
    for p in paths[:warmup]:
        client.get(p)
    times: list[float] = []
    errors = total = 0
    for p in paths:
        t0 = time.perf_counter()
        status, ctype, body = client.get(p)
        dt = time.perf_counter() - t0
        if status != 200 or not ctype.startswith(expect):
            errors += 1
            if errors == 1:
                log(f"  {name}: GET {p} -> HTTP {status} {ctype} {body[:200]!r}")
            continue
        times.append(dt)
        total += len(body)
    return Figure(name, times, errors, total)


BLOCK = 20  # requests in a row to one server before the other takes its turn


def measure_interleaved(
    kinds: list[tuple[str, Client, list[str | None], str]], warmup: int = 5, block: int = BLOCK
) -> list[Figure]:
    """One figure per kind (name, client, paths, expected media type). The two servers take
    turns in blocks of ``block`` steps: a server's kinds make the i-th request of each, in the
    order given, then the (i+1)-th... to the end of the block, then the other server's kinds do
    the same steps. A load of the machine that changes during the run (other work, a shared CI
    box) thus weighs on both servers alike, while each answers runs of requests as it would
    alone; a kind's requests for one instance follow each other (a cold render, then a warm one).
    A path None is skipped. The first ``warmup`` steps are not counted."""
    figures = [Figure(name, [], 0, 0) for name, *_ in kinds]
    servers: list[list[int]] = []  # kinds by client, in order of first appearance
    for k, (_, client, _, _) in enumerate(kinds):
        group = next((g for g in servers if kinds[g[0]][1] is client), None)
        if group is None:
            servers.append([k])
        else:
            group.append(k)
    steps = max(len(paths) for _, _, paths, _ in kinds)
    for first in range(0, steps, block):
        for group in servers:
            for i in range(first, min(first + block, steps)):
                for k in group:
                    _, client, paths, expect = kinds[k]
                    fig = figures[k]
                    if i >= len(paths) or paths[i] is None:
                        continue
                    t0 = time.perf_counter()
                    status, ctype, body = client.get(paths[i])  # type: ignore[arg-type]
                    dt = time.perf_counter() - t0
                    if i < warmup:
                        continue
                    if status != 200 or not ctype.startswith(expect):
                        fig.errors += 1
                        if fig.errors == 1:
                            log(
                                f"  {fig.name}: GET {paths[i]} -> HTTP {status} {ctype} {body[:200]!r}"
                            )
                        continue
                    fig.times.append(dt)
                    fig.bytes += len(body)
    return figures


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not done after {timeout:.0f} s")


def send_all(server: ingest_bench.Server, root: Path, scratch: Path, timeout: float) -> None:
    seconds, problems = ingest_bench.send(server, [root], scratch, timeout)
    log(f"{server.name}: corpus sent in {seconds:.1f} s")
    for p in problems:
        log(f"  warning: {p}")


def orthanc_targets(client: Client) -> list[tuple[str, str, str, str]]:
    """(orthanc id, study UID, series UID, SOP instance UID) of every instance."""
    out = []
    studies = {
        s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in client.json("/studies?expand")
    }  # type: ignore[union-attr,index]
    series = {
        s["ID"]: (studies[s["ParentStudy"]], s["MainDicomTags"]["SeriesInstanceUID"])
        for s in client.json("/series?expand")  # type: ignore[union-attr]
    }
    for inst in client.json("/instances?expand"):  # type: ignore[union-attr]
        st, se = series[inst["ParentSeries"]]  # type: ignore[index]
        out.append((inst["ID"], st, se, inst["MainDicomTags"]["SOPInstanceUID"]))  # type: ignore[index]
    return out


def start_imx(args: argparse.Namespace, corpus: Path, scratch: Path, n: int) -> ImxRender:
    server = ImxRender(
        Path(tempfile.mkdtemp(prefix="imx-", dir=scratch)), args.venv, args.preview_workers
    )
    try:
        server.start()
        send_all(server, corpus, server.workdir, 120 + 0.5 * n)
        t0 = time.perf_counter()
        wait_for(
            "imx preview queue",
            lambda: server.pending()[1] == 0 and server.pending()[0] >= n,
            120 + n,
        )
    except BaseException:
        server.stop()
        raise
    log(
        f"imx: background previews of {server.pending()[0]} instances done {time.perf_counter() - t0:.1f} s after the send"
    )
    return server


def start_orthanc(args: argparse.Namespace, corpus: Path, scratch: Path, n: int) -> OrthancRender:
    server = OrthancRender(Path(tempfile.mkdtemp(prefix="orthanc-", dir=scratch)))
    try:
        server.start()
        send_all(server, corpus, server.workdir, 120 + 0.5 * n)
        wait_for("orthanc instances", lambda: server.count() >= n, 60)
    except BaseException:
        server.stop()
        raise
    return server


def run(
    imx_server: ImxRender, orthanc_server: OrthancRender
) -> tuple[dict[str, Figure], dict[str, Figure]]:
    """Every kind of request, imx's and Orthanc's counterparts interleaved (measure_interleaved):
    both servers run side by side, each idle while the other answers."""
    imx: dict[str, Figure] = {}
    orth: dict[str, Figure] = {}
    sops, series = imx_server.uids()
    c = Client(imx_server.http_port, {"Authorization": f"Bearer {imx_server._token()}"})
    o = Client(orthanc_server.http_port)
    targets = orthanc_targets(o)
    dw = [f"/dicom-web/studies/{st}/series/{se}/instances/{sop}" for _, st, se, sop in targets]
    thumbs = [f"/api/series/{s}/thumbnail" for s in series]
    thumbs = (thumbs * (-(-len(sops) // max(1, len(thumbs)))))[
        : len(sops)
    ]  # as many requests as instances
    imx["thumb"] = measure("imx series thumbnail (kept)", c, thumbs, "image/jpeg")
    imx["preview"] = measure(
        "imx preview 512 JPEG (kept)",
        c,
        [f"/api/instances/{u}/rendered" for u in sops],
        "image/jpeg",
    )
    # every instance once cold on each server: imx's even ones through /api (then another window,
    # warm), its odd ones through DICOMweb; each of Orthanc's through DICOMweb (then another window)
    tree = imx_server.tree()
    even: list[str | None] = [u if i % 2 == 0 else None for i, (u, _, _) in enumerate(tree)]
    odd: list[str | None] = [
        f"/dicomweb/studies/{st}/series/{se}/instances/{u}/rendered" if i % 2 else None
        for i, (u, st, se) in enumerate(tree)
    ]
    imx["jpeg"], imx["jpeg_warm"], imx["dw_jpeg"], orth["jpeg"], orth["jpeg_warm"] = (
        measure_interleaved(
            [
                (
                    "imx rendered JPEG (on demand, cold)",
                    c,
                    [f"/api/instances/{u}/rendered?format=jpeg" if u else None for u in even],
                    "image/jpeg",
                ),
                (
                    "imx JPEG, another window (warm)",
                    c,
                    [
                        f"/api/instances/{u}/rendered?format=jpeg&window=40,400" if u else None
                        for u in even
                    ],
                    "image/jpeg",
                ),
                ("imx DICOMweb /rendered JPEG (cold)", c, odd, "image/jpeg"),
                ("orthanc DICOMweb /rendered JPEG", o, [f"{p}/rendered" for p in dw], "image/jpeg"),
                (
                    "orthanc /rendered, another window",
                    o,
                    [f"{p}/rendered?window=40,400,linear" for p in dw],
                    "image/jpeg",
                ),
            ]
        )
    )
    imx["png"], orth["png"] = measure_interleaved(
        [
            (
                "imx rendered PNG (on demand)",
                c,
                [f"/api/instances/{u}/rendered?format=png" for u in sops],
                "image/png",
            ),
            (
                "orthanc /instances/{id}/preview PNG",
                o,
                [f"/instances/{i}/preview" for i, *_ in targets],
                "image/png",
            ),
        ]
    )
    status, _, _ = o.get(f"{dw[0]}/thumbnail")
    if status == 200:
        orth["thumb"] = measure(
            "orthanc DICOMweb /thumbnail", o, [f"{p}/thumbnail" for p in dw], "image/"
        )
    else:
        log(f"orthanc: DICOMweb /thumbnail answers HTTP {status}; not measured")
    return imx, orth


def _interrupt(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=200, help="instances (default 200)")
    ap.add_argument("--corpus", help="folder of *.dcm to reuse; generated there when it holds none")
    ap.add_argument(
        "--preview-workers", type=int, default=1, help="IMX_PREVIEW_WORKERS (default 1)"
    )
    ap.add_argument("--venv", type=Path, default=ingest_bench.REPO / ".venv")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    ap.add_argument("--seed", type=int, default=20240101)
    args = ap.parse_args(argv)
    args.venv = args.venv.expanduser().absolute()
    for tool in ("storescu", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not on PATH")
    signal.signal(signal.SIGTERM, _interrupt)
    scratch = Path(tempfile.mkdtemp(prefix="imx-render-bench-"))
    try:
        if args.corpus:
            root = Path(args.corpus).expanduser().resolve()
            files = sorted(root.rglob("*.dcm")) if root.is_dir() else []
            if len(files) < args.count:
                root.mkdir(parents=True, exist_ok=True)
                log(f"corpus: generating {args.count} instances in {root} ...")
                ingest_bench.generate_corpus(root, args.count, 100, args.seed)
        else:
            root = scratch / "corpus"
            log(f"corpus: generating {args.count} instances ...")
            ingest_bench.generate_corpus(root, args.count, 100, args.seed)
        files = sorted(root.rglob("*.dcm"))[: args.count]
        if len(files) != len(sorted(root.rglob("*.dcm"))):  # send exactly --count
            sub = scratch / "subset"
            sub.mkdir()
            for i, f in enumerate(files):
                (sub / f"{i:06d}.dcm").symlink_to(f)
            root = sub
        n = len(files)
        load = __import__("os").getloadavg()[0]
        log(
            f"corpus: {n} CT instances; machine load average {load:.2f} (other work skews the figures)"
        )
        servers: list[ingest_bench.Server] = []
        try:
            servers.append(start_imx(args, root, scratch, n))
            servers.append(start_orthanc(args, root, scratch, n))
            imx, orth = run(servers[0], servers[1])  # type: ignore[arg-type]
        finally:
            for server in servers:
                server.stop()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    log("")
    for f in [*imx.values(), *orth.values()]:
        log(f.line())
    log("")

    def ratio(a: str, b: str) -> str:
        if a in imx and b in orth and orth[b].p50 > 0:
            return f"{imx[a].p50 / orth[b].p50:.2f}x"
        return "n/a"

    if "thumb" in orth:
        log(f"imx/orthanc thumbnail p50: {ratio('thumb', 'thumb')}")
    log(
        f"imx/orthanc p50: PNG {ratio('png', 'png')}, JPEG {ratio('jpeg', 'jpeg')}, "
        f"JPEG another window {ratio('jpeg_warm', 'jpeg_warm')}, DICOMweb JPEG {ratio('dw_jpeg', 'jpeg')} "
        f"(imx png {imx['png'].p50:.1f} ms, jpeg {imx['jpeg'].p50:.1f} ms, warm {imx['jpeg_warm'].p50:.1f} ms, "
        f"dicomweb {imx['dw_jpeg'].p50:.1f} ms; orthanc preview {orth['png'].p50:.1f} ms, "
        f"rendered {orth['jpeg'].p50:.1f} ms, warm {orth['jpeg_warm'].p50:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
