"""The audit store's tables (SQLAlchemy 2 declarative models).

``events`` is append-only: rows are inserted, never updated; only retention deletes them.
Its ``position`` is the store's total order, which the monitor follows. ``deliveries`` holds the
receipts: one row per event frame written to one connection, with the time of that connection's
first acknowledgement. Times are integers, epoch microseconds, so they round-trip exactly.

The monitor's tables live here too (one schema, one Alembic history), and only the store's
read model (``monitoring.py``) touches them: ``monitor_positions``, how far each checker has
read the events table; ``monitor_pending``, runs seen and not yet finished with (judged once
ended or stuck; a stuck run stays, counted by the stuck gauge, until it ends); ``verdicts``
and ``violations``, the judgements. The checker writes all four in one transaction per pass,
with its position, so a restart neither judges a run twice nor skips one.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "ConnectionRow",
    "DeliveryRow",
    "EventRow",
    "InstanceLeaseRow",
    "MonitorPositionRow",
    "PendingRunRow",
    "RunRow",
    "ThreadRow",
    "VerdictRow",
    "ViolationRow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
Position = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ThreadRow(Base):
    __tablename__ = "threads"

    thread_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    created_us: Mapped[int] = mapped_column(BigInteger)


class RunRow(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("user_id", "client_msg_id", name="uq_runs_user_id_client_msg_id"),
        Index("ix_runs_user_unsettled", "user_id", "settled_us", "created_us"),
        Index("ix_runs_open", "ended_us", "instance_id"),
    )

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    thread_id: Mapped[str] = mapped_column(String(64), index=True)
    agent: Mapped[str] = mapped_column(String(200))
    client_msg_id: Mapped[str] = mapped_column(String(200))
    instance_id: Mapped[str] = mapped_column(String(200))
    created_us: Mapped[int] = mapped_column(BigInteger, index=True)
    timeout_s: Mapped[float] = mapped_column(default=300.0)
    ended_us: Mapped[int | None] = mapped_column(BigInteger, default=None)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    last_seq: Mapped[int | None] = mapped_column(Integer, default=None)
    # Set once an owner connection acked the terminal event: the run leaves active_runs.
    settled_us: Mapped[int | None] = mapped_column(BigInteger, default=None)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_seq", "run_id", "seq"),)

    position: Mapped[int] = mapped_column(Position, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    run_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    thread_id: Mapped[str] = mapped_column(String(64))
    agent: Mapped[str] = mapped_column(String(200))
    ts_us: Mapped[int] = mapped_column(BigInteger, index=True)
    committed_us: Mapped[int] = mapped_column(BigInteger)
    # True when an owner connection was subscribed to the run at emission (sent live);
    # false events are "deferred" and outside the delivery SLI.
    live: Mapped[bool] = mapped_column(Boolean)
    data: Mapped[dict] = mapped_column(JSON)


class DeliveryRow(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_run_seq", "run_id", "seq"),
        Index("ix_deliveries_conn_run_seq", "connection_id", "run_id", "seq"),
    )

    id: Mapped[int] = mapped_column(Position, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    connection_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(200))
    sent_us: Mapped[int] = mapped_column(BigInteger)
    acked_us: Mapped[int | None] = mapped_column(BigInteger, default=None)
    replayed: Mapped[bool] = mapped_column(Boolean, default=False)


class ConnectionRow(Base):
    __tablename__ = "connections"

    connection_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    instance_id: Mapped[str] = mapped_column(String(200))
    client: Mapped[str | None] = mapped_column(String(200), default=None)
    opened_us: Mapped[int] = mapped_column(BigInteger)
    closed_us: Mapped[int | None] = mapped_column(BigInteger, default=None)
    close_code: Mapped[int | None] = mapped_column(Integer, default=None)


class InstanceLeaseRow(Base):
    """A runtime instance's lease on its id (docs/operations.md): held by one live process, renewed
    before ``expires_us``. A lease that expires belongs to a dead replica: a survivor claims it
    (compare-and-set on ``holder`` and ``expires_us``), ends its open runs, and deletes it."""

    __tablename__ = "instance_leases"

    instance_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: A random token per process (or per takeover): who holds the lease now.
    holder: Mapped[str] = mapped_column(String(64))
    #: Where the holder runs: host name, boot id and pid namespace, so that a process on the
    #: same host can tell at once that a holder's pid is gone.
    host: Mapped[str] = mapped_column(String(300))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_us: Mapped[int] = mapped_column(BigInteger)
    expires_us: Mapped[int] = mapped_column(BigInteger)


# ---- the monitor's tables -------------------------------------------------------------------


class MonitorPositionRow(Base):
    """A consumer's tracking position in ``events``, and when it last moved."""

    __tablename__ = "monitor_positions"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class PendingRunRow(Base):
    """A run the checker has seen and not finished with; ``judged``: judged stuck already."""

    __tablename__ = "monitor_pending"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen_us: Mapped[int] = mapped_column(BigInteger)
    judged: Mapped[bool] = mapped_column(Boolean, default=False)


class VerdictRow(Base):
    """The checker's verdict on one run; ``rules`` lists the rules it broke, comma-separated."""

    __tablename__ = "verdicts"
    __table_args__ = (
        Index("ix_verdicts_judged", "judged_us"),
        Index("ix_verdicts_verdict_judged", "verdict", "judged_us"),
    )

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    agent: Mapped[str] = mapped_column(String(200), index=True)
    thread_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str] = mapped_column(String(8))
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    rules: Mapped[str] = mapped_column(Text, default="")
    violation_count: Mapped[int] = mapped_column(Integer, default=0)
    event_count: Mapped[int] = mapped_column(Integer, default=0)
    created_us: Mapped[int] = mapped_column(BigInteger, index=True)
    ended_us: Mapped[int | None] = mapped_column(BigInteger, default=None)
    judged_us: Mapped[int] = mapped_column(BigInteger)


class ViolationRow(Base):
    """One broken rule in one run: the seqs and event ids it points at."""

    __tablename__ = "violations"
    __table_args__ = (Index("ix_violations_rule_judged", "rule", "judged_us"),)

    id: Mapped[int] = mapped_column(Position, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    seqs: Mapped[list[int]] = mapped_column(JSON)
    event_ids: Mapped[list[str]] = mapped_column(JSON)
    judged_us: Mapped[int] = mapped_column(BigInteger)
