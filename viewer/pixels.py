"""HTTP routes of the image viewer: per-series viewer metadata and lossless packed frames.

    GET /api/viewer/series/{study_uid}/{series_uid}
        {"instances": [{sop_uid, number, frames, rows, columns, photometric, color, pixel_spacing,
        spacing_source, calibrated, windows, voi_function, slope, intercept, offset, bits, invert,
        orientation, position, ...}]} in display order (position along the slice normal, else
        Instance Number), from ``imaging.pixels.viewer_metadata``.
    GET /api/viewer/study/{study_uid}
        {"series": [{series_uid, modality, number, description, instances: [...as above]}]}: the
        whole study in one answer, so the viewer starts with one round trip on a slow link.
    GET /api/viewer/first/{study_uid}?quality=50
        The quick lossy frame (WebP) of the slice the viewer opens with, requested together with
        the study's metadata (headers X-Imx-Series, X-Imx-Sop, X-Imx-Frame name it).
    GET /api/pixels/{study_uid}/{series_uid}/{sop_uid}/{frame}
        The frame's values packed losslessly into an 8-bit RGB PNG (``imaging.pixels``), with the
        parameters to read them back in ``X-Imx-*`` headers.

Both need an authenticated caller and see only what the caller's scope allows, through the one
query layer (``storage.query.instances``): anything else is 404, as if it did not exist. Frames are
packed in the render workers (``imx.previews.RenderPool``: memory and time limits), never in the
HTTP process. A frame's pixels never change (instances are immutable; a re-sent object gets a new
object key), so frames carry a strong ETag and ``Cache-Control: private, max-age=31536000,
immutable``; the series list can grow, so it is revalidated (``private, no-cache``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from imx import previews as pv
from imx.logs import event
from storage.query import StoredInstance, instances
from viewer.auth import CurrentUser, Principal
from viewer.previews import etag_matches

if TYPE_CHECKING:
    from imx.ingest import Archive

log = logging.getLogger("imx.viewer")

IMMUTABLE = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"
PIXELS_VERSION = 2  # part of every ETag: bump it when the packing changes (2: VOI LUT tables)
MAX_FRAME = 10_000_000
META_CACHE_ENTRIES = 50_000


def _etag(*parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in (PIXELS_VERSION, *parts)).encode()).hexdigest()
    return f'"{h[:40]}"'


class _MetaCache:
    """Viewer metadata per stored object key (objects never change under their key)."""

    def __init__(self, entries: int = META_CACHE_ENTRIES) -> None:
        self._d: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.entries = entries

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.entries:
                self._d.popitem(last=False)


def _sort_key(m: dict[str, Any]) -> float:
    number = m.get("number")
    return float(number) if number is not None else 0.0


def _ordered(metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Display order: along the slice normal when every instance has a position, in the
    direction Instance Number runs (scanners number from the first slice acquired), else by
    Instance Number."""
    if metas and all(m.get("position") is not None for m in metas):
        by_number = sorted(metas, key=_sort_key)
        ordered = sorted(metas, key=lambda m: m["position"])
        if by_number and ordered[0] is not by_number[0] and ordered[-1] is by_number[0]:
            ordered.reverse()
        return ordered
    return sorted(metas, key=_sort_key)


def pixels_router(archive: Archive) -> APIRouter:
    """The routes above, for ``archive``."""
    from imaging.pixels import pack_job, viewer_metadata, viewer_metadata_from_json

    r = APIRouter(tags=["viewer"])
    cache = _MetaCache()

    def audit(request: Request, principal: Principal, action: str, study_uid: str) -> None:
        try:
            from viewer.auth import audit as write

            write(request, principal, action, "study", study_uid, once=True)
        except Exception as e:  # the image is still served; the failure is logged
            event(log, "audit not written", logging.WARNING, action=action, error=type(e).__name__)

    def scoped(principal: Principal, study_uid: str, series_uid: str | None, sop_uid: str | None = None) -> list[StoredInstance]:
        found = instances(
            archive.index,
            principal.scope,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uids=[sop_uid] if sop_uid is not None else None,
        )
        if not found:
            raise HTTPException(404, "No such series or instance, or it is not shared with you.")
        return found

    def from_kept(packed: bytes) -> dict[str, Any] | None:
        from imaging.dicomjson import unpack

        try:
            return viewer_metadata_from_json(json.loads(unpack(packed)))
        except Exception:
            return None

    def from_object(si: StoredInstance) -> dict[str, Any]:
        from pydicom import dcmread

        try:
            with archive.open_stored(si.object_key, si.location) as f:
                ds = dcmread(f, stop_before_pixels=True)
            return viewer_metadata(ds)
        except KeyError:
            raise HTTPException(404, "The stored object is missing; an operator should run imx check.") from None
        except Exception as e:  # counted as "unshown"; the reason is named by type only
            return {"sop_uid": si.sop_uid, "error": type(e).__name__}

    def metadata_of(found: list[StoredInstance]) -> list[dict[str, Any]]:
        """Viewer metadata of each instance that can be shown (cache, then the metadata the index
        keeps, then the object's header)."""
        metas: list[dict[str, Any]] = []
        missing = []
        for si in found:
            m = cache.get(si.object_key)
            if m is None:
                missing.append(si)
            else:
                metas.append(m)
        if missing:
            kept: dict[str, tuple[int, bytes | None]] = {}
            get_kept = getattr(archive.index, "instance_metadata", None)
            if get_kept is not None:
                try:
                    kept = get_kept([si.object_key for si in missing])
                except Exception:
                    kept = {}
            for si in missing:
                packed = kept.get(si.object_key, (0, None))[1]
                m = from_kept(packed) if packed is not None else None
                if m is None:
                    m = from_object(si)
                m["sop_uid"], m["series_uid"] = si.sop_uid, si.series_uid
                if "error" not in m:
                    cache.put(si.object_key, m)
                metas.append(m)
        return [m for m in metas if "error" not in m]

    def json_answer(request: Request, body: dict[str, Any], etag: str) -> Response:
        """JSON, gzipped when the client takes it (a 100-slice series: 60 kB plain, ~6 kB
        gzipped, half a second less at 1 Mbit/s)."""
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"ETag": etag, "Cache-Control": REVALIDATE, "Vary": "Accept-Encoding"}
        if len(data) > 1024 and "gzip" in request.headers.get("accept-encoding", "").lower():
            data = gzip.compress(data, 6)
            headers["Content-Encoding"] = "gzip"
        return Response(data, media_type="application/json", headers=headers)

    def unchanged(request: Request, etag: str) -> Response | None:
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": REVALIDATE})
        return None

    @r.get("/api/viewer/series/{study_uid}/{series_uid}")
    def series(study_uid: str, series_uid: str, request: Request, principal: CurrentUser) -> Response:
        found = scoped(principal, study_uid, series_uid)
        etag = _etag("series", *(si.object_key for si in found))
        audit(request, principal, "study_viewed", study_uid)
        if (hit := unchanged(request, etag)) is not None:
            return hit
        shown = metadata_of(found)
        body = {"study_uid": study_uid, "series_uid": series_uid, "instances": _ordered(shown), "unshown": len(found) - len(shown)}
        return json_answer(request, body, etag)

    def study_series(found: list[StoredInstance]) -> tuple[list[dict[str, Any]], int]:
        """The study's series with their instances' metadata, in Series Number order; and how
        many instances cannot be shown."""
        shown = metadata_of(found)
        groups: dict[str, list[dict[str, Any]]] = {}
        for si in found:
            groups.setdefault(si.series_uid, [])
        for m in shown:
            groups.setdefault(m["series_uid"], []).append(m)
        out = []
        for series_uid, metas in groups.items():
            if not metas:
                continue
            first = metas[0]
            out.append({
                "series_uid": series_uid,
                "modality": first.get("modality", ""),
                "number": first.get("series_number"),
                "description": first.get("series_description", ""),
                "instances": _ordered(metas),
            })
        out.sort(key=lambda s: (s["number"] is None, s["number"] or 0))
        return out, len(found) - len(shown)

    @r.get("/api/viewer/study/{study_uid}")
    def study(study_uid: str, request: Request, principal: CurrentUser) -> Response:
        """Every series of a study with its instances' viewer metadata: one round trip to start
        the viewer on a slow link."""
        found = scoped(principal, study_uid, None)
        etag = _etag("study", *(si.object_key for si in found))
        audit(request, principal, "study_viewed", study_uid)
        if (hit := unchanged(request, etag)) is not None:
            return hit
        series_list, unshown = study_series(found)
        return json_answer(request, {"study_uid": study_uid, "series": series_list, "unshown": unshown}, etag)

    @r.get("/api/viewer/first/{study_uid}")
    def first_frame(study_uid: str, request: Request, principal: CurrentUser) -> Response:
        """The quick lossy frame (WebP) of the slice the viewer opens a study with -- the first
        slice of its largest series, as viewer/static/viewer/boot.js chooses -- asked for together
        with the study's metadata, so the first image costs no extra round trip. Headers
        X-Imx-Series, X-Imx-Sop and X-Imx-Frame say which frame it is."""
        q = request.query_params.get("quality", "50")
        if not q.isdigit() or not 1 <= int(q) <= 100:
            raise HTTPException(422, "quality is a whole number from 1 to 100.")
        found = scoped(principal, study_uid, None)
        series_list, _ = study_series(found)
        if not series_list:
            raise HTTPException(404, "The study has no image that can be shown.")
        largest = series_list[0]
        for s in series_list[1:]:
            if len(s["instances"]) > len(largest["instances"]):
                largest = s
        inst = largest["instances"][0]
        audit(request, principal, "frame_downloaded", study_uid)
        try:
            body, media, tag = pv.for_archive(archive).rendered(
                inst["sop_uid"], 1, window=None, size=None, fmt="webp", quality=int(q)
            )
        except (pv.NotFound, pv.Quarantined) as e:
            raise HTTPException(404, str(e)) from None
        except pv.Unrenderable as e:
            raise HTTPException(422, f"The frame cannot be shown: {e.reason}") from None
        except pv.Busy as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        headers = {
            "Cache-Control": REVALIDATE,
            "X-Imx-Series": largest["series_uid"],
            "X-Imx-Sop": inst["sop_uid"],
            "X-Imx-Frame": "1",
        }
        return Response(body, media_type=media, headers=headers)

    @r.get("/api/pixels/{study_uid}/{series_uid}/{sop_uid}/{frame}")
    def frame_pixels(
        study_uid: str, series_uid: str, sop_uid: str, frame: str, request: Request, principal: CurrentUser
    ) -> Response:
        if not frame.isdigit() or not 1 <= int(frame) <= MAX_FRAME:
            raise HTTPException(422, "The frame number must be a whole number from 1.")
        n = int(frame)
        (si,) = scoped(principal, study_uid, series_uid, sop_uid)
        if si.frames is not None and n > si.frames:
            raise HTTPException(404, f"Frame {n} does not exist: the instance has {si.frames}.")
        etag = _etag("pixels", si.object_key, n)
        audit(request, principal, "frame_downloaded", study_uid)
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
        svc = pv.for_archive(archive)
        try:
            source = pv.object_for_worker(archive, si.object_key, si.location)
        except pv.Unrenderable as e:
            raise HTTPException(404, f"The frame cannot be shown: {e}.") from None
        except pv.Busy as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        try:
            packed = svc.pool.call(pack_job, source, n, svc.budget)
        except pv.JobFailed as e:
            raise HTTPException(422, f"The frame cannot be shown: {e.reason}") from None
        except pv.Busy as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE, **packed.headers()}
        return Response(packed.png, media_type="image/png", headers=headers)

    return r
