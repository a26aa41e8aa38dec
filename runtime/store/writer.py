"""The group-commit audit writer.

Every event goes through :meth:`AuditWriter.persist`, which returns once the event is committed
(I6, ``after_persist``: committed before it is written to any socket). Events that arrive while a
commit is in flight wait for the next one, so N concurrent runs share one commit instead of paying
N: that is the group commit. Receipts, acks and connection records ride along in the same
transactions without anyone waiting on them.

When a commit fails the batch is kept and retried with backoff: nothing is dropped, and callers
of :meth:`persist` simply wait longer. (A journal that keeps delivery going through a long store
outage plugs in through :attr:`AuditWriter.fallback`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ..events import Event, Receipt
from ..metrics import RuntimeMetrics
from .recorder import AckUpdate, AuditStore, Batch, ConnectionClose, ConnectionOpen, StoreError

__all__ = ["AuditWriter", "Fallback"]

log = logging.getLogger("runwatch.audit")


def wall_us() -> int:
    return time.time_ns() // 1000


class Fallback(Protocol):
    """Somewhere to commit a batch's events when the store is failing (the local journal)."""

    async def append(self, events: list[tuple[Event, bool]], committed_us: int) -> None: ...


@dataclass(slots=True)
class _EventItem:
    event: Event
    live: bool
    future: asyncio.Future[int]


@dataclass(frozen=True, slots=True)
class _Settle:
    run_id: str
    settled_us: int


_Item = _EventItem | Receipt | AckUpdate | _Settle | ConnectionOpen | ConnectionClose


class AuditWriter:
    """One background task that commits everything the runtime records, in groups."""

    def __init__(
        self,
        store: AuditStore,
        metrics: RuntimeMetrics,
        *,
        clock_us: Callable[[], int] = wall_us,
        max_batch: int = 1000,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock_us = clock_us
        self.max_batch = max_batch
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.fallback: Fallback | None = None
        self.fallback_after_s = 1.0
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._unfinished = 0
        self._all_done = asyncio.Event()
        self._all_done.set()
        self.on_commit: Callable[[int], Awaitable[None]] | None = None

    # ---- producers ----------------------------------------------------------------------

    async def persist(self, event: Event, live: bool) -> int:
        """Commit ``event``; returns its commit time (epoch µs) once it is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._put(_EventItem(event, live, future))
        return await future

    def record_receipt(self, receipt: Receipt) -> None:
        self._put(receipt)

    def record_ack(self, ack: AckUpdate) -> None:
        self._put(ack)

    def settle(self, run_id: str, settled_us: int) -> None:
        self._put(_Settle(run_id, settled_us))

    def connection_opened(self, info: ConnectionOpen) -> None:
        self._put(info)

    def connection_closed(self, info: ConnectionClose) -> None:
        self._put(info)

    def _put(self, item: _Item) -> None:
        self._unfinished += 1
        self._all_done.clear()
        self._queue.put_nowait(item)
        self.metrics.audit_queue_depth.set(self._queue.qsize())

    # ---- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="runwatch-audit-writer")

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def pending(self) -> int:
        return self._unfinished

    async def close(self, timeout: float = 10.0) -> None:
        await self.flush(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            items = [first]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            self.metrics.audit_queue_depth.set(self._queue.qsize())
            await self._commit(items)
            self._unfinished -= len(items)
            if self._unfinished == 0:
                self._all_done.set()

    async def _commit(self, items: list[_Item]) -> None:
        batch = Batch()
        for item in items:
            if isinstance(item, _EventItem):
                batch.events.append((item.event, item.live))
            elif isinstance(item, Receipt):
                batch.receipts.append(item)
            elif isinstance(item, AckUpdate):
                batch.acks.append(item)
            elif isinstance(item, _Settle):
                batch.settles.append((item.run_id, item.settled_us))
            elif isinstance(item, ConnectionOpen):
                batch.opened.append(item)
            else:
                batch.closed.append(item)
        delay = self.retry_initial_s
        failing_since: float | None = None
        while True:
            committed_us = self.clock_us()
            try:
                await self.store.write(batch, committed_us)
            except StoreError as exc:
                self.metrics.audit_write_errors.inc()
                self.metrics.store_up.set(0)
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                log.warning("audit store write failed (%s); retrying in %.2fs", exc, delay)
                if (
                    self.fallback is not None
                    and batch.events
                    and now - failing_since >= self.fallback_after_s
                ):
                    await self.fallback.append(batch.events, committed_us)
                    self._resolve(items, committed_us)
                    batch.events = []
                    # the rest of the batch (receipts, acks) is retried below
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            break
        self.metrics.store_up.set(1)
        self.metrics.audit_batch_size.observe(len(items))
        self._resolve(items, committed_us)
        if self.on_commit is not None:
            await self.on_commit(committed_us)

    def _resolve(self, items: list[_Item], committed_us: int) -> None:
        done_us = self.clock_us()
        for item in items:
            if isinstance(item, _EventItem) and not item.future.done():
                self.metrics.persist_seconds.observe(max(0, done_us - item.event.ts_us) / 1e6)
                item.future.set_result(committed_us)
