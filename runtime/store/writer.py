"""The group-commit audit writer: the one path by which the runtime writes the store.

Every event goes through :meth:`AuditWriter.persist`, which returns once the event is committed
(I6, ``after_persist``: committed before it is written to any socket). Events that arrive while a
commit is in flight wait for the next one, so N concurrent runs share one commit instead of paying
N: that is the group commit. New runs (:meth:`create_run`) ride in the same commits, so on SQLite
there is exactly one writing connection and no lock contention.

Receipts, acks, settles and connection records are written by nobody's wait: they are held back
up to ``low_priority_delay_s`` and then join a commit, so they add little to the commits that
events wait on.

When the store fails (:class:`StoreUnavailable`) the batch is kept and retried with backoff:
nothing is dropped. After ``fallback_after_s`` of failure, events go to the :attr:`fallback`
(the local journal), which counts as persisted, so delivery goes on through an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..events import Event, Receipt
from ..metrics import RuntimeMetrics
from .recorder import (
    AckUpdate,
    AuditStore,
    Batch,
    ConnectionClose,
    ConnectionOpen,
    RunInfo,
    StoreError,
    StoreUnavailable,
)

__all__ = ["AuditWriter", "Fallback"]

log = logging.getLogger("runwatch.audit")


def wall_us() -> int:
    return time.time_ns() // 1000


class Fallback(Protocol):
    """Somewhere durable to put events while the store is failing (the local journal)."""

    async def append(self, events: list[tuple[Event, bool]], committed_us: int) -> None: ...


@dataclass(slots=True)
class _EventItem:
    event: Event
    live: bool
    future: asyncio.Future[int]


@dataclass(slots=True)
class _RunItem:
    run: RunInfo
    new_thread: bool
    future: asyncio.Future[tuple[RunInfo, bool]]


@dataclass(frozen=True, slots=True)
class _Settle:
    run_id: str
    settled_us: int


_Urgent = _EventItem | _RunItem
_Later = Receipt | AckUpdate | _Settle | ConnectionOpen | ConnectionClose


class AuditWriter:
    """One background task that commits everything the runtime records, in groups."""

    def __init__(
        self,
        store: AuditStore,
        metrics: RuntimeMetrics,
        *,
        clock_us: Callable[[], int] = wall_us,
        max_batch: int = 1000,
        low_priority_delay_s: float = 0.05,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock_us = clock_us
        self.max_batch = max_batch
        self.low_priority_delay_s = low_priority_delay_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.fallback: Fallback | None = None
        self.fallback_after_s = 1.0
        self._urgent: list[_Urgent] = []
        self._later: list[_Later] = []
        self._later_since = 0.0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._flush_requested = False

    # ---- producers ----------------------------------------------------------------------

    async def persist(self, event: Event, live: bool) -> int:
        """Commit ``event``; returns its commit time (epoch µs) once it is durable."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._urgent.append(_EventItem(event, live, future))
        self._changed()
        return await future

    async def create_run(self, run: RunInfo, new_thread: bool) -> tuple[RunInfo, bool]:
        """:meth:`AuditStore.create_run`, committed with the next group."""
        future: asyncio.Future[tuple[RunInfo, bool]] = asyncio.get_running_loop().create_future()
        self._urgent.append(_RunItem(run, new_thread, future))
        self._changed()
        return await future

    def record_receipt(self, receipt: Receipt) -> None:
        self._add_later(receipt)

    def record_ack(self, ack: AckUpdate) -> None:
        self._add_later(ack)

    def settle(self, run_id: str, settled_us: int) -> None:
        self._add_later(_Settle(run_id, settled_us))

    def connection_opened(self, info: ConnectionOpen) -> None:
        self._add_later(info)

    def connection_closed(self, info: ConnectionClose) -> None:
        self._add_later(info)

    def _add_later(self, item: _Later) -> None:
        if not self._later:
            self._later_since = time.monotonic()
        self._later.append(item)
        self._changed()

    def _changed(self) -> None:
        self._all_done.clear()
        self.metrics.audit_queue_depth.set(len(self._urgent) + len(self._later))
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._urgent) + len(self._later)

    # ---- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="runwatch-audit-writer")

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over so far is committed; False on timeout."""
        self._flush_requested = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._flush_requested = False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        await self.flush(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            if not self._urgent and not self._later:
                self._all_done.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._urgent and not self._flush_requested:
                # Only low-priority items: let them gather for a moment.
                wait = self.low_priority_delay_s - (time.monotonic() - self._later_since)
                if wait > 0 and len(self._later) < self.max_batch:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    continue
            urgent, self._urgent = self._urgent[: self.max_batch], self._urgent[self.max_batch :]
            later: list[_Later] = []
            due = time.monotonic() - self._later_since >= self.low_priority_delay_s
            if self._later and (due or not urgent or self._flush_requested):
                later, self._later = self._later, []
            await self._commit(urgent, later)
            self.metrics.audit_queue_depth.set(len(self._urgent) + len(self._later))

    async def _commit(self, urgent: list[_Urgent], later: list[_Later]) -> None:
        batch = Batch()
        runs: list[_RunItem] = []
        events: list[_EventItem] = []
        for item in urgent:
            if isinstance(item, _EventItem):
                events.append(item)
                batch.events.append((item.event, item.live))
            else:
                runs.append(item)
                batch.new_runs.append((item.run, item.new_thread))
        for low in later:
            if isinstance(low, Receipt):
                batch.receipts.append(low)
            elif isinstance(low, AckUpdate):
                batch.acks.append(low)
            elif isinstance(low, _Settle):
                batch.settles.append((low.run_id, low.settled_us))
            elif isinstance(low, ConnectionOpen):
                batch.opened.append(low)
            else:
                batch.closed.append(low)
        delay = self.retry_initial_s
        failing_since: float | None = None
        while True:
            committed_us = self.clock_us()
            try:
                created = await self.store.write(batch, committed_us)
                break
            except StoreUnavailable as exc:
                self.metrics.audit_write_errors.inc()
                self.metrics.store_up.set(0)
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                log.warning("audit store write failed (%s); retrying in %.2fs", exc, delay)
                if (
                    self.fallback is not None
                    and events
                    and now - failing_since >= self.fallback_after_s
                ):
                    # The journal is durable: these events count as persisted now.
                    await self.fallback.append(batch.events, committed_us)
                    self._resolve_events(events, committed_us)
                    events, batch.events = [], []
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            except StoreError as exc:
                # Not transient: retrying cannot help. Tell the waiters; never hang them.
                self.metrics.audit_write_errors.inc()
                log.error("audit store rejected a batch of %d: %s", len(batch), exc)
                waiting: list[asyncio.Future[int]] | list[asyncio.Future[tuple[RunInfo, bool]]]
                for waiting in ([e.future for e in events], [r.future for r in runs]):
                    for future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                return
        self.metrics.store_up.set(1)
        self.metrics.audit_batch_size.observe(len(batch))
        self._resolve_events(events, committed_us)
        for item, result in zip(runs, created, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _resolve_events(self, events: list[_EventItem], committed_us: int) -> None:
        done_us = self.clock_us()
        for item in events:
            if not item.future.done():
                self.metrics.persist_seconds.observe(max(0, done_us - item.event.ts_us) / 1e6)
                item.future.set_result(committed_us)
