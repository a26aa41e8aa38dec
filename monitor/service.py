"""Wiring the monitor into an app: inside ``runwatch serve`` or alone as ``runwatch monitor``."""

from __future__ import annotations

import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from runtime import __version__
from runtime.apidocs import build_docs_router
from runtime.config import Settings
from runtime.errors import StoreError, StoreUnavailable
from runtime.store.audit import AuditStore
from runtime.store.monitoring import MonitorStore

from .api import MonitorAuth, build_api
from .checker import Checker, CheckerConfig
from .metrics import MonitorMetrics
from .rules import rule_config
from .web import build_web

if TYPE_CHECKING:
    from runtime.server import Runtime

__all__ = ["attach_monitor", "create_monitor_app"]

log = logging.getLogger("runwatch.monitor")

#: Seconds a client is told to wait before asking again while the store is unavailable.
RETRY_AFTER_S = 5


async def store_error(request: Request, exc: Exception) -> Response:
    """A read the store could not answer: 503 (with ``Retry-After``) while it is unavailable,
    400 when it refuses the request's values; never an anonymous 500. JSON for the API, a
    page for the UI."""
    unavailable = isinstance(exc, StoreUnavailable)
    status = 503 if unavailable else 400
    detail = "audit store unavailable" if unavailable else "the audit store refused this request"
    log.warning("%s %s: %s (%s)", request.method, request.url.path, detail, exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if unavailable else None
    if request.url.path.startswith("/monitor"):
        body = (
            f"<!doctype html><title>runwatch monitor</title><h1>{html.escape(detail)}</h1>"
            f"<p>{html.escape(str(exc)[:300])}</p><p>Try again in a few seconds.</p>"
        )
        return HTMLResponse(body, status_code=status, headers=headers)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _mount(app: FastAPI, store: AuditStore, settings: Settings) -> None:
    auth = MonitorAuth(settings)
    app.add_exception_handler(StoreError, store_error)
    app.state.monitor_store = MonitorStore(store)
    app.include_router(build_api(settings, auth))
    app.include_router(build_web(store, settings, auth))


def _checker(store: AuditStore, registry: CollectorRegistry, settings: Settings) -> Checker:
    return Checker(store, MonitorMetrics(registry), CheckerConfig(rules=rule_config(settings)))


def attach_monitor(app: FastAPI, rt: Runtime) -> Checker:
    """Mount the API and UI on the runtime's app; the checker runs with the runtime."""
    _mount(app, rt.store, rt.settings)
    checker = _checker(rt.store, rt.registry, rt.settings)

    async def start() -> None:
        checker.start(rt.settings.monitor_interval_s)

    rt.on_start.append(start)
    rt.on_stop.append(checker.stop)
    return checker


def create_monitor_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    """The monitor alone: its own store connection, registry, ``/metrics`` and checker."""
    registry = registry if registry is not None else CollectorRegistry()
    store = AuditStore.open(settings.database_url)
    checker = _checker(store, registry, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        checker.start(settings.monitor_interval_s)
        try:
            yield
        finally:
            await checker.stop()
            await store.close()

    app = FastAPI(
        title="runwatch monitor",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # /api/docs is runtime.apidocs' offline page
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.checker = checker
    app.include_router(build_docs_router())
    _mount(app, store, settings)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        try:
            await store.ping()
        except Exception:
            return JSONResponse({"status": "degraded", "store": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "version": __version__})

    return app
