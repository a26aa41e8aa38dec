"""The ``/ws`` socket handler: it feeds a :class:`~runtime.connection.ConnectionProtocol` and
carries out what it decides.

Every rule of the connection (connect first or ``4401``, the frame size, bad frames in a row,
ack clamping, the resume splice) lives in ``connection.py`` and is tested without a socket. This
module only reads frames from the WebSocket, hands them to the protocol, answers the requests
it returns (token verification, then :class:`~runtime.runs.RunService` for chat, ack, resume and
cancel) and closes the socket when the protocol has closed. Internal exception text never
reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from .auth import AuthError, Identity, TokenAuthority
from .connection import CheckOwner, ConnectionProtocol, Request
from .events import new_id, now_us
from .hub import Hub
from .metrics import RuntimeMetrics
from .protocol import (
    CLOSE_REASONS,
    Ack,
    Cancel,
    Chat,
    CloseCode,
    Connect,
    FrameError,
    ProtocolErrorCode,
    Resume,
    run_accepted_frame,
)
from .runs import RunService
from .sender import Connection
from .store.audit import ConnectionClose, ConnectionOpen, StoreError
from .store.errors import StoreRejected
from .store.writer import DeliveryLog

__all__ = ["Session", "SessionConfig", "SocketServer"]

log = logging.getLogger("runwatch.session")


class _SocketTransport:
    __slots__ = ("ws",)

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def send_text(self, text: str) -> None:
        await self.ws.send_text(text)

    async def close(self, code: int, reason: str) -> None:
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            await self.ws.close(code, reason)


async def _close(ws: WebSocket, code: int) -> None:
    """Close a socket that never became a connection (the handshake failed)."""
    try:
        await ws.close(code, CLOSE_REASONS.get(CloseCode(code), ""))
    except Exception as exc:
        # The peer is gone already: nothing left to close.
        log.debug("closing a refused socket: %r", exc)


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
        await ws.accept()
        protocol = ConnectionProtocol(max_bad_frames=self.config.max_bad_frames)
        result, identity, client = await self._handshake(ws, protocol)
        conn: Connection | None = None
        if identity is not None:
            conn = self.hub.open(new_id(), identity.user_id, _SocketTransport(ws), protocol)
            if conn is None:
                result = "too_many"
                protocol.refuse(CloseCode.TOO_MANY_CONNECTIONS)
        self.metrics.connections.labels(result=result).inc()
        if conn is None or identity is None:
            if protocol.close_code is not None:
                await _close(ws, protocol.close_code)
            return
        await Session(self, ws, conn, identity, client=client).run()

    async def _handshake(
        self, ws: WebSocket, protocol: ConnectionProtocol
    ) -> tuple[str, Identity | None, str | None]:
        """Wait for ``connect`` and verify its token: the ``runwatch_connections_total`` result,
        and the identity when the token is good."""
        if not self.accepting():
            protocol.refuse(CloseCode.SERVER_RESTARTING)
            return "shutting_down", None, None
        try:
            message = await asyncio.wait_for(ws.receive(), self.config.connect_timeout_s)
        except TimeoutError:
            protocol.connect_timed_out()
            return "timeout", None, None
        except (WebSocketDisconnect, RuntimeError):
            return "abandoned", None, None
        if message["type"] == "websocket.disconnect":
            return "abandoned", None, None
        raw = _frame_text(message)
        protocol.receive_frame(raw if raw is not None else b"")
        requests = protocol.requests_received()
        if not requests or not isinstance(requests[0], Connect):
            # Nothing is handled before the handshake: the protocol closed with 4401 (or 1009
            # for a frame over the size limit).
            return "no_connect", None, None
        connect = requests[0]
        try:
            identity = self.tokens.verify(connect.token)
        except AuthError as exc:
            log.info("connect refused: %s", exc.reason)
            protocol.refuse(CloseCode.UNAUTHORIZED)
            return "unauthorized", None, None
        return "accepted", identity, connect.client


class Session:
    """One authenticated connection: socket frames in, the protocol's decisions out."""

    __slots__ = ("client", "config", "conn", "identity", "peer_close_code", "runs", "server", "ws")

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
        self.ws = ws
        self.conn = conn
        self.identity = identity
        self.client = client
        #: The code the client closed with, when it closed first.
        self.peer_close_code: int = CloseCode.NORMAL

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
            except StoreError as exc:
                # The list is a convenience: the connection works without it, and the client
                # can resume any run it knows.
                log.warning("connected without active_runs: %s", exc)
                active = []
            conn.protocol.accept(conn.id, self.user_id, self.config.heartbeat_s, active)
            conn.flush()
            await self._receive_frames()
        finally:
            expiry.cancel()
            code = conn.close_code if conn.close_code is not None else self.peer_close_code
            conn.close(code, send=False)
            # What the connection still writes before its close frame counts as sent when the
            # hub settles what it was sent and nobody acknowledged.
            try:
                await conn.wait_closed()
            finally:
                server.hub.remove(conn, code)
                server.deliveries.connection_closed(ConnectionClose(conn.id, now_us(), int(code)))

    def _expired(self) -> None:
        self.conn.protocol.token_expired()
        self.conn.flush()

    async def _receive_frames(self) -> None:
        """Read and answer frames in order. Every frame already received is handled without
        yielding in between, so a client's frames (a cancel behind many acks) are answered at
        the speed they arrive. Once the connection closed (slow consumer, expiry, too many bad
        frames), nothing more is handled; the read ends when the socket does."""
        conn = self.conn
        protocol = conn.protocol
        errors = self.server.metrics.protocol_errors
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                self.peer_close_code = int(message.get("code") or CloseCode.NORMAL)
                return
            if protocol.closed:
                return
            raw = _frame_text(message)
            if raw is None:
                continue
            protocol.receive_frame(raw)
            for request in protocol.requests_received():
                await self._carry_out(request)
            for code in protocol.errors_sent():
                errors.labels(code=code.value).inc()
            conn.flush()
            if protocol.closed:
                return

    async def _carry_out(self, request: Request) -> None:
        """Answer one request of the protocol; store errors become ``error`` frames."""
        protocol = self.conn.protocol
        try:
            error = await self._answer(request)
        except StoreError as exc:
            log.warning("store error while handling %s: %s", type(request).__name__, exc)
            ref = (
                request.client_msg_id
                if isinstance(request, Chat)
                else None
                if isinstance(request, Connect)
                else request.run_id
            )
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
            log.exception("internal error handling a %s frame", type(request).__name__)
            self.conn.close(CloseCode.INTERNAL_ERROR)
            return
        if error is not None:
            protocol.fail(error)

    async def _answer(self, request: Request) -> FrameError | None:
        runs, conn = self.runs, self.conn
        if isinstance(request, Ack):
            await runs.record_ack(conn, request.run_id, request.seq)
            return None
        if isinstance(request, CheckOwner):
            return await runs.check_owner(self.user_id, request.run_id)
        if isinstance(request, Chat):
            result = await runs.chat(self.user_id, request)
            if isinstance(result, FrameError):
                return result
            conn.protocol.answer(
                run_accepted_frame(
                    request.client_msg_id, result.run.run_id, result.run.thread_id, result.duplicate
                )
            )
            return None
        if isinstance(request, Resume):
            return await runs.resume(conn, request.run_id, request.after_seq)
        if isinstance(request, Cancel):
            return await runs.cancel(self.user_id, request.run_id)
        # A connect after the handshake never becomes a request (the protocol answers it).
        raise AssertionError(f"unexpected request {request!r}")
