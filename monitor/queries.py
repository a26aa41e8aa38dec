"""Read queries behind the monitor's API and web UI (parameterized SQLAlchemy, no string SQL)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.events import format_ts
from runtime.store.models import DeliveryRow, EventRow, RunRow

from .models import PendingRun, VerdictRow, ViolationRow

__all__ = [
    "SINCE_HELP",
    "SINCE_PATTERN",
    "FilterError",
    "RunFilter",
    "agent_health",
    "list_runs",
    "list_violations",
    "parse_since",
    "run_detail",
    "slo_figures",
]

SINCE_HELP = "a duration back from now (30m, 1h, 24h, 7d) or an RFC 3339 time"
#: What the page and the API accept for ``since``/``until``: the schema's pattern says the same.
SINCE_PATTERN = (
    r"^(\d{1,6}[smhdw]|\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"([Tt ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)?)?)$"
)
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class FilterError(ValueError):
    """A filter value the monitor does not accept; ``field`` names it, the text says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.args[0]}"


def parse_since(text: str, now_us: int, field: str = "since") -> int:
    """``1h``, ``24h``, ``7d`` (back from ``now_us``) or an RFC 3339 time (``Z`` or an offset;
    a date alone is midnight UTC) → epoch microseconds. The web UI and the API both use this,
    so a value means the same in both and is refused the same way."""
    value = text.strip()
    match = _DURATION.match(value)
    if match:
        # Further back than the epoch means "from the beginning".
        return max(now_us - int(match.group(1)) * _UNIT_S[match.group(2)] * 1_000_000, 0)
    if re.match(SINCE_PATTERN, value):
        try:
            parsed = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
        except ValueError:
            parsed = None
        if parsed is not None:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            try:
                return int(parsed.timestamp()) * 1_000_000 + parsed.microsecond
            except (OverflowError, OSError, ValueError):
                pass
    raise FilterError(field, f"expected {SINCE_HELP}; got {value[:60]!r}")


@dataclass(frozen=True)
class RunFilter:
    verdict: str | None = None
    agent: str | None = None
    user: str | None = None
    rule: str | None = None
    state: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    thread: str | None = None


def _ts(us: int | None) -> str | None:
    return format_ts(us) if us is not None else None


def _verdict_dict(v: Any, prompt: str | None = None) -> dict[str, Any]:
    return {
        "run_id": v.run_id,
        "user_id": v.user_id,
        "agent": v.agent,
        "thread_id": v.thread_id,
        "state": v.state,
        "verdict": v.verdict,
        "outcome": v.outcome,
        "rules": [r for r in v.rules.split(",") if r],
        "violation_count": v.violation_count,
        "event_count": v.event_count,
        "created_at": _ts(v.created_us),
        "ended_at": _ts(v.ended_us),
        "judged_at": _ts(v.judged_us),
        "duration_ms": (v.ended_us - v.created_us) / 1000 if v.ended_us is not None else None,
        "prompt": prompt,
    }


PROMPT_CHARS = 200


async def _prompts(conn: AsyncConnection, run_ids: list[str]) -> dict[str, str]:
    """The user's message of each run (its ``agent_started`` input), on one line, cut short."""
    if not run_ids:
        return {}
    rows = await conn.execute(
        select(EventRow.run_id, EventRow.data).where(
            EventRow.run_id.in_(run_ids), EventRow.seq == 1
        )
    )
    out = {}
    for run_id, data in rows:
        text = data.get("input") if isinstance(data, dict) else None
        if isinstance(text, str):
            flat = " ".join(text.split())
            out[run_id] = flat if len(flat) <= PROMPT_CHARS else flat[: PROMPT_CHARS - 1] + "…"
    return out


async def list_runs(
    conn: AsyncConnection, f: RunFilter, *, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Judged runs, failures first then newest first; ``cursor`` pages on (verdict, created,
    run_id)."""
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
            VerdictRow.run_id.in_(select(ViolationRow.run_id).where(ViolationRow.rule == f.rule))
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
    q = q.order_by(fail_first, VerdictRow.created_us.desc(), VerdictRow.run_id.desc()).limit(
        limit + 1
    )
    rows = (await conn.execute(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more and rows:
        last = rows[-1]
        next_cursor = f"{0 if last.verdict == 'fail' else 1}:{last.created_us}:{last.run_id}"
    prompts = await _prompts(conn, [r.run_id for r in rows])
    return [_verdict_dict(r, prompts.get(r.run_id)) for r in rows], next_cursor


async def run_detail(conn: AsyncConnection, run_id: str) -> dict[str, Any] | None:
    run = (await conn.execute(select(RunRow).where(RunRow.run_id == run_id))).first()
    if run is None:
        return None
    events = (
        await conn.execute(
            select(EventRow).where(EventRow.run_id == run_id).order_by(EventRow.position)
        )
    ).all()
    receipts = (
        await conn.execute(
            select(DeliveryRow).where(DeliveryRow.run_id == run_id).order_by(DeliveryRow.id)
        )
    ).all()
    verdict = (await conn.execute(select(VerdictRow).where(VerdictRow.run_id == run_id))).first()
    violations = (
        await conn.execute(
            select(ViolationRow).where(ViolationRow.run_id == run_id).order_by(ViolationRow.id)
        )
    ).all()
    first_sent: dict[str, int] = {}
    first_ack: dict[str, int] = {}
    for r in receipts:
        first_sent[r.event_id] = min(first_sent.get(r.event_id, r.sent_us), r.sent_us)
        if r.acked_us is not None and r.user_id == run.user_id:
            first_ack[r.event_id] = min(first_ack.get(r.event_id, r.acked_us), r.acked_us)
    return {
        "run": {
            "run_id": run.run_id,
            "user_id": run.user_id,
            "thread_id": run.thread_id,
            "agent": run.agent,
            "outcome": run.outcome,
            "created_at": _ts(run.created_us),
            "ended_at": _ts(run.ended_us),
            "timeout_s": run.timeout_s,
        },
        "verdict": _verdict_dict(verdict, None) if verdict else None,
        "events": [
            {
                "position": e.position,
                "seq": e.seq,
                "type": e.type,
                "event_id": e.event_id,
                "ts": _ts(e.ts_us),
                "data": e.data,
                "live": bool(e.live),
                "emitted_us": e.ts_us,
                "committed_us": e.committed_us,
                "first_sent_us": first_sent.get(e.event_id),
                "first_acked_us": first_ack.get(e.event_id),
            }
            for e in events
        ],
        "receipts": [
            {
                "event_id": r.event_id,
                "seq": r.seq,
                "connection_id": r.connection_id,
                "user_id": r.user_id,
                "sent_at": _ts(r.sent_us),
                "acked_at": _ts(r.acked_us),
                "replayed": bool(r.replayed),
            }
            for r in receipts
        ],
        "violations": [
            {"rule": v.rule, "message": v.message, "seqs": v.seqs, "judged_at": _ts(v.judged_us)}
            for v in violations
        ],
    }


async def list_violations(
    conn: AsyncConnection,
    *,
    rule: str | None,
    since_us: int | None,
    limit: int,
    before_id: int | None,
) -> tuple[list[dict[str, Any]], int | None]:
    q = select(
        ViolationRow.id,
        ViolationRow.run_id,
        ViolationRow.rule,
        ViolationRow.message,
        ViolationRow.seqs,
        ViolationRow.judged_us,
        VerdictRow.user_id,
        VerdictRow.agent,
    ).join(VerdictRow, VerdictRow.run_id == ViolationRow.run_id, isouter=True)
    if rule:
        q = q.where(ViolationRow.rule == rule)
    if since_us is not None:
        q = q.where(ViolationRow.judged_us >= since_us)
    if before_id is not None:
        q = q.where(ViolationRow.id < before_id)
    rows = (await conn.execute(q.order_by(ViolationRow.id.desc()).limit(limit + 1))).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {
            "id": r.id,
            "run_id": r.run_id,
            "rule": r.rule,
            "message": r.message,
            "seqs": r.seqs,
            "user_id": r.user_id,
            "agent": r.agent,
            "judged_at": _ts(r.judged_us),
        }
        for r in rows
    ]
    return items, (rows[-1].id if more and rows else None)


def _ratio(good: int, total: int) -> float | None:
    return round(good / total, 6) if total else None


async def slo_figures(
    conn: AsyncConnection,
    *,
    now_us: int,
    window_s: float,
    delivery_slo_s: float,
    ack_wait_s: float,
    persist_slo_s: float = 0.25,
) -> dict[str, Any]:
    """Delivery, completeness and persistence over the window ending now.

    A live event not acked by its owner is still in flight, neither good nor bad, until
    ``ack_wait_s`` after its emission: the ``delivery_slo`` rule judges it the same way."""
    since = now_us - int(window_s * 1_000_000)
    acks = (
        select(DeliveryRow.event_id, func.min(DeliveryRow.acked_us).label("acked"))
        .join(RunRow, RunRow.run_id == DeliveryRow.run_id)
        .where(DeliveryRow.user_id == RunRow.user_id, DeliveryRow.acked_us.is_not(None))
        .group_by(DeliveryRow.event_id)
        .subquery()
    )
    live = and_(EventRow.ts_us >= since, EventRow.live.is_(True))
    judgeable = or_(
        acks.c.acked.is_not(None), EventRow.ts_us < now_us - int(ack_wait_s * 1_000_000)
    )
    good_delivery = case(
        (acks.c.acked - EventRow.ts_us <= int(delivery_slo_s * 1_000_000), 1), else_=0
    )
    d = (
        await conn.execute(
            select(func.count(), func.coalesce(func.sum(good_delivery), 0))
            .select_from(EventRow)
            .join(acks, acks.c.event_id == EventRow.event_id, isouter=True)
            .where(live, judgeable)
        )
    ).one()
    good_persist = case(
        (EventRow.committed_us - EventRow.ts_us <= int(persist_slo_s * 1_000_000), 1), else_=0
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
    # Open = no terminal event yet. (The checker's pending set also holds ended runs whose acks
    # it still waits for; those are not in progress.) Stuck runs are counted apart.
    unended = (
        await conn.execute(
            select(func.count()).select_from(RunRow).where(RunRow.ended_us.is_(None))
        )
    ).scalar() or 0
    stuck = (
        await conn.execute(select(func.count()).select_from(PendingRun).where(PendingRun.judged))
    ).scalar() or 0
    return {
        "window_s": window_s,
        "delivery": {
            "objective": 0.999,
            "threshold_s": delivery_slo_s,
            "good": int(d[1]),
            "total": int(d[0]),
            "ratio": _ratio(int(d[1]), int(d[0])),
        },
        "completeness": {
            "objective": 0.999,
            "good": int(c[1]),
            "total": int(c[0]),
            "ratio": _ratio(int(c[1]), int(c[0])),
        },
        "persistence": {
            "objective": 0.999,
            "threshold_s": persist_slo_s,
            "good": int(p[1]),
            "total": int(p[0]),
            "ratio": _ratio(int(p[1]), int(p[0])),
        },
        "open_runs": max(int(unended) - int(stuck), 0),
        "stuck_runs": int(stuck),
    }


OUTCOMES = ("completed", "error", "cancelled", "timeout", "runtime_restarted")


async def agent_health(
    conn: AsyncConnection, *, now_us: int, window_s: float
) -> list[dict[str, Any]]:
    """Per agent, the runs that ended in the window by outcome, and the shares that ended in
    ``error`` (the agent failed) and ``runtime_restarted`` (a crash or a kill ended them):
    a crash-looping agent shows here even when every run it had was judged complete."""
    since = now_us - int(window_s * 1_000_000)
    rows = (
        await conn.execute(
            select(RunRow.agent, RunRow.outcome, func.count())
            .where(RunRow.ended_us.is_not(None), RunRow.ended_us >= since)
            .group_by(RunRow.agent, RunRow.outcome)
        )
    ).all()
    by_agent: dict[str, dict[str, int]] = {}
    for agent, outcome, count in rows:
        counts = by_agent.setdefault(agent, dict.fromkeys(OUTCOMES, 0))
        key = outcome if outcome in counts else "error"
        counts[key] += int(count)
    out: list[dict[str, Any]] = []
    for agent, counts in sorted(by_agent.items(), key=lambda ac: -_unhealthy(ac[1])):
        ended = sum(counts.values())
        out.append(
            {
                "agent": agent,
                "window_s": window_s,
                "ended": ended,
                "outcomes": counts,
                "error_ratio": _ratio(counts["error"], ended),
                "restart_ratio": _ratio(counts["runtime_restarted"], ended),
            }
        )
    return out


def _unhealthy(counts: dict[str, int]) -> float:
    ended = sum(counts.values())
    return (counts["error"] + counts["runtime_restarted"]) / ended if ended else 0.0
