"""The audit log (issue 6): who did what, when, from where; append-only in the database itself
(SQLite and PostgreSQL); readable by admins over /api/audit and exportable as JSON lines; free
of PHI."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from authn import PASSWORD, World
from services import VENV_BIN
from sqlalchemy import delete, select, text, update
from sqlalchemy import exc as sa_exc

from storage.access import Accounts, AuditEvent
from storage.index import Index


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "data")
    try:
        yield w
    finally:
        w.close()


def rows(world: World, action: str | None = None) -> list[AuditEvent]:
    return list(reversed(Accounts(world.index).audit_events(limit=None, action=action)))


def test_logins_views_and_downloads_are_audited_once_per_caller_and_target(world: World) -> None:
    c = world.client("198.51.100.20")
    assert c.post("/api/login", json={"name": "nobody", "password": "x"}).status_code == 401
    assert c.post("/api/login", json={"name": "osh", "password": "wrong"}).status_code == 401
    failed = rows(world, "login_failed")
    assert [(e.username, e.user_id, e.outcome, e.address) for e in failed] == [
        ("unknown", None, "refused", "198.51.100.20"),  # never the name tried: it may be a typed password
        ("osh", None, "refused", "198.51.100.20"),
    ]
    s = world.session("osh", host="198.51.100.20")
    (login,) = rows(world, "login")
    assert login.username == "osh" and login.user_id == world.ids["osh"] and json.loads(login.detail)["via"] == "session"

    study = world.studies["OSH"]
    for _ in range(3):
        assert s.get(study.url("study") + "/metadata").status_code == 200
    assert s.get(study.url("series") + "/metadata").status_code == 200
    (viewed,) = rows(world, "study_viewed")  # one row, not four
    assert (viewed.target_kind, viewed.target, viewed.username) == ("study", study.study, "osh")
    for _ in range(2):
        assert s.get(study.url()).status_code == 200
        assert s.get(study.url() + "/frames/1").status_code == 200
    (downloaded,) = rows(world, "instance_downloaded")
    assert (downloaded.target_kind, downloaded.target) == ("instance", study.sop)
    (frames,) = rows(world, "frame_downloaded")
    assert frames.target == study.sop and json.loads(frames.detail)["study"] == study.study
    # another caller is audited on its own
    assert world.client().get(study.url("study") + "/metadata", headers=world.token("admin")).status_code == 200
    assert [e.username for e in rows(world, "study_viewed")] == ["osh", "admin"]
    # a study outside the caller's scope is not found and not audited as viewed
    assert s.get(world.studies["BISH"].url("study") + "/metadata").status_code == 404
    assert len(rows(world, "study_viewed")) == 2

    share = s.post(f"/api/studies/{study.study}/share", json={"hours": 1}).json()
    s.delete(f"/api/share/{share['id']}")
    token = s.post("/api/tokens", json={"label": "osirix"}).json()
    s.delete(f"/api/tokens/{token['id']}")
    world.session("admin").patch("/api/users/spec", json={"all_studies": True})
    assert s.post("/api/logout").status_code == 200
    actions = [e.action for e in rows(world)]
    for action in ("share_created", "share_revoked", "token_created", "token_revoked", "user_changed", "logout"):
        assert action in actions, action
    (changed,) = rows(world, "user_changed")
    assert changed.username == "admin" and changed.target == "spec" and json.loads(changed.detail)["changed"] == ["all_studies"]
    secrets = [share["url"].removeprefix("/s/"), token["token"], PASSWORD]
    for e in rows(world):
        assert not any(x in (e.target or "") + (e.detail or "") for x in secrets)


def test_admins_read_filter_page_and_export_the_audit_log(world: World) -> None:
    for _ in range(3):
        world.session("osh")
    world.session("spec")
    admin = world.session("admin")
    got = admin.get("/api/audit", params={"action": "login", "user": "osh"}).json()
    assert [i["user"] for i in got["items"]] == ["osh"] * 3 and got["next_before"] is None
    assert all(i["at"].endswith("Z") and i["address"] == "127.0.0.1" for i in got["items"])
    first = admin.get("/api/audit", params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["items"][0]["id"] > first["items"][1]["id"]  # newest first
    rest = admin.get("/api/audit", params={"before": first["next_before"]}).json()["items"]
    assert len(first["items"]) + len(rest) == len(rows(world)) and rest[0]["id"] < first["items"][1]["id"]
    assert admin.get("/api/audit", params={"from": "2000-01-01", "to": "2000-01-02"}).json()["items"] == []
    assert admin.get("/api/audit", params={"from": "yesterday"}).status_code == 400

    world.client().get(world.studies["OSH"].url("study") + "/metadata", headers=world.token("osh"))
    export = admin.get("/api/audit.jsonl")
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in export.headers["content-disposition"]
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert len(lines) == len(rows(world)) and {"login", "study_viewed"} <= {x["action"] for x in lines}
    assert [x["id"] for x in lines] == sorted((x["id"] for x in lines), reverse=True)
    only = [json.loads(line) for line in admin.get("/api/audit.jsonl", params={"action": "study_viewed"}).text.splitlines()]
    assert [x["target"] for x in only] == [world.studies["OSH"].study]
    # pseudonymous through and through: none of the original identifiers of the ingested files
    for original in ("CompressedSamples^CT1", "1CT1", "CompressedSamples^MR1", "4MR1", "1.3.6.1.4.1.5962"):
        assert original not in export.text
    assert world.session("osh").get("/api/audit.jsonl").status_code == 403


def test_the_audit_log_refuses_update_and_delete_in_the_database(index: Index) -> None:
    accounts = Accounts(index)
    accounts.add_audit("login", user_id=None, username="someone", address="192.0.2.1")
    accounts.add_audit("logout", user_id=None, username="someone", address="192.0.2.1")
    for statement in (
        update(AuditEvent).values(username="someone-else"),
        update(AuditEvent).where(AuditEvent.action == "login").values(outcome="ok2"),
        delete(AuditEvent),
        delete(AuditEvent).where(AuditEvent.action == "logout"),
    ):
        with pytest.raises(sa_exc.DBAPIError, match="append-only"):
            with index.write() as s:
                s.execute(statement)
    with pytest.raises(sa_exc.DBAPIError, match="append-only"):
        with index.write_engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_event"))
    with index.read() as s:
        kept = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert [(e.action, e.username, e.outcome) for e in kept] == [("login", "someone", "ok"), ("logout", "someone", "ok")]


def test_audit_refuses_an_unknown_action(world: World) -> None:
    from starlette.requests import Request

    from viewer.auth import audit

    request = Request({"type": "http", "app": world.app, "client": ("127.0.0.1", 1), "headers": [], "method": "GET", "path": "/"})
    with pytest.raises(ValueError, match="unknown audit action"):
        audit(request, None, "patient_name_looked_up")


def test_console_changes_to_users_and_partners_are_audited(tmp_path: Path) -> None:
    env = {**os.environ, "IMX_DATA_DIR": str(tmp_path / "data")}

    def imx(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "imx"), *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)

    assert imx("user", "add", "ana", "--role", "specialist", stdin="a-long-password\n").returncode == 0
    assert imx("user", "grant-all", "ana").returncode == 0
    token = imx("user", "token", "ana", "--label", "weasis")
    assert token.returncode == 0 and len(token.stdout.strip()) >= 40
    assert imx("user", "disable", "ana").returncode == 0
    assert imx("partner", "add", "ALMATY-1", "--ae", "ALMPACS").returncode == 0
    assert imx("partner", "remove", "ALMATY-1").returncode == 0
    index = Index(f"sqlite:///{tmp_path / 'data' / 'index.sqlite3'}")
    try:
        events = list(reversed(Accounts(index).audit_events(limit=None)))
        assert [(e.action, e.username, e.target) for e in events] == [
            ("user_changed", "console", "ana"),
            ("user_changed", "console", "ana"),
            ("token_created", "console", events[2].target),
            ("user_changed", "console", "ana"),
            ("partner_changed", "console", "ALMATY-1"),
            ("partner_changed", "console", "ALMATY-1"),
        ]
        assert events[-1].target_kind == "partner" and json.loads(events[-1].detail)["removed"]
        assert all(json.loads(e.detail)["via"] == "cli" for e in events)
        assert token.stdout.strip() not in "".join(e.detail for e in events)
    finally:
        index.close()
