"""The incremental checker: follows the audit store by position and judges each run once.

A pass has three phases, and only the last one writes:

1. **read**, on a read connection (no write lock; in SQLite's WAL mode readers never block the
   runtime's writer): the saved position, the events past it, the pending runs, and for every
   run that is due (ended, with ``settle_s`` for its acks to arrive, or stuck) its run row,
   events and receipts, a few hundred runs per query;
2. **judge**, pure CPU outside any transaction: :func:`monitor.rules.check_run` for each due
   run, in slices of ``slice_s`` with the event loop let run between them, because inside
   ``runwatch serve`` the checker shares its loop with the runtime's sockets;
3. **write**, one short transaction: verdicts and violations (one ``executemany`` each), the
   pending-set changes and the new position. An ended run leaves ``monitor_pending``; a stuck
   one stays (flagged judged, counted by ``runwatch_monitor_stuck_runs``) until it ends.

Exactly once: nothing is written before phase 3, and phase 3 commits verdicts, pending set
and position together, so a checker stopped at any point and started again repeats at most a
pass that never committed: no run judged twice, none skipped. The write is conditional on the
position row being what phase 1 read (``position`` and ``updated_us``, which every pass
changes): if another checker of the same consumer committed in between, the pass is
discarded and done again from the new state, instead of judging from a stale pending set
(``verdicts.run_id`` is the primary key too, as a last guard).

Position and concurrent writers: on PostgreSQL, ``position`` comes from a sequence, and a
transaction holding a lower position can commit after one holding a higher position. A checker
that saved the higher position would never see the lower one. So each pass also looks at the
last ``overlap`` positions before the saved one for runs neither judged nor pending (one
anti-join in the database): a late commit within that window is still found. The window is
generous (default 10,000 events): a writer would have to fall that far behind to be missed,
and even then the run is found by its later events. SQLite has one writer, so positions commit
in order there and the window is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.events import Event, EventType, Receipt, now_us
from runtime.store.errors import translate
from runtime.store.models import DeliveryRow, EventRow, RunRow
from runtime.store.audit import AuditStore, StoreError

from .metrics import MonitorMetrics
from .models import MonitorPosition, PendingRun, VerdictRow, ViolationRow
from .rules import RuleConfig, RunFacts, RunState, Violation, check_run, run_state

__all__ = ["Checker", "CheckerConfig", "Pacer", "PassResult", "load_facts", "load_many"]

log = logging.getLogger("runwatch.monitor")


class SteadyClock:
    """Wall-clock microseconds that advance with the monotonic clock: read the wall clock once,
    then add elapsed monotonic time, so a wall-clock step (forward or back) does not move it.
    Events stamped after a forward step look younger to it for the size of the step: the
    monitor judges such runs later, never wrongly."""

    def __init__(self) -> None:
        self._wall_us = now_us()
        self._mono_ns = time.monotonic_ns()

    def __call__(self) -> int:
        return self._wall_us + (time.monotonic_ns() - self._mono_ns) // 1000


@dataclass(frozen=True)
class CheckerConfig:
    rules: RuleConfig = field(default_factory=RuleConfig)
    #: An ended run is judged once its acks had this long to arrive.
    settle_s: float = 10.0
    #: Events read per pass.
    batch: int = 5000
    #: Positions before the saved one re-examined on PostgreSQL (see the module docstring).
    overlap: int = 10_000
    consumer: str = "checker"
    #: Runs judged per pass at most: bounds the write transaction (the rest wait one pass).
    max_judge: int = 1000
    #: Runs loaded per query.
    load_chunk: int = 200
    #: CPU time judged before the event loop gets a turn.
    slice_s: float = 0.005
    #: While behind, the share of time the loop spends in passes (it sleeps the rest), so that
    #: catching up a backlog leaves the runtime CPU and, inside ``runwatch serve``, its loop.
    busy_share: float = 0.5


@dataclass
class PassResult:
    read: int = 0
    judged: int = 0
    failed: int = 0
    violations: int = 0
    pending: int = 0
    stuck: int = 0
    #: More work was ready than one pass takes: pass again at once.
    more: bool = False


# ---- loading a run's facts ------------------------------------------------------------------

_TYPES = {t.value: t for t in EventType}

_RUN_COLUMNS = (
    RunRow.run_id,
    RunRow.user_id,
    RunRow.agent,
    RunRow.thread_id,
    RunRow.outcome,
    RunRow.created_us,
    RunRow.ended_us,
    RunRow.timeout_s,
)

#: In the field order of :class:`Receipt`.
_RECEIPT_COLUMNS = (
    DeliveryRow.event_id,
    DeliveryRow.run_id,
    DeliveryRow.seq,
    DeliveryRow.connection_id,
    DeliveryRow.user_id,
    DeliveryRow.sent_us,
    DeliveryRow.acked_us,
    DeliveryRow.replayed,
)


async def load_facts(conn: AsyncConnection, run_id: str) -> tuple[Any, RunFacts] | None:
    """A run's row and its :class:`RunFacts` as the store holds them."""
    return (await load_many(conn, [run_id])).get(run_id)


async def load_many(
    conn: AsyncConnection,
    run_ids: Sequence[str],
    chunk: int = 200,
    pacer: Pacer | None = None,
) -> dict[str, tuple[Any, RunFacts]]:
    """:func:`load_facts` for many runs: three queries per ``chunk`` runs, not three per run.

    Rows are turned into events and receipts here, in this thread: with a ``pacer``, the
    event loop gets a turn every ``pacer.slice_s`` of that work."""
    pacer = pacer or Pacer(float("inf"))
    out: dict[str, tuple[Any, RunFacts]] = {}
    for ids in _chunks(run_ids, chunk):
        runs = {
            r.run_id: r
            for r in await conn.execute(select(*_RUN_COLUMNS).where(RunRow.run_id.in_(ids)))
        }
        events: dict[str, list[Any]] = {}
        result = await conn.execute(
            select(
                EventRow.run_id,
                EventRow.type,
                EventRow.event_id,
                EventRow.thread_id,
                EventRow.seq,
                EventRow.ts_us,
                EventRow.agent,
                EventRow.data,
                EventRow.committed_us,
                EventRow.live,
            )
            .where(EventRow.run_id.in_(ids))
            .order_by(EventRow.position)
        )
        for row in result:  # each row's JSON is decoded here
            events.setdefault(row[0], []).append(row)
            if pacer.due():
                await pacer.pause()
        receipts: dict[str, list[Receipt]] = {}
        result = await conn.execute(
            select(*_RECEIPT_COLUMNS).where(DeliveryRow.run_id.in_(ids)).order_by(DeliveryRow.id)
        )
        for d in result:
            receipts.setdefault(d[1], []).append(Receipt(*d))
            if pacer.due():
                await pacer.pause()
        for run_id, run in runs.items():
            rows = events.get(run_id, ())
            out[run_id] = (
                run,
                RunFacts(
                    run_id=run_id,
                    user_id=run.user_id,
                    events=tuple(
                        Event(_TYPES[t], eid, rid, th, seq, ts, ag, data)
                        for rid, t, eid, th, seq, ts, ag, data, _c, _l in rows
                    ),
                    committed_us={r[2]: r[8] for r in rows},
                    live=frozenset(r[2] for r in rows if r[9]),
                    receipts=tuple(receipts.get(run_id, ())),
                    started_us=run.created_us,
                    timeout_s=run.timeout_s,
                ),
            )
            if pacer.due():
                await pacer.pause()
    return out


class Pacer:
    """Cooperative slicing of CPU work: :meth:`due` once ``slice_s`` passed since the last
    turn the event loop had; :meth:`pause` gives it one."""

    def __init__(self, slice_s: float) -> None:
        self.slice_s = slice_s
        self._deadline = time.perf_counter() + slice_s

    def due(self) -> bool:
        return time.perf_counter() >= self._deadline

    async def pause(self) -> None:
        await asyncio.sleep(0)
        self._deadline = time.perf_counter() + self.slice_s


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---- one pass, as data ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A run the checker is not finished with: pending already, or first seen this pass."""

    run_id: str
    fresh: bool
    judged: bool
    ended_us: int | None
    created_us: int | None
    timeout_s: float | None


@dataclass
class _Snapshot:
    """What the read phase found; nothing of it is written yet."""

    #: The position row as read, ``(position, updated_us)``; None before the first pass.
    token: tuple[int, int] | None
    position: int
    candidates: list[_Candidate]
    due: list[_Candidate]
    lag_s: float


@dataclass
class _Outcome:
    """What the judge phase decided: the rows of the write phase and the metrics after it."""

    new_pending: list[dict[str, Any]] = field(default_factory=list)
    mark_judged: list[dict[str, Any]] = field(default_factory=list)
    drop: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    #: The violations of each run judged, for the metrics.
    judged: list[list[Violation]] = field(default_factory=list)


class _Superseded(Exception):
    """Another checker of the same consumer committed a pass since this one read."""


# ---- the checker ---------------------------------------------------------------------------


class Checker:
    """Judges runs from the store; :meth:`step` is one pass, :meth:`start` loops them."""

    def __init__(
        self,
        store: AuditStore,
        metrics: MonitorMetrics,
        config: CheckerConfig | None = None,
        *,
        clock_us: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        config = config or CheckerConfig()
        # An unacked live event is only "never acked" past ack_wait_s: judge no earlier.
        if config.settle_s < config.rules.ack_wait_s:
            config = dataclasses.replace(config, settle_s=config.rules.ack_wait_s)
        self.config = config
        # I8 judged on elapsed time, not on the wall clock: a wall-clock step (NTP, a VM
        # resumed) must not make healthy open runs look stuck.
        self.clock_us = clock_us if clock_us is not None else SteadyClock()
        # Positions commit in order on SQLite (one writer): no window to re-examine.
        self._overlap = config.overlap if store.dialect == "postgresql" else 0
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> PassResult:
        """One pass: read, judge, then write in one short transaction."""
        now = self.clock_us()
        result = PassResult()
        async with self._reading() as conn:
            snapshot = await self._read(conn, now, result)
            outcome = await self._judge(conn, snapshot, now, result)
        try:
            await self._write(snapshot, outcome, now)
        except _Superseded:
            log.info(
                "checker %s: another checker committed first; pass again", self.config.consumer
            )
            return PassResult(more=True)
        for violations in outcome.judged:  # counted once committed
            self.metrics.runs_checked.labels(verdict="fail" if violations else "pass").inc()
            for v in violations:
                self.metrics.violations.labels(rule=v.rule.value).inc()
        self.metrics.lag_seconds.set(snapshot.lag_s)
        self.metrics.open_runs.set(result.pending - result.stuck)
        self.metrics.stuck_runs.set(result.stuck)
        self.metrics.last_check.set(time.time())
        return result

    # ---- phase 1: read ------------------------------------------------------------------

    async def _read(self, conn: AsyncConnection, now: int, result: PassResult) -> _Snapshot:
        cfg = self.config
        saved = (
            await conn.execute(
                select(MonitorPosition.position, MonitorPosition.updated_us).where(
                    MonitorPosition.consumer == cfg.consumer
                )
            )
        ).first()
        token = (saved.position, saved.updated_us) if saved is not None else None
        position = token[0] if token else 0
        rows = (
            await conn.execute(
                select(EventRow.position, EventRow.run_id)
                .where(EventRow.position > position)
                .order_by(EventRow.position)
                .limit(cfg.batch)
            )
        ).all()
        result.read = len(rows)
        new_position = rows[-1].position if rows else position
        pending = (
            await conn.execute(
                select(
                    PendingRun.run_id,
                    PendingRun.judged,
                    RunRow.ended_us,
                    RunRow.created_us,
                    RunRow.timeout_s,
                ).join(RunRow, RunRow.run_id == PendingRun.run_id, isouter=True)
            )
        ).all()
        known = {p.run_id for p in pending}
        seen = {r.run_id for r in rows} - known
        judged: set[str] = set()
        for ids in _chunks(sorted(seen), 500):
            judged.update(
                (
                    await conn.execute(select(VerdictRow.run_id).where(VerdictRow.run_id.in_(ids)))
                ).scalars()
            )
        fresh = seen - judged
        if self._overlap and position > 0:
            fresh.update(await self._late_runs(conn, position))
        fresh_runs: dict[str, Any] = {}
        for ids in _chunks(sorted(fresh), 500):
            for r in await conn.execute(
                select(RunRow.run_id, RunRow.ended_us, RunRow.created_us, RunRow.timeout_s).where(
                    RunRow.run_id.in_(ids)
                )
            ):
                fresh_runs[r.run_id] = r
        candidates = [
            _Candidate(p.run_id, False, bool(p.judged), p.ended_us, p.created_us, p.timeout_s)
            for p in pending
        ]
        for run_id in sorted(fresh):
            f = fresh_runs.get(run_id)
            candidates.append(
                _Candidate(
                    run_id,
                    True,
                    False,
                    f.ended_us if f is not None else None,
                    f.created_us if f is not None else None,
                    f.timeout_s if f is not None else None,
                )
            )
        due = [c for c in candidates if self._is_due(c, now)]
        if len(due) > cfg.max_judge:
            due = due[: cfg.max_judge]
            result.more = True
        oldest_unread = (
            await conn.execute(
                select(EventRow.committed_us)
                .where(EventRow.position > new_position)
                .order_by(EventRow.position)
                .limit(1)
            )
        ).scalar()
        if len(rows) >= cfg.batch:
            result.more = True
        lag = 0.0 if oldest_unread is None else max(0.0, (now - oldest_unread) / 1e6)
        return _Snapshot(token, new_position, candidates, due, lag)

    async def _late_runs(self, conn: AsyncConnection, position: int) -> set[str]:
        """Runs in the overlap window before ``position`` that are neither judged nor pending:
        events that committed after a higher position was read (PostgreSQL)."""
        lo = max(0, position - self._overlap)
        query = (
            select(EventRow.run_id)
            .distinct()
            .where(
                EventRow.position > lo,
                EventRow.position <= position,
                ~exists().where(VerdictRow.run_id == EventRow.run_id),
                ~exists().where(PendingRun.run_id == EventRow.run_id),
            )
        )
        return set((await conn.execute(query)).scalars())

    def _is_due(self, c: _Candidate, now: int) -> bool:
        """Whether a run is to be judged now (ended and settled, or stuck and not judged)."""
        if c.created_us is None:
            return False  # events of a run the store does not know: judged when it appears
        if c.ended_us is not None:
            return not c.judged and now - c.ended_us >= self.config.settle_s * 1_000_000
        timeout_us = (c.timeout_s or 0.0) * 1_000_000
        grace_us = self.config.rules.stuck_grace_s * 1_000_000
        return not c.judged and now - c.created_us > timeout_us + grace_us

    # ---- phase 2: judge -----------------------------------------------------------------

    async def _judge(
        self, conn: AsyncConnection, snapshot: _Snapshot, now: int, result: PassResult
    ) -> _Outcome:
        cfg = self.config
        out = _Outcome()
        stuck_now: set[str] = set()
        finished: set[str] = set()
        pacer = Pacer(cfg.slice_s)
        # Chunk by chunk: a chunk's facts are garbage before the next one loads, so few
        # objects live long enough for the full (stop-the-world) garbage collections.
        for ids in _chunks([c.run_id for c in snapshot.due], cfg.load_chunk):
            loaded = await load_many(conn, ids, cfg.load_chunk, pacer)
            for run_id in ids:
                if run_id not in loaded:
                    continue  # the run row went away (retention): it stays pending
                run, facts = loaded[run_id]
                state = run_state(facts, cfg.rules, now)
                if state == RunState.OPEN:
                    continue
                violations = check_run(facts, cfg.rules, now)
                self._record(out, run, facts, state, violations, now)
                (stuck_now if state == RunState.STUCK else finished).add(run_id)
                if pacer.due():
                    await pacer.pause()  # let the runtime's sockets run
            del loaded
        for c in snapshot.candidates:
            if c.run_id in finished or (c.ended_us is not None and c.judged):
                if not c.fresh:
                    out.drop.append({"b_run": c.run_id})
                continue
            if c.created_us is not None:
                result.pending += 1
            result.stuck += c.run_id in stuck_now or c.judged
            if c.fresh:
                out.new_pending.append(
                    {"run_id": c.run_id, "first_seen_us": now, "judged": c.run_id in stuck_now}
                )
            elif c.run_id in stuck_now:
                out.mark_judged.append({"b_run": c.run_id})
        for violations in out.judged:
            result.judged += 1
            result.failed += bool(violations)
            result.violations += len(violations)
        return out

    @staticmethod
    def _record(
        out: _Outcome,
        run: Any,
        facts: RunFacts,
        state: RunState,
        violations: list[Violation],
        now: int,
    ) -> None:
        out.verdicts.append(
            {
                "run_id": run.run_id,
                "user_id": run.user_id,
                "agent": run.agent,
                "thread_id": run.thread_id,
                "state": state.value,
                "verdict": "fail" if violations else "pass",
                "outcome": run.outcome,
                "rules": ",".join(sorted({v.rule.value for v in violations})),
                "violation_count": len(violations),
                "event_count": len(facts.events),
                "created_us": run.created_us,
                "ended_us": run.ended_us,
                "judged_us": now,
            }
        )
        out.violations += [
            {
                "run_id": v.run_id,
                "rule": v.rule.value,
                "message": v.message,
                "seqs": list(v.seqs),
                "event_ids": list(v.event_ids),
                "judged_us": now,
            }
            for v in violations
        ]
        out.judged.append(violations)

    # ---- phase 3: write -----------------------------------------------------------------

    async def _write(self, snapshot: _Snapshot, out: _Outcome, now: int) -> None:
        """Verdicts, violations, pending set and position: one transaction, statements built
        before it opens, one ``executemany`` each."""
        consumer = self.config.consumer
        async with self._writing() as conn:
            # First statement: on SQLite it takes the write lock, on PostgreSQL the row lock
            # that orders two checkers of one consumer.
            if snapshot.token is None:
                await conn.execute(
                    insert(MonitorPosition).values(
                        consumer=consumer, position=snapshot.position, updated_us=now
                    )
                )
            else:
                position, updated_us = snapshot.token
                moved = await conn.execute(
                    update(MonitorPosition)
                    .where(
                        MonitorPosition.consumer == consumer,
                        MonitorPosition.position == position,
                        MonitorPosition.updated_us == updated_us,
                    )
                    .values(position=snapshot.position, updated_us=max(now, updated_us + 1))
                )
                if moved.rowcount != 1:
                    raise _Superseded
            if out.new_pending:
                await conn.execute(insert(PendingRun), out.new_pending)
            if out.mark_judged:
                await conn.execute(_MARK_JUDGED, out.mark_judged)
            if out.drop:
                await conn.execute(_DROP_PENDING, out.drop)
            if out.verdicts:
                await conn.execute(insert(VerdictRow), out.verdicts)
            if out.violations:
                await conn.execute(insert(ViolationRow), out.violations)

    # ---- store access -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.store.engine.connect() as conn:
                yield conn
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise translate(exc) from exc

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.store.engine.begin() as conn:
                yield conn
        except IntegrityError as exc:
            if "monitor_positions" in str(exc):
                raise _Superseded from exc  # two first passes raced to insert the position
            raise translate(exc) from exc
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise translate(exc) from exc

    # ---- catching up and the loop -------------------------------------------------------

    async def catch_up(self, max_passes: int = 1000) -> PassResult:
        """Pass until nothing new is read and nothing due is left (for tests, benchmarks and
        ``runwatch check``)."""
        total = PassResult()
        for _ in range(max_passes):
            r = await self.step()
            total.read += r.read
            total.judged += r.judged
            total.failed += r.failed
            total.violations += r.violations
            total.pending, total.stuck = r.pending, r.stuck
            if r.read == 0 and not r.more:
                break
        return total

    def start(self, interval_s: float) -> None:
        self._task = asyncio.create_task(self._loop(interval_s), name="runwatch-checker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self, interval_s: float) -> None:
        share = min(1.0, max(0.01, self.config.busy_share))
        # Logged once per change of state (failing with a new error, or working again), never
        # once per pass: a store that stays unwritable is one line, not one every interval.
        failing: str | None = None
        while True:
            try:
                started = time.perf_counter()
                result = await self.step()
                if failing is not None:
                    log.warning("checker passes work again (after: %s)", failing)
                    failing = None
                if result.more:
                    # Behind: go again soon, after a pause in proportion to the pass.
                    await asyncio.sleep((time.perf_counter() - started) * (1 - share) / share)
                    continue
            except StoreError as exc:
                if str(exc) != failing:
                    log.error("checker pass failed: %s (retrying every %gs)", exc, interval_s)
                failing = str(exc)
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                if text != failing:
                    log.exception("checker pass failed (retrying every %gs)", interval_s)
                failing = text
            await asyncio.sleep(interval_s)


_MARK_JUDGED = update(PendingRun).where(PendingRun.run_id == bindparam("b_run")).values(judged=True)
_DROP_PENDING = delete(PendingRun).where(PendingRun.run_id == bindparam("b_run"))
