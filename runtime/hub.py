"""Live connections per user, fan-out of committed events, and per-connection send queues.

The hub only ever sees events the audit store has committed (I6). It writes them to the owner's
connections only (I7): every lookup is by the run's owner, never by anything the client says.

Each :class:`Connection` has a bounded send queue, measured in bytes, drained by one sender task:
a client that stops reading fills its queue and is closed with ``4008`` instead of holding
memory or slowing anyone else down; it reconnects and resumes from the store.

The hub also keeps, per run, what it needs to count each event's first acknowledgement once
(``runwatch_events_acked_total``, ``runwatch_event_delivery_seconds``) and the events sent but
never acknowledged when connections close (``runwatch_event_delivery_failures_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .events import Event, EventType, Receipt, now_us
from .metrics import RuntimeMetrics
from .pipeline import Emitted
from .protocol import CLOSE_REASONS, CloseCode, dumps
from .store.audit import AckUpdate

__all__ = ["Connection", "FailureReason", "Hub", "Transport"]

log = logging.getLogger("runwatch.hub")


CLOSE_TIMEOUT_S = 5.0


class Transport(Protocol):
    """What the hub needs of a socket."""

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class DeliveryRecorder(Protocol):
    """Where the hub records deliveries (the audit writer's low-priority queue)."""

    def record_receipt(self, receipt: Receipt) -> None: ...

    def record_ack(self, ack: AckUpdate) -> None: ...

    def settle(self, run_id: str, settled_us: int) -> None: ...


class DeliveryObserver(Protocol):
    """Told of delivery milestones of runs executing here (the run tracer)."""

    def first_acked(self, run_id: str, seq: int, acked_us: int) -> None: ...


class Remote(Protocol):
    """Other replicas, as the hub sees them (the Redis broker)."""

    def owner_elsewhere(self, user_id: str) -> bool: ...

    def ack(self, run_id: str, seq: int, acked_us: int) -> None: ...

    def presence_changed(self, users: set[str]) -> None: ...


class FailureReason:
    """``runwatch_event_delivery_failures_total{reason}`` values, by close code."""

    DISCONNECTED = "disconnected"
    SLOW_CONSUMER = "slow_consumer"
    SERVER_RESTART = "server_restart"
    TOKEN_EXPIRED = "token_expired"
    PROTOCOL_VIOLATION = "protocol_violation"
    ERROR = "error"

    @staticmethod
    def of(code: int) -> str:
        reasons: dict[int, str] = {
            CloseCode.SLOW_CONSUMER: FailureReason.SLOW_CONSUMER,
            CloseCode.SERVER_RESTARTING: FailureReason.SERVER_RESTART,
            CloseCode.UNAUTHORIZED: FailureReason.TOKEN_EXPIRED,
            CloseCode.PROTOCOL_VIOLATION: FailureReason.PROTOCOL_VIOLATION,
            CloseCode.INTERNAL_ERROR: FailureReason.ERROR,
        }
        return reasons.get(code, FailureReason.DISCONNECTED)


@dataclass(slots=True)
class _Outgoing:
    text: str
    event: Event | None = None
    live: bool = False
    replayed: bool = False


class _TypeCounters:
    """Per-type metric children resolved once, not per event."""

    def __init__(self, metrics: RuntimeMetrics) -> None:
        types = [t.value for t in EventType]
        self.sent = {t: metrics.events_sent.labels(type=t) for t in types}
        self.acked = {t: metrics.events_acked.labels(type=t) for t in types}
        self.delivery = {t: metrics.delivery_seconds.labels(type=t) for t in types}


@dataclass
class _RunTrack:
    """What the hub remembers of one run to count first acks and delivery failures."""

    owner: str
    types: dict[int, str] = field(default_factory=dict)
    ts_us: dict[int, int] = field(default_factory=dict)
    live: dict[int, bool] = field(default_factory=dict)
    acked_upto: int = 0
    failed_upto: int = 0
    last_seq: int = 0
    ended: bool = False
    touched: float = field(default_factory=time.monotonic)


class Connection:
    """One authenticated socket of one user."""

    # Slots: thousands of idle connections each carry only what they use.
    __slots__ = (
        "_closing",
        "_queue",
        "_sender",
        "_waiters",
        "acked",
        "close_code",
        "closed",
        "dropped",
        "follow_new_runs",
        "hub",
        "id",
        "max_queue_bytes",
        "queued_bytes",
        "resuming",
        "sent",
        "subscribed",
        "transport",
        "user_id",
    )

    def __init__(
        self,
        connection_id: str,
        user_id: str,
        transport: Transport,
        hub: Hub,
        *,
        max_queue_bytes: int,
    ) -> None:
        self.id = connection_id
        self.user_id = user_id
        self.transport = transport
        self.hub = hub
        self.max_queue_bytes = max_queue_bytes
        self.queued_bytes = 0
        self.subscribed: set[str] = set()
        #: False for a connection that carries only the runs it is given (see Hub.open).
        self.follow_new_runs = True
        self.resuming: dict[str, list[Event]] = {}
        self.sent: dict[str, int] = {}
        #: Highest seq per run that was queued here but never written (the queue was dropped).
        self.dropped: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.closed = False
        self.close_code: int | None = None
        # Allocated while there is something to send: an idle connection holds no queue,
        # no sender task and no waiters.
        self._queue: deque[_Outgoing] | None = None
        #: Waiters for the queue to drain to half (``wait_writable``) or empty (``drain``).
        self._waiters: list[asyncio.Future[None]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    # ---- enqueueing ---------------------------------------------------------------------

    def send_frame(self, frame: dict[str, Any]) -> None:
        self._enqueue(_Outgoing(dumps(frame)))

    def send_event(
        self, event: Event, *, live: bool, replayed: bool = False, text: str | None = None
    ) -> None:
        """Queue an event frame; ``text`` is its JSON when already serialized (live sends)."""
        self._enqueue(_Outgoing(text or event.to_json(), event, live, replayed))

    def _enqueue(self, item: _Outgoing) -> None:
        if self.closed:
            return
        size = len(item.text)
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        if self.queued_bytes + size > self.max_queue_bytes and queue:
            # The client is not reading: close it rather than buffer without bound.
            if item.event is not None:
                self.dropped[item.event.run_id] = item.event.seq
            self.close(CloseCode.SLOW_CONSUMER)
            return
        self.queued_bytes += size
        queue.append(item)
        if self._sender is None:
            # The sender runs only while there is something to send: an idle connection
            # holds no task for it.
            self._sender = asyncio.create_task(self._send_loop(), name=f"runwatch-send-{self.id}")

    async def _send_loop(self) -> None:
        counters = self.hub.counters
        metrics = self.hub.metrics
        record = self.hub.recorder.record_receipt
        send_seconds = metrics.send_seconds.observe
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
                if event.seq > self.sent.get(event.run_id, 0):
                    self.sent[event.run_id] = event.seq
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
                    replayed = self._count_sent(sent, replayed, counters, metrics)
                    unflushed = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away under us
            log.debug("send to %s failed: %r", self.id, exc)
            self.close(CloseCode.GOING_AWAY, send=False)
        finally:
            self._count_sent(sent, replayed, counters, metrics)
            if self._sender is asyncio.current_task():
                self._sender = None
                if not queue:
                    self._queue = None
            self._wake()

    @staticmethod
    def _count_sent(
        sent: dict[str, int], replayed: int, counters: _TypeCounters, metrics: RuntimeMetrics
    ) -> int:
        for kind, count in sent.items():
            counters.sent[kind].inc(count)
        sent.clear()
        if replayed:
            metrics.replayed_events.inc(replayed)
        return 0

    # ---- closing ------------------------------------------------------------------------

    def close(self, code: int, *, send: bool = True) -> None:
        """Close the connection (idempotent); the socket close happens in the background."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        # Events queued for this connection and never written count as not delivered too.
        for item in self._queue or ():
            if item.event is not None and item.event.seq > self.dropped.get(item.event.run_id, 0):
                self.dropped[item.event.run_id] = item.event.seq
        if self._queue is not None:
            self._queue.clear()
        self.queued_bytes = 0
        self._wake()
        if self._sender is not None and self._sender is not asyncio.current_task():
            self._sender.cancel()
        if send:
            self._closing = asyncio.create_task(self._close_transport(code))

    async def _close_transport(self, code: int) -> None:
        reason = _reason(code)
        # A peer that does not read may never take the close frame: bounded wait; the
        # server's keepalive ping timeout then drops the socket.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(code, reason), CLOSE_TIMEOUT_S)

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
        if self._sender is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await self._closing


def _reason(code: int) -> str:
    try:
        return CLOSE_REASONS[CloseCode(code)]
    except ValueError:
        return ""


class Hub:
    """The connections of every user on this runtime instance."""

    def __init__(
        self,
        metrics: RuntimeMetrics,
        recorder: DeliveryRecorder,
        *,
        settle_unknown: Callable[[str, int], Awaitable[None]] | None = None,
        remote: Remote | None = None,
        max_connections_per_user: int = 10,
        max_queue_bytes: int = 1_048_576,
        track_ttl_s: float = 600.0,
        observer: DeliveryObserver | None = None,
    ) -> None:
        self.metrics = metrics
        self.counters = _TypeCounters(metrics)
        self.recorder = recorder
        #: Settles a run this hub does not track (run elsewhere or before a restart) once an
        #: ack reaches its last seq.
        self.settle_unknown = settle_unknown
        #: Other replicas: an owner connected elsewhere, acks of runs running elsewhere, and
        #: which users are connected here.
        self.remote = remote
        self.max_connections_per_user = max_connections_per_user
        self.max_queue_bytes = max_queue_bytes
        self.track_ttl_s = track_ttl_s
        #: Told of each tracked run's first ack; None (tracing off) costs one check per ack.
        self.observer = observer
        self._by_user: dict[str, set[Connection]] = {}
        self._tracks: dict[str, _RunTrack] = {}
        #: Bumped whenever a subscription changes (see :meth:`watched_here`).
        self.version = 0

    # ---- connections --------------------------------------------------------------------

    def connections(self, user_id: str) -> set[Connection]:
        return self._by_user.get(user_id, set())

    def users(self) -> set[str]:
        return set(self._by_user)

    def all_connections(self) -> list[Connection]:
        return [c for conns in self._by_user.values() for c in conns]

    def open(
        self,
        connection_id: str,
        user_id: str,
        transport: Transport,
        *,
        follow_new_runs: bool = True,
    ) -> Connection | None:
        """Register a new connection; None when the user is at the connection limit.
        ``follow_new_runs=False``: the connection gets only the runs it is given (an AG-UI
        stream carries its own run), not every new run of the user (a ``/ws`` tab)."""
        conns = self._by_user.setdefault(user_id, set())
        if len(conns) >= self.max_connections_per_user:
            if not conns:
                del self._by_user[user_id]
            return None
        conn = Connection(
            connection_id, user_id, transport, self, max_queue_bytes=self.max_queue_bytes
        )
        conn.follow_new_runs = follow_new_runs
        conns.add(conn)
        self.version += 1
        self.metrics.connections_open.inc()
        if self.remote is not None and len(conns) == 1:
            self.remote.presence_changed(self.users())
        return conn

    def remove(self, conn: Connection, code: int) -> None:
        """Forget a closed connection; counts what it was sent and nobody acknowledged."""
        conns = self._by_user.get(conn.user_id)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        self.version += 1
        if not conns:
            del self._by_user[conn.user_id]
            if self.remote is not None:
                self.remote.presence_changed(self.users())
        self.metrics.connections_open.dec()
        self.metrics.disconnects.labels(code=str(code)).inc()
        reason = FailureReason.of(code)
        for run_id in conn.sent.keys() | conn.dropped.keys():
            # Sent and never acked, or queued and never written: not delivered.
            sent = max(conn.sent.get(run_id, 0), conn.dropped.get(run_id, 0))
            track = self._tracks.get(run_id)
            if track is None:
                continue
            # Another owner connection that still has the run may yet ack these events.
            if any(run_id in other.subscribed for other in self.connections(conn.user_id)):
                continue
            lo = max(track.acked_upto, track.failed_upto, conn.acked.get(run_id, 0))
            failed = sum(1 for s in range(lo + 1, sent + 1) if track.live.get(s))
            if failed:
                self.metrics.delivery_failures.labels(reason=reason).inc(failed)
            track.failed_upto = max(track.failed_upto, sent)

    # ---- fan-out ------------------------------------------------------------------------

    def is_watched(self, run_id: str, user_id: str) -> bool:
        """True when an owner connection is subscribed to (or resuming) the run: an event
        emitted now is sent live and counts in the delivery SLI."""
        return self.watched_here(run_id, user_id) or (
            self.remote is not None and self.remote.owner_elsewhere(user_id)
        )

    def watched_here(self, run_id: str, user_id: str) -> bool:
        """:meth:`is_watched` for this replica's connections only; its answer changes only when
        :attr:`version` does, so a caller may keep it until then."""
        for conn in self._by_user.get(user_id, ()):
            if run_id in conn.subscribed or run_id in conn.resuming:
                return True
        return False

    def begin_resume(self, conn: Connection, run_id: str) -> list[Event]:
        """Buffer the run's live events for ``conn`` while its replay is read and sent."""
        conn.subscribed.discard(run_id)
        buffer: list[Event] = []
        conn.resuming[run_id] = buffer
        self.version += 1
        return buffer

    def end_resume(self, conn: Connection, run_id: str, *, subscribe: bool) -> None:
        conn.resuming.pop(run_id, None)
        if subscribe:
            conn.subscribed.add(run_id)
        self.version += 1

    def run_started(self, run_id: str, user_id: str, *, track: bool = True) -> None:
        """Every open connection of the owner gets the new run live (every tab). ``track``:
        the run executes here, so its first acks are counted here."""
        for conn in self.connections(user_id):
            if conn.follow_new_runs:
                conn.subscribed.add(run_id)
        self.version += 1
        if track:
            self._tracks[run_id] = _RunTrack(owner=user_id)

    def committed(self, items: Sequence[Emitted]) -> None:
        """The writer's sink: committed events of runs executing here, in commit order."""
        for item in items:
            self.publish(item.event, item.owner, item.live, item.text)

    def publish(self, event: Event, user_id: str, live: bool, text: str | None = None) -> None:
        """Hand a committed event to the owner's connections (I7: only the owner's)."""
        track = self._tracks.get(event.run_id)
        if track is not None:
            track.types[event.seq] = event.type.value
            track.ts_us[event.seq] = event.ts_us
            track.live[event.seq] = live
            track.last_seq = max(track.last_seq, event.seq)
            track.ended = track.ended or event.is_terminal
            track.touched = time.monotonic()
        conns = self._by_user.get(user_id)
        if not conns:
            return
        if text is None:
            text = event.to_json()
        for conn in conns:
            buffer = conn.resuming.get(event.run_id)
            if buffer is not None:
                buffer.append(event)
            elif event.run_id in conn.subscribed:
                conn.send_event(event, live=live, text=text)
                if event.is_terminal:
                    conn.subscribed.discard(event.run_id)
                    self.version += 1

    # ---- acknowledgements ---------------------------------------------------------------

    async def ack(self, conn: Connection, run_id: str, seq: int) -> None:
        """A cumulative ack, clamped to what this connection was sent."""
        seq = min(seq, conn.sent.get(run_id, 0))
        if seq <= conn.acked.get(run_id, 0):
            return
        conn.acked[run_id] = seq
        now = now_us()
        self.recorder.record_ack(AckUpdate(conn.id, run_id, seq, now))
        track = self._tracks.get(run_id)
        if track is None:
            # A run from another replica (it counts the ack) or from before a restart.
            if self.remote is not None:
                self.remote.ack(run_id, seq, now)
            if self.settle_unknown is not None:
                await self.settle_unknown(run_id, seq)
            return
        self._count_acks(run_id, track, seq, now)

    def remote_ack(self, run_id: str, seq: int, acked_us: int) -> None:
        """An owner connection on another replica acknowledged up to ``seq``."""
        track = self._tracks.get(run_id)
        if track is not None:
            self._count_acks(run_id, track, seq, acked_us)

    def _count_acks(self, run_id: str, track: _RunTrack, seq: int, now: int) -> None:
        if self.observer is not None and track.acked_upto == 0 < seq:
            self.observer.first_acked(run_id, seq, now)
        if seq > track.acked_upto:
            acked: dict[str, int] = {}
            delivery = self.counters.delivery
            for s in range(track.acked_upto + 1, seq + 1):
                if track.live.get(s) and s > track.failed_upto:
                    kind = track.types[s]
                    acked[kind] = acked.get(kind, 0) + 1
                    delivery[kind].observe(max(0, now - track.ts_us[s]) / 1e6)
            for kind, count in acked.items():
                self.counters.acked[kind].inc(count)
            track.acked_upto = seq
            track.touched = time.monotonic()
        if track.ended and seq >= track.last_seq:
            self.recorder.settle(run_id, now)
            del self._tracks[run_id]

    def sweep(self) -> None:
        """Forget ended runs nobody acknowledged for ``track_ttl_s`` (bounded memory)."""
        cutoff = time.monotonic() - self.track_ttl_s
        for run_id in [r for r, t in self._tracks.items() if t.ended and t.touched < cutoff]:
            del self._tracks[run_id]

    async def close_all(self, code: int, drain_s: float = 2.0) -> None:
        conns = self.all_connections()
        await asyncio.gather(*(c.drain(drain_s) for c in conns), return_exceptions=True)
        for conn in conns:
            conn.close(code)
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
