"""Live connections per user, and the fan-out of committed events to them.

The hub only ever sees events the audit store has committed (I6). It hands them to the owner's
connections only (I7): every lookup is by the run's owner, never by anything the client says.
What a connection does with an event (send it, hold it during a resume, ignore it) is that
connection's rule (``connection.py``); writing it is its sender's job (``sender.py``); counting
first acks and delivery failures is the delivery tracker's (``delivery.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from .connection import ConnectionProtocol, State
from .delivery import DeliveryTracker, FailureReason
from .events import Event, now_us
from .metrics import RuntimeMetrics
from .pipeline import Emitted
from .sender import Connection, SendCounters, Transport
from .store.audit import AckUpdate

__all__ = ["Hub", "Remote"]


class Remote(Protocol):
    """Other replicas, as the hub sees them (the Redis broker)."""

    def owner_elsewhere(self, user_id: str) -> bool: ...

    def ack(self, run_id: str, seq: int, acked_us: int) -> None: ...

    def presence_changed(self, users: set[str]) -> None: ...


class Hub:
    """The connections of every user on this runtime instance."""

    def __init__(
        self,
        metrics: RuntimeMetrics,
        delivery: DeliveryTracker,
        *,
        remote: Remote | None = None,
        max_connections_per_user: int = 10,
        max_queue_bytes: int = 1_048_576,
        max_bad_frames: int = 20,
    ) -> None:
        self.metrics = metrics
        self.delivery = delivery
        self.counters = SendCounters(metrics, delivery.recorder)
        #: Other replicas: an owner connected elsewhere, acks of runs running elsewhere, and
        #: which users are connected here.
        self.remote = remote
        self.max_connections_per_user = max_connections_per_user
        self.max_queue_bytes = max_queue_bytes
        self.max_bad_frames = max_bad_frames
        self._by_user: dict[str, set[Connection]] = {}
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
        protocol: ConnectionProtocol | None = None,
    ) -> Connection | None:
        """Register a new connection; None when the user is at the connection limit.
        ``protocol``: the connection's rules, already past ``connect`` (a ``/ws`` tab); by
        default an open connection that carries only the runs it is given (an AG-UI stream)."""
        conns = self._by_user.setdefault(user_id, set())
        # A closed connection still writing its last frames does not count towards the limit.
        if len(conns) >= self.max_connections_per_user and (
            sum(not c.closed for c in conns) >= self.max_connections_per_user
        ):
            if not conns:
                del self._by_user[user_id]
            return None
        if protocol is None:
            protocol = ConnectionProtocol(
                max_bad_frames=self.max_bad_frames, follow_new_runs=False, state=State.OPEN
            )
        conn = Connection(
            connection_id,
            user_id,
            transport,
            protocol,
            self.counters,
            max_queue_bytes=self.max_queue_bytes,
        )
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
        # Another owner connection that still has a run may yet ack its events.
        still_watched = {
            run_id
            for other in conns
            for run_id in other.protocol.subscribed
            if run_id in conn.protocol.sent or run_id in conn.dropped
        }
        self.delivery.connection_lost(FailureReason.of(code), conn.unacked(), still_watched)

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
        return any(conn.protocol.follows(run_id) for conn in self._by_user.get(user_id, ()))

    def begin_resume(self, conn: Connection, run_id: str) -> None:
        """Hold the run's live events for ``conn`` while its replay is read and sent."""
        conn.protocol.begin_resume(run_id)
        self.version += 1

    def finish_resume(
        self, conn: Connection, run_id: str, after_seq: int, replay: list[Event], ended: bool
    ) -> None:
        """Send ``resumed``, then what was held past the replay; then the run is live."""
        conn.protocol.finish_resume(run_id, after_seq, replay, ended)
        conn.flush()
        self.version += 1

    def abort_resume(self, conn: Connection, run_id: str) -> None:
        conn.protocol.abort_resume(run_id)
        self.version += 1

    def run_started(self, run_id: str, user_id: str, *, track: bool = True) -> None:
        """Every open connection of the owner that follows new runs gets the run live (every
        tab). ``track``: the run executes here, so its first acks are counted here."""
        for conn in self.connections(user_id):
            conn.protocol.run_started(run_id)
        self.version += 1
        if track:
            self.delivery.track(run_id)

    def follow(self, conn: Connection, run_id: str) -> None:
        """``conn`` gets the run's live events from now (an AG-UI stream of a new run)."""
        conn.protocol.subscribed.add(run_id)
        self.version += 1

    def committed(self, items: Sequence[Emitted]) -> None:
        """The writer's sink: committed events of runs executing here, in commit order."""
        for item in items:
            self.publish(item.event, item.owner, item.live, item.text)

    def publish(self, event: Event, user_id: str, live: bool, text: str | None = None) -> None:
        """Hand a committed event to the owner's connections (I7: only the owner's)."""
        self.delivery.committed(event, live)
        conns = self._by_user.get(user_id)
        if not conns:
            return
        if text is None:
            text = event.to_json()
        for conn in conns:
            if conn.protocol.event_committed(event, live, text):
                self.version += 1
            conn.flush()

    # ---- acknowledgements ---------------------------------------------------------------

    async def ack(self, conn: Connection, run_id: str, seq: int) -> None:
        """``conn`` acknowledged up to ``seq``, already clamped by its protocol."""
        now = now_us()
        self.delivery.recorder.record_ack(AckUpdate(conn.id, run_id, seq, now))
        if not self.delivery.tracks(run_id) and self.remote is not None:
            # A run from another replica (it counts the ack) or from before a restart.
            self.remote.ack(run_id, seq, now)
        await self.delivery.acked(run_id, seq, now)

    def remote_ack(self, run_id: str, seq: int, acked_us: int) -> None:
        """An owner connection on another replica acknowledged up to ``seq``."""
        self.delivery.remote_acked(run_id, seq, acked_us)

    async def close_all(self, code: int, drain_s: float = 2.0) -> None:
        conns = self.all_connections()
        await asyncio.gather(*(c.drain(drain_s) for c in conns), return_exceptions=True)
        for conn in conns:
            conn.close(code)
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
