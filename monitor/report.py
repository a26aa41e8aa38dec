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

from runtime.config import Settings
from runtime.events import now_us
from runtime.store.audit import AuditStore
from runtime.store.monitoring import MonitorStore, StoredRun

from .checker import run_facts
from .errors import UnknownRun
from .rules import RuleConfig, RunState, Verdict, check_run, rule_config, run_state

__all__ = ["judge_runs", "run_check"]

#: Runs loaded (three queries) and judged at a time.
_CHUNK = 200

#: The verdict of a run not ended yet: not judged.
OPEN = "open"


async def judge_runs(
    store: AuditStore, config: RuleConfig, *, since_us: int, run_id: str | None, now_us: int
) -> list[dict[str, Any]]:
    """Verdicts for the runs created since ``since_us`` (or the one run), oldest first.
    Raises :class:`~monitor.errors.UnknownRun` when ``run_id`` is not in the store."""
    results = []
    async with MonitorStore(store).reading() as reader:
        ids = await reader.run_ids(since_us=since_us, run_id=run_id)
        if run_id is not None and not ids:
            raise UnknownRun(run_id)
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            loaded = await reader.load_runs(chunk)  # three queries per chunk
            results += [_judge(loaded[rid], config, now_us) for rid in chunk if rid in loaded]
    return results


def _judge(stored: StoredRun, config: RuleConfig, now_us: int) -> dict[str, Any]:
    facts = run_facts(stored)
    state = run_state(facts, config, now_us)
    violations = check_run(facts, config, now_us) if state != RunState.OPEN else []
    if state == RunState.OPEN:
        verdict = OPEN
    else:
        verdict = (Verdict.FAIL if violations else Verdict.PASS).value
    return {
        "run_id": facts.run_id,
        "user_id": stored.run.user_id,
        "agent": stored.run.agent,
        "state": state.value,
        "outcome": stored.run.outcome,
        "events": len(facts.events),
        "verdict": verdict,
        "violations": [v.to_dict() for v in violations],
    }


def _print_table(results: list[dict[str, Any]], out: TextIO) -> None:
    judged = [r for r in results if r["verdict"] != OPEN]
    failed = [r for r in judged if r["verdict"] == Verdict.FAIL]
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
    """Judge, print, and return the exit status: 1 when a run broke a rule, 2 when ``run_id``
    is not in the store, else 0."""

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

    try:
        results = asyncio.run(go())
    except UnknownRun as exc:
        print(f"runwatch: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"runs": results}, indent=2))
    else:
        _print_table(results, sys.stdout)
    return 1 if any(r["verdict"] == Verdict.FAIL for r in results) else 0
