"""The FastAPI app: ``/ws``, the chat page, ``/metrics``, dev tokens, startup recovery.

:class:`Runtime` holds one world: settings, metrics registry, audit store and writer, hub,
engine. :func:`create_app` builds the ASGI app around it; the monitor mounts itself on the same
app under ``runwatch serve``. Nothing is a module-level singleton, so a test builds its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__
from .agents import AgentRegistry
from .agui import AguiConfig, build_agui_router
from .apidocs import build_docs_router
from .auth import AuthError, TokenAuthority, valid_user_id
from .broker import BrokerMetrics, RedisBroker
from .config import Settings
from .delivery import DeliveryTracker
from .engine import Engine, EngineConfig
from .events import ErrorCode, now_us
from .hub import Hub
from .lease import InstanceLease
from .metrics import RuntimeMetrics
from .pipeline import Fanout, RunSink
from .protocol import CloseCode
from .ratelimit import TokenBuckets
from .relay import Relay
from .runs import RunService
from .session import SessionConfig, SocketServer
from .store.audit import AuditStore
from .store.errors import StoreError
from .store.journal import Journal
from .store.writer import AuditWriter, DeliveryLog
from .threads import build_threads_router
from .tools import ToolRegistry, builtin_tools
from .tracing import TraceMetrics, build_tracer

__all__ = ["Runtime", "create_app", "is_loopback"]

log = logging.getLogger("runwatch.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: How long shutdown waits for the audit writer after the runs are ended (docs/operations.md:
#: shutdown takes at most RUNWATCH_DRAIN_S + 10 s for runs to unwind + this).
SHUTDOWN_FLUSH_S = 5.0


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "runtime"


def _hook_name(hook: Callable[..., object]) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Runtime:
    """One runtime instance's world, wired here and only here, by constructor injection.

    The event path reads top to bottom: the engine emits into the writer; the writer commits
    and hands committed events to the fan-out (the hub, then the broker); the socket server
    feeds client frames to the run service, which drives the engine and the hub.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        agents: AgentRegistry | None = None,
        tools: ToolRegistry | None = None,
        store: AuditStore | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = metrics = RuntimeMetrics(self.registry, version=__version__)
        self.tokens = TokenAuthority(settings.jwt_secret, leeway_s=settings.jwt_leeway_s)
        self.store = store if store is not None else AuditStore.open(settings.database_url)
        self.lease = InstanceLease(
            self.store, settings.instance_id, ttl_s=settings.lease_ttl_s, registry=self.registry
        )
        self.deliveries = deliveries = DeliveryLog()
        # Traces (docs/tracing.md): None unless OTEL_EXPORTER_OTLP_* is set.
        self.tracer = tracer = build_tracer(settings, TraceMetrics(self.registry))
        # Registered with or without Redis, so the fan-out series exist at 0.
        broker_metrics = BrokerMetrics(self.registry)
        self.broker = (
            RedisBroker(
                settings.redis_url,
                settings.instance_id,
                channel=settings.redis_channel,
                metrics=broker_metrics,
            )
            if settings.redis_url
            else None
        )
        self.delivery = DeliveryTracker(
            metrics,
            deliveries if tracer is None else tracer.recorder(deliveries),
            settle_unknown=self._settle_unknown,
            observer=tracer,
        )
        self.hub = Hub(
            metrics,
            self.delivery,
            remote=self.broker,
            max_connections_per_user=settings.max_connections_per_user,
            max_queue_bytes=settings.send_queue_bytes,
            max_bad_frames=settings.max_bad_frames,
        )
        sinks: list[RunSink] = [self.hub]
        if self.broker is not None:
            sinks.append(self.broker)
        if tracer is not None:
            sinks.append(tracer)
        fanout = Fanout(sinks)
        self.writer = AuditWriter(
            self.store,
            metrics,
            fanout,
            deliveries,
            journal=Journal(
                Path(settings.data_dir) / f"journal-{_safe_name(settings.instance_id)}.jsonl",
                settings.journal_max_bytes,
            ),
        )
        self.engine = Engine(
            self.store,
            self.writer,
            self.hub,
            fanout,
            metrics,
            agents if agents is not None else AgentRegistry.with_builtins(),
            tools if tools is not None else builtin_tools(),
            EngineConfig(
                run_timeout_s=settings.run_timeout_s,
                tool_timeout_s=settings.tool_timeout_s,
                instance_id=settings.instance_id,
            ),
            telemetry=tracer,
        )
        # An event the store refuses for good is replaced by a stand-in; its run ends (I8).
        self.writer.on_rejected = lambda run_id: self.engine.cancel(run_id, ErrorCode.INTERNAL)
        metrics.registered(agents=self.engine.agents.names(), tools=self.engine.tools.names())
        self.runs = RunService(
            self.store,
            self.writer,
            self.engine,
            self.hub,
            metrics,
            TokenBuckets(settings.chat_burst, settings.chat_refill_per_s),
            instance_id=settings.instance_id,
            run_timeout_s=settings.run_timeout_s,
            remote=self.broker,
            orphans=self._reap_instance,
        )
        self.sockets = SocketServer(
            SessionConfig(
                instance_id=settings.instance_id,
                connect_timeout_s=settings.connect_timeout_s,
                heartbeat_s=settings.heartbeat_s,
                max_bad_frames=settings.max_bad_frames,
            ),
            self.tokens,
            self.hub,
            self.runs,
            deliveries,
            metrics,
            accepting=lambda: self.accepting,
        )
        # The other replicas' fan-out, relayed here without gaps (issue #11 item 4).
        self.relay = Relay(
            self.hub,
            self.engine,
            self.store,
            instance_id=settings.instance_id,
            registry=self.registry,
        )
        self.accepting = True
        self._background: list[asyncio.Task[Any]] = []
        self._stopped = False
        self.on_start: list[Callable[[], Awaitable[None]]] = []
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        if tracer is not None:
            self.on_stop.append(tracer.close)

    async def _settle_unknown(self, run_id: str, seq: int) -> None:
        run = await self.store.get_run(run_id)
        if (
            run is not None
            and run.last_seq is not None
            and seq >= run.last_seq
            and run.settled_us is None
        ):
            self.deliveries.settle(run_id, now_us())

    async def _take_over(self, instance_id: str) -> int:
        return await self.engine.recover(instance_id)

    async def _reap_instance(self, instance_id: str) -> None:
        """A user touched a run of another instance: if that replica is dead, end its runs
        now instead of at the next reaper pass (I8)."""
        await self.lease.reap(self._take_over, only=instance_id)

    async def start(self) -> None:
        # docs/operations.md: the port is bound (runwatch's CLI binds it before the app starts),
        # then the instance lease is held, and only then is anything recovered.
        if not self.lease.held:
            await self.lease.acquire()
        self.writer.start()
        if self.writer.degraded:
            # Events a crashed process journaled go to the store before recovery reads it.
            log.warning("draining the outage journal into the store before recovery")
            await self.writer.wait_journal_drained()
        await self.engine.recover(self.settings.instance_id)
        await self.lease.reap(self._take_over)
        if self.broker is not None:
            await self.broker.start(self.relay)
        self._background.append(asyncio.create_task(self._sweeper(), name="runwatch-sweeper"))
        self._background.append(
            asyncio.create_task(self.lease.keep(self._take_over), name="runwatch-lease")
        )
        for hook in self.on_start:
            await hook()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(30)
            self.delivery.sweep()

    async def shutdown(self, drain_s: float | None = None) -> None:
        """Graceful stop (docs/operations.md): stop accepting, let runs finish for ``drain_s``, end
        the rest with ``runtime_restarted``, flush the store, close sockets with 1012."""
        if self._stopped:
            return
        self._stopped = True
        self.accepting = False
        drain = self.settings.drain_s if drain_s is None else drain_s
        ended = await self.engine.drain(drain)
        # Bounded (docs/operations.md): a writer that cannot make progress must not hold the
        # process; what it did not write was never sent, and recovery ends those runs.
        flushed = await self.writer.flush(timeout=SHUTDOWN_FLUSH_S)
        if not flushed and self.writer.urgent_pending:
            log.error(
                "shutdown: %d event(s) and new run(s) could not be written within %gs; they "
                "were never sent, and their runs (%d cut short here) are ended with "
                "runtime_restarted by recovery at the next start",
                self.writer.urgent_pending,
                SHUTDOWN_FLUSH_S,
                ended,
            )
        elif ended:
            log.warning("shutdown: ended %d run(s) with runtime_restarted", ended)
        await self.hub.close_all(CloseCode.SERVER_RESTARTING)
        if self.broker is not None:
            await self.broker.close()
        await self.relay.close()
        for hook in self.on_stop:
            try:
                await hook()
            except Exception:
                # One failing hook must not keep the others (the monitor's checker, the
                # tracer's export) from stopping; what failed is said, with its traceback.
                log.exception("shutdown: the on_stop hook %s failed", _hook_name(hook))
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.writer.close(timeout=1.0 if flushed else 0)
        # Every local run has ended: nothing is left for a survivor to take over.
        try:
            await self.lease.release()
        except Exception as exc:
            # The lease then expires on its own: survivors wait one lease lifetime longer.
            log.warning("could not release the instance lease: %s", exc)
        await self.store.close()


class SocketRoute:
    """ASGI middleware: a WebSocket to ``path`` goes straight to ``serve``."""

    def __init__(
        self, app: ASGIApp, *, path: str, serve: Callable[[WebSocket], Awaitable[None]]
    ) -> None:
        self.app = app
        self.path = path
        self.serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == self.path:
            await self.serve(WebSocket(scope, receive, send))
            return
        await self.app(scope, receive, send)


def create_app(rt: Runtime) -> FastAPI:
    """The ASGI app for one :class:`Runtime`."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await rt.start()
        try:
            yield
        finally:
            await rt.shutdown()

    app = FastAPI(
        title="runwatch",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # /api/docs is apidocs.py's offline page
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.runtime = rt
    app.include_router(build_docs_router())
    app.include_router(build_threads_router(rt))
    app.include_router(
        build_agui_router(
            config=AguiConfig(instance_id=rt.settings.instance_id),
            tokens=rt.tokens,
            store=rt.store,
            engine=rt.engine,
            runs=rt.runs,
            hub=rt.hub,
            deliveries=rt.deliveries,
        )
    )

    # /ws is served ahead of FastAPI's routing and dependency machinery: a chat socket is
    # long-lived, so what it holds per connection and per frame is worth keeping small.
    app.add_middleware(SocketRoute, path="/ws", serve=rt.sockets.serve)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(rt.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        writer = rt.writer.status()
        try:
            await asyncio.wait_for(rt.store.ping(), rt.store.read_timeout_s)
        except (StoreError, TimeoutError) as exc:
            # Info, not warning: a probe polls this every few seconds for the whole outage,
            # which the writer and the RunwatchAuditStoreDown alert already report.
            log.info("healthz: the audit store did not answer: %s", str(exc) or "timed out")
            body = {"status": "degraded", "store": "unavailable", "writer": writer}
            return JSONResponse(body, status_code=503)
        ok = rt.accepting and writer["state"] != "stalled"
        status = "draining" if not rt.accepting else "ok" if ok else "stalled"
        return JSONResponse(
            {"status": status, "version": __version__, "writer": writer},
            status_code=200 if ok else 503,
        )

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        """Whether this replica should get traffic: it accepts, and its audit writer makes
        progress (into the store, or the journal during an outage). Reads nothing."""
        writer = rt.writer.status()
        ready = rt.accepting and writer["state"] != "stalled"
        reason = None if ready else "draining" if not rt.accepting else "audit writer stalled"
        return JSONResponse(
            {"ready": ready, "reason": reason, "writer": writer},
            status_code=200 if ready else 503,
        )

    @app.post("/dev/token", include_in_schema=False)
    async def dev_token(request: Request) -> JSONResponse:
        if not rt.settings.dev_mode:
            raise HTTPException(status_code=404)
        # No body, or no "user" (or an empty one): the user "dev". Anything else that is not a
        # JSON object with a string "user" is refused rather than read as "dev".
        raw = await request.body()
        user: object = "dev"
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                raise HTTPException(status_code=400, detail="body is not JSON") from None
            if not isinstance(body, dict):
                raise HTTPException(status_code=400, detail='body must be {"user": "name"}')
            user = body.get("user") or "dev"
        if not isinstance(user, str) or not valid_user_id(user):
            raise HTTPException(status_code=400, detail="invalid user name")
        try:
            token = rt.tokens.mint(user, ttl_s=3600)
        except AuthError as exc:
            raise HTTPException(status_code=400, detail=exc.reason) from None
        return JSONResponse({"token": token, "user_id": user, "expires_in": 3600})

    return app
