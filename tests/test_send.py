"""``imx send`` to the node, as a radiologist runs it: progress, summary, and a rerun that sends
nothing because the node already acknowledged everything."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from dicomfiles import make_ct_series

pytestmark = pytest.mark.peer


def test_imx_send_shows_progress_and_a_rerun_sends_nothing(imx_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "export"
    files = make_ct_series(folder / "series1", 30)
    extra = make_ct_series(tmp_path / "zipped", 10, patient="Roe^Richard", patient_id="HOSP-999")
    with zipfile.ZipFile(folder / "more.zip", "w") as z:
        for p in extra:
            z.write(p, f"DICOM/{p.name}")
    (folder / "notes.txt").write_text("not an image")
    state = tmp_path / "state.sqlite3"
    args = ["send", "127.0.0.1", str(imx_server.dicom_port), str(folder), "--aet", "DEMOPACS", "--aec", "IMX", "--state", str(state)]

    first = imx_server.imx(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout + first.stderr
    assert "40/40" in out  # the progress bar reached the end
    assert "Sent:          40" in out
    assert "Already there: 0" in out
    assert "1 other files skipped" in out or "other file" in out
    studies = imx_server.studies()
    assert sum(s["num_instances"] for s in studies) == 40
    assert len(studies) == 2

    second = imx_server.imx(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout + second.stderr
    assert "Sent:          0" in out
    assert "Already there: 40" in out
    assert sum(s["num_instances"] for s in imx_server.studies()) == 40
    # the state file holds hashes, never the UIDs or names it was given
    raw = state.read_bytes()
    assert not any(str(p.name).encode() in raw for p in files)
    assert b"1.2.826.0.1.3680043" not in raw  # pydicom's UID root, used by the generated instances


def test_imx_send_with_an_unregistered_ae_title_says_why(imx_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = make_ct_series(tmp_path / "s", 2)
    run = imx_server.imx(
        "send", "127.0.0.1", str(imx_server.dicom_port), str(files[0].parent), "--aet", "UNKNOWN", "--aec", "IMX",
        "--state", str(tmp_path / "state"), "--retries", "2", "--no-progress",
    )
    assert run.returncode != 0
    assert "calling AE title" in (run.stdout + run.stderr).lower() or "calling ae" in (run.stdout + run.stderr).lower()
    assert imx_server.studies() == []
