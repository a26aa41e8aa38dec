"""The checker's pass on a real store (SQLite and PostgreSQL): it holds no write lock while it
reads and judges, it yields the event loop, and it judges every run exactly once whether it
is stopped in any phase, fails in any statement of its write, or races another checker."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from monitor.checker import Checker, CheckerConfig
from monitor.metrics import MonitorMetrics
from runtime.events import new_id
from runtime.store.audit import AuditStore
from runtime.store.models import (
    EventRow,
    MonitorPositionRow,
    PendingRunRow,
    RunRow,
    VerdictRow,
    ViolationRow,
)
from runtime.store.monitoring import MonitorReader

from .conftest import wait_until
from .test_checker import CONFIG, RULES, healthy_events, now_us, receipts, verdicts, write_run


def make_checker(
    store: AuditStore, config: CheckerConfig = CONFIG, clock: list[int] | None = None
) -> tuple[Checker, CollectorRegistry]:
    registry = CollectorRegistry()
    if clock is None:
        return Checker(store, MonitorMetrics(registry), config), registry
    return Checker(store, MonitorMetrics(registry), config, clock_us=lambda: clock[0]), registry


async def write_healthy(store: AuditStore, n: int, t0: int) -> list[str]:
    out = []
    for _ in range(n):
        rid = new_id()
        ev = healthy_events(rid, t0)
        out.append(await write_run(store, ev, receipts(ev), created_us=t0))
    return out


async def state(store: AuditStore) -> tuple[Any, ...]:
    """Everything the checker writes: position, pending set, verdicts, violations."""
    async with store.engine.connect() as conn:
        position = (await conn.execute(select(MonitorPositionRow.position))).all()
        pending = sorted(
            (await conn.execute(select(PendingRunRow.run_id, PendingRunRow.judged))).all()
        )
        judged = sorted((await conn.execute(select(VerdictRow.run_id))).scalars())
        violations = sorted((await conn.execute(select(ViolationRow.run_id))).scalars())
    return position, pending, judged, violations


async def judged_once(store: AuditStore, expected: list[str]) -> None:
    async with store.engine.connect() as conn:
        ids = list((await conn.execute(select(VerdictRow.run_id))).scalars())
    assert sorted(ids) == sorted(expected)


class Boom(Exception):
    pass


@contextmanager
def failing_statement(store: AuditStore, prefix: str) -> Iterator[list[str]]:
    """Make the first statement starting with ``prefix`` fail, as a driver error would."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith(prefix) and not seen:
            seen.append(statement)
            raise Boom(prefix)

    event.listen(store.engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", before)


# ---- a write that fails in any statement leaves the store as it was -----------------------

WRITE_STATEMENTS = [
    "UPDATE monitor_positions",
    "INSERT INTO monitor_pending",
    "UPDATE monitor_pending",
    "DELETE FROM monitor_pending",
    "INSERT INTO verdicts",
    "INSERT INTO violations",
]


@pytest.mark.parametrize("statement", WRITE_STATEMENTS)
async def test_a_failed_write_changes_nothing_and_the_next_pass_judges_once(
    store: AuditStore, statement: str
) -> None:
    t = now_us()
    clock = [t]
    # Pass 0 at t: a run open within its timeout and a run ended but still settling.
    open_rid = new_id()
    ev = healthy_events(open_rid, t - 5_000_000)[:3]
    await write_run(store, ev, receipts(ev), created_us=t - 5_000_000, timeout_s=10)
    settling = new_id()
    ev = healthy_events(settling, t - 500_000)
    await write_run(store, ev, receipts(ev), created_us=t - 500_000)
    chk, registry = make_checker(store, clock=clock)
    await chk.step()
    assert (await state(store))[1] == sorted([(open_rid, False), (settling, False)])
    # Both are pending, but only the first is open: the settling run has ended (as /api/slo
    # and the overview count it).
    assert registry.get_sample_value("runwatch_monitor_open_runs") == 1

    # Pass 1, 30 s later, writes with every statement: the open run is stuck now (verdict,
    # stays pending judged), the settled run is judged (leaves pending), a new faulty run is
    # judged with violations, a new open run becomes pending.
    clock[0] = t + 30_000_000
    faulty = new_id()
    ev = healthy_events(faulty, t - 60_000_000)
    ev = ev[:1] + ev[2:]  # a gap: sequence violation
    await write_run(store, ev, receipts(ev), created_us=t - 60_000_000)
    fresh_open = new_id()
    ev = healthy_events(fresh_open, t + 29_000_000)[:3]
    await write_run(store, ev, receipts(ev), created_us=t + 29_000_000)
    before = await state(store)
    chk, registry = make_checker(store, clock=clock)
    with failing_statement(store, statement) as seen, pytest.raises(Boom):
        await chk.step()
    assert seen, f"the pass never ran {statement}"
    assert await state(store) == before
    assert (
        registry.get_sample_value("runwatch_monitor_runs_checked_total", {"verdict": "fail"}) == 0
    ), "counted before the commit"

    again, registry = make_checker(store, clock=clock)
    result = await again.catch_up()
    assert result.judged == 3
    position, pending, judged, violations = await state(store)
    async with store.engine.connect() as conn:
        newest = (await conn.execute(select(func.max(EventRow.position)))).scalar()
    assert position == [(newest,)]
    assert pending == sorted([(open_rid, True), (fresh_open, False)])
    assert judged == sorted([open_rid, settling, faulty])
    assert set(violations) == {open_rid, faulty}
    found = await verdicts(store)
    assert found[settling] == ("pass", set())
    assert "sequence" in found[faulty][1] and "stuck" in found[open_rid][1]
    assert registry.get_sample_value("runwatch_monitor_stuck_runs") == 1
    assert registry.get_sample_value("runwatch_monitor_open_runs") == 1


# ---- stopped at any point --------------------------------------------------------------------


async def test_cancelled_at_any_point_then_restarted_judges_every_run_once(
    store: AuditStore,
) -> None:
    runs = await write_healthy(store, 40, now_us() - 60_000_000)
    # Small passes with a yield after every row and run: many points to be stopped at.
    config = CheckerConfig(
        rules=RULES, settle_s=1, batch=60, overlap=30, load_chunk=4, max_judge=6, slice_s=0
    )
    # Each pass is stopped after 0.5 ms, then 0.8 ms, 1.3 ms, ... until one completes; then
    # the next pass is swept the same way.
    cancelled = completed = attempt = 0
    for _ in range(400):
        chk, _ = make_checker(store, config)  # a new checker each time: a restart
        task = asyncio.create_task(chk.step())
        await asyncio.wait({task}, timeout=0.0005 * 1.6**attempt)
        if not task.done():
            task.cancel()
        try:
            result = await task
        except asyncio.CancelledError:
            cancelled += 1
            attempt += 1
            continue
        completed += 1
        attempt = 0
        if result.read == 0 and not result.more:
            break
    assert cancelled > 10 and completed > 3
    chk, _ = make_checker(store, config)
    await chk.catch_up()
    await judged_once(store, runs)


# ---- two checkers of one consumer ---------------------------------------------------------


async def test_two_checkers_racing_judge_every_run_once(store: AuditStore) -> None:
    runs = await write_healthy(store, 60, now_us() - 60_000_000)
    config = CheckerConfig(rules=RULES, settle_s=1, batch=50, max_judge=8)
    a, reg_a = make_checker(store, config)
    b, reg_b = make_checker(store, config)
    for _ in range(100):
        ra, rb = await asyncio.gather(a.step(), b.step())
        if not (ra.read or rb.read or ra.more or rb.more):
            break
    await judged_once(store, runs)
    counted = sum(
        r.get_sample_value("runwatch_monitor_runs_checked_total", {"verdict": "pass"}) or 0
        for r in (reg_a, reg_b)
    )
    assert counted == len(runs)


# ---- bounded passes -----------------------------------------------------------------------


async def test_a_pass_judges_at_most_max_judge_runs(store: AuditStore) -> None:
    runs = await write_healthy(store, 25, now_us() - 60_000_000)
    chk, _ = make_checker(store, CheckerConfig(rules=RULES, settle_s=1, max_judge=10))
    first = await chk.step()
    assert first.judged == 10 and first.more
    await chk.catch_up()
    await judged_once(store, runs)


async def test_the_loop_passes_again_at_once_while_behind(store: AuditStore) -> None:
    runs = await write_healthy(store, 25, now_us() - 60_000_000)
    chk, registry = make_checker(store, CheckerConfig(rules=RULES, settle_s=1, max_judge=10))
    chk.start(interval_s=3600)  # only passes that found more work can come soon
    try:

        def judged() -> bool:
            value = registry.get_sample_value(
                "runwatch_monitor_runs_checked_total", {"verdict": "pass"}
            )
            return value == len(runs)

        await wait_until(judged, 10)
    finally:
        await chk.stop()
    await judged_once(store, runs)


async def test_a_long_pass_yields_the_event_loop(store: AuditStore) -> None:
    runs = await write_healthy(store, 50, now_us() - 60_000_000)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        chk, _ = make_checker(store, CheckerConfig(rules=RULES, settle_s=1, slice_s=0))
        result = await chk.step()
    finally:
        task.cancel()
    assert result.judged == len(runs)
    # slice_s=0: the loop gets a turn after each run judged (and each row loaded).
    assert ticks > len(runs)


# ---- no write lock while reading and judging (SQLite) ----------------------------------------


class ProbingChecker(Checker):
    """Checks, right after reading and after judging, that another connection can take
    SQLite's write lock at once."""

    probes: list[str]

    def probe(self, where: str) -> None:
        path = self.store.store.engine.url.database
        assert path is not None
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # fails at once if anyone holds the write lock
            other.execute("ROLLBACK")
        finally:
            other.close()
        self.probes.append(where)

    async def _judge(self, reader: MonitorReader, snapshot: Any, now: int, result: Any) -> Any:
        self.probe("read")
        out = await super()._judge(reader, snapshot, now, result)
        self.probe("judged")
        return out


async def test_no_write_lock_while_reading_and_judging(sqlite_db: str) -> None:
    store = AuditStore.open(sqlite_db)
    try:
        runs = await write_healthy(store, 30, now_us() - 60_000_000)
        chk = ProbingChecker(store, MonitorMetrics(CollectorRegistry()), CONFIG)
        chk.probes = []
        result = await chk.step()
        assert result.judged == 30 and chk.probes == ["read", "judged"]
        await judged_once(store, runs)
    finally:
        await store.close()


# ---- late commits on PostgreSQL -------------------------------------------------------------


async def test_a_lower_position_committed_late_is_still_judged(pg_url: str) -> None:
    store = AuditStore.open(pg_url)
    t0 = now_us() - 60_000_000
    try:
        late = new_id()
        conn: AsyncConnection = await store.engine.connect()
        try:
            await conn.begin()
            ev = healthy_events(late, t0)
            await conn.execute(
                insert(RunRow).values(
                    run_id=late,
                    user_id="alice",
                    thread_id="t-" + late,
                    agent="demo",
                    client_msg_id="m-" + late,
                    instance_id="test",
                    created_us=t0,
                    timeout_s=300,
                    ended_us=ev[-1].ts_us,
                    outcome="completed",
                    last_seq=ev[-1].seq,
                )
            )
            await conn.execute(
                insert(EventRow),
                [
                    {
                        "event_id": e.event_id,
                        "run_id": e.run_id,
                        "seq": e.seq,
                        "type": e.type.value,
                        "thread_id": e.thread_id,
                        "agent": e.agent,
                        "ts_us": e.ts_us,
                        "committed_us": e.ts_us + 1000,
                        "live": False,
                        "data": e.data,
                    }
                    for e in ev
                ],
            )
            # Meanwhile another writer takes higher positions and commits first.
            early = await write_healthy(store, 3, t0)
            chk, _ = make_checker(store)
            await chk.catch_up()
            await judged_once(store, early)
            await conn.commit()
        finally:
            await conn.close()
        await chk.catch_up()
        await judged_once(store, [*early, late])
    finally:
        await store.close()


async def test_an_unwritable_store_is_logged_once_per_change(
    sqlite_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    writable = AuditStore.open(sqlite_db)
    runs = await write_healthy(writable, 3, now_us() - 60_000_000)
    await writable.close()
    # The same database, opened read-only: every pass reads, judges, then cannot write.
    path = sqlite_db.split(":///", 1)[1]
    readonly = AuditStore.open(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")
    chk, registry = make_checker(readonly, CheckerConfig(rules=RULES, settle_s=1))
    caplog.set_level("WARNING", logger="runwatch.monitor")
    chk.start(interval_s=0.02)
    try:
        await asyncio.sleep(0.5)  # about 25 failing passes
    finally:
        await chk.stop()
        await readonly.close()
    failures = [r for r in caplog.records if "checker pass failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert "readonly" in failures[0].getMessage() or "read-only" in failures[0].getMessage()
    assert (
        registry.get_sample_value("runwatch_monitor_runs_checked_total", {"verdict": "pass"}) == 0
    )
    assert runs


async def test_a_judging_backlog_shows_as_lag(store: AuditStore) -> None:
    """Every event read, but more runs due than a pass judges: the lag is how long the
    longest-waiting of those left has been due (it read 0, so RunwatchMonitorLag never fired
    on a checker that reads fast and judges slowly)."""
    await write_healthy(store, 6, now_us() - 60_000_000)
    config = CheckerConfig(rules=RULES, settle_s=1, max_judge=2)
    chk, registry = make_checker(store, config)
    first = await chk.step()
    assert first.judged == 2 and first.more
    lag = registry.get_sample_value("runwatch_monitor_lag_seconds")
    assert lag is not None and 50 < lag < 120, lag
    await chk.catch_up()
    assert registry.get_sample_value("runwatch_monitor_lag_seconds") == 0
