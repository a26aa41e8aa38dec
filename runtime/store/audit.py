"""The audit store: one implementation over SQLAlchemy 2 async, for SQLite and PostgreSQL.

Everything the runtime and the monitor read or write goes through :class:`AuditStore`.
Writes arrive grouped in a :class:`Batch` (see ``writer.py``: one transaction per group commit).
Driver errors are translated at this boundary into :class:`StoreError` subclasses, transient
or permanent (see ``errors.py``); reads on the runtime's hot paths (connect, chat, resume) are
bounded by :attr:`AuditStore.read_timeout_s`, so a stalled database answers "unavailable" instead
of freezing the sockets that wait on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..events import ErrorCode, Event, EventType, Receipt, dumps
from ..lifecycle import RunOutcome
from .errors import INT32_MAX, StoreError, StoreRejected, StoreUnavailable, translate
from .models import (
    Base,
    ConnectionRow,
    DeliveryRow,
    EventRow,
    InstanceLeaseRow,
    PendingRunRow,
    RunRow,
    ThreadRow,
    VerdictRow,
    ViolationRow,
)

__all__ = [
    "AckUpdate",
    "AuditStore",
    "Batch",
    "ConnectionClose",
    "ConnectionOpen",
    "Lease",
    "RunInfo",
    "StoreError",
    "StoreRejected",
    "StoreUnavailable",
    "StoredEvent",
]


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: str
    user_id: str
    thread_id: str
    agent: str
    client_msg_id: str
    instance_id: str
    created_us: int
    timeout_s: float = 300.0
    ended_us: int | None = None
    outcome: str | None = None
    last_seq: int | None = None
    settled_us: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "user_id": self.user_id,
            "thread_id": self.thread_id,
            "agent": self.agent,
            "client_msg_id": self.client_msg_id,
            "instance_id": self.instance_id,
            "created_us": self.created_us,
            "timeout_s": self.timeout_s,
            "ended_us": self.ended_us,
            "outcome": self.outcome,
            "last_seq": self.last_seq,
        }


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the store holds it: with its position, commit time and live flag."""

    event: Event
    position: int
    committed_us: int
    live: bool


@dataclass(frozen=True, slots=True)
class AckUpdate:
    connection_id: str
    run_id: str
    seq: int
    acked_us: int


@dataclass(frozen=True, slots=True)
class ConnectionOpen:
    connection_id: str
    user_id: str
    instance_id: str
    client: str | None
    opened_us: int


@dataclass(frozen=True, slots=True)
class ConnectionClose:
    connection_id: str
    closed_us: int
    close_code: int


@dataclass(frozen=True, slots=True)
class Lease:
    """One row of ``instance_leases`` (see :mod:`runtime.lease`)."""

    instance_id: str
    holder: str
    host: str
    pid: int
    acquired_us: int
    expires_us: int


@dataclass
class Batch:
    """What one group commit writes, in one transaction."""

    new_runs: list[tuple[RunInfo, bool]] = field(default_factory=list)
    events: list[tuple[Event, bool]] = field(default_factory=list)
    #: Events drained from the outage journal: (event, live, the journal's commit time).
    journaled: list[tuple[Event, bool, int]] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    acks: list[AckUpdate] = field(default_factory=list)
    settles: list[tuple[str, int]] = field(default_factory=list)
    opened: list[ConnectionOpen] = field(default_factory=list)
    closed: list[ConnectionClose] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.new_runs)
            + len(self.events)
            + len(self.journaled)
            + len(self.receipts)
            + len(self.acks)
            + len(self.settles)
            + len(self.opened)
            + len(self.closed)
        )


def _run_info(row: Any) -> RunInfo:
    return RunInfo(
        run_id=row.run_id,
        user_id=row.user_id,
        thread_id=row.thread_id,
        agent=row.agent,
        client_msg_id=row.client_msg_id,
        instance_id=row.instance_id,
        created_us=row.created_us,
        timeout_s=row.timeout_s,
        ended_us=row.ended_us,
        outcome=row.outcome,
        last_seq=row.last_seq,
        settled_us=row.settled_us,
    )


def event_from_row(row: Any) -> Event:
    return Event(
        type=EventType(row.type),
        event_id=row.event_id,
        run_id=row.run_id,
        thread_id=row.thread_id,
        seq=row.seq,
        ts_us=row.ts_us,
        agent=row.agent,
        data=row.data,
    )


def _stored(row: Any) -> StoredEvent:
    return StoredEvent(event_from_row(row), row.position, row.committed_us, bool(row.live))


def receipt_from_row(row: Any) -> Receipt:
    return Receipt(
        event_id=row.event_id,
        run_id=row.run_id,
        seq=row.seq,
        connection_id=row.connection_id,
        user_id=row.user_id,
        sent_us=row.sent_us,
        acked_us=row.acked_us,
        replayed=bool(row.replayed),
    )


def _outcome_of(event: Event) -> str:
    """The ``runs.outcome`` a terminal event gives its run."""
    if event.type == EventType.AGENT_COMPLETED:
        return RunOutcome.COMPLETED
    try:
        code = ErrorCode(str(event.data.get("code")))
    except ValueError:
        return RunOutcome.ERROR
    return RunOutcome.of_error(code)


#: SQLite's busy timeout for the runtime's batch writer: shorter than the writer's journal
#: fallback (about 1 s), so a database locked by another process degrades to the journal
#: instead of freezing every run behind the lock.
WRITER_BUSY_TIMEOUT_MS = 250
#: Runs a purge deletes per transaction: small enough that the runtime's writer, waiting on
#: SQLite's lock, gets it back well within its busy timeout.
PURGE_CHUNK = 200


def _sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite gets WAL, ``synchronous=NORMAL`` and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)
        _sqlite_pragmas(engine.sync_engine, 30_000)
        return engine
    # Bounded waits: an unreachable database is an error in seconds, never a hang.
    connect_args = {"timeout": 5, "command_timeout": 30}
    return create_async_engine(
        url, pool_pre_ping=True, pool_timeout=10, connect_args=connect_args, **kwargs
    )


def _sqlite_writer_engine(url: str) -> Engine:
    """A synchronous engine on the same SQLite file, for the batch writer's own thread."""
    sync_url = "sqlite:" + url.split(":", 1)[1] if url.startswith("sqlite+") else url
    engine = create_engine(
        sync_url,
        connect_args={"timeout": WRITER_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=1,
        max_overflow=0,
    )
    _sqlite_pragmas(engine, WRITER_BUSY_TIMEOUT_MS)
    return engine


class AuditStore:
    """Reads and writes of the audit store. Build with :meth:`open`; close with :meth:`close`."""

    #: Bound on the runtime's hot-path reads (connect, chat, resume, ack): a stalled store
    #: answers "unavailable" within it. The monitor's reads are not bounded.
    read_timeout_s = 3.0

    def __init__(self, engine: AsyncEngine, *, writer_engine: Engine | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        #: SQLite: a synchronous engine whose one connection lives in one thread, so a whole
        #: group commit (BEGIN, executemany, COMMIT) costs one thread hop.
        self._writer_engine = writer_engine
        self._writer_thread: concurrent.futures.ThreadPoolExecutor | None = None
        if writer_engine is not None:
            self._writer_thread = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="runwatch-sqlite-writer"
            )

    @classmethod
    def open(cls, url: str) -> AuditStore:
        writer = _sqlite_writer_engine(url) if url.startswith("sqlite") else None
        return cls(make_engine(url), writer_engine=writer)

    async def close(self) -> None:
        if self._writer_thread is not None and self._writer_engine is not None:
            engine = self._writer_engine
            await asyncio.get_running_loop().run_in_executor(self._writer_thread, engine.dispose)
            self._writer_thread.shutdown(wait=True)
            self._writer_thread = None
        await self.engine.dispose()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.begin() as conn:
                yield conn
        except Exception as exc:
            raise translate(exc) from exc

    @asynccontextmanager
    async def _read(self, timeout: float | None = None) -> AsyncIterator[AsyncConnection]:
        """A read connection; ``timeout`` bounds the wait for a pooled connection and the
        query together (hot paths: a stalled store must not freeze a connect or a chat)."""
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as conn:
                yield conn
        except Exception as exc:
            raise translate(exc) from exc

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(select(1))

    # ---- runs and threads -------------------------------------------------------------

    async def thread_owner(self, thread_id: str) -> str | None:
        async with self._read(self.read_timeout_s) as conn:
            row = await conn.execute(
                select(ThreadRow.user_id).where(ThreadRow.thread_id == thread_id)
            )
            return row.scalar_one_or_none()

    async def find_run_by_msg(self, user_id: str, client_msg_id: str) -> RunInfo | None:
        async with self._read(self.read_timeout_s) as conn:
            res = await conn.execute(
                select(RunRow).where(
                    RunRow.user_id == user_id, RunRow.client_msg_id == client_msg_id
                )
            )
            row = res.first()
            return _run_info(row) if row else None

    async def create_run(self, run: RunInfo, *, new_thread: bool) -> tuple[RunInfo, bool]:
        """Insert a run (and its thread when new). Returns ``(run, duplicate)``: when the user
        already used ``client_msg_id``, the original run and ``True``, and nothing is written."""
        created = await self.write(Batch(new_runs=[(run, new_thread)]), run.created_us)
        return created[0]

    async def get_run(self, run_id: str) -> RunInfo | None:
        async with self._read(self.read_timeout_s) as conn:
            res = await conn.execute(select(RunRow).where(RunRow.run_id == run_id))
            row = res.first()
            return _run_info(row) if row else None

    async def open_runs(self, instance_id: str | None = None) -> list[RunInfo]:
        """Runs with no terminal event, oldest first (optionally of one runtime instance)."""
        query = select(RunRow).where(RunRow.ended_us.is_(None))
        if instance_id is not None:
            query = query.where(RunRow.instance_id == instance_id)
        async with self._read() as conn:
            res = await conn.execute(query.order_by(RunRow.created_us))
            return [_run_info(r) for r in res]

    async def active_runs(self, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The owner's runs not ended, or ended but with the terminal event unacked."""
        async with self._read(self.read_timeout_s) as conn:
            res = await conn.execute(
                select(RunRow.run_id, RunRow.last_seq, RunRow.ended_us)
                .where(RunRow.user_id == user_id, RunRow.settled_us.is_(None))
                .order_by(RunRow.created_us.desc(), RunRow.run_id.desc())
                .limit(limit)
            )
            rows = res.all()
            open_ids = [r.run_id for r in rows if r.ended_us is None]
            seqs: dict[str, int] = {}
            if open_ids:
                res2 = await conn.execute(
                    select(EventRow.run_id, func.max(EventRow.seq))
                    .where(EventRow.run_id.in_(open_ids))
                    .group_by(EventRow.run_id)
                )
                seqs = {run_id: int(seq) for run_id, seq in res2.all()}
        return [
            {
                "run_id": r.run_id,
                "last_seq": r.last_seq if r.ended_us is not None else seqs.get(r.run_id, 0),
            }
            for r in rows
        ]

    async def runs_since(self, user_id: str, created_us: int, limit: int = 1000) -> list[RunInfo]:
        """The owner's runs created at or after ``created_us``, oldest first (the fan-out
        resync looks for runs whose start it may have missed)."""
        async with self._read(self.read_timeout_s) as conn:
            res = await conn.execute(
                select(RunRow)
                .where(RunRow.user_id == user_id, RunRow.created_us >= created_us)
                .order_by(RunRow.created_us, RunRow.run_id)
                .limit(limit)
            )
            return [_run_info(r) for r in res]

    # ---- events and receipts ----------------------------------------------------------

    async def run_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        if after_seq >= INT32_MAX:
            # Past any seq the 32-bit column can hold: nothing to replay (and no overflow).
            return []
        after_seq = max(after_seq, 0)
        async with self._read(self.read_timeout_s) as conn:
            res = await conn.execute(
                select(EventRow)
                .where(EventRow.run_id == run_id, EventRow.seq > after_seq)
                .order_by(EventRow.seq, EventRow.position)
            )
            return [event_from_row(r) for r in res]

    async def stored_events(self, run_id: str) -> list[StoredEvent]:
        """A run's events in store order (position), with commit times and live flags."""
        async with self._read() as conn:
            res = await conn.execute(
                select(EventRow).where(EventRow.run_id == run_id).order_by(EventRow.position)
            )
            return [_stored(r) for r in res]

    async def receipts(self, run_id: str) -> list[Receipt]:
        async with self._read() as conn:
            res = await conn.execute(
                select(DeliveryRow)
                .where(DeliveryRow.run_id == run_id)
                .order_by(DeliveryRow.seq, DeliveryRow.id)
            )
            return [receipt_from_row(r) for r in res]

    async def write(self, batch: Batch, committed_us: int) -> list[tuple[RunInfo, bool]]:
        """Write one group commit in one transaction; returns ``create_run`` results for
        ``batch.new_runs``, in order.

        SQLite: the whole transaction runs in the writer thread on its own connection (one
        thread hop). PostgreSQL: asyncpg through SQLAlchemy, one executemany per table.
        """
        if self._writer_engine is not None and self._writer_thread is not None:
            engine = self._writer_engine
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    self._writer_thread, _write_in_thread, engine, self._insert, batch, committed_us
                )
            except Exception as exc:
                raise translate(exc) from exc
        async with self._tx() as conn:
            return await conn.run_sync(_write_batch, self._insert, batch, committed_us)

    # ---- instance leases (runtime/lease.py holds the policy) ---------------------------

    async def get_lease(self, instance_id: str) -> Lease | None:
        async with self._read() as conn:
            res = await conn.execute(
                select(InstanceLeaseRow).where(InstanceLeaseRow.instance_id == instance_id)
            )
            row = res.first()
        if row is None:
            return None
        return Lease(
            row.instance_id, row.holder, row.host, row.pid, row.acquired_us, row.expires_us
        )

    async def claim_lease(self, lease: Lease, *, replacing: Lease | None) -> bool:
        """Take ``lease.instance_id`` for ``lease.holder``; True when this call won.

        ``replacing`` None: only when no row exists. Otherwise a compare-and-set on the row
        as it was read (holder and expiry), so of several claimants exactly one wins, and a
        holder that renewed in between keeps its lease."""
        values = {
            "holder": lease.holder,
            "host": lease.host,
            "pid": lease.pid,
            "acquired_us": lease.acquired_us,
            "expires_us": lease.expires_us,
        }
        async with self._tx() as conn:
            if replacing is None:
                res = await conn.execute(
                    self._insert(InstanceLeaseRow)
                    .values(instance_id=lease.instance_id, **values)
                    .on_conflict_do_nothing(index_elements=["instance_id"])
                )
            else:
                res = await conn.execute(
                    update(InstanceLeaseRow)
                    .where(
                        InstanceLeaseRow.instance_id == lease.instance_id,
                        InstanceLeaseRow.holder == replacing.holder,
                        InstanceLeaseRow.expires_us == replacing.expires_us,
                    )
                    .values(**values)
                )
            return (res.rowcount or 0) == 1

    async def renew_lease(self, instance_id: str, holder: str, expires_us: int) -> bool:
        """Extend a lease this holder still has; False when it was lost."""
        async with self._tx() as conn:
            res = await conn.execute(
                update(InstanceLeaseRow)
                .where(
                    InstanceLeaseRow.instance_id == instance_id,
                    InstanceLeaseRow.holder == holder,
                )
                .values(expires_us=expires_us)
            )
            return (res.rowcount or 0) == 1

    async def release_lease(self, instance_id: str, holder: str) -> None:
        async with self._tx() as conn:
            await conn.execute(
                delete(InstanceLeaseRow).where(
                    InstanceLeaseRow.instance_id == instance_id,
                    InstanceLeaseRow.holder == holder,
                )
            )

    async def open_run_instances(self) -> list[str]:
        """The instance ids that own at least one open run."""
        async with self._read() as conn:
            res = await conn.execute(
                select(RunRow.instance_id).where(RunRow.ended_us.is_(None)).distinct()
            )
            return sorted(r[0] for r in res)

    # ---- retention ----------------------------------------------------------------------

    async def purge(self, before_us: int, *, dry_run: bool = False) -> dict[str, int]:
        """Delete ended runs created before ``before_us`` and everything of them: events,
        deliveries, and the monitor's verdicts, violations and pending marks. ``dry_run``
        counts what would go and deletes nothing.

        Runs go ``PURGE_CHUNK`` at a time, each chunk in its own transaction with everything
        of its runs (the monitor never lists a run that no longer exists), so a long purge
        never holds the write lock for long: on SQLite the runtime's writer commits between
        two chunks. A purge stopped part-way is safe, and running it again finishes it."""
        counts = dict.fromkeys(("runs", "events", "deliveries", "verdicts", "violations"), 0)
        # Children first, the runs last.
        tables: dict[str, type[Base]] = {
            "deliveries": DeliveryRow,
            "events": EventRow,
            "violations": ViolationRow,
            "verdicts": VerdictRow,
            "pending": PendingRunRow,
            "runs": RunRow,
        }
        purgeable = and_(RunRow.created_us < before_us, RunRow.ended_us.is_not(None))
        after = ""  # dry runs page by run id; a real purge takes the next chunk left
        while True:
            async with self._tx() as conn:
                q = select(RunRow.run_id).where(purgeable)
                if dry_run:
                    q = q.where(RunRow.run_id > after).order_by(RunRow.run_id)
                chunk = [r[0] for r in await conn.execute(q.limit(PURGE_CHUNK))]
                for name, model in tables.items():
                    if not chunk:
                        break
                    where = model.__table__.c.run_id.in_(chunk)
                    if dry_run:
                        n = (
                            await conn.execute(select(func.count()).select_from(model).where(where))
                        ).scalar_one()
                    else:
                        n = (await conn.execute(delete(model).where(where))).rowcount or 0
                    if name in counts:
                        counts[name] += int(n)
            if len(chunk) < PURGE_CHUNK:
                break
            after = chunk[-1]
            await asyncio.sleep(0)  # the writer's turn
        if dry_run:
            return counts
        async with self._tx() as conn:
            await conn.execute(
                delete(ThreadRow).where(
                    ThreadRow.created_us < before_us,
                    ~select(RunRow.run_id).where(RunRow.thread_id == ThreadRow.thread_id).exists(),
                )
            )
            await conn.execute(
                delete(ConnectionRow).where(
                    ConnectionRow.closed_us.is_not(None), ConnectionRow.closed_us < before_us
                )
            )
        return counts


def _write_batch(
    conn: Connection, insert_: Any, batch: Batch, committed_us: int
) -> list[tuple[RunInfo, bool]]:
    created = [_create_run(conn, insert_, run, new) for run, new in batch.new_runs]
    _write_rows(conn, insert_, batch, committed_us)
    return created


def _write_in_thread(
    engine: Engine, insert_: Any, batch: Batch, committed_us: int
) -> list[tuple[RunInfo, bool]]:
    with engine.begin() as conn:
        return _write_batch(conn, insert_, batch, committed_us)


def _create_run(
    conn: Connection, insert_: Any, run: RunInfo, new_thread: bool
) -> tuple[RunInfo, bool]:
    inserted = conn.execute(
        insert_(RunRow)
        .values(
            run_id=run.run_id,
            user_id=run.user_id,
            thread_id=run.thread_id,
            agent=run.agent,
            client_msg_id=run.client_msg_id,
            instance_id=run.instance_id,
            created_us=run.created_us,
            timeout_s=run.timeout_s,
        )
        .on_conflict_do_nothing(index_elements=["user_id", "client_msg_id"])
    )
    if inserted.rowcount == 0:
        res = conn.execute(
            select(RunRow).where(
                RunRow.user_id == run.user_id, RunRow.client_msg_id == run.client_msg_id
            )
        )
        row = res.first()
        if row is None:
            raise StoreRejected(f"cannot create run {run.run_id}", reason="conflict")
        if row.run_id == run.run_id:
            # Read back: this very run was committed by an earlier attempt whose answer was
            # lost (a connection cut after COMMIT). It is new, not a duplicate: it starts.
            return _run_info(row), False
        return _run_info(row), True
    if new_thread:
        conn.execute(
            insert_(ThreadRow)
            .values(thread_id=run.thread_id, user_id=run.user_id, created_us=run.created_us)
            .on_conflict_do_nothing(index_elements=["thread_id"])
        )
    return run, False


def _write_rows(conn: Connection, insert_: Any, batch: Batch, committed_us: int) -> None:
    if batch.opened:
        stmt = insert_(ConnectionRow).on_conflict_do_nothing(index_elements=["connection_id"])
        conn.execute(
            stmt,
            [
                {
                    "connection_id": c.connection_id,
                    "user_id": c.user_id,
                    "instance_id": c.instance_id,
                    "client": c.client,
                    "opened_us": c.opened_us,
                }
                for c in batch.opened
            ],
        )
    rows = [(e, live, committed_us) for e, live in batch.events] + batch.journaled
    if rows:
        # The hot path: straight to the driver's executemany, no per-row statement work.
        # Idempotent by event_id, so a journal drained twice writes each event once.
        conn.exec_driver_sql(
            _sql(conn, _INSERT_EVENTS, 10),
            [
                (
                    e.event_id,
                    e.run_id,
                    e.seq,
                    e.type.value,
                    e.thread_id,
                    e.agent,
                    e.ts_us,
                    at,
                    live,
                    dumps(e.data),
                )
                for e, live, at in rows
            ],
        )
        for e, _live, _at in rows:
            if e.is_terminal:
                conn.execute(
                    update(RunRow)
                    .where(RunRow.run_id == e.run_id, RunRow.ended_us.is_(None))
                    .values(ended_us=e.ts_us, outcome=_outcome_of(e), last_seq=e.seq)
                )
    if batch.receipts:
        conn.exec_driver_sql(
            _sql(conn, _INSERT_DELIVERIES, 8),
            [
                (
                    r.event_id,
                    r.run_id,
                    r.seq,
                    r.connection_id,
                    r.user_id,
                    r.sent_us,
                    r.acked_us,
                    r.replayed,
                )
                for r in batch.receipts
            ],
        )
    if batch.acks:
        # One statement for the whole group (executemany). Acks are cumulative; each
        # receipt keeps the time of the first ack that covered it.
        params = [
            {
                "b_conn": a.connection_id,
                "b_run": a.run_id,
                "b_seq": min(a.seq, INT32_MAX),
                "b_t": a.acked_us,
            }
            for a in batch.acks
        ]
        conn.execute(_ACK_UPDATE, params)
    for run_id, settled_us in batch.settles:
        conn.execute(
            update(RunRow)
            .where(RunRow.run_id == run_id, RunRow.settled_us.is_(None))
            .values(settled_us=settled_us)
        )
    for c in batch.closed:
        conn.execute(
            update(ConnectionRow)
            .where(ConnectionRow.connection_id == c.connection_id)
            .values(closed_us=c.closed_us, close_code=c.close_code)
        )


_INSERT_EVENTS = (
    "INSERT INTO events (event_id, run_id, seq, type, thread_id, agent, ts_us, committed_us,"
    " live, data) VALUES ({}) ON CONFLICT (event_id) DO NOTHING"
)
_INSERT_DELIVERIES = (
    "INSERT INTO deliveries (event_id, run_id, seq, connection_id, user_id, sent_us, acked_us,"
    " replayed) VALUES ({})"
)


def _sql(conn: Connection, template: str, params: int) -> str:
    """``template`` with ``params`` placeholders in the driver's own style."""
    if conn.dialect.paramstyle == "numeric_dollar":
        marks = ", ".join(f"${i}" for i in range(1, params + 1))
    else:
        marks = ", ".join("?" * params)
    return template.format(marks)


_ACK_UPDATE = (
    update(DeliveryRow)
    .where(
        DeliveryRow.connection_id == bindparam("b_conn"),
        DeliveryRow.run_id == bindparam("b_run"),
        DeliveryRow.seq <= bindparam("b_seq"),
        DeliveryRow.acked_us.is_(None),
    )
    .values(acked_us=bindparam("b_t"))
)


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
