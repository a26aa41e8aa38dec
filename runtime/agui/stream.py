"""One AG-UI response: a hub connection that carries one run, written as Server-Sent Events.

The hub sees an ordinary connection (bounded send queue, receipts, acks, delivery failures):
:class:`SseTransport` is its :class:`~runtime.sender.Transport`, handing each envelope to the
response instead of a socket. :class:`AguiStream` turns envelopes into AG-UI frames with a
:class:`~runtime.agui.mapping.RunTranslator`, and :class:`EventStreamResponse` writes them.

SSE has no acknowledgement. An event counts as acknowledged when the HTTP write of the frames
that carry it has completed (the server's socket layer took the bytes and the client had not
gone away): the ack is recorded then, by this connection, so the receipt's ``acked_at`` is the
write completion time. Frames queued when the client disconnects are never acked here and
count as delivery failures, exactly like unacked frames of a ``/ws`` connection that closes.
The connection is recorded with ``client = "agui-sse"`` so that these acks stay
distinguishable from acks a client sent (docs/agui.md, docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from enum import StrEnum
from typing import Any

from ag_ui.core import Message
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..events import Event, EventType, now_us
from ..hub import Hub
from ..protocol import CloseCode
from ..runs import RunService
from ..sender import Connection
from ..store.audit import ConnectionClose
from ..store.writer import DeliveryLog
from ..tasks import stop_task
from .mapping import RunTranslator, SequenceGap, frame_id, sse_frames

__all__ = ["SSE_CLIENT", "AguiStream", "EventStreamResponse", "Mode", "SseTransport"]

log = logging.getLogger("runwatch.agui")

#: ``connections.client`` of every AG-UI stream: its acks are write completions.
SSE_CLIENT = "agui-sse"

#: Envelopes buffered between the hub's sender and the HTTP writer; beyond this the hub's
#: own bounded queue fills and a client that does not read is closed as a slow consumer.
TRANSPORT_FRAMES = 64

_EVENT_TYPES = frozenset(t.value for t in EventType)


class Mode(StrEnum):
    """How a stream begins."""

    #: A run just started for this stream; its events arrive live from seq 1.
    LIVE = "live"
    #: A retried POST: the whole run again, event by event (replayed from the store).
    REPLAY = "replay"
    #: A reconnect: RUN_STARTED, a MESSAGES_SNAPSHOT, the starts of what is open, then live.
    SNAPSHOT = "snapshot"


class _Keepalive:
    pass


KEEPALIVE = _Keepalive()


class SseTransport:
    """The hub's transport for one SSE response: envelopes wait here for the HTTP writer."""

    def __init__(self, limit: int = TRANSPORT_FRAMES) -> None:
        self._items: deque[str] = deque()
        self._limit = limit
        self._has_items = asyncio.Event()
        self._has_space = asyncio.Event()
        self.closed = False
        self.close_code: int | None = None

    async def send_text(self, text: str) -> None:
        while len(self._items) >= self._limit and not self.closed:
            self._has_space.clear()
            await self._has_space.wait()
        if self.closed:
            # No receipt for a frame that can no longer be written.
            raise ConnectionResetError("the event stream has ended")
        # No await after the append: the hub records the receipt before the writer runs.
        self._items.append(text)
        self._has_items.set()

    async def close(self, code: int, reason: str) -> None:
        """The hub closed the connection (slow consumer, shutdown): end after what is queued."""
        self.close_code = code
        self.interrupt()

    def interrupt(self) -> None:
        self.closed = True
        self._has_items.set()
        self._has_space.set()

    async def get(self, timeout_s: float) -> str | _Keepalive | None:
        """The next envelope; :data:`KEEPALIVE` after ``timeout_s`` idle; None once closed."""
        while True:
            if self._items:
                item = self._items.popleft()
                self._has_space.set()
                return item
            if self.closed:
                return None
            self._has_items.clear()
            try:
                await asyncio.wait_for(self._has_items.wait(), timeout_s)
            except TimeoutError:
                return KEEPALIVE


HistoryLoader = Callable[[], Awaitable[list[Message]]]


class AguiStream:
    """One run over one hub connection, as AG-UI SSE chunks; see the module docstring."""

    def __init__(
        self,
        *,
        runs: RunService,
        hub: Hub,
        deliveries: DeliveryLog,
        conn: Connection,
        transport: SseTransport,
        translator: RunTranslator,
        mode: Mode,
        history: HistoryLoader,
        keepalive_s: float,
    ) -> None:
        self.runs = runs
        self.hub = hub
        self.deliveries = deliveries
        self.conn = conn
        self.transport = transport
        self.translator = translator
        self.mode = mode
        self.history = history
        self.keepalive_s = keepalive_s
        self.failed = False
        self._resume: asyncio.Task[Any] | None = None
        self._finished = False

    @property
    def run_id(self) -> str:
        return self.translator.run_id

    async def chunks(self) -> AsyncGenerator[tuple[bytes, int], None]:
        """``(bytes to write, seq to ack once written)``; ends after the terminal event."""
        try:
            async for chunk in self._chunks():
                yield chunk
        except SequenceGap as exc:
            # Never a guess: the stream ends without a terminal event; the client retries.
            log.error("AG-UI stream of %s ended: %s", self.run_id, exc)
            self.failed = True
        except Exception:
            log.exception("AG-UI stream of %s failed", self.run_id)
            self.failed = True

    async def _chunks(self) -> AsyncIterator[tuple[bytes, int]]:
        tr = self.translator
        if self.mode != Mode.LIVE:
            # Replays from the store, then continues live: each seq once, in order.
            self._resume = asyncio.create_task(self.runs.resume(self.conn, self.run_id, 0))
            self._resume.add_done_callback(self._resume_done)
        folding = self.mode == Mode.SNAPSHOT
        while True:
            item = await self.transport.get(self.keepalive_s)
            if item is None:
                return
            if isinstance(item, _Keepalive):
                yield b": keepalive\n\n", 0
                continue
            obj = json.loads(item)
            kind = obj.get("type")
            if kind == "resumed":
                if folding:
                    # Everything before the splice is in the snapshot.
                    folding = False
                    head = tr.resume_head(await self.history(), now_us())
                    yield sse_frames(head, frame_id(self.run_id, tr.last_seq)).encode(), tr.last_seq
                    if tr.ended:
                        return
                continue
            if kind not in _EVENT_TYPES:
                continue
            event = Event.from_dict(obj)
            if event.run_id != self.run_id or event.seq <= tr.last_seq:
                continue
            out = tr.translate(event)
            if folding:
                continue
            frames = sse_frames(out, frame_id(self.run_id, event.seq)) if out else ""
            yield frames.encode(), event.seq
            if tr.ended:
                return

    def _resume_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        refused = task.result() if exc is None else None
        if exc is not None or refused is not None:
            # The store failed or the run is gone: end the stream, never guess.
            log.error("AG-UI resume of %s failed: %s", self.run_id, exc or refused)
            self.failed = True
            self.transport.interrupt()

    async def ack(self, seq: int) -> None:
        """The frames carrying ``seq`` were written: SSE's acknowledgement (module docstring),
        clamped by the connection's rules like a ``/ws`` ack."""
        acked = self.conn.protocol.ack(self.run_id, seq)
        if acked is not None:
            await self.runs.record_ack(self.conn, self.run_id, acked)

    async def finish(self, *, client_gone: bool) -> None:
        """Close the hub connection and record why (once)."""
        if self._finished:
            return
        self._finished = True
        self.transport.interrupt()
        if self._resume is not None and not self._resume.done():
            await stop_task(self._resume, log)
        conn = self.conn
        if conn.closed and conn.close_code is not None:
            code = conn.close_code
        elif client_gone:
            code = CloseCode.GOING_AWAY
        elif self.failed:
            code = CloseCode.INTERNAL_ERROR
        else:
            code = CloseCode.NORMAL
        conn.close(code, send=False)
        self.hub.remove(conn, code)
        self.deliveries.connection_closed(ConnectionClose(conn.id, now_us(), int(code)))
        await conn.wait_closed()


class EventStreamResponse(Response):
    """Writes an :class:`AguiStream` as ``text/event-stream``, acking each write once done."""

    media_type = "text/event-stream"

    def __init__(self, stream: AguiStream, headers: dict[str, str] | None = None) -> None:
        # Like StreamingResponse: no body, so no Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    # Wake the stream: a closed connection is not a cancel, the run goes on.
                    self.stream.transport.interrupt()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with contextlib.aclosing(self.stream.chunks()) as chunks:
                async for chunk, seq in chunks:
                    if chunk:
                        body = {"type": "http.response.body", "body": chunk, "more_body": True}
                        await send(body)
                        # A disconnect the server has already seen is noticed before the ack.
                        await asyncio.sleep(0)
                    if gone.is_set():
                        break
                    if seq:
                        await self.stream.ack(seq)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await stop_task(watcher, log)
            await self.stream.finish(client_gone=gone.is_set())
