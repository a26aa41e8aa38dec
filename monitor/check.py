"""``runwatch check``: judge stored runs now, print the verdicts, exit 1 on any violation.

It reads the store and applies the rule engine directly (it does not rely on the verdicts the
checker stored), so it answers "is anything wrong?" on any database, e.g. in CI after a test
run or by hand during an incident.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from sqlalchemy import select

from runtime.config import Settings
from runtime.events import now_us
from runtime.store.models import RunRow
from runtime.store.audit import AuditStore

from .checker import load_many
from .rules import RuleConfig, RunFacts, RunState, check_run, run_state

__all__ = ["judge_runs", "run_check"]

#: Runs loaded (three queries) and judged at a time.
_CHUNK = 200


def rule_config(settings: Settings) -> RuleConfig:
    return RuleConfig(
        delivery_slo_s=settings.delivery_slo_s,
        run_timeout_s=settings.run_timeout_s,
        stuck_grace_s=settings.stuck_grace_s,
    )


async def judge_runs(
    store: AuditStore, config: RuleConfig, *, since_us: int, run_id: str | None, now_us: int
) -> list[dict[str, Any]]:
    """Verdicts for the runs created since ``since_us`` (or the one run), oldest first."""
    results = []
    async with store.engine.connect() as conn:
        query = select(RunRow.run_id)
        if run_id is not None:
            query = query.where(RunRow.run_id == run_id)
        else:
            query = query.where(RunRow.created_us >= since_us)
        ids = list((await conn.execute(query.order_by(RunRow.created_us))).scalars())
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            loaded = await load_many(conn, chunk, _CHUNK)  # three queries per chunk
            results += [_judge(loaded[rid], config, now_us) for rid in chunk if rid in loaded]
    return results


def _judge(loaded: tuple[Any, RunFacts], config: RuleConfig, now_us: int) -> dict[str, Any]:
    run, facts = loaded
    state = run_state(facts, config, now_us)
    violations = check_run(facts, config, now_us) if state != RunState.OPEN else []
    return {
        "run_id": facts.run_id,
        "user_id": run.user_id,
        "agent": run.agent,
        "state": state.value,
        "outcome": run.outcome,
        "events": len(facts.events),
        "verdict": "open" if state == RunState.OPEN else ("fail" if violations else "pass"),
        "violations": [v.to_dict() for v in violations],
    }


def _print_table(results: list[dict[str, Any]], out: TextIO) -> None:
    judged = [r for r in results if r["verdict"] != "open"]
    failed = [r for r in judged if r["verdict"] == "fail"]
    for r in results:
        print(
            f"{r['verdict'].upper():5} {r['run_id']}  {r['agent']:<8} {r['state']:<6} "
            f"{r['outcome'] or '-':<18} {r['events']:>4} events",
            file=out,
        )
        for v in r["violations"]:
            print(f"      {v['rule']}: {v['message']}", file=out)
    print(
        f"{len(judged)} run(s) judged, {len(failed)} with violations, "
        f"{len(results) - len(judged)} still open",
        file=out,
    )


def run_check(settings: Settings, *, since_s: float, run_id: str | None, as_json: bool) -> int:
    async def go() -> list[dict[str, Any]]:
        store = AuditStore.open(settings.database_url)
        try:
            now = now_us()
            return await judge_runs(
                store,
                rule_config(settings),
                since_us=now - int(since_s * 1_000_000),
                run_id=run_id,
                now_us=now,
            )
        finally:
            await store.close()

    results = asyncio.run(go())
    if run_id is not None and not results:
        print(f"runwatch: no run {run_id}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"runs": results}, indent=2))
    else:
        _print_table(results, sys.stdout)
    return 1 if any(r["verdict"] == "fail" for r in results) else 0
