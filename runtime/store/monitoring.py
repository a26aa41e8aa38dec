"""The monitor's read model: every query the monitor makes of the audit store, and the checker's
one write, so that the store alone knows the schema.

The monitor imports no table and builds no SQL. It opens a :class:`MonitorReader` (one read
connection: on SQLite one snapshot, and no write lock) with :meth:`MonitorStore.reading`, and
gets frozen dataclasses back; the checker commits a pass with :meth:`MonitorStore.commit_pass`.
Driver errors are translated at this boundary into :class:`~runtime.store.errors.StoreError`.

Following the store: :meth:`MonitorReader.events_after` is the one position-following read.
It returns where each event stands (position, run, commit time), not the event: a consumer
that judges runs learns which runs moved, then loads each due run whole
(:meth:`MonitorReader.load_runs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from sqlalchemy import and_, bindparam, case, delete, exists, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..events import Event, EventType, Receipt
from ..lifecycle import RunOutcome
from .audit import AuditStore, StoredEvent, _chunks, _stored, receipt_from_row
from .errors import translate
from .models import (
    ConnectionRow,
    DeliveryRow,
    EventRow,
    MonitorPositionRow,
    PendingRunRow,
    RunRow,
    VerdictRow,
    ViolationRow,
)
from .reads import run_inputs

__all__ = [
    "EventPosition",
    "MonitorReader",
    "MonitorStore",
    "Pacing",
    "PassWrite",
    "PendingRun",
    "RunClock",
    "RunDetail",
    "RunFilter",
    "RunRecord",
    "RunsPage",
    "SliCount",
    "SloCounts",
    "StoredRun",
    "Tracking",
    "VerdictRecord",
    "ViolationRecord",
]

# ---- what the monitor reads and writes --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as the monitor sees it."""

    run_id: str
    user_id: str
    agent: str
    thread_id: str
    outcome: str | None
    created_us: int
    ended_us: int | None
    timeout_s: float


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run with everything stored of it: events in store order (position), each event's
    commit time, the ids of the events emitted live, and every receipt (in write order)."""

    run: RunRecord
    events: tuple[Event, ...]
    committed_us: Mapping[str, int]
    live: frozenset[str]
    receipts: tuple[Receipt, ...]
    #: The connections of ``receipts`` served by another replica than the run's own.
    remote_connections: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Tracking:
    """A consumer's saved position, and when it last moved (every pass moves it)."""

    position: int
    updated_us: int


@dataclass(frozen=True, slots=True)
class EventPosition:
    """Where an event stands in the store's total order."""

    position: int
    run_id: str
    committed_us: int


@dataclass(frozen=True, slots=True)
class RunClock:
    """When a run started and ended, and its timeout: what makes it due for judging."""

    created_us: int
    ended_us: int | None
    timeout_s: float


@dataclass(frozen=True, slots=True)
class PendingRun:
    """A run the checker has seen and not finished with. ``clock`` is None when the run row
    is not there (its events arrived first, or retention deleted it)."""

    run_id: str
    judged: bool
    clock: RunClock | None


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    """The checker's verdict on one run, as written and read back."""

    run_id: str
    user_id: str
    agent: str
    thread_id: str
    state: str
    verdict: str
    outcome: str | None
    rules: tuple[str, ...]
    violation_count: int
    event_count: int
    created_us: int
    ended_us: int | None
    judged_us: int


@dataclass(frozen=True, slots=True)
class ViolationRecord:
    """One broken rule in one run. Read back, it has its ``id`` (newest is highest) and the
    owner and agent of its run's verdict."""

    run_id: str
    rule: str
    message: str
    seqs: tuple[int, ...]
    event_ids: tuple[str, ...]
    judged_us: int
    id: int | None = None
    user_id: str | None = None
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class PassWrite:
    """Everything one checker pass writes, in one transaction."""

    consumer: str
    #: The position row as the pass read it; None before the consumer's first pass.
    read: Tracking | None
    position: int
    now_us: int
    #: Runs first seen this pass: ``(run_id, judged stuck already)``.
    new_pending: Sequence[tuple[str, bool]] = ()
    #: Pending runs judged stuck this pass: they stay pending until they end.
    mark_judged: Sequence[str] = ()
    #: Pending runs finished with.
    drop: Sequence[str] = ()
    verdicts: Sequence[VerdictRecord] = ()
    violations: Sequence[ViolationRecord] = ()


@dataclass(frozen=True)
class RunFilter:
    """Which verdicts :meth:`MonitorReader.list_runs` lists; None matches anything."""

    verdict: str | None = None
    agent: str | None = None
    user: str | None = None
    rule: str | None = None
    state: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    thread: str | None = None


@dataclass(frozen=True, slots=True)
class RunsPage:
    """A page of verdicts, failures first then newest first; ``inputs`` holds the user's
    message of each run listed (its ``agent_started`` input), where there is one."""

    verdicts: tuple[VerdictRecord, ...]
    inputs: Mapping[str, str]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class RunDetail:
    """One run: its events in store order, its receipts in write order, its judgement."""

    run: RunRecord
    events: tuple[StoredEvent, ...]
    receipts: tuple[Receipt, ...]
    verdict: VerdictRecord | None
    violations: tuple[ViolationRecord, ...]


@dataclass(frozen=True, slots=True)
class SliCount:
    good: int
    total: int


@dataclass(frozen=True, slots=True)
class SloCounts:
    """The service level indicators over one window, and the runs open and stuck now."""

    delivery: SliCount
    completeness: SliCount
    persistence: SliCount
    open_runs: int
    stuck_runs: int


class Pacing(Protocol):
    """Cooperative slicing of the row-to-object work of a long read: :meth:`due` says when
    the event loop should get a turn, :meth:`pause` gives it one."""

    def due(self) -> bool: ...

    async def pause(self) -> None: ...


class _NoPacing:
    def due(self) -> bool:
        return False

    async def pause(self) -> None:  # pragma: no cover - never due
        return None


# ---- the store ------------------------------------------------------------------------------


class MonitorStore:
    """The monitor's access to an :class:`AuditStore`: read sessions and the checker's write."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.dialect = store.dialect
        self._insert = pg_insert if self.dialect == "postgresql" else sqlite_insert

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[MonitorReader]:
        """One read connection for several queries (no write lock is taken)."""
        try:
            async with self.store.engine.connect() as conn:
                yield MonitorReader(conn)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise translate(exc) from exc

    async def commit_pass(self, w: PassWrite) -> bool:
        """Write a checker pass: position, pending set, verdicts and violations, in one
        transaction, each statement one ``executemany``. Returns False, having written
        nothing, when the consumer's position is no longer what the pass read (another checker
        of the same consumer committed in between): the pass is to be done again."""
        try:
            async with self.store.engine.begin() as conn:
                # First statement: on SQLite it takes the write lock, on PostgreSQL the row
                # lock that orders two checkers of one consumer.
                if w.read is None:
                    moved = await conn.execute(
                        self._insert(MonitorPositionRow)
                        .values(consumer=w.consumer, position=w.position, updated_us=w.now_us)
                        .on_conflict_do_nothing(index_elements=["consumer"])
                    )
                else:
                    moved = await conn.execute(
                        update(MonitorPositionRow)
                        .where(
                            MonitorPositionRow.consumer == w.consumer,
                            MonitorPositionRow.position == w.read.position,
                            MonitorPositionRow.updated_us == w.read.updated_us,
                        )
                        .values(
                            position=w.position, updated_us=max(w.now_us, w.read.updated_us + 1)
                        )
                    )
                if moved.rowcount != 1:
                    return False
                if w.new_pending:
                    await conn.execute(
                        insert(PendingRunRow),
                        [
                            {"run_id": run_id, "first_seen_us": w.now_us, "judged": judged}
                            for run_id, judged in w.new_pending
                        ],
                    )
                if w.mark_judged:
                    await conn.execute(_MARK_JUDGED, [{"b_run": r} for r in w.mark_judged])
                if w.drop:
                    await conn.execute(_DROP_PENDING, [{"b_run": r} for r in w.drop])
                if w.verdicts:
                    await conn.execute(insert(VerdictRow), [_verdict_row(v) for v in w.verdicts])
                if w.violations:
                    await conn.execute(
                        insert(ViolationRow), [_violation_row(v) for v in w.violations]
                    )
            return True
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise translate(exc) from exc


_MARK_JUDGED = (
    update(PendingRunRow).where(PendingRunRow.run_id == bindparam("b_run")).values(judged=True)
)
_DROP_PENDING = delete(PendingRunRow).where(PendingRunRow.run_id == bindparam("b_run"))


def _verdict_row(v: VerdictRecord) -> dict[str, Any]:
    # ``rules`` is stored as one comma-separated column.
    return {f.name: getattr(v, f.name) for f in fields(v)} | {"rules": ",".join(v.rules)}


def _violation_row(v: ViolationRecord) -> dict[str, Any]:
    row = {f.name: getattr(v, f.name) for f in fields(v) if f.name not in _READ_BACK}
    return row | {"seqs": list(v.seqs), "event_ids": list(v.event_ids)}


#: What a violation has only once stored: its id, and its run's owner and agent.
_READ_BACK = frozenset({"id", "user_id", "agent"})


def _verdict(row: Any) -> VerdictRecord:
    values = row._asdict()
    return VerdictRecord(**values | {"rules": tuple(r for r in values["rules"].split(",") if r)})


def _violation(row: Any) -> ViolationRecord:
    values = row._asdict()
    return ViolationRecord(
        **values | {"seqs": tuple(values["seqs"]), "event_ids": tuple(values["event_ids"])}
    )


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

#: In the field order of :class:`Event`, then commit time and live flag.
_EVENT_COLUMNS = (
    EventRow.type,
    EventRow.event_id,
    EventRow.run_id,
    EventRow.thread_id,
    EventRow.seq,
    EventRow.ts_us,
    EventRow.agent,
    EventRow.data,
    EventRow.committed_us,
    EventRow.live,
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

_VIOLATION_COLUMNS = (
    ViolationRow.id,
    ViolationRow.run_id,
    ViolationRow.rule,
    ViolationRow.message,
    ViolationRow.seqs,
    ViolationRow.event_ids,
    ViolationRow.judged_us,
    VerdictRow.user_id,
    VerdictRow.agent,
)

#: Run ids per ``IN`` list.
_IN_CHUNK = 500


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


# ---- the reads ------------------------------------------------------------------------------


class MonitorReader:
    """The monitor's queries, on one read connection (see :meth:`MonitorStore.reading`)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    # ---- following the store (the checker) ------------------------------------------------

    async def tracking(self, consumer: str) -> Tracking | None:
        """The consumer's saved position; None before its first pass."""
        row = (
            await self._conn.execute(
                select(MonitorPositionRow.position, MonitorPositionRow.updated_us).where(
                    MonitorPositionRow.consumer == consumer
                )
            )
        ).first()
        return Tracking(row.position, row.updated_us) if row is not None else None

    async def events_after(self, position: int, limit: int) -> list[EventPosition]:
        """The next ``limit`` events past ``position``, in store order."""
        rows = await self._conn.execute(
            select(EventRow.position, EventRow.run_id, EventRow.committed_us)
            .where(EventRow.position > position)
            .order_by(EventRow.position)
            .limit(limit)
        )
        return [EventPosition(p, run_id, committed) for p, run_id, committed in rows]

    async def pending_runs(self) -> list[PendingRun]:
        """Every run the checker has not finished with, and when it started and ended."""
        rows = await self._conn.execute(
            select(
                PendingRunRow.run_id,
                PendingRunRow.judged,
                RunRow.created_us,
                RunRow.ended_us,
                RunRow.timeout_s,
            ).join(RunRow, RunRow.run_id == PendingRunRow.run_id, isouter=True)
        )
        return [
            PendingRun(
                r.run_id,
                bool(r.judged),
                RunClock(r.created_us, r.ended_us, r.timeout_s)
                if r.created_us is not None
                else None,
            )
            for r in rows
        ]

    async def judged(self, run_ids: Sequence[str]) -> set[str]:
        """Those of ``run_ids`` that have a verdict."""
        out: set[str] = set()
        for ids in _chunks(run_ids, _IN_CHUNK):
            out.update(
                (
                    await self._conn.execute(
                        select(VerdictRow.run_id).where(VerdictRow.run_id.in_(ids))
                    )
                ).scalars()
            )
        return out

    async def unfollowed_runs(self, after: int, upto: int) -> set[str]:
        """Runs with events at positions in ``(after, upto]`` that are neither judged nor
        pending: on PostgreSQL, events committed after a higher position was read."""
        query = (
            select(EventRow.run_id)
            .distinct()
            .where(
                EventRow.position > after,
                EventRow.position <= upto,
                ~exists().where(VerdictRow.run_id == EventRow.run_id),
                ~exists().where(PendingRunRow.run_id == EventRow.run_id),
            )
        )
        return set((await self._conn.execute(query)).scalars())

    async def run_clocks(self, run_ids: Sequence[str]) -> dict[str, RunClock]:
        """When each of the runs that exist started and ended."""
        out: dict[str, RunClock] = {}
        for ids in _chunks(run_ids, _IN_CHUNK):
            rows = await self._conn.execute(
                select(RunRow.run_id, RunRow.created_us, RunRow.ended_us, RunRow.timeout_s).where(
                    RunRow.run_id.in_(ids)
                )
            )
            for r in rows:
                out[r.run_id] = RunClock(r.created_us, r.ended_us, r.timeout_s)
        return out

    async def load_runs(
        self, run_ids: Sequence[str], pacing: Pacing | None = None
    ) -> dict[str, StoredRun]:
        """The runs that exist among ``run_ids``, whole: three queries per 500 runs. Rows are
        turned into events and receipts here; with ``pacing`` the event loop gets its turns."""
        pace = pacing or _NoPacing()
        out: dict[str, StoredRun] = {}
        for ids in _chunks(run_ids, _IN_CHUNK):
            runs = [
                RunRecord(*r)
                for r in await self._conn.execute(
                    select(*_RUN_COLUMNS).where(RunRow.run_id.in_(ids))
                )
            ]
            events: dict[str, list[Any]] = {}
            result = await self._conn.execute(
                select(*_EVENT_COLUMNS).where(EventRow.run_id.in_(ids)).order_by(EventRow.position)
            )
            for row in result:  # each row's JSON is decoded here
                events.setdefault(row[2], []).append(row)
                if pace.due():
                    await pace.pause()
            receipts: dict[str, list[Receipt]] = {}
            remote: dict[str, set[str]] = {}
            served_elsewhere = and_(
                ConnectionRow.instance_id.is_not(None),
                ConnectionRow.instance_id != RunRow.instance_id,
            )
            result = await self._conn.execute(
                select(*_RECEIPT_COLUMNS, case((served_elsewhere, True), else_=False))
                .join(RunRow, RunRow.run_id == DeliveryRow.run_id)
                .join(
                    ConnectionRow,
                    ConnectionRow.connection_id == DeliveryRow.connection_id,
                    isouter=True,
                )
                .where(DeliveryRow.run_id.in_(ids))
                .order_by(DeliveryRow.id)
            )
            for *d, elsewhere in result:
                receipts.setdefault(d[1], []).append(Receipt(*d))
                if elsewhere:
                    remote.setdefault(d[1], set()).add(d[3])
                if pace.due():
                    await pace.pause()
            for run in runs:
                rows = events.get(run.run_id, ())
                out[run.run_id] = StoredRun(
                    run=run,
                    events=tuple(
                        Event(_TYPES[t], eid, rid, th, seq, ts, ag, data)
                        for t, eid, rid, th, seq, ts, ag, data, _c, _l in rows
                    ),
                    committed_us={r[1]: r[8] for r in rows},
                    live=frozenset(r[1] for r in rows if r[9]),
                    receipts=tuple(receipts.get(run.run_id, ())),
                    remote_connections=frozenset(remote.get(run.run_id, ())),
                )
                if pace.due():
                    await pace.pause()
        return out

    async def run_ids(self, *, since_us: int = 0, run_id: str | None = None) -> list[str]:
        """The runs created since ``since_us`` (or the one run, if it exists), oldest first."""
        query = select(RunRow.run_id)
        if run_id is not None:
            query = query.where(RunRow.run_id == run_id)
        else:
            query = query.where(RunRow.created_us >= since_us)
        return list((await self._conn.execute(query.order_by(RunRow.created_us))).scalars())

    # ---- the API and the UI ---------------------------------------------------------------

    async def list_runs(self, f: RunFilter, *, limit: int, cursor: str | None) -> RunsPage:
        """Judged runs, failures first then newest first; ``cursor`` (from the previous page)
        pages on (failed first, created, run_id)."""
        q = select(VerdictRow)
        if f.verdict:
            q = q.where(VerdictRow.verdict == f.verdict)
        if f.agent:
            q = q.where(VerdictRow.agent == f.agent)
        if f.user:
            q = q.where(VerdictRow.user_id == f.user)
        if f.state:
            q = q.where(VerdictRow.state == f.state)
        if f.thread:
            q = q.where(VerdictRow.thread_id == f.thread)
        if f.since_us is not None:
            q = q.where(VerdictRow.created_us >= f.since_us)
        if f.until_us is not None:
            q = q.where(VerdictRow.created_us < f.until_us)
        if f.rule:
            q = q.where(
                VerdictRow.run_id.in_(
                    select(ViolationRow.run_id).where(ViolationRow.rule == f.rule)
                )
            )
        fail_first = case((VerdictRow.verdict == "fail", 0), else_=1)
        if cursor:
            rank_s, created_s, run_id = cursor.split(":", 2)
            rank, created = int(rank_s), int(created_s)
            q = q.where(
                (fail_first > rank)
                | (
                    (fail_first == rank)
                    & (
                        (VerdictRow.created_us < created)
                        | ((VerdictRow.created_us == created) & (VerdictRow.run_id < run_id))
                    )
                )
            )
        q = q.order_by(fail_first, VerdictRow.created_us.desc(), VerdictRow.run_id.desc())
        rows = (await self._conn.execute(q.limit(limit + 1))).all()
        more = len(rows) > limit
        verdicts = tuple(_verdict(r) for r in rows[:limit])
        next_cursor = None
        if more and verdicts:
            last = verdicts[-1]
            next_cursor = f"{0 if last.verdict == 'fail' else 1}:{last.created_us}:{last.run_id}"
        inputs = await run_inputs(self._conn, [v.run_id for v in verdicts])
        return RunsPage(verdicts, inputs, next_cursor)

    async def run_detail(self, run_id: str) -> RunDetail | None:
        conn = self._conn
        run = (await conn.execute(select(*_RUN_COLUMNS).where(RunRow.run_id == run_id))).first()
        if run is None:
            return None
        events = await conn.execute(
            select(EventRow).where(EventRow.run_id == run_id).order_by(EventRow.position)
        )
        receipts = await conn.execute(
            select(DeliveryRow).where(DeliveryRow.run_id == run_id).order_by(DeliveryRow.id)
        )
        verdict = (
            await conn.execute(select(VerdictRow).where(VerdictRow.run_id == run_id))
        ).first()
        violations = await conn.execute(
            select(*_VIOLATION_COLUMNS)
            .join(VerdictRow, VerdictRow.run_id == ViolationRow.run_id, isouter=True)
            .where(ViolationRow.run_id == run_id)
            .order_by(ViolationRow.id)
        )
        return RunDetail(
            run=RunRecord(*run),
            events=tuple(_stored(e) for e in events),
            receipts=tuple(receipt_from_row(r) for r in receipts),
            verdict=_verdict(verdict) if verdict is not None else None,
            violations=tuple(_violation(v) for v in violations),
        )

    async def list_violations(
        self, *, rule: str | None, since_us: int | None, limit: int, before_id: int | None
    ) -> tuple[list[ViolationRecord], int | None]:
        """Violations newest first; the second value is ``before_id`` for the next page."""
        q = select(*_VIOLATION_COLUMNS).join(
            VerdictRow, VerdictRow.run_id == ViolationRow.run_id, isouter=True
        )
        if rule:
            q = q.where(ViolationRow.rule == rule)
        if since_us is not None:
            q = q.where(ViolationRow.judged_us >= since_us)
        if before_id is not None:
            q = q.where(ViolationRow.id < before_id)
        rows = (await self._conn.execute(q.order_by(ViolationRow.id.desc()).limit(limit + 1))).all()
        items = [_violation(r) for r in rows[:limit]]
        more = len(rows) > limit
        return items, (items[-1].id if more and items else None)

    async def violation_counts(self, *, since_us: int) -> dict[str, int]:
        """Violations judged since ``since_us``, by rule."""
        rows = await self._conn.execute(
            select(ViolationRow.rule, func.count())
            .where(ViolationRow.judged_us >= since_us)
            .group_by(ViolationRow.rule)
        )
        return {rule: int(n) for rule, n in rows}

    async def slo_counts(
        self,
        *,
        now_us: int,
        window_s: float,
        delivery_slo_s: float,
        ack_wait_s: float,
        persist_slo_s: float,
    ) -> SloCounts:
        """Delivery, completeness and persistence over the window ending now.

        Delivery counts the live events (an owner connection was subscribed) acked by an
        owner connection within ``delivery_slo_s`` of their emission. One not acked yet is in
        flight, neither good nor bad, until ``ack_wait_s`` after its emission: the
        ``delivery_slo`` rule judges it the same way."""
        conn = self._conn
        since = now_us - _us(window_s)
        # Each live event of the window with its first ack by an owner connection, looked up
        # per event (ix_deliveries_event_id): the cost follows the window, not the retention.
        first_ack = (
            select(func.min(DeliveryRow.acked_us))
            .where(
                DeliveryRow.event_id == EventRow.event_id,
                DeliveryRow.user_id == RunRow.user_id,
                DeliveryRow.acked_us.is_not(None),
            )
            .correlate(EventRow, RunRow)
            .scalar_subquery()
        )
        window = (
            select(EventRow.ts_us.label("ts"), first_ack.label("acked"))
            .join(RunRow, RunRow.run_id == EventRow.run_id)
            .where(EventRow.ts_us >= since, EventRow.live.is_(True))
            .subquery()
        )
        judgeable = or_(window.c.acked.is_not(None), window.c.ts < now_us - _us(ack_wait_s))
        good_delivery = case((window.c.acked - window.c.ts <= _us(delivery_slo_s), 1), else_=0)
        d = (
            await conn.execute(
                select(func.count(), func.coalesce(func.sum(good_delivery), 0))
                .select_from(window)
                .where(judgeable)
            )
        ).one()
        good_persist = case(
            (EventRow.committed_us - EventRow.ts_us <= _us(persist_slo_s), 1), else_=0
        )
        p = (
            await conn.execute(
                select(func.count(), func.coalesce(func.sum(good_persist), 0)).where(
                    EventRow.ts_us >= since
                )
            )
        ).one()
        passed = case((VerdictRow.verdict == "pass", 1), else_=0)
        c = (
            await conn.execute(
                select(func.count(), func.coalesce(func.sum(passed), 0)).where(
                    VerdictRow.judged_us >= since
                )
            )
        ).one()
        # Open = no terminal event yet. (The checker's pending set also holds ended runs whose
        # acks it still waits for; those are not in progress.) Stuck runs are counted apart.
        unended = (
            await conn.execute(
                select(func.count()).select_from(RunRow).where(RunRow.ended_us.is_(None))
            )
        ).scalar() or 0
        stuck = (
            await conn.execute(
                select(func.count()).select_from(PendingRunRow).where(PendingRunRow.judged)
            )
        ).scalar() or 0
        return SloCounts(
            delivery=SliCount(int(d[1]), int(d[0])),
            completeness=SliCount(int(c[1]), int(c[0])),
            persistence=SliCount(int(p[1]), int(p[0])),
            open_runs=max(int(unended) - int(stuck), 0),
            stuck_runs=int(stuck),
        )

    async def outcomes_by_agent(self, *, since_us: int) -> dict[str, dict[str, int]]:
        """Per agent, the runs that ended since ``since_us`` by outcome: every outcome of
        :class:`~runtime.lifecycle.RunOutcome`, at 0 when none ended so (one that is not an
        outcome counts as ``error``)."""
        rows = await self._conn.execute(
            select(RunRow.agent, RunRow.outcome, func.count())
            .where(RunRow.ended_us.is_not(None), RunRow.ended_us >= since_us)
            .group_by(RunRow.agent, RunRow.outcome)
        )
        by_agent: dict[str, dict[str, int]] = {}
        for agent, outcome, count in rows:
            counts = by_agent.setdefault(agent, dict.fromkeys(RunOutcome.ALL, 0))
            counts[outcome if outcome in counts else RunOutcome.ERROR] += int(count)
        return by_agent
