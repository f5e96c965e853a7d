"""Browser tests' plumbing: Debian's headless chromium driven by Playwright, and a running
``imx serve`` with users, partners and studies in it.

Fixtures (registered for every test module by ``tests/conftest.py``):

- ``browser`` (session): one chromium for the whole run, launched from /usr/bin/chromium with no
  network side channels (no background networking, component updates, sync or QUIC);
- ``page``: a fresh browser context (locale en-US, 1280x800) and page per test; at teardown a
  screenshot is saved as ``test-artifacts/screenshots/<test name>.png`` (git-ignored);
- ``viewer_server`` (module): a :class:`ViewerServer` (an ``imx serve`` on free ports) with an
  admin ``admin`` / ``admin-pass-1``, shared by the tests of one module;
- ``make_viewer_server``: a factory for tests that need a server of their own.

Helpers: :func:`login` drives the login form; :class:`ViewerServer` adds partners and users and
sends studies with dcmtk's storescu; :class:`ApiClient` calls the JSON API as a logged-in user
(cookie and CSRF token), for setting up data through the real routes.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dicomfiles import expected_uid, make_ct_series, storescu
from services import ImxServer

from storage.index import Index

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"

ADMIN = ("admin", "admin-pass-1")


# -- the browser --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def browser(playwright_driver: Any) -> Iterator[Any]:
    """Debian's chromium, headless, launched once per test session."""
    b = playwright_driver.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    try:
        yield b
    finally:
        b.close()


def _artifact_name(nodeid: str) -> str:
    """A file name from a test id (``test_ui.py::test_x[en]`` -> ``test_ui-test_x-en``)."""
    name = nodeid.rsplit("/", 1)[-1].replace(".py::", "-").replace("::", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:150]


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A new context (locale en-US) and page; its screenshot is kept at teardown."""
    context = browser.new_context(
        locale="en-US", viewport={"width": 1280, "height": 800}, timezone_id="Asia/Urumqi"
    )
    context.set_default_timeout(15_000)
    pg = context.new_page()
    console: list[str] = []  # the browser's console and uncaught errors, printed at teardown
    pg.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: console.append(f"page error: {e}"))
    try:
        yield pg
    finally:
        name = _artifact_name(request.node.nodeid)
        try:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
        except Exception:  # a crashed page must not hide the test's own failure
            pass
        if console:
            print(f"browser console of {name}:", *console, sep="\n  ")
        context.close()


def wait_ready(page: Any, timeout: float = 15_000) -> None:
    """Waits until the page says it has loaded (``document.body.dataset.ready == "1"``)."""
    page.wait_for_function(
        "() => document.body && document.body.dataset.ready === '1'", timeout=timeout
    )


def login(page: Any, base_url: str, name: str, password: str, next_path: str = "/") -> None:
    """Logs in through the login form and waits for the page it leads to to be ready."""
    from urllib.parse import quote

    page.goto(f"{base_url}/login?next={quote(next_path)}")
    wait_ready(page)
    page.fill("#login-name", name)
    page.fill("#login-password", password)
    page.click("#login-submit")
    page.wait_for_url(lambda url: "/login" not in url)
    wait_ready(page)


# -- the server ---------------------------------------------------------------------------------
@dataclass
class SentStudy:
    """A study sent to the server: its UID in the archive (pseudonymous) and the original one."""

    study_uid: str
    original_study_uid: str
    series_uid: str
    sop_uids: list[str]
    files: list[Path]


class ApiClient:
    """The JSON API as one logged-in user: session cookie plus the CSRF header on changes."""

    def __init__(self, base_url: str, name: str, password: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30)
        r = self.http.post("/api/login", json={"name": name, "password": password})
        r.raise_for_status()
        self.me: dict = r.json()
        self.http.headers["X-CSRF-Token"] = self.me["csrf_token"]

    def get(self, path: str, **kw: Any) -> Any:
        r = self.http.get(path, **kw)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    def post(self, path: str, body: Any = None) -> Any:
        r = self.http.post(path, json=body)
        assert r.status_code in (200, 201), f"POST {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def close(self) -> None:
        self.http.close()


class ViewerServer:
    """An ``imx serve`` for browser tests, with helpers to fill it."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.server = ImxServer(data_dir, env=env)
        self.data_dir = data_dir
        self.work = data_dir.parent / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self._sent = 0

    # lifecycle
    def start(self) -> ViewerServer:
        self.server.start()
        self.add_user(*ADMIN, role="admin")
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def dicom_port(self) -> int:
        return self.server.dicom_port

    def index(self) -> Index:
        """The server's SQLite index (close it after use)."""
        return Index(f"sqlite:///{self.data_dir / 'index.sqlite3'}")

    # partners and users
    def add_partner(self, name: str, ae: str, time_zone: str | None = None) -> int:
        """Registers a partner hospital (``imx partner add``); returns its id."""
        r = self.server.imx("partner", "add", name, "--ae", ae)
        assert r.returncode == 0, r.stderr
        if time_zone:
            self.set_partner_time_zone(name, time_zone)
        return self.partner_id(name)

    def set_partner_time_zone(self, name: str, time_zone: str) -> None:
        r = self.server.imx("partner", "tz", name, time_zone)
        assert r.returncode == 0, r.stderr

    def partner_id(self, name: str = "DEMO") -> int:
        idx = self.index()
        try:
            p = idx.partner_by_name(name)
            assert p is not None, f"no partner {name}"
            return p.id
        finally:
            idx.close()

    def add_user(
        self,
        name: str,
        password: str,
        role: str,
        partner: str | None = None,
        all_studies: bool = False,
        locale: str | None = None,
    ) -> int:
        """Creates a user with ``imx user add`` (password on stdin); returns its id."""
        args = ["user", "add", name, "--role", role] + (["--partner", partner] if partner else [])
        r = self.server.imx(*args, input=password + "\n")
        from storage.access import Accounts

        idx = self.index()
        try:
            accounts = Accounts(idx)
            if r.returncode != 0:
                assert "invalid choice" in r.stderr, r.stderr  # the CLI lacks `user`: rows directly
                from viewer.auth import hash_password

                partner_id = idx.partner_by_name(partner).id if partner else None  # type: ignore[union-attr]
                accounts.add_user(name, role, hash_password(password), partner_id=partner_id)
            user = accounts.user_by_name(name)
            assert user is not None
            extra: dict[str, object] = {}
            if all_studies:
                extra["all_studies"] = True
            if locale:
                extra["locale"] = locale
            if extra:
                accounts.update_user(user.id, **extra)
            return user.id
        finally:
            idx.close()

    # studies
    def send(
        self, files: list[Path], aet: str = "DEMOPACS", extra: list[str] | None = None
    ) -> None:
        """Sends files with dcmtk's storescu as the partner with calling AE title ``aet``."""
        run = storescu(self.dicom_port, files, aet=aet, extra=extra)
        assert run.returncode == 0, run.stderr + run.stdout

    def send_ct(
        self,
        count: int = 3,
        aet: str = "DEMOPACS",
        partner: str = "DEMO",
        patient: str = "Doe^Jane",
        patient_id: str = "HOSP-000123",
        files: list[Path] | None = None,
    ) -> SentStudy:
        """Sends a new CT study of ``count`` instances (or the given files of one series) and
        returns its UIDs as the archive knows them."""
        from pydicom import dcmread

        if files is None:
            self._sent += 1
            files = make_ct_series(
                self.work / f"study{self._sent}", count, patient=patient, patient_id=patient_id
            )
        self.send(files, aet=aet)
        first = dcmread(files[0], stop_before_pixels=True)
        pid = self.partner_id(partner)
        key = lambda uid: expected_uid(self.data_dir, pid, str(uid))  # noqa: E731
        sops = [key(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        return SentStudy(
            key(first.StudyInstanceUID),
            str(first.StudyInstanceUID),
            key(first.SeriesInstanceUID),
            sops,
            files,
        )

    def api(self, name: str, password: str) -> ApiClient:
        """A logged-in JSON API client (close it after use)."""
        return ApiClient(self.base_url, name, password)

    def admin_api(self) -> ApiClient:
        return self.api(*ADMIN)

    def log(self) -> str:
        return self.server.output()


@pytest.fixture(scope="module")
def make_viewer_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ViewerServer]]:
    """A factory of started servers (each in its own folder), all stopped at the module's end."""
    started: list[ViewerServer] = []

    def make(env: dict[str, str] | None = None) -> ViewerServer:
        base = tmp_path_factory.mktemp("viewer-server")
        server = ViewerServer(base / "data", env=env)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def viewer_server(make_viewer_server: Callable[..., ViewerServer]) -> ViewerServer:
    """One running server per test module, with the admin user; tests add what they need."""
    return make_viewer_server()


def record_requests(page: Any) -> list[str]:
    """Every URL the page requests from now on (to prove nothing leaves the app)."""
    urls: list[str] = []
    page.on("request", lambda req: urls.append(req.url))
    return urls


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False)


# -- reading what the viewer shows -------------------------------------------------------------
def canvas_pixels(page: Any) -> np.ndarray:
    """The image canvas's pixels (grey: the red channel), at the image's own resolution."""
    data = page.evaluate(
        """() => {
        const c = document.querySelector('#view canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = '';
        for (let i = 0; i < d.length; i += 4) s += String.fromCharCode(d[i]);
        return {w: c.width, h: c.height, b64: btoa(s)};
    }"""
    )
    return np.frombuffer(base64.b64decode(data["b64"]), dtype=np.uint8).reshape(data["h"], data["w"])


def server_rendered(page: Any, url: str) -> np.ndarray:
    from PIL import Image

    b64 = page.evaluate(
        """async (url) => {
        const r = await fetch(url, {headers: {Accept: 'image/png'}});
        if (!r.ok) throw new Error('HTTP ' + r.status);
        const b = new Uint8Array(await r.arrayBuffer());
        let s = '';
        for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]);
        return btoa(s);
    }""",
        url,
    )
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L"))
