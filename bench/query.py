#!/usr/bin/env python3
"""Query benchmark: QIDO-RS, WADO-RS and C-FIND of imx against Orthanc (+ its DICOMweb plugin),
both on this machine, on the same instances.

Run by hand (it is not a test)::

    .venv/bin/python bench/query.py                       # 1,000 studies x 100 instances
    .venv/bin/python bench/query.py --studies 100         # 10,000 instances
    .venv/bin/python bench/query.py --only imx --keep

What it does:

1. Generates the archive directly through the Index and Store APIs (no C-STORE, no
   de-identification: the objects are written as if already de-identified): ``--studies`` studies
   of ``--per-study`` instances in 2 series, one partner ("BENCH"), 128x128 16-bit CT/MR objects in
   Explicit VR Little Endian (~33 KiB), two studies per patient, study dates spread over 8 years,
   realistic descriptions. Objects are put in parallel threads (each put fsyncs), rows are added
   one instance at a time with SQLite's ``synchronous=OFF`` for the generation only. The rows stay
   in the preview queue, as after an ack.
2. Starts ``imx serve`` on that data folder and waits (timed) until its post-ack pipeline has
   settled every instance: a preview, the series thumbnails and the WADO-RS metadata kept in the
   index (``--skip-pipeline``: none of it; metadata is then made on request). Starts Debian's
   Orthanc with the DICOMweb plugin on a fresh folder (no compression, no fsync), and loads the
   very same object bytes into Orthanc with ``POST /instances`` (several threads): its own ingest
   processing, timed too. imx is asked with an admin's API token (every route needs a caller).
3. Measures, on each server, the same requests: QIDO-RS study searches (all studies, first page
   of 100; by PatientID; by PatientName wildcard; by StudyDate range: p50/p95 over ``--repeat``
   requests with varying values), WADO-RS series metadata (p50/p95), WADO-RS series retrieve
   (multipart/related application/dicom, MB/s over ``--series`` series), and C-FIND study queries
   by PatientID (pynetdicom as the SCU, one association per query, TCP_NODELAY: p50/p95).
4. Prints a table; the last line gives imx's p95 (or MB/s) over Orthanc's for each measure.

Everything listens on 127.0.0.1 on free ports; every process it starts is stopped; its temporary
folder is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOST = "127.0.0.1"
PARTNER = ("BENCH", "BENCHPACS")
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DESCRIPTIONS = ["CT THORAX WITH CONTRAST", "CT CHEST LOW DOSE", "CT ABDOMEN PELVIS", "MR BRAIN", "CT HEAD", "MR KNEE RIGHT"]


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not answering after {timeout} s")


def stop(proc: subprocess.Popen | None, grace: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# ---------------------------------------------------------------------------------------------
# the archive
# ---------------------------------------------------------------------------------------------
@dataclass
class StudyFacts:
    uid: str
    patient: str
    date: str
    series: list[str] = field(default_factory=list)


def _uid(*parts: int) -> str:
    """A UID of fixed length (44): objects are made by patching one template's bytes."""
    return "2.25.1" + str(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:15], "big")).zfill(38)


_MARK_UID = "2.25.1" + "9" * 38  # placeholders of the same length as what replaces them
_MARK_NUMBER = "999999"
_NUMBER_ELEMENT = b"\x20\x00\x13\x00IS\x06\x00"  # (0020,0013) Instance Number, IS, 6 bytes (explicit VR LE)


def _template(rows: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "ACME Medical"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "imx bench (generated)"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-90.0, -90.0, 0.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    return ds


def generate(data_dir: Path, studies: int, per_study: int, rows: int, threads: int, skip_pipeline: bool = False) -> list[StudyFacts]:
    """Write the archive through ``storage.objects`` and ``storage.index``; returns its studies.
    The rows are left in the preview queue (what the post-ack pipeline of ``imx serve`` renders
    and computes metadata for), unless ``skip_pipeline``."""
    from sqlalchemy import event as sa_event
    from sqlalchemy import text, update

    from imx.config import Settings, ensure_layout
    from storage.index import Index, Instance, InstanceRecord
    from storage.objects import FileSystemStore, Payload, make_key

    settings = Settings.load(data_dir=data_dir)
    ensure_layout(settings)
    index = Index(settings.effective_database_url)
    index.migrate()
    # generation only: no fsync per commit (the server later opens the database normally)
    sa_event.listen(index.write_engine, "connect", lambda c, _r: c.execute("PRAGMA synchronous=OFF"))
    index.write_engine.dispose()
    partner = index.add_partner(*PARTNER)
    store = FileSystemStore(settings.objects_dir)
    rng = np.random.default_rng(7)
    ds = _template(rows)
    series_per_study = 2
    per_series = max(1, per_study // series_per_study)
    facts: list[StudyFacts] = []
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    t0 = time.perf_counter()
    done = 0
    pending: tuple[list[concurrent.futures.Future], list[InstanceRecord]] | None = None
    for s in range(studies):
        patient = f"BENCH-{s // 2:06X}"
        date = time.strftime("%Y%m%d", time.gmtime(1420070400 + (s * 7919 % 2920) * 86400))  # 2015..2022
        desc = DESCRIPTIONS[s % len(DESCRIPTIONS)]
        modality, sop_class = ("MR", MR) if desc.startswith("MR") else ("CT", CT)
        st = StudyFacts(_uid(s), patient, date)
        ds.PatientName = ds.PatientID = patient
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyDescription = st.uid, date, "101500", desc
        ds.AccessionNumber, ds.StudyID = f"ACC{s:07d}", str(s % 1000)
        ds.Modality, ds.SOPClassUID = modality, sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        pixels = rng.integers(0, 4096, size=(rows, rows), dtype=np.uint16).tobytes()
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        batch: list[tuple[str, bytes, InstanceRecord]] = []
        for se in range(series_per_study):
            series_uid = _uid(s, se)
            st.series.append(series_uid)
            ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, se + 1
            ds.SeriesDescription = f"{desc} SERIES {se + 1}"
            # one pydicom write per series; instances differ in SOP Instance UID and number only
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _MARK_UID
            ds.InstanceNumber = _MARK_NUMBER
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            template = buf.getvalue()
            number = _NUMBER_ELEMENT + _MARK_NUMBER.encode()
            assert template.count(_MARK_UID.encode()) == 2 and template.count(number) == 1
            for i in range(per_series):
                sop = _uid(s, se, i)
                data = template.replace(_MARK_UID.encode(), sop.encode()).replace(number, _NUMBER_ELEMENT + f"{i + 1:<6d}".encode())
                key = make_key("i", hashlib.sha256(sop.encode()).hexdigest())
                rec = InstanceRecord(
                    partner_id=partner.id, patient_pseudonym=patient, study_uid=st.uid, series_uid=series_uid,
                    sop_uid=sop, sop_class_uid=sop_class, transfer_syntax=ExplicitVRLittleEndian, object_key=key,
                    sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), patient_sex="O", study_date=date,
                    study_time="101500", accession=f"ACC{s:07d}", study_id=str(s % 1000), study_description=desc,
                    modality=modality, series_number=se + 1, series_description=ds.SeriesDescription,
                    body_part="CHEST", instance_number=i + 1, rows=rows, columns=rows, frames=None,
                )
                batch.append((key, data, rec))
        # objects of this study are written (threads) while the rows of the previous one are added;
        # a row is added only once its object is stored
        puts = [pool.submit(store.put, key, Payload(data=data)) for key, data, _rec in batch]
        if pending is not None:
            done += _commit(index, *pending)
        pending = (puts, [rec for _k, _d, rec in batch])
        facts.append(st)
        if (s + 1) % max(1, studies // 10) == 0:
            log(f"  generated {done:,} instances ({done / (time.perf_counter() - t0):,.0f}/s)")
    if pending is not None:
        done += _commit(index, *pending)
    pool.shutdown()
    if skip_pipeline:  # the old way: nothing for the render workers to do, metadata made on request
        with index.write() as sess:
            sess.execute(update(Instance).values(preview_status="unrenderable", preview_reason="bench data"))
            sess.execute(text("SELECT 1"))
    index.close()
    return facts


def facts_of(studies: int, per_study: int) -> list[StudyFacts]:
    """The studies ``generate`` writes for these arguments (UIDs, patients and dates are derived
    from the study number), for measuring again on a kept archive (``--reuse``)."""
    out = []
    for s in range(studies):
        date = time.strftime("%Y%m%d", time.gmtime(1420070400 + (s * 7919 % 2920) * 86400))
        out.append(StudyFacts(_uid(s), f"BENCH-{s // 2:06X}", date, [_uid(s, se) for se in range(2)]))
    return out


def _commit(index: object, puts: list[concurrent.futures.Future], records: list) -> int:
    for f in puts:
        f.result()  # raises if an object could not be written
    for rec in records:
        index.add_instance(rec)  # type: ignore[attr-defined]
    return len(records)


# ---------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------
class Server:
    name = ""
    aet = ""
    qido_root = ""

    def __init__(self) -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.headers: dict[str, str] = {}  # sent with every HTTP request (imx: an API token)

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.http_port}{self.qido_root}{path}"


class Imx(Server):
    name, aet, qido_root = "imx", "IMX", "/dicomweb"

    def __init__(self, data_dir: Path, venv: Path, preview_workers: int = 0) -> None:
        super().__init__()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMX_")}
        env.update(
            IMX_DATA_DIR=str(data_dir), IMX_DICOM_PORT=str(self.dicom_port), IMX_HTTP_PORT=str(self.http_port),
            IMX_HOST=HOST, IMX_AE_TITLE=self.aet, TCP_NODELAY="1",
        )
        if preview_workers:
            env["IMX_PREVIEW_WORKERS"] = str(preview_workers)
        self.data_dir = data_dir
        self.log = open(data_dir.parent / "imx.log", "ab")
        self.proc = subprocess.Popen([str(venv / "bin" / "imx"), "serve"], env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://{HOST}:{self.http_port}/healthz", self.proc, 120)
        _wait_port(self.dicom_port, self.proc)
        # every route but /healthz needs a caller: an admin's API token, as a client would send
        run = {"env": env, "capture_output": True, "text": True, "timeout": 120}
        imx = str(venv / "bin" / "imx")
        add = subprocess.run([imx, "user", "add", "bench", "--role", "admin"], input="bench-password\n", **run)
        if add.returncode != 0 and "exists" not in add.stderr:
            raise RuntimeError(f"imx user add failed: {add.stderr}")
        tok = subprocess.run([imx, "user", "token", "bench"], **run)
        if tok.returncode != 0:
            raise RuntimeError(f"imx user token failed: {tok.stderr}")
        self.headers = {"Authorization": f"Bearer {tok.stdout.strip()}"}

    def queue(self) -> tuple[int, int, int]:
        """(instances, instances the post-ack pipeline has not settled yet, metadata rows kept),
        read from the index (read-only)."""
        db = sqlite3.connect(f"file:{self.data_dir / 'index.sqlite3'}?mode=ro", uri=True, timeout=30)
        try:
            total = db.execute("SELECT count(*) FROM instance").fetchone()[0]
            waiting = db.execute("SELECT count(*) FROM instance WHERE preview_status IS NULL AND quarantine IS NULL").fetchone()[0]
            kept = db.execute("SELECT count(*) FROM instance_metadata").fetchone()[0]
            return total, waiting, kept
        finally:
            db.close()

    def drain(self, started: float, timeout: float) -> float:
        """Wait until the post-ack pipeline (previews, thumbnails, metadata) has settled every
        instance; returns the seconds since ``started``."""
        deadline = time.monotonic() + timeout
        last = 0.0
        while time.monotonic() < deadline:
            total, waiting, kept = self.queue()
            if not waiting:
                return time.perf_counter() - started
            if time.monotonic() - last > 30:
                done = total - waiting
                log(f"  imx pipeline: {done:,} of {total:,} settled, {kept:,} metadata kept ({done / (time.perf_counter() - started):,.0f}/s)")
                last = time.monotonic()
            time.sleep(1)
        raise TimeoutError("the post-ack pipeline did not settle in time")


class Orthanc(Server):
    name, aet, qido_root = "orthanc", "ORTHANC", "/dicom-web"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "imx-bench-query",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "StorageCompression": False,
            "SyncStorageArea": False,
            "Plugins": [ORTHANC_DICOMWEB],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"bench": [PARTNER[1], HOST, 104]},
            "LuaScripts": [],
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = open(workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(
            ["Orthanc", str(workdir / "orthanc.json")], env={**os.environ, "TCP_NODELAY": "1"}, cwd=workdir,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(f"http://{HOST}:{self.http_port}/system", self.proc, 120)
        _wait_port(self.dicom_port, self.proc)

    def load(self, objects: list[Path], threads: int) -> float:
        """POST every object to /instances; returns instances/s."""
        url = f"http://{HOST}:{self.http_port}/instances"

        def post(p: Path) -> None:
            req = urllib.request.Request(url, data=p.read_bytes(), method="POST", headers={"Content-Type": "application/dicom"})
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for n, _ in enumerate(pool.map(post, objects), 1):
                if n % max(1, len(objects) // 10) == 0:
                    log(f"  orthanc loaded {n:,} ({n / (time.perf_counter() - t0):,.0f}/s)")
        return len(objects) / (time.perf_counter() - t0)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def http_get(url: str, accept: str = "application/dicom+json", headers: dict[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept, **(headers or {})})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read()


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm-up (caches, connections): not counted
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def cfind(port: int, called: str, patient: str) -> int:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    def nodelay(event: evt.Event) -> None:
        with contextlib.suppress(OSError, AttributeError):
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=PARTNER[1])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise RuntimeError(f"C-FIND association to {called} refused")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID, q.StudyInstanceUID, q.StudyDate, q.StudyDescription, q.ModalitiesInStudy = patient, "", "", "", ""
    n = 0
    for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
            n += 1
    assoc.release()
    return n


@dataclass
class Figures:
    ms: dict[str, list[float]] = field(default_factory=dict)
    mbps: float = 0.0


def measure(server: Server, facts: list[StudyFacts], repeat: int, n_series: int, seed: int) -> Figures:
    rnd = random.Random(seed)  # the same sample for both servers
    fig = Figures()
    studies = lambda: rnd.choice(facts)  # noqa: E731

    def qido(params: Callable[[], dict[str, str]], expect_some: bool = True) -> Callable[[], object]:
        def run() -> None:
            # '*' unencoded: Orthanc 1.10's DICOMweb plugin does not decode %2A (it then matches nothing)
            body = http_get(server.url("/studies?" + urllib.parse.urlencode(params(), safe="*")), headers=server.headers)
            if expect_some and not json.loads(body or b"[]"):
                raise RuntimeError(f"{server.name}: a QIDO-RS search that should match found nothing")

        return run

    def date_range() -> dict[str, str]:
        d = studies().date
        return {"StudyDate": f"{d[:6]}01-{d[:6]}31", "limit": "100"}

    fig.ms["qido all studies"] = timed(qido(lambda: {"limit": "100"}), repeat)
    fig.ms["qido by PatientID"] = timed(qido(lambda: {"PatientID": studies().patient}), repeat)
    fig.ms["qido by name wildcard"] = timed(qido(lambda: {"PatientName": studies().patient[:-1] + "*", "limit": "100"}), repeat)
    fig.ms["qido by date range"] = timed(qido(date_range), repeat)

    def metadata() -> None:
        st = studies()
        body = http_get(server.url(f"/studies/{st.uid}/series/{rnd.choice(st.series)}/metadata"), headers=server.headers)
        if not json.loads(body):
            raise RuntimeError(f"{server.name}: empty series metadata")

    fig.ms["series metadata"] = timed(metadata, max(10, repeat // 2))

    total, seconds = 0, 0.0
    for _ in range(n_series):
        st = studies()
        url = server.url(f"/studies/{st.uid}/series/{rnd.choice(st.series)}")
        t0 = time.perf_counter()
        total += len(http_get(url, accept='multipart/related; type="application/dicom"', headers=server.headers))
        seconds += time.perf_counter() - t0
    fig.mbps = total / seconds / 1e6

    called = server.aet
    fig.ms["c-find by PatientID"] = timed(lambda: cfind(server.dicom_port, called, studies().patient), repeat)
    return fig


def report(name: str, fig: Figures) -> None:
    for what, values in fig.ms.items():
        log(f"  {name:<8} {what:<24} p50 {p(values, 50):8.1f} ms   p95 {p(values, 95):8.1f} ms")
    log(f"  {name:<8} {'wado-rs series retrieve':<24} {fig.mbps:8.1f} MB/s")


def _interrupt(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--per-study", type=int, default=100)
    ap.add_argument("--rows", type=int, default=128, help="image size (rows = columns), 16 bits per pixel")
    ap.add_argument("--repeat", type=int, default=60, help="requests per latency figure")
    ap.add_argument("--series", type=int, default=20, help="series retrieved for the MB/s figure")
    ap.add_argument("--threads", type=int, default=8, help="threads writing objects / loading Orthanc")
    ap.add_argument("--only", choices=("imx", "orthanc"))
    ap.add_argument("--preview-workers", type=int, default=0, help="IMX_PREVIEW_WORKERS (0: imx's default)")
    ap.add_argument("--skip-pipeline", action="store_true", help="mark the rows settled: no post-ack work, metadata made on request")
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", type=Path, help="a folder kept by --keep: measure again on its archive (same --studies/--per-study)")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv")
    args = ap.parse_args(argv)

    if args.only != "imx" and (shutil.which("Orthanc") is None or not Path(ORTHANC_DICOMWEB).exists()):
        print("Orthanc and its DICOMweb plugin are needed: apt-get install -y orthanc orthanc-dicomweb", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # stop the servers and clean up on kill, too
    scratch = args.reuse or Path(tempfile.mkdtemp(prefix="imx-bench-query-", dir=args.tmp))
    servers: list[Server] = []
    try:
        n = args.studies * (args.per_study // 2) * 2
        if args.reuse:
            log(f"load average {os.getloadavg()[0]:.2f}; measuring again on {scratch} ({n:,} instances)")
            facts = facts_of(args.studies, args.per_study)
            shutil.rmtree(scratch / "orthanc", ignore_errors=True)
        else:
            log(f"load average {os.getloadavg()[0]:.2f}; generating {args.studies:,} studies, {n:,} instances in {scratch}")
            t0 = time.perf_counter()
            facts = generate(scratch / "imx" / "data", args.studies, args.per_study, args.rows, args.threads, args.skip_pipeline)
            log(f"  generated in {time.perf_counter() - t0:.0f} s")
        results: dict[str, Figures] = {}
        ingest_notes: list[str] = []
        kinds = [k for k in ("imx", "orthanc") if args.only in (None, k)]
        for kind in kinds:
            if kind == "imx":
                started = time.perf_counter()
                server: Server = Imx(scratch / "imx" / "data", args.venv, args.preview_workers)
                if not args.skip_pipeline:
                    seconds = server.drain(started, timeout=6 * 3600)  # type: ignore[attr-defined]
                    total, _waiting, kept = server.queue()  # type: ignore[attr-defined]
                    note = f"imx post-ack pipeline (preview, thumbnail, metadata): {total:,} instances in {seconds:.0f} s ({total / seconds:,.0f}/s), {kept:,} metadata kept"
                    if args.reuse:
                        note = f"imx post-ack pipeline: what a kept archive still had queued settled in {seconds:.0f} s; {kept:,} metadata kept"
                    ingest_notes.append(note)
                    log("  " + note)
            else:
                server = Orthanc(scratch / "orthanc")
                objects = sorted((scratch / "imx" / "data" / "objects" / "i").rglob("*.dcm"))
                rate = server.load(objects, args.threads)
                ingest_notes.append(f"orthanc POST /instances (its ingest): {len(objects):,} instances at {rate:,.0f}/s")
                log(f"  orthanc loaded {len(objects):,} instances at {rate:,.0f}/s")
            servers.append(server)
            log(f"measuring {kind}")
            results[kind] = measure(server, facts, args.repeat, args.series, seed=11)
            stop(server.proc)
        log(f"\n{n:,} instances, {args.studies:,} studies, {args.rows}x{args.rows} 16-bit objects; load average {os.getloadavg()[0]:.2f}")
        for note in ingest_notes:
            log("  " + note)
        for kind, fig in results.items():
            report(kind, fig)
        if len(results) == 2:
            a, b = results["imx"], results["orthanc"]
            parts = [f"{k} p95 {p(a.ms[k], 95) / p(b.ms[k], 95):.2f}x" for k in a.ms]
            parts.append(f"wado-rs MB/s {a.mbps / b.mbps:.2f}x")
            log(f"imx/orthanc at {n:,} instances (p95 ratio: below 1 = imx faster; MB/s: above 1 = imx faster): " + ", ".join(parts))
        return 0
    finally:
        for s in servers:
            stop(s.proc)
        if args.keep or args.reuse:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
