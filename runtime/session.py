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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from .auth import AuthError, Identity, TokenAuthority
from .events import new_id, now_us
from .hub import Connection, Hub
from .metrics import RuntimeMetrics
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
    run_accepted_frame,
)
from .runs import RunService
from .store.errors import StoreRejected
from .store.audit import ConnectionClose, ConnectionOpen, StoreError
from .store.writer import DeliveryLog

__all__ = ["Session", "SessionConfig", "SocketServer"]

log = logging.getLogger("runwatch.session")

_BAD_FRAME_CODES = frozenset(
    {
        ProtocolErrorCode.INVALID_JSON,
        ProtocolErrorCode.INVALID_MESSAGE,
        ProtocolErrorCode.UNKNOWN_TYPE,
    }
)


class _SocketTransport:
    __slots__ = ("ws",)

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


@dataclass(frozen=True)
class SessionConfig:
    instance_id: str
    connect_timeout_s: float = 10.0
    heartbeat_s: float = 20.0
    max_bad_frames: int = 20


class SocketServer:
    """Serves ``/ws``: the handshake, then one :class:`Session` per authenticated socket."""

    def __init__(
        self,
        config: SessionConfig,
        tokens: TokenAuthority,
        hub: Hub,
        runs: RunService,
        deliveries: DeliveryLog,
        metrics: RuntimeMetrics,
        accepting: Callable[[], bool],
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.hub = hub
        self.runs = runs
        self.deliveries = deliveries
        self.metrics = metrics
        self.accepting = accepting

    async def serve(self, ws: WebSocket) -> None:
        """Run one WebSocket from accept to close."""
        metrics = self.metrics
        await ws.accept()
        if not self.accepting():
            metrics.connections.labels(result="shutting_down").inc()
            await _close(ws, CloseCode.SERVER_RESTARTING)
            return
        try:
            message = await asyncio.wait_for(ws.receive(), self.config.connect_timeout_s)
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
            identity = self.tokens.verify(frame.token)
        except AuthError as exc:
            log.info("connect refused: %s", exc.reason)
            metrics.connections.labels(result="unauthorized").inc()
            await _close(ws, CloseCode.UNAUTHORIZED)
            return
        connection_id = new_id()
        conn = self.hub.open(connection_id, identity.user_id, _SocketTransport(ws))
        if conn is None:
            metrics.connections.labels(result="too_many").inc()
            await _close(ws, CloseCode.TOO_MANY_CONNECTIONS)
            return
        metrics.connections.labels(result="accepted").inc()
        session = Session(self, ws, conn, identity, client=frame.client)
        await session.run()


class Session:
    """Frame handling for one authenticated connection."""

    __slots__ = (
        "bad_frames",
        "client",
        "close_code",
        "config",
        "conn",
        "identity",
        "metrics",
        "runs",
        "server",
        "ws",
    )

    def __init__(
        self,
        server: SocketServer,
        ws: WebSocket,
        conn: Connection,
        identity: Identity,
        *,
        client: str | None,
    ) -> None:
        self.server = server
        self.config = server.config
        self.runs = server.runs
        self.metrics = server.metrics
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
        server, conn = self.server, self.conn
        server.deliveries.connection_opened(
            ConnectionOpen(conn.id, self.user_id, self.config.instance_id, self.client, now_us())
        )
        # A timer, not a task: an idle connection costs no coroutine for its expiry.
        loop = asyncio.get_running_loop()
        # The token's exp plus the leeway its verification allowed (docs/protocol.md): a
        # token accepted inside the leeway is not closed at once.
        lifetime = self.identity.expires_at + self.server.tokens.leeway_s - time.time()
        expiry = loop.call_at(loop.time() + max(0.0, lifetime), self._expired)
        try:
            try:
                active = await self.runs.active_runs(self.user_id)
            except StoreError:
                active = []
            conn.send_frame(connected_frame(conn.id, self.user_id, self.config.heartbeat_s, active))
            await self._receive_frames()
        finally:
            expiry.cancel()
            code = conn.close_code if conn.close_code is not None else self.close_code
            conn.close(code, send=False)
            server.hub.remove(conn, code)
            server.deliveries.connection_closed(ConnectionClose(conn.id, now_us(), int(code)))
            await conn.wait_closed()

    def _expired(self) -> None:
        # A connection does not outlive its token: reconnect with a fresh one and resume.
        self.conn.close(CloseCode.UNAUTHORIZED)

    async def _receive_frames(self) -> None:
        """Read and answer frames in order. Every frame already received is handled without
        yielding in between, so a client's frames (a cancel behind many acks) are answered at
        the speed they arrive. Once the hub closed the connection (slow consumer, expiry),
        nothing more is handled; the read ends when the socket does."""
        conn = self.conn
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                self.close_code = int(message.get("code") or CloseCode.NORMAL)
                return
            if conn.closed:
                return
            raw = _frame_text(message)
            if raw is None:
                continue
            if len(raw) > MAX_FRAME_BYTES or (
                isinstance(raw, str) and len(raw.encode("utf-8")) > MAX_FRAME_BYTES
            ):
                conn.close(CloseCode.FRAME_TOO_BIG)
                return
            await self._handle(raw)
            if conn.closed:
                return

    def _error(self, err: FrameError) -> None:
        self.metrics.protocol_errors.labels(code=err.code.value).inc()
        self.conn.send_frame(error_frame(err.code, err.message, err.ref))
        if err.code in _BAD_FRAME_CODES:
            self.bad_frames += 1
            if self.bad_frames >= self.config.max_bad_frames:
                self.conn.close(CloseCode.PROTOCOL_VIOLATION)

    async def _handle(self, raw: str | bytes) -> None:
        frame = parse_client_frame(raw)
        if isinstance(frame, FrameError):
            self._error(frame)
            return
        if isinstance(frame, Connect):
            self._error(FrameError(ProtocolErrorCode.INVALID_MESSAGE, "already connected"))
            return
        self.bad_frames = 0
        runs, conn = self.runs, self.conn
        error: FrameError | None = None
        try:
            if isinstance(frame, Ping):
                conn.send_frame(pong_frame())
            elif isinstance(frame, Ack):
                error = await runs.ack(conn, frame.run_id, frame.seq)
            elif isinstance(frame, Chat):
                result = await runs.chat(self.user_id, frame)
                if isinstance(result, FrameError):
                    error = result
                else:
                    conn.send_frame(
                        run_accepted_frame(
                            frame.client_msg_id,
                            result.run.run_id,
                            result.run.thread_id,
                            result.duplicate,
                        )
                    )
            elif isinstance(frame, Resume):
                error = await runs.resume(conn, frame.run_id, frame.after_seq)
            elif isinstance(frame, Cancel):
                error = await runs.cancel(self.user_id, frame.run_id)
        except StoreError as exc:
            log.warning("store error while handling %s: %s", type(frame).__name__, exc)
            ref = frame.client_msg_id if isinstance(frame, Chat) else getattr(frame, "run_id", None)
            if isinstance(exc, StoreRejected):
                # The store refuses this data for good: retrying the same frame cannot help.
                error = FrameError(
                    ProtocolErrorCode.INVALID_MESSAGE,
                    "the audit store cannot hold this message",
                    ref,
                )
            else:
                # The audit store is briefly unavailable: a retryable answer, never a crash.
                error = FrameError(
                    ProtocolErrorCode.RATE_LIMITED,
                    "the audit store is temporarily unavailable; retry shortly",
                    ref,
                )
        except Exception:
            # A bug, not bad input: logged with its traceback, and only this socket closes
            # (1011); the user's other tabs and runs are untouched.
            log.exception("internal error handling a %s frame", type(frame).__name__)
            self.conn.close(CloseCode.INTERNAL_ERROR)
            return
        if error is not None:
            self._error(error)
