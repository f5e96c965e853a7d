"""The shared ingest path at its edges: a 1 GB multi-frame instance over C-STORE, and an instance
that neither the object store nor the local spool can take."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dicomfiles import expected_uid
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)
from services import dcmtk_env, free_port

from imx.config import Settings, ensure_layout
from imx.ingest import Archive, PartnerRef, Result
from storage.index import Index
from storage.objects import S3Store

FRAME = 512 * 512 * 2


def write_big_multiframe(path: Path, frames: int) -> tuple[str, str]:
    """A multi-frame 16-bit secondary capture of ``frames`` 512x512 frames, written in chunks.
    Returns (SOP Instance UID, SHA-256 of the pixel data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Big^Patient", "BIG-PATIENT-0001", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.save_as(path, enforce_file_format=True)
    length = frames * FRAME
    h = hashlib.sha256()
    frame = (bytes(range(256)) * (FRAME // 256))
    with open(path, "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        for i in range(frames):
            chunk = frame[i % 256 :] + frame[: i % 256]
            f.write(chunk)
            h.update(chunk)
    return str(ds.SOPInstanceUID), h.hexdigest()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
@pytest.mark.peer
def test_one_gigabyte_multiframe_is_received_without_holding_it_in_memory(imx_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "big.dcm"
    sop_uid, pixel_sha = write_big_multiframe(big, 4096)  # 4096 x 512 KiB = 1 GiB of pixel data
    size = big.stat().st_size
    assert size > 1024**3

    receivers = [int(p) for p in subprocess.run(["pgrep", "-P", str(imx_server.proc.pid)], capture_output=True, text=True).stdout.split()]
    assert receivers
    sent = subprocess.run(
        ["storescu", "-v", "-aet", "DEMOPACS", "-aec", "IMX", "127.0.0.1", str(imx_server.dicom_port), str(big)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=600,
    )
    assert "Received Store Response (Success)" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
    peak = max(_peak_rss_kib(pid) for pid in receivers if Path(f"/proc/{pid}").exists())
    assert peak < 400 * 1024, f"a receiver peaked at {peak // 1024} MiB for a {size // 2**20} MiB instance"

    index = Index(f"sqlite:///{imx_server.data_dir / 'index.sqlite3'}")
    try:
        partner = index.partner_by_name("DEMO")
        row = index.get_instance(expected_uid(imx_server.data_dir, partner.id, sop_uid))
    finally:
        index.close()
    assert row is not None and row.frames == 4096
    obj = imx_server.data_dir / "objects" / row.object_key
    stored = dcmread(obj, stop_before_pixels=True)
    assert str(stored.PatientName) == stored.PatientID and stored.PatientIdentityRemoved == "YES"
    assert stored.PatientID.startswith("DEMO-")  # the demo partner's readable prefix
    with open(obj, "rb") as f:  # Pixel Data is the last element: compare its bytes
        f.seek(obj.stat().st_size - 4096 * FRAME)
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == pixel_sha
    big.unlink()
    assert list((imx_server.data_dir / "tmp").iterdir()) == []


def test_neither_store_nor_spool_means_out_of_resources(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path / "data", store_timeout=1, spool_retry_seconds=60)
    ensure_layout(settings)
    closed = free_port()  # nothing listens: the S3 store is unreachable
    archive = Archive(settings, store=S3Store(f"127.0.0.1:{closed}", "k", "s", "b", timeout=1))
    archive.index.migrate()
    partner = PartnerRef.of(archive.index.add_partner("OSH", "OSHPACS", []))
    src = Path(get_testdata_file("CT_small.dcm"))

    # store down, spool fine: acknowledged from the spool
    assert archive.ingest_file(partner, src).result is Result.SPOOLED
    assert archive.index.spool_depth() == 1

    # store down and the spool cannot be written (its folder is gone, a file in its place)
    shutil.rmtree(settings.spool_dir)
    settings.spool_dir.write_bytes(b"")
    other = tmp_path / "other.dcm"
    ds = dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(other, enforce_file_format=True)
    outcome = archive.ingest_file(partner, other)
    assert outcome.result is Result.OUT_OF_RESOURCES
    assert "no storage space" in outcome.reason
    assert archive.index.counts()["instances"] == 1  # nothing half-written was indexed
    from imx import metrics

    assert metrics.OUT_OF_RESOURCES._value.get() >= 1
    os.unlink(settings.spool_dir)
    archive.close()
