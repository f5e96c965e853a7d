"""``imx serve``: the supervisor process and its DICOM receiver processes.

The supervisor prepares the data folder (keys, migrations, clean-up after a crash), starts
``IMX_DICOM_WORKERS`` receiver processes that share the DICOM port, runs the spool drainer and the
HTTP app and the render workers of previews (``imx/previews.py``, ``IMX_PREVIEW_WORKERS``), restarts
a receiver that dies, and on SIGTERM or SIGINT stops cleanly: receivers accept
no new association, finish the ones in flight, then everything exits.

Before this module is imported, ``PROMETHEUS_MULTIPROC_DIR`` must be set (``imx.cli`` does it).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from imaging.codecs import without_gdcm
from imx.config import Settings, ensure_layout
from imx.logs import event, setup_logging

log = logging.getLogger("imx.serve")

DEMO_PARTNER = ("DEMO", "DEMOPACS")
DEMO_USER = "demo"


def _die_with_parent() -> None:
    """Receivers must not outlive the supervisor (a kill -9 of it must not leave them bound)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_main(settings_data: dict[str, Any], number: int, ready: Any, listen_socket: Any, load: Any) -> None:
    _die_with_parent()
    settings = Settings.load(**settings_data)
    setup_logging(settings.log_level)
    tempfile.tempdir = str(settings.tmp_dir)  # pynetdicom's chunked receive writes here (0600)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which sends SIGTERM

    from dicom_node.server import Node
    from imx.ingest import Archive

    without_gdcm()  # GDCM can abort a process on hostile input: render workers only
    archive = Archive(settings)
    node = Node(settings, archive)
    try:
        node.start(listen_socket, load, number)
    except OSError as e:
        event(log, "receiver cannot listen", logging.ERROR, port=settings.dicom_port, error=e.strerror)
        ready.put(("error", number, e.strerror))
        return
    ready.put(("ready", number, os.getpid()))
    stop.wait()
    load[number] = 1 << 30  # take no more associations: siblings get them
    aborted = node.stop(settings.shutdown_grace_seconds)
    event(log, "receiver stopped", worker=number, aborted_associations=aborted)
    archive.close()


def open_listener(host: str, port: int) -> socket.socket:
    """The DICOM listening socket, opened once by the supervisor and shared by the receivers."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(256)
    return sock


def _clean_dir(d: Path) -> int:
    n = 0
    if d.exists():
        for p in d.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def prepare(settings: Settings) -> None:
    """Everything that must happen once, before any receiver runs."""
    ensure_layout(settings)
    leftovers = _clean_dir(settings.tmp_dir)  # partial receptions of a crashed run (may hold PHI)
    if leftovers:
        event(log, "removed temporary files left by an interrupted run", count=leftovers)


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable URL)"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = mp.get_context("spawn")
        self.ready = self.ctx.Queue()
        self.workers: dict[int, mp.process.BaseProcess] = {}
        self.stopping = threading.Event()
        self.listen_socket = open_listener(settings.host, settings.dicom_port)
        self.load = self.ctx.Array("i", settings.effective_workers, lock=False)

    def _spawn(self, number: int) -> None:
        p = self.ctx.Process(
            target=worker_main,
            args=(self.settings.model_dump(), number, self.ready, self.listen_socket, self.load),
            name=f"imx-receiver-{number}",
            daemon=False,
        )
        p.start()
        self.workers[number] = p

    def start_workers(self) -> None:
        n = self.settings.effective_workers
        for i in range(n):
            self._spawn(i)
        deadline = time.monotonic() + 120
        got = 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("DICOM receivers did not start within 120 s")
            try:
                kind, number, detail = self.ready.get(timeout=remaining)
            except Exception:
                continue
            if kind == "error":
                raise RuntimeError(f"the DICOM port {self.settings.dicom_port} cannot be opened: {detail}")
            got += 1

    def watch_workers(self) -> None:
        for number, p in list(self.workers.items()):
            if not p.is_alive() and not self.stopping.is_set():
                event(log, "receiver exited unexpectedly, restarting", logging.ERROR, worker=number, exitcode=p.exitcode)
                self.load[number] = 1 << 30  # its count is stale: siblings take new associations
                self._spawn(number)

    def stop_workers(self) -> None:
        for p in self.workers.values():
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + 10
        for p in self.workers.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()


def _demo_user(archive: Any) -> str | None:
    """Create the demo admin at first start; its generated password is returned to be printed
    once in the banner and is stored nowhere (only its argon2 hash)."""
    from storage.access import Accounts
    from viewer.accounts import generate_password
    from viewer.auth import hash_password

    accounts = Accounts(archive.index)
    if accounts.user_by_name(DEMO_USER) is not None:
        return None
    password = generate_password()
    accounts.add_user(DEMO_USER, "admin", hash_password(password), display_name="Demo administrator")
    return password


def _banner(settings: Settings, archive: Any, demo_password: str | None = None) -> str:
    store = archive.store
    where = f"S3 bucket {settings.s3_bucket} at {settings.s3_endpoint}" if store.name == "s3" else f"filesystem ({settings.objects_dir})"
    lines = [
        "imaging-exchange is running",
        f"  data folder   {settings.data_dir}",
        f"  DICOM node    AE title {settings.ae_title} on {settings.host}:{settings.dicom_port} ({settings.effective_workers} receiver processes)",
        f"  HTTP          http://{settings.host}:{settings.http_port}/  (log in there; DICOMweb at /dicomweb)",
        f"  object store  {where}",
        f"  index         {_redact_url(settings.effective_database_url)}",
    ]
    demo = archive.index.partner_by_name(DEMO_PARTNER[0])
    if demo is not None:
        lines += [
            f"Demo partner {demo.name} (calling AE title {demo.ae_title}). A radiologist sends with:",
            f"  storescu -aet {demo.ae_title} -aec {settings.ae_title} {settings.host} {settings.dicom_port} FILE...",
            f"  imx send {settings.host} {settings.dicom_port} FOLDER --aet {demo.ae_title} --aec {settings.ae_title}",
        ]
    from storage.access import Accounts

    demo_user = Accounts(archive.index).user_by_name(DEMO_USER)
    if demo_password is not None:
        lines.append(f"Demo user {DEMO_USER} (admin), password {demo_password} (shown only now; reset: imx user password {DEMO_USER})")
    elif demo_user is not None and demo_user.active:
        lines.append(f"Demo user {DEMO_USER} (admin) exists; reset its password with: imx user password {DEMO_USER}")
    lines.append("Register a hospital: imx partner add NAME --ae AE_TITLE [--host ADDRESS_OR_CIDR]")
    lines.append("Add a user: imx user add NAME --role admin|specialist|partner [--partner NAME]")
    return "\n".join(lines)


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level)
    prepare(settings)

    from imx.ingest import Archive
    from storage.objects import FileSystemStore

    without_gdcm()  # GDCM can abort a process on hostile input: render workers only
    archive = Archive(settings)
    if isinstance(archive.store, FileSystemStore):
        archive.store.clean_partial()
    try:
        archive.index.migrate()
    except Exception as e:
        print(f"imx: the index at {_redact_url(settings.effective_database_url)} cannot be opened or migrated: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    marker = settings.data_dir / ".initialized"
    demo_password: str | None = None
    if not marker.exists():
        if settings.demo and archive.index.partner_by_name(DEMO_PARTNER[0]) is None:
            archive.index.add_partner(DEMO_PARTNER[0], DEMO_PARTNER[1], [])
        if settings.demo:
            demo_password = _demo_user(archive)
        marker.write_text("imaging-exchange data folder\n")
    try:
        archive.store.check()
    except Exception as e:
        event(log, "object store unreachable at start: instances will be spooled", logging.WARNING, error=str(e))

    try:
        sup = Supervisor(settings)
    except OSError as e:
        print(f"imx: the DICOM port {settings.dicom_port} on {settings.host} cannot be opened: {e.strerror}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        sup.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        sup.start_workers()
    except RuntimeError as e:
        print(f"imx: {e}", file=sys.stderr)
        sup.stopping.set()
        sup.stop_workers()
        return 2

    # Render workers for previews (imx/previews.py): processes with memory and time limits, fed
    # by one thread that renders the queue (instances acknowledged, not yet rendered).
    from imx import previews

    try:
        preview_service = previews.start(archive)
    except RuntimeError as e:
        print(f"imx: the render workers cannot start: {e}", file=sys.stderr)
        sup.stopping.set()
        sup.stop_workers()
        return 2
    previews.attach(archive, preview_service)
    preview_thread = threading.Thread(
        target=previews.run_queue, args=(preview_service, sup.stopping), name="imx-previews", daemon=True
    )
    preview_thread.start()

    import uvicorn

    from viewer.app import create_app

    config = uvicorn.Config(
        create_app(archive),
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,  # one header less per answer, and the server software not advertised
        # loop "auto": uvloop (a dependency) when importable, about 0.15 ms less per rendered frame
    )
    http = uvicorn.Server(config)
    http_thread = threading.Thread(target=http.run, name="imx-http", daemon=True)
    http_thread.start()
    for _ in range(200):
        if http.started or not http_thread.is_alive():
            break
        time.sleep(0.05)
    if not http.started:
        print(f"imx: the HTTP port {settings.http_port} cannot be opened", file=sys.stderr)
        sup.stopping.set()
        sup.stop_workers()
        preview_service.pool.close()
        return 2

    def drainer() -> None:
        while not sup.stopping.is_set():
            moved = 0
            try:
                moved = archive.drain_spool()
            except Exception as e:
                event(log, "spool drain failed", logging.ERROR, error=type(e).__name__)
            sup.stopping.wait(0.2 if moved else settings.spool_retry_seconds)

    drain_thread = threading.Thread(target=drainer, name="imx-spool-drainer", daemon=True)
    drain_thread.start()

    print(_banner(settings, archive, demo_password), flush=True)
    demo_password = None
    event(
        log,
        "ready",
        dicom_port=settings.dicom_port,
        http_port=settings.http_port,
        receivers=settings.effective_workers,
        render_workers=settings.preview_workers,
    )
    while not sup.stopping.wait(1.0):
        sup.watch_workers()

    event(log, "stopping: no new associations, finishing those in flight")
    sup.stop_workers()
    http.should_exit = True
    http_thread.join(10)
    drain_thread.join(10)
    preview_thread.join(settings.preview_timeout + 5)
    preview_service.pool.close()
    previews.detach(archive)
    archive.close()
    event(log, "stopped")
    return 0
