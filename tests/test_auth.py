"""Accounts and access control (issue 6): every route needs credentials, CSRF on state-changing
session requests, partner isolation over DICOMweb and previews with a session, an API token and
HTTP Basic, specialists limited to their consultations, disabled users, argon2 hashes, growing
delays after failed logins, share links; the app in-process on a real Archive, and a real
``imx serve`` with a real Bearer token and Basic."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from authn import PASSWORD, World
from dicomfiles import make_ct_series, storescu
from services import ImxServer
from sqlalchemy import update
from starlette.routing import Mount

from storage.access import Accounts, ShareLink, User
from viewer.auth import LoginThrottle

OPEN = {"/healthz", "/metrics", "/login", "/api/login", "/s/{token}", "/favicon.ico"}
PAGE_REDIRECTS = {"/admin": "/studies"}  # a redirect to a page that asks for the login


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "data")
    try:
        yield w
    finally:
        w.close()


def routes(app) -> Iterator[tuple[str, set[str]]]:  # type: ignore[no-untyped-def]
    """(path, methods) of every HTTP route, through included routers."""

    def walk(items, prefix: str) -> Iterator[tuple[str, set[str]]]:  # type: ignore[no-untyped-def]
        for r in items:
            if hasattr(r, "original_router"):  # FastAPI's included router
                yield from walk(r.original_router.routes, prefix + r.include_context.prefix)
            elif isinstance(r, Mount):
                continue  # static files
            elif hasattr(r, "methods") and r.methods:
                yield prefix + r.path, set(r.methods) - {"HEAD"}

    yield from walk(app.routes, "")


def concrete(path: str) -> str:
    """A request path for a route path: UIDs for UID parameters, 1 for the rest."""
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: "1" if m.group(1) in ("n", "frames") or m.group(1).endswith("id") else "2.25.1", path)


# -- authentication everywhere -----------------------------------------------------------------------
def test_every_route_but_the_open_ones_needs_credentials(world: World) -> None:
    c = world.client("203.0.113.9")
    checked = 0
    for path, methods in routes(world.app):
        if path in OPEN or path.startswith("/static"):
            continue
        for method in methods:
            r = c.request(method, concrete(path), json={} if method in ("POST", "PUT", "PATCH") else None, follow_redirects=False)
            if r.status_code == 303:  # an HTML page sends the browser to the login form
                assert r.headers["location"].startswith(("/login", PAGE_REDIRECTS.get(path, "/login"))), (method, path)
            else:
                assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
                assert "Bearer" in r.headers["www-authenticate"], (method, path)
            checked += 1
    assert checked >= 40  # DICOMweb, previews, accounts, audit, shares...
    assert c.get("/healthz").status_code == 200
    assert c.get("/metrics").status_code == 200
    assert c.get("/openapi.json").status_code == 404  # no schema to the anonymous


def test_a_state_changing_session_request_needs_the_csrf_token(world: World) -> None:
    c = world.session("osh")
    csrf = c.headers.pop("X-CSRF-Token")
    r = c.post("/api/tokens", json={"label": "x"})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    assert c.put("/api/me/preferences", json={"locale": "ru"}).status_code == 403
    assert c.post("/api/logout").status_code == 403
    assert c.post("/api/tokens", json={"label": "x"}, headers={"X-CSRF-Token": "not-it"}).status_code == 403
    assert c.post("/api/tokens", json={"label": "x"}, headers={"X-CSRF-Token": csrf}).status_code == 201
    assert c.get("/api/me").json()["csrf_token"] == csrf  # reads need none
    # a token or Basic caller is not a browser: no CSRF token needed
    assert world.client().post("/api/tokens", json={"label": "y"}, headers=world.token("osh")).status_code == 201
    assert world.client().post("/api/tokens", json={"label": "z"}, headers=World.basic("osh")).status_code == 201


def test_login_sets_a_safe_cookie_and_logout_ends_the_session(world: World) -> None:
    c = world.client()
    r = c.post("/api/login", json={"name": "osh", "password": PASSWORD})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "imx_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure under HTTPS
    me = r.json()
    assert me["name"] == "osh" and me["role"] == "partner" and me["partner_id"] == world.partners["OSH"]
    assert c.get("/api/me").json()["name"] == "osh"
    assert c.post("/api/logout", headers={"X-CSRF-Token": me["csrf_token"]}).status_code == 200
    assert c.get("/api/me").status_code == 401
    assert world.client().post("/api/login", json={"name": "osh", "password": "wrong"}).status_code == 401
    assert world.client().post("/api/login", json={"name": "nobody", "password": "wrong"}).status_code == 401


def test_preferences_are_saved(world: World) -> None:
    c = world.session("spec")
    r = c.put("/api/me/preferences", json={"locale": "zh", "time_zone": "Asia/Urumqi"})
    assert r.status_code == 200 and r.json()["locale"] == "zh" and r.json()["time_zone"] == "Asia/Urumqi"
    assert c.get("/api/me").json()["locale"] == "zh"
    assert c.put("/api/me/preferences", json={"locale": "fr"}).status_code == 400
    assert c.put("/api/me/preferences", json={"time_zone": "Mars/Olympus"}).status_code == 400


# -- who sees what ------------------------------------------------------------------------------------
def _credentials(world: World, user: str) -> dict[str, tuple[object, dict[str, str]]]:
    return {
        "session": (world.session(user), {}),
        "token": (world.client(), world.token(user)),
        "basic": (world.client(), World.basic(user)),
    }


def test_a_partner_user_sees_only_their_hospitals_studies_over_dicomweb(world: World) -> None:
    mine, theirs = world.studies["OSH"], world.studies["BISH"]
    for how, (c, headers) in _credentials(world, "osh").items():
        listed = c.get("/dicomweb/studies", headers=headers)  # type: ignore[attr-defined]
        assert listed.status_code == 200, how
        assert [s["0020000D"]["Value"][0] for s in listed.json()] == [mine.study], how
        q = c.get(f"/dicomweb/studies?StudyInstanceUID={theirs.study}", headers=headers)  # type: ignore[attr-defined]
        assert q.status_code in (200, 204) and not (q.content and q.json()), how
        assert c.get(f"/dicomweb/series?StudyInstanceUID={theirs.study}", headers=headers).json() == [], how  # type: ignore[attr-defined]
        assert c.get(f"/dicomweb/studies/{theirs.study}/series", headers=headers).json() == [], how  # type: ignore[attr-defined]
        for path in (
            theirs.url("study"),
            theirs.url("series"),
            theirs.url(),
            theirs.url("study") + "/metadata",
            theirs.url("series") + "/metadata",
            theirs.url() + "/metadata",
            theirs.url() + "/frames/1",
            theirs.url() + "/rendered",
            theirs.url() + "/frames/1/rendered",
            theirs.url("study") + "/rendered",
            theirs.url("study") + "/thumbnail",
            theirs.url("series") + "/thumbnail",
            theirs.url() + "/thumbnail",
            f"/api/instances/{theirs.sop}/rendered",
            f"/api/instances/{theirs.sop}/frames/1/rendered",
            f"/api/series/{theirs.series}/thumbnail",
        ):
            r = c.get(path, headers=headers)  # type: ignore[attr-defined]
            assert r.status_code in (403, 404), (how, path, r.status_code)
        for path in (mine.url("study") + "/metadata", mine.url(), mine.url() + "/frames/1"):
            assert c.get(path, headers=headers).status_code == 200, (how, path)  # type: ignore[attr-defined]


def test_a_specialist_sees_only_the_studies_of_assigned_consultations(world: World) -> None:
    c, headers = world.client(), world.token("spec")
    assert c.get("/dicomweb/studies", headers=headers).json() == []
    assert c.get(world.studies["OSH"].url("study") + "/metadata", headers=headers).status_code == 404
    world.assign("spec", "OSH")
    listed = [s["0020000D"]["Value"][0] for s in c.get("/dicomweb/studies", headers=headers).json()]
    assert listed == [world.studies["OSH"].study]
    assert c.get(world.studies["OSH"].url("study") + "/metadata", headers=headers).status_code == 200
    assert c.get(world.studies["BISH"].url("study") + "/metadata", headers=headers).status_code == 404
    everything = c.get("/dicomweb/studies", headers=world.token("spec_all")).json()
    assert len(everything) == 2
    assert len(c.get("/dicomweb/studies", headers=world.token("admin")).json()) == 2


def test_stow_stores_as_the_partner_of_the_user_and_refuses_specialists(world: World, tmp_path: Path) -> None:
    (one,) = make_ct_series(tmp_path / "stow", 1, patient="Stow^Sam", patient_id="STOW-1")
    boundary = "imx-auth-test"
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + one.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    c = world.client()
    refused = c.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **world.token("spec_all")})
    assert refused.status_code == 403
    # a partner user cannot pretend to be another partner: the named one is ignored
    r = c.post("/dicomweb/studies?partner=BISH", content=body, headers={"Content-Type": ctype, **world.token("osh")})
    assert r.status_code == 200, r.text
    stored = [s["0020000D"]["Value"][0] for s in c.get("/dicomweb/studies", headers=world.token("osh")).json()]
    assert len(stored) == 2  # OSH's own study and the new one
    assert len(c.get("/dicomweb/studies", headers=world.token("bish")).json()) == 1
    assert c.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **world.token("admin")}).status_code == 403  # names no partner


def test_a_disabled_user_is_refused_every_way(world: World) -> None:
    session, token = world.session("bish"), world.token("bish")
    assert world.client().get("/api/me", headers=token).status_code == 200
    assert world.client().get("/api/me", headers=World.basic("bish")).status_code == 200
    admin = world.session("admin")
    r = admin.patch("/api/users/bish", json={"active": False})
    assert r.status_code == 200 and r.json()["active"] is False
    assert session.get("/api/me").status_code == 401
    assert world.client().get("/api/me", headers=token).status_code == 401
    assert world.client().get("/api/me", headers=World.basic("bish")).status_code == 401  # even cached
    assert world.client().post("/api/login", json={"name": "bish", "password": PASSWORD}).status_code == 401
    assert admin.patch("/api/users/admin", json={"active": False}).status_code == 400  # not oneself


def test_only_admins_manage_users(world: World) -> None:
    admin = world.session("admin")
    r = admin.post("/api/users", json={"name": "kaz1", "role": "partner", "partner": "OSH"})
    assert r.status_code == 201 and len(r.json()["password"]) >= 20  # generated, shown once
    assert world.client().post("/api/login", json={"name": "kaz1", "password": r.json()["password"]}).status_code == 200
    assert admin.post("/api/users", json={"name": "kaz1", "role": "admin", "password": "long-enough"}).status_code == 409
    assert admin.post("/api/users", json={"name": "x", "role": "partner"}).status_code == 400
    assert admin.patch("/api/users/spec", json={"all_studies": True}).json()["all_studies"] is True
    assert admin.patch("/api/users/osh", json={"all_studies": True}).status_code == 400
    names = {u["name"] for u in admin.get("/api/users").json()["users"]}
    assert {"admin", "osh", "bish", "spec", "spec_all", "kaz1"} <= names
    for user in ("osh", "spec"):
        s = world.session(user)
        assert s.get("/api/users").status_code == 403
        assert s.post("/api/users", json={"name": "evil", "role": "admin", "password": "long-enough"}).status_code == 403
        assert s.get("/api/audit").status_code == 403


def test_passwords_are_kept_as_argon2_hashes_only(world: World) -> None:
    with world.index.read() as s:
        hashes = [u.password_hash for u in s.query(User)]
    assert hashes and all(h.startswith("$argon2id$") for h in hashes)
    assert all(PASSWORD not in h for h in hashes)
    world.index.engine.dispose()
    world.index.write_engine.dispose()
    raw = b"".join(p.read_bytes() for p in world.archive.settings.data_dir.glob("index.sqlite3*"))
    assert PASSWORD.encode() not in raw


def test_api_tokens_are_shown_once_and_revocable(world: World) -> None:
    c = world.session("spec")
    made = c.post("/api/tokens", json={"label": "weasis", "days": 30})
    assert made.status_code == 201
    secret, token_id = made.json()["token"], made.json()["id"]
    listed = c.get("/api/tokens").json()["tokens"]
    assert [t["label"] for t in listed] == ["weasis"] and secret not in json.dumps(listed)
    bearer = {"Authorization": f"Bearer {secret}"}
    assert world.client().get("/api/me", headers=bearer).json()["name"] == "spec"
    assert c.get("/api/tokens").json()["tokens"][0]["last_used_at"] is not None
    assert world.session("osh").delete(f"/api/tokens/{token_id}").status_code == 404  # not theirs
    assert c.delete(f"/api/tokens/{token_id}").status_code == 200
    assert world.client().get("/api/me", headers=bearer).status_code == 401


# -- growing delays after failed logins ---------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_logins_bring_growing_delays_even_for_the_right_password(world: World) -> None:
    clock = Clock()
    world.app.state.auth.throttle = LoginThrottle(clock=clock)
    c = world.client("198.51.100.1")

    def login(password: str, name: str = "osh") -> object:
        return c.post("/api/login", json={"name": name, "password": password})

    for _ in range(3):
        assert login("wrong").status_code == 401  # type: ignore[attr-defined]
    r = login(PASSWORD)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"  # type: ignore[attr-defined]
    clock.now += 1
    assert login("wrong").status_code == 401  # type: ignore[attr-defined]  (4th failure: 2 s)
    r = login(PASSWORD)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"  # type: ignore[attr-defined]
    clock.now += 2
    for expected in ("4", "8", "16"):
        assert login("wrong").status_code == 401  # type: ignore[attr-defined]
        r = login(PASSWORD)
        assert r.headers["retry-after"] == expected  # type: ignore[attr-defined]
        clock.now += int(expected)
    # Basic is throttled the same way (same name)
    assert world.client("198.51.100.1").get("/api/me", headers=World.basic("osh", "wrong")).status_code == 401
    r = world.client("198.51.100.1").get("/api/me", headers=World.basic("osh"))
    assert r.status_code == 429 and r.headers["retry-after"] == "32"
    clock.now += 32
    assert login(PASSWORD).status_code == 200  # type: ignore[attr-defined]
    assert login("wrong").status_code == 401  # type: ignore[attr-defined]  success reset the count
    assert login(PASSWORD).status_code == 200  # type: ignore[attr-defined]
    throttled = [e for e in Accounts(world.index).audit_events(limit=None, action="login_failed") if e.outcome == "throttled"]
    assert [(e.username, e.address) for e in throttled] == [("osh", "198.51.100.1")]  # not one row per attempt
    # the cap: 15 minutes
    for _ in range(30):
        world.app.state.auth.throttle.failed("osh", None)
    assert world.app.state.auth.throttle.retry_after("osh", None) == 900


def test_failed_logins_from_one_address_slow_down_every_name_tried_from_it(world: World) -> None:
    clock = Clock()
    world.app.state.auth.throttle = LoginThrottle(clock=clock)
    spray = world.client("198.51.100.7")
    for n in range(20):  # twenty names guessed from one address
        assert spray.post("/api/login", json={"name": f"guess-{n}", "password": "guess"}).status_code == 401
    assert spray.post("/api/login", json={"name": "spec", "password": PASSWORD}).status_code == 429
    elsewhere = world.client("198.51.100.8")
    assert elsewhere.post("/api/login", json={"name": "spec", "password": PASSWORD}).status_code == 200


def test_a_few_typos_behind_a_hospitals_nat_address_lock_nobody_else_out(world: World) -> None:
    """Three users of one hospital (one NAT address) mistype their passwords: the next user
    from the same address logs in; each name that failed three times waits."""
    clock = Clock()
    world.app.state.auth.throttle = LoginThrottle(clock=clock)
    hospital = world.client("203.0.113.9")
    for name in ("osh", "bish", "spec"):
        assert hospital.post("/api/login", json={"name": name, "password": "typo"}).status_code == 401
    assert hospital.post("/api/login", json={"name": "spec_all", "password": PASSWORD}).status_code == 200
    for _ in range(3):
        hospital.post("/api/login", json={"name": "osh", "password": "typo"})
    assert hospital.post("/api/login", json={"name": "osh", "password": PASSWORD}).status_code == 429
    assert hospital.post("/api/login", json={"name": "admin", "password": PASSWORD}).status_code == 200


# -- share links --------------------------------------------------------------------------------------
def test_a_share_link_opens_one_study_read_only_until_it_expires_or_is_revoked(world: World) -> None:
    mine, theirs = world.studies["OSH"], world.studies["BISH"]
    osh = world.session("osh")
    assert world.session("bish").post(f"/api/studies/{mine.study}/share", json={"hours": 2}).status_code == 404
    made = osh.post(f"/api/studies/{mine.study}/share", json={"hours": 2})
    assert made.status_code == 201, made.text
    url, share_id = made.json()["url"], made.json()["id"]
    assert url.startswith("/s/") and made.json()["expires_at"].endswith("Z")

    guest = world.client("192.0.2.50")
    r = guest.get(url, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/viewer?study={mine.study}"
    assert "imx_share=" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    assert [s["0020000D"]["Value"][0] for s in guest.get("/dicomweb/studies").json()] == [mine.study]
    assert guest.get(mine.url("study") + "/metadata").status_code == 200
    assert guest.get(mine.url() + "/frames/1").status_code == 200
    assert guest.get(theirs.url("study") + "/metadata").status_code == 404
    assert guest.get(f"/api/instances/{theirs.sop}/rendered").status_code == 404
    assert guest.get("/api/me").json()["role"] == "share"
    assert guest.post("/api/tokens", json={"label": "x"}).status_code == 403  # read-only
    assert guest.post(f"/api/studies/{mine.study}/share", json={"hours": 1}).status_code == 403
    assert guest.get("/api/users").status_code == 403

    listed = osh.get("/api/shares", params={"study": mine.study}).json()["shares"]
    assert [(x["id"], x["active"]) for x in listed] == [(share_id, True)] and url not in json.dumps(listed)
    assert world.session("bish").get("/api/shares").json()["shares"] == []
    assert [x["id"] for x in world.session("admin").get("/api/shares").json()["shares"]] == [share_id]
    assert world.session("bish").delete(f"/api/share/{share_id}").status_code == 404  # not theirs
    assert osh.delete(f"/api/share/{share_id}").status_code == 200
    assert guest.get(mine.url("study") + "/metadata").status_code == 401
    assert world.client().get(url, follow_redirects=False).status_code == 404

    again = osh.post(f"/api/studies/{mine.study}/share", json={"hours": 1}).json()
    guest2 = world.client()
    assert guest2.get(again["url"], follow_redirects=False).status_code == 303
    assert guest2.get(mine.url("study") + "/metadata").status_code == 200
    with world.index.write() as s:  # an hour later
        s.execute(update(ShareLink).where(ShareLink.id == again["id"]).values(expires_at=dt.datetime(2000, 1, 1)))
    assert guest2.get(mine.url("study") + "/metadata").status_code == 401
    assert world.client().get(again["url"], follow_redirects=False).status_code == 404
    assert osh.post(f"/api/studies/{mine.study}/share", json={"hours": 24 * 365}).status_code == 422  # at most 30 days


# -- a real imx serve -----------------------------------------------------------------------------------
def _get(server: ImxServer, path: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.peer
def test_imx_serve_with_real_tokens_and_basic(tmp_path: Path) -> None:
    server = ImxServer(tmp_path / "data")
    server.start()
    try:
        out = server.output()
        m = re.search(r"Demo user demo \(admin\), password (\S+) \(shown only now", out)
        assert m, out[-2000:]
        demo_password = m.group(1)
        assert server.imx("partner", "add", "BISHKEK", "--ae", "BISHPACS").returncode == 0
        for aet, patient in (("DEMOPACS", "HOSP-1"), ("BISHPACS", "HOSP-2")):
            files = make_ct_series(tmp_path / aet, 1, patient_id=patient)
            assert storescu(server.dicom_port, files, aet=aet).returncode == 0
        add = server.imx("user", "add", "bk", "--role", "partner", "--partner", "BISHKEK", input="bishkek-password\n")
        assert add.returncode == 0, add.stderr
        token = server.imx("user", "token", "bk", "--days", "1")
        assert token.returncode == 0, token.stderr
        bearer = {"Authorization": f"Bearer {token.stdout.strip()}"}
        basic = {"Authorization": "Basic " + base64.b64encode(b"bk:bishkek-password").decode()}
        studies = {s["partner"]: s["study_uid"] for s in server.studies()}
        assert set(studies) == {"DEMO", "BISHKEK"}
        demo_basic = {"Authorization": "Basic " + base64.b64encode(f"demo:{demo_password}".encode()).decode()}
        assert _get(server, "/api/me", demo_basic) == 200
        for headers in (bearer, basic):
            assert _get(server, f"/dicomweb/studies/{studies['BISHKEK']}/metadata", headers) == 200
            for path in ("", "/metadata", "/rendered", "/thumbnail"):
                assert _get(server, f"/dicomweb/studies/{studies['DEMO']}{path}", headers) in (403, 404), path
        assert _get(server, f"/dicomweb/studies/{studies['DEMO']}/metadata", {}) == 401
        assert _get(server, "/dicomweb/studies", {"Authorization": "Bearer not-a-token"}) == 401
        assert "bk" in server.imx("user", "list").stdout
        assert server.imx("user", "disable", "bk").returncode == 0
        for headers in (bearer, basic):
            assert _get(server, "/dicomweb/studies", headers) == 401
        server.stop()
        server.start()
        out = server.output()
        assert out.count("shown only now") == 1 and "Demo user demo (admin) exists" in out
    finally:
        server.stop()


def test_imx_user_commands_work_on_the_running_apps_accounts(world: World) -> None:
    import os
    import subprocess

    from services import VENV_BIN

    env = {**os.environ, "IMX_DATA_DIR": str(world.archive.settings.data_dir)}

    def imx(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "imx"), "user", *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)

    made = imx("add", "almaty1", "--role", "partner", "--partner", "OSH", "--display-name", "Dr. A", "--generate")
    assert made.returncode == 0, made.stderr
    password = re.search(r"password \(shown once, write it down\): (\S+)", made.stdout).group(1)  # type: ignore[union-attr]
    assert world.client().post("/api/login", json={"name": "almaty1", "password": password}).json()["partner_id"] == world.partners["OSH"]
    assert imx("add", "lost", "--role", "partner").returncode == 2  # a partner user needs its partner
    assert imx("add", "nope", "--role", "partner", "--partner", "NOWHERE", stdin="long-password\n").returncode == 1
    assert imx("add", "almaty1", "--role", "admin", stdin="long-password\n").returncode == 1  # exists
    assert imx("add", "short", "--role", "admin", stdin="2short\n").returncode == 2
    assert imx("grant-all", "osh").returncode == 2  # specialists only
    assert imx("grant-all", "spec").returncode == 0
    assert len(world.client().get("/dicomweb/studies", headers=world.token("spec")).json()) == 2
    assert imx("grant-all", "spec", "--revoke").returncode == 0
    assert world.client().get("/dicomweb/studies", headers=world.token("spec")).json() == []
    listed = imx("list").stdout
    assert re.search(r"almaty1\s+partner\s+OSH\s+active", listed), listed
    reset = imx("password", "almaty1", stdin="a-new-password\n")
    assert reset.returncode == 0 and "a-new-password" not in reset.stdout
    assert world.client().post("/api/login", json={"name": "almaty1", "password": "a-new-password"}).status_code == 200
