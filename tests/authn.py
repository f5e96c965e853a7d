"""Credentials for tests that call the HTTP app in-process (FastAPI's TestClient on a real Archive):
users made through the same Accounts store the app reads, with a real API token or password."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from storage.access import Accounts
from storage.index import Index
from viewer.auth import hash_password, new_secret, secret_hash

PASSWORD = "correct horse battery"


def add_user(
    index: Index, name: str, role: str, *, partner_id: int | None = None, all_studies: bool = False, password: str = PASSWORD
) -> int:
    """A user with ``password``; returns its id."""
    return Accounts(index).add_user(name, role, hash_password(password), partner_id=partner_id, all_studies=all_studies).id


def token_for(index: Index, user_id: int, label: str = "tests") -> str:
    """A new API token of the user (the secret, to send as Bearer)."""
    secret = new_secret()
    Accounts(index).add_token(user_id, label, secret_hash(secret), None)
    return secret


def bearer(index: Index, name: str = "tests-admin", role: str = "admin", partner_id: int | None = None) -> dict[str, str]:
    """The Authorization header of a user made here (an admin unless told), created on first use."""
    accounts = Accounts(index)
    user = accounts.user_by_name(name)
    user_id = user.id if user else add_user(index, name, role, partner_id=partner_id)
    return {"Authorization": f"Bearer {token_for(index, user_id)}"}


# -- a small world: two partner hospitals, one study each, and a user of every kind -----------------
class World:
    """A real Archive (SQLite, filesystem store) with partners OSH and BISH, one study each
    (pydicom's CT_small from OSH, MR_small from BISH), and users: ``admin``, ``osh`` and ``bish``
    (partner users), ``spec`` (a specialist) and ``spec_all`` (a specialist granted all studies),
    all with :data:`PASSWORD`. ``client()`` is a TestClient on the app (``create_app``)."""

    USERS = ("admin", "osh", "bish", "spec", "spec_all")

    def __init__(self, data_dir: Path) -> None:
        from pydicom.data import get_testdata_file

        from imx.config import Settings, ensure_layout
        from imx.ingest import Archive, PartnerRef
        from storage.query import Scope, instances
        from viewer.app import create_app

        settings = Settings.load(data_dir=data_dir)
        ensure_layout(settings)
        self.archive = Archive(settings)
        self.index = self.archive.index
        self.index.migrate()
        self.partners: dict[str, int] = {}
        self.studies: dict[str, StudyRef] = {}
        for name, ae, file in (("OSH", "OSHPACS", "CT_small.dcm"), ("BISH", "BISHPACS", "MR_small.dcm")):
            p = self.index.add_partner(name, ae, [])
            self.partners[name] = p.id
            out = self.archive.ingest_file(PartnerRef.of(p), Path(get_testdata_file(file)))
            assert out.result.acknowledged
            (si,) = instances(self.index, Scope(None), sop_uids=[out.sop_instance_uid])
            self.studies[name] = StudyRef(si.study_uid, si.series_uid, si.sop_uid)
        self.ids = {
            "admin": add_user(self.index, "admin", "admin"),
            "osh": add_user(self.index, "osh", "partner", partner_id=self.partners["OSH"]),
            "bish": add_user(self.index, "bish", "partner", partner_id=self.partners["BISH"]),
            "spec": add_user(self.index, "spec", "specialist"),
            "spec_all": add_user(self.index, "spec_all", "specialist", all_studies=True),
        }
        self.app = create_app(self.archive)

    def client(self, host: str = "127.0.0.1") -> TestClient:
        return TestClient(self.app, client=(host, 40000))

    def token(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(self.index, self.ids[user])}"}

    @staticmethod
    def basic(user: str, password: str = PASSWORD) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def session(self, user: str, host: str = "127.0.0.1") -> TestClient:
        """A TestClient logged in as ``user`` (cookie), sending the CSRF header."""
        c = self.client(host)
        r = c.post("/api/login", json={"name": user, "password": PASSWORD})
        assert r.status_code == 200, r.text
        c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        return c

    def assign(self, specialist: str, partner: str) -> int:
        """A consultation on ``partner``'s study assigned to ``specialist`` (rows written directly)."""
        from storage.access import Consultation, ConsultationSpecialist, ConsultationStudy
        from storage.index import Study

        with self.index.write() as s:
            study = s.scalar(select(Study).where(Study.study_uid == self.studies[partner].study))
            assert study is not None
            c = Consultation(
                partner_id=study.partner_id,
                patient_id=study.patient_id,
                question="Second opinion, please.",
                time_zone="Asia/Almaty",
                status="requested",
            )
            s.add(c)
            s.flush()
            s.add(ConsultationStudy(consultation_id=c.id, study_id=study.id))
            s.add(ConsultationSpecialist(consultation_id=c.id, user_id=self.ids[specialist]))
            return c.id

    def close(self) -> None:
        self.archive.close()


@dataclass(frozen=True)
class StudyRef:
    study: str
    series: str
    sop: str

    def url(self, level: str = "instance") -> str:
        base = f"/dicomweb/studies/{self.study}"
        if level == "study":
            return base
        if level == "series":
            return f"{base}/series/{self.series}"
        return f"{base}/series/{self.series}/instances/{self.sop}"
