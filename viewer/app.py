"""The HTTP app: health, metrics, accounts, share links, DICOMweb, previews and the pages.

Every route needs an authenticated caller (``viewer.auth.CurrentUser``: a session, an API token,
HTTP Basic or a share link) except ``/healthz``, ``/metrics`` (unless ``IMX_METRICS_PUBLIC`` is
false: then loopback or an admin), the login page, the share-link entry ``/s/{token}`` and static files.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from imx.ingest import Archive
from storage.access import Accounts
from viewer.auth import Auth, current_user

log = logging.getLogger("imx.http")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(title="imaging-exchange", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    settings = archive.settings
    auth = Auth(Accounts(archive.index))
    app.state.auth = auth

    @app.get("/healthz")
    def healthz() -> Response:
        checks: dict[str, str] = {}
        ok = True
        try:
            archive.index.ping()
            checks["index"] = "ok"
        except Exception as e:
            ok, checks["index"] = False, f"unreachable ({type(e).__name__})"
        try:
            archive.store.check()
            checks["store"] = "ok"
        except Exception as e:
            ok, checks["store"] = False, f"unreachable ({type(e).__name__})"
        body = {"status": "ok" if ok else "degraded", "checks": checks}
        try:
            body["spool_depth"] = archive.index.spool_depth()
        except Exception:
            pass
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics_endpoint(request: Request) -> Response:
        if not settings.metrics_public and not _is_loopback(request.client.host if request.client else None):
            caller = auth.authenticate(request)  # elsewhere than this machine: an admin's credentials
            if caller is None or caller.role != "admin":
                raise HTTPException(
                    status_code=401 if caller is None else 403,
                    detail="Metrics are private here: scrape from this machine or with an admin's API token.",
                    headers={"WWW-Authenticate": 'Bearer realm="imaging-exchange"'} if caller is None else None,
                )
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily

        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry)
        else:
            from prometheus_client import REGISTRY

            registry = REGISTRY  # type: ignore[assignment]

        class IndexCollector:
            def collect(self):  # type: ignore[no-untyped-def]
                try:
                    depth = archive.index.spool_depth()
                    counts = archive.index.counts()
                except Exception:
                    return
                yield GaugeMetricFamily("imx_spool_depth", "Instances waiting in the local spool", value=depth)
                g = GaugeMetricFamily("imx_index_objects", "Rows in the index", labels=["level"])
                for level, n in counts.items():
                    g.add_metric([level], n)
                yield g

        local = CollectorRegistry()
        local.register(IndexCollector())
        data = generate_latest(registry) + generate_latest(local)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    # consultations, the worklist and /api/studies (scoped: admins see every study)
    from viewer.consultations import consultations_router

    app.include_router(consultations_router(archive))

    from viewer.accounts import accounts_router

    app.include_router(accounts_router(auth))

    from viewer.shares import shares_router

    app.include_router(shares_router(auth))

    from viewer.previews import FastImages
    from viewer.previews import router as previews_router

    fast: list = []  # the hot image GETs, answered by FastImages ahead of the router
    app.include_router(previews_router(archive, fast), dependencies=[Depends(current_user)])

    from viewer.dicomweb import dicomweb_router

    app.include_router(dicomweb_router(archive, fast))

    # the image viewer's series metadata and lossless frames
    from viewer.pixels import pixels_router

    app.include_router(pixels_router(archive))

    # added before the security headers, so that they wrap it (the last added is the outermost)
    app.add_middleware(FastImages, routes=fast)

    # the HTML pages, /static and the security headers
    from viewer.ui import install_ui

    install_ui(app)
    return app
