"""``POST /agui``, ``POST /agui/connect`` and ``POST /agui/cancel`` (docs/agui.md).

Authenticated like ``/ws`` (``Authorization: Bearer <JWT>``). A run started here is the same
run as any other: :class:`~runtime.runs.RunService` starts, resumes and cancels it, the hub
delivers it, the audit store and the monitor see it. Only the framing is AG-UI's.

Answers before the stream starts are plain HTTP: ``401`` (no or bad token), ``404`` (no such
run or thread, or not yours: the same answer), ``409`` (``Last-Event-ID`` names another run),
``413`` (body over 1 MiB), ``422`` (not a ``RunAgentInput``, no user message, unknown agent),
``429`` (chat rate or connections per user; ``Retry-After``), ``503`` (shutting down).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from ag_ui.core import Message, RunAgentInput, UserMessage
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..auth import AuthError, Identity, TokenAuthority
from ..engine import Engine
from ..events import new_id, now_us
from ..hub import Hub
from ..protocol import MAX_CHAT_CHARS, Chat, FrameError, ProtocolErrorCode, is_poison
from ..runs import RunService
from ..sender import Connection
from ..store.audit import AuditStore, ConnectionClose, ConnectionOpen, RunInfo
from ..store.reads import thread_runs
from ..store.writer import DeliveryLog
from .mapping import RunTranslator, SequenceGap
from .stream import SSE_CLIENT, AguiStream, EventStreamResponse, Mode, SseTransport

__all__ = ["AguiConfig", "build_agui_router"]

log = logging.getLogger("runwatch.agui")

MAX_BODY_BYTES = 1_048_576
#: Client ids (``threadId``, ``runId``) runwatch keeps as its own thread id and idempotency key.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,64}$")
#: ``Last-Event-ID``: ``<run_id>:<seq>``, as every frame's SSE ``id``.
_LAST_EVENT_ID = re.compile(r"^([0-9A-Za-z]{1,64}):(\d{1,9})$")
#: Earlier runs of the thread a resumed stream's MESSAGES_SNAPSHOT includes.
HISTORY_RUNS = 50


@dataclass(frozen=True)
class AguiConfig:
    instance_id: str
    keepalive_s: float = 15.0


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status, detail, headers=headers)


def _user_text(message: UserMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", "") or "" for part in content)


@dataclass(frozen=True)
class _Input:
    run_id: str
    thread_id: str
    text: str
    agent: str | None


def _parse_input(raw: bytes, *, need_text: bool) -> _Input:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _problem(422, "the body is not JSON") from None
    try:
        parsed = RunAgentInput.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise _problem(422, f"not a RunAgentInput: {where}: {first.get('msg')}") from None
    for name, value in (("threadId", parsed.thread_id), ("runId", parsed.run_id)):
        if not _CLIENT_ID.match(value):
            raise _problem(422, f"{name} must be 1-64 characters of [A-Za-z0-9._:@+-]")
    agent: str | None = None
    props = parsed.forwarded_props
    if isinstance(props, dict) and props.get("agent") is not None:
        if not isinstance(props["agent"], str) or not 0 < len(props["agent"]) <= 200:
            raise _problem(422, "forwardedProps.agent must be an agent name")
        agent = props["agent"]
    text = ""
    if need_text:
        users = [m for m in parsed.messages if isinstance(m, UserMessage)]
        if not users:
            raise _problem(422, "messages has no user message to answer")
        text = _user_text(users[-1])
        if not text.strip():
            raise _problem(422, "the last user message has no text")
        if len(text) > MAX_CHAT_CHARS:
            raise _problem(422, f"the last user message is longer than {MAX_CHAT_CHARS}")
    # What the store cannot hold never reaches it (docs/protocol.md, frame rules).
    if any(is_poison(s) for s in (text, agent or "")):
        raise _problem(422, "the input contains a NUL character or a lone surrogate")
    return _Input(parsed.run_id, parsed.thread_id, text, agent)


def _refused(error: FrameError) -> HTTPException:
    match error.code:
        case ProtocolErrorCode.NOT_FOUND:
            return _problem(404, error.message)
        case ProtocolErrorCode.UNKNOWN_AGENT:
            return _problem(422, error.message)
        case ProtocolErrorCode.RATE_LIMITED if "restarting" in error.message:
            return _problem(503, error.message, {"Retry-After": "5"})
        case ProtocolErrorCode.RATE_LIMITED:
            return _problem(429, error.message, {"Retry-After": "1"})
    return _problem(422, error.message)


class _Endpoints:
    """The three endpoints over the runtime's components (no Runtime: what they need)."""

    def __init__(
        self,
        *,
        config: AguiConfig,
        tokens: TokenAuthority,
        store: AuditStore,
        engine: Engine,
        runs: RunService,
        hub: Hub,
        deliveries: DeliveryLog,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.store = store
        self.engine = engine
        self.runs = runs
        self.hub = hub
        self.deliveries = deliveries

    # ---- request pieces -----------------------------------------------------------------

    def identity(self, request: Request) -> Identity:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _problem(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
        try:
            return self.tokens.verify(token.strip())
        except AuthError as exc:
            raise _problem(401, exc.reason, {"WWW-Authenticate": "Bearer"}) from None

    async def body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _problem(413, "the body is larger than 1 MiB")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _problem(413, "the body is larger than 1 MiB")
            chunks.append(chunk)
        return b"".join(chunks)

    async def last_event_run(self, request: Request, user_id: str) -> RunInfo | None:
        header = request.headers.get("last-event-id")
        if header is None:
            return None
        match = _LAST_EVENT_ID.match(header.strip())
        if match is None:
            raise _problem(400, "Last-Event-ID must be <run_id>:<seq> as sent in the stream")
        run = await self.runs.owned_run(user_id, match.group(1))
        if run is None:
            raise _problem(404, "no such run")
        return run

    async def find_run(self, user_id: str, agui_run_id: str) -> RunInfo:
        """By the client's runId (the idempotency key), or by runwatch's own run id."""
        run = await self.store.find_run_by_msg(user_id, agui_run_id)
        if run is None:
            run = await self.runs.owned_run(user_id, agui_run_id)
        if run is None:
            raise _problem(404, "no such run")
        return run

    def open(self, user_id: str) -> tuple[Connection, SseTransport]:
        transport = SseTransport()
        conn = self.hub.open(new_id(), user_id, transport)
        if conn is None:
            self.runs.metrics.connections.labels(result="too_many").inc()
            raise _problem(429, "too many connections for this user", {"Retry-After": "1"})
        self.runs.metrics.connections.labels(result="accepted").inc()
        self.deliveries.connection_opened(
            ConnectionOpen(conn.id, user_id, self.config.instance_id, SSE_CLIENT, now_us())
        )
        return conn, transport

    def abandon(self, conn: Connection) -> None:
        """A connection opened for a request that was then refused."""
        conn.close(1000, send=False)
        self.hub.remove(conn, 1000)
        self.deliveries.connection_closed(ConnectionClose(conn.id, now_us(), 1000))

    async def history(self, user_id: str, run: RunInfo) -> list[Message]:
        """The earlier runs of the run's thread, as the messages an AG-UI client holds."""
        async with self.store.engine.connect() as db:
            runs = await thread_runs(db, user_id, run.thread_id, limit=HISTORY_RUNS) or []
        out: list[Message] = []
        for earlier in runs:
            if earlier.run_id == run.run_id:
                break
            tr = RunTranslator(
                run_id=earlier.run_id, thread_id=run.thread_id, agui_run_id=earlier.run_id
            )
            try:
                for event in await self.store.run_events(earlier.run_id):
                    tr.translate(event)
            except SequenceGap:
                log.warning("run %s has a gap; its history stops there", earlier.run_id)
            out.extend(tr.messages())
        return out

    def response(
        self, user_id: str, run: RunInfo, conn: Connection, transport: SseTransport, mode: Mode
    ) -> EventStreamResponse:
        stream = AguiStream(
            runs=self.runs,
            hub=self.hub,
            deliveries=self.deliveries,
            conn=conn,
            transport=transport,
            translator=RunTranslator(
                run_id=run.run_id, thread_id=run.thread_id, agui_run_id=run.client_msg_id
            ),
            mode=mode,
            history=lambda: self.history(user_id, run),
            keepalive_s=self.config.keepalive_s,
        )
        return EventStreamResponse(stream, headers={"X-Runwatch-Run-Id": run.run_id})

    # ---- endpoints ----------------------------------------------------------------------

    async def run_agent(self, request: Request) -> EventStreamResponse:
        user = self.identity(request)
        raw = await self.body(request)
        resumed = await self.last_event_run(request, user.user_id)
        data = _parse_input(raw, need_text=resumed is None)
        if resumed is not None:
            if resumed.client_msg_id != data.run_id and resumed.run_id != data.run_id:
                raise _problem(409, "Last-Event-ID names another run than runId")
            conn, transport = self.open(user.user_id)
            return self.response(user.user_id, resumed, conn, transport, Mode.SNAPSHOT)
        if data.agent is not None and self.engine.agents.get(data.agent) is None:
            raise _problem(422, f"no agent named {data.agent!r}")
        conn, transport = self.open(user.user_id)
        try:
            verdict = await self.runs.chat(
                user.user_id,
                Chat(data.text, data.run_id, data.thread_id, data.agent),
                adopt_thread=True,
            )
        except BaseException:
            self.abandon(conn)
            raise
        if isinstance(verdict, FrameError):
            self.abandon(conn)
            raise _refused(verdict)
        run = verdict.run
        if verdict.duplicate:
            # The runId was used: the same run again, never a second one.
            return self.response(user.user_id, run, conn, transport, Mode.REPLAY)
        # chat() returns right after Engine.start, before the run emitted anything: following
        # it now (no await since) gets every event live, so each counts in the delivery SLI.
        self.hub.follow(conn, run.run_id)
        return self.response(user.user_id, run, conn, transport, Mode.LIVE)

    async def connect(self, request: Request) -> EventStreamResponse:
        user = self.identity(request)
        raw = await self.body(request)
        run = await self.last_event_run(request, user.user_id)
        if run is None:
            data = _parse_input(raw, need_text=False)
            run = await self.find_run(user.user_id, data.run_id)
        conn, transport = self.open(user.user_id)
        return self.response(user.user_id, run, conn, transport, Mode.SNAPSHOT)

    async def cancel(self, request: Request) -> JSONResponse:
        user = self.identity(request)
        raw = await self.body(request)
        try:
            body: Any = json.loads(raw)
        except (ValueError, RecursionError):
            raise _problem(422, "the body is not JSON") from None
        agui_run_id = body.get("runId") if isinstance(body, dict) else None
        if not isinstance(agui_run_id, str) or not _CLIENT_ID.match(agui_run_id):
            raise _problem(422, "runId is required")
        run = await self.find_run(user.user_id, agui_run_id)
        refused = await self.runs.cancel(user.user_id, run.run_id)
        if refused is not None:
            raise _refused(refused)
        current = await self.store.get_run(run.run_id)
        ended = current is not None and current.ended_us is not None
        return JSONResponse(
            {"runId": agui_run_id, "run_id": run.run_id, "ended": ended}, status_code=202
        )


_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"description": "AG-UI events", "content": {"text/event-stream": {}}}
}


def build_agui_router(
    *,
    config: AguiConfig,
    tokens: TokenAuthority,
    store: AuditStore,
    engine: Engine,
    runs: RunService,
    hub: Hub,
    deliveries: DeliveryLog,
) -> APIRouter:
    """The AG-UI endpoints over the runtime's components."""
    endpoints = _Endpoints(
        config=config,
        tokens=tokens,
        store=store,
        engine=engine,
        runs=runs,
        hub=hub,
        deliveries=deliveries,
    )
    router = APIRouter(tags=["agui"])
    router.add_api_route(
        "/agui",
        endpoints.run_agent,
        methods=["POST"],
        summary="Run an agent: an AG-UI RunAgentInput in, an AG-UI event stream (SSE) out",
        responses=_STREAM,
    )
    router.add_api_route(
        "/agui/connect",
        endpoints.connect,
        methods=["POST"],
        summary="Reconnect to a run: snapshot of the conversation, then live events to the end",
        responses=_STREAM,
    )
    router.add_api_route(
        "/agui/cancel",
        endpoints.cancel,
        methods=["POST"],
        summary="Cancel a run (closing a stream does not cancel it)",
        status_code=202,
    )
    return router
