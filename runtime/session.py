"""The ``/ws`` socket handler: one :class:`Session` per WebSocket.

The handshake is explicit: the first frame must be ``connect`` with a valid token within
``connect_timeout_s``, or the socket is closed with ``4401`` and nothing else is read. After it,
each client frame is parsed by :mod:`runtime.protocol` and answered in order; bad frames get an
``error`` frame and the connection stays, until ``max_bad_frames`` in a row close it with
``4400``. Internal exception text never reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from .auth import AuthError, Identity
from .events import new_id, now_us
from .hub import Connection
from .protocol import (
    CLOSE_REASONS,
    MAX_FRAME_BYTES,
    Ack,
    Cancel,
    Chat,
    CloseCode,
    Connect,
    FrameError,
    Ping,
    ProtocolErrorCode,
    Resume,
    connected_frame,
    error_frame,
    parse_client_frame,
    pong_frame,
    resumed_frame,
    run_accepted_frame,
)
from .store.recorder import ConnectionClose, ConnectionOpen, RunInfo, StoreError

if TYPE_CHECKING:
    from .server import Runtime

__all__ = ["Session", "serve_socket"]

log = logging.getLogger("runwatch.session")

_BAD_FRAME_CODES = frozenset(
    {
        ProtocolErrorCode.INVALID_JSON,
        ProtocolErrorCode.INVALID_MESSAGE,
        ProtocolErrorCode.UNKNOWN_TYPE,
    }
)


class _SocketTransport:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def send_text(self, text: str) -> None:
        await self.ws.send_text(text)

    async def close(self, code: int, reason: str) -> None:
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            await self.ws.close(code, reason)


async def _close(ws: WebSocket, code: CloseCode) -> None:
    with contextlib.suppress(Exception):
        await ws.close(int(code), CLOSE_REASONS[code])


def _frame_text(message: Mapping[str, Any]) -> str | bytes | None:
    if message.get("text") is not None:
        return str(message["text"])
    if message.get("bytes") is not None:
        return bytes(message["bytes"])
    return None


async def serve_socket(ws: WebSocket, rt: Runtime) -> None:
    """Run one WebSocket from accept to close."""
    metrics = rt.metrics
    await ws.accept()
    if not rt.accepting:
        metrics.connections.labels(result="shutting_down").inc()
        await _close(ws, CloseCode.SERVER_RESTARTING)
        return
    try:
        message = await asyncio.wait_for(ws.receive(), rt.settings.connect_timeout_s)
    except TimeoutError:
        metrics.connections.labels(result="timeout").inc()
        await _close(ws, CloseCode.UNAUTHORIZED)
        return
    except (WebSocketDisconnect, RuntimeError):
        metrics.connections.labels(result="abandoned").inc()
        return
    if message["type"] == "websocket.disconnect":
        metrics.connections.labels(result="abandoned").inc()
        return
    raw = _frame_text(message)
    frame = parse_client_frame(raw) if raw is not None else None
    if not isinstance(frame, Connect):
        # Nothing is handled before the handshake: a frame before connect is unauthorized.
        metrics.connections.labels(result="no_connect").inc()
        await _close(ws, CloseCode.UNAUTHORIZED)
        return
    try:
        identity = rt.tokens.verify(frame.token)
    except AuthError as exc:
        log.info("connect refused: %s", exc.reason)
        metrics.connections.labels(result="unauthorized").inc()
        await _close(ws, CloseCode.UNAUTHORIZED)
        return
    connection_id = new_id()
    conn = rt.hub.open(connection_id, identity.user_id, _SocketTransport(ws))
    if conn is None:
        metrics.connections.labels(result="too_many").inc()
        await _close(ws, CloseCode.TOO_MANY_CONNECTIONS)
        return
    metrics.connections.labels(result="accepted").inc()
    session = Session(rt, ws, conn, identity, client=frame.client)
    await session.run()


class Session:
    """Frame handling for one authenticated connection."""

    def __init__(
        self,
        rt: Runtime,
        ws: WebSocket,
        conn: Connection,
        identity: Identity,
        *,
        client: str | None,
    ) -> None:
        self.rt = rt
        self.ws = ws
        self.conn = conn
        self.identity = identity
        self.client = client
        self.bad_frames = 0
        self.close_code: int = CloseCode.NORMAL

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    async def run(self) -> None:
        rt, conn = self.rt, self.conn
        rt.writer.connection_opened(
            ConnectionOpen(conn.id, self.user_id, rt.settings.instance_id, self.client, now_us())
        )
        expiry = asyncio.create_task(self._expire_at(self.identity.expires_at))
        try:
            try:
                active = await rt.store.active_runs(self.user_id)
            except StoreError:
                active = []
            conn.send_frame(connected_frame(conn.id, self.user_id, rt.settings.heartbeat_s, active))
            await self._receive_loop()
        finally:
            expiry.cancel()
            code = conn.close_code if conn.close_code is not None else self.close_code
            conn.close(code, send=False)
            rt.hub.remove(conn, code)
            rt.writer.connection_closed(ConnectionClose(conn.id, now_us(), int(code)))
            await conn.wait_closed()

    async def _expire_at(self, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        # A connection does not outlive its token: reconnect with a fresh one and resume.
        self.conn.close(CloseCode.UNAUTHORIZED)

    async def _receive_loop(self) -> None:
        closed: asyncio.Future[Any] = asyncio.ensure_future(self.conn.done.wait())
        try:
            await self._receive_frames(closed)
        finally:
            closed.cancel()

    async def _receive_frames(self, closed: asyncio.Future[Any]) -> None:
        while True:
            receive = asyncio.ensure_future(self.ws.receive())
            await asyncio.wait([receive, closed], return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                # The hub closed this connection (slow consumer, expiry): stop reading now.
                receive.cancel()
                with contextlib.suppress(BaseException):
                    await receive
                return
            try:
                message = receive.result()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                self.close_code = int(message.get("code") or CloseCode.NORMAL)
                return
            if self.conn.closed:
                return
            raw = _frame_text(message)
            if raw is None:
                continue
            if len(raw) > MAX_FRAME_BYTES or (
                isinstance(raw, str) and len(raw.encode("utf-8")) > MAX_FRAME_BYTES
            ):
                self.conn.close(CloseCode.FRAME_TOO_BIG)
                return
            await self._handle(raw)
            if self.conn.closed:
                return

    def _error(self, err: FrameError) -> None:
        self.rt.metrics.protocol_errors.labels(code=err.code.value).inc()
        self.conn.send_frame(error_frame(err.code, err.message, err.ref))
        if err.code in _BAD_FRAME_CODES:
            self.bad_frames += 1
            if self.bad_frames >= self.rt.settings.max_bad_frames:
                self.conn.close(CloseCode.PROTOCOL_VIOLATION)

    def _not_found(self, ref: str) -> None:
        # Same answer for "no such run" and "not yours": existence never leaks.
        self._error(FrameError(ProtocolErrorCode.NOT_FOUND, "no such run", ref))

    async def _handle(self, raw: str | bytes) -> None:
        frame = parse_client_frame(raw)
        if isinstance(frame, FrameError):
            self._error(frame)
            return
        if isinstance(frame, Connect):
            self._error(FrameError(ProtocolErrorCode.INVALID_MESSAGE, "already connected"))
            return
        self.bad_frames = 0
        try:
            if isinstance(frame, Ping):
                self.conn.send_frame(pong_frame())
            elif isinstance(frame, Ack):
                await self._ack(frame)
            elif isinstance(frame, Chat):
                await self._chat(frame)
            elif isinstance(frame, Resume):
                await self._resume(frame)
            elif isinstance(frame, Cancel):
                await self._cancel(frame)
        except StoreError as exc:
            # The audit store is briefly unavailable: a retryable answer, never a crash.
            log.warning("store error while handling %s: %s", type(frame).__name__, exc)
            ref = frame.client_msg_id if isinstance(frame, Chat) else getattr(frame, "run_id", None)
            self._error(
                FrameError(
                    ProtocolErrorCode.RATE_LIMITED,
                    "the audit store is temporarily unavailable; retry shortly",
                    ref,
                )
            )

    async def _owned_run(self, run_id: str) -> RunInfo | None:
        run = await self.rt.store.get_run(run_id)
        if run is None or run.user_id != self.user_id:
            return None
        return run

    # ---- chat ---------------------------------------------------------------------------

    async def _chat(self, chat: Chat) -> None:
        rt = self.rt
        ref = chat.client_msg_id
        existing = await rt.store.find_run_by_msg(self.user_id, chat.client_msg_id)
        if existing is not None:
            # Idempotent: the original run, whatever the text; nothing starts.
            self.conn.send_frame(
                run_accepted_frame(ref, existing.run_id, existing.thread_id, duplicate=True)
            )
            return
        agent = chat.agent or rt.engine.agents.default
        if rt.engine.agents.get(agent) is None:
            self._error(
                FrameError(ProtocolErrorCode.UNKNOWN_AGENT, f"no agent named {agent!r}", ref)
            )
            return
        new_thread = chat.thread_id is None
        thread_id = chat.thread_id or new_id()
        if not new_thread and await rt.store.thread_owner(thread_id) != self.user_id:
            self._error(FrameError(ProtocolErrorCode.NOT_FOUND, "no such thread", ref))
            return
        if not rt.engine.accepting:
            self._error(FrameError(ProtocolErrorCode.RATE_LIMITED, "the server is restarting", ref))
            return
        if not rt.chat_rate.allowed(self.user_id):
            wait = max(0.1, rt.chat_rate.retry_after(self.user_id))
            self._error(
                FrameError(
                    ProtocolErrorCode.RATE_LIMITED, f"too many chats; retry in {wait:.1f}s", ref
                )
            )
            return
        info = RunInfo(
            run_id=new_id(),
            user_id=self.user_id,
            thread_id=thread_id,
            agent=agent,
            client_msg_id=chat.client_msg_id,
            instance_id=rt.settings.instance_id,
            created_us=now_us(),
            timeout_s=rt.settings.run_timeout_s,
        )
        run, duplicate = await rt.writer.create_run(info, new_thread)
        self.conn.send_frame(run_accepted_frame(ref, run.run_id, run.thread_id, duplicate))
        if not duplicate:
            rt.engine.start(run, chat.text)

    # ---- ack / resume / cancel ----------------------------------------------------------

    async def _ack(self, ack: Ack) -> None:
        if ack.run_id not in self.conn.sent and await self._owned_run(ack.run_id) is None:
            self._not_found(ack.run_id)
            return
        await self.rt.hub.ack(self.conn, ack.run_id, ack.seq)

    async def _resume(self, resume: Resume) -> None:
        rt, conn = self.rt, self.conn
        run = await self._owned_run(resume.run_id)
        if run is None:
            rt.metrics.resumes.labels(result="not_found").inc()
            self._not_found(resume.run_id)
            return
        # Buffer live events first, then read the store: an event is either in the replay
        # or in the buffer (or both, and then sent once), never in neither.
        conn.subscribed.discard(run.run_id)
        buffer: list[Any] = []
        conn.resuming[run.run_id] = buffer
        try:
            events = await rt.store.run_events(run.run_id, resume.after_seq)
        except BaseException:
            conn.resuming.pop(run.run_id, None)
            raise
        for event in events:
            # Flow control: a long replay waits for the socket instead of filling the queue.
            await conn.wait_writable()
            conn.send_event(event, live=False, replayed=True)
        last = max([resume.after_seq, *(e.seq for e in events)])
        conn.send_frame(resumed_frame(run.run_id, resume.after_seq, len(events)))
        conn.resuming.pop(run.run_id, None)
        ended = any(e.is_terminal for e in events) or run.ended_us is not None
        for event in buffer:
            if event.seq > last:
                conn.send_event(event, live=True)
                last = event.seq
                ended = ended or event.is_terminal
        if not ended:
            conn.subscribed.add(run.run_id)
        rt.metrics.resumes.labels(result="ok").inc()

    async def _cancel(self, cancel: Cancel) -> None:
        rt = self.rt
        active = rt.engine.active.get(cancel.run_id)
        if active is not None:
            if active.info.user_id != self.user_id:
                self._not_found(cancel.run_id)
                return
            rt.engine.cancel(cancel.run_id)
            return
        run = await self._owned_run(cancel.run_id)
        if run is None:
            self._not_found(cancel.run_id)
            return
        if run.ended_us is None and rt.broker is not None:
            await rt.broker.cancel(cancel.run_id)
        # A run that has ended: the cancel is ignored.
