"""Real services for the tests, started on loopback: PostgreSQL (Debian's packages), moto's
standalone S3 server, ``imx serve`` itself, and wrappers around dcmtk's command-line peers."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# -- PostgreSQL ---------------------------------------------------------------------------------
def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise RuntimeError(f"PostgreSQL's {name} is not installed (make test installs the postgresql package)")


def start_postgres() -> tuple[str, Callable[[], None]]:
    """initdb + pg_ctl start a throw-away cluster on a free loopback port; returns (url, stop)."""
    base = Path(tempfile.mkdtemp(prefix="imx-pg-"))
    data = base / "data"
    port = free_port()
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:  # initdb refuses to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*prefix, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "imx", "--no-sync"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *prefix,
            _pg_bin("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-w",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*prefix, _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "imx", "imx"],
        check=True,
        capture_output=True,
    )

    def stop() -> None:
        subprocess.run([*prefix, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)

    return f"postgresql+psycopg://imx@127.0.0.1:{port}/imx", stop


# -- S3 (moto) ----------------------------------------------------------------------------------
class MotoServer:
    """moto's standalone S3 server. It keeps objects in memory: pause() (SIGSTOP) simulates an
    outage without losing the bucket; resume() ends it."""

    access_key = "imx-test"
    secret_key = "imx-test-secret"

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, 60, self.proc)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, bucket: str) -> dict[str, str]:
        return {
            "IMX_S3_ENDPOINT": self.endpoint,
            "IMX_S3_ACCESS_KEY": self.access_key,
            "IMX_S3_SECRET_KEY": self.secret_key,
            "IMX_S3_BUCKET": bucket,
            "IMX_S3_SECURE": "false",
        }

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_moto() -> MotoServer:
    return MotoServer()


# -- imx serve ----------------------------------------------------------------------------------
class ImxServer:
    """``imx serve`` as a user runs it, in its own process group, on free ports.

    At its first start it gets an admin user (``imx user add``, password on stdin) and an API
    token for it (``imx user token``): ``http_get`` and ``studies`` send the token, and
    ``auth_headers()`` gives the header for other clients (dicomweb-client, requests, Orthanc)."""

    ADMIN_NAME = "tests-admin"
    ADMIN_PASSWORD = "tests-admin-password"

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, workers: int = 2) -> None:
        self.data_dir = data_dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "IMX"
        self.extra_env = dict(env or {})
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.admin_token: str | None = None
        self.log_path = data_dir.parent / f"imx-serve-{self.dicom_port}.log"

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            {
                "IMX_DATA_DIR": str(self.data_dir),
                "IMX_DICOM_PORT": str(self.dicom_port),
                "IMX_HTTP_PORT": str(self.http_port),
                "IMX_HOST": "127.0.0.1",
                "IMX_AE_TITLE": self.ae_title,
                "IMX_DICOM_WORKERS": str(self.workers),
                "IMX_SHUTDOWN_GRACE_SECONDS": "20",
            }
        )
        e.update(self.extra_env)
        return e

    def start(self, timeout: float = 90.0) -> None:
        self.log = open(self.log_path, "ab")
        offset = self.log.tell()  # a restart appends: wait for this run's banner, not the last one's
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "imx"), "serve"],
            env=self.env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"imx serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.http_get("/healthz")[0] in (200, 503) and b"imaging-exchange is running" in self.log_path.read_bytes()[offset:]:
                    self._ensure_admin()
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"imx serve not ready after {timeout} s:\n{self.output()}")

    def _ensure_admin(self) -> None:
        if self.admin_token is not None:
            return
        add = self.imx("user", "add", self.ADMIN_NAME, "--role", "admin", input=self.ADMIN_PASSWORD + "\n")
        assert add.returncode == 0 or "exists" in add.stderr, add.stderr
        token = self.imx("user", "token", self.ADMIN_NAME, "--label", "tests")
        assert token.returncode == 0, token.stderr
        self.admin_token = token.stdout.strip()

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header of the tests' admin (a Bearer API token)."""
        assert self.admin_token is not None, "start the server first"
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def basic_auth(self) -> tuple[str, str]:
        """(name, password) of the tests' admin, for HTTP Basic."""
        return self.ADMIN_NAME, self.ADMIN_PASSWORD

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def http_get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """GET as the tests' admin (once it exists), or with the given headers instead."""
        if headers is None:
            headers = self.auth_headers() if self.admin_token else {}
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def studies(self) -> list[dict]:
        out: list[dict] = []
        while True:
            status, body = self.http_get(f"/api/studies?limit=1000&offset={len(out)}")
            assert status == 200, body
            page = json.loads(body)["studies"]
            out += page
            if len(page) < 1000:
                return out

    def imx(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "imx"), *args], env=self.env(), capture_output=True, text=True, input=input, timeout=120
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise

    def kill9(self) -> None:
        """A crash: SIGKILL to the whole process group, supervisor and receivers at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


# -- dcmtk --------------------------------------------------------------------------------------
def dcmtk_env() -> dict[str, str]:
    e = dict(os.environ)
    e["TCP_NODELAY"] = "1"
    return e


def echoscu(port: int, aet: str, aec: str = "IMX") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
    )
