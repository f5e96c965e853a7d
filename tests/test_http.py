"""The HTTP app: health, metrics and the pseudonymous study list (admins only, with credentials)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from authn import bearer
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from imx.config import Settings, ensure_layout
from imx.ingest import Archive, PartnerRef
from viewer.app import create_app


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    settings = Settings.load(data_dir=tmp_path / "data")
    ensure_layout(settings)
    a = Archive(settings)
    a.index.migrate()
    partner = PartnerRef.of(a.index.add_partner("OSH", "OSHPACS", []))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert a.ingest_file(partner, Path(get_testdata_file(name))).result.acknowledged
    yield a
    a.close()


def client(archive: Archive, host: str = "127.0.0.1", authenticated: bool = True) -> TestClient:
    c = TestClient(create_app(archive), client=(host, 40000))
    if authenticated:
        c.headers.update(bearer(archive.index))
    return c


def test_studies_are_listed_with_pseudonymous_fields_only(archive: Archive) -> None:
    r = client(archive).get("/api/studies")
    assert r.status_code == 200
    studies = r.json()["studies"]
    assert len(studies) == 2
    assert {s["partner"] for s in studies} == {"OSH"}
    assert all(re.fullmatch(r"OSH-[0-9A-F]{6}", s["patient"]) for s in studies)
    assert all(s["study_uid"].startswith("2.25.") for s in studies)
    assert sorted(m for s in studies for m in s["modalities"]) == ["CT", "MR"]
    body = r.text
    for original in ("CompressedSamples^CT1", "1CT1", "CompressedSamples^MR1", "4MR1"):
        assert original not in body
    assert client(archive).get("/api/studies?limit=1").json()["studies"][0] == studies[0]
    assert client(archive).get("/api/studies?limit=0").status_code == 422


def test_the_study_list_needs_credentials_from_any_host(archive: Archive) -> None:
    for host in ("127.0.0.1", "203.0.113.9"):
        r = client(archive, host, authenticated=False).get("/api/studies")
        assert r.status_code == 401
        assert "Bearer" in r.headers["www-authenticate"]
    assert client(archive, "203.0.113.9").get("/api/studies").status_code == 200


def test_health_and_metrics(archive: Archive) -> None:
    c = client(archive)
    h = c.get("/healthz")
    assert h.status_code == 200
    assert h.json()["checks"] == {"index": "ok", "store": "ok"}
    assert h.json()["spool_depth"] == 0
    m = c.get("/metrics").text
    assert "imx_spool_depth 0.0" in m
    assert 'imx_index_objects{level="instances"} 2.0' in m
    assert 'imx_instances_stored_total{location="stored",partner="OSH"}' in m


def test_health_reports_an_unreachable_index(archive: Archive) -> None:
    archive.index.engine.dispose()
    (archive.settings.data_dir / "index.sqlite3").unlink()
    archive.settings.data_dir.joinpath("index.sqlite3").mkdir()  # now it cannot be opened
    h = client(archive, authenticated=False).get("/healthz")
    assert h.status_code == 503
    assert h.json()["checks"]["index"].startswith("unreachable")


def test_private_metrics_answer_loopback_or_an_admin_only(archive: Archive) -> None:
    archive.settings.metrics_public = False
    assert client(archive, "203.0.113.7", authenticated=False).get("/metrics").status_code == 401
    assert client(archive, "203.0.113.7").get("/metrics").status_code == 200  # an admin's token
    assert client(archive, authenticated=False).get("/metrics").status_code == 200
    archive.settings.metrics_public = True
    assert client(archive, "203.0.113.7", authenticated=False).get("/metrics").status_code == 200
    assert client(archive, "203.0.113.7", authenticated=False).get("/healthz").status_code == 200
