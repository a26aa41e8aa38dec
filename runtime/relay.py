"""Relaying the other replicas' fan-out to this replica's connections, without gaps.

Redis pub/sub is at-most-once: a subscriber connection that Redis drops (its output-buffer
limit does this to a slow subscriber) loses whatever was published until it is back. The relay
makes such a loss invisible to local connections. It remembers, per relayed run, the last seq
it handed to the hub, and resynchronises from the audit store (which holds every event a
replica published: I6) whenever it learns that messages may have been lost:

- ``reconnect``: the subscription dropped and was re-established;
- ``lost_messages``: a publisher's message counter jumped;
- ``gap``: a run's next event is not the seq after the last one relayed.

A resync replays the missing seqs of a run into the hub before any later live event of that
run (those wait in a per-run buffer meanwhile), so a local connection sees every seq in order.
After a loss, runs of local users that started while the subscription was deaf (their ``run``
message lost) are found in the store, subscribed like any new run, and replayed from seq 1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from .events import Event
from .store.audit import AuditStore, StoreError

__all__ = ["RESYNC_REASONS", "Relay", "ResyncReason"]

log = logging.getLogger("runwatch.relay")

#: A run that started this long before the last message heard before a loss may have had its
#: ``run`` message lost too (clocks of replicas differ a little).
DEAF_MARGIN_US = 2_000_000
#: Forget relayed runs untouched for this long (bounded memory).
FORGET_AFTER_S = 300.0


class ResyncReason:
    """``runwatch_fanout_resyncs_total{reason}`` values."""

    RECONNECT = "reconnect"
    LOST_MESSAGES = "lost_messages"
    GAP = "gap"


RESYNC_REASONS = (ResyncReason.RECONNECT, ResyncReason.LOST_MESSAGES, ResyncReason.GAP)


class RelayHub(Protocol):
    """What the relay needs of the hub."""

    def publish(self, event: Event, user_id: str, live: bool, text: str | None = None) -> None: ...

    def run_started(self, run_id: str, user_id: str, *, track: bool = True) -> None: ...

    def remote_ack(self, run_id: str, seq: int, acked_us: int) -> None: ...

    def users(self) -> set[str]: ...


class Canceller(Protocol):
    def cancel(self, run_id: str) -> object: ...


@dataclass(slots=True)
class _Relayed:
    owner: str
    #: The last seq handed to the hub, in order, with nothing missing before it.
    last: int = 0
    ended: bool = False
    repaired: bool = False
    touched: float = field(default_factory=time.monotonic)


class Relay:
    """Applies the other replicas' fan-out here (see :class:`~runtime.broker.BrokerInbound`)."""

    def __init__(
        self,
        hub: RelayHub,
        engine: Canceller,
        store: AuditStore,
        *,
        instance_id: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.hub = hub
        self.instance_id = instance_id
        self.engine = engine
        self.store = store
        self.resyncs = Counter(
            "runwatch_fanout_resyncs_total",
            "Runs relayed from another replica whose missing events were replayed from the "
            "store, by what revealed the loss.",
            ["reason"],
            registry=registry,
        )
        for reason in RESYNC_REASONS:
            self.resyncs.labels(reason=reason)
        self.resync_events = Counter(
            "runwatch_fanout_resync_events_total",
            "Events replayed from the store into this replica's fan-out after a loss.",
            registry=registry,
        )
        self._runs: dict[str, _Relayed] = {}
        #: run_id -> live events that arrived while the run's resync read the store.
        self._pending: dict[str, list[tuple[Event, bool]]] = {}
        #: Wall clock (µs) of the last message heard before a loss, while it may matter.
        self._deaf_since_us: int | None = None
        self._deaf_reason: str = ResyncReason.RECONNECT
        self._deaf_until = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._swept = time.monotonic()
        #: Distinct runs that a resync repaired (they would have reached clients with gaps).
        self.runs_repaired = 0

    # ---- BrokerInbound --------------------------------------------------------------------

    def remote_run_started(self, run_id: str, owner: str) -> None:
        if run_id in self._runs:
            return  # a resync found it first (its ``run`` message was late, not lost)
        self.hub.run_started(run_id, owner, track=False)
        if self.hub_has(owner):
            self._runs.setdefault(run_id, _Relayed(owner))
        self._sweep()

    def remote_event(self, event: Event, owner: str, live: bool) -> None:
        run_id = event.run_id
        pending = self._pending.get(run_id)
        if pending is not None:
            pending.append((event, live))
            return
        state = self._runs.get(run_id)
        if state is None:
            if not self.hub_has(owner):
                self.hub.publish(event, owner, live)  # only resuming connections care
                return
            if event.seq == 1:
                # The ``run`` message was lost but the run is new: follow it like one.
                self.hub.run_started(run_id, owner, track=False)
                state = self._runs[run_id] = _Relayed(owner)
            elif self._deaf():
                # It may have started while we were deaf: the store decides.
                self._runs[run_id] = _Relayed(owner, last=event.seq - 1)
                self._start(run_id, self._deaf_reason, [(event, live)], discover=True)
                return
            else:
                # In flight before we heard of it: connections get it only by ``resume``.
                state = self._runs[run_id] = _Relayed(owner, last=event.seq - 1)
        self._relay(state, event, live)

    def remote_cancel(self, run_id: str) -> None:
        self.engine.cancel(run_id)

    def remote_ack(self, run_id: str, seq: int, acked_us: int) -> None:
        self.hub.remote_ack(run_id, seq, acked_us)

    def local_users(self) -> set[str]:
        return self.hub.users()

    def lost(self, reason: str, since_us: int | None) -> None:
        """The broker may have missed messages (the subscription dropped, or a publisher's
        counter jumped) since ``since_us``: resynchronise every run relayed to local users."""
        if since_us is not None:
            self._deaf_since_us = min(self._deaf_since_us or since_us, since_us)
            self._deaf_until = time.monotonic() + 30.0
            self._deaf_reason = reason
        log.warning(
            "fan-out messages may have been lost (%s): resynchronising from the store", reason
        )
        for run_id, state in list(self._runs.items()):
            if not state.ended and run_id not in self._pending and self.hub_has(state.owner):
                self._start(run_id, reason, [])
        self._spawn(self._discover(reason))

    # ---- relaying -------------------------------------------------------------------------

    def hub_has(self, owner: str) -> bool:
        return owner in self.hub.users()

    def _deaf(self) -> bool:
        return self._deaf_since_us is not None and time.monotonic() < self._deaf_until

    def _relay(self, state: _Relayed, event: Event, live: bool) -> None:
        state.touched = time.monotonic()
        if event.seq <= state.last:
            return  # already handed over (a replay and the live message crossed)
        if event.seq > state.last + 1:
            self._start(event.run_id, ResyncReason.GAP, [(event, live)])
            return
        state.last = event.seq
        state.ended = state.ended or event.is_terminal
        self.hub.publish(event, state.owner, live)

    def _start(
        self, run_id: str, reason: str, held: list[tuple[Event, bool]], *, discover: bool = False
    ) -> None:
        self._pending[run_id] = held
        self._spawn(self._resync(run_id, reason, discover=discover))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync(self, run_id: str, reason: str, *, discover: bool = False) -> None:
        """Replay the run's seqs after the last relayed one, then what waited meanwhile."""
        state = self._runs[run_id]
        replayed = 0
        try:
            events: list[Event] = []
            if discover:
                # Started while we were deaf (so its ``run`` message was lost): follow it from
                # seq 1 like a new run. Otherwise it was in flight before: ``resume`` only.
                run = await self.store.get_run(run_id)
                since = self._deaf_since_us
                if (
                    run is not None
                    and since is not None
                    and run.created_us >= since - DEAF_MARGIN_US
                ):
                    self.hub.run_started(run_id, state.owner, track=False)
                    state.last = 0
                    events = await self.store.run_events(run_id, 0)
            else:
                events = await self.store.run_events(run_id, state.last)
            for event in events:
                if event.seq == state.last + 1:
                    state.last = event.seq
                    state.ended = state.ended or event.is_terminal
                    self.hub.publish(event, state.owner, False)
                    replayed += 1
        except (StoreError, OSError) as exc:
            log.warning("fan-out resync of run %s failed (%s); clients resume it", run_id, exc)
        finally:
            held = self._pending.pop(run_id, [])
            if replayed:
                self.resyncs.labels(reason=reason).inc()
                self.resync_events.inc(replayed)
                if not state.repaired:
                    state.repaired = True
                    self.runs_repaired += 1
            for event, live in held:
                if event.seq > state.last + 1:
                    state.last = event.seq - 1  # the store did not have it: no second try
                self._relay(state, event, live)

    async def _discover(self, reason: str) -> None:
        """Runs of local users that started while we were deaf, of which nothing arrived."""
        since = self._deaf_since_us
        if since is None:
            return
        for owner in self.hub.users():
            try:
                runs = await self.store.runs_since(owner, since - DEAF_MARGIN_US)
            except (StoreError, OSError) as exc:
                log.warning("fan-out resync: cannot list runs of a user (%s)", exc)
                return
            for run in runs:
                run_id = run.run_id
                if run_id in self._runs or run.instance_id == self.instance_id:
                    continue
                self.hub.run_started(run_id, owner, track=False)
                self._runs[run_id] = _Relayed(owner)
                self._start(run_id, reason, [])

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < 30.0:
            return
        self._swept = now
        cutoff = now - FORGET_AFTER_S
        for run_id in [r for r, s in self._runs.items() if s.touched < cutoff]:
            if run_id not in self._pending:
                del self._runs[run_id]
        if self._deaf_since_us is not None and not self._deaf():
            self._deaf_since_us = None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
