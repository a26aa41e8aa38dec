"""The event pipeline's parts: an emitted event on its way, a run's outbox, the committed sink.

Data flows one way (I6: committed before sent)::

    engine -> lifecycle -> Emitted -> run Outbox -> AuditWriter (group commit)
           -> CommittedSink (hub: sockets; broker: other replicas), in commit order

Emitting assigns ``seq``, ``ts`` and ``event_id`` at once (the lifecycle), serializes the
envelope to JSON once (:attr:`Emitted.text`, the exact bytes every socket gets) and hands it to
the writer. The agent does not wait for the commit: it waits only when its run's
:class:`Outbox` is full (backpressure), and where the meaning needs it (a ``tool_executing``
before its tool runs, the terminal event before the run counts as finished).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .events import Event

__all__ = ["CommittedSink", "Emitted", "Fanout", "Outbox", "RunSink"]


class Outbox:
    """The uncommitted events of one run, bounded: the agent's backpressure."""

    __slots__ = ("_space", "limit", "pending")

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.pending = 0
        self._space = asyncio.Event()
        self._space.set()

    @property
    def full(self) -> bool:
        return self.pending >= self.limit

    async def wait_space(self) -> None:
        """Return once the outbox has room for one more event."""
        while self.pending >= self.limit:
            self._space.clear()
            await self._space.wait()

    def add(self) -> None:
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1
        if self.pending < self.limit:
            self._space.set()


@dataclass(slots=True, eq=False)
class Emitted:
    """One emitted event on its way from the engine to the store and the sockets.

    ``live``: an owner connection watched the run when the event was emitted (it counts in the
    delivery SLI; otherwise it is deferred). ``committed_us`` is set by the writer at commit.
    ``durable`` is set when the emitter waits for the commit.
    """

    event: Event
    text: str
    owner: str
    live: bool
    outbox: Outbox | None = None
    durable: asyncio.Future[int] | None = None
    committed_us: int = 0
    #: Counted in ``runwatch_events_emitted_total`` (once, even if its batch is retried).
    counted: bool = False

    @classmethod
    def of(cls, event: Event, owner: str, live: bool, outbox: Outbox | None = None) -> Emitted:
        return cls(event, event.to_json(), owner, live, outbox)


class CommittedSink(Protocol):
    """Where the writer hands committed events, in commit order (so per-run seq order)."""

    def committed(self, items: Sequence[Emitted]) -> None: ...


class RunSink(CommittedSink, Protocol):
    """A committed sink that also learns of new runs before their first event."""

    def run_started(self, run_id: str, owner: str) -> None: ...


class Fanout:
    """Several sinks as one: the hub first (this replica's sockets), then the broker."""

    def __init__(self, sinks: Sequence[RunSink]) -> None:
        self.sinks = tuple(sinks)

    def run_started(self, run_id: str, owner: str) -> None:
        for sink in self.sinks:
            sink.run_started(run_id, owner)

    def committed(self, items: Sequence[Emitted]) -> None:
        for sink in self.sinks:
            sink.committed(items)
