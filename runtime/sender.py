"""The per-connection sender: one client connection's writes, bounded, in order.

A :class:`Connection` pairs a connection's rules (:class:`~runtime.connection.ConnectionProtocol`,
pure) with its I/O: a send queue measured in bytes, drained by one sender task that writes to
the :class:`Transport` (a WebSocket, or an AG-UI event stream) and records a receipt for every
event written. A client that stops reading fills its queue and is closed with ``4008`` instead
of holding memory or slowing anyone else down; it reconnects and resumes from the store.

Whoever feeds the protocol calls :meth:`Connection.flush` afterwards, which moves what the
protocol decided into the queue and closes the transport once the protocol has closed: first
what was decided before the close is written (the ``error`` answering the 20th bad frame, the
events of a connection whose token expired), within :data:`CLOSE_TIMEOUT_S`, then the close
frame. A slow consumer's queue and a gone socket's are dropped at once, and what they held
counts as not delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol

from .connection import ConnectionProtocol, Outgoing
from .events import EventType, Receipt, now_us
from .protocol import CLOSE_REASONS, CloseCode

if TYPE_CHECKING:
    from .delivery import DeliveryRecorder
    from .metrics import RuntimeMetrics

__all__ = ["CLOSE_TIMEOUT_S", "Connection", "SendCounters", "Transport"]

log = logging.getLogger("runwatch.sender")

#: How long a close frame may wait for a peer that does not read.
CLOSE_TIMEOUT_S = 5.0


class Transport(Protocol):
    """What a connection needs of a socket."""

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class SendCounters:
    """The send metrics, per type resolved once, shared by every connection of a hub."""

    __slots__ = ("metrics", "recorder", "sent")

    def __init__(self, metrics: RuntimeMetrics, recorder: DeliveryRecorder) -> None:
        self.metrics = metrics
        self.recorder = recorder
        self.sent = {t.value: metrics.events_sent.labels(type=t.value) for t in EventType}

    def count(self, sent: dict[str, int], replayed: int) -> None:
        for kind, count in sent.items():
            self.sent[kind].inc(count)
        sent.clear()
        if replayed:
            self.metrics.replayed_events.inc(replayed)


class Connection:
    """One authenticated connection of one user."""

    # Slots: thousands of idle connections each carry only what they use.
    __slots__ = (
        "_closing",
        "_queue",
        "_sender",
        "_waiters",
        "counters",
        "dropped",
        "id",
        "max_queue_bytes",
        "protocol",
        "queued_bytes",
        "transport",
        "user_id",
    )

    def __init__(
        self,
        connection_id: str,
        user_id: str,
        transport: Transport,
        protocol: ConnectionProtocol,
        counters: SendCounters,
        *,
        max_queue_bytes: int,
    ) -> None:
        self.id = connection_id
        self.user_id = user_id
        self.transport = transport
        self.protocol = protocol
        self.counters = counters
        self.max_queue_bytes = max_queue_bytes
        self.queued_bytes = 0
        #: Highest seq per run that was queued here but never written (the queue was dropped).
        self.dropped: dict[str, int] = {}
        # Allocated while there is something to send: an idle connection holds no queue,
        # no sender task and no waiters.
        self._queue: deque[Outgoing] | None = None
        #: Waiters for the queue to drain to half (``wait_writable``) or empty (``drain``).
        self._waiters: list[asyncio.Future[None]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        return self.protocol.closed

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    # ---- enqueueing ---------------------------------------------------------------------

    def flush(self) -> None:
        """Queue what the protocol decided; once the protocol closed, write what it decided
        before the close, then close the transport."""
        protocol = self.protocol
        for item in protocol.data_to_send():
            self._enqueue(item)
        if protocol.closed and self._closing is None and protocol.close_code is not None:
            self._closed(protocol.close_code, send=True, drain=True)

    def _enqueue(self, item: Outgoing) -> None:
        if self._closing is not None:
            # The close began and dropped the queue: this is not delivered either.
            self._drop(item)
            return
        size = len(item.text)
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        if self.queued_bytes + size > self.max_queue_bytes and queue:
            # The client is not reading: close it rather than buffer without bound (a close
            # the protocol already decided keeps its code).
            self._drop(item)
            self.protocol.close(CloseCode.SLOW_CONSUMER)
            self._closed(self.protocol.close_code or CloseCode.SLOW_CONSUMER, send=True)
            return
        self.queued_bytes += size
        queue.append(item)
        if self._sender is None:
            # The sender runs only while there is something to send: an idle connection
            # holds no task for it.
            self._sender = asyncio.create_task(self._send_loop(), name=f"runwatch-send-{self.id}")

    async def _send_loop(self) -> None:
        counters = self.counters
        record = counters.recorder.record_receipt
        send_seconds = counters.metrics.send_seconds.observe
        written = self.protocol.written
        # Counted per burst, not per frame: one metric update per type and burst.
        sent: dict[str, int] = {}
        replayed = unflushed = 0
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                item = queue[0]
                await self.transport.send_text(item.text)
                queue.popleft()
                self.queued_bytes -= len(item.text)
                if self._waiters and self.queued_bytes <= self.max_queue_bytes // 2:
                    self._wake()
                event = item.event
                if event is None:
                    continue
                now = now_us()
                kind = event.type.value
                sent[kind] = sent.get(kind, 0) + 1
                if item.replayed:
                    replayed += 1
                elif item.live:
                    send_seconds(max(0, now - event.ts_us) / 1e6)
                written(event.run_id, event.seq)
                record(
                    Receipt(
                        event.event_id,
                        event.run_id,
                        event.seq,
                        self.id,
                        self.user_id,
                        now,
                        None,
                        item.replayed,
                    )
                )
                unflushed += 1
                if unflushed >= 256:
                    counters.count(sent, replayed)
                    replayed = unflushed = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The socket went away under us: an ordinary end of a connection, but one that
            # loses what was queued, so it is worth a line at info.
            log.info("send to connection %s failed, closing it: %r", self.id, exc)
            self.close(CloseCode.GOING_AWAY, send=False)
        finally:
            counters.count(sent, replayed)
            if self._sender is asyncio.current_task():
                self._sender = None
                if not queue:
                    self._queue = None
            self._wake()

    # ---- closing ------------------------------------------------------------------------

    def close(self, code: int, *, send: bool = True) -> None:
        """Close the connection (idempotent; the first code stays). The close happens in the
        background: what was already decided is written first, then the close frame.
        ``send=False``: the socket is already gone, nothing more is written."""
        if self._closing is not None:
            return
        self.protocol.close(code)
        if send:
            self.flush()
        else:
            self._closed(self.protocol.close_code or code, send=False)

    def _closed(self, code: int, *, send: bool, drain: bool = False) -> None:
        if send and drain and self._queue:
            self._closing = asyncio.create_task(self._drain_then_close(code))
            return
        self._drop_queue()
        if self._sender is not None and self._sender is not asyncio.current_task():
            self._sender.cancel()
        if send:
            self._closing = asyncio.create_task(self._close_transport(code))
        else:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            self._closing = done

    def _drop(self, item: Outgoing) -> None:
        """``item`` is never written: an event in it counts as not delivered."""
        event = item.event
        if event is not None and event.seq > self.dropped.get(event.run_id, 0):
            self.dropped[event.run_id] = event.seq

    def _drop_queue(self) -> None:
        for item in self._queue or ():
            self._drop(item)
        if self._queue is not None:
            self._queue.clear()
        self.queued_bytes = 0
        self._wake()

    async def _drain_then_close(self, code: int) -> None:
        """Write what is queued (bounded by :data:`CLOSE_TIMEOUT_S`), then the close frame."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                while self._queue and self._sender is not None:
                    await self._wait_change()
        except TimeoutError:
            log.info(
                "connection %s did not read its last frames within %ss", self.id, CLOSE_TIMEOUT_S
            )
        self._drop_queue()
        if self._sender is not None:
            self._sender.cancel()
        await self._close_transport(code)

    async def _close_transport(self, code: int) -> None:
        reason = _reason(code)
        # A peer that does not read may never take the close frame: bounded wait; the
        # server's keepalive ping timeout then drops the socket.
        try:
            await asyncio.wait_for(self.transport.close(code, reason), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.info(
                "connection %s did not take its close frame within %ss", self.id, CLOSE_TIMEOUT_S
            )
        except Exception as exc:
            # The peer is gone already: nothing left to close.
            log.debug("closing connection %s: %r", self.id, exc)

    def unacked(self) -> list[tuple[str, int, int]]:
        """Per run this connection had: the highest seq sent (or queued and never written)
        and the highest it acked."""
        protocol = self.protocol
        sent, dropped, acked = protocol.sent, self.dropped, protocol.acked
        return [
            (run_id, max(sent.get(run_id, 0), dropped.get(run_id, 0)), acked.get(run_id, 0))
            for run_id in sent.keys() | dropped.keys()
        ]

    # ---- flow control -------------------------------------------------------------------

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_change(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        await waiter

    async def wait_writable(self) -> None:
        """Wait until the send queue is at most half full (or the connection closed)."""
        while not self.closed and self.queued_bytes > self.max_queue_bytes // 2:
            await self._wait_change()

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) until the send queue is empty: used before a graceful close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._queue and not self.closed:
                    await self._wait_change()

    async def wait_closed(self) -> None:
        """Wait until the sender has stopped and the close frame went out (or timed out)."""
        sender = self._sender
        if sender is not None and sender is not asyncio.current_task():
            # The sender ends by cancellation or by its own handled error; anything it
            # raises past that is a bug, and worth its traceback.
            try:
                await sender
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our own cancellation, not the sender's
            except Exception:
                log.exception("sender of connection %s failed", self.id)
        if self._closing is not None:
            await self._closing


def _reason(code: int) -> str:
    try:
        return CLOSE_REASONS[CloseCode(code)]
    except ValueError:
        return ""
