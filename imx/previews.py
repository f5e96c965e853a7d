"""Previews: series thumbnails and per-instance previews, rendered off the hot path by worker
processes with memory and time limits, kept in the object store, served over HTTP.

The pieces:

- ``RenderPool``: worker processes (spawn context). Each one lowers its own address-space limit
  (``RLIMIT_AS``) before importing any image code; the parent gives every job a time limit and
  kills and replaces a worker that overruns, dies or runs out of memory. A broken or malicious
  object (dimensions far beyond its data, a bad LUT, a decompression bomb) therefore fails one job,
  never the node.
- ``Previews``: what the service does with the pool. ``run_pending()`` renders the queue
  (instances whose ``preview_status`` is NULL: rows exist only after the ack, so nothing is
  rendered before it), stores each rendition under a generated key (never a UID) and records it;
  ``preview()``, ``rendered()`` and ``series_thumbnail()`` answer the HTTP routes (and WADO-RS
  ``/rendered`` and ``/thumbnail``, PS3.18 10.4 and 10.7), rendering on demand what is missing.

The rendering itself (windowing, PS3.3 C.11.2 VOI LUT; encoding) is ``imaging/render.py``; this
module only schedules it, bounds it and keeps its results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import logging
import multiprocessing as mp
import os
import queue
import resource
import secrets
import signal
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imx.logs import event

if TYPE_CHECKING:
    from imx.ingest import Archive
    from storage.index import Metadata

log = logging.getLogger("imx.previews")

MiB = 1024 * 1024
KIND_PREVIEW = "preview"
KIND_THUMBNAIL = "thumbnail"
STATUS_OK = "ok"
STATUS_UNRENDERABLE = "unrenderable"
REASON_MAX = 200  # width of instance.preview_reason
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_FORMAT = "jpeg"
DEFAULT_QUALITY = 90
# what a worker process costs before it renders anything (interpreter, numpy, pydicom, decoders)
WORKER_BASELINE_MB = 320
# a decoded frame is held a few times over while it is windowed and scaled (as float64 + output)
WORKING_COPIES = 10


# -- errors ------------------------------------------------------------------------------------
class PreviewError(Exception):
    """Base of what the preview functions raise; the message is plain words without PHI."""


class NotFound(PreviewError, LookupError):
    """No such instance, series or frame."""


class Quarantined(PreviewError, PermissionError):
    """The instance is held back until an operator reviews it: it is not rendered."""


class Unrenderable(PreviewError, ValueError):
    """The instance cannot be rendered; ``reason`` says why (stored in ``preview_reason``).
    ``metadata``: (object key, packed DICOM JSON, frame plan or None) when the job still
    computed the instance's metadata, for the caller to keep with the status."""

    def __init__(self, reason: str, metadata: Metadata | None = None) -> None:
        super().__init__(reason)
        self.reason = reason[:REASON_MAX]
        self.metadata = metadata


class Busy(PreviewError, RuntimeError):
    """No render worker became free in time, or the object could not be read: try again."""


class JobFailed(Exception):
    """A job sent to the pool did not return a value. ``kind``: 'timeout' (the worker was killed),
    'memory' (beyond its memory limit), 'crashed' (the worker died), 'unrenderable' (the renderer
    refused the object) or 'error' (any other exception, named by type only)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# -- the worker processes ----------------------------------------------------------------------
def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_heap() -> None:
    """Keep freed memory for the next job instead of handing it back to the kernel at once:
    otherwise every render maps its half-megabyte buffers afresh and takes hundreds of page
    faults (measured: parse and render of a 512 KiB CT 2.0 ms against 1.4 ms). Blocks above
    16 MiB are still mapped and unmapped each time, and at most 64 MiB is kept unused."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt(_M_MMAP_THRESHOLD, 16 * MiB)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * MiB)
    except (OSError, AttributeError):
        pass  # not glibc: the defaults


def _worker_main(conn: Any, memory_mb: int) -> None:
    """A render worker: limit itself, warm up, then run jobs ``(fn, args)`` until told to stop."""
    _die_with_parent()
    _keep_heap()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # per-thread BLAS buffers would eat the address-space budget
    if memory_mb > 0:
        limit = memory_mb * MiB
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:  # import the renderer and its decoders now, not during the first job's time limit
        import pydicom.pixels  # noqa: F401

        import imaging.render  # noqa: F401
    except Exception:
        pass  # a job will report it
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args = job
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except MemoryError:
            reply = ("memory", f"rendering needs more than the {memory_mb} MiB memory limit")
        except Unrenderable as e:
            reply = ("unrenderable", e.reason)
        except Exception as e:
            reply = (
                ("unrenderable", str(e)[:REASON_MAX])
                if _is_render_error(e)
                else ("error", f"rendering failed ({type(e).__name__})")
            )
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("memory", f"the result exceeds the {memory_mb} MiB memory limit"))
        if reply[0] == "memory":
            return  # a process that hit its limit may be in a bad state: the parent starts a new one


def _is_render_error(e: Exception) -> bool:
    try:
        from imaging.render import RenderError
    except Exception:
        return False
    return isinstance(e, RenderError)


class _Worker:
    def __init__(self, ctx: Any, memory_mb: int, number: int) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child, memory_mb), name=f"imx-render-{number}", daemon=True
        )
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            raise RuntimeError("a render worker did not start in time")
        kind, _pid = self.conn.recv()
        if kind != "ready":
            raise RuntimeError("a render worker failed to start")
        self.ready = True

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def stop(self, grace: float) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


class RenderPool:
    """``workers`` render processes, each limited to ``memory_mb`` MiB of address space (0: no
    limit); a job that takes longer than ``timeout`` seconds gets its worker killed and replaced.
    Thread-safe: HTTP threads and the background queue share it."""

    def __init__(
        self,
        workers: int = 1,
        memory_mb: int = 1024,
        timeout: float = 20.0,
        *,
        start_timeout: float = 60.0,
    ) -> None:
        self.size = max(1, workers)
        self.memory_mb = memory_mb
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.replaced = 0  # workers killed or lost and started again
        self._ctx = mp.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._count = 0
        # Workers ask the kernel to kill them when their parent dies (PR_SET_PDEATHSIG), and the
        # kernel means the parent *thread*: so every worker is started by this one long-lived
        # thread, never by an HTTP thread that may end while the worker still serves others.
        self._spawner = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="imx-render-spawner"
        )

    def _spawn(self) -> _Worker:
        with self._lock:
            self._count += 1
            number = self._count
        w = _Worker(self._ctx, self.memory_mb, number)
        try:
            w.wait_ready(self.start_timeout)
        except BaseException:
            w.kill()
            raise
        with self._lock:
            self._all.append(w)
        return w

    def _new(self) -> _Worker:
        return self._spawner.submit(self._spawn).result()

    def start(self) -> RenderPool:
        for _ in range(self.size):
            self._idle.put(self._new())
        return self

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all if w.alive and w.proc.pid]

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        with self._lock:
            if w in self._all:
                self._all.remove(w)
            self.replaced += 1
        return self._new()

    def call(
        self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, wait: float = 30.0
    ) -> Any:
        """Run ``fn(*args)`` in a worker and return its value. ``fn`` and its arguments must be
        picklable (module-level functions). Raises JobFailed, or Busy when no worker is free
        within ``wait`` seconds."""
        if self._closed:
            raise Busy("the render workers are stopped")
        try:
            w = self._idle.get(timeout=wait)
        except queue.Empty:
            raise Busy("all render workers are busy; try again") from None
        limit = self.timeout if timeout is None else timeout
        try:
            return self._run(w, fn, args, limit)
        except RuntimeError as e:  # a replacement worker failed to start
            event(log, "render worker cannot start", logging.ERROR, error=str(e))
            raise Busy("a render worker could not be started; try again") from None

    def _run(self, w: _Worker, fn: Callable[..., Any], args: tuple[Any, ...], limit: float) -> Any:
        box = [w]
        try:
            box[0] = self._send(w, fn, args)
            return self._reply(box, box[0].conn.poll(limit), limit)
        finally:
            self._release(box[0])

    def _send(self, w: _Worker, fn: Callable[..., Any], args: tuple[Any, ...]) -> _Worker:
        """Hand the job to ``w``, or to its replacement if it is dead; the worker it went to."""
        if not w.alive:
            w = self._replace(w)
        try:
            w.conn.send((fn, args))
        except (OSError, ValueError):
            w = self._replace(w)
            w.conn.send((fn, args))
        return w

    def _reply(
        self,
        box: list[_Worker],
        ready: bool,
        limit: float,
        received: tuple[str, Any] | None = None,
    ) -> Any:
        """The value of the job sent to ``box[0]``: ``ready`` says whether its reply (or its
        death) came within ``limit``; ``received``: the reply already read. A worker killed or
        lost is replaced in ``box``. Raises JobFailed."""
        w = box[0]
        if not ready:
            event(
                log,
                "render worker overran its time limit: killed and replaced",
                logging.WARNING,
                pid=w.proc.pid,
                seconds=limit,
            )
            box[0] = self._replace(w)
            raise JobFailed("timeout", f"rendering took longer than the {limit:g} s time limit")
        if received is None:
            try:
                received = w.conn.recv()
            except (EOFError, OSError):
                w.proc.join(5)
                code = w.proc.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                event(
                    log, "render worker died: replaced", logging.WARNING, pid=w.proc.pid, exit=how
                )
                box[0] = self._replace(w)
                if code == -signal.SIGKILL:
                    # the kernel's OOM killer, or an allocation the limit let through and then failed
                    raise JobFailed(
                        "memory", f"the renderer was killed ({how}), most likely for its memory use"
                    ) from None
                raise JobFailed("crashed", f"the renderer process died ({how})") from None
        kind, value = received
        if kind == "ok":
            return value
        if kind == "memory":
            event(
                log,
                "render worker hit its memory limit: replaced",
                logging.WARNING,
                pid=w.proc.pid,
                limit_mb=self.memory_mb,
            )
            box[0] = self._replace(w)
        raise JobFailed(kind, str(value))

    def _release(self, w: _Worker) -> None:
        if self._closed:
            w.stop(1.0)
        else:
            self._idle.put(w)

    async def call_async(
        self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, wait: float = 30.0
    ) -> Any:
        """As ``call``, from an event loop: with a worker idle, the job is handed to it and the
        loop waits on its pipe, with no thread in between (two thread switches less per render).
        Waiting for a busy pool, replacing a dead worker and enforcing a time limit go to a
        thread, as in ``call``."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise Busy("the render workers are stopped")
        try:
            w = self._idle.get_nowait()
        except queue.Empty:
            w = None
        if w is not None and w.alive:
            try:
                w.conn.send((fn, args))
            except (OSError, ValueError):  # broken: call() replaces it when its turn comes
                self._release(w)
                w = None
        elif w is not None:
            self._release(w)
            w = None
        if w is None:
            return await loop.run_in_executor(
                None, functools.partial(self.call, fn, *args, timeout=timeout, wait=wait)
            )
        limit = self.timeout if timeout is None else timeout
        try:
            ready = await _readable(loop, w.conn, limit)
        except BaseException:
            # cancelled (the client went away): the job still runs, and its reply must not reach
            # the next caller of this worker
            threading.Thread(target=self._abandon, args=(w, limit), daemon=True).start()
            raise
        received = None
        if ready:
            try:
                received = w.conn.recv()
            except (EOFError, OSError):
                received = None  # it died: learn how (join) and replace it in a thread
            if received is not None and received[0] != "memory":
                try:
                    return self._reply([w], True, limit, received)
                finally:
                    self._release(w)
        # from here a thread owns the worker (it may kill, join and replace it) and gives it back
        return await loop.run_in_executor(None, self._finish, [w], ready, limit)

    def _abandon(self, w: _Worker, limit: float) -> None:
        with contextlib.suppress(Exception):  # nobody waits for the value, or for its failure
            self._finish([w], None, limit)

    def _finish(self, box: list[_Worker], ready: bool | None, limit: float) -> Any:
        """``_reply`` for the job sent to ``box[0]`` (``ready`` None: wait for it here, its
        caller went away), then give the worker back."""
        try:
            if ready is None:
                ready = box[0].conn.poll(limit)
            return self._reply(box, ready, limit)
        except RuntimeError as e:  # a replacement worker failed to start
            event(log, "render worker cannot start", logging.ERROR, error=str(e))
            raise Busy("a render worker could not be started; try again") from None
        finally:
            self._release(box[0])

    def close(self, grace: float = 5.0) -> None:
        """Stop every worker: those idle at once, a busy one when its job ends or is killed."""
        self._closed = True
        with self._lock:
            workers = list(self._all)
        for w in workers:
            w.stop(grace)
        self._spawner.shutdown(wait=False)


async def _readable(loop: asyncio.AbstractEventLoop, conn: Any, limit: float) -> bool:
    """Whether ``conn`` has something to read (a reply, or EOF) within ``limit`` seconds."""
    if conn.poll(0):
        return True
    fut = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, limit)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        if not os.get_blocking(fd):
            # uvloop makes a watched descriptor non-blocking, and ``Connection.recv`` then fails
            # with EAGAIN on a reply that has not fully arrived
            os.set_blocking(fd, True)


def object_for_worker(archive: Archive, object_key: str, location: str) -> bytes | str:
    """A stored object as a render worker takes it: its file's path in a filesystem store (the
    worker reads it; nothing crosses the pipe), otherwise its bytes. Raises Unrenderable when it
    is missing, Busy when the store cannot be read now."""
    from storage.index import LOCATION_SPOOL
    from storage.objects import FileSystemStore, check_key

    store = archive.store
    try:
        if location != LOCATION_SPOOL and isinstance(store, FileSystemStore):
            path = store.root / check_key(object_key)
            if not path.is_file():
                raise KeyError(object_key)
            return str(path)
        with archive.open_stored(object_key, location) as f:
            return f.read()
    except KeyError:
        raise Unrenderable("the stored object is missing (see imx check)") from None
    except OSError as e:
        raise Busy(f"the object cannot be read now ({e.strerror or type(e).__name__}); try again") from None
    except Exception as e:
        raise Busy(f"the object cannot be read from the store now ({type(e).__name__}); try again") from None


# -- the job run in a worker -------------------------------------------------------------------
Spec = tuple[
    int, tuple[float, float] | None, tuple[int, int] | None, str, int
]  # frame, window, size, fmt, quality


def check_pixels(ds: Any, budget_bytes: int) -> None:
    """Refuse, before anything is decoded, a frame whose declared size (Rows x Columns x Samples
    per Pixel, PS3.3 C.7.6.3) needs more memory to render than a worker may use. The renderer
    itself checks the pixel data against the header (PS3.5 8.1.1, Annex G)."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Unrenderable("the instance has no pixel data (it is not an image)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise Unrenderable("Rows, Columns or Samples per Pixel is missing or invalid") from None
    _check_budget(rows, cols, spp, budget_bytes)


def _check_budget(rows: int, cols: int, spp: int, budget_bytes: int) -> None:
    working = max(0, rows) * max(0, cols) * max(1, spp) * WORKING_COPIES
    if working > budget_bytes:
        raise Unrenderable(
            f"the image declares {rows} x {cols} pixels x {spp} samples per frame: rendering it needs about "
            f"{working // MiB} MiB, more than the {budget_bytes // MiB} MiB a render worker may use"
        )


def _reading(read: Callable[[], Any]) -> Any:
    """``read()``, which reads a stored object, with its failures as Unrenderable (a MemoryError
    passes: the worker reports it and is replaced)."""
    from imaging.dicomio import MalformedInstance

    try:
        return read()
    except MemoryError:
        raise
    except MalformedInstance as e:
        raise Unrenderable(f"the object cannot be read: {e}") from None
    except Exception as e:
        raise Unrenderable(f"the object cannot be read ({type(e).__name__})") from None


def _locate(source: bytes | str) -> tuple[Any, int | None]:
    """The object parsed, and where its Pixel Data's value lies (``imaging.dicomio.locate_stored``:
    a file is mapped, its pixel data a view of the mapping; a 512 KiB CT parses and renders in
    1.3 ms against 2.1 ms read into memory, once kept datasets hold the memory reads took)."""
    from pydicom import config

    from imaging.dicomio import locate_stored

    config.settings.reading_validation_mode = config.IGNORE
    return _reading(lambda: locate_stored(source))


def _parse(source: bytes | str) -> Any:
    return _locate(source)[0]


def _render_specs(ds: Any, specs: list[Spec], budget_bytes: int) -> list[bytes]:
    from imaging.render import Window, render

    check_pixels(ds, budget_bytes)
    out = []
    for frame, window, size, fmt, quality in specs:
        win = Window(float(window[0]), float(window[1])) if window else None
        out.append(render(ds, frame, window=win, size=size, fmt=fmt, quality=quality))
    return out


# A render worker keeps the objects it parsed for on-demand renders (or, for an object rendered
# from its frame plan, its mapping), so that the next render of the same instance (another
# window, size or format: a viewer adjusting the window, a client asking for JPEG after PNG)
# skips reading and parsing it. Rendered images are never kept here. Keyed by object key and
# content hash (an object never changes under its key); least recently used first out; bounded
# by WARM_MAX_BYTES of object size and an eighth of the render budget.
WARM_MAX_BYTES = 64 * MiB
_warm: OrderedDict[str, tuple[Any, int]] = OrderedDict()
_warm_bytes = 0


def _kept(source: bytes | str, key: str | None, budget_bytes: int, make: Callable[[], Any]) -> Any:
    """``make()`` (the object parsed, or mapped), kept under ``key`` for the next render; with
    ``key`` None, made and not kept."""
    global _warm_bytes
    if key is None:
        return make()
    hit = _warm.get(key)
    if hit is not None:
        _warm.move_to_end(key)
        return hit[0]
    value = make()
    size = os.path.getsize(source) if isinstance(source, str) else len(source)
    limit = min(WARM_MAX_BYTES, budget_bytes // 8)
    if size <= limit:
        _warm[key] = (value, size)
        _warm_bytes += size
        while _warm_bytes > limit:
            _key, (_value, old) = _warm.popitem(last=False)
            _warm_bytes -= old
    return value


def render_job(
    source: bytes | str, specs: list[Spec], budget_bytes: int, warm_key: str | None = None
) -> list[bytes]:
    """Parse one object (its bytes, or the path of its file) and render each spec from it (runs
    in a worker process). With ``warm_key``, the parsed object is kept for the next render of the
    same key (see ``_warm``), and taken from there when this worker has it."""
    ds = _kept(source, warm_key, budget_bytes, lambda: _parse(source))
    return _render_specs(ds, specs, budget_bytes)


def planned_job(
    source: bytes | str, plan: str, specs: list[Spec], budget_bytes: int, warm_key: str | None = None
) -> list[bytes]:
    """``render_job`` for an object whose frame plan (``imaging.render.FramePlan``, JSON) the
    index keeps: each spec is rendered from the object's bytes and the plan, with no parse (a
    cold 512 KiB CT: 0.7 against 1.3 ms). A plan that does not fit the object (one of another
    release, or not made from these bytes) falls back to ``render_job``."""
    from imaging.dicomio import map_stored
    from imaging.render import FramePlan, Window, encode, render_planned

    found = FramePlan.from_json(plan)
    if found is None:
        return render_job(source, specs, budget_bytes, warm_key)
    key = f"{warm_key}:mapped" if warm_key is not None else None
    buf = _kept(source, key, budget_bytes, lambda: _reading(lambda: map_stored(source)))
    if found.offset + found.length > len(buf):
        return render_job(source, specs, budget_bytes, warm_key)
    _check_budget(found.rows, found.cols, 1, budget_bytes)
    out = []
    for frame, window, size, fmt, quality in specs:
        win = Window(float(window[0]), float(window[1])) if window else None
        out.append(encode(render_planned(buf, found, frame, window=win), fmt, quality=quality, size=size))
    return out


def preview_job(
    source: bytes | str, specs: list[Spec], budget_bytes: int
) -> tuple[bytes | None, str | None, list[bytes] | str]:
    """The after-the-ack job of one instance (runs in a worker process): from one parse, its
    WADO-RS metadata (packed DICOM JSON, imaging/dicomjson.py; None if it cannot be made), its
    frame plan (JSON, ``imaging.render.plan_frames``; None unless the object is one a plan
    covers) and its renders, or the reason it cannot be rendered (the metadata of a report or of
    a broken image is still kept)."""
    from imaging.dicomjson import encode_metadata, pack
    from imaging.render import plan_frames

    ds, pixel_offset = _locate(source)
    try:
        metadata: bytes | None = pack(encode_metadata(ds))
    except MemoryError:
        raise
    except Exception:
        metadata = None  # WADO-RS computes it on request, and says why if it cannot
    try:
        out = _render_specs(ds, specs, budget_bytes)
    except Unrenderable as e:
        return metadata, None, e.reason
    except MemoryError:
        raise
    except Exception as e:
        if _is_render_error(e):
            return metadata, None, str(e)[:REASON_MAX]
        raise
    plan = plan_frames(ds, pixel_offset)
    return metadata, plan.to_json() if plan is not None else None, out


# -- the service -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """An instance as the preview functions need it (from the index)."""

    id: int
    sop_uid: str
    series_id: int
    sha256: str
    frames: int
    quarantine: str | None
    preview_status: str | None
    preview_reason: str | None
    object_key: str
    location: str
    render_plan: str | None = None  # the frame plan kept for this object (JSON), if any


TARGET_SECONDS = 30.0  # how long Previews remembers a settled, visible instance (see _target)
TARGET_ENTRIES = 4096

# Part of every ETag: bump it when the rendering changes, so that caches holding the old bytes
# under a strong validator do not keep them.
RENDER_VERSION = 1


def _etag(*parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in (RENDER_VERSION, *parts)).encode()).hexdigest()
    return f'"{h[:40]}"'


@dataclass(frozen=True)
class _Prepared:
    """A queued instance worked by ``Previews.run_pending``, before it is recorded: its stored
    preview (``key``, ``size``) or the ``reason`` it cannot be rendered, and its metadata."""

    target: Target
    metadata: Metadata | None
    key: str | None
    size: int
    reason: str | None = None


class Previews:
    """Thumbnails and previews of one archive: background rendering of the queue and on-demand
    rendering for HTTP. ``pool`` is shared by both."""

    def __init__(
        self,
        archive: Archive,
        pool: RenderPool,
        *,
        preview_size: int = 512,
        thumbnail_size: int = 128,
        fmt: str = DEFAULT_FORMAT,
        quality: int = DEFAULT_QUALITY,
    ) -> None:
        # weakly: a Previews kept for an archive (for_archive) must not keep the archive alive
        self._archive = weakref.ref(archive)
        self.pool = pool
        self.preview_size = preview_size
        self.thumbnail_size = thumbnail_size
        self.fmt = fmt
        self.quality = quality
        self.budget = (
            max(64, pool.memory_mb - WORKER_BASELINE_MB) * MiB if pool.memory_mb > 0 else 1 << 40
        )
        self._targets: OrderedDict[str, tuple[float, Target]] = OrderedDict()
        self._targets_lock = threading.Lock()

    @property
    def archive(self) -> Archive:
        archive = self._archive()
        if archive is None:
            raise Busy("the archive these previews belong to is closed")
        return archive

    # -- plumbing ---------------------------------------------------------------------------
    def _target(self, sop_uid: str) -> Target:
        """The instance from the index, or from a short-lived memory of settled, visible ones:
        what an on-demand render reads of them does not change (an object is replaced only while
        quarantined, and a quarantine is set only at ingest), and a viewer asks for the same
        instances again and again."""
        now = time.monotonic()
        with self._targets_lock:
            hit = self._targets.get(sop_uid)
            if hit is not None and hit[0] > now:
                return hit[1]
        row = self.archive.index.preview_target(sop_uid)
        if row is None:
            raise NotFound("no instance has this UID")
        t = Target(**row)
        if t.quarantine is None and t.preview_status is not None:
            with self._targets_lock:
                self._targets[sop_uid] = (now + TARGET_SECONDS, t)
                self._targets.move_to_end(sop_uid)
                while len(self._targets) > TARGET_ENTRIES:
                    self._targets.popitem(last=False)
        return t

    def _visible(self, sop_uid: str, found: dict[str, Any] | None = None) -> Target:
        """The instance, unless quarantined; ``found``: its index row, already read by the caller
        (``viewer.previews.visible_target``)."""
        t = self._target(sop_uid) if found is None else Target(**found)
        if t.quarantine is not None:
            raise Quarantined(
                "this instance is held back (quarantined) until an operator reviews it; it is not rendered"
            )
        return t

    def _job(
        self, t: Target, data: bytes | str, specs: list[Spec], warm: bool
    ) -> tuple[Callable[..., list[bytes]], tuple[Any, ...]]:
        """The worker job rendering ``specs`` of ``t`` from ``data`` (``object_for_worker``):
        from its frame plan when the index keeps one, else from a parse; ``warm``: an on-demand
        render, whose parsed object the worker keeps for the next one (render_job)."""
        key = f"{t.object_key}:{t.sha256}" if warm else None
        if t.render_plan is not None:
            return planned_job, (data, t.render_plan, specs, self.budget, key)
        return render_job, (data, specs, self.budget, key)

    def _render(self, t: Target, specs: list[Spec], *, warm: bool = False) -> list[bytes]:
        """Render ``specs`` of ``t`` in a worker (``_job``)."""
        fn, args = self._job(t, object_for_worker(self.archive, t.object_key, t.location), specs, warm)
        try:
            return self.pool.call(fn, *args)
        except JobFailed as e:
            raise Unrenderable(e.reason) from None

    def _render_with_metadata(
        self, t: Target, specs: list[Spec]
    ) -> tuple[Metadata | None, list[bytes]]:
        """As ``_render``, and what the same parse learnt of the instance: (object key, packed
        DICOM JSON, frame plan or None), or None. An Unrenderable raised carries it if made."""
        data = object_for_worker(self.archive, t.object_key, t.location)
        try:
            packed, plan, out = self.pool.call(preview_job, data, specs, self.budget)
        except JobFailed as e:
            raise Unrenderable(e.reason) from None
        metadata = (t.object_key, packed, plan) if packed is not None else None
        if isinstance(out, str):
            raise Unrenderable(out, metadata)
        return metadata, out

    def _keep(
        self,
        t: Target,
        kind: str,
        frame: int,
        body: bytes,
        fmt: str,
        metadata: Metadata | None = None,
    ) -> tuple[str, str]:
        """Store a rendition under a generated key and record it (a preview of frame 1 also marks
        the instance 'ok' and keeps its ``metadata``, in the same transaction); (key, media type)
        of the one the index holds (another thread's, if it won the race: ours is then removed)."""
        from storage.objects import Payload, make_key

        key = make_key("r", secrets.token_hex(16), SUFFIX[fmt])
        media = MEDIA_TYPES[fmt]
        self._put(key, Payload(data=body))
        if kind == KIND_PREVIEW and frame == 1:
            kept = self.archive.index.record_preview(t.id, frame, key, media, len(body), metadata)
        else:
            kept = self.archive.index.add_rendition(t.id, kind, frame, key, media, len(body))
        if kept[0] != key:
            self._delete(key)
        return kept

    def _put(self, key: str, payload: Any) -> None:
        from storage.objects import StoreError

        try:
            self.archive.store.put(key, payload)
        except StoreError as e:
            raise Busy(
                f"the object store cannot keep the rendition now ({type(e).__name__}); try again"
            ) from None

    def _delete(self, key: str) -> None:
        from storage.objects import StoreError

        try:
            self.archive.store.delete(key)
        except StoreError as e:  # an orphan is harmless: imx check lists it
            event(log, "rendition not deleted", logging.WARNING, key=key, error=type(e).__name__)

    def _fetch(self, key: str) -> bytes | None:
        try:
            return self.archive.store.get(key)
        except KeyError:
            return None
        except Exception as e:
            raise Busy(
                f"the rendition cannot be read from the store now ({type(e).__name__}); try again"
            ) from None

    # -- background: the queue ----------------------------------------------------------------
    def run_pending(self, limit: int = 50, stop: threading.Event | None = None) -> int:
        """Render previews (and series thumbnails) for up to ``limit`` instances waiting in the
        queue, with each instance's WADO-RS metadata from the same job; returns how many were
        settled ('ok' or 'unrenderable'). Returns early once ``stop`` is set.

        A batch is worked by ``pool.size + 1`` threads, so that one stores a rendition (an fsync)
        while the workers render the next, and is recorded in one index transaction."""
        targets = [Target(**row) for row in self.archive.index.pending_previews(limit)]
        if not targets:
            return 0
        threads = min(len(targets), self.pool.size + 1)
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="imx-queue") as ex:
            futures = [ex.submit(self._prepare_preview, t, stop) for t in targets]
            prepared = [p for p in (f.result() for f in futures) if p is not None]
        done = self._settle(prepared)
        for series_id in {p.target.series_id for p in prepared}:
            try:
                self._settle_thumbnail(series_id)
            except PreviewError as e:
                event(
                    log, "series thumbnail not made", logging.INFO, series=series_id, reason=str(e)
                )
            except Exception as e:
                event(
                    log,
                    "series thumbnail not made",
                    logging.WARNING,
                    series=series_id,
                    error=type(e).__name__,
                )
        return done

    def _prepare_preview(self, t: Target, stop: threading.Event | None) -> _Prepared | None:
        """Render the preview of frame 1 and the metadata of one queued instance and store the
        rendition; None when postponed (a busy pool, an unreachable store) or stopping."""
        if stop is not None and stop.is_set():
            return None
        size = (self.preview_size, self.preview_size)
        try:
            meta, (body,) = self._render_with_metadata(t, [(1, None, size, self.fmt, self.quality)])
            from storage.objects import Payload, make_key

            key = make_key("r", secrets.token_hex(16), SUFFIX[self.fmt])
            self._put(key, Payload(data=body))
            return _Prepared(t, meta, key, len(body))
        except Unrenderable as e:
            event(log, "instance unrenderable", logging.WARNING, instance=t.id, reason=e.reason)
            return _Prepared(t, e.metadata, None, 0, e.reason)
        except (Busy, NotFound) as e:
            event(log, "preview postponed", logging.INFO, instance=t.id, reason=str(e))
        except Exception as e:  # the store failed: try again later
            event(log, "preview postponed", logging.WARNING, instance=t.id, error=type(e).__name__)
        return None

    def _settle(self, prepared: list[_Prepared]) -> int:
        """Record a batch in one transaction; one by one if that fails (a rendition recorded
        meanwhile by an HTTP request: the earlier one is kept and ours removed)."""
        index = self.archive.index
        media = MEDIA_TYPES[self.fmt]
        items = [
            (
                p.target.id,
                STATUS_OK if p.key else STATUS_UNRENDERABLE,
                p.reason,
                (p.key, media, p.size) if p.key else None,
                p.metadata,
            )
            for p in prepared
        ]
        try:
            index.settle_previews(items)
            return len(items)
        except Exception as e:
            event(log, "preview batch recorded one by one", logging.INFO, error=type(e).__name__)
        done = 0
        for p in prepared:
            try:
                if p.key is None:
                    index.set_preview_status(p.target.id, STATUS_UNRENDERABLE, p.reason, p.metadata)
                else:
                    kept = index.record_preview(p.target.id, 1, p.key, media, p.size, p.metadata)
                    if kept[0] != p.key:
                        self._delete(p.key)
                done += 1
            except Exception as e:  # the index failed: the instance stays queued
                event(
                    log,
                    "preview postponed",
                    logging.WARNING,
                    instance=p.target.id,
                    error=type(e).__name__,
                )
                if p.key is not None:
                    self._delete(p.key)
        return done

    def _make_preview(
        self, t: Target, frame: int, *, metadata: bool = False
    ) -> tuple[bytes, str, str]:
        """Render, store and record the preview of ``frame``; with ``metadata`` (frame 1 only),
        the instance's WADO-RS metadata is made by the same job and kept with it."""
        size = (self.preview_size, self.preview_size)
        spec: list[Spec] = [(frame, None, size, self.fmt, self.quality)]
        meta = None
        if metadata and frame == 1:
            meta, (body,) = self._render_with_metadata(t, spec)
        else:
            (body,) = self._render(t, spec)
        key, media = self._keep(t, KIND_PREVIEW, frame, body, self.fmt, meta)
        return body, media, key

    def _settle_thumbnail(
        self, series_id: int, *, force: bool = False
    ) -> tuple[bytes, str, str] | None:
        """Make the series thumbnail from its representative instance (the middle one; the middle
        frame if the series is one multi-frame instance) once no instance of the series waits in
        the queue, or at once with ``force``. A series that grew gets a new one."""
        plan = self.archive.index.thumbnail_plan(series_id)
        if plan is None or (plan["pending"] and not force):
            return None
        current = plan["current"]  # (instance id, frame, key, media) or None
        rep = plan["representative"]
        if rep is None:
            return None
        t = Target(**rep["target"])
        frame = rep["frame"]
        if current is not None and current[0] == t.id and current[1] == frame:
            return None
        size = (self.thumbnail_size, self.thumbnail_size)
        (body,) = self._render(t, [(frame, None, size, self.fmt, self.quality)])
        from storage.objects import Payload, make_key

        key = make_key("r", secrets.token_hex(16), SUFFIX[self.fmt])
        self._put(key, Payload(data=body))
        old = self.archive.index.replace_thumbnail(
            series_id, t.id, frame, key, MEDIA_TYPES[self.fmt], len(body)
        )
        for k in old:
            self._delete(k)
        return body, MEDIA_TYPES[self.fmt], key

    # -- on demand: HTTP and WADO-RS ------------------------------------------------------------
    def preview_etag(
        self, sop_uid: str, frame: int, *, found: dict[str, Any] | None = None
    ) -> tuple[Target, str | None]:
        """The instance and the ETag of its kept preview of ``frame`` (None if not made yet);
        ``found``: the instance's index row when the caller has read it."""
        t = self._visible(sop_uid, found)
        if frame < 1 or frame > t.frames:
            raise NotFound(f"frame {frame} does not exist: the instance has {t.frames}")
        kept = self.archive.index.rendition(t.id, KIND_PREVIEW, frame)
        return t, (_etag(t.sha256, KIND_PREVIEW, kept[0]) if kept else None)

    def preview(
        self, sop_uid: str, frame: int = 1, *, target: Target | None = None
    ) -> tuple[bytes, str, str]:
        """The kept preview of ``frame`` (fitted into preview_size, the default format), rendered
        and kept first if missing. (body, media type, ETag). ``target``: the instance as
        ``preview_etag`` returned it (saves looking it up again)."""
        t = target if target is not None else self.preview_etag(sop_uid, frame)[0]
        if t.preview_status == STATUS_UNRENDERABLE:
            raise Unrenderable(t.preview_reason or "the instance cannot be rendered")
        found = self.archive.index.rendition(t.id, KIND_PREVIEW, frame)
        if found is not None:
            body = self._fetch(found[0])
            if body is not None:
                return body, found[1], _etag(t.sha256, KIND_PREVIEW, found[0])
            self.archive.index.drop_rendition(found[0])  # lost from the store: render again
        try:
            body, media, key = self._make_preview(t, frame, metadata=t.preview_status is None)
        except Unrenderable as e:
            if frame == 1:
                self.archive.index.set_preview_status(
                    t.id, STATUS_UNRENDERABLE, e.reason, e.metadata
                )
            raise
        return body, media, _etag(t.sha256, KIND_PREVIEW, key)

    def rendered_etag(
        self,
        sop_uid: str,
        frame: int | None,
        *,
        window: Any,
        size: tuple[int, int] | None,
        fmt: str,
        quality: int,
        found: dict[str, Any] | None = None,
    ) -> tuple[Target, str]:
        """The instance and the ETag of a rendering with these parameters (a hash of the
        instance's content and the parameters: the pixels of an instance never change);
        ``found``: the instance's index row when the caller has read it."""
        t = self._visible(sop_uid, found)
        n = frame or 1
        if n < 1 or n > t.frames:
            raise NotFound(f"frame {n} does not exist: the instance has {t.frames}")
        if fmt not in MEDIA_TYPES:
            raise ValueError(f"format must be one of {', '.join(MEDIA_TYPES)}")
        w = (float(window.center), float(window.width)) if window is not None else None
        return t, _etag(t.sha256, "rendered", n, w, size, fmt, quality if fmt != "png" else 0)

    def rendered(
        self,
        sop_uid: str,
        frame: int | None,
        *,
        window: Any,
        size: tuple[int, int] | None,
        fmt: str,
        quality: int,
        target: tuple[Target, str] | None = None,
    ) -> tuple[bytes, str, str]:
        """Render ``frame`` (1 if None) with the given parameters now (PS3.18 10.4.1.1.3 rendered
        media types). ``size`` None: the image's own size. ``target``: what ``rendered_etag``
        returned for the same arguments (saves looking the instance up again)."""
        t, tag = target or self.rendered_etag(
            sop_uid, frame, window=window, size=size, fmt=fmt, quality=quality
        )
        if t.preview_status == STATUS_UNRENDERABLE:
            raise Unrenderable(t.preview_reason or "the instance cannot be rendered")
        w = (float(window.center), float(window.width)) if window is not None else None
        (body,) = self._render(t, [(frame or 1, w, size, fmt, quality)], warm=True)
        return body, MEDIA_TYPES[fmt], tag

    async def rendered_async(
        self,
        frame: int | None,
        *,
        window: Any,
        size: tuple[int, int] | None,
        fmt: str,
        quality: int,
        target: tuple[Target, str],
    ) -> tuple[bytes, str, str]:
        """As ``rendered`` (with ``target`` from ``rendered_etag``), for an event loop: the job
        goes to a worker without a thread in between (``RenderPool.call_async``). Reading the
        object is left to a thread unless it is a file of a filesystem store (the worker reads
        it)."""
        from storage.index import LOCATION_SPOOL
        from storage.objects import FileSystemStore

        t, tag = target
        if t.preview_status == STATUS_UNRENDERABLE:
            raise Unrenderable(t.preview_reason or "the instance cannot be rendered")
        w = (float(window.center), float(window.width)) if window is not None else None
        if t.location != LOCATION_SPOOL and isinstance(self.archive.store, FileSystemStore):
            data = object_for_worker(self.archive, t.object_key, t.location)
        else:
            data = await asyncio.get_running_loop().run_in_executor(
                None, object_for_worker, self.archive, t.object_key, t.location
            )
        fn, args = self._job(t, data, [(frame or 1, w, size, fmt, quality)], True)
        try:
            (body,) = await self.pool.call_async(fn, *args)
        except JobFailed as e:
            raise Unrenderable(e.reason) from None
        return body, MEDIA_TYPES[fmt], tag

    def thumbnail_etag(self, series_uid: str) -> str | None:
        sid = self.archive.index.series_id(series_uid)
        if sid is None:
            raise NotFound("no series has this UID")
        cur = self.archive.index.series_thumbnail(sid)
        return _etag("thumbnail", cur[2]) if cur else None

    def series_thumbnail(self, series_uid: str) -> tuple[bytes, str, str]:
        """The series thumbnail, made now from the instances received so far if there is none."""
        sid = self.archive.index.series_id(series_uid)
        if sid is None:
            raise NotFound("no series has this UID")
        for _ in range(2):
            cur = self.archive.index.series_thumbnail(sid)
            if cur is not None:
                body = self._fetch(cur[2])
                if body is not None:
                    return body, cur[3], _etag("thumbnail", cur[2])
                self.archive.index.drop_rendition(cur[2])
            made = self._settle_thumbnail(sid, force=True)
            if made is not None:
                return made[0], made[1], _etag("thumbnail", made[2])
        plan = self.archive.index.thumbnail_plan(sid)
        if plan is None or plan["representative"] is None:
            raise NotFound(
                "the series has no instance that can be shown (all are quarantined or unrenderable)"
            )
        raise Busy("the series thumbnail is being replaced; try again")


# -- one Previews per archive, for the HTTP app and for WADO-RS ----------------------------------
_services: weakref.WeakKeyDictionary[Any, Previews] = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()
_finalizers: dict[int, weakref.finalize] = {}


def attach(archive: Archive, previews: Previews) -> None:
    """Make ``previews`` the one the HTTP routes and ``rendered()`` use for ``archive``."""
    with _services_lock:
        _services[archive] = previews


def detach(archive: Archive) -> None:
    """Forget the Previews of ``archive``; one that ``for_archive`` started has its workers
    stopped (one attached by the caller is the caller's to close)."""
    with _services_lock:
        p = _services.pop(archive, None)
        finalizer = _finalizers.pop(id(archive), None)
    if p is not None and finalizer is not None:
        finalizer()


def for_archive(archive: Archive) -> Previews:
    """The Previews attached to ``archive`` (by ``imx serve``); otherwise one is started from the
    archive's settings, whose workers stop when the archive is collected, on ``detach``, or at
    exit."""
    with _services_lock:
        p = _services.get(archive)
        if p is None:
            p = start(archive)
            _services[archive] = p
            # the workers stop when the archive is collected, or at exit
            _finalizers[id(archive)] = weakref.finalize(archive, _stop_pool, p.pool, id(archive))
        return p


def _stop_pool(pool: RenderPool, key: int) -> None:
    _finalizers.pop(key, None)
    pool.close(1.0)


def start(archive: Archive) -> Previews:
    s = archive.settings
    pool = RenderPool(
        getattr(s, "preview_workers", 1),
        getattr(s, "preview_memory_mb", 1024),
        getattr(s, "preview_timeout", 20.0),
    ).start()
    return Previews(
        archive,
        pool,
        preview_size=getattr(s, "preview_size", 512),
        thumbnail_size=getattr(s, "thumbnail_size", 128),
    )


def rendered(
    archive: Archive,
    sop_uid: str,
    frame: int | None,
    *,
    window: Any | None,
    size: tuple[int, int] | None,
    fmt: str,
    quality: int,
) -> tuple[bytes, str, str]:
    """Render one frame of an instance now, in a worker with limits: (body, media type, ETag).
    For WADO-RS ``/rendered`` (PS3.18 10.4). Raises NotFound, Quarantined, Unrenderable, Busy,
    or ValueError for a format not in MEDIA_TYPES."""
    return for_archive(archive).rendered(
        sop_uid, frame, window=window, size=size, fmt=fmt, quality=quality
    )


def series_thumbnail(archive: Archive, series_uid: str) -> tuple[bytes, str, str]:
    """The series thumbnail (PS3.18 10.7 ``/thumbnail``): (body, media type, ETag). Raises
    NotFound or Busy."""
    return for_archive(archive).series_thumbnail(series_uid)


def preview(archive: Archive, sop_uid: str, frame: int = 1) -> tuple[bytes, str, str]:
    """The kept preview of a frame (rendered and kept if missing): (body, media type, ETag)."""
    return for_archive(archive).preview(sop_uid, frame)


def run_queue(previews: Previews, stopping: threading.Event, idle_seconds: float = 1.0) -> None:
    """The background loop run by the supervisor: render the queue until ``stopping`` is set."""
    while not stopping.is_set():
        done = 0
        try:
            done = previews.run_pending(stop=stopping)
        except Exception as e:
            event(log, "preview queue failed", logging.ERROR, error=type(e).__name__)
        if not done:
            stopping.wait(idle_seconds)
