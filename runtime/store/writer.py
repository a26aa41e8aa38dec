"""The group-commit audit writer: the one path by which the runtime writes the store.

Emitted events arrive through :meth:`AuditWriter.submit` without waiting. One task drains them
into one transaction while the next batch gathers, so batches grow with load: under one
streaming run a commit holds every event emitted while the previous commit ran; under many
runs, every run's events share it. Committed batches go, in commit order, to the
:class:`~runtime.pipeline.CommittedSink` (the hub and the broker): nothing reaches a socket
before its commit (I6). New runs (:meth:`create_run`) ride in the same commits, so on SQLite
there is exactly one writing connection and no lock contention.

Receipts, acks, settles and connection records are written by nobody's wait: they are held back
up to ``low_priority_delay_s`` and then join a commit, so they add little to the commits that
events wait on.

When the store fails (:class:`StoreUnavailable`) the batch is kept and retried with backoff:
nothing is dropped. After ``fallback_after_s`` of failure, events go to the journal (the local
write-ahead file), which counts as persisted, so delivery goes on through an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..events import Receipt, now_us
from ..metrics import RuntimeMetrics
from ..pipeline import CommittedSink, Emitted
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

__all__ = ["AuditWriter", "DeliveryLog"]

log = logging.getLogger("runwatch.audit")


@dataclass(slots=True)
class _RunItem:
    run: RunInfo
    new_thread: bool
    future: asyncio.Future[tuple[RunInfo, bool]]


@dataclass(frozen=True, slots=True)
class _Settle:
    run_id: str
    settled_us: int


_Later = Receipt | AckUpdate | _Settle | ConnectionOpen | ConnectionClose


class DeliveryLog:
    """Receipts, acks, settles and connection records on their way to a commit.

    Nobody waits for these: they are appended here and join the writer's next commit that is
    due (see :attr:`AuditWriter.low_priority_delay_s`), so they never slow an event's commit.
    """

    def __init__(self) -> None:
        self.items: list[_Later] = []
        self.since = 0.0
        #: Set when something is added; the writer waits on it.
        self.wakeup = asyncio.Event()

    def record_receipt(self, receipt: Receipt) -> None:
        self._add(receipt)

    def record_ack(self, ack: AckUpdate) -> None:
        self._add(ack)

    def settle(self, run_id: str, settled_us: int) -> None:
        self._add(_Settle(run_id, settled_us))

    def connection_opened(self, info: ConnectionOpen) -> None:
        self._add(info)

    def connection_closed(self, info: ConnectionClose) -> None:
        self._add(info)

    def _add(self, item: _Later) -> None:
        if not self.items:
            self.since = time.monotonic()
        self.items.append(item)
        self.wakeup.set()

    def take(self) -> list[_Later]:
        items, self.items = self.items, []
        return items

    def put_back(self, items: list[_Later]) -> None:
        if items:
            self.items[:0] = items


class AuditWriter:
    """One background task that commits everything the runtime records, in groups."""

    def __init__(
        self,
        store: AuditStore,
        metrics: RuntimeMetrics,
        sink: CommittedSink,
        deliveries: DeliveryLog,
        *,
        journal: Journal | None = None,
        clock_us: Callable[[], int] = now_us,
        max_batch: int = 2000,
        low_priority_delay_s: float = 0.05,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        fallback_after_s: float = 1.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.sink = sink
        self.deliveries = deliveries
        #: Where events go during a store outage; None: they wait for the store instead.
        self.journal = journal
        self.clock_us = clock_us
        self.max_batch = max_batch
        self.low_priority_delay_s = low_priority_delay_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.fallback_after_s = fallback_after_s
        #: True while events go to the journal (the store failed, or the journal is not
        #: yet drained: events reach the store in order).
        self.degraded = False
        self._retry_delay = retry_initial_s
        self._next_probe = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._events: deque[Emitted] = deque()
        self._runs: list[_RunItem] = []
        self._wakeup = deliveries.wakeup
        self._task: asyncio.Task[None] | None = None
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._flush_requested = False

    # ---- producers ----------------------------------------------------------------------

    def submit(self, item: Emitted) -> None:
        """Queue an emitted event for the next commit; it reaches the sink once committed."""
        self._events.append(item)
        self._all_done.clear()
        self._wakeup.set()

    async def create_run(self, run: RunInfo, new_thread: bool) -> tuple[RunInfo, bool]:
        """:meth:`AuditStore.create_run`, committed with the next group."""
        future: asyncio.Future[tuple[RunInfo, bool]] = asyncio.get_running_loop().create_future()
        self._runs.append(_RunItem(run, new_thread, future))
        self._all_done.clear()
        self._wakeup.set()
        return await future

    @property
    def pending(self) -> int:
        return len(self._events) + len(self._runs) + len(self.deliveries.items)

    # ---- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        if self.journal is not None and len(self.journal):
            self.degraded = True
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="runwatch-audit-writer")

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over so far is committed; False on timeout."""
        if self.pending:
            self._all_done.clear()
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
            self.metrics.audit_queue_depth.set(self.pending)
            if self.degraded:
                await self._degraded_step()
                continue
            later_items = self.deliveries.items
            if not self._events and not self._runs and not later_items:
                self._all_done.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            urgent = bool(self._events or self._runs)
            if not urgent and not self._flush_requested:
                # Only low-priority items: let them gather for a moment.
                wait = self.low_priority_delay_s - (time.monotonic() - self.deliveries.since)
                if wait > 0 and len(later_items) < self.max_batch:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    continue
            events = self._take_events()
            runs, self._runs = self._runs, []
            later: list[_Later] = []
            due = time.monotonic() - self.deliveries.since >= self.low_priority_delay_s
            if later_items and (due or not urgent or self._flush_requested):
                later = self.deliveries.take()
            await self._commit(events, runs, later)

    def _take_events(self) -> list[Emitted]:
        """The next batch, in emission order. Taking events frees their outboxes: a run goes
        on emitting into its outbox while this batch commits (the pipeline), and the bound
        stays outbox plus one batch."""
        queue = self._events
        if len(queue) <= self.max_batch:
            events = list(queue)
            queue.clear()
        else:
            events = [queue.popleft() for _ in range(self.max_batch)]
        emitted: dict[str, int] = {}
        deferred: dict[str, int] = {}
        for item in events:
            if item.outbox is not None:
                item.outbox.release()
                item.outbox = None
            if item.counted:
                continue
            # Each event is counted once, here, when it first joins a batch (per batch, not
            # per event: one metric update per type).
            item.counted = True
            kind = item.event.type.value
            emitted[kind] = emitted.get(kind, 0) + 1
            if not item.live:
                deferred[kind] = deferred.get(kind, 0) + 1
        for kind, count in emitted.items():
            self.metrics.events_emitted.labels(type=kind).inc(count)
        for kind, count in deferred.items():
            self.metrics.events_deferred.labels(type=kind).inc(count)
        return events

    async def _commit(
        self, events: list[Emitted], runs: list[_RunItem], later: list[_Later]
    ) -> None:
        batch = Batch(
            new_runs=[(r.run, r.new_thread) for r in runs],
            events=[(e.event, e.live) for e in events],
        )
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
                    self._events.extendleft(reversed(events))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            except StoreError as exc:
                # Not transient: retrying cannot help. Tell the waiters; never hang them.
                self.metrics.audit_write_errors.inc()
                log.error("audit store rejected a batch of %d: %s", len(batch), exc)
                for item in events:
                    if item.durable is not None and not item.durable.done():
                        item.durable.set_exception(exc)
                for run in runs:
                    if not run.future.done():
                        run.future.set_exception(exc)
                return
        self.metrics.store_up.set(1)
        self.metrics.audit_batch_size.observe(len(batch))
        self._committed(events, committed_us)
        for run_item, result in zip(runs, created, strict=True):
            if not run_item.future.done():
                run_item.future.set_result(result)

    # ---- outage: the journal ----------------------------------------------------------

    def _enter_degraded(self, runs: list[_RunItem], later: list[_Later]) -> None:
        log.error("audit store unavailable: events go to the local journal until it is back")
        self.degraded = True
        self._retry_delay = self.retry_initial_s
        self._next_probe = time.monotonic() + self._retry_delay
        self.deliveries.put_back(later)
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
        events = self._take_events()
        runs, self._runs = self._runs, []
        self._fail_runs(runs)
        if events:
            committed_us = self.clock_us()
            try:
                # Durable on disk: these events count as persisted now.
                await self.journal.append([(i.event, i.live) for i in events], committed_us)
            except JournalFull as exc:
                log.error("%s: events wait for the store", exc)
                self._events.extendleft(reversed(events))
                await asyncio.sleep(self._retry_delay)
            else:
                self._committed(events, committed_us)
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
        later = self.deliveries.take()
        batch = Batch(journaled=[(e.event, e.live, e.committed_us) for e in chunk])
        self._fill_later(batch, later)
        try:
            await self.store.write(batch, self.clock_us())
        except StoreError as exc:
            self.metrics.audit_write_errors.inc()
            self.metrics.store_up.set(0)
            self.deliveries.put_back(later)
            log.debug("audit store still unavailable: %s", exc)
            self._next_probe = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)
            return
        self.metrics.store_up.set(1)
        self._retry_delay = self.retry_initial_s
        self._next_probe = 0.0
        await self.journal.drained(len(chunk))
        self.metrics.journal_depth.set(len(self.journal))
        if not len(self.journal) and not self._events:
            log.warning("audit store is back: journal drained")
            self.degraded = False

    async def _wait_urgent(self) -> None:
        while not self._events and not self._runs:
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

    def _committed(self, events: list[Emitted], committed_us: int) -> None:
        """Events are durable: hand them to the sink in commit order, then wake their waiters."""
        if not events:
            return
        done_us = self.clock_us()
        observe = self.metrics.persist_seconds.observe
        for item in events:
            item.committed_us = committed_us
            observe(max(0, done_us - item.event.ts_us) / 1e6)
        # I6: the sink (the hub's sockets, the broker) sees only committed events.
        try:
            self.sink.committed(events)
        except Exception:
            # A failing sink must not stop the writer: the events are durable, and clients
            # catch up from the store with resume.
            log.exception("handing %d committed events to the sink failed", len(events))
        for item in events:
            if item.durable is not None and not item.durable.done():
                item.durable.set_result(committed_us)
