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

from ..events import Event, Receipt, now_us
from ..metrics import RuntimeMetrics
from .journal import Journal, JournalFull
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

__all__ = ["AuditWriter"]

log = logging.getLogger("runwatch.audit")


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
        clock_us: Callable[[], int] = now_us,
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
        #: Where events go during a store outage; None: they wait for the store instead.
        self.journal: Journal | None = None
        self.fallback_after_s = 1.0
        #: True while events go to the journal (the store failed, or the journal is not
        #: yet drained: events reach the store in order).
        self.degraded = False
        self._retry_delay = retry_initial_s
        self._next_probe = 0.0
        self._probe: asyncio.Task[None] | None = None
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
        if self.journal is not None and len(self.journal):
            self.degraded = True
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

    async def wait_journal_drained(self) -> None:
        """Wait until the journal is empty and events go straight to the store again."""
        while self.degraded:
            self._wakeup.set()
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        while True:
            if self.degraded:
                await self._degraded_step()
                continue
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
        self._fill_later(batch, later)
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
                if self.journal is not None and now - failing_since >= self.fallback_after_s:
                    self._enter_degraded(runs, later)
                    self._urgent[:0] = events
                    return
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

    # ---- outage: the journal ----------------------------------------------------------

    def _enter_degraded(self, runs: list[_RunItem], later: list[_Later]) -> None:
        log.error("audit store unavailable: events go to the local journal until it is back")
        self.degraded = True
        self._retry_delay = self.retry_initial_s
        self._next_probe = time.monotonic() + self._retry_delay
        self._later[:0] = later
        self._fail_runs(runs)

    def _fail_runs(self, runs: list[_RunItem]) -> None:
        # New runs need the store (idempotency); the client retries with the same id.
        for item in runs:
            if not item.future.done():
                item.future.set_exception(
                    StoreUnavailable("the audit store is unavailable", reason="unavailable")
                )

    async def _degraded_step(self) -> None:
        """Journal new events at once; drain the journal into the store in the background, so
        a store that hangs instead of refusing never delays an event."""
        assert self.journal is not None
        urgent, self._urgent = self._urgent, []
        events = [i for i in urgent if isinstance(i, _EventItem)]
        self._fail_runs([i for i in urgent if isinstance(i, _RunItem)])
        if events:
            committed_us = self.clock_us()
            try:
                # Durable on disk: these events count as persisted now.
                await self.journal.append([(i.event, i.live) for i in events], committed_us)
            except JournalFull as exc:
                log.error("%s: events wait for the store", exc)
                self._urgent[:0] = events
                await asyncio.sleep(self._retry_delay)
            else:
                self._resolve_events(events, committed_us)
        self.metrics.journal_depth.set(len(self.journal))
        if self._probe is None and time.monotonic() >= self._next_probe:
            self._probe = asyncio.create_task(self._drain_chunk())
        waits: set[asyncio.Future[object]] = {asyncio.ensure_future(self._wait_urgent())}
        if self._probe is not None:
            waits.add(self._probe)  # type: ignore[arg-type]
        timeout = max(0.0, self._next_probe - time.monotonic()) if self._probe is None else None
        _done, pending = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        for task in pending:
            if task is not self._probe:
                task.cancel()
        if self._probe is not None and self._probe.done():
            self._probe = None

    async def _drain_chunk(self) -> None:
        assert self.journal is not None
        chunk = self.journal.pending(self.max_batch)
        later, self._later = self._later, []
        batch = Batch(journaled=[(e.event, e.live, e.committed_us) for e in chunk])
        self._fill_later(batch, later)
        try:
            await self.store.write(batch, self.clock_us())
        except StoreError as exc:
            self.metrics.audit_write_errors.inc()
            self.metrics.store_up.set(0)
            self._later[:0] = later
            log.debug("audit store still unavailable: %s", exc)
            self._next_probe = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)
            return
        self.metrics.store_up.set(1)
        self._retry_delay = self.retry_initial_s
        self._next_probe = 0.0
        await self.journal.drained(len(chunk))
        self.metrics.journal_depth.set(len(self.journal))
        if not len(self.journal) and not self._urgent:
            log.warning("audit store is back: journal drained")
            self.degraded = False

    async def _wait_urgent(self) -> None:
        while not self._urgent:
            self._wakeup.clear()
            await self._wakeup.wait()

    @staticmethod
    def _fill_later(batch: Batch, later: list[_Later]) -> None:
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

    def _resolve_events(self, events: list[_EventItem], committed_us: int) -> None:
        done_us = self.clock_us()
        for item in events:
            if not item.future.done():
                self.metrics.persist_seconds.observe(max(0, done_us - item.event.ts_us) / 1e6)
                item.future.set_result(committed_us)
