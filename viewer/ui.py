"""The web UI shell: HTML pages, static files and the browser-facing security headers.

Everything the browser runs is served here (hospital networks may not reach a CDN): plain HTML
pages, ES modules and CSS from ``viewer/static``, with no bundler. Static URLs carry a version
query (``?v=<hash of the file set>``) so they can be cached as immutable (RFC 8246); the version is
inserted into the pages' ``src``/``href`` attributes and into the modules' relative imports when
they are served, so a deployment never mixes old and new modules.

Pages other than ``/login`` need a logged-in caller; an anonymous one is sent (303) to
``/login?next=...``. Data come from the JSON API, which checks access on each request: the pages
themselves hold nothing but markup.
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response

STATIC_DIR = Path(__file__).parent / "static"
PAGES_DIR = STATIC_DIR / "pages"
VIEWER_PAGE = STATIC_DIR / "viewer" / "viewer.html"

# CSP (W3C Content Security Policy Level 3): nothing but this origin, no inline scripts, images
# also from blob: and data: URLs (decoded frames, thumbnails made in the browser).
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
PEOPLE = ("admin", "specialist", "partner")  # roles of logged-in users (not share links)
IMMUTABLE = "public, max-age=31536000, immutable"
_COMPRESSIBLE = {"application/javascript", "text/javascript", "application/json", "image/svg+xml"}
PAGE_CACHE = "no-cache"  # pages revalidate, so a new deployment's version query is picked up

mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("application/json", ".json")

# relative module specifiers in `import ... from "./x.js"`, `import "./x.js"` and `import("./x.js")`
_JS_IMPORT = re.compile(r"""((?:\bfrom|\bimport)\s*\(?\s*)(["'])(\.{1,2}/[^"'?#]+\.js)\2""")
# /static/... URLs in src= and href= attributes of HTML
_HTML_STATIC = re.compile(r"""((?:src|href)=)(["'])(/static/[^"'?#]+)\2""")


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str
    # text files, compressed once: on a 1 Mbit/s link they take a third of the time
    gzipped: bytes | None = None

    def negotiate(self, accept_encoding: str) -> tuple[bytes, dict[str, str]]:
        """The body to send for ``accept_encoding``, and the headers that go with it."""
        if self.gzipped is not None and "gzip" in accept_encoding.lower():
            return self.gzipped, {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        return self.body, ({"Vary": "Accept-Encoding"} if self.gzipped is not None else {})


class StaticFiles:
    """The files under ``viewer/static``, read once, with version queries put in."""

    def __init__(self, root: Path = STATIC_DIR) -> None:
        self.root = root.resolve()
        self.version = self._version()
        self._cache: dict[str, StaticFile] = {}

    def _version(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self.root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(self.root)).encode() + b"\0" + p.read_bytes() + b"\0")
        return h.hexdigest()[:12]

    def versioned(self, text: str, kind: str) -> str:
        """``text`` with ``?v=<version>`` added to its static URLs (kind: "html" or "js")."""
        if kind == "html":
            return _HTML_STATIC.sub(lambda m: f"{m[1]}{m[2]}{m[3]}?v={self.version}{m[2]}", text)
        return _JS_IMPORT.sub(lambda m: f"{m[1]}{m[2]}{m[3]}?v={self.version}{m[2]}", text)

    def get(self, rel: str) -> StaticFile | None:
        """The file at ``rel`` (relative to the static folder), or None if there is none there."""
        hit = self._cache.get(rel)
        if hit is not None:
            return hit
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        body = path.read_bytes()
        if path.suffix in (".js", ".mjs"):
            body = self.versioned(body.decode("utf-8"), "js").encode("utf-8")
        elif path.suffix == ".html":
            body = self.versioned(body.decode("utf-8"), "html").encode("utf-8")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media_type.startswith("text/") or media_type == "application/json":
            media_type += "; charset=utf-8"
        compressible = media_type.startswith("text/") or media_type.split(";")[0] in _COMPRESSIBLE
        found = StaticFile(
            body,
            media_type,
            '"' + hashlib.sha256(body).hexdigest()[:20] + '"',
            gzip.compress(body, compresslevel=9, mtime=0)
            if compressible and len(body) > 512
            else None,
        )
        self._cache[rel] = found
        return found


def _safe_next(value: str | None) -> str:
    """A local path to go to after login (never another site: no scheme, no ``//host``)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def ui_router(files: StaticFiles) -> APIRouter:
    """Routes of the pages and of ``/static``."""
    router = APIRouter(include_in_schema=False)

    def page(
        request: Request, path: Path, *, open_: bool = False, roles: tuple[str, ...] = PEOPLE
    ) -> Response:
        if not open_:
            principal = request.app.state.auth.authenticate(request)
            # a share link opens the viewer of its study and nothing else: elsewhere, log in
            if principal is None or (principal.role == "share" and "share" not in roles):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            if principal.role not in roles:
                return RedirectResponse("/", status_code=303)
        found = files.get(str(path.relative_to(files.root)))
        if found is None:
            return Response("This page is not installed.", status_code=404, media_type="text/plain")
        body, encoding = found.negotiate(request.headers.get("accept-encoding", ""))
        return Response(
            body, media_type=found.media_type, headers={"Cache-Control": PAGE_CACHE, **encoding}
        )

    @router.get("/login")
    def login_page(request: Request) -> Response:
        return page(request, PAGES_DIR / "login.html", open_=True)

    @router.get("/")
    def worklist_page(request: Request) -> Response:
        return page(request, PAGES_DIR / "worklist.html")

    @router.get("/consultations/new")
    def new_consultation_page(request: Request) -> Response:
        return page(request, PAGES_DIR / "studies.html", roles=("admin", "partner"))

    @router.get("/consultations/{consultation_id}")
    def consultation_page(request: Request, consultation_id: int) -> Response:
        return page(request, PAGES_DIR / "consultation.html")

    @router.get("/studies")
    def studies_page(request: Request) -> Response:
        return page(request, PAGES_DIR / "studies.html", roles=("admin", "partner", "specialist"))

    @router.get("/admin/users")
    def users_page(request: Request) -> Response:
        return page(request, PAGES_DIR / "users.html", roles=("admin",))

    @router.get("/admin/audit")
    def audit_page(request: Request) -> Response:
        return page(request, PAGES_DIR / "audit.html", roles=("admin",))

    @router.get("/admin")
    def admin_page() -> Response:
        return RedirectResponse("/studies", status_code=303)

    @router.get("/viewer")
    def viewer_page(request: Request) -> Response:
        return page(request, VIEWER_PAGE, roles=(*PEOPLE, "share"))

    @router.get("/favicon.ico")
    def favicon() -> Response:
        found = files.get("favicon.svg")
        assert found is not None
        return Response(
            found.body,
            media_type="image/svg+xml",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    @router.get("/static/{rel:path}")
    def static(rel: str, request: Request) -> Response:
        found = files.get(rel)
        if found is None:
            return Response("No such file.", status_code=404, media_type="text/plain")
        # immutable only when the URL names this version: an old page asking for an old version
        # gets today's file, but must not keep it for a year
        cache = IMMUTABLE if request.query_params.get("v") == files.version else PAGE_CACHE
        body, encoding = found.negotiate(request.headers.get("accept-encoding", ""))
        headers = {"Cache-Control": cache, "ETag": found.etag, **encoding}
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=found.media_type, headers=headers)

    return router


def _without_basic(value: bytes) -> bytes:
    """A WWW-Authenticate value without its Basic challenge (``Basic realm="x", Bearer ...``)."""
    parts = re.split(rb",\s*(?=[A-Za-z]+\s)", value)
    kept = [p for p in parts if not p.strip().lower().startswith(b"basic")]
    return b", ".join(kept) or b'Bearer realm="imaging-exchange"'


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response that lacks them.

    It also keeps browsers from showing their own password dialog: a 401 answering a script's
    request (``fetch``: ``Sec-Fetch-Mode`` other than ``navigate``, Fetch Metadata) loses its
    ``Basic`` challenge (RFC 7617), which browsers answer with a native prompt; the page's own
    code sends the user to /login instead. Tools that use Basic send no Fetch Metadata, so they
    still get the challenge."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        mode = next((v for k, v in scope.get("headers", ()) if k == b"sec-fetch-mode"), None)
        from_script = mode is not None and mode != b"navigate"

        async def send_with_headers(message) -> None:  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if from_script and message.get("status") == 401:
                    headers = [
                        (k, _without_basic(v) if k.lower() == b"www-authenticate" else v)
                        for k, v in headers
                    ]
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_ui(app: FastAPI) -> None:
    """Adds the pages, ``/static`` and the security headers to ``app``."""
    files = StaticFiles()
    app.state.static_files = files
    app.include_router(ui_router(files))
    app.add_middleware(SecurityHeaders)
