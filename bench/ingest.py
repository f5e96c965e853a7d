#!/usr/bin/env python3
"""Ingest benchmark: C-STORE throughput of imx against Orthanc, both on this machine.

Run by hand (it is not a test)::

    .venv/bin/python bench/ingest.py                       # 2,000 instances, both servers
    .venv/bin/python bench/ingest.py --count 200 --only orthanc
    .venv/bin/python bench/ingest.py --corpus /tmp/ct-corpus --keep

What it does:

1. Generates a corpus of CT Image Storage instances (512x512, 16 bits allocated, Explicit VR
   Little Endian, ~512 KiB each) spread over studies of 100 instances, or reuses ``--corpus DIR``
   (generated into DIR when it holds no ``*.dcm`` file yet).
2. For each server (imx, Orthanc) and each association count (1, then 4): starts the server on a
   fresh data folder and free ports on 127.0.0.1, waits until ``echoscu`` succeeds, sends the whole
   corpus with dcmtk's ``storescu`` (one process per association, the corpus split in contiguous
   parts), times from the first ``storescu`` start to the last one's exit, counts what the server
   holds, and stops it. A fresh server per run means no instance is ever a duplicate.
3. Prints instances/s per run; the last line is
   ``imx/orthanc at 4 associations: X.XXx (imx N/s, orthanc M/s)``.

Every process it starts is stopped (SIGTERM, then SIGKILL) and its temporary folders removed unless
``--keep``. Every wait has a timeout. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CALLING_AE = "DEMOPACS"  # the demo partner imx creates at first start
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ROWS = COLS = 512
# dcmtk disables Nagle only when asked; without it every C-STORE stalls ~40 ms on delayed ACKs.
DCMTK_ENV = {"TCP_NODELAY": "1"}
# Go on after a refused instance (-nh), send every file under the folder (+sd +r), bounded waits.
STORESCU_OPTS = ["-nh", "+sd", "+r", "-to", "10", "-ta", "30", "-ts", "60"]


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------

FAMILY = [
    "MUELLER",
    "SCHMIDT",
    "DUBOIS",
    "MARTIN",
    "ROSSI",
    "GARCIA",
    "JANSEN",
    "NOWAK",
    "SILVA",
    "KOWALSKI",
    "PETERS",
    "LAMBERT",
    "FISCHER",
    "BERNARD",
    "RICCI",
    "LOPEZ",
    "DE VRIES",
    "HORVATH",
    "NIELSEN",
    "WEBER",
]
GIVEN = [
    "ANNA",
    "LUKAS",
    "MARIE",
    "JONAS",
    "ELENA",
    "MARCO",
    "SOFIA",
    "PIETER",
    "EVA",
    "TOMASZ",
    "LEA",
    "HUGO",
    "CLARA",
    "MATTEO",
    "INES",
    "KAREL",
    "NORA",
    "FELIX",
    "AGNES",
    "MIGUEL",
]
DESCRIPTIONS = [
    ("CT THORAX WITH CONTRAST", "CHEST"),
    ("CT CHEST LOW DOSE", "CHEST"),
    ("CT ABDOMEN PELVIS", "ABDOMEN"),
    ("CT THORAX ABDOMEN", "CHEST"),
]


def ct_template() -> Dataset:
    """One CT Image Storage dataset; per instance only UIDs, positions and pixels change."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "IMX_BENCH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "080000"
    ds.AccessionNumber = "A0000000"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = "Hospital Bench"
    ds.ReferringPhysicianName = "REFERRER^PAT"
    ds.StationName = "CT01"
    ds.StudyDescription = DESCRIPTIONS[0][0]
    ds.SeriesDescription = "AXIAL 1.0 B30f"
    ds.ManufacturerModelName = "Bench CT 128"
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "P0000000"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.PatientAge = "064Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500.0"
    ds.ReconstructionDiameter = "380.0"
    ds.GantryDetectorTilt = "0.0"
    ds.TableHeight = "150.0"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-190.0, -190.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLS
    ds.PixelSpacing = [0.742188, 0.742188]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = bytes(ROWS * COLS * 2)
    ds["PixelData"].VR = "OW"
    return ds


def phantom_slice(z: float) -> np.ndarray:
    """A chest-like axial slice in HU at relative height z in [0, 1] (0 = upper abdomen, 1 = apex)."""
    spacing = 0.742188
    c = (np.arange(ROWS) - ROWS / 2 + 0.5) * spacing  # mm from the centre
    hu = np.full((ROWS, COLS), -1000, dtype=np.int16)

    def fill(cx: float, cy: float, a: float, b: float, value: int) -> None:
        # Only the ellipse's bounding box is computed: ~10x faster than the whole grid.
        r0, r1 = np.searchsorted(c, [cy - b, cy + b])
        c0, c1 = np.searchsorted(c, [cx - a, cx + a])
        yy = ((c[r0:r1, None] - cy) / b) ** 2
        xx = ((c[None, c0:c1] - cx) / a) ** 2
        hu[r0:r1, c0:c1][xx + yy <= 1.0] = value

    a, b = 165 - 15 * z, 115 - 10 * z
    fill(0, 5, a, b, -100)  # subcutaneous fat
    fill(0, 5, a - 12, b - 10, 40)  # soft tissue
    lung = 0.4 + 0.5 * z  # the lungs grow towards the apex
    for side in (-1, 1):
        fill(side * 62, -5, 45 * lung + 10, 60 * lung + 8, -850)
    heart = max(0.0, 1 - abs(z - 0.35) * 2.2)
    if heart > 0:
        fill(18, -15, 45 * heart + 1, 38 * heart + 1, 45)
    fill(0, 20, 14, 14, 140)  # aorta with contrast
    fill(0, 72, 22, 20, 700)  # vertebral body
    fill(0, 72, 14, 12, 250)  # cancellous bone
    fill(0, 97, 7, 12, 900)  # spinous process
    for ang in np.deg2rad([-150, -115, -65, -30, 30, 150]):  # ribs, just inside the body wall
        fill((a - 17) * np.cos(ang), 5 + (b - 15) * np.sin(ang), 7, 5, 800)
    r0, r1 = np.searchsorted(c, [150, 158])
    c0, c1 = np.searchsorted(c, [-180, 180])
    hu[r0:r1, c0:c1] = 200  # table
    return hu


@dataclass
class Corpus:
    root: Path
    files: list[Path]
    generated: bool = False
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


@functools.lru_cache(maxsize=1)
def _anatomy(levels: int) -> list[np.ndarray]:
    """Slices at a few heights, computed once per process (stored value = HU + 1024)."""
    return [phantom_slice(j / max(1, levels - 1)) + np.int16(1024) for j in range(levels)]


def generate_study(root: Path, study: int, n: int, per_study: int, seed: int) -> list[Path]:
    """One study of one patient: one series of n axial slices, in root/studyNNNN/."""
    rng = np.random.default_rng([seed, study])
    ds = ct_template()
    levels = max(1, min(per_study, 25))
    sdir = root / f"study{study:04d}"
    sdir.mkdir(parents=True, exist_ok=True)
    desc, part = DESCRIPTIONS[study % len(DESCRIPTIONS)]
    ds.PatientName = (
        f"{FAMILY[study % len(FAMILY)]}^{GIVEN[(study * 7 + study // len(FAMILY)) % len(GIVEN)]}"
    )
    ds.PatientID = f"P{1000000 + study * 7919:07d}"
    birth = 1940 + int(rng.integers(0, 60))
    ds.PatientBirthDate = f"{birth}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    ds.PatientSex = "F" if study % 2 else "M"
    ds.PatientAge = f"{2024 - birth:03d}Y"
    day = f"2024{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    tm = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = tm
    ds.AccessionNumber = f"ACC{2400000 + study}"
    ds.StudyID = str(study + 1)
    ds.StudyDescription = desc
    ds.BodyPartExamined = part
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    # This patient: positioned a little off centre, a slightly different tissue level.
    shift = (int(rng.integers(-12, 13)), int(rng.integers(-12, 13)))
    level = np.int16(rng.integers(-15, 16))
    bases = [np.roll(b, shift, axis=(0, 1)).ravel() + level for b in _anatomy(levels)]
    z0 = float(rng.uniform(-350, -250))
    # A pool of quantum noise; each slice takes a random window of it so no two pixel blocks match.
    npix = ROWS * COLS
    noise = np.rint(rng.normal(0.0, 12.0, size=npix * 2)).astype(np.int16)
    img = np.empty(npix, dtype=np.int16)
    files = []
    for k in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        z = round(z0 + k * 1.0, 1)
        ds.ImagePositionPatient = [-190.0, -190.0, z]
        ds.SliceLocation = str(z)
        off = int(rng.integers(0, noise.size - npix))
        np.add(bases[k * levels // per_study], noise[off : off + npix], out=img)
        np.clip(img, 0, 4095, out=img)
        ds.PixelData = img.view("<u2").tobytes()
        path = sdir / f"CT{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def generate_corpus(root: Path, count: int, per_study: int, seed: int) -> Corpus:
    """count instances in studies of per_study, one process per CPU (pydicom's writer is the cost)."""
    t0 = time.perf_counter()
    jobs = [
        (root, s, min(per_study, count - s * per_study), per_study, seed)
        for s in range(-(-count // per_study))
    ]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    files: list[Path] = []
    if workers == 1:
        for job in jobs:
            files += generate_study(*job)
    else:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for part in pool.map(generate_study, *zip(*jobs, strict=True), timeout=3600):
                files += part
    return Corpus(root, files, generated=True, seconds=time.perf_counter() - t0)


def load_or_make_corpus(args: argparse.Namespace, scratch: Path) -> Corpus:
    if args.corpus:
        root = Path(args.corpus).expanduser().resolve()
        existing = sorted(root.rglob("*.dcm")) if root.is_dir() else []
        if existing:
            log(f"corpus: reusing {len(existing)} instances in {root} (--count ignored)")
            return Corpus(root, existing)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = scratch / "corpus"
    log(f"corpus: generating {args.count} instances in {root} ...")
    return generate_corpus(root, args.count, args.per_study, args.seed)


def split_corpus(files: list[Path], parts: int, where: Path) -> list[Path]:
    """Folders of links to contiguous chunks of the corpus, one per association."""
    dirs = []
    chunk = -(-len(files) // parts)
    for p in range(parts):
        d = where / f"{parts}x" / f"part{p}"
        d.mkdir(parents=True, exist_ok=True)
        for j, f in enumerate(files[p * chunk : (p + 1) * chunk]):
            link = d / f"{j:06d}.dcm"
            try:
                os.link(f, link)
            except OSError:
                link.symlink_to(f)
        dirs.append(d)
    return dirs


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DCMTK_ENV)
    return env


def stop_process(proc: subprocess.Popen, name: str, grace: float) -> None:
    """SIGTERM, wait, SIGKILL; then the same for anything left in its own process group."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log(
                f"warning: {name} (pid {proc.pid}) did not stop within {grace:.0f} s of SIGTERM; killing it"
            )
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log(f"warning: {name} (pid {proc.pid}) survived SIGKILL")
    # Children (imx receivers) live in the group we created for this process (pgid == its pid).
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def echo(port: int, called: str) -> bool:
    try:
        r = subprocess.run(
            [
                "echoscu",
                *f"-aet {CALLING_AE} -aec {called} -to 3 -ta 3 -td 3".split(),
                HOST,
                str(port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=15,
        )
        return r.returncode == 0
    except subprocess.TimeoutExpired:
        return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_get_json(url: str, timeout: float = 30.0, headers: dict[str, str] | None = None) -> object:
    # No proxies: a http_proxy in the environment must not divert our loopback requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
        return json.load(r)


class Server:
    """One fresh server instance: start() until echoscu answers, count(), stop()."""

    name = "server"
    called_ae = "ANY"
    start_timeout = 60.0
    stop_grace = 30.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd, env, cwd = self.command()
        with open(self.log_path, "wb") as out:
            try:
                self.proc = subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as e:
                raise RuntimeError(f"cannot run {' '.join(cmd)}: {e.strerror}") from e
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} before it was ready; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            if echo(self.dicom_port, self.called_ae):
                return
            time.sleep(0.25)
        raise RuntimeError(
            f"{self.name} did not answer C-ECHO on port {self.dicom_port} within "
            f"{self.start_timeout:.0f} s; last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, self.name, self.stop_grace)


class Imx(Server):
    name = "imx"
    called_ae = "IMX"
    start_timeout = 120.0  # receivers are spawned interpreters; migrations run at first start
    stop_grace = 90.0  # in-flight associations get IMX_SHUTDOWN_GRACE_SECONDS (60 s) to finish

    def __init__(self, workdir: Path, venv: Path) -> None:
        super().__init__(workdir)
        self.venv = venv

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        script = self.venv / "bin" / "imx"
        cmd = (
            [str(script), "serve"]
            if script.exists()
            else [str(self.venv / "bin" / "python"), "-m", "imx.cli", "serve"]
        )
        # Only our settings: an IMX_* variable in the caller's shell (S3, Postgres, ...) would skew it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMX_")}
        env.update(DCMTK_ENV)
        env.update(
            {
                "IMX_DATA_DIR": str(self.workdir / "data"),
                "IMX_DICOM_PORT": str(self.dicom_port),
                "IMX_HTTP_PORT": str(self.http_port),
                "IMX_HOST": HOST,
                "IMX_AE_TITLE": self.called_ae,
            }
        )
        return cmd, env, REPO

    def _token(self) -> str:
        """An API token of an admin made for the benchmark (/api/studies needs a caller)."""
        if getattr(self, "token", None) is None:
            cmd, env, cwd = self.command()
            imx = cmd[:-1]  # the same imx, without "serve"
            run = {"env": env, "cwd": cwd, "capture_output": True, "text": True, "timeout": 120}
            add = subprocess.run([*imx, "user", "add", "bench", "--role", "admin"], input="bench-password\n", **run)
            if add.returncode != 0 and "exists" not in add.stderr:
                raise RuntimeError(f"imx user add failed: {add.stderr}")
            tok = subprocess.run([*imx, "user", "token", "bench"], **run)
            if tok.returncode != 0:
                raise RuntimeError(f"imx user token failed: {tok.stderr}")
            self.token = tok.stdout.strip()
        return self.token

    def count(self) -> int:
        total, offset, limit = 0, 0, 1000
        auth = {"Authorization": f"Bearer {self._token()}"}
        for _ in range(10_000):
            page = http_get_json(
                f"http://{HOST}:{self.http_port}/api/studies?limit={limit}&offset={offset}", headers=auth
            )
            studies = page["studies"]  # type: ignore[index]
            total += sum(int(s.get("num_instances") or 0) for s in studies)
            if len(studies) < limit:
                break
            offset += limit
        return total


class Orthanc(Server):
    name = "orthanc"
    called_ae = "ORTHANC"
    start_timeout = 60.0

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        config = {
            "Name": "imx-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),  # default SQLite index
            "StorageCompression": False,
            "SyncStorageArea": True,  # the 1.10 default, stated: Orthanc fsyncs each file, as imx does
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "Plugins": [],  # not Debian's /usr/share/orthanc/plugins
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.called_ae,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "OrthancPeers": {},
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        # Orthanc's DICOM server is dcmtk: same Nagle setting as the storescu side.
        return ["Orthanc", str(cfg)], dcmtk_env(), self.workdir

    def count(self) -> int:
        stats = http_get_json(f"http://{HOST}:{self.http_port}/statistics")
        return int(stats["CountInstances"])  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    associations: int
    sent: int
    seconds: float
    stored: int | None
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        n = self.sent if self.stored is None else min(self.stored, self.sent)
        return n / self.seconds if self.seconds > 0 else 0.0


def send(
    server: Server, parts: list[Path], logdir: Path, timeout: float
) -> tuple[float, list[str]]:
    """All parts at once, one storescu (one association) each; seconds from first start to last exit."""
    procs: list[tuple[subprocess.Popen, Path]] = []
    problems: list[str] = []
    env = dcmtk_env()
    t0 = time.perf_counter()
    try:
        for i, d in enumerate(parts):
            lp = logdir / f"storescu-{server.name}-{len(parts)}x-{i}.log"
            with open(lp, "wb") as out:
                p = subprocess.Popen(
                    # Default transfer syntaxes (all uncompressed, explicit VR little endian first);
                    # -xs would mean JPEG lossless *and* uncompressed in dcmtk 3.6, not "explicit only".
                    ["storescu", *STORESCU_OPTS, "-aet", CALLING_AE, "-aec", server.called_ae]
                    + [HOST, str(server.dicom_port), str(d)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            procs.append((p, lp))
        deadline = t0 + timeout
        for p, lp in procs:
            try:
                p.wait(max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                problems.append(f"storescu {lp.name} still running after {timeout:.0f} s; killed")
        elapsed = time.perf_counter() - t0
    finally:
        for p, _ in procs:
            if p.poll() is None:
                stop_process(p, "storescu", 5)
    for p, lp in procs:
        if p.returncode not in (0, None):
            problems.append(
                f"storescu exited with status {p.returncode}; last lines of {lp}:\n{tail(lp, 8)}"
            )
        else:
            bad = [
                ln
                for ln in lp.read_text(errors="replace").splitlines()
                if ln.startswith(("E:", "F:"))
            ]
            if bad:
                problems.append(f"{len(bad)} error lines in {lp}, e.g. {bad[0]}")
    return elapsed, problems


def one_run(
    kind: str,
    associations: int,
    corpus: Corpus,
    parts: list[Path],
    scratch: Path,
    args: argparse.Namespace,
) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-{associations}x-", dir=scratch))
    server: Server = Imx(workdir, args.venv) if kind == "imx" else Orthanc(workdir)
    try:
        server.start()
        timeout = args.send_timeout or (120.0 + 0.5 * len(corpus.files))
        seconds, problems = send(server, parts, workdir, timeout)
        stored: int | None
        try:
            stored = server.count()
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            stored = None
            problems.append(f"could not count what {kind} stored: {type(e).__name__}: {e}")
        run = Run(kind, associations, len(corpus.files), seconds, stored, problems)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        os.sync()  # the next run must not pay for this one's dirty pages
    return run


def report(run: Run) -> None:
    assoc = "association " if run.associations == 1 else "associations"
    stored = "?" if run.stored is None else str(run.stored)
    log(
        f"{run.server:<8} {run.associations} {assoc}: {run.sent} sent in {run.seconds:7.2f} s, "
        f"{stored} stored: {run.rate:7.1f} instances/s"
    )
    for p in run.failures:
        log(f"  warning: {p}")
    if run.stored is not None and run.stored != run.sent:
        log(
            f"  warning: {run.server} holds {run.stored} of {run.sent} instances sent "
            f"({'not all arrived' if run.stored < run.sent else 'more than sent'})"
        )


def _interrupt(signum: int, _frame: object) -> None:
    signal.signal(
        signal.SIGTERM, signal.SIG_IGN
    )  # a second SIGTERM must not cut the clean-up short
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=2000, help="instances to generate (default 2000)")
    ap.add_argument("--per-study", type=int, default=100, help="instances per study (default 100)")
    ap.add_argument("--corpus", help="folder of *.dcm to reuse; generated there when it holds none")
    ap.add_argument("--only", choices=["imx", "orthanc"], help="benchmark one server only")
    ap.add_argument(
        "--associations",
        type=int,
        default=4,
        help="parallel associations of the second run (default 4)",
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep temporary folders (corpus, data folders, logs)"
    )
    ap.add_argument(
        "--venv",
        type=Path,
        default=REPO / ".venv",
        help="virtualenv holding imx (default: the repo's .venv)",
    )
    ap.add_argument(
        "--send-timeout",
        type=float,
        default=0.0,
        help="seconds a send may take (default 120 + 0.5 per instance)",
    )
    ap.add_argument("--seed", type=int, default=20240101)
    ap.add_argument("--tmp", help="parent folder of the temporary folders (default: the system's)")
    args = ap.parse_args(argv)
    if args.count < 1 or args.per_study < 1 or args.associations < 1:
        ap.error("--count, --per-study and --associations must be positive")
    args.venv = args.venv.expanduser().absolute()
    for tool in ("storescu", "echoscu") + (() if args.only == "imx" else ("Orthanc",)):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not on PATH")

    # SIGTERM to the benchmark cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)

    scratch = Path(tempfile.mkdtemp(prefix="imx-bench-", dir=args.tmp))
    servers = [args.only] if args.only else ["imx", "orthanc"]
    assoc_counts = sorted({1, args.associations})
    runs: dict[tuple[str, int], Run] = {}
    try:
        corpus = load_or_make_corpus(args, scratch)
        if not corpus.files:
            log("error: the corpus is empty")
            return 2
        size = corpus.nbytes
        how = f"generated in {corpus.seconds:.1f} s" if corpus.generated else "reused"
        log(
            f"corpus: {len(corpus.files)} instances, {size / 2**20:.0f} MiB "
            f"({size / len(corpus.files) / 1024:.0f} KiB each), {how}"
        )
        os.sync()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        log(
            f"machine: {os.cpu_count()} CPUs, load average {load:.2f} before the runs (other work skews the figures)"
        )
        splits = {n: split_corpus(corpus.files, n, scratch / "parts") for n in assoc_counts}
        for kind in servers:
            for n in assoc_counts:
                try:
                    run = one_run(kind, n, corpus, splits[n], scratch, args)
                except RuntimeError as e:
                    log(f"{kind:<8} {n} association(s): FAILED: {e}")
                    continue
                runs[(kind, n)] = run
                report(run)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    log("")
    for n in assoc_counts:
        for kind in servers:
            r = runs.get((kind, n))
            log(
                f"{kind:<8} at {n} association{'s' if n > 1 else ' '}: "
                + (f"{r.rate:7.1f} instances/s" if r else "    n/a")
            )
    n = args.associations
    imx, orth = runs.get(("imx", n)), runs.get(("orthanc", n))
    ratio = f"{imx.rate / orth.rate:.2f}x" if imx and orth and orth.rate > 0 else "n/a"
    log(
        f"imx/orthanc at {n} associations: {ratio} "
        f"(imx {f'{imx.rate:.0f}' if imx else 'n/a'}/s, orthanc {f'{orth.rate:.0f}' if orth else 'n/a'}/s)"
    )
    return 0 if len(runs) == len(servers) * len(assoc_counts) else 1


if __name__ == "__main__":
    sys.exit(main())
