"""The checker on a real store (SQLite and PostgreSQL): a detection corpus of faulty runs,
real runs from the runtime, a restart mid-stream, and ``runwatch check``."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from monitor.checker import Checker, CheckerConfig
from monitor.metrics import MonitorMetrics
from monitor.rules import RuleConfig
from runtime.events import ErrorCode, Event, EventType, Receipt, new_id, now_us
from runtime.lifecycle import RunLifecycle
from runtime.store.audit import AuditStore, Batch, RunInfo
from runtime.store.models import VerdictRow, ViolationRow

from .conftest import make_settings, serve_runtime

RULES = RuleConfig(delivery_slo_s=1.0, run_timeout_s=300, stuck_grace_s=5, ack_wait_s=1)
CONFIG = CheckerConfig(rules=RULES, settle_s=1)


def lifecycle(run_id: str, t0: int) -> RunLifecycle:
    clock = itertools.count(t0, 1000)
    return RunLifecycle(run_id, "t-" + run_id, "demo", lambda: next(clock))


def healthy_events(run_id: str, t0: int) -> list[Event]:
    lc = lifecycle(run_id, t0)
    return [
        lc.started("what is 6*7"),
        lc.thinking("t"),
        lc.tool_executing("c1", "calculator", {"expression": "6*7"}),
        lc.tool_completed("c1", result={"value": 42}),
        lc.final_report("42"),
        lc.completed(),
    ]


def receipts(events: list[Event], user: str = "alice", ack_after_us: int = 5000) -> list[Receipt]:
    return [
        Receipt(
            e.event_id,
            e.run_id,
            e.seq,
            "conn-" + user,
            user,
            e.ts_us + 2000,
            e.ts_us + ack_after_us,
        )
        for e in events
    ]


Fault = Callable[[str, int], tuple[list[Event], list[Receipt]]]


def _missing_start(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = [dataclasses.replace(e, seq=e.seq - 1) for e in healthy_events(rid, t0)[1:]]
    return ev, receipts(ev)


def _gap(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    ev = ev[:1] + ev[2:]
    return ev, receipts(ev)


def _duplicate(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    ev.insert(2, dataclasses.replace(ev[1], event_id=new_id()))
    return ev, receipts(ev)


def _reorder(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    ev[2], ev[3] = ev[3], ev[2]
    return ev, receipts(ev)


def _two_terminals(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    lc = lifecycle(rid, ev[-1].ts_us + 1000)
    err = dataclasses.replace(
        lc.started("x"),
        type=EventType.AGENT_ERROR,
        seq=7,
        data={"code": "internal", "message": "x", "retryable": True},
    )
    ev.append(err)
    return ev, receipts(ev)


def _no_thinking(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    h = healthy_events(rid, t0)
    ev = [h[0], *[dataclasses.replace(e, seq=e.seq - 1) for e in h[2:]]]
    return ev, receipts(ev)


def _no_final(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    h = healthy_events(rid, t0)
    ev = [*h[:4], dataclasses.replace(h[5], seq=5)]
    return ev, receipts(ev)


def _unpaired_tool(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    lc = lifecycle(rid, t0)
    ev = [
        lc.started("x"),
        lc.thinking("t"),
        lc.tool_executing("c1", "wait", {}),
        lc.final_report("r"),
    ]
    lc.open_tools.clear()
    ev.append(lc.completed())
    return ev, receipts(ev)


def _orphan_completion(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    h = healthy_events(rid, t0)
    ev = [
        h[0],
        h[1],
        dataclasses.replace(h[3], seq=3),
        *[dataclasses.replace(e, seq=e.seq - 1) for e in h[4:]],
    ]
    return ev, receipts(ev)


def _ghost_delivery(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    ghost = Receipt(new_id(), rid, 9, "conn-alice", "alice", t0 + 9000, t0 + 9500)
    return ev, [*receipts(ev), ghost]


def _sent_before_commit(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    rs = receipts(ev)
    rs[1] = dataclasses.replace(rs[1], sent_us=ev[1].ts_us - 500_000)
    return ev, rs


def _leak(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    return ev, [*receipts(ev), *receipts(ev[2:3], user="mallory")]


def _late_ack(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    return ev, receipts(ev, ack_after_us=3_000_000)


def _never_acked(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)
    return ev, [dataclasses.replace(r, acked_us=None) for r in receipts(ev)]


def _stuck(rid: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    ev = healthy_events(rid, t0)[:3]
    return ev, receipts(ev)


CORPUS: dict[str, tuple[Fault, str]] = {
    "missing_start": (_missing_start, "started"),
    "gap": (_gap, "sequence"),
    "duplicate_seq": (_duplicate, "sequence"),
    "reorder": (_reorder, "sequence"),
    "two_terminals": (_two_terminals, "terminal"),
    "no_thinking": (_no_thinking, "thinking"),
    "no_final_report": (_no_final, "final_report"),
    "unpaired_tool": (_unpaired_tool, "tool_pairing"),
    "orphan_completion": (_orphan_completion, "tool_pairing"),
    "ghost_delivery": (_ghost_delivery, "persisted"),
    "sent_before_commit": (_sent_before_commit, "persisted"),
    "leak": (_leak, "isolation"),
    "late_ack": (_late_ack, "delivery_slo"),
    "never_acked": (_never_acked, "delivery_slo"),
    "stuck": (_stuck, "stuck"),
}


async def write_run(
    store: AuditStore,
    events: list[Event],
    rs: list[Receipt],
    *,
    created_us: int,
    timeout_s: float = 300,
) -> str:
    rid = events[0].run_id if events else new_id()
    info = RunInfo(rid, "alice", "t-" + rid, "demo", "m-" + rid, "test", created_us, timeout_s)
    await store.create_run(info, new_thread=True)
    await store.write(
        Batch(events=[(e, True) for e in events], receipts=rs), min(e.ts_us for e in events) + 1000
    )
    return rid


async def write_corpus(store: AuditStore) -> dict[str, str]:
    t0 = now_us() - 120_000_000
    out = {}
    for name, (fault, _rule) in CORPUS.items():
        rid = new_id()
        events, rs = fault(rid, t0)
        timeout = 10 if name == "stuck" else 300
        out[name] = await write_run(store, events, rs, created_us=t0, timeout_s=timeout)
    healthy = new_id()
    ev = healthy_events(healthy, t0)
    out["healthy"] = await write_run(store, ev, receipts(ev), created_us=t0)
    return out


def checker(store: AuditStore) -> tuple[Checker, CollectorRegistry]:
    registry = CollectorRegistry()
    return Checker(store, MonitorMetrics(registry), CONFIG), registry


async def verdicts(store: AuditStore) -> dict[str, tuple[str, set[str]]]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(VerdictRow))).all()
        vio = (await conn.execute(select(ViolationRow.run_id, ViolationRow.rule))).all()
    rules: dict[str, set[str]] = {}
    for run_id, rule in vio:
        rules.setdefault(run_id, set()).add(rule)
    return {r.run_id: (r.verdict, rules.get(r.run_id, set())) for r in rows}


async def test_detection_corpus(store: AuditStore) -> None:
    runs = await write_corpus(store)
    chk, registry = checker(store)
    await chk.catch_up()
    found = await verdicts(store)
    for name, (_fault, rule) in CORPUS.items():
        verdict, rules = found[runs[name]]
        assert verdict == "fail", name
        assert rule in rules, (name, rules)
    assert found[runs["healthy"]] == ("pass", set())
    assert registry.get_sample_value(
        "runwatch_monitor_runs_checked_total", {"verdict": "fail"}
    ) == len(CORPUS)
    assert (
        registry.get_sample_value("runwatch_monitor_violations_total", {"rule": "isolation"}) == 1
    )
    assert registry.get_sample_value("runwatch_monitor_stuck_runs") == 1
    assert registry.get_sample_value("runwatch_monitor_lag_seconds") == 0


async def test_runwatch_check_finds_the_corpus(db_url: str, tmp_path: Path) -> None:
    store = AuditStore.open(db_url)
    try:
        runs = await write_corpus(store)
    finally:
        await store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env.update(RUNWATCH_DATABASE_URL=db_url, RUNWATCH_STUCK_GRACE_S="5")
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "check", "--since", "1h"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr
    for name, (_fault, rule) in CORPUS.items():
        line = next(line for line in out.stdout.splitlines() if runs[name] in line)
        assert line.startswith("FAIL"), (name, line)
        assert f"      {rule}:" in out.stdout
    healthy = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "check", "--run", runs["healthy"], "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert '"verdict": "pass"' in healthy.stdout


async def test_real_runs_give_zero_violations(db_url: str) -> None:
    async with serve_runtime(make_settings(db_url, run_timeout_s=2)) as live:
        client = await live.client("alice")
        runs = [
            await client.chat(t)
            for t in ("what is 2*3", "fail tool", "crash", "hello", "wait 5", "search resume")
        ]
        waiting = await client.chat("wait 20")
        await __import__("asyncio").sleep(0.5)
        await client.cancel(waiting.run_id)
        for run in [*runs, waiting]:
            await run.wait(15)
        await live.rt.writer.flush(10)
        store = live.rt.store
        chk = Checker(
            store,
            MonitorMetrics(CollectorRegistry()),
            CONFIG,
            clock_us=lambda: now_us() + 30_000_000,
        )
        await chk.catch_up()
        found = await verdicts(store)
        outcomes = {r.run_id: (await store.get_run(r.run_id)).outcome for r in [*runs, waiting]}  # type: ignore[union-attr]
    assert set(outcomes.values()) >= {"completed", "error", "timeout", "cancelled"}
    assert len(found) == 7
    assert all(v == ("pass", set()) for v in found.values()), found


async def test_restart_judges_every_run_exactly_once(db_url: str) -> None:
    store = AuditStore.open(db_url)
    t0 = now_us() - 60_000_000
    try:
        first = []
        for _ in range(30):
            rid = new_id()
            ev = healthy_events(rid, t0)
            first.append(await write_run(store, ev, receipts(ev), created_us=t0))
        chk, _ = checker(store)
        small = CheckerConfig(rules=RULES, settle_s=1, batch=50, overlap=20)
        chk = Checker(store, MonitorMetrics(CollectorRegistry()), small)
        await chk.step()  # stopped mid-stream: only part of the events read
        partial = await verdicts(store)
        assert 0 < len(partial) < 30
        more = []
        for _ in range(20):
            rid = new_id()
            ev = healthy_events(rid, t0)
            more.append(await write_run(store, ev, receipts(ev), created_us=t0))
        again = Checker(store, MonitorMetrics(CollectorRegistry()), small)
        await again.catch_up()
        await again.catch_up()
        async with store.engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(VerdictRow))).scalar()
            per_run = (await conn.execute(select(VerdictRow.run_id))).scalars().all()
        assert total == 50 and set(per_run) == set(first + more)
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["crash"])
async def test_stuck_gauge_clears_when_the_run_ends(store: AuditStore, kind: str) -> None:
    t0 = now_us() - 120_000_000
    rid = new_id()
    ev = healthy_events(rid, t0)[:3]
    await write_run(store, ev, receipts(ev), created_us=t0, timeout_s=10)
    chk, registry = checker(store)
    await chk.catch_up()
    assert registry.get_sample_value("runwatch_monitor_stuck_runs") == 1
    lc = RunLifecycle.restore(rid, "t-" + rid, "demo", ev, now_us)
    tail = lc.fail(ErrorCode.RUNTIME_RESTARTED, "restarted")
    await store.write(Batch(events=[(e, False) for e in tail]), now_us())
    await chk.catch_up()
    assert registry.get_sample_value("runwatch_monitor_stuck_runs") == 0
    assert (await verdicts(store))[rid][1] >= {"stuck"}


async def test_a_frame_sent_by_another_replica_is_judged_with_clock_skew(
    store: AuditStore,
) -> None:
    """``persisted`` compares a commit time with a send time. When another replica sent the
    frame (a tab on replica b of a run committed by this one), the two come from two hosts'
    clocks: a few ms of difference is skew, not a frame sent before its commit. When the
    committing replica sent it, the same few ms are a violation."""
    from runtime.store.audit import ConnectionOpen

    t0 = now_us() - 60_000_000
    runs = {}
    for name, instance in (("local", "test"), ("remote", "b"), ("far", "b")):
        rid = new_id()
        events = healthy_events(rid, t0)
        commit = min(e.ts_us for e in events) + 1000
        conn_id = f"conn-{name}"
        early = 5_000 if name != "far" else 2_000_000  # sent before the commit, by its clock
        rs = [
            dataclasses.replace(r, connection_id=conn_id, sent_us=commit - early)
            if r.seq == 2
            else dataclasses.replace(r, connection_id=conn_id)
            for r in receipts(events)
        ]
        await store.write(
            Batch(opened=[ConnectionOpen(conn_id, "alice", instance, None, t0)]), commit
        )
        runs[name] = await write_run(store, events, rs, created_us=t0)
    chk, _ = checker(store)
    await chk.catch_up()
    found = await verdicts(store)
    assert found[runs["local"]] == ("fail", {"persisted"})
    assert found[runs["remote"]] == ("pass", set()), "5 ms across hosts is within the skew"
    assert found[runs["far"]] == ("fail", {"persisted"}), "2 s is not clock skew"
