"""Nothing acknowledged is ever lost: a crash of the whole service mid-send, and an object store
that stops answering mid-send. Senders are dcmtk's storescu; the crash is a real SIGKILL."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from dicomfiles import expected_uid, make_ct_series
from pydicom import dcmread
from services import ImxServer, dcmtk_env

from storage.index import LOCATION_STORE, Index
from storage.objects import S3Store

pytestmark = [pytest.mark.peer, pytest.mark.slow]


class StoreSCU:
    """storescu -v over many files in one association, noting which files the node acknowledged."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.acked: list[Path] = []
        self.proc = subprocess.Popen(
            ["storescu", "-v", "-aet", "DEMOPACS", "-aec", "IMX", "127.0.0.1", str(port), *map(str, files)],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        current: Path | None = None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "Sending file:" in line:
                current = Path(line.split("Sending file:", 1)[1].strip())
            elif "Received Store Response (Success)" in line and current is not None:
                self.acked.append(current)
                current = None

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} acknowledged"
            assert self.proc.poll() is None or len(self.acked) >= n, "storescu ended early"
            time.sleep(0.005)

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _index(server: ImxServer) -> Index:
    return Index(f"sqlite:///{server.data_dir / 'index.sqlite3'}")


def test_kill9_mid_send_loses_nothing_acknowledged(imx_server: ImxServer, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "series", 500)
    sender = StoreSCU(imx_server.dicom_port, files)
    sender.wait_for(150)
    imx_server.kill9()  # supervisor and receivers, mid-association
    sender.finish()
    acked = list(sender.acked)
    assert 150 <= len(acked) < 500

    imx_server.start()  # same data folder
    index = _index(imx_server)
    try:
        partner = index.partner_by_name("DEMO")
        assert partner is not None
        for f in acked:
            row = index.get_instance(expected_uid(imx_server.data_dir, partner.id, _sop_uid(f)))
            assert row is not None, f"{f.name} was acknowledged before the crash but is not indexed"
            data = (imx_server.data_dir / "objects" / row.object_key).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row.sha256
            assert dcmread(imx_server.data_dir / "objects" / row.object_key).SOPInstanceUID == row.sop_uid
    finally:
        index.close()

    # no dangling index row, no damaged object; no partial file survives the restart
    check = imx_server.imx("check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 missing objects, 0 damaged objects" in check.stdout
    assert list((imx_server.data_dir / "objects" / ".tmp").iterdir()) == []
    assert list((imx_server.data_dir / "tmp").iterdir()) == []

    # the radiologist simply sends again: everything ends up there exactly once
    again = StoreSCU(imx_server.dicom_port, files)
    assert again.finish() == 0
    assert len(again.acked) == 500
    assert sum(s["num_instances"] for s in imx_server.studies()) == 500


def test_object_store_outage_spools_and_drains(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bucket = "outage-test"
    server = ImxServer(
        tmp_path / "data",
        env={**moto.env(bucket), "IMX_STORE_TIMEOUT": "2", "IMX_SPOOL_RETRY_SECONDS": "1"},
    )
    server.start()
    try:
        files = make_ct_series(tmp_path / "series", 200)
        sender = StoreSCU(server.dicom_port, files)
        sender.wait_for(40)
        moto.pause()  # the store stops answering; the bucket survives
        try:
            rc = sender.finish()
            spooled_while_down = json.loads(server.http_get("/healthz")[1])["spool_depth"]
        finally:
            moto.resume()
        assert rc == 0, "every instance must be acknowledged (or refused), none left hanging"
        assert len(sender.acked) == 200
        assert spooled_while_down > 0

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status, body = server.http_get("/healthz")
            if status == 200 and json.loads(body)["spool_depth"] == 0:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"spool did not drain: {body!r}")

        store = S3Store(moto.endpoint, moto.access_key, moto.secret_key, bucket, timeout=5)
        index = _index(server)
        try:
            partner = index.partner_by_name("DEMO")
            assert partner is not None
            for f in sender.acked:
                row = index.get_instance(expected_uid(server.data_dir, partner.id, _sop_uid(f)))
                assert row is not None and row.location == LOCATION_STORE
                assert hashlib.sha256(store.get(row.object_key)).hexdigest() == row.sha256
        finally:
            index.close()
        assert list((server.data_dir / "spool").glob("*.dcm")) == []
        _, metrics = server.http_get("/metrics")
        assert b"imx_spool_drained_total" in metrics
    finally:
        server.stop()
