"""One storage contract, run against real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from runtime.events import ErrorCode, Event, EventType, Receipt, new_id, now_us
from runtime.lifecycle import RunLifecycle
from runtime.metrics import RuntimeMetrics
from runtime.pipeline import Emitted
from runtime.store.audit import (
    AckUpdate,
    AuditStore,
    Batch,
    ConnectionClose,
    ConnectionOpen,
    RunInfo,
    StoreUnavailable,
)
from runtime.store.monitoring import (
    MonitorStore,
    PassWrite,
    RunClock,
    RunFilter,
    SliCount,
    Tracking,
    VerdictRecord,
    ViolationRecord,
)
from runtime.store.writer import AuditWriter, DeliveryLog


def run_info(user: str = "alice", msg: str | None = None, thread: str | None = None) -> RunInfo:
    return RunInfo(
        run_id=new_id(),
        user_id=user,
        thread_id=thread or new_id(),
        agent="demo",
        client_msg_id=msg or new_id(),
        instance_id="test",
        created_us=now_us(),
    )


def completed_run(info: RunInfo) -> list[Event]:
    clock = itertools.count(now_us(), 100)
    lc = RunLifecycle(info.run_id, info.thread_id, info.agent, lambda: next(clock))
    return [
        lc.started("hi"),
        lc.thinking("t"),
        lc.tool_executing("c1", "clock", {}),
        lc.tool_completed("c1", result={"utc": "x"}),
        lc.final_report("done"),
        lc.completed(),
    ]


async def test_create_run_is_idempotent_per_user_and_message(store: AuditStore) -> None:
    first, dup = await store.create_run(run_info(msg="m1"), new_thread=True)
    assert dup is False
    again, dup = await store.create_run(run_info(msg="m1"), new_thread=True)
    assert dup is True and again.run_id == first.run_id
    other, dup = await store.create_run(run_info(user="bob", msg="m1"), new_thread=True)
    assert dup is False and other.run_id != first.run_id
    assert await store.thread_owner(first.thread_id) == "alice"
    assert await store.thread_owner("nope") is None


async def test_events_round_trip_exactly_and_in_order(store: AuditStore) -> None:
    info, _ = await store.create_run(run_info(), new_thread=True)
    events = completed_run(info)
    await store.write(Batch(events=[(e, i % 2 == 0) for i, e in enumerate(events)]), now_us())
    assert await store.run_events(info.run_id) == events
    assert await store.run_events(info.run_id, after_seq=4) == events[4:]
    stored = await store.stored_events(info.run_id)
    assert [s.live for s in stored] == [True, False, True, False, True, False]
    assert [s.position for s in stored] == sorted(s.position for s in stored)
    ended = await store.get_run(info.run_id)
    assert ended is not None
    assert ended.outcome == "completed" and ended.last_seq == 6 and ended.ended_us is not None


async def test_writing_an_event_twice_stores_it_once(store: AuditStore) -> None:
    info, _ = await store.create_run(run_info(), new_thread=True)
    events = completed_run(info)
    await store.write(Batch(events=[(e, True) for e in events[:3]]), now_us())
    await store.write(Batch(events=[(e, True) for e in events]), now_us())
    assert await store.run_events(info.run_id) == events


async def test_receipts_acks_and_active_runs(store: AuditStore) -> None:
    done, _ = await store.create_run(run_info(), new_thread=True)
    running, _ = await store.create_run(run_info(), new_thread=True)
    events = completed_run(done)
    first_two = completed_run(running)[:2]
    t = now_us()
    receipts = [Receipt(e.event_id, e.run_id, e.seq, "conn1", "alice", t + e.seq) for e in events]
    await store.write(
        Batch(
            events=[(e, True) for e in events + first_two],
            receipts=receipts,
            opened=[ConnectionOpen("conn1", "alice", "test", "pytest", t)],
        ),
        t,
    )
    active = await store.active_runs("alice")
    assert {"run_id": running.run_id, "last_seq": 2} in active
    assert {"run_id": done.run_id, "last_seq": 6} in active
    await store.write(
        Batch(
            acks=[AckUpdate("conn1", done.run_id, 4, t + 50)],
            closed=[ConnectionClose("conn1", t + 60, 1000)],
        ),
        t,
    )
    acked = {r.seq: r.acked_us for r in await store.receipts(done.run_id)}
    assert acked == {1: t + 50, 2: t + 50, 3: t + 50, 4: t + 50, 5: None, 6: None}
    await store.write(
        Batch(acks=[AckUpdate("conn1", done.run_id, 6, t + 70)], settles=[(done.run_id, t)]), t
    )
    acked = {r.seq: r.acked_us for r in await store.receipts(done.run_id)}
    assert acked[4] == t + 50 and acked[6] == t + 70, "the first ack time is kept"
    assert [r["run_id"] for r in await store.active_runs("alice")] == [running.run_id]
    assert await store.active_runs("bob") == []


async def test_active_runs_newest_first_and_bounded(store: AuditStore) -> None:
    ids = []
    for _ in range(5):
        info, _ = await store.create_run(run_info(), new_thread=True)
        ids.append(info.run_id)
        await asyncio.sleep(0.002)
    listed = await store.active_runs("alice", limit=3)
    assert [r["run_id"] for r in listed] == ids[::-1][:3]
    assert all(r["last_seq"] == 0 for r in listed)


async def test_open_runs(store: AuditStore) -> None:
    a, _ = await store.create_run(run_info(), new_thread=True)
    b, _ = await store.create_run(run_info(), new_thread=True)
    await store.write(Batch(events=[(e, True) for e in completed_run(a)]), now_us())
    await store.write(Batch(events=[(completed_run(b)[0], True)]), now_us())
    assert [r.run_id for r in await store.open_runs()] == [b.run_id]
    assert [r.run_id for r in await store.open_runs("other-instance")] == []


async def test_purge_deletes_old_ended_runs_only(store: AuditStore) -> None:
    old, _ = await store.create_run(run_info(), new_thread=True)
    still_open, _ = await store.create_run(run_info(), new_thread=True)
    await store.write(Batch(events=[(e, True) for e in completed_run(old)]), now_us())
    counts = await store.purge(now_us() + 1_000_000)
    assert counts["runs"] == 1 and counts["events"] == 6
    assert await store.get_run(old.run_id) is None
    assert await store.get_run(still_open.run_id) is not None


class _Collect:
    """A committed sink that records what it was handed, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list[Emitted]] = []

    def committed(self, items: Sequence[Emitted]) -> None:
        self.batches.append(list(items))


async def test_group_commit_shares_commits_and_preserves_order(store: AuditStore) -> None:
    metrics = RuntimeMetrics(CollectorRegistry())
    sink = _Collect()
    writer = AuditWriter(store, metrics, sink, DeliveryLog())
    writer.start()
    infos = [(await store.create_run(run_info(), new_thread=True))[0] for _ in range(20)]
    runs = [completed_run(i) for i in infos]

    async def emit(events: list[Event]) -> None:
        for e in events:
            writer.submit(Emitted.of(e, "alice", True))
            await asyncio.sleep(0)

    await asyncio.gather(*(emit(r) for r in runs))
    await writer.close()
    for info, events in zip(infos, runs, strict=True):
        assert await store.run_events(info.run_id) == events
        # I6 and per-run order: the sink got every event once, committed, in seq order.
        handed = [i.event for batch in sink.batches for i in batch if i.event.run_id == info.run_id]
        assert handed == events
    assert all(i.committed_us > 0 for batch in sink.batches for i in batch)
    assert len(sink.batches) < 60, "concurrent runs share commits"
    batches = metrics.registry.get_sample_value("runwatch_audit_batch_size_count")
    assert batches is not None and batches < 60
    persisted = metrics.registry.get_sample_value("runwatch_event_persist_seconds_count")
    assert persisted == 120


async def test_unreachable_database_is_translated() -> None:
    store = AuditStore.open("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    with pytest.raises(StoreUnavailable) as err:
        await store.ping()
    assert err.value.reason == "unavailable"
    await store.close()


async def test_event_types_are_stored_as_their_names(store: AuditStore) -> None:
    info, _ = await store.create_run(run_info(), new_thread=True)
    events = completed_run(info)
    await store.write(Batch(events=[(e, True) for e in events]), now_us())
    kinds = [s.event.type for s in await store.stored_events(info.run_id)]
    assert kinds[0] is EventType.AGENT_STARTED and kinds[-1] is EventType.AGENT_COMPLETED


async def test_delivery_sli_waits_for_the_ack_window(store: AuditStore) -> None:
    """An unacked live event is in flight, not bad, until its ack window has passed (as the
    ``delivery_slo`` rule judges it); deferred events are outside the SLI."""
    t = now_us()
    info, _ = await store.create_run(run_info(), new_thread=True)
    clock = iter([t - 20_000_000, t - 20_000_000, t - 20_000_000, t - 3_000_000, t - 500_000])
    lc = RunLifecycle(info.run_id, info.thread_id, info.agent, lambda: next(clock))
    on_time, late, never, waiting, fresh = (
        lc.started("hi"),
        lc.thinking("a"),
        lc.thinking("b"),
        lc.thinking("c"),
        lc.thinking("d"),
    )
    deferred = Event(
        EventType.AGENT_THINKING, new_id(), info.run_id, info.thread_id, 6, t - 20_000_000, "demo"
    )
    acked = {on_time.event_id: on_time.ts_us + 500_000, late.event_id: late.ts_us + 2_000_000}
    receipts = [
        Receipt(
            e.event_id, e.run_id, e.seq, "conn1", "alice", e.ts_us + 1000, acked.get(e.event_id)
        )
        for e in (on_time, late, never, waiting, fresh)
    ]
    # An ack by another user's connection is no delivery to the owner.
    receipts.append(
        Receipt(never.event_id, info.run_id, never.seq, "conn2", "bob", t - 19_000_000, t - 1)
    )
    live = [(e, True) for e in (on_time, late, never, waiting, fresh)]
    await store.write(Batch(events=[*live, (deferred, False)], receipts=receipts), t - 100)
    async with MonitorStore(store).reading() as reader:
        counts = await reader.slo_counts(
            now_us=t, window_s=3600, delivery_slo_s=1.0, ack_wait_s=10.0, persist_slo_s=0.25
        )
    # Counted: on time (good), late (bad), never acked past the window (bad). Not yet: the
    # two still in flight, though one is already older than the SLO threshold.
    assert counts.delivery == SliCount(good=1, total=3)
    assert counts.persistence.total == 6


async def test_the_migrations_build_the_schema_the_models_declare(store: AuditStore) -> None:
    """One schema, owned by the store: the Alembic history and ``runtime/store/models.py``
    (the runtime's tables and the monitor's) agree, table by table and index by index."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from runtime.store.models import Base

    def differences(conn: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))

    async with store.engine.connect() as conn:
        assert await conn.run_sync(differences) == []


# ---- the monitor's read model (runtime/store/monitoring.py) ---------------------------------


async def write_ended(
    store: AuditStore, *, user: str = "alice", agent: str = "demo", error: ErrorCode | None = None
) -> tuple[RunInfo, list[Event]]:
    """A run that ended (completed, or with ``error``), every event live, each with a receipt
    acked by the owner 2 ms after it was sent."""
    info = dataclasses.replace(run_info(user=user), agent=agent)
    info, _ = await store.create_run(info, new_thread=True)
    if error is None:
        events = completed_run(info)
    else:
        clock = itertools.count(now_us(), 100)
        lc = RunLifecycle(info.run_id, info.thread_id, info.agent, lambda: next(clock))
        events = [lc.started("hi"), lc.thinking("t"), lc.error(error, "failed")]
    receipts = [
        Receipt(e.event_id, e.run_id, e.seq, "c-" + user, user, e.ts_us + 10, e.ts_us + 2010)
        for e in events
    ]
    await store.write(Batch(events=[(e, True) for e in events], receipts=receipts), now_us())
    return info, events


def verdict_of(
    info: RunInfo, verdict: str, rules: tuple[str, ...], judged_us: int
) -> VerdictRecord:
    return VerdictRecord(
        run_id=info.run_id,
        user_id=info.user_id,
        agent=info.agent,
        thread_id=info.thread_id,
        state="ended",
        verdict=verdict,
        outcome="completed",
        rules=rules,
        violation_count=len(rules),
        event_count=6,
        created_us=info.created_us,
        ended_us=info.created_us + 1000,
        judged_us=judged_us,
    )


async def test_following_the_store_by_position(store: AuditStore) -> None:
    a, _ = await store.create_run(run_info(), new_thread=True)
    b, _ = await store.create_run(run_info(), new_thread=True)
    committed = now_us()
    await store.write(Batch(events=[(e, True) for e in completed_run(a)]), committed)
    await store.write(Batch(events=[(completed_run(b)[0], True)]), committed + 1)
    async with MonitorStore(store).reading() as reader:
        page1 = await reader.events_after(0, 4)
        page2 = await reader.events_after(page1[-1].position, 100)
        assert await reader.events_after(page2[-1].position, 100) == []
    assert len(page1) == 4 and len(page2) == 3
    positions = [e.position for e in page1 + page2]
    assert positions == sorted(set(positions))
    assert [e.run_id for e in page1 + page2] == [a.run_id] * 6 + [b.run_id]
    assert [e.committed_us for e in page2] == [committed, committed, committed + 1]


async def test_a_checker_pass_is_written_once_and_never_over_a_moved_position(
    store: AuditStore,
) -> None:
    monitor = MonitorStore(store)
    done, events = await write_ended(store)
    waiting, _ = await store.create_run(run_info(), new_thread=True)
    await store.write(Batch(events=[(completed_run(waiting)[0], True)]), now_us())
    t = now_us()
    async with monitor.reading() as reader:
        assert await reader.tracking("checker") is None
        newest = (await reader.events_after(0, 100))[-1].position
        clocks = await reader.run_clocks([done.run_id, waiting.run_id, "no-such-run"])
    assert clocks[done.run_id] == RunClock(done.created_us, events[-1].ts_us, 300.0)
    assert clocks[waiting.run_id] == RunClock(waiting.created_us, None, 300.0)
    assert "no-such-run" not in clocks
    violation = ViolationRecord(done.run_id, "delivery_slo", "late", (2, 3), ("e2", "e3"), t)
    first = PassWrite(
        consumer="checker",
        read=None,
        position=newest,
        now_us=t,
        new_pending=[(waiting.run_id, False), ("events-only", False)],
        verdicts=[verdict_of(done, "fail", ("delivery_slo",), t)],
        violations=[violation],
    )
    assert await monitor.commit_pass(first)
    assert not await monitor.commit_pass(first), "a second first pass of the consumer"
    async with monitor.reading() as reader:
        saved = await reader.tracking("checker")
        assert saved == Tracking(newest, t)
        assert await reader.judged([done.run_id, waiting.run_id]) == {done.run_id}
        pending = {p.run_id: p for p in await reader.pending_runs()}
        assert pending.keys() == {waiting.run_id, "events-only"}
        assert pending["events-only"].clock is None and not pending["events-only"].judged
        assert pending[waiting.run_id].clock == clocks[waiting.run_id]
    # Neither judged nor pending: found in a window of positions already passed.
    late, _ = await write_ended(store)
    async with monitor.reading() as reader:
        assert await reader.unfollowed_runs(0, newest + 100) == {late.run_id}
        assert await reader.unfollowed_runs(0, newest) == set()
    stale = PassWrite(consumer="checker", read=Tracking(newest, t - 1), position=newest, now_us=t)
    assert not await monitor.commit_pass(stale)
    second = PassWrite(
        consumer="checker",
        read=saved,
        position=newest + 1,
        now_us=t,  # the clock did not move: updated_us still does
        mark_judged=[waiting.run_id],
        drop=["events-only"],
    )
    assert await monitor.commit_pass(second)
    async with monitor.reading() as reader:
        moved = await reader.tracking("checker")
        assert moved == Tracking(newest + 1, t + 1)
        assert [(p.run_id, p.judged) for p in await reader.pending_runs()] == [
            (waiting.run_id, True)
        ]
        detail = await reader.run_detail(done.run_id)
    assert detail is not None and detail.violations == (
        dataclasses.replace(violation, id=detail.violations[0].id, user_id="alice", agent="demo"),
    )


async def test_loading_runs_whole(store: AuditStore) -> None:
    info, events = await write_ended(store)
    other, _ = await write_ended(store, user="bob")
    # A second delivery of seq 2, to another tab, not acked.
    extra = Receipt(events[1].event_id, info.run_id, 2, "c-alice-2", "alice", now_us(), None, True)
    await store.write(Batch(receipts=[extra]), now_us())
    async with MonitorStore(store).reading() as reader:
        loaded = await reader.load_runs([info.run_id, "no-such-run", other.run_id])
        assert await reader.run_ids(run_id=info.run_id) == [info.run_id]
        assert await reader.run_ids(run_id="no-such-run") == []
        assert await reader.run_ids(since_us=info.created_us) == [info.run_id, other.run_id]
        assert await reader.run_ids(since_us=other.created_us + 1) == []
    assert loaded.keys() == {info.run_id, other.run_id}
    run = loaded[info.run_id]
    assert run.run.user_id == "alice" and run.run.outcome == "completed"
    assert run.run.ended_us == events[-1].ts_us and run.run.timeout_s == 300.0
    assert run.events == tuple(events)
    assert run.live == {e.event_id for e in events}
    assert run.committed_us.keys() == {e.event_id for e in events}
    assert [(r.seq, r.connection_id) for r in run.receipts] == [
        *[(e.seq, "c-alice") for e in events],
        (2, "c-alice-2"),
    ]
    assert run.receipts[-1] == extra


async def test_verdicts_listed_filtered_and_paged(store: AuditStore) -> None:
    monitor = MonitorStore(store)
    t = now_us()
    runs = [await write_ended(store, user=u, agent=a) for u, a in [("alice", "demo")] * 3]
    runs += [await write_ended(store, user="bob", agent="llm")]
    infos = [info for info, _ in runs]
    verdicts = [
        verdict_of(infos[0], "pass", (), t),
        verdict_of(infos[1], "fail", ("sequence", "stuck"), t),
        verdict_of(infos[2], "pass", (), t),
        verdict_of(infos[3], "fail", ("isolation",), t),
    ]
    violations = [
        ViolationRecord(infos[1].run_id, "sequence", "gap", (3,), (), t),
        ViolationRecord(infos[1].run_id, "stuck", "open", (), (), t),
        ViolationRecord(infos[3].run_id, "isolation", "bob's", (1,), (), t),
    ]
    await monitor.commit_pass(
        PassWrite("checker", None, 1, t, verdicts=verdicts, violations=violations)
    )
    async with monitor.reading() as reader:

        async def ids(f: RunFilter, limit: int = 10) -> list[str]:
            out: list[str] = []
            cursor = None
            while True:
                page = await reader.list_runs(f, limit=limit, cursor=cursor)
                out += [v.run_id for v in page.verdicts]
                if page.next_cursor is None:
                    return out
                cursor = page.next_cursor

        # Failures first, then newest first; the same order page by page.
        everything = [infos[3].run_id, infos[1].run_id, infos[2].run_id, infos[0].run_id]
        assert await ids(RunFilter()) == everything
        assert await ids(RunFilter(), limit=1) == everything
        assert await ids(RunFilter(verdict="pass")) == [infos[2].run_id, infos[0].run_id]
        assert await ids(RunFilter(rule="stuck")) == [infos[1].run_id]
        assert await ids(RunFilter(agent="llm")) == await ids(RunFilter(user="bob"))
        assert await ids(RunFilter(thread=infos[0].thread_id)) == [infos[0].run_id]
        assert await ids(RunFilter(state="stuck")) == []
        window = RunFilter(since_us=infos[1].created_us, until_us=infos[3].created_us)
        assert await ids(window) == [infos[1].run_id, infos[2].run_id]
        page = await reader.list_runs(RunFilter(), limit=10, cursor=None)
        assert page.verdicts[1] == verdicts[1]
        assert page.inputs == dict.fromkeys((i.run_id for i in infos), "hi")

        listed, before = await reader.list_violations(
            rule=None, since_us=None, limit=2, before_id=None
        )
        assert [(v.rule, v.user_id, v.agent) for v in listed] == [
            ("isolation", "bob", "llm"),
            ("stuck", "alice", "demo"),
        ]
        rest, end = await reader.list_violations(
            rule=None, since_us=None, limit=2, before_id=before
        )
        assert [v.rule for v in rest] == ["sequence"] and end is None
        assert [
            v.rule
            for v in (
                await reader.list_violations(rule="stuck", since_us=None, limit=9, before_id=None)
            )[0]
        ] == ["stuck"]
        assert await reader.violation_counts(since_us=t) == {
            "sequence": 1,
            "stuck": 1,
            "isolation": 1,
        }
        assert await reader.violation_counts(since_us=t + 1) == {}
        counts = await reader.slo_counts(
            now_us=t, window_s=60, delivery_slo_s=1.0, ack_wait_s=10.0, persist_slo_s=0.25
        )
        assert counts.completeness == SliCount(good=2, total=4)
        assert counts.delivery == SliCount(good=24, total=24), "acked 2 ms after: on time"
        assert (counts.open_runs, counts.stuck_runs) == (0, 0)
        assert await reader.run_detail("no-such-run") is None


async def test_open_and_stuck_runs_and_outcomes_by_agent(store: AuditStore) -> None:
    monitor = MonitorStore(store)
    await write_ended(store, agent="demo")
    await write_ended(store, agent="flaky", error=ErrorCode.RUNTIME_RESTARTED)
    await write_ended(store, agent="flaky", error=ErrorCode.INTERNAL)
    await write_ended(store, agent="flaky")
    since = now_us() - 60_000_000
    stuck, _ = await store.create_run(run_info(), new_thread=True)
    await store.create_run(run_info(), new_thread=True)  # open, within its timeout
    t = now_us()
    await monitor.commit_pass(PassWrite("checker", None, 0, t, new_pending=[(stuck.run_id, True)]))
    async with monitor.reading() as reader:
        by_agent = await reader.outcomes_by_agent(since_us=since)
        assert await reader.outcomes_by_agent(since_us=t + 60_000_000) == {}
        counts = await reader.slo_counts(
            now_us=t, window_s=3600, delivery_slo_s=1.0, ack_wait_s=10.0, persist_slo_s=0.25
        )
    zero = dict.fromkeys(("completed", "error", "cancelled", "timeout", "runtime_restarted"), 0)
    assert by_agent == {
        "demo": {**zero, "completed": 1},
        "flaky": {**zero, "completed": 1, "error": 1, "runtime_restarted": 1},
    }
    assert (counts.open_runs, counts.stuck_runs) == (1, 1)
