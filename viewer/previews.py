"""HTTP routes for rendered images: series thumbnails, instance previews, rendered frames.

    GET /api/series/{series_uid}/thumbnail
    GET /api/instances/{sop_uid}/rendered
    GET /api/instances/{sop_uid}/frames/{n}/rendered

Query parameters follow WADO-RS rendered resources (PS3.18 8.3.5.1): ``window=CENTER,WIDTH``,
``viewport=W,H`` (or ``size=WxH``), ``quality`` (1-100), and ``format=png|jpeg|webp`` or the
Accept header (PS3.18 8.3.5.1.1; ``format`` wins). Without any of them, and with an Accept header
that takes JPEG as readily as anything else, the answer is the kept preview (fitted into the
preview size, JPEG), rendered and kept on first use; otherwise the frame is rendered now, in a
render worker with memory and time limits, at its own size unless a viewport is given.

Every route needs an authenticated caller (the app adds ``viewer.auth.current_user``); an instance
or series outside the caller's ``Principal.scope`` answers 404, as one that does not exist.

The image GETs a viewer makes by the hundred (these renders and WADO-RS ``/rendered``) are
answered by ``FastImages`` ahead of FastAPI's router, with the same authentication and the same
handlers as the routes (see there).

Rendered pixels of an instance never change (instances are immutable): those answers carry a
strong ETag (a hash of the instance and the parameters) and ``Cache-Control: private,
max-age=31536000, immutable`` (private: they are behind authentication); ``If-None-Match`` gives 304. A series thumbnail is replaced when the
series grows, so it is revalidated (``no-cache``) and answers 304 while it is the same. Errors
are ``application/problem+json`` (RFC 9457).
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette._utils import get_route_path
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imx import previews as pv
from storage.query import Level, QueryError, Scope, scoped, search
from viewer.auth import current_user

if TYPE_CHECKING:
    from imx.ingest import Archive
    from storage.index import Index

IMMUTABLE = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"
MAX_VIEWPORT = 8192
FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_WINDOW_RE = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*$")
_SIZE_RE = re.compile(r"^\s*(\d{1,6})\s*[x,X]\s*(\d{1,6})\s*$")


class BadParameter(ValueError):
    pass


class NotAcceptable(ValueError):
    pass


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
        headers=headers,
    )


def _window(value: str | None) -> object | None:
    if value is None:
        return None
    m = _WINDOW_RE.match(value)
    if not m:
        raise BadParameter("window must be CENTER,WIDTH (two numbers), e.g. window=40,400")
    center, width = float(m.group(1)), float(m.group(2))
    if not width > 0 or abs(center) > 1e9 or width > 1e9:
        raise BadParameter("the window width must be a positive number and both values finite")
    from imaging.render import Window

    return Window(center, width)


def _viewport(size: str | None, viewport: str | None) -> tuple[int, int] | None:
    if size is not None and viewport is not None:
        raise BadParameter("give either size or viewport, not both")
    value = size if size is not None else viewport
    if value is None:
        return None
    if viewport is not None:  # PS3.18 8.3.5.1.3: vw,vh (a source region is not supported)
        parts = [p.strip() for p in viewport.split(",")]
        if len(parts) != 2:
            raise BadParameter(
                "viewport must be WIDTH,HEIGHT, e.g. viewport=512,512 (no source region)"
            )
        value = f"{parts[0]}x{parts[1]}"
    m = _SIZE_RE.match(value)
    if not m:
        raise BadParameter("size must be WIDTHxHEIGHT in pixels, e.g. size=256x256")
    w, h = int(m.group(1)), int(m.group(2))
    if not (1 <= w <= MAX_VIEWPORT and 1 <= h <= MAX_VIEWPORT):
        raise BadParameter(f"width and height must be between 1 and {MAX_VIEWPORT}")
    return w, h


def _quality(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        q = int(value)
    except ValueError:
        raise BadParameter("quality must be a whole number from 1 to 100") from None
    if not 1 <= q <= 100:
        raise BadParameter("quality must be a whole number from 1 to 100")
    return q


def _accept(header: str | None) -> str | None:
    """The format the Accept header prefers (RFC 9110 12.5.1: the most specific range decides a
    media type's weight); None when JPEG, the kept previews' format, is among the preferred.
    Raises BadParameter if it takes none of ours."""
    if not header or not header.strip():
        return None
    ranges: dict[str, float] = {}
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        ranges[fields[0].lower()] = q
    weights: dict[str, float] = {}
    for fmt, media in pv.MEDIA_TYPES.items():
        for candidate in (media, "image/*", "*/*"):
            if candidate in ranges:
                weights[fmt] = ranges[candidate]
                break
    best = {f: w for f, w in weights.items() if w > 0}
    if not best:
        raise NotAcceptable("the Accept header takes none of image/jpeg, image/png, image/webp")
    top = max(best.values())
    if best.get(pv.DEFAULT_FORMAT) == top:
        return None
    return next(f for f in ("png", "webp") if best.get(f) == top)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (or is ``*``): weak tags compare too
    (RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = [t.strip() for t in if_none_match.split(",")]
    return any((t[2:] if t.startswith("W/") else t) == etag for t in tags)


def _image(body: bytes, media_type: str, etag: str, cache: str) -> Response:
    return Response(
        body,
        media_type=media_type,
        headers={"ETag": etag, "Cache-Control": cache, "Vary": "Accept"},
    )


def _not_modified(etag: str, cache: str) -> Response:
    return Response(
        status_code=304, headers={"ETag": etag, "Cache-Control": cache, "Vary": "Accept"}
    )


def _guarded(fn: Callable[[], Response]) -> Response:
    """Map the preview errors to problem documents."""
    try:
        return fn()
    except BadParameter as e:
        return problem(422, "Bad parameter", str(e))
    except NotAcceptable as e:
        return problem(406, "Not acceptable", str(e))
    except pv.NotFound as e:
        return problem(404, "Not found", str(e))
    except pv.Quarantined as e:
        return problem(403, "Held back", str(e))
    except pv.Unrenderable as e:
        return problem(422, "Unrenderable instance", f"the instance cannot be rendered: {e.reason}")
    except pv.Busy as e:
        return problem(503, "Busy", str(e), {"Retry-After": "1"})


async def _guarded_async(fn: Callable[[], Awaitable[Response]]) -> Response:
    """``_guarded`` for the routes that run on the event loop."""
    try:
        return await fn()
    except (BadParameter, NotAcceptable, pv.PreviewError) as e:
        return _guarded(functools.partial(_reraise, e))


def _reraise(e: Exception) -> Response:
    raise e


# -- the hot path ----------------------------------------------------------------------------
FastHandler = Callable[[Request, tuple[str, ...]], Awaitable[Response]]
FastRoute = tuple["re.Pattern[str]", FastHandler]


class FastImages:
    """ASGI middleware answering the image GETs of ``routes`` (a path pattern, matched whole, and
    the handler the router's route calls with the pattern's groups) before FastAPI's router: a
    viewer asks for hundreds of them, and linear matching over every route, dependency solving
    and their wrappers cost about 0.7 ms per request (a warm render takes 1 ms).

    What a caller gets is what the route gives: the same authentication
    (``viewer.auth.current_user``: the same 401, 403 and 429, made by the app's handler for
    HTTPException), then the same handler. Everything else goes on to the app. The app adds it
    inside ``viewer.ui.SecurityHeaders``, so these answers carry the security headers too."""

    PREFIXES = ("/api/instances/", "/dicomweb/studies/")

    def __init__(self, app: Any, routes: Sequence[FastRoute]) -> None:
        self.app = app
        self.routes = list(routes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = get_route_path(scope)
            if path.startswith(self.PREFIXES):
                for pattern, handler in self.routes:
                    m = pattern.fullmatch(path)
                    if m is not None:
                        response = await self._answer(scope, receive, handler, m.groups())
                        await response(scope, receive, send)
                        return
        await self.app(scope, receive, send)

    @staticmethod
    async def _answer(
        scope: Any, receive: Any, handler: FastHandler, groups: tuple[str, ...]
    ) -> Response:
        request = Request(scope, receive)
        try:
            await current_user(request)
        except StarletteHTTPException as e:
            handlers = getattr(scope.get("app"), "exception_handlers", {})
            on_error = handlers.get(StarletteHTTPException) or handlers.get(HTTPException)
            return await (on_error or http_exception_handler)(request, e)
        return await handler(request, groups)


def route(pattern: str) -> re.Pattern[str]:
    """A FastImages path pattern from a route path: each ``{name}`` matches one path segment,
    as in Starlette's routing."""
    return re.compile(re.sub(r"\{[a-z_]+\}", "([^/]+)", pattern))


_VISIBLE_STATEMENTS: OrderedDict[tuple[Scope, bool, bool], Any] = OrderedDict()
_VISIBLE_MAX = 1024


def _visible_statement(scope: Scope, study: bool, series: bool) -> Any:
    """The SELECT of ``visible_target``, built once per scope and shape (building one costs as
    much as running it)."""
    key = (scope, study, series)
    q = _VISIBLE_STATEMENTS.get(key)
    if q is None:
        from sqlalchemy import bindparam

        from storage.index import Instance, Series, Study, target_select

        q = (
            target_select()
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Instance.sop_uid == bindparam("sop"), Instance.quarantine.is_(None))
        )
        if study:
            q = q.where(Study.study_uid == bindparam("study"))
        if series:
            q = q.where(Series.series_uid == bindparam("series"))
        q = scoped(q, scope).limit(1)
        _VISIBLE_STATEMENTS[key] = q
        while len(_VISIBLE_STATEMENTS) > _VISIBLE_MAX:
            _VISIBLE_STATEMENTS.popitem(last=False)
    return q


def visible_target(
    index: Index,
    scope: Scope,
    sop_uid: str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> dict[str, Any] | None:
    """The instance as the preview functions take it (``Index.preview_target``'s row) when a
    retrieve by this caller sends it (``storage.query.instances``: not quarantined, within
    ``scope`` through ``storage.query.scoped``) and it is of the given study and series; else
    None. One prepared Core SELECT (0.07 ms against 0.33 ms for ``instances``), which also saves
    the renderer looking the instance up again."""
    if len(sop_uid) > 64 or len(study_uid or "") > 64 or len(series_uid or "") > 64:
        return None
    q = _visible_statement(scope, study_uid is not None, series_uid is not None)
    params = {"sop": sop_uid, "study": study_uid, "series": series_uid}
    with index.engine.connect() as conn:
        row = conn.execute(q, {k: v for k, v in params.items() if v is not None}).first()
    return index.target_of(row) if row is not None else None


async def off_loop_unless_sqlite(archive: Archive, fn: Callable[[], Any]) -> Any:
    """``fn()`` (an index read) on the event loop with SQLite (a local read of a few rows takes
    tens of microseconds), in a thread with PostgreSQL (a network round trip), as
    ``viewer.auth.Auth.current_user`` does."""
    if archive.index.is_sqlite:
        return fn()
    return await run_in_threadpool(fn)


def router(archive: Archive, fast: list[FastRoute] | None = None) -> APIRouter:
    """The routes above, for ``archive`` (its Previews: ``imx.previews.for_archive``); the
    rendered images' handlers are added to ``fast`` for ``FastImages``."""
    r = APIRouter()

    def service() -> pv.Previews:
        return pv.for_archive(archive)

    def check_series_scope(request: Request, series_uid: str) -> None:
        """404 unless the caller's scope holds the series (admins: no query)."""
        scope: Scope = request.state.principal.scope
        if scope == Scope(None):
            return
        try:
            ok = (
                bool(series_uid)
                and len(series_uid) <= 64
                and bool(search(archive.index, Level.SERIES, {"SeriesInstanceUID": series_uid}, scope, limit=1))
            )
        except QueryError:
            ok = False
        if not ok:
            raise pv.NotFound("no such instance or series")

    def render_params(
        request: Request,
    ) -> tuple[str | None, object | None, tuple[int, int] | None, int | None]:
        """(format, window, viewport, quality) asked for; all None: the kept preview."""
        q = request.query_params
        fmt_param = q.get("format")
        if fmt_param is not None and fmt_param.lower() not in FORMATS:
            raise BadParameter("format must be png, jpeg or webp")
        accept_fmt = _accept(request.headers.get("accept")) if fmt_param is None else None
        window = _window(q.get("window"))
        size = _viewport(q.get("size"), q.get("viewport"))
        quality = _quality(q.get("quality"))
        fmt = FORMATS[fmt_param.lower()] if fmt_param else accept_fmt
        return fmt, window, size, quality

    def kept_preview(
        request: Request, sop_uid: str, frame: int, found: dict[str, Any] | None
    ) -> Response:
        svc = service()
        target, tag = svc.preview_etag(sop_uid, frame, found=found)
        if tag is not None and etag_matches(request.headers.get("if-none-match"), tag):
            return _not_modified(tag, IMMUTABLE)
        body, media, tag = svc.preview(sop_uid, frame, target=target)
        return _image(body, media, tag, IMMUTABLE)

    async def instance_image(request: Request, sop_uid: str, frame: int) -> Response:
        """The kept preview (read from the store in a thread), or a render now: the job goes to
        a render worker straight from the event loop (``Previews.rendered_async``). A caller
        with a narrower scope than an admin's gets 404 for an instance outside it; the scoped
        look-up's row is the instance the renderer takes (no second look-up)."""
        scope: Scope = request.state.principal.scope
        found = None
        if scope != Scope(None):
            found = await off_loop_unless_sqlite(
                archive, lambda: visible_target(archive.index, scope, sop_uid)
            )
            if found is None:
                raise pv.NotFound("no such instance or series")
        fmt, window, size, quality = render_params(request)
        if window is None and size is None and quality is None and fmt is None:
            return await run_in_threadpool(kept_preview, request, sop_uid, frame, found)
        fmt = fmt or pv.DEFAULT_FORMAT
        quality = quality if quality is not None else pv.DEFAULT_QUALITY
        svc = service()
        resolved = await off_loop_unless_sqlite(
            archive,
            lambda: svc.rendered_etag(
                sop_uid, frame, window=window, size=size, fmt=fmt, quality=quality, found=found
            ),
        )
        if etag_matches(request.headers.get("if-none-match"), resolved[1]):
            return _not_modified(resolved[1], IMMUTABLE)
        body, media, tag = await svc.rendered_async(
            frame, window=window, size=size, fmt=fmt, quality=quality, target=resolved
        )
        return _image(body, media, tag, IMMUTABLE)

    async def instance_handler(request: Request, groups: tuple[str, ...]) -> Response:
        (sop_uid,) = groups
        return await _guarded_async(lambda: instance_image(request, sop_uid, 1))

    async def frame_handler(request: Request, groups: tuple[str, ...]) -> Response:
        sop_uid, n = groups

        async def run() -> Response:
            if not n.isdigit() or not 1 <= int(n) <= 10_000_000:
                raise BadParameter("the frame number must be a whole number from 1")
            return await instance_image(request, sop_uid, int(n))

        return await _guarded_async(run)

    instance_path = "/api/instances/{sop_uid}/rendered"
    frame_path = "/api/instances/{sop_uid}/frames/{n}/rendered"
    if fast is not None:
        fast += [(route(instance_path), instance_handler), (route(frame_path), frame_handler)]

    @r.get(instance_path)
    async def instance_rendered(sop_uid: str, request: Request) -> Response:
        return await instance_handler(request, (sop_uid,))

    @r.get(frame_path)
    async def frame_rendered(sop_uid: str, n: str, request: Request) -> Response:
        return await frame_handler(request, (sop_uid, n))

    @r.get("/api/series/{series_uid}/thumbnail")
    def thumbnail(series_uid: str, request: Request) -> Response:
        def run() -> Response:
            check_series_scope(request, series_uid)
            svc = service()
            tag = svc.thumbnail_etag(series_uid)
            if tag is not None and etag_matches(request.headers.get("if-none-match"), tag):
                return _not_modified(tag, REVALIDATE)
            body, media, tag = svc.series_thumbnail(series_uid)
            return _image(body, media, tag, REVALIDATE)

        return _guarded(run)

    return r
