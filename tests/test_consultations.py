"""Consultations, the worklist, the study lists, re-identification and server-side formatting.

The HTTP tests run the real app (FastAPI TestClient) on a real Archive: instances go through the
real ingest path (parse, de-identify, store, index, identity vault), previews through the real
render workers, users log in through /api/login with their session cookie and CSRF token. The
storage tests run on SQLite and PostgreSQL (the ``index`` fixture)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dicomfiles import make_ct_series
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from imx import previews
from imx.config import Settings, ensure_layout
from imx.ingest import Archive, PartnerRef
from storage.access import Accounts
from storage.consultations import ConsultationError, Consultations, NotFound
from storage.index import Index, InstanceRecord
from storage.query import Scope, instances
from viewer.app import create_app
from viewer.auth import hash_password
from viewer.i18n_server import (
    UnknownZone,
    check_zone,
    format_datetime,
    negotiate_locale,
    parse_moment,
    viewer_zone,
    zone,
)

PASSWORD = "correct horse battery staple"
ORIGINALS = ("HOSP-000123", "Doe^Jane", "KZ-555", "Ivanov^Ivan", "HOSP-404", "Roe^Late")


# -- the world: two partners, their patients' studies, users of every role ----------------------------
@dataclass
class World:
    archive: Archive
    app: object
    studies: dict[str, str] = field(default_factory=dict)  # label -> pseudonymous study UID
    partners: dict[str, int] = field(default_factory=dict)

    def ingest(self, partner: str, paths: list[Path]) -> str:
        """Ingest one study's files from ``partner``: its pseudonymous study UID."""
        ref = PartnerRef.of(self.archive.index.partner_by_name(partner))  # type: ignore[arg-type]
        study_uids = set()
        for p in paths:
            out = self.archive.ingest_file(ref, p)
            assert out.result.acknowledged and out.sop_instance_uid, out
            (stored,) = instances(self.archive.index, Scope(None), sop_uids=[out.sop_instance_uid])
            study_uids.add(stored.study_uid)
        (uid,) = study_uids
        return uid


class Caller:
    """One logged-in user: a TestClient keeping the session cookie, sending the CSRF token."""

    def __init__(self, app: object, name: str) -> None:
        self.client = TestClient(app)  # type: ignore[arg-type]
        r = self.client.post("/api/login", json={"name": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        self.csrf = r.json()["csrf_token"]

    def get(self, path: str, **kw: object):  # type: ignore[no-untyped-def]
        return self.client.get(path, **kw)  # type: ignore[arg-type]

    def post(self, path: str, body: dict):  # type: ignore[no-untyped-def]
        return self.client.post(path, json=body, headers={"X-CSRF-Token": self.csrf})

    def delete(self, path: str):  # type: ignore[no-untyped-def]
        return self.client.delete(path, headers={"X-CSRF-Token": self.csrf})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("consult")
    settings = Settings.load(data_dir=base / "data")
    ensure_layout(settings)
    archive = Archive(settings)
    archive.index.migrate()
    index = archive.index
    w = World(archive, None)
    for name, ae, tz in (("OSH", "OSHPACS", "Asia/Bishkek"), ("ALM", "ALMPACS", "Asia/Almaty")):
        w.partners[name] = index.add_partner(name, ae, []).id
        assert index.set_partner_time_zone(name, tz)
    index.add_partner("URU", "URUPACS", [])  # no zone: Urumqi's
    files = base / "files"
    w.studies["jane1"] = w.ingest("OSH", make_ct_series(files / "j1", 2, "Doe^Jane", "HOSP-000123"))
    w.studies["jane2"] = w.ingest("OSH", make_ct_series(files / "j2", 2, "Doe^Jane", "HOSP-000123"))
    w.studies["mr"] = w.ingest("OSH", [Path(get_testdata_file("MR_small.dcm"))])
    w.studies["ivan"] = w.ingest("ALM", make_ct_series(files / "iv", 2, "Ivanov^Ivan", "KZ-555"))
    svc = previews.for_archive(archive)
    while svc.run_pending():
        pass
    accounts = Accounts(index)
    h = hash_password(PASSWORD)
    accounts.add_user("ada", "admin", h)
    accounts.add_user("sam", "specialist", h)
    accounts.add_user("sid", "specialist", h)
    accounts.add_user("wide", "specialist", h, all_studies=True)
    accounts.add_user("olga", "partner", h, partner_id=w.partners["OSH"])
    accounts.add_user("alma", "partner", h, partner_id=w.partners["ALM"])
    w.app = create_app(archive)
    yield w
    archive.close()


@pytest.fixture(scope="module")
def users(world: World) -> dict[str, Caller]:
    return {n: Caller(world.app, n) for n in ("ada", "sam", "sid", "wide", "olga", "alma")}


def plain(text: str) -> str:
    """CLDR's no-break spaces (2026\u00a0г., 9:00\u202fAM) as plain spaces, for comparing."""
    return " ".join(text.replace("\u00a0", " ").replace("\u202f", " ").split())


def no_originals(text: str) -> None:
    for original in ORIGINALS:
        assert original not in text, "an original identifier leaked"
    assert "Doe" not in text and "Ivanov" not in text


def new_consultation(
    users: dict[str, Caller], world: World, who: str = "olga", **body: object
) -> dict:
    payload = {
        "study_uids": [world.studies["jane2"]],
        "question": "Nodule in the right upper lobe: malignant?",
        "scheduled_at": "2026-12-01T09:00",
        "time_zone": "Asia/Bishkek",
        **body,
    }
    r = users[who].post("/api/consultations", payload)
    assert r.status_code == 201, r.text
    return r.json()


# -- the whole flow ---------------------------------------------------------------------------------
def test_partner_requests_admin_assigns_specialist_answers_partner_reads(
    world: World, users: dict[str, Caller]
) -> None:
    created = new_consultation(
        users, world, study_uids=[world.studies["jane2"], world.studies["jane1"]]
    )
    cid = created["id"]
    assert created["partner"] == {"name": "OSH", "time_zone": "Asia/Bishkek"}
    assert created["scheduled_at"] == "2026-12-01T03:00:00Z"
    assert created["patient"]["pseudonym"].startswith("OSH-")
    assert {s["study_uid"] for s in created["studies"]} == {
        world.studies["jane1"],
        world.studies["jane2"],
    }
    # previews are made: the images are ready, and the request moved on by itself
    assert created["images_ready"] is True
    assert created["status"] == "images_complete"

    # not assigned yet: the specialist does not see it, and cannot read it directly
    sam = users["sam"]
    assert cid not in [i["id"] for i in sam.get("/api/worklist").json()["items"]]
    assert sam.get(f"/api/consultations/{cid}").status_code == 404
    assert sam.post(f"/api/consultations/{cid}/assign", {"specialists": ["sam"]}).status_code == 404
    # only an admin assigns; only specialists can be assigned
    assert (
        users["olga"].post(f"/api/consultations/{cid}/assign", {"specialists": ["sam"]}).status_code
        == 403
    )
    r = users["ada"].post(f"/api/consultations/{cid}/assign", {"specialists": ["olga"]})
    assert r.status_code == 400 and "specialist" in r.json()["detail"]
    r = users["ada"].post(f"/api/consultations/{cid}/assign", {"specialists": ["sam"]})
    assert r.status_code == 200 and r.json()["specialists"] == ["sam"]

    listed = {i["id"]: i for i in sam.get("/api/worklist").json()["items"]}
    assert listed[cid]["images_ready"] is True
    assert listed[cid]["question"] == "Nodule in the right upper lobe: malignant?"
    # the specialist may now open the studies through the one query layer
    assert sam.get(f"/api/studies/{world.studies['jane1']}").status_code == 200
    assert sam.get(f"/api/studies/{world.studies['mr']}").status_code == 404

    # another specialist cannot write the opinion; the assigned one can
    assert users["sid"].post(f"/api/consultations/{cid}/opinion", {"text": "x"}).status_code == 404
    assert users["wide"].post(f"/api/consultations/{cid}/opinion", {"text": "x"}).status_code == 403
    r = sam.post(f"/api/consultations/{cid}/status", {"status": "in_review"})
    assert r.status_code == 200 and r.json()["status"] == "in_review"
    # not before an opinion exists
    r = sam.post(f"/api/consultations/{cid}/status", {"status": "answered"})
    assert r.status_code == 400 and "opinion" in r.json()["detail"]
    # the partner reads no half-written opinion and cannot answer it
    assert (
        users["olga"].post(f"/api/consultations/{cid}/status", {"status": "answered"}).status_code
        == 403
    )
    r = sam.post(f"/api/consultations/{cid}/opinion", {"text": "Benign hamartoma; no follow-up."})
    assert r.status_code == 200, r.text
    answered = r.json()
    assert answered["status"] == "answered" and answered["answered_by"] == "sam"
    no_originals(r.text)
    detail = sam.get(f"/api/consultations/{cid}")
    assert detail.status_code == 200 and "original" not in detail.json()
    no_originals(detail.text)
    no_originals(sam.get("/api/worklist").text)

    # the partner reads the answer, linked back to its own patient
    olga = users["olga"].get(f"/api/consultations/{cid}")
    assert olga.status_code == 200
    body = olga.json()
    assert body["opinion"] == "Benign hamartoma; no follow-up."
    assert body["original"]["patient_id"] == "HOSP-000123"
    assert body["original"]["patient_name"] == "Doe^Jane"
    # another partner does not even learn that it exists
    assert users["alma"].get(f"/api/consultations/{cid}").status_code == 404
    assert cid not in [i["id"] for i in users["alma"].get("/api/worklist").json()["items"]]
    # an admin sees it but not the originals
    admin = users["ada"].get(f"/api/consultations/{cid}")
    assert admin.status_code == 200 and "original" not in admin.json()

    # audited: created, changed (assign, status, opinion), re-identified; no original in the log
    events = Accounts(world.archive.index).audit_events(limit=1000)
    mine = [e for e in events if e.target == str(cid)]
    actions = [(e.action, e.username) for e in mine]
    assert ("consultation_created", "olga") in actions
    assert ("reidentify", "olga") in actions
    changes = sorted(
        json.loads(e.detail)["change"] for e in mine if e.action == "consultation_changed"
    )
    assert changes == ["assign", "opinion", "status"]
    for e in events:
        no_originals(f"{e.target} {e.detail}")


def test_studies_must_be_one_patient_of_one_partner(world: World, users: dict[str, Caller]) -> None:
    olga = users["olga"]
    r = olga.post(
        "/api/consultations",
        {
            "study_uids": [world.studies["jane1"], world.studies["mr"]],
            "question": "q",
            "scheduled_at": None,
        },
    )
    assert r.status_code == 400 and "more than one patient" in r.json()["detail"]
    # another partner's study is not found for a partner user
    r = olga.post("/api/consultations", {"study_uids": [world.studies["ivan"]], "question": "q"})
    assert r.status_code == 404
    r = olga.post(
        "/api/consultations",
        {"study_uids": [world.studies["jane1"], world.studies["ivan"]], "question": "q"},
    )
    assert r.status_code == 400
    # an admin may request for any partner, not across partners
    r = users["ada"].post(
        "/api/consultations",
        {"study_uids": [world.studies["jane1"], world.studies["ivan"]], "question": "q"},
    )
    assert r.status_code == 400 and "more than one partner" in r.json()["detail"]
    # specialists do not request
    assert (
        users["wide"]
        .post("/api/consultations", {"study_uids": [world.studies["jane1"]], "question": "q"})
        .status_code
        == 403
    )
    # a bad zone or time is refused in plain words
    r = olga.post(
        "/api/consultations",
        {"study_uids": [world.studies["jane1"]], "question": "q", "time_zone": "Mars/Olympus"},
    )
    assert r.status_code == 400 and "time zone" in r.json()["detail"]
    r = olga.post(
        "/api/consultations",
        {"study_uids": [world.studies["jane1"]], "question": "q", "scheduled_at": "tomorrow"},
    )
    assert r.status_code == 400 and "ISO 8601" in r.json()["detail"]
    # no CSRF token, no request
    r = olga.client.post(
        "/api/consultations", json={"study_uids": [world.studies["jane1"]], "question": "q"}
    )
    assert r.status_code == 403
    # no credentials at all
    assert TestClient(world.app).get("/api/worklist").status_code == 401  # type: ignore[arg-type]


# -- times and languages ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tz", "local", "label"),
    [
        ("Asia/Urumqi", "09:00", "UTC+6"),
        ("Asia/Shanghai", "11:00", "UTC+8"),
        ("Asia/Bishkek", "09:00", "UTC+6"),
        ("Asia/Almaty", "08:00", "UTC+5"),
        ("Asia/Dushanbe", "08:00", "UTC+5"),
    ],
)
def test_scheduled_time_is_shown_in_the_viewers_zone_and_the_partners(
    world: World, users: dict[str, Caller], tz: str, local: str, label: str
) -> None:
    # requested at 09:00 in Bishkek (UTC+6): 03:00 UTC
    cid = new_consultation(users, world)["id"]
    item = users["ada"].get(f"/api/consultations/{cid}", params={"tz": tz, "locale": "ru"}).json()
    viewer = item["scheduled"]["viewer"]
    assert viewer["zone"] == tz
    assert viewer["iso"].startswith(f"2026-12-01T{local}")
    assert plain(viewer["display"]) == f"1 дек. 2026 г., {local} {label}"
    partner = item["scheduled"]["partner"]
    assert partner["zone"] == "Asia/Bishkek"
    assert plain(partner["display"]) == "1 дек. 2026 г., 09:00 UTC+6"
    assert item["scheduled_at"] == "2026-12-01T03:00:00Z"


def test_languages_and_the_users_saved_settings(world: World, users: dict[str, Caller]) -> None:
    cid = new_consultation(users, world, scheduled_at="2026-12-01T09:00+06:00", time_zone=None)[
        "id"
    ]
    ada = users["ada"]
    zh = ada.get(f"/api/consultations/{cid}", params={"locale": "zh", "tz": "Asia/Shanghai"}).json()
    assert zh["scheduled"]["viewer"]["display"] == "2026年12月1日 11:00 UTC+8"
    assert zh["time_zone"] == "Asia/Bishkek"  # the partner's, when none was given
    # Kazakh and Kyrgyz readers get Russian, from the browser's Accept-Language too
    kk = ada.get(
        f"/api/consultations/{cid}", headers={"Accept-Language": "kk-KZ,kk;q=0.9,en;q=0.5"}
    ).json()
    assert "дек." in kk["scheduled"]["viewer"]["display"]
    en = ada.get(f"/api/consultations/{cid}", headers={"Accept-Language": "de-DE, en;q=0.8"}).json()
    assert plain(en["scheduled"]["viewer"]["display"]) == "Dec 1, 2026, 9:00 AM UTC+6"
    # a saved locale and zone win over the browser's
    accounts = Accounts(world.archive.index)
    user = accounts.user_by_name("wide")
    assert user is not None
    accounts.update_user(user.id, locale="zh", time_zone="Asia/Almaty")
    try:
        wide = Caller(world.app, "wide")
        item = wide.get(
            f"/api/consultations/{cid}",
            params={"tz": "Asia/Shanghai"},
            headers={"Accept-Language": "en"},
        ).json()
        assert item["scheduled"]["viewer"] == {
            "iso": "2026-12-01T08:00+05:00",
            "display": "2026年12月1日 08:00 UTC+5",
            "zone": "Asia/Almaty",
        }
        # ... but an explicit ?locale= is what the page asks for now
        ru = wide.get(f"/api/consultations/{cid}", params={"locale": "ru"}).json()
        assert plain(ru["scheduled"]["viewer"]["display"]) == "1 дек. 2026 г., 08:00 UTC+5"
    finally:
        accounts.update_user(user.id, locale=None, time_zone=None)
    # study dates too
    study = ada.get(f"/api/studies/{world.studies['mr']}", params={"locale": "ru"}).json()
    assert study["date"] and "г." in study["date_display"]


def test_almaty_is_utc_plus_5_from_the_packaged_zone_data() -> None:
    # Kazakhstan moved to a single zone, UTC+5, on 1 March 2024
    assert dt.datetime(2026, 6, 1, 12, tzinfo=zone("Asia/Almaty")).utcoffset() == dt.timedelta(
        hours=5
    )
    assert dt.datetime(2023, 6, 1, 12, tzinfo=zone("Asia/Almaty")).utcoffset() == dt.timedelta(
        hours=6
    )
    for bad in ("Mars/Olympus", "../etc/passwd", "", "Asia/"):
        with pytest.raises(UnknownZone):
            check_zone(bad)
    assert viewer_zone(None, "Nowhere/Else") == "Asia/Urumqi"
    assert viewer_zone("Asia/Dushanbe", "Asia/Shanghai") == "Asia/Dushanbe"
    assert negotiate_locale(None, None, "ky;q=0.9, zh-CN;q=0.95") == "zh"
    assert negotiate_locale(None, None, "fr, de") == "en"
    assert negotiate_locale("ky", "zh", None) == "ru"
    utc, _ = parse_moment("2026-12-01T09:00", "Asia/Dushanbe")
    assert utc == dt.datetime(2026, 12, 1, 4, 0)
    assert format_datetime(utc, "Asia/Dushanbe", "zh") == "2026年12月1日 09:00 UTC+5"
    with pytest.raises(ValueError, match="time zone"):
        parse_moment("2026-12-01T09:00", None)


# -- the worklist's filters -------------------------------------------------------------------------------
def test_worklist_filters(world: World, users: dict[str, Caller]) -> None:
    ada = users["ada"]
    ct = new_consultation(users, world, scheduled_at="2027-03-10T10:00")["id"]
    mr = new_consultation(
        users, world, study_uids=[world.studies["mr"]], scheduled_at="2027-03-12T10:00"
    )["id"]
    kz = new_consultation(
        users,
        world,
        who="alma",
        study_uids=[world.studies["ivan"]],
        scheduled_at="2027-03-11T10:00",
        time_zone=None,
    )["id"]
    ada.post(f"/api/consultations/{mr}/status", {"status": "in_review"})

    def ids(**params: str) -> list[int]:
        r = ada.get("/api/worklist", params={"from": "2027-03-01", "to": "2027-03-31", **params})
        assert r.status_code == 200, r.text
        return [i["id"] for i in r.json()["items"]]

    assert ids() == [ct, kz, mr]  # soonest first
    assert ids(partner="ALM") == [kz]
    assert ids(modality="MR") == [mr]
    assert ids(modality="ct") == [ct, kz]
    assert ids(status="in_review") == [mr]
    assert ids(status="images_complete,in_review") == [ct, kz, mr]
    assert ids(**{"from": "2027-03-11", "to": "2027-03-11"}) == [kz]
    # the day is the viewer's: 10:00 in Almaty is 2027-03-11 in Urumqi and in Beijing alike
    assert ids(**{"from": "2027-03-12", "to": "2027-03-12", "tz": "Asia/Shanghai"}) == [mr]
    page = ada.get(
        "/api/worklist", params={"from": "2027-03-01", "to": "2027-03-31", "limit": 2, "offset": 1}
    ).json()
    assert [i["id"] for i in page["items"]] == [kz, mr] and page["total"] == 3
    assert ada.get("/api/worklist", params={"status": "lost"}).status_code == 400
    assert ada.get("/api/worklist", params={"from": "someday"}).status_code == 400
    # a partner's users see their own partner's only, whatever they ask
    olga = [
        i["id"]
        for i in users["olga"]
        .get("/api/worklist", params={"from": "2027-03-01", "partner": "ALM"})
        .json()["items"]
    ]
    assert olga == []


def test_images_ready_waits_for_previews(
    world: World, users: dict[str, Caller], tmp_path: Path
) -> None:
    uid = world.ingest("OSH", make_ct_series(tmp_path / "late", 2, "Roe^Late", "HOSP-404"))
    cid = new_consultation(users, world, study_uids=[uid])["id"]
    item = users["ada"].get(f"/api/consultations/{cid}").json()
    assert item["images_ready"] is False and item["status"] == "requested"
    r = users["ada"].post(f"/api/consultations/{cid}/status", {"status": "images_complete"})
    assert r.status_code == 400 and "not all ready" in r.json()["detail"]
    svc = previews.for_archive(world.archive)
    while svc.run_pending():
        pass
    item = users["ada"].get(f"/api/consultations/{cid}").json()
    assert item["images_ready"] is True and item["status"] == "images_complete"


# -- studies, priors, identity ----------------------------------------------------------------------------
def test_study_list_is_scoped(world: World, users: dict[str, Caller]) -> None:
    def uids(who: str, **params: str) -> set[str]:
        r = users[who].get("/api/studies", params=params)
        assert r.status_code == 200, r.text
        return {s["study_uid"] for s in r.json()["studies"]}

    everything = uids("ada")
    assert {world.studies[k] for k in ("jane1", "jane2", "mr", "ivan")} <= everything
    assert world.studies["ivan"] not in uids("olga")
    assert uids("alma") == {world.studies["ivan"]}
    assert uids("ada", partner="ALM") == {world.studies["ivan"]}
    assert uids("ada", modality="MR") == {world.studies["mr"]}
    pseudonym = (
        users["ada"].get(f"/api/studies/{world.studies['ivan']}").json()["patient"]["pseudonym"]
    )
    assert uids("ada", q=pseudonym.lower()) == {world.studies["ivan"]}
    assert uids("sid") == set()  # a specialist with nothing assigned
    no_originals(users["ada"].get("/api/studies").text)


def test_study_detail_priors_and_identity(world: World, users: dict[str, Caller]) -> None:
    ada, olga, alma = users["ada"], users["olga"], users["alma"]
    jane1, jane2 = world.studies["jane1"], world.studies["jane2"]
    r = ada.get(f"/api/studies/{jane1}")
    assert r.status_code == 200
    study = r.json()
    assert study["partner"] == {"name": "OSH", "time_zone": "Asia/Bishkek"}
    assert study["num_instances"] == 2 and study["modalities"] == ["CT"]
    (series,) = study["series"]
    assert series["modality"] == "CT" and series["num_instances"] == 2
    thumb = ada.get(series["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/")

    priors = olga.get(f"/api/studies/{jane1}/priors").json()["priors"]
    assert [p["study_uid"] for p in priors] == [jane2]
    assert alma.get(f"/api/studies/{jane1}/priors").status_code == 404
    assert alma.get(f"/api/studies/{jane1}").status_code == 404

    r = olga.get(f"/api/studies/{jane1}/identity")
    assert r.status_code == 200
    assert r.json()["patient_id"] == "HOSP-000123" and r.json()["patient_name"] == "Doe^Jane"
    assert alma.get(f"/api/studies/{jane1}/identity").status_code == 404
    assert ada.get(f"/api/studies/{jane1}/identity").status_code == 403
    assert users["wide"].get(f"/api/studies/{jane1}/identity").status_code == 403
    events = Accounts(world.archive.index).audit_events(
        action="reidentify", username="olga", limit=100
    )
    assert any(e.target_kind == "study" and e.target == jane1 for e in events)


# -- storage, on SQLite and PostgreSQL ------------------------------------------------------------------
def _record(
    partner_id: int,
    patient: str,
    study: str,
    series: str,
    sop: str,
    modality: str = "CT",
    **kw: object,
) -> InstanceRecord:
    return InstanceRecord(
        partner_id=partner_id,
        patient_pseudonym=patient,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        object_key=f"k/{sop}",
        sha256="0" * 64,
        size_bytes=10,
        modality=modality,
        study_date="20261101",
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class Who:
    user_id: int | None
    role: str
    partner_id: int | None = None
    all_studies: bool = False


def test_storage_consultations(index: Index) -> None:
    a = index.add_partner("A", "AAE", []).id
    b = index.add_partner("B", "BAE", []).id
    index.add_instance(_record(a, "A-P1", "1.1", "1.1.1", "1.1.1.1"))
    index.add_instance(_record(a, "A-P1", "1.2", "1.2.1", "1.2.1.1", modality="MR"))
    index.add_instance(_record(a, "A-P2", "1.3", "1.3.1", "1.3.1.1"))
    index.add_instance(_record(b, "B-P1", "2.1", "2.1.1", "2.1.1.1"))
    index.add_instance(_record(a, "A-P1", "1.4", "1.4.1", "1.4.1.1", quarantine="burned-in text"))
    accounts = Accounts(index)
    spec = accounts.add_user("s", "specialist", "x").id
    accounts.add_user("p", "partner", "x", partner_id=a)
    store = Consultations(index)
    mine = Scope(a)

    with pytest.raises(ConsultationError, match="more than one patient"):
        store.create(
            study_uids=["1.1", "1.3"],
            question="q",
            scheduled_at=None,
            time_zone=None,
            created_by=None,
            scope=mine,
        )
    with pytest.raises(ConsultationError, match="not found"):
        store.create(
            study_uids=["2.1"],
            question="q",
            scheduled_at=None,
            time_zone=None,
            created_by=None,
            scope=mine,
        )
    with pytest.raises(ConsultationError, match="not found"):  # every instance quarantined
        store.create(
            study_uids=["1.4"],
            question="q",
            scheduled_at=None,
            time_zone=None,
            created_by=None,
            scope=mine,
        )
    with pytest.raises(ConsultationError, match="question"):
        store.create(
            study_uids=["1.1"],
            question="  ",
            scheduled_at=None,
            time_zone=None,
            created_by=None,
            scope=mine,
        )
    when = dt.datetime(2026, 12, 1, 3, 0)
    cid = store.create(
        study_uids=["1.1"],
        question="q",
        scheduled_at=when,
        time_zone=None,
        created_by=None,
        scope=mine,
    )
    later = store.create(
        study_uids=["1.3"],
        question="q2",
        scheduled_at=None,
        time_zone="Asia/Almaty",
        created_by=None,
        scope=mine,
    )

    admin, partner_a, partner_b = (
        Who(None, "admin"),
        Who(None, "partner", a),
        Who(None, "partner", b),
    )
    specialist = Who(spec, "specialist")
    item = store.get(cid, admin)
    assert item["time_zone"] == "Asia/Urumqi" and item["scheduled_at"] == when
    # no previews made yet: not ready, still requested
    assert item["images_ready"] is False and item["status"] == "requested"
    assert [i["id"] for i in store.list(partner_a)[0]] == [cid, later]  # unscheduled last
    assert store.list(partner_b) == ([], 0)
    with pytest.raises(NotFound):
        store.get(cid, specialist)
    assert store.assign(cid, ["s"]) == ["s"]
    with pytest.raises(ConsultationError, match="not an active specialist"):
        store.assign(cid, ["p"])
    assert store.get(cid, specialist)["specialists"] == ["s"]
    # the specialist's scope holds the consultation's studies only: the prior is not offered
    assert store.priors("1.1", Scope(None, specialist_id=spec)) == []
    assert [s.study_uid for s in store.priors("1.1", mine)] == ["1.2"]
    with pytest.raises(NotFound):
        store.priors("1.1", Scope(b))

    # images become ready once every visible instance is settled by the preview workers
    for row in index.pending_previews(100):
        index.set_preview_status(row["id"], "ok", None)
    assert store.images_ready([store.get(cid, admin)["studies"][0].id]) == {
        store.get(cid, admin)["studies"][0].id: True
    }
    assert store.get(cid, admin)["status"] == "images_complete"
    store.add_study(cid, "1.2")
    with pytest.raises(ConsultationError):
        store.add_study(cid, "1.3")  # another patient
    assert store.list(admin, modality="MR")[0][0]["id"] == cid
    assert store.list(admin, scheduled_from=dt.datetime(2026, 12, 2))[1] == 0
    assert store.list(admin, scheduled_before=dt.datetime(2026, 12, 2))[1] == 1

    # transitions
    with pytest.raises(ConsultationError, match="cannot go from"):
        store.set_status(cid, "answered")  # images_complete -> answered skips review
    assert store.set_status(cid, "in_review") == ("images_complete", "in_review")
    with pytest.raises(ConsultationError, match="opinion"):
        store.set_status(cid, "answered")
    store.record_opinion(cid, "fine", spec)
    done = store.get(cid, partner_a)
    assert done["status"] == "answered" and done["opinion"] == "fine" and done["answered_by"] == "s"
    assert store.set_status(cid, "in_review") == ("answered", "in_review")  # reopened
    with pytest.raises(ConsultationError):
        store.remove_study(cid, "2.1")
    store.remove_study(cid, "1.2")
    with pytest.raises(ConsultationError, match="at least one"):
        store.remove_study(cid, "1.1")

    listed = store.study_list(Scope(None), modality="MR")
    assert [r["study_uid"] for r in listed] == ["1.2"]
    assert {r["study_uid"] for r in store.study_list(Scope(b))} == {"2.1"}
    assert {r["study_uid"] for r in store.study_list(Scope(None), text="a-p2")} == {"1.3"}
    assert index.set_partner_time_zone("B", "Asia/Dushanbe")
    assert not index.set_partner_time_zone("nobody", "Asia/Dushanbe")


def test_partner_tz_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMX_")}
    env["IMX_DATA_DIR"] = str(tmp_path / "data")

    def imx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "imx.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert imx("partner", "add", "DUS", "--ae", "DUSPACS").returncode == 0
    r = imx("partner", "tz", "DUS", "Asia/Dushanbe")
    assert r.returncode == 0 and "Asia/Dushanbe" in r.stdout
    r = imx("partner", "tz", "DUS", "Asia/Stalinabad-ish")
    assert r.returncode == 2 and "not a known time zone" in r.stderr
    assert imx("partner", "tz", "NOBODY", "Asia/Dushanbe").returncode == 1
    index = Index(f"sqlite:///{tmp_path / 'data' / 'index.sqlite3'}")
    try:
        partner = index.partner_by_name("DUS")
        assert partner is not None and partner.time_zone == "Asia/Dushanbe"
        r = imx("partner", "tz", "DUS", "--default")
        assert r.returncode == 0 and "Asia/Urumqi" in r.stdout
        partner = index.partner_by_name("DUS")
        assert partner is not None and partner.time_zone is None
    finally:
        index.close()
