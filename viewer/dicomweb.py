"""DICOMweb (PS3.18): QIDO-RS search, WADO-RS retrieve, STOW-RS store, under ``/dicomweb``.

A thin door, like the DICOM node: searches go through the shared query layer
(``storage.query.search``, so QIDO-RS and C-FIND cannot disagree), retrieves through
``storage.query.instances`` and the object store, and stores through ``Archive.ingest_file``
(the same ingest path as C-STORE: the partner's policy, de-identification, durability).

Every route needs an authenticated caller (``viewer.auth.CurrentUser``: session, API token,
Basic or share link) and sees only the studies of its ``Principal.scope``; a study outside it
answers 404, as one that does not exist. Everything served is already de-identified. Metadata
fetches are audited as ``study_viewed``, retrieves as ``instance_downloaded``, frames as
``frame_downloaded`` (once per caller and target every few minutes).

STOW-RS: a partner user's instances are ingested as sent by their partner (the same ingest and
policy as a C-STORE from it); an admin names the sending partner (``?partner=NAME`` or the
``X-Imx-Partner`` header); specialists and share links cannot store.

Sections implemented: PS3.18 8.3.4 (query parameters), 8.7.3 (acceptable media types and
transfer syntaxes), 10.4 (Retrieve: instances, metadata, frames, bulk data), 10.5 (Store),
10.6 (Search), F.2 (DICOM JSON model).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydicom import dcmread, dcmwrite
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool

from imaging.dicomjson import (  # noqa: F401 (metadata_json: the DICOM JSON of PS3.18 F.2, from here too)
    BINARY_VRS,
    BULK_PLACEHOLDER,
    BULK_THRESHOLD,
    encode_metadata,
    metadata_json,
    pack,
    unpack,
    with_bulk_base,
)
from imx.ingest import Archive, PartnerRef, Result
from imx.logs import event
from storage.objects import StoreError
from storage.query import (
    SUPPORTED_KEYS,
    Level,
    QueryError,
    Scope,
    StoredInstance,
    instances,
    search,
)
from viewer.auth import Principal, audit, current_user
from viewer.previews import FastRoute, off_loop_unless_sqlite, visible_target
from viewer.previews import route as fast_route

log = logging.getLogger("imx.dicomweb")

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTETS = "application/octet-stream"
PROBLEM_JSON = "application/problem+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

# PS3.18 Table 8.7.3-2/-4: the media type of a compressed frame in each transfer syntax
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
PIXEL_DATA = 0x7FE00010

IMMUTABLE = "private, max-age=31536000, immutable"  # one instance never changes once visible
REVALIDATE = "private, no-cache"  # a study or series may grow: revalidate with the ETag
GZIP_MIN = 1024

QIDO_MAX_LIMIT = 1000  # results per page when the client asks for more or gives no limit
STOW_MAX_PARTS = 10_000
CHUNK = 1 << 20

# STOW-RS failure reasons (PS3.18 Table 10.5.3-2 refers to PS3.4 C.4.2.1.4 / GG.4)
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_MISMATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_REFUSED = 0x0124
FAILURE_PROCESSING = 0x0110
_FAILURE_BY_RESULT = {
    Result.INVALID: FAILURE_CANNOT_UNDERSTAND,
    Result.MISMATCH: FAILURE_MISMATCH,
    Result.REFUSED: FAILURE_REFUSED,
    Result.OUT_OF_RESOURCES: FAILURE_OUT_OF_RESOURCES,
    Result.FAILED: FAILURE_PROCESSING,
}

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


# -- errors -------------------------------------------------------------------------------------------
class DicomwebError(Exception):
    """An error answered as application/problem+json (RFC 9457) with a precise status."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


class MissingObject(LookupError):
    """The index names an object the store does not have (``imx check`` reports and repairs)."""


def _not_found(what: str) -> DicomwebError:
    return DicomwebError(404, "Not Found", f"No {what} with this UID is stored here (or it is held back for review).")


def _check_uid(uid: str, what: str) -> str:
    if len(uid) > 64 or not _UID.match(uid):
        raise DicomwebError(400, "Bad Request", f"The {what} in the path is not a valid UID.")
    return uid


# -- media types ----------------------------------------------------------------------------------------
@dataclass
class MediaRange:
    """One element of an Accept header: type/subtype, parameters (lower-case names), quality."""

    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0


def _split_unquoted(text: str, sep: str) -> list[str]:
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_media_type(text: str) -> MediaRange:
    parts = [p.strip() for p in _split_unquoted(text, ";")]
    mr = MediaRange(parts[0].lower())
    for p in parts[1:]:
        name, _, value = p.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"')
        if name == "q":
            try:
                mr.q = float(value)
            except ValueError:
                mr.q = 0.0
        elif name:
            mr.params[name] = value
    return mr


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, most preferred first (stable for equal quality)."""
    if not header or not header.strip():
        return []
    ranges = [parse_media_type(p) for p in _split_unquoted(header, ",") if p.strip()]
    ranges = [r for r in ranges if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def _inner_type(r: MediaRange) -> str | None:
    """The media type a range asks for: the ``type`` parameter of multipart/related, or itself."""
    if r.type in ("multipart/related", "multipart/*"):
        return r.params.get("type", "*/*").lower()
    if r.type == "*/*":
        return "*/*"
    return None  # a single-part type: we always answer multipart


def negotiate_instance_syntax(accept: str | None, stored: str) -> str:
    """The transfer syntax in which to send an instance (PS3.18 8.7.3.5): the stored one unless
    the client asks for Explicit VR Little Endian only. Raises 406 if nothing acceptable."""
    ranges = parse_accept(accept)
    if not ranges:
        return stored
    for r in ranges:
        inner = _inner_type(r)
        if inner not in (DICOM, "*/*", "application/*"):
            continue
        ts = r.params.get("transfer-syntax")
        if ts in (None, "*", stored):
            return stored
        if ts == EXPLICIT_LE:
            return EXPLICIT_LE
    raise DicomwebError(
        406,
        "Not Acceptable",
        f'Instances are sent as multipart/related; type="{DICOM}" in their stored transfer syntax or {EXPLICIT_LE}.',
    )


@dataclass(frozen=True)
class FrameMode:
    """How pixel data goes out: ``native`` (the stored compressed frames, untouched) or decoded
    to uncompressed little-endian bytes; ``media`` is the parts' media type."""

    native: bool
    media: str


def negotiate_frames(accept: str | None, stored: str) -> FrameMode:
    """PS3.18 8.7.3.3 / 8.7.3.5 for frames and bulk data. Uncompressed bytes as
    application/octet-stream by default; the stored compressed frames when the client takes
    their media type (image/jls, image/jp2, ...), any media type (*/*), or octet-stream with
    ``transfer-syntax=*`` (what OHIF asks for: it decodes frames itself)."""
    native_media = FRAME_MEDIA_TYPES.get(stored)
    compressed = native_media is not None
    raw = FrameMode(False, OCTETS)
    ranges = parse_accept(accept)
    if not ranges:
        return raw
    for r in ranges:
        inner = _inner_type(r)
        if inner is None:
            continue
        ts = r.params.get("transfer-syntax")
        if inner == OCTETS:
            if ts == "*" and compressed:
                return FrameMode(True, OCTETS)
            if ts in (None, "*", EXPLICIT_LE) or (ts == stored and not compressed):
                return raw
            continue
        if compressed and inner in (native_media, "image/*", "*/*") and ts in (None, "*", stored):
            return FrameMode(True, native_media)  # type: ignore[arg-type]
        if inner in ("*/*", "application/*") and ts in (None, "*"):
            return raw
    want = f'multipart/related; type="{OCTETS}"' + (f' or type="{native_media}"' if native_media else "")
    raise DicomwebError(406, "Not Acceptable", f"Frames and bulk data of this instance are available as {want}.")


# -- helpers: responses ----------------------------------------------------------------------------------
def _etag(items: Iterable[StoredInstance], variant: str = "") -> str:
    h = hashlib.sha256(variant.encode())
    for i in items:
        h.update(f"{i.object_key}:{i.size_bytes}:{i.transfer_syntax};".encode())
    return '"' + h.hexdigest()[:40] + '"'


def _not_modified(request: Request, etag: str) -> bool:
    given = request.headers.get("if-none-match")
    if not given:
        return False
    tags = {t.strip().removeprefix("W/") for t in given.split(",")}
    return "*" in tags or etag in tags


def json_response(request: Request, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """dicom+json, gzip-compressed when the client accepts it (JSON only: DICOM streams are sent
    as they are, compressing pixel data costs much and gains little). ``payload`` may be JSON
    already encoded (bytes)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    h = {"Vary": "Accept-Encoding", **(headers or {})}
    if len(body) >= GZIP_MIN and "gzip" in request.headers.get("accept-encoding", "").lower():
        body = gzip.compress(body, compresslevel=5)
        h["Content-Encoding"] = "gzip"
    return Response(body, status_code=status, media_type=DICOM_JSON, headers=h)


class MetadataCache:
    """Encoded DICOM JSON of instances whose metadata the index does not keep yet (made on
    request: pydicom's JSON conversion costs about 0.5 to 2 ms an instance), until the index has
    it. Keyed by object key and size: an object never changes under its key. The BulkDataURIs
    hold a placeholder that each request replaces with its own base URL."""

    PLACEHOLDER = BULK_PLACEHOLDER

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, int], value: bytes) -> None:
        with self._lock:
            if key in self._items or len(value) > self.max_bytes:
                return
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


def _cached(request: Request, etag: str, cache: str) -> Response | None:
    if _not_modified(request, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache})
    return None


def _multipart(parts: Iterable[tuple[str, Callable[[], Iterable[bytes]]]], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related message (RFC 2387); each part's content is produced lazily.

    Output is coalesced into writes of about CHUNK bytes: the server hands each item of a
    synchronous body to a thread, so a series of small instances sent as three items each
    (headers, object, CRLF) spent more time in hand-overs than in copying."""
    buf = bytearray()
    for content_type, produce in parts:
        buf += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        try:
            for chunk in produce():
                buf += chunk
                if len(buf) >= CHUNK:
                    yield bytes(buf)
                    buf.clear()
        except Exception as e:  # headers are gone: end the stream short so the client sees it broken
            event(log, "retrieve stream aborted", logging.ERROR, error=type(e).__name__)
            if buf:
                yield bytes(buf)
            return
        buf += b"\r\n"
    buf += f"--{boundary}--\r\n".encode()
    yield bytes(buf)


def _multipart_response(
    parts: list[tuple[str, Callable[[], Iterable[bytes]]]], inner: str, etag: str, cache: str
) -> StreamingResponse:
    boundary = secrets.token_hex(16)
    return StreamingResponse(
        _multipart(parts, boundary),
        media_type=f'multipart/related; type="{inner}"; boundary={boundary}',
        headers={"ETag": etag, "Cache-Control": cache},
    )


# -- helpers: reading stored objects ------------------------------------------------------------------------
def open_object(archive: Archive, si: StoredInstance) -> BinaryIO:
    """The stored object: from the spool while it waits there, else from the object store (the
    drainer may move it in between, so a vanished spool file falls through to the store)."""
    try:
        return archive.open_stored(si.object_key, si.location)
    except KeyError:
        raise MissingObject(si.object_key) from None


def _read_all(archive: Archive, si: StoredInstance) -> bytes:
    with open_object(archive, si) as f:
        return f.read()


def _chunks(archive: Archive, si: StoredInstance, opened: BinaryIO | None = None) -> Iterator[bytes]:
    with opened or open_object(archive, si) as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _dataset(archive: Archive, si: StoredInstance, *, pixels: bool) -> Dataset:
    with open_object(archive, si) as f:
        return dcmread(f, stop_before_pixels=not pixels)


def to_explicit_le(data: bytes) -> bytes:
    """Re-encode a DICOM file in Explicit VR Little Endian (PS3.5 A.2), decompressing pixel data.
    Raises ValueError when it cannot be done (no decoder, unsupported layout)."""
    try:
        ds = dcmread(io.BytesIO(data))
        ts = UID(ds.file_meta.TransferSyntaxUID)
        if ts == EXPLICIT_LE:
            return data
        if ts.is_compressed:
            ds.decompress(generate_instance_uid=False)  # a change of encoding, not a new instance
        elif not ts.is_little_endian:
            others = [e for e in ds if e.VR in ("OW", "OF", "OD", "OL", "OV") and e.tag != PIXEL_DATA]
            if others:
                raise ValueError("big endian binary values besides pixel data")
            new = Dataset()
            for elem in ds:
                new.add(elem)
            if "PixelData" in ds:
                arr = ds.pixel_array
                new.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
                new["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
            new.file_meta = FileMetaDataset(ds.file_meta)
            ds = new
        ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
        return buf.getvalue()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot be decoded ({type(e).__name__})") from e


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def pixel_frames(ds: Dataset, numbers: list[int], mode: FrameMode) -> list[tuple[str, bytes]]:
    """(part media type, bytes) of the requested 1-based frames: the stored compressed frames
    (``mode.native``) or uncompressed little-endian bytes (PS3.18 8.7.3.3)."""
    if "PixelData" not in ds:
        raise DicomwebError(404, "Not Found", "This instance has no pixel data.")
    n = _frame_count(ds)
    bad = [f for f in numbers if f > n]
    if bad:
        raise DicomwebError(404, "Not Found", f"This instance has {n} frame(s); frame {bad[0]} does not exist.")
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if mode.native:
        from pydicom.encaps import generate_frames

        frames = list(generate_frames(ds.PixelData, number_of_frames=n))
        return [(f"{mode.media}; transfer-syntax={ts}", frames[i - 1]) for i in numbers]
    media = f"{OCTETS}; transfer-syntax={EXPLICIT_LE}"
    bits = int(ds.get("BitsAllocated", 8) or 8)
    length = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits
    if not ts.is_compressed and ts.is_little_endian and length % 8 == 0:
        data, size = ds.PixelData, length // 8
        return [(media, bytes(data[(i - 1) * size : i * size])) for i in numbers]
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise DicomwebError(
            406, "Not Acceptable", f"The stored pixel data cannot be decoded here ({type(e).__name__}); ask for its compressed media type."
        ) from e
    if n == 1:
        arr = arr[None, ...]
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return [(media, arr[i - 1].tobytes()) for i in numbers]


def _parse_frames(text: str) -> list[int]:
    try:
        numbers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers):
        raise DicomwebError(400, "Bad Request", "Frames are a comma-separated list of frame numbers from 1.")
    return numbers


# -- DICOM JSON (PS3.18 F.2) ----------------------------------------------------------------------------------
_NUMERIC_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "SV", "UV"})


def _json_values(vr: str, values: list[Any]) -> list[Any]:
    if vr == "PN":
        return [{"Alphabetic": str(v)} for v in values]
    if vr in _NUMERIC_VRS:
        return [int(v) for v in values]
    if vr in ("DS", "FL", "FD"):
        return [float(v) for v in values]
    return [str(v) for v in values]


def attributes_json(attrs: dict[str, Any]) -> dict[str, Any]:
    """Query-layer attributes (keyword -> value or list) as a DICOM JSON object, tags sorted."""
    out: dict[int, dict[str, Any]] = {}
    for keyword, value in attrs.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        entry: dict[str, Any] = {"vr": vr}
        values = value if isinstance(value, list) else ([] if value is None or value == "" else [value])
        if values:
            entry["Value"] = _json_values(vr, values)
        out[tag] = entry
    return {f"{t:08X}": out[t] for t in sorted(out)}


# -- QIDO-RS (PS3.18 10.6) ------------------------------------------------------------------------------------
@dataclass
class QidoQuery:
    keys: dict[str, str]
    include: set[str]
    fuzzy: bool
    limit: int
    offset: int
    warnings: list[str]


def _keyword(name: str) -> str | None:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return keyword_for_tag(int(name, 16)) or None
    return name if tag_for_keyword(name) is not None else None


def parse_qido(request: Request, level: Level) -> QidoQuery:
    """Query parameters of a search (PS3.18 8.3.4): attribute matches by keyword or tag,
    includefield, fuzzymatching, limit and offset."""
    q = QidoQuery({}, set(), False, QIDO_MAX_LIMIT, 0, [])
    for name, value in request.query_params.multi_items():
        if name == "includefield":
            for f in value.split(","):
                f = f.strip()
                if f == "all" or not f:
                    continue
                kw = _keyword(f)
                if kw is None:
                    raise DicomwebError(400, "Bad Request", f"includefield names an unknown attribute: {f[:40]!r}.")
                q.include.add(kw)
        elif name == "fuzzymatching":
            q.fuzzy = value.strip().lower() == "true"
        elif name in ("limit", "offset"):
            if not value.isdigit():
                raise DicomwebError(400, "Bad Request", f"{name} must be a non-negative integer.")
            if name == "limit":
                if int(value) > QIDO_MAX_LIMIT:
                    q.warnings.append(f'299 imx "limit reduced to {QIDO_MAX_LIMIT}"')
                q.limit = min(int(value), QIDO_MAX_LIMIT)
            else:
                q.offset = int(value)
        else:
            if "." in name:
                raise DicomwebError(400, "Bad Request", "Matching on attributes inside sequences is not supported.")
            kw = _keyword(name)
            if kw is None:
                raise DicomwebError(400, "Bad Request", f"Unknown attribute {name[:40]!r}: use a DICOM keyword or an 8-digit tag.")
            if kw in SUPPORTED_KEYS[level]:
                q.keys[kw] = value
            else:
                q.include.add(kw)
                if value:
                    q.warnings.append(f'299 imx "{kw} is not supported for matching and was ignored"')
    return q


# -- the router --------------------------------------------------------------------------------------------------
def dicomweb_router(archive: Archive, fast: list[FastRoute] | None = None) -> APIRouter:
    """The DICOMweb routes over ``archive`` (prefix ``/dicomweb``), for authenticated callers;
    the handlers of the one-frame rendered routes are added to ``fast`` (viewer.previews.FastImages)."""
    router = APIRouter(prefix="/dicomweb", dependencies=[Depends(current_user)], tags=["dicomweb"])
    index = archive.index
    settings = archive.settings
    meta_cache = MetadataCache()
    metadata_writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imx-metadata")

    def principal_of(request: Request) -> Principal:
        return request.state.principal  # set by current_user, the router's dependency

    def scope_of(request: Request) -> Scope:
        return principal_of(request).scope

    def audited(request: Request, action: str, found: list[StoredInstance], series: str | None, sop: str | None) -> None:
        """One audit row per caller and target every few minutes (viewer.auth.audit once=True)."""
        if action == "study_viewed":
            kind, target = "study", found[0].study_uid
        else:
            kind, target = ("instance", sop) if sop else ("series", series) if series else ("study", found[0].study_uid)
        audit(request, principal_of(request), action, kind, target, detail={"study": found[0].study_uid}, once=True)

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/dicomweb"

    def study_url(request: Request, study: str) -> str:
        return f"{base_url(request)}/studies/{study}"

    def series_url(request: Request, study: str, series: str) -> str:
        return f"{study_url(request, study)}/series/{series}"

    def instance_url(request: Request, study: str, series: str, sop: str) -> str:
        return f"{series_url(request, study, series)}/instances/{sop}"

    def guarded(fn: Callable[..., Response]) -> Callable[..., Response]:
        """Turn our errors into problem+json; a store outage into 503."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Response:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                return failure(e, fn.__name__)

        return wrapper

    def failure(e: Exception, route: str) -> Response:
        """The problem document for an error of ``route`` (``guarded`` and ``guarded_async``)."""
        if isinstance(e, DicomwebError):
            return problem(e.status, e.title, e.detail, e.headers)
        if isinstance(e, QueryError):
            return problem(400, "Bad Request", str(e))
        if isinstance(e, StoreError):
            return problem(503, "Service Unavailable", "The object store cannot be reached; try again shortly.", {"Retry-After": "10"})
        if isinstance(e, MissingObject):
            event(log, "stored object missing", logging.ERROR, key=str(e))
            return problem(500, "Internal Server Error", "A stored object is missing; the operator should run imx check.")
        # never a stack trace (or a value from a dataset) to the client
        event(log, "dicomweb request failed", logging.ERROR, route=route, error=type(e).__name__)
        return problem(500, "Internal Server Error", "The request failed on the server; the operator can find it in the log.")

    def guarded_async(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """``guarded`` for the handlers that run on the event loop."""

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Response:
            try:
                return await fn(*args, **kwargs)
            except Exception as e:
                return failure(e, fn.__name__)

        return wrapper

    # -- QIDO-RS --------------------------------------------------------------------------------------------------
    def qido(request: Request, level: Level, fixed: dict[str, str]) -> Response:
        _check_accept_json(request)
        for what, uid in fixed.items():
            _check_uid(uid, what)
        q = parse_qido(request, level)
        q.keys.update(fixed)
        rows = search(index, level, q.keys, scope_of(request), fuzzy=q.fuzzy, limit=q.limit + 1, offset=q.offset)
        headers: dict[str, str] = {}
        if len(rows) > q.limit:
            rows = rows[: q.limit]
            q.warnings.append('299 imx "There are additional results that can be requested"')
        if q.warnings:
            headers["Warning"] = ", ".join(q.warnings)
        out = []
        for r in rows:
            attrs: dict[str, Any] = {"SpecificCharacterSet": "ISO_IR 192", **r}
            if level is Level.STUDY:
                attrs.setdefault("ReferringPhysicianName", None)
                attrs["RetrieveURL"] = study_url(request, r["StudyInstanceUID"])
            elif level is Level.SERIES:
                attrs["RetrieveURL"] = series_url(request, r["StudyInstanceUID"], r["SeriesInstanceUID"])
            elif level is Level.IMAGE:
                attrs["RetrieveURL"] = instance_url(request, r["StudyInstanceUID"], r["SeriesInstanceUID"], r["SOPInstanceUID"])
            for kw in q.include:
                attrs.setdefault(kw, None)
            out.append(attributes_json(attrs))
        return json_response(request, out, headers=headers)

    @router.get("/studies")
    @guarded
    def search_studies(request: Request) -> Response:
        """QIDO-RS Search for Studies (PS3.18 10.6.1)."""
        return qido(request, Level.STUDY, {})

    @router.get("/series")
    @guarded
    def search_all_series(request: Request) -> Response:
        """QIDO-RS Search for all Series (PS3.18 10.6.1)."""
        return qido(request, Level.SERIES, {})

    @router.get("/studies/{study}/series")
    @guarded
    def search_study_series(request: Request, study: str) -> Response:
        """QIDO-RS Search for Study's Series."""
        return qido(request, Level.SERIES, {"StudyInstanceUID": study})

    @router.get("/instances")
    @guarded
    def search_all_instances(request: Request) -> Response:
        """QIDO-RS Search for all Instances."""
        return qido(request, Level.IMAGE, {})

    @router.get("/studies/{study}/instances")
    @guarded
    def search_study_instances(request: Request, study: str) -> Response:
        """QIDO-RS Search for Study's Instances."""
        return qido(request, Level.IMAGE, {"StudyInstanceUID": study})

    @router.get("/studies/{study}/series/{series}/instances")
    @guarded
    def search_series_instances(request: Request, study: str, series: str) -> Response:
        """QIDO-RS Search for Study Series' Instances."""
        return qido(request, Level.IMAGE, {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    # -- WADO-RS (PS3.18 10.4) --------------------------------------------------------------------------------------
    def resolve(request: Request, study: str, series: str | None = None, sop: str | None = None) -> list[StoredInstance]:
        _check_uid(study, "Study Instance UID")
        if series is not None:
            _check_uid(series, "Series Instance UID")
        if sop is not None:
            _check_uid(sop, "SOP Instance UID")
        found = instances(index, scope_of(request), study_uid=study, series_uid=series, sop_uids=[sop] if sop else None)
        if not found:
            raise _not_found("instance" if sop else "series" if series else "study")
        return found

    def retrieve(request: Request, found: list[StoredInstance], single: bool) -> Response:
        accept = request.headers.get("accept")
        syntaxes = [negotiate_instance_syntax(accept, i.transfer_syntax) for i in found]
        etag = _etag(found, "dicom:" + ",".join(sorted(set(syntaxes))))
        cache = IMMUTABLE if single else REVALIDATE
        if (hit := _cached(request, etag, cache)) is not None:
            return hit
        if single and syntaxes[0] != found[0].transfer_syntax:
            # transcode before answering, so that a failure is a clean 406 rather than a cut stream
            try:
                data = to_explicit_le(_read_all(archive, found[0]))
            except ValueError as e:
                raise DicomwebError(406, "Not Acceptable", f"This instance cannot be sent in Explicit VR Little Endian: {e}.") from None
            parts = [(f"{DICOM}; transfer-syntax={EXPLICIT_LE}", lambda d=data: [d])]
            return _multipart_response(parts, DICOM, etag, cache)
        # the first object is opened before answering: a store outage is then a clean 503, and
        # only a failure later in a long study can cut the stream short
        first = open_object(archive, found[0]) if syntaxes[0] == found[0].transfer_syntax else None
        parts = []
        for n, (si, ts) in enumerate(zip(found, syntaxes, strict=True)):
            if ts == si.transfer_syntax:
                opened = first if n == 0 else None
                parts.append((f"{DICOM}; transfer-syntax={ts}", lambda si=si, f=opened: _chunks(archive, si, f)))
            else:
                parts.append((f"{DICOM}; transfer-syntax={ts}", lambda si=si: [to_explicit_le(_read_all(archive, si))]))
        return _multipart_response(parts, DICOM, etag, cache)

    @router.get("/studies/{study}")
    @guarded
    def retrieve_study(request: Request, study: str) -> Response:
        """WADO-RS Retrieve Study (PS3.18 10.4.1)."""
        found = resolve(request, study)
        audited(request, "instance_downloaded", found, None, None)
        return retrieve(request, found, False)

    @router.get("/studies/{study}/series/{series}")
    @guarded
    def retrieve_series(request: Request, study: str, series: str) -> Response:
        """WADO-RS Retrieve Series."""
        found = resolve(request, study, series)
        audited(request, "instance_downloaded", found, series, None)
        return retrieve(request, found, False)

    @router.get("/studies/{study}/series/{series}/instances/{sop}")
    @guarded
    def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
        """WADO-RS Retrieve Instance."""
        found = resolve(request, study, series, sop)
        audited(request, "instance_downloaded", found, series, sop)
        return retrieve(request, found, True)

    def keep_metadata(rows: list[tuple[int, str, bytes]]) -> None:
        try:
            index.put_metadata(rows)
        except Exception as e:  # made again on a later request
            event(log, "metadata not kept", logging.WARNING, instances=len(rows), error=type(e).__name__)

    def metadata(request: Request, found: list[StoredInstance], single: bool) -> Response:
        """The instances' DICOM JSON as the index keeps it (made after the ack by the render
        workers, imx/previews.py); made here from the object, and kept, for any without."""
        _check_accept_json(request)
        base = base_url(request)
        etag = _etag(found, "metadata:" + base)  # the BulkDataURIs name this host
        cache = IMMUTABLE if single else REVALIDATE
        if (hit := _cached(request, etag, cache)) is not None:
            return hit
        kept = index.instance_metadata([si.object_key for si in found])
        out = []
        missing: list[tuple[int, str, bytes]] = []
        for si in found:
            iid, packed = kept.get(si.object_key, (None, None))
            if packed is not None:
                encoded = unpack(packed)
            else:
                key = (si.object_key, si.size_bytes)
                encoded = meta_cache.get(key)
                if encoded is None:
                    encoded = encode_metadata(_dataset(archive, si, pixels=False))
                    meta_cache.put(key, encoded)
                if iid is not None:
                    missing.append((iid, si.object_key, pack(encoded)))
            bulk = f"{base}/studies/{si.study_uid}/series/{si.series_uid}/instances/{si.sop_uid}/bulkdata"
            out.append(with_bulk_base(encoded, bulk))
        if missing:  # off the request: a write may wait for the index's lock
            metadata_writer.submit(keep_metadata, missing)
        return json_response(request, b"[" + b",".join(out) + b"]", headers={"ETag": etag, "Cache-Control": cache})

    @router.get("/studies/{study}/metadata")
    @guarded
    def study_metadata(request: Request, study: str) -> Response:
        """WADO-RS Retrieve Study Metadata (PS3.18 10.4.1.1.2)."""
        found = resolve(request, study)
        audited(request, "study_viewed", found, None, None)
        return metadata(request, found, False)

    @router.get("/studies/{study}/series/{series}/metadata")
    @guarded
    def series_metadata(request: Request, study: str, series: str) -> Response:
        """WADO-RS Retrieve Series Metadata."""
        found = resolve(request, study, series)
        audited(request, "study_viewed", found, series, None)
        return metadata(request, found, False)

    @router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
    @guarded
    def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
        """WADO-RS Retrieve Instance Metadata."""
        found = resolve(request, study, series, sop)
        audited(request, "study_viewed", found, series, sop)
        return metadata(request, found, True)

    def pixels(request: Request, si: StoredInstance, numbers: list[int] | None) -> Response:
        mode = negotiate_frames(request.headers.get("accept"), si.transfer_syntax)
        if numbers is not None and si.frames is not None:
            beyond = [n for n in numbers if n > si.frames]
            if beyond:
                raise DicomwebError(404, "Not Found", f"This instance has {si.frames} frame(s); frame {beyond[0]} does not exist.")
        etag = _etag([si], f"frames:{mode.native}:{mode.media}:{numbers}")
        if (hit := _cached(request, etag, IMMUTABLE)) is not None:
            return hit
        ds = _dataset(archive, si, pixels=True)
        wanted = numbers if numbers is not None else list(range(1, _frame_count(ds) + 1))
        got = pixel_frames(ds, wanted, mode)
        if numbers is None and not mode.native:  # bulk data of the whole pixel data: one value
            got = [(got[0][0], b"".join(b for _, b in got))]
        parts = [(ct, lambda b=body: [b]) for ct, body in got]
        return _multipart_response(parts, mode.media, etag, IMMUTABLE)

    @router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
    @guarded
    def retrieve_frames(request: Request, study: str, series: str, sop: str, frames: str) -> Response:
        """WADO-RS Retrieve Frames (PS3.18 10.4.1.1.4)."""
        numbers = _parse_frames(frames)
        found = resolve(request, study, series, sop)
        audited(request, "frame_downloaded", found, series, sop)
        return pixels(request, found[0], numbers)

    @router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}")
    @guarded
    def retrieve_bulkdata(request: Request, study: str, series: str, sop: str, tag: str) -> Response:
        """WADO-RS Retrieve Bulk Data (PS3.18 10.4.1.1.5): the BulkDataURIs of our metadata."""
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
            raise DicomwebError(400, "Bad Request", "Bulk data is addressed by an 8-digit hexadecimal tag.")
        found = resolve(request, study, series, sop)
        audited(request, "frame_downloaded" if int(tag, 16) == PIXEL_DATA else "instance_downloaded", found, series, sop)
        si = found[0]
        number = int(tag, 16)
        if number == PIXEL_DATA:
            return pixels(request, si, None)
        negotiate_frames(request.headers.get("accept"), EXPLICIT_LE)  # octet-stream must be acceptable
        etag = _etag([si], f"bulk:{number:08X}")
        if (hit := _cached(request, etag, IMMUTABLE)) is not None:
            return hit
        ds = _dataset(archive, si, pixels=False)
        elem = ds.get(number)
        if elem is None or elem.VR not in BINARY_VRS or not isinstance(elem.value, bytes | bytearray):
            raise DicomwebError(404, "Not Found", "This instance has no bulk data under that tag.")
        body = bytes(elem.value)
        return _multipart_response([(OCTETS, lambda: [body])], OCTETS, etag, IMMUTABLE)

    # -- STOW-RS (PS3.18 10.5) ------------------------------------------------------------------------------------------
    async def stow(request: Request, study: str | None) -> Response:
        try:
            if study is not None:
                _check_uid(study, "Study Instance UID")
            partner = _stow_partner(request)
            boundary = _stow_boundary(request.headers.get("content-type", ""))
            limit = settings.stow_max_bytes
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise DicomwebError(413, "Content Too Large", f"A store request may carry at most {limit} bytes.")
            if declared is not None and declared.isdigit():
                free = shutil.disk_usage(settings.tmp_dir).free
                if int(declared) * 2 > free:  # the part files, then the de-identified copies
                    raise DicomwebError(507, "Insufficient Storage", "There is not enough disk space for this request now.")
        except DicomwebError as e:
            return problem(e.status, e.title, e.detail, e.headers)
        folder = Path(settings.tmp_dir) / f"stow-{secrets.token_hex(12)}"
        folder.mkdir(mode=0o700)
        try:
            try:
                parts = await _receive_parts(request, boundary, folder, limit)
            except DicomwebError as e:
                return problem(e.status, e.title, e.detail, e.headers)
            if not parts:
                return problem(400, "Bad Request", "The request holds no parts.")
            result = await run_in_threadpool(_store_parts, archive, partner, parts, study)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return _stow_response(request, result)

    def _stow_response(request: Request, result: list[dict[str, Any]]) -> Response:
        referenced, failed, studies = [], [], set()
        for r in result:
            if "failure" in r:
                item: dict[str, Any] = {"FailureReason": r["failure"]}
                if r.get("sop_class"):
                    item["ReferencedSOPClassUID"] = r["sop_class"]
                if r.get("sop_uid"):
                    item["ReferencedSOPInstanceUID"] = r["sop_uid"]
                failed.append(attributes_json(item))
                continue
            item = {"ReferencedSOPClassUID": r["sop_class"], "ReferencedSOPInstanceUID": r["sop_uid"]}
            loc = r.get("where")
            if loc is not None:
                studies.add(loc[0])
                item["RetrieveURL"] = instance_url(request, loc[0], loc[1], r["sop_uid"])
            referenced.append(attributes_json(item))
        body: dict[str, Any] = {}
        if len(studies) == 1:
            body.update(attributes_json({"RetrieveURL": study_url(request, next(iter(studies)))}))
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        if referenced:
            body["00081199"] = {"vr": "SQ", "Value": referenced}
        status = 200 if not failed else 202 if referenced else 409
        return json_response(request, dict(sorted(body.items())), status=status)

    @router.post("/studies")
    async def store_instances(request: Request) -> Response:
        """STOW-RS Store Instances (PS3.18 10.5)."""
        return await stow(request, None)

    @router.post("/studies/{study}")
    async def store_study_instances(request: Request, study: str) -> Response:
        """STOW-RS Store Instances into a study: instances of another study fail (0xA900)."""
        return await stow(request, study)

    # -- rendered and thumbnail (PS3.18 10.4.1.1.3, 8.3.5, 10.7) ---------------------------------------------
    @contextlib.contextmanager
    def preview_errors() -> Iterator[None]:
        """The preview workers' errors (imx/previews.py) as DICOMweb errors."""
        from imx import previews

        try:
            yield
        except previews.NotFound as e:
            raise DicomwebError(404, "Not Found", str(e)) from None
        except previews.Quarantined:
            raise _not_found("instance") from None
        except previews.Unrenderable as e:
            raise DicomwebError(422, "Unprocessable Content", f"The instance cannot be rendered: {e.reason}.") from None
        except previews.Busy as e:
            raise DicomwebError(503, "Service Unavailable", str(e), {"Retry-After": "1"}) from None

    def render_target(
        request: Request, sop: str, frame: int, thumbnail: bool, conditional: bool, found: dict[str, Any] | None = None
    ) -> tuple[Any, RenderParams, Any]:
        """(Previews, parameters, the instance and ETag of the rendering); a 304 (``_NotModified``)
        before any rendering when ``conditional`` and If-None-Match holds the ETag. ``found``: the
        instance's index row when the caller has read it."""
        from imx import previews

        p = render_params(request, thumbnail_size=getattr(settings, "thumbnail_size", 128) if thumbnail else None)
        svc = previews.for_archive(archive)
        target = svc.rendered_etag(sop, frame, window=p.window, size=p.size, fmt=p.fmt, quality=p.quality, found=found)
        if conditional and _not_modified(request, target[1]):
            raise _NotModified(target[1])
        return svc, p, target

    def rendered_image(
        request: Request, si: StoredInstance, frame: int, thumbnail: bool, conditional: bool = True
    ) -> tuple[bytes, str, str]:
        """Render one frame through the preview workers (imx/previews.py), honouring If-None-Match
        by raising a 304 before any rendering."""
        with preview_errors():
            svc, p, target = render_target(request, si.sop_uid, frame, thumbnail, conditional)
            return svc.rendered(si.sop_uid, frame, window=p.window, size=p.size, fmt=p.fmt, quality=p.quality, target=target)

    def image(body: bytes, media: str, etag: str) -> Response:
        return Response(body, media_type=media, headers={"ETag": etag, "Cache-Control": IMMUTABLE, "Vary": "Accept"})

    def not_modified(etag: str) -> Response:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE, "Vary": "Accept"})

    def image_response(request: Request, si: StoredInstance, frame: int, thumbnail: bool) -> Response:
        try:
            return image(*rendered_image(request, si, frame, thumbnail))
        except _NotModified as nm:
            return not_modified(nm.etag)

    async def image_response_async(request: Request, study: str, series: str, sop: str, frame: int) -> Response:
        """One rendered frame from the event loop: the instance checked as ``resolve`` does, with
        one prepared SELECT (``viewer.previews.visible_target``; in a thread with PostgreSQL) whose
        row the renderer takes, the job handed to a render worker without a thread in between
        (``Previews.rendered_async``)."""
        _check_uid(study, "Study Instance UID")
        _check_uid(series, "Series Instance UID")
        _check_uid(sop, "SOP Instance UID")
        scope = scope_of(request)
        found = await off_loop_unless_sqlite(
            archive, lambda: visible_target(index, scope, sop, study_uid=study, series_uid=series)
        )
        if found is None:
            raise _not_found("instance")
        try:
            with preview_errors():
                svc, p, target = render_target(request, sop, frame, False, True, found)
                return image(*await svc.rendered_async(frame, window=p.window, size=p.size, fmt=p.fmt, quality=p.quality, target=target))
        except _NotModified as nm:
            return not_modified(nm.etag)

    def rendered_many(request: Request, found: list[StoredInstance]) -> Response:
        if len(found) > RENDERED_MAX_INSTANCES:
            raise DicomwebError(
                413, "Content Too Large", f"At most {RENDERED_MAX_INSTANCES} instances are rendered at once; ask per series or instance."
            )
        images = [rendered_image(request, si, 1, False, conditional=False) for si in found]
        etag = '"' + hashlib.sha256("".join(t for _, _, t in images).encode()).hexdigest()[:40] + '"'
        parts = [(media, lambda b=body: [b]) for body, media, _ in images]
        return _multipart_response(parts, images[0][1], etag, REVALIDATE)

    @router.get("/studies/{study}/rendered")
    @guarded
    def study_rendered(request: Request, study: str) -> Response:
        """WADO-RS Retrieve Rendered Study: the first frame of each instance, one part each."""
        return rendered_many(request, resolve(request, study))

    @router.get("/studies/{study}/series/{series}/rendered")
    @guarded
    def series_rendered(request: Request, study: str, series: str) -> Response:
        """WADO-RS Retrieve Rendered Series."""
        return rendered_many(request, resolve(request, study, series))

    @guarded_async
    async def instance_rendered_handler(request: Request, groups: tuple[str, ...]) -> Response:
        """WADO-RS Retrieve Rendered Instance (its first frame)."""
        study, series, sop = groups
        return await image_response_async(request, study, series, sop, 1)

    @guarded_async
    async def frame_rendered_handler(request: Request, groups: tuple[str, ...]) -> Response:
        """WADO-RS Retrieve Rendered Frames (one frame)."""
        study, series, sop, frames = groups
        numbers = _parse_frames(frames)
        if len(numbers) != 1:
            raise DicomwebError(400, "Bad Request", "Rendered frames are retrieved one frame at a time.")
        return await image_response_async(request, study, series, sop, numbers[0])

    instance_rendered_path = "/studies/{study}/series/{series}/instances/{sop}/rendered"
    frame_rendered_path = "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered"
    if fast is not None:
        fast += [
            (fast_route(router.prefix + instance_rendered_path), instance_rendered_handler),
            (fast_route(router.prefix + frame_rendered_path), frame_rendered_handler),
        ]

    @router.get(instance_rendered_path)
    async def instance_rendered(request: Request, study: str, series: str, sop: str) -> Response:
        """WADO-RS Retrieve Rendered Instance (its first frame)."""
        return await instance_rendered_handler(request, (study, series, sop))

    @router.get(frame_rendered_path)
    async def frame_rendered(request: Request, study: str, series: str, sop: str, frames: str) -> Response:
        """WADO-RS Retrieve Rendered Frames (one frame)."""
        return await frame_rendered_handler(request, (study, series, sop, frames))

    def series_thumbnail(request: Request, series_uid: str) -> Response:
        from imx import previews

        _rendered_format(request.headers.get("accept"))  # 406 unless an image is acceptable
        try:
            svc = previews.for_archive(archive)
            etag = svc.thumbnail_etag(series_uid)
            if etag is not None and _not_modified(request, etag):
                return Response(status_code=304, headers={"ETag": etag, "Cache-Control": REVALIDATE})
            body, media, etag = svc.series_thumbnail(series_uid)
        except previews.NotFound as e:
            raise DicomwebError(404, "Not Found", str(e)) from None
        except previews.Busy as e:
            raise DicomwebError(503, "Service Unavailable", str(e), {"Retry-After": "1"}) from None
        ranges = parse_accept(request.headers.get("accept"))
        if ranges and not any(r.type in (media, "image/*", "*/*") for r in ranges):
            raise DicomwebError(406, "Not Acceptable", f"Series thumbnails are kept as {media}.")
        return Response(body, media_type=media, headers={"ETag": etag, "Cache-Control": REVALIDATE})

    @router.get("/studies/{study}/thumbnail")
    @guarded
    def study_thumbnail(request: Request, study: str) -> Response:
        """Study thumbnail (PS3.18 10.7): the thumbnail of its first series."""
        first = resolve(request, study)[0]
        return series_thumbnail(request, first.series_uid)

    @router.get("/studies/{study}/series/{series}/thumbnail")
    @guarded
    def series_thumbnail_route(request: Request, study: str, series: str) -> Response:
        """Series thumbnail (PS3.18 10.7)."""
        first = resolve(request, study, series)[0]
        return series_thumbnail(request, first.series_uid)

    @router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
    @guarded
    def instance_thumbnail(request: Request, study: str, series: str, sop: str) -> Response:
        """Instance thumbnail (PS3.18 10.7): its first frame, small."""
        return image_response(request, resolve(request, study, series, sop)[0], 1, True)

    @router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/thumbnail")
    @guarded
    def frame_thumbnail(request: Request, study: str, series: str, sop: str, frames: str) -> Response:
        """Frame thumbnail (PS3.18 10.7)."""
        numbers = _parse_frames(frames)
        if len(numbers) != 1:
            raise DicomwebError(400, "Bad Request", "Thumbnails are of one frame.")
        return image_response(request, resolve(request, study, series, sop)[0], numbers[0], True)

    def _stow_partner(request: Request) -> PartnerRef:
        """Whose instances these are: a partner user's own partner; the partner an admin names."""
        who = principal_of(request)
        if who.role == "partner":
            p = next((x for x in index.partners() if x.id == who.partner_id and x.active), None)
            if p is None:
                raise DicomwebError(403, "Forbidden", "Your hospital is no longer registered as a partner.")
            return PartnerRef.of(p)
        if who.role != "admin":
            raise DicomwebError(403, "Forbidden", "Only an administrator or a partner hospital's user may store instances.")
        name = request.query_params.get("partner") or request.headers.get("x-imx-partner")
        if not name:
            raise DicomwebError(403, "Forbidden", "Name the sending partner: ?partner=NAME or the X-Imx-Partner header.")
        p = index.partner_by_name(name)
        if p is None:
            raise DicomwebError(403, "Forbidden", "No active partner is registered under that name (imx partner add).")
        return PartnerRef.of(p)

    return router


RENDERED_MAX_INSTANCES = 500
RENDERED_FORMATS = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp"}
MAX_VIEWPORT = 4096


class _NotModified(Exception):
    def __init__(self, etag: str) -> None:
        super().__init__(etag)
        self.etag = etag


@dataclass(frozen=True)
class RenderParams:
    window: Any
    size: tuple[int, int] | None
    fmt: str
    quality: int


def _rendered_format(accept: str | None) -> str:
    """The rendered media type the Accept header prefers: JPEG unless PNG or WebP is preferred
    (PS3.18 8.7.4: image/jpeg is the default rendered type)."""
    ranges = parse_accept(accept)
    if not ranges:
        return "jpeg"
    for r in ranges:
        if r.type in RENDERED_FORMATS:
            return RENDERED_FORMATS[r.type]
        if r.type in ("image/*", "*/*"):
            return "jpeg"
    raise DicomwebError(406, "Not Acceptable", "Rendered images are available as image/jpeg, image/png or image/webp.")


def render_params(request: Request, *, thumbnail_size: int | None = None) -> RenderParams:
    """The rendering query parameters of PS3.18 8.3.5.1: window=center,width[,function],
    viewport=vw,vh (a source region is not supported), quality=1..100; and the Accept header."""
    from imaging.render import Window

    q = request.query_params
    fmt = _rendered_format(request.headers.get("accept"))
    window = None
    if (w := q.get("window")) is not None:
        parts = [p.strip() for p in w.split(",")]
        try:
            center, width = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise DicomwebError(400, "Bad Request", "window is center,width[,function], e.g. window=40,400.") from None
        if len(parts) > 2 and parts[2].upper() not in ("LINEAR", ""):
            raise DicomwebError(400, "Bad Request", "Only the LINEAR VOI LUT function is supported in window.")
        if not 0 < width < 1e9 or abs(center) > 1e9:
            raise DicomwebError(400, "Bad Request", "The window width must be positive and both values finite.")
        window = Window(center, width)
    size = (thumbnail_size, thumbnail_size) if thumbnail_size else None
    if (v := q.get("viewport")) is not None:
        parts = [p.strip() for p in v.split(",")]
        if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= MAX_VIEWPORT for p in parts):
            raise DicomwebError(400, "Bad Request", f"viewport is width,height in pixels (1 to {MAX_VIEWPORT}); a source region is not supported.")
        size = (int(parts[0]), int(parts[1]))
    quality = 90
    if (qual := q.get("quality")) is not None:
        if not qual.isdigit() or not 1 <= int(qual) <= 100:
            raise DicomwebError(400, "Bad Request", "quality is a whole number from 1 to 100.")
        quality = int(qual)
    return RenderParams(window, size, fmt, quality)


def _check_accept_json(request: Request) -> None:
    ranges = parse_accept(request.headers.get("accept"))
    if ranges and not any(r.type in (DICOM_JSON, "application/json", "*/*", "application/*") for r in ranges):
        raise DicomwebError(406, "Not Acceptable", f"Search results and metadata are available as {DICOM_JSON}.")


def _stow_boundary(content_type: str) -> str:
    mt = parse_media_type(content_type or "")
    inner = mt.params.get("type", DICOM).lower()
    if mt.type != "multipart/related" or inner != DICOM:
        raise DicomwebError(
            415, "Unsupported Media Type", f'Store requests are multipart/related; type="{DICOM}" (one DICOM file per part).'
        )
    boundary = mt.params.get("boundary")
    if not boundary or len(boundary) > 70:
        raise DicomwebError(400, "Bad Request", "The multipart/related content type has no valid boundary.")
    return boundary


@dataclass
class _Part:
    path: Path
    content_type: str = ""
    size: int = 0


async def _receive_parts(request: Request, boundary: str, folder: Path, limit: int) -> list[_Part]:
    """Spool each part of the body to a private file under ``folder``, refusing (413) a body
    beyond ``limit`` bytes or STOW_MAX_PARTS parts as soon as it gets there."""
    from python_multipart.multipart import MultipartParser

    parts: list[_Part] = []
    state: dict[str, Any] = {"file": None, "field": b"", "value": b"", "error": None, "total": 0}

    def on_part_begin() -> None:
        if len(parts) >= STOW_MAX_PARTS:
            state["error"] = DicomwebError(413, "Content Too Large", f"A store request may carry at most {STOW_MAX_PARTS} instances.")
            return
        path = folder / f"{len(parts):05d}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        state["file"] = os.fdopen(fd, "wb")
        parts.append(_Part(path))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        f = state["file"]
        if f is None or state["error"]:
            return
        try:
            f.write(data[start:end])
        except OSError:
            state["error"] = DicomwebError(507, "Insufficient Storage", "There is not enough disk space for this request now.")
        parts[-1].size += end - start

    def on_part_end() -> None:
        if state["file"] is not None:
            state["file"].close()
            state["file"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["field"].strip().lower() == b"content-type" and parts:
            parts[-1].content_type = state["value"].decode("latin-1").strip()
        state["field"], state["value"] = b"", b""

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    try:
        async for chunk in request.stream():
            state["total"] += len(chunk)
            if state["total"] > limit:
                raise DicomwebError(413, "Content Too Large", f"A store request may carry at most {limit} bytes.")
            try:
                parser.write(chunk)
            except Exception as e:
                raise DicomwebError(400, "Bad Request", "The multipart body cannot be parsed.") from e
            if state["error"] is not None:
                raise state["error"]
        parser.finalize()
    finally:
        if state["file"] is not None:
            state["file"].close()
    return parts


def _store_parts(archive: Archive, partner: PartnerRef, parts: list[_Part], study: str | None) -> list[dict[str, Any]]:
    """Ingest each part through the one ingest path; what the response needs for each."""
    out: list[dict[str, Any]] = []
    for part in parts:
        sop_class = sop_uid = None
        try:
            head = dcmread(part.path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
            sop_class = str(head.get("SOPClassUID", "") or "") or None
            sop_uid = str(head.get("SOPInstanceUID", "") or "") or None
            part_study = str(head.get("StudyInstanceUID", "") or "")
        except Exception:
            part_study = ""
        inner = parse_media_type(part.content_type).type if part.content_type else DICOM
        if inner != DICOM:
            out.append({"failure": FAILURE_CANNOT_UNDERSTAND, "sop_class": sop_class, "sop_uid": sop_uid})
            continue
        if study is not None and part_study != study:
            out.append({"failure": FAILURE_MISMATCH, "sop_class": sop_class, "sop_uid": sop_uid})
            continue
        outcome = archive.ingest_file(partner, part.path, door="stow")
        if not outcome.result.acknowledged:
            out.append({"failure": _FAILURE_BY_RESULT.get(outcome.result, FAILURE_PROCESSING), "sop_class": sop_class, "sop_uid": sop_uid})
            continue
        where = None
        if not outcome.quarantine and outcome.sop_instance_uid:
            found = instances(archive.index, Scope(None), sop_uids=[outcome.sop_instance_uid])
            if found:
                where = (found[0].study_uid, found[0].series_uid)
        out.append({"sop_class": outcome.sop_class_uid, "sop_uid": outcome.sop_instance_uid, "where": where})
    return out
