"""The HTTP app. For now: health, metrics and a study list with pseudonymous fields only.

Until accounts exist, every route but /healthz and /metrics answers loopback clients only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from imx.ingest import Archive
from storage.access import Accounts
from viewer.auth import Auth

log = logging.getLogger("imx.http")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(request: Request) -> None:
    if not _is_loopback(request.client.host if request.client else None):
        raise HTTPException(
            status_code=403,
            detail="This service answers only on this machine until user accounts are set up.",
        )


async def loopback_only(request: Request) -> None:
    """The dependency form of :func:`require_loopback`. Async on purpose: FastAPI runs a plain
    ``def`` dependency in its thread pool, a hand-off per request for a check that never blocks."""
    require_loopback(request)


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(title="imaging-exchange", version="0.1.0", docs_url=None, redoc_url=None)
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
        if not settings.metrics_public:
            require_loopback(request)
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

    @app.get("/api/studies", dependencies=[Depends(loopback_only)])
    def list_studies(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict:
        return {"studies": archive.index.list_studies(limit=limit, offset=offset), "limit": limit, "offset": offset}

    from viewer.accounts import accounts_router

    app.include_router(accounts_router(auth))

    from viewer.previews import router as previews_router

    app.include_router(previews_router(archive), dependencies=[Depends(loopback_only)])

    from viewer.dicomweb import dicomweb_router

    app.include_router(dicomweb_router(archive))
    return app
