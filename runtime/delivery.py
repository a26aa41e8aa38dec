"""Delivery accounting: each event's first acknowledgement, counted once, and the events sent
but never acknowledged.

:class:`DeliveryTracker` remembers, per run executing on this replica, each event's type,
emission time and whether it was emitted live (an owner connection was watching). From that it
counts, once per event and at its first ack by any owner connection (here or, through the
broker, on another replica), ``runwatch_events_acked_total`` and
``runwatch_event_delivery_seconds``; events sent live and never acknowledged before the last
owner connection that had them closed count in ``runwatch_event_delivery_failures_total``. Once
a run has ended and its last seq is acknowledged, the run is settled in the store and
forgotten; runs nobody acknowledges are forgotten after ``track_ttl_s`` (bounded memory).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .events import Event, EventType, Receipt
from .metrics import RuntimeMetrics
from .protocol import CloseCode
from .store.audit import AckUpdate

__all__ = ["DeliveryObserver", "DeliveryRecorder", "DeliveryTracker", "FailureReason"]


class DeliveryRecorder(Protocol):
    """Where deliveries are recorded (the audit writer's low-priority queue)."""

    def record_receipt(self, receipt: Receipt) -> None: ...

    def record_ack(self, ack: AckUpdate) -> None: ...

    def settle(self, run_id: str, settled_us: int) -> None: ...


class DeliveryObserver(Protocol):
    """Told of delivery milestones of runs executing here (the run tracer)."""

    def first_acked(self, run_id: str, seq: int, acked_us: int) -> None: ...


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
class _RunTrack:
    """What is remembered of one run to count first acks and delivery failures."""

    types: dict[int, str] = field(default_factory=dict)
    ts_us: dict[int, int] = field(default_factory=dict)
    live: dict[int, bool] = field(default_factory=dict)
    acked_upto: int = 0
    failed_upto: int = 0
    last_seq: int = 0
    ended: bool = False
    touched: float = field(default_factory=time.monotonic)


class DeliveryTracker:
    """First acks and delivery failures of the runs executing on this replica."""

    def __init__(
        self,
        metrics: RuntimeMetrics,
        recorder: DeliveryRecorder,
        *,
        settle_unknown: Callable[[str, int], Awaitable[None]] | None = None,
        track_ttl_s: float = 600.0,
        observer: DeliveryObserver | None = None,
    ) -> None:
        self.metrics = metrics
        self.recorder = recorder
        types = [t.value for t in EventType]
        # Per-type metric children resolved once, not per event.
        self._acked = {t: metrics.events_acked.labels(type=t) for t in types}
        self._delivery = {t: metrics.delivery_seconds.labels(type=t) for t in types}
        #: Settles a run not tracked here (run elsewhere or before a restart) once an ack
        #: reaches its last seq.
        self.settle_unknown = settle_unknown
        self.track_ttl_s = track_ttl_s
        #: Told of each tracked run's first ack; None (tracing off) costs one check per ack.
        self.observer = observer
        self._tracks: dict[str, _RunTrack] = {}

    def track(self, run_id: str) -> None:
        """The run executes here: its first acks are counted here."""
        self._tracks[run_id] = _RunTrack()

    def tracks(self, run_id: str) -> bool:
        return run_id in self._tracks

    def committed(self, event: Event, live: bool) -> None:
        """A committed event of a tracked run is about to be fanned out."""
        track = self._tracks.get(event.run_id)
        if track is None:
            return
        seq = event.seq
        track.types[seq] = event.type.value
        track.ts_us[seq] = event.ts_us
        track.live[seq] = live
        if seq > track.last_seq:
            track.last_seq = seq
        track.ended = track.ended or event.is_terminal
        track.touched = time.monotonic()

    async def acked(self, run_id: str, seq: int, acked_us: int) -> bool:
        """An owner connection here acknowledged up to ``seq`` (already clamped). False when
        the run is not tracked here (the caller tells the other replicas)."""
        track = self._tracks.get(run_id)
        if track is None:
            if self.settle_unknown is not None:
                await self.settle_unknown(run_id, seq)
            return False
        self._count(run_id, track, seq, acked_us)
        return True

    def remote_acked(self, run_id: str, seq: int, acked_us: int) -> None:
        """An owner connection on another replica acknowledged up to ``seq``."""
        track = self._tracks.get(run_id)
        if track is not None:
            self._count(run_id, track, seq, acked_us)

    def _count(self, run_id: str, track: _RunTrack, seq: int, now: int) -> None:
        if self.observer is not None and track.acked_upto == 0 < seq:
            self.observer.first_acked(run_id, seq, now)
        if seq > track.acked_upto:
            acked: dict[str, int] = {}
            delivery = self._delivery
            for s in range(track.acked_upto + 1, seq + 1):
                # Only events sent live, and not already counted as failed, are in the SLI.
                if track.live.get(s) and s > track.failed_upto:
                    kind = track.types[s]
                    acked[kind] = acked.get(kind, 0) + 1
                    delivery[kind].observe(max(0, now - track.ts_us[s]) / 1e6)
            for kind, count in acked.items():
                self._acked[kind].inc(count)
            track.acked_upto = seq
            track.touched = time.monotonic()
        if track.ended and seq >= track.last_seq:
            self.recorder.settle(run_id, now)
            del self._tracks[run_id]

    def connection_lost(
        self, reason: str, unacked: Iterable[tuple[str, int, int]], still_watched: set[str]
    ) -> None:
        """A connection closed. ``unacked``: per run, the highest seq it was sent (or queued and
        never written) and the highest it acked; runs in ``still_watched`` are held by another
        owner connection, which may yet ack them."""
        for run_id, sent, acked in unacked:
            track = self._tracks.get(run_id)
            if track is None or run_id in still_watched:
                continue
            lo = max(track.acked_upto, track.failed_upto, acked)
            failed = sum(1 for s in range(lo + 1, sent + 1) if track.live.get(s))
            if failed:
                self.metrics.delivery_failures.labels(reason=reason).inc(failed)
            track.failed_upto = max(track.failed_upto, sent)

    def sweep(self) -> None:
        """Forget ended runs nobody acknowledged for ``track_ttl_s`` (bounded memory)."""
        cutoff = time.monotonic() - self.track_ttl_s
        for run_id in [r for r, t in self._tracks.items() if t.ended and t.touched < cutoff]:
            del self._tracks[run_id]
