"""The monitor's tables, on the audit store's metadata (one schema, one Alembic history).

``monitor_positions``: how far each checker has read the events table. ``monitor_pending``:
runs seen and not yet finished with (judged once ended or stuck; a stuck run stays here,
counted by the stuck gauge, until it ends). ``verdicts`` and ``violations``: the judgements.
All written in one transaction per pass, with the position, so a restart neither judges a run
twice nor skips one.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from runtime.store.models import Base, Position

__all__ = ["MonitorPosition", "PendingRun", "VerdictRow", "ViolationRow"]


class MonitorPosition(Base):
    __tablename__ = "monitor_positions"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class PendingRun(Base):
    __tablename__ = "monitor_pending"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen_us: Mapped[int] = mapped_column(BigInteger)
    judged: Mapped[bool] = mapped_column(Boolean, default=False)


class VerdictRow(Base):
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
    __tablename__ = "violations"
    __table_args__ = (Index("ix_violations_rule_judged", "rule", "judged_us"),)

    id: Mapped[int] = mapped_column(Position, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    seqs: Mapped[list[int]] = mapped_column(JSON)
    event_ids: Mapped[list[str]] = mapped_column(JSON)
    judged_us: Mapped[int] = mapped_column(BigInteger)
