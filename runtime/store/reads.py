"""Read queries for chat clients: a user's threads and the runs of one thread.

Functions over an :class:`~sqlalchemy.ext.asyncio.AsyncConnection` (``store.engine.connect()``),
parameterized SQLAlchemy only. Every query is scoped to the owner: a thread of another user reads
as absent, exactly like one that does not exist (so existence never leaks, as on ``/ws``).

A thread's title is the input of its first run (the ``agent_started`` event, seq 1), cut to
:data:`TITLE_CHARS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ..events import format_ts
from .models import EventRow, RunRow, ThreadRow

__all__ = [
    "TITLE_CHARS",
    "ThreadRun",
    "ThreadSummary",
    "list_threads",
    "run_inputs",
    "thread_runs",
]

TITLE_CHARS = 120


@dataclass(frozen=True, slots=True)
class ThreadSummary:
    thread_id: str
    title: str
    run_count: int
    created_us: int
    last_run_us: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "thread_id": self.thread_id,
            "title": self.title,
            "run_count": self.run_count,
            "created_at": format_ts(self.created_us),
            "last_run_at": format_ts(self.last_run_us),
        }


@dataclass(frozen=True, slots=True)
class ThreadRun:
    run_id: str
    agent: str
    input: str
    created_us: int
    ended_us: int | None
    outcome: str | None
    last_seq: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "agent": self.agent,
            "input": self.input,
            "created_at": format_ts(self.created_us),
            "ended_at": format_ts(self.ended_us) if self.ended_us is not None else None,
            "outcome": self.outcome,
            "last_seq": self.last_seq,
        }


def _title(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TITLE_CHARS else flat[: TITLE_CHARS - 1].rstrip() + "…"


async def run_inputs(conn: AsyncConnection, run_ids: Sequence[str]) -> dict[str, str]:
    """The user's message of each run, from its ``agent_started`` event (seq 1); a run with
    no such text is left out."""
    if not run_ids:
        return {}
    rows = await conn.execute(
        select(EventRow.run_id, EventRow.data).where(
            EventRow.run_id.in_(run_ids), EventRow.seq == 1
        )
    )
    out: dict[str, str] = {}
    for run_id, data in rows:
        value = data.get("input") if isinstance(data, dict) else None
        if isinstance(value, str):
            out[run_id] = value
    return out


async def list_threads(
    conn: AsyncConnection, user_id: str, *, limit: int = 50, before: tuple[int, str] | None = None
) -> tuple[list[ThreadSummary], tuple[int, str] | None]:
    """The user's threads that have runs, most recently active first.

    ``before`` is the cursor ``(last_run_us, thread_id)`` returned with the previous page; the
    second value returned is the cursor for the next page, or ``None`` at the end.
    """
    last = func.max(RunRow.created_us).label("last_us")
    query = (
        select(
            ThreadRow.thread_id,
            ThreadRow.created_us,
            func.count(RunRow.run_id).label("runs"),
            func.min(RunRow.created_us).label("first_us"),
            last,
        )
        .join(RunRow, RunRow.thread_id == ThreadRow.thread_id)
        .where(ThreadRow.user_id == user_id, RunRow.user_id == user_id)
        .group_by(ThreadRow.thread_id, ThreadRow.created_us)
    )
    if before is not None:
        before_us, before_id = before
        query = query.having(
            or_(last < before_us, and_(last == before_us, ThreadRow.thread_id < before_id))
        )
    query = query.order_by(last.desc(), ThreadRow.thread_id.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    # The first run of each thread names it.
    firsts: dict[str, str] = {}
    if rows:
        starts = await conn.execute(
            select(RunRow.thread_id, RunRow.run_id, RunRow.created_us)
            .where(
                RunRow.user_id == user_id,
                RunRow.thread_id.in_([r.thread_id for r in rows]),
                RunRow.created_us.in_({r.first_us for r in rows}),
            )
            .order_by(RunRow.created_us, RunRow.run_id)
        )
        first_us = {r.thread_id: r.first_us for r in rows}
        for thread_id, run_id, created_us in starts:
            if created_us == first_us[thread_id]:
                firsts.setdefault(thread_id, run_id)
    inputs = await run_inputs(conn, list(firsts.values()))
    threads = [
        ThreadSummary(
            thread_id=r.thread_id,
            title=_title(inputs.get(firsts.get(r.thread_id, ""), "")),
            run_count=int(r.runs),
            created_us=int(r.created_us),
            last_run_us=int(r.last_us),
        )
        for r in rows
    ]
    cursor = (threads[-1].last_run_us, threads[-1].thread_id) if more and threads else None
    return threads, cursor


async def thread_runs(
    conn: AsyncConnection, user_id: str, thread_id: str, *, limit: int = 200
) -> list[ThreadRun] | None:
    """The newest ``limit`` runs of the user's thread, oldest first; ``None`` when the thread
    does not exist or belongs to someone else."""
    owner = (
        await conn.execute(select(ThreadRow.user_id).where(ThreadRow.thread_id == thread_id))
    ).scalar_one_or_none()
    if owner != user_id:
        return None
    newest = (
        await conn.execute(
            select(RunRow)
            .where(RunRow.thread_id == thread_id, RunRow.user_id == user_id)
            .order_by(RunRow.created_us.desc(), RunRow.run_id.desc())
            .limit(limit)
        )
    ).all()
    rows = list(reversed(newest))
    inputs = await run_inputs(conn, [r.run_id for r in rows])
    return [
        ThreadRun(
            run_id=r.run_id,
            agent=r.agent,
            input=inputs.get(r.run_id, ""),
            created_us=r.created_us,
            ended_us=r.ended_us,
            outcome=r.outcome,
            last_seq=r.last_seq,
        )
        for r in rows
    ]
