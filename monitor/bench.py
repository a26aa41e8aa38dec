"""Checker benchmark: how many runs per second the checker judges.

    python -m monitor.bench --runs 2000

Writes N completed runs of 12 events each (with a receipt per event) into a fresh SQLite store
(or ``--database-url``), then times the checker judging all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from runtime.events import Event, Receipt, new_id, now_us
from runtime.lifecycle import RunLifecycle
from runtime.store.migrate import upgrade
from runtime.store.recorder import AuditStore, Batch, RunInfo

from .checker import Checker, CheckerConfig
from .metrics import MonitorMetrics
from .rules import RuleConfig


def _run_events(run_id: str, t0: int) -> list[Event]:
    clock = itertools.count(t0, 1000)
    lc = RunLifecycle(run_id, "t-" + run_id, "demo", lambda: next(clock))
    events = [lc.started("bench"), lc.thinking("a"), lc.thinking("b")]
    for i in range(3):
        events += [lc.tool_executing(f"c{i}", "clock", {}), lc.tool_completed(f"c{i}", result=i)]
    events += [lc.delta("x"), lc.final_report("done"), lc.completed()]
    return events  # 12 events


async def _fill(store: AuditStore, runs: int) -> int:
    t0 = now_us() - 600_000_000
    events_total = 0
    for start in range(0, runs, 100):
        batch = Batch()
        for _ in range(min(100, runs - start)):
            rid = new_id()
            batch.new_runs.append((RunInfo(rid, "u", "t-" + rid, "demo", rid, "b", t0), True))
            events = _run_events(rid, t0)
            batch.events += [(e, True) for e in events]
            batch.receipts += [
                Receipt(e.event_id, rid, e.seq, "c", "u", e.ts_us + 2000, e.ts_us + 5000)
                for e in events
            ]
            events_total += len(events)
        await store.write(batch, t0 + 1000)
    return events_total


async def _bench(url: str, runs: int) -> dict[str, float]:
    store = AuditStore.open(url)
    try:
        events = await _fill(store, runs)
        checker = Checker(
            store,
            MonitorMetrics(CollectorRegistry()),
            CheckerConfig(rules=RuleConfig(ack_wait_s=1), settle_s=1),
        )
        started = time.perf_counter()
        result = await checker.catch_up()
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    return {
        "runs": result.judged,
        "events": events,
        "seconds": round(elapsed, 2),
        "runs_per_s": round(result.judged / elapsed, 1),
        "violations": result.violations,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitor.bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="runwatch-monitor-bench-") as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        upgrade(url)
        r = asyncio.run(_bench(url, args.runs))
    print(
        f"checker judged {r['runs']:.0f} runs ({r['events']:.0f} events, 12 per run) in "
        f"{r['seconds']} s: {r['runs_per_s']} runs/s ({r['violations']:.0f} violations)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
