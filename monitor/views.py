"""What the API and the web UI show: the store's read model (``runtime.store.monitoring``) as
the JSON-ready dicts both serve, with times formatted once, here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from runtime.events import format_ts
from runtime.lifecycle import RunOutcome
from runtime.metrics import PERSIST_SLO_S
from runtime.store.monitoring import (
    MonitorReader,
    RunDetail,
    RunsPage,
    SliCount,
    SloCounts,
    VerdictRecord,
    ViolationRecord,
)

from .rules import RuleConfig, first_acks

__all__ = [
    "PROMPT_CHARS",
    "SLO_OBJECTIVE",
    "agent_health",
    "agents_window",
    "run_detail",
    "runs_page",
    "slo_figures",
    "slo_window",
    "verdict_dict",
    "violation_items",
]

#: The share of good events (or runs) every SLO asks for.
SLO_OBJECTIVE = 0.999
#: A run's prompt in a list is cut to this many characters.
PROMPT_CHARS = 200


def _ts(us: int | None) -> str | None:
    return format_ts(us) if us is not None else None


def _prompt(text: str | None) -> str | None:
    """The user's message on one line, cut short."""
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= PROMPT_CHARS else flat[: PROMPT_CHARS - 1] + "…"


def verdict_dict(v: VerdictRecord, prompt: str | None = None) -> dict[str, Any]:
    return {
        "run_id": v.run_id,
        "user_id": v.user_id,
        "agent": v.agent,
        "thread_id": v.thread_id,
        "state": v.state,
        "verdict": v.verdict,
        "outcome": v.outcome,
        "rules": list(v.rules),
        "violation_count": v.violation_count,
        "event_count": v.event_count,
        "created_at": _ts(v.created_us),
        "ended_at": _ts(v.ended_us),
        "judged_at": _ts(v.judged_us),
        "duration_ms": (v.ended_us - v.created_us) / 1000 if v.ended_us is not None else None,
        "prompt": prompt,
    }


def runs_page(page: RunsPage) -> tuple[list[dict[str, Any]], str | None]:
    """A page of judged runs, each with its prompt, and the cursor of the next page."""
    items = [verdict_dict(v, _prompt(page.inputs.get(v.run_id))) for v in page.verdicts]
    return items, page.next_cursor


def run_detail(d: RunDetail) -> dict[str, Any]:
    """One run with its events (each with its first send and first owner ack), receipts,
    verdict and violations."""
    first_sent: dict[str, int] = {}
    for r in d.receipts:
        first_sent[r.event_id] = min(first_sent.get(r.event_id, r.sent_us), r.sent_us)
    first_ack = first_acks(d.receipts, d.run.user_id)
    run = d.run
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
        "verdict": verdict_dict(d.verdict) if d.verdict is not None else None,
        "events": [
            {
                "position": s.position,
                "seq": s.event.seq,
                "type": s.event.type.value,
                "event_id": s.event.event_id,
                "ts": _ts(s.event.ts_us),
                "data": s.event.data,
                "live": bool(s.live),
                "emitted_us": s.event.ts_us,
                "committed_us": s.committed_us,
                "first_sent_us": first_sent.get(s.event.event_id),
                "first_acked_us": first_ack.get(s.event.event_id),
            }
            for s in d.events
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
            for r in d.receipts
        ],
        "violations": [
            {
                "rule": v.rule,
                "message": v.message,
                "seqs": list(v.seqs),
                "judged_at": _ts(v.judged_us),
            }
            for v in d.violations
        ],
    }


def violation_items(violations: Sequence[ViolationRecord]) -> list[dict[str, Any]]:
    return [
        {
            "id": v.id,
            "run_id": v.run_id,
            "rule": v.rule,
            "message": v.message,
            "seqs": list(v.seqs),
            "user_id": v.user_id,
            "agent": v.agent,
            "judged_at": _ts(v.judged_us),
        }
        for v in violations
    ]


def _ratio(good: int, total: int) -> float | None:
    return round(good / total, 6) if total else None


def _sli(count: SliCount, threshold_s: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"objective": SLO_OBJECTIVE}
    if threshold_s is not None:
        out["threshold_s"] = threshold_s
    return {
        **out,
        "good": count.good,
        "total": count.total,
        "ratio": _ratio(count.good, count.total),
    }


def slo_figures(
    counts: SloCounts, *, window_s: float, delivery_slo_s: float, persist_slo_s: float
) -> dict[str, Any]:
    """Delivery, completeness and persistence over one window, against their objectives."""
    return {
        "window_s": window_s,
        "delivery": _sli(counts.delivery, delivery_slo_s),
        "completeness": _sli(counts.completeness),
        "persistence": _sli(counts.persistence, persist_slo_s),
        "open_runs": counts.open_runs,
        "stuck_runs": counts.stuck_runs,
    }


def agent_health(
    outcomes: Mapping[str, Mapping[str, int]], *, window_s: float
) -> list[dict[str, Any]]:
    """Per agent, the runs that ended in the window by outcome, and the shares that ended in
    ``error`` (the agent failed) and ``runtime_restarted`` (a crash or a kill ended them),
    worst first: a crash-looping agent shows here even when every run it had was judged
    complete."""
    out: list[dict[str, Any]] = []
    for agent, counts in sorted(outcomes.items(), key=lambda ac: -_unhealthy(ac[1])):
        ended = sum(counts.values())
        out.append(
            {
                "agent": agent,
                "window_s": window_s,
                "ended": ended,
                "outcomes": dict(counts),
                "error_ratio": _ratio(counts[RunOutcome.ERROR], ended),
                "restart_ratio": _ratio(counts[RunOutcome.RUNTIME_RESTARTED], ended),
            }
        )
    return out


def _unhealthy(counts: Mapping[str, int]) -> float:
    ended = sum(counts.values())
    bad = counts[RunOutcome.ERROR] + counts[RunOutcome.RUNTIME_RESTARTED]
    return bad / ended if ended else 0.0


async def slo_window(
    reader: MonitorReader, rules: RuleConfig, *, now_us: int, window_s: float
) -> dict[str, Any]:
    """:func:`slo_figures` of the window of ``window_s`` ending at ``now_us``."""
    counts = await reader.slo_counts(
        now_us=now_us,
        window_s=window_s,
        delivery_slo_s=rules.delivery_slo_s,
        ack_wait_s=rules.ack_wait_s,
        persist_slo_s=PERSIST_SLO_S,
    )
    return slo_figures(
        counts, window_s=window_s, delivery_slo_s=rules.delivery_slo_s, persist_slo_s=PERSIST_SLO_S
    )


async def agents_window(
    reader: MonitorReader, *, now_us: int, window_s: float
) -> list[dict[str, Any]]:
    """:func:`agent_health` of the window of ``window_s`` ending at ``now_us``."""
    outcomes = await reader.outcomes_by_agent(since_us=now_us - int(window_s * 1_000_000))
    return agent_health(outcomes, window_s=window_s)
