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

When the store fails (:class:`StoreUnavailable`: transient) the batch is kept and retried with
backoff: nothing is dropped. After ``fallback_after_s`` of failure, events go to the journal (the
local write-ahead file), which counts as persisted, so delivery goes on through an outage. When
the journal cannot take them either (its bound, a full disk), events wait for the store: nothing
is sent that is not durable somewhere.

When the store refuses a batch for good (:class:`StoreRejected`: permanent), the batch is split
in halves until the offending item is alone; every other item is committed. An offending event
is replaced by a stand-in the store can hold (same envelope; unstorable characters replaced, or
its content withheld), so its run has no seq gap, and its run is ended by
:attr:`AuditWriter.on_rejected` (the engine ends it with ``agent_error{internal}``); an offending
new run is refused (its ``create_run`` raises); an offending receipt or connection record is
stored cleaned, or dropped and counted.

The loop is supervised: an exception it does not know is logged (once per kind, with its
traceback), counted in ``runwatch_audit_writer_restarts_total``, the items it was working on go
back to the head of the queue, and the loop restarts. :attr:`AuditWriter.stalled` says when work
is waiting and nothing has been committed or journaled for ``stall_after_s``: ``/readyz`` turns
503 and ``runwatch_audit_writer_stalled`` is 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..events import Event, EventType, Receipt, now_us
from ..metrics import RuntimeMetrics
from ..pipeline import CommittedSink, Emitted
from ..tasks import stop_task
from .audit import (
    AckUpdate,
    AuditStore,
    Batch,
    ConnectionClose,
    ConnectionOpen,
    RunInfo,
)
from .errors import StoreError, StoreUnavailable, describe, storable
from .journal import Journal, JournalError

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


#: Keys of event data that carry no content (the monitor's rules read them); every other key
#: is withheld in the last-resort stand-in of an event the store refuses.
_STRUCTURE_KEYS = frozenset(
    {"tool_call_id", "tool", "status", "code", "retryable", "step", "duration_ms"}
)
_WITHHELD = "[withheld: the audit store refused this content]"


def _standins(event: Event) -> list[Event]:
    """Events the store may hold in place of ``event``: the same envelope (type, id, seq, ts),
    first with unstorable characters replaced, then with its content withheld."""
    out: list[Event] = []
    cleaned = replace(
        event,
        agent=storable(event.agent),
        thread_id=storable(event.thread_id),
        data=storable(event.data),
    )
    if cleaned != event:
        out.append(cleaned)
    data: dict[str, Any] = {}
    for key, value in event.data.items():
        if key in _STRUCTURE_KEYS and isinstance(value, (str, int, float, bool)):
            data[key] = storable(value)
        elif key == "args":
            data[key] = {}
        else:
            data[key] = _WITHHELD
    if event.type == EventType.TOOL_COMPLETED:
        data["status"] = "error"
        data["error"] = _WITHHELD
        data.pop("result", None)
    out.append(replace(cleaned, data=data))
    return out


@dataclass(slots=True)
class _Unit:
    """One item of a batch, as the isolation of a rejected batch splits it."""

    event: Emitted | None = None
    run: _RunItem | None = None
    later: _Later | None = None


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
        stall_after_s: float = 5.0,
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
        self.stall_after_s = stall_after_s
        #: Told the run id of an event the store refused for good: the run must end (I8).
        self.on_rejected: Callable[[str], object] | None = None
        #: True while events go to the journal (the store failed, or the journal is not
        #: yet drained: events reach the store in order).
        self.degraded = False
        #: Restarts after an unexpected error, and the last one (for ``/readyz``).
        self.restarts = 0
        self.last_error: str | None = None
        self._crash_kinds: set[tuple[str, str]] = set()
        self._journal_failing = False
        self._retry_delay = retry_initial_s
        self._next_probe = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._events: deque[Emitted] = deque()
        self._runs: list[_RunItem] = []
        #: The items of the commit in progress: put back at the head if the loop crashes.
        self._inflight: tuple[list[Emitted], list[_RunItem], list[_Later]] | None = None
        #: When work last moved (a commit, a journal append) or started waiting on an idle writer.
        self._progress_at = time.monotonic()
        self._wakeup = deliveries.wakeup
        self._task: asyncio.Task[None] | None = None
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._flush_requested = False
        metrics.audit_writer_stalled.set_function(lambda: 1.0 if self.stalled else 0.0)

    # ---- producers ----------------------------------------------------------------------

    def submit(self, item: Emitted) -> None:
        """Queue an emitted event for the next commit; it reaches the sink once committed."""
        if not self._events and self._inflight is None:
            self._progress_at = time.monotonic()
        self._events.append(item)
        self._all_done.clear()
        self._wakeup.set()

    async def create_run(self, run: RunInfo, new_thread: bool) -> tuple[RunInfo, bool]:
        """:meth:`AuditStore.create_run`, committed with the next group."""
        future: asyncio.Future[tuple[RunInfo, bool]] = asyncio.get_running_loop().create_future()
        if not self._runs and self._inflight is None:
            self._progress_at = time.monotonic()
        self._runs.append(_RunItem(run, new_thread, future))
        self._all_done.clear()
        self._wakeup.set()
        return await future

    @property
    def pending(self) -> int:
        inflight = self._inflight
        held = 0 if inflight is None else len(inflight[0]) + len(inflight[1]) + len(inflight[2])
        return len(self._events) + len(self._runs) + len(self.deliveries.items) + held

    @property
    def urgent_pending(self) -> int:
        """Events and new runs waiting for a commit (someone waits on these)."""
        inflight = self._inflight
        held = 0 if inflight is None else len(inflight[0]) + len(inflight[1])
        return len(self._events) + len(self._runs) + held

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stalled(self) -> bool:
        """Work is waiting and nothing moved for ``stall_after_s`` (or the loop is not
        running while work waits): this replica cannot make progress."""
        if not self.urgent_pending:
            return False
        if self._task is not None and self._task.done():
            return True
        return time.monotonic() - self._progress_at > self.stall_after_s

    def status(self) -> dict[str, Any]:
        """The writer's state for ``/healthz`` and ``/readyz``."""
        state = "stalled" if self.stalled else "journal" if self.degraded else "ok"
        return {
            "state": state,
            "pending": self.urgent_pending,
            "since_progress_s": round(time.monotonic() - self._progress_at, 3),
            "journal": len(self.journal) if self.journal is not None else 0,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }

    # ---- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        if self.journal is not None and len(self.journal):
            self.degraded = True
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="runwatch-audit-writer")

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
        """Flush for up to ``timeout``, then stop. What is still queued was never committed
        nor sent (I6): its runs stay open in the store and recovery ends them at next start."""
        if not await self.flush(timeout) and self.urgent_pending:
            log.error(
                "audit writer stopped with %d event(s) and new run(s) not written; they were "
                "never sent, and their runs are ended by recovery at the next start",
                self.urgent_pending,
            )
        for task in (self._task, self._probe):
            await stop_task(task, log)
        self._task = None
        self._probe = None

    async def wait_journal_drained(self) -> None:
        """Wait until the journal is empty and events go straight to the store again."""
        while self.degraded:
            self._wakeup.set()
            await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        """Run the loop; restart it after any error it does not know, losing nothing."""
        backoff = self.retry_initial_s
        while True:
            try:
                await self._run()
            except Exception as exc:
                self.restarts += 1
                self.metrics.audit_writer_restarts.inc()
                self.last_error = describe(exc)
                kind = (type(exc).__name__, str(exc)[:200])
                if kind not in self._crash_kinds:
                    self._crash_kinds.add(kind)
                    log.exception("audit writer failed; restarting (nothing is lost)")
                else:
                    log.error("audit writer failed again (%s); restarting", self.last_error)
                self._requeue_inflight()
                if self._probe is not None:
                    self._probe.cancel()
                    self._probe = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
            else:  # pragma: no cover - _run never returns
                return

    def _requeue_inflight(self) -> None:
        if self._inflight is None:
            return
        events, runs, later = self._inflight
        self._inflight = None
        self._events.extendleft(reversed([e for e in events if not _done(e)]))
        self._runs[:0] = [r for r in runs if not r.future.done()]
        self.deliveries.put_back(later)

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
            self._inflight = (events, runs, later)
            await self._commit(events, runs, later)
            self._inflight = None

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
            attempt_started = time.monotonic()
            try:
                created = await self._write_bounded(batch, committed_us, failing_since)
                break
            except StoreUnavailable as exc:
                self.metrics.audit_write_errors.inc()
                self.metrics.store_up.set(0)
                now = time.monotonic()
                failing_since = attempt_started if failing_since is None else failing_since
                log.warning("audit store write failed (%s); retrying in %.2fs", exc, delay)
                if self.journal is not None and now - failing_since >= self.fallback_after_s:
                    self._enter_degraded(runs, later)
                    self._events.extendleft(reversed(events))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            except StoreError as exc:
                # Permanent: retrying the batch cannot help. Commit everything but the
                # offending items, and answer those.
                self.metrics.audit_write_errors.inc()
                log.error("audit store rejected a batch of %d: %s; isolating", len(batch), exc)
                await self._isolate(events, runs, later)
                return
        self.metrics.store_up.set(1)
        self.metrics.audit_batch_size.observe(len(batch))
        self._committed(events, committed_us)
        for run_item, result in zip(runs, created, strict=True):
            if not run_item.future.done():
                run_item.future.set_result(result)

    async def _write_bounded(
        self, batch: Batch, committed_us: int, failing_since: float | None
    ) -> list[tuple[RunInfo, bool]]:
        """One attempt, given up when the journal fallback is due: a store that hangs (a
        held lock, a stalled server) degrades to the journal after about
        ``fallback_after_s`` like one that refuses. Inserts are idempotent and new runs are
        read back by id, so an attempt given up after it committed is harmless."""
        if self.journal is None:
            return await self.store.write(batch, committed_us)
        elapsed = 0.0 if failing_since is None else time.monotonic() - failing_since
        limit = max(self.fallback_after_s - elapsed, self.retry_initial_s)
        try:
            async with asyncio.timeout(limit):
                return await self.store.write(batch, committed_us)
        except TimeoutError:
            raise StoreUnavailable(f"no answer within {limit:.2f}s", reason="timeout") from None

    # ---- a permanent error: isolate the offending item --------------------------------

    async def _isolate(
        self, events: list[Emitted], runs: list[_RunItem], later: list[_Later]
    ) -> None:
        """Commit a rejected batch's items in halves until each offending item is alone.
        Store order is kept (left half first). A transient error on the way puts what is
        left back at the head of the queues."""
        units = [_Unit(run=r) for r in runs]
        units += [_Unit(event=e) for e in events]
        units += [_Unit(later=low) for low in later]
        done: set[int] = set()
        try:
            await self._write_units(units, done)
        except StoreUnavailable as exc:
            log.warning("audit store failed while isolating a rejected item: %s", exc)
            rest = [u for i, u in enumerate(units) if i not in done]
            self._events.extendleft(reversed([u.event for u in rest if u.event is not None]))
            self._runs[:0] = [u.run for u in rest if u.run is not None]
            self.deliveries.put_back([u.later for u in rest if u.later is not None])

    async def _write_units(self, units: list[_Unit], done: set[int], base: int = 0) -> None:
        parts = [(base, units)]
        while parts:
            start, part = parts.pop(0)
            committed_us = self.clock_us()
            try:
                created = await self.store.write(self._units_batch(part), committed_us)
            except StoreUnavailable:
                raise
            except StoreError as exc:
                if len(part) == 1:
                    await self._reject(part[0], exc)
                    done.add(start)
                    continue
                mid = len(part) // 2
                parts[:0] = [(start, part[:mid]), (start + mid, part[mid:])]
                continue
            self.metrics.store_up.set(1)
            self._committed([u.event for u in part if u.event is not None], committed_us)
            for unit, result in zip((u for u in part if u.run is not None), created, strict=True):
                assert unit.run is not None
                if not unit.run.future.done():
                    unit.run.future.set_result(result)
            done.update(range(start, start + len(part)))

    def _units_batch(self, units: list[_Unit]) -> Batch:
        batch = Batch(
            new_runs=[(u.run.run, u.run.new_thread) for u in units if u.run is not None],
            events=[(u.event.event, u.event.live) for u in units if u.event is not None],
        )
        self._fill_later(batch, [u.later for u in units if u.later is not None])
        return batch

    async def _reject(self, unit: _Unit, exc: StoreError) -> None:
        """Answer one item the store refuses for good."""
        if unit.run is not None:
            # The chat is refused: its client_msg_id is not used up (nothing was written).
            self.metrics.audit_rejected.labels(kind="run").inc()
            log.error("audit store refused new run %s: %s", unit.run.run.run_id, exc)
            if not unit.run.future.done():
                unit.run.future.set_exception(exc)
            return
        if unit.event is not None:
            await self._reject_event(unit.event, exc)
            return
        assert unit.later is not None
        self.metrics.audit_rejected.labels(kind="record").inc()
        low = unit.later
        if isinstance(low, ConnectionOpen):
            cleaned = replace(low, client=storable(low.client), user_id=storable(low.user_id))
            if cleaned != low:
                try:
                    await self.store.write(Batch(opened=[cleaned]), self.clock_us())
                except StoreUnavailable:
                    raise
                except StoreError:
                    pass
                else:
                    log.error("audit store refused a connection record (%s): stored cleaned", exc)
                    return
        log.error("audit store refused a %s record for good: dropped (%s)", _kind(low), exc)

    async def _reject_event(self, item: Emitted, exc: StoreError) -> None:
        """Store a stand-in for a refused event (same envelope: its run has no gap), send
        that, and end the run (I8)."""
        self.metrics.audit_rejected.labels(kind="event").inc()
        original = item.event
        for standin in _standins(original):
            committed_us = self.clock_us()
            try:
                await self.store.write(Batch(events=[(standin, item.live)]), committed_us)
            except StoreUnavailable:
                raise
            except StoreError:
                continue
            log.error(
                "audit store refused event %s (run %s, seq %d, %s): %s; a stand-in was stored "
                "and the run is ended",
                original.event_id,
                original.run_id,
                original.seq,
                original.type.value,
                exc,
            )
            item.event = standin
            item.text = standin.to_json()
            self._committed([item], committed_us)
            self._end_run(original.run_id)
            return
        log.error(
            "audit store refused event %s (run %s, seq %d) and every stand-in: %s",
            original.event_id,
            original.run_id,
            original.seq,
            exc,
        )
        if item.durable is not None and not item.durable.done():
            item.durable.set_exception(exc)
        self._end_run(original.run_id)

    def _end_run(self, run_id: str) -> None:
        if self.on_rejected is not None:
            try:
                self.on_rejected(run_id)
            except Exception:
                log.exception("ending run %s after a refused event failed", run_id)

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
            self._inflight = (events, [], [])
            committed_us = self.clock_us()
            try:
                # Durable on disk: these events count as persisted now.
                await self.journal.append([(i.event, i.live) for i in events], committed_us)
            except JournalError as exc:
                # Nothing of it counts: the events wait for the store (never sent before).
                self.metrics.audit_journal_errors.inc()
                if not self._journal_failing:
                    log.error("%s: events wait for the audit store", exc)
                self._journal_failing = True
                self._events.extendleft(reversed(events))
                self._inflight = None
                await asyncio.sleep(self._retry_delay)
            else:
                self._inflight = None
                if self._journal_failing:
                    log.warning("journal appends work again")
                self._journal_failing = False
                self._committed(events, committed_us)
        self.metrics.journal_depth.set(len(self.journal))
        if self._probe is None and time.monotonic() >= self._next_probe:
            self._probe = asyncio.create_task(self._drain_chunk(), name="runwatch-journal-drain")
        waits: set[asyncio.Future[object]] = {asyncio.ensure_future(self._wait_urgent())}
        if self._probe is not None:
            waits.add(self._probe)  # type: ignore[arg-type]
        timeout = max(0.0, self._next_probe - time.monotonic()) if self._probe is None else None
        if self._journal_failing:
            # Events are waiting on the store: do not spin on them, wake for the drain.
            timeout = self._retry_delay if timeout is None else min(timeout, self._retry_delay)
        _done, pending = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        for task in pending:
            if task is not self._probe:
                task.cancel()
        if self._probe is not None and self._probe.done():
            probe, self._probe = self._probe, None
            if not probe.cancelled() and probe.exception() is not None:
                raise probe.exception()  # type: ignore[misc]

    async def _drain_chunk(self) -> None:
        assert self.journal is not None
        chunk = self.journal.pending(self.max_batch)
        later = self.deliveries.take()
        batch = Batch(journaled=[(e.event, e.live, e.committed_us) for e in chunk])
        self._fill_later(batch, later)
        try:
            await self.store.write(batch, self.clock_us())
        except StoreUnavailable as exc:
            self.metrics.audit_write_errors.inc()
            self.metrics.store_up.set(0)
            self.deliveries.put_back(later)
            log.debug("audit store still unavailable: %s", exc)
            self._next_probe = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)
            return
        except StoreError as exc:
            # Journaled events were sent already: isolate the offending one, keep the rest;
            # an offending receipt or connection record must not hold the journal for good.
            self.metrics.audit_write_errors.inc()
            log.error("audit store rejected a journal chunk of %d: %s; isolating", len(batch), exc)
            if not await self._drain_isolated(chunk):
                self.deliveries.put_back(later)
                self._next_probe = time.monotonic() + self._retry_delay
                return
            await self._isolate([], [], later)
        self.metrics.store_up.set(1)
        self._progress_at = time.monotonic()
        self._retry_delay = self.retry_initial_s
        self._next_probe = 0.0
        await self.journal.drained(len(chunk))
        self.metrics.journal_depth.set(len(self.journal))
        if not len(self.journal):
            # Queued events follow the journaled ones: with the journal empty, they go
            # straight to the store in order.
            log.warning("audit store is back: journal drained")
            self.degraded = False
            self._wakeup.set()

    async def _drain_isolated(self, chunk: list[Any]) -> bool:
        """Drain a rejected journal chunk one event at a time, refused ones as stand-ins;
        False if the store failed transiently on the way (the chunk is retried whole: inserts
        are idempotent)."""
        for entry in chunk:
            for candidate in (entry.event, *_standins(entry.event)):
                try:
                    await self.store.write(
                        Batch(journaled=[(candidate, entry.live, entry.committed_us)]),
                        self.clock_us(),
                    )
                except StoreUnavailable:
                    return False
                except StoreError as exc:
                    self.metrics.audit_rejected.labels(kind="event").inc()
                    log.error("audit store refused journaled event %s: %s", candidate.event_id, exc)
                    continue
                if candidate is not entry.event:
                    self._end_run(entry.event.run_id)
                break
        return True

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
        self._progress_at = time.monotonic()
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


def _done(item: Emitted) -> bool:
    return item.committed_us != 0


def _kind(low: _Later) -> str:
    return {
        Receipt: "receipt",
        AckUpdate: "ack",
        _Settle: "settle",
        ConnectionOpen: "connection",
        ConnectionClose: "connection close",
    }.get(type(low), "record")
