"""Tests of ``dicom_node.send`` (``imx send``).

The main receiver is dcmtk's real ``storescp``; a few error paths that storescp cannot produce
(rejecting a calling AE title, failure statuses, an abort in the middle of a batch, a receiver
that goes silent) use small in-process pynetdicom SCPs. Test data are pydicom's bundled files,
which are local: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    MRImageStorage,
    RTPlanStorage,
)

import dicom_node.send as send_module
from dicom_node.send import MAX_CONTEXTS, SendSummary, default_state_path, send

STORESCP = shutil.which("storescp")

# pydicom test files with distinct SOP Instance UIDs: several SOP classes, compressed (JPEG 2000,
# JPEG-LS, JPEG, RLE), big endian, deflated, implicit VR, and datasets without file meta.
FOLDER_FILES = {
    "ct/CT_small.dcm": "CT_small.dcm",
    "ct/693_J2KI.dcm": "693_J2KI.dcm",
    "us/ExplVR_BigEnd.dcm": "ExplVR_BigEnd.dcm",
    "sc/JPEG2000.dcm": "JPEG2000.dcm",
    "sc/GDCMJ2K_TextGBR.dcm": "GDCMJ2K_TextGBR.dcm",
    "sc/JPEGLSNearLossless_08.dcm": "JPEGLSNearLossless_08.dcm",
    "sc/SC_rgb_jpeg_dcmtk.dcm": "SC_rgb_jpeg_dcmtk.dcm",
    "sc/SC_rgb_rle.dcm": "SC_rgb_rle.dcm",
    "sc/SC_rgb_small_odd_big_endian.dcm": "SC_rgb_small_odd_big_endian.dcm",
    "sc/image_dfl.dcm": "image_dfl.dcm",
    "mr/MR_small.dcm": "MR_small.dcm",
    "rt/rtplan.dcm": "rtplan.dcm",
    "rt/rtstruct.dcm": "rtstruct.dcm",  # no preamble, no file meta, implicit VR
    "rt/ExplVR_LitEndNoMeta.dcm": "ExplVR_LitEndNoMeta.dcm",  # no file meta, explicit VR
    "sr/test-SR.dcm": "test-SR.dcm",
    "ecg/waveform_ecg.dcm": "waveform_ecg.dcm",
    "seg/liver_1frame.dcm": "liver_1frame.dcm",
    "us/examples_jpeg2k.dcm": "examples_jpeg2k.dcm",
}
ZIP_NAME = "more/extra.zip"
ZIP_MEMBERS = {"series/IM1": "6154", "series/IM2": "6247", "series/IM3": "6278"}
N_DICOM = len(FOLDER_FILES) + len(ZIP_MEMBERS)
N_OTHER = 3  # README.txt, DICOMDIR (an index, not an instance), notes.txt inside the zip
SCP_CLASSES = (CTImageStorage, MRImageStorage, RTPlanStorage, ComprehensiveSRStorage, BasicTextSRStorage)


def _testdata(name: str) -> Path:
    """A bundled pydicom test file by its base name (first match)."""
    for path in get_testdata_files():
        if Path(path).name == name:
            return Path(path)
    raise LookupError(name)


def _read(source: Path | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        return dcmread(data, force=True, stop_before_pixels=True)


@dataclass
class Study:
    """A folder to send and what it holds."""

    root: Path
    transfer_syntaxes: dict[str, str]  # SOP Instance UID -> transfer syntax it was written in
    secrets: list[str]  # UIDs and patient names that must never be printed or stored


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Copy ~20 varied bundled files into a folder tree with a zip and some non-DICOM files."""
    root = tmp_path_factory.mktemp("study")
    sources: list[Path | bytes] = []
    for rel, name in FOLDER_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_testdata(name), root / rel)
        sources.append(root / rel)
    (root / "README.txt").write_text("Study sent from the radiology department.\n")
    shutil.copyfile(_testdata("DICOMDIR"), root / "DICOMDIR")
    (root / ZIP_NAME).parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / ZIP_NAME, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, name in ZIP_MEMBERS.items():
            data = _testdata(name).read_bytes()
            zf.writestr(member, data)
            sources.append(data)
        zf.writestr("notes.txt", "not an image\n")

    transfer_syntaxes: dict[str, str] = {}
    secrets: list[str] = []
    for source in sources:
        ds = _read(source)
        uid = str(ds.SOPInstanceUID)
        assert uid not in transfer_syntaxes, "test files must have distinct SOP Instance UIDs"
        meta_ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if meta_ts is None:
            implicit, little = ds.original_encoding
            meta_ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
        transfer_syntaxes[uid] = str(meta_ts)
        secrets.append(uid)
        if str(ds.get("PatientName", "")).strip():
            secrets.append(str(ds.PatientName))
    assert len(transfer_syntaxes) == N_DICOM
    return Study(root, transfer_syntaxes, secrets)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether something listens on TCP ``port``, found without connecting to it.

    A test connection would occupy single-process storescp until its ACSE timeout (30 s)
    expires, and the association under test would wait behind it.
    """
    if not Path("/proc/net/tcp").exists():  # not Linux: fall back to connecting
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    return True
    return False


@dataclass
class Receiver:
    """A running storescp."""

    port: int
    out_dir: Path
    proc: subprocess.Popen[bytes]

    def received(self) -> dict[str, str]:
        """SOP Instance UID -> transfer syntax of every file storescp wrote."""
        found = {}
        for path in self.out_dir.iterdir():
            ds = _read(path)
            found[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start dcmtk storescp on a free loopback port (``--accept-all`` = ``+xa``); stop it after."""
    started: list[Receiver] = []

    def start(*extra: str) -> Receiver:
        assert STORESCP is not None, "dcmtk storescp is not installed (make test installs dcmtk)"
        port = _free_port()
        out_dir = tmp_path / f"received-{port}"
        out_dir.mkdir()
        cmd = [STORESCP, "-aet", "STORESCP", "-od", str(out_dir), "+xa", *extra, str(port)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        log = (tmp_path / f"storescp-{port}.log").open("wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        receiver = Receiver(port, out_dir, proc)
        started.append(receiver)
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert proc.poll() is None, "storescp exited at start"
            assert time.monotonic() < deadline, "storescp did not start listening"
            time.sleep(0.05)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@dataclass
class PynetdicomSCP:
    """An in-process storage SCP whose behaviour a test scripts."""

    port: int
    stored: dict[str, int]  # SOP Instance UID -> times stored
    server: object


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., PynetdicomSCP]]:
    """Start pynetdicom storage SCPs on free ports; ``handler(event, stored) -> status``."""
    servers: list[object] = []

    def start(
        handler: Callable[[evt.Event, dict[str, int]], int | Dataset] | None = None,
        **ae_options: object,
    ) -> PynetdicomSCP:
        ae = AE(ae_title="IMX")
        for name, value in ae_options.items():
            setattr(ae, name, value)
        for sop_class in SCP_CLASSES:
            ae.add_supported_context(sop_class, AllTransferSyntaxes)
        stored: dict[str, int] = {}
        lock = threading.Lock()

        def on_store(event: evt.Event) -> int | Dataset:
            status = handler(event, stored) if handler else 0x0000
            code = status if isinstance(status, int) else int(status.Status)
            if code == 0 or 0xB000 <= code <= 0xBFFF:
                with lock:
                    uid = str(event.request.AffectedSOPInstanceUID)
                    stored[uid] = stored.get(uid, 0) + 1
            return status

        port = _free_port()
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        servers.append(server)
        return PynetdicomSCP(port, stored, server)

    yield start
    for server in servers:
        server.shutdown()  # type: ignore[attr-defined]


def _small_set(tmp_path: Path) -> Path:
    """Four small files of four SOP classes, for the pynetdicom receivers."""
    folder = tmp_path / "small"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm"):
        shutil.copyfile(_testdata(name), folder / name)
    return folder


def _send(port: int, paths: list[Path], state: Path, **options: object) -> tuple[SendSummary, str]:
    """Run ``send`` against 127.0.0.1 and return the summary and everything it printed."""
    out = io.StringIO()
    defaults = {"aec": "STORESCP", "aet": "IMXTEST", "progress": True, "retries": 2, "backoff": 0.05}
    options = {**defaults, **options}
    summary = send("127.0.0.1", port, paths, state_path=state, out=out, **options)  # type: ignore[arg-type]
    return summary, out.getvalue()


# --------------------------------------------------------------------------------------------
# Against dcmtk storescp
# --------------------------------------------------------------------------------------------


@pytest.mark.peer
def test_sends_every_file_in_its_own_transfer_syntax_and_a_rerun_sends_nothing(
    study: Study, storescp: Callable[..., Receiver], tmp_path: Path
) -> None:
    receiver = storescp()
    state = tmp_path / "state" / "send.sqlite3"

    summary, printed = _send(receiver.port, [study.root], state, batch=5)

    assert summary == SendSummary(
        found=N_DICOM, sent=N_DICOM, already=0, failed=[], skipped_non_dicom=N_OTHER
    ), printed
    received = receiver.received()
    assert len(list(receiver.out_dir.iterdir())) == N_DICOM
    # Sent as they were: compressed stays compressed, big endian stays big endian, and so on.
    assert received == study.transfer_syntaxes
    assert f"Sent:          {N_DICOM}" in printed
    assert "MB/s" in printed
    for secret in study.secrets:
        assert secret not in printed

    # The state holds hashes only: no UIDs, no file names.
    raw = state.read_bytes()
    for secret in [*study.secrets, "CT_small", "extra.zip", "IM1"]:
        assert secret.encode() not in raw
    with sqlite3.connect(state) as db:
        keys = [row[0] for row in db.execute("SELECT key FROM acknowledged")]
    assert len(keys) == N_DICOM and all(len(k) == 64 and int(k, 16) >= 0 for k in keys)

    # A rerun sends nothing: with the receiver gone it still succeeds, from the state alone.
    receiver.stop()
    again, printed = _send(receiver.port, [study.root], state, batch=5)
    assert again == SendSummary(
        found=N_DICOM, sent=0, already=N_DICOM, failed=[], skipped_non_dicom=N_OTHER
    ), printed
    assert f"Already there: {N_DICOM}" in printed
    assert len(list(receiver.out_dir.iterdir())) == N_DICOM


@pytest.mark.peer
def test_interrupted_send_resumes_with_what_is_missing(
    study: Study, storescp: Callable[..., Receiver], tmp_path: Path
) -> None:
    receiver = storescp()
    state = tmp_path / "state.sqlite3"
    first = sorted(p for p in (study.root / "sc").iterdir())[:3]
    partial, _ = _send(receiver.port, first, state)
    assert partial.sent == 3

    summary, printed = _send(receiver.port, [study.root], state, batch=7)
    assert (summary.found, summary.sent, summary.already, summary.failed) == (N_DICOM, N_DICOM - 3, 3, [])
    assert len(receiver.received()) == N_DICOM


def test_permanent_rejection_stops_at_once(
    study: Study, pynetdicom_scp: Callable[..., PynetdicomSCP], tmp_path: Path
) -> None:
    """A permanent A-ASSOCIATE-RJ ends the send at the first attempt. (dcmtk's `storescp --refuse`
    was the peer here, but it closes its socket right after the rejection, and on a loaded machine
    the sender sometimes sees only the closed connection, a transient failure it rightly retries;
    the scripted SCP always lets the rejection arrive.)"""
    scp = pynetdicom_scp(require_calling_aet=["SOMEONE-ELSE"])
    summary, printed = _send(scp.port, [study.root], tmp_path / "s.sqlite3", retries=5, backoff=0.05)
    assert "; retrying " not in printed  # not a single retry
    assert summary.sent == 0 and len(summary.failed) == N_DICOM
    assert all("rejected the association permanently" in reason for _, reason in summary.failed)
    assert "Retrying cannot help" in printed
    assert not scp.stored


def test_connection_refused_fails_clearly_after_retries(study: Study, tmp_path: Path) -> None:
    port = _free_port()  # nothing listens here
    summary, printed = _send(port, [study.root], tmp_path / "s.sqlite3", retries=2, backoff=0.05)
    assert (summary.found, summary.sent, summary.already) == (N_DICOM, 0, 0)
    assert len(summary.failed) == N_DICOM
    assert all("connection refused" in reason for _, reason in summary.failed)
    assert "attempt 3 of 3" in printed and "Giving up after 3 attempts" in printed
    # At most 20 failures are listed, then a count; names are relative to the argument.
    assert f"... and {N_DICOM - 20} more" in printed
    assert "  ct/CT_small.dcm: not sent: connection refused" in printed
    names = {name for name, _ in summary.failed}
    assert "more/extra.zip/series/IM1" in names and "rt/rtstruct.dcm" in names
    assert str(study.root) not in printed


def test_no_dicom_files(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "letter.txt").write_text("Dear colleague,\n")
    (folder / "scan.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (folder / "empty").write_bytes(b"")
    summary, printed = _send(_free_port(), [folder], tmp_path / "s.sqlite3")
    assert summary == SendSummary(found=0, sent=0, already=0, failed=[], skipped_non_dicom=3)
    assert "No DICOM files found" in printed


def test_missing_path_is_reported(tmp_path: Path) -> None:
    summary, printed = _send(_free_port(), [tmp_path / "nope"], tmp_path / "s.sqlite3")
    assert summary.failed == [(str(tmp_path / "nope"), "no such file or folder")]


# --------------------------------------------------------------------------------------------
# Against scripted pynetdicom receivers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ae_options", "aec", "expected"),
    [
        ({"require_calling_aet": ["PARTNER"]}, "IMX", "calling AE title not recognized"),
        ({"require_called_aet": True}, "WRONG", "called AE title not recognized"),
    ],
)
def test_rejection_reason_is_given(
    pynetdicom_scp: Callable[..., PynetdicomSCP],
    tmp_path: Path,
    ae_options: dict[str, object],
    aec: str,
    expected: str,
) -> None:
    scp = pynetdicom_scp(**ae_options)
    folder = _small_set(tmp_path)
    summary, printed = _send(scp.port, [folder], tmp_path / "s.sqlite3", aec=aec, retries=5, backoff=0.05)
    retries = [line for line in printed.splitlines() if "; retrying " in line]
    assert all("permanently" not in line for line in retries), retries  # a rejection is never retried
    assert summary.sent == 0 and len(summary.failed) == 4
    assert expected in printed and "permanently" in printed
    assert not scp.stored


def test_statuses_warnings_count_as_sent_and_failures_carry_code_and_comment(
    pynetdicom_scp: Callable[..., PynetdicomSCP], tmp_path: Path
) -> None:
    def handler(event: evt.Event, stored: dict[str, int]) -> int | Dataset:
        sop_class = event.request.AffectedSOPClassUID
        if sop_class == CTImageStorage:
            status = Dataset()
            status.Status = 0xA900
            status.ErrorComment = f"Modality mismatch for {event.request.AffectedSOPInstanceUID}"
            return status
        if sop_class == MRImageStorage:
            return 0xB000
        if sop_class == RTPlanStorage:
            return 0xA700
        return 0x0000

    scp = pynetdicom_scp(handler)
    folder = _small_set(tmp_path)
    summary, printed = _send(scp.port, [folder], tmp_path / "s.sqlite3", aec="IMX")
    assert (summary.found, summary.sent, summary.already) == (4, 2, 0)
    assert dict(summary.failed) == {
        "CT_small.dcm": "0xA900 dataset does not match SOP class: Modality mismatch for <UID>",
        "rtplan.dcm": "0xA700 out of resources",
    }
    assert "0xA900 dataset does not match SOP class" in printed

    # Failures are not remembered as acknowledged: the rerun tries them again.
    again, _ = _send(scp.port, [folder], tmp_path / "s.sqlite3", aec="IMX")
    assert (again.sent, again.already, len(again.failed)) == (0, 2, 2)


def test_abort_mid_batch_is_retried_and_everything_arrives(
    study: Study, pynetdicom_scp: Callable[..., PynetdicomSCP], tmp_path: Path
) -> None:
    calls = {"n": 0}

    def handler(event: evt.Event, stored: dict[str, int]) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            event.assoc.abort()
        return 0x0000

    scp = pynetdicom_scp(handler)
    folder = tmp_path / "ct"
    folder.mkdir()
    ct = [p for p in get_testdata_files() if Path(p).parent.name in ("CT2", "CT5N")]
    ct.append(str(_testdata("CT_small.dcm")))
    assert len(ct) >= 8
    for path in ct:
        shutil.copyfile(path, folder / Path(path).name)
    summary, printed = _send(scp.port, [folder], tmp_path / "s.sqlite3", aec="IMX", batch=50)
    assert summary.failed == [] and summary.sent == len(ct), printed
    assert len(scp.stored) == len(ct)
    assert "retrying" in printed


def test_silent_receiver_is_detected_and_retried(
    pynetdicom_scp: Callable[..., PynetdicomSCP], tmp_path: Path
) -> None:
    calls = {"n": 0}

    def handler(event: evt.Event, stored: dict[str, int]) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            time.sleep(2.5)  # goes quiet while a file is in flight
        return 0x0000

    scp = pynetdicom_scp(handler)
    summary, printed = _send(scp.port, [_small_set(tmp_path)], tmp_path / "s.sqlite3", aec="IMX", timeout=1.0)
    assert summary.failed == [] and summary.sent == 4, printed
    assert "no progress for 1 s" in printed.lower()


def test_second_copy_of_an_instance_is_sent_once_and_broken_dicom_is_reported(
    pynetdicom_scp: Callable[..., PynetdicomSCP], tmp_path: Path
) -> None:
    folder = _small_set(tmp_path)
    with zipfile.ZipFile(folder / "copy.zip", "w") as zf:
        zf.write(folder / "CT_small.dcm", "again/CT_small.dcm")
    shutil.copyfile(_testdata("meta_missing_tsyntax.dcm"), folder / "broken.dcm")
    scp = pynetdicom_scp()
    summary, _ = _send(scp.port, [folder], tmp_path / "s.sqlite3", aec="IMX")
    assert (summary.found, summary.sent, summary.already) == (5, 4, 1)
    assert summary.failed == [
        ("broken.dcm", "not a storable DICOM instance (no SOP Class or SOP Instance UID)")
    ]
    assert all(count == 1 for count in scp.stored.values()) and len(scp.stored) == 4


def test_tcp_nodelay_is_set_on_the_association_socket(
    pynetdicom_scp: Callable[..., PynetdicomSCP], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    original = send_module._tune_socket

    def spy(assoc: object) -> None:
        original(assoc)  # type: ignore[arg-type]
        sock = assoc.dul.socket.socket  # type: ignore[attr-defined]
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(send_module, "_tune_socket", spy)
    scp = pynetdicom_scp()
    summary, _ = _send(scp.port, [_small_set(tmp_path)], tmp_path / "s.sqlite3", aec="IMX", progress=False)
    assert summary.sent == 4
    assert seen and all(seen)


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_batches_respect_the_presentation_context_limit(tmp_path: Path) -> None:
    items = [
        send_module._Item(
            display=f"f{i}", path=tmp_path / f"f{i}", member=None, size=1,
            sop_class=f"1.2.3.{i}", transfer_syntax="1.2.840.10008.1.2.1", key=f"{i:064x}",
            from_file=True,
        )
        for i in range(MAX_CONTEXTS + 10)
    ]
    sender = send_module._Sender(
        host="h", port=1, aec="A", aet="B", state=None, summary=SendSummary(),  # type: ignore[arg-type]
        retries=0, backoff=0, batch=200, timeout=1, out=io.StringIO(), progress=False,
    )
    queue = deque(items)
    first = sender._next_batch(queue)
    assert len({i.context for i in first}) == MAX_CONTEXTS and len(first) == MAX_CONTEXTS
    sender.batch = 4
    assert len(sender._next_batch(queue)) == 4


def test_default_state_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = default_state_path("pacs.example.org", 104, "PACS")
    assert path.parent == tmp_path / "imx"
    assert path != default_state_path("pacs.example.org", 104, "OTHER")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_path("h", 104, "A").parent == Path.home() / ".local" / "state" / "imx"


def test_describe_status() -> None:
    assert send_module.describe_status(0xA900) == "0xA900 dataset does not match SOP class"
    assert send_module.describe_status(0xC123, "bad") == "0xC123 cannot understand: bad"
    assert send_module.describe_status(0xA701) == "0xA701 out of resources"
    assert send_module.describe_status(0x0122) == "0x0122 SOP class not supported"
