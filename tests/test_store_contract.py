"""One storage contract, run against real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from runtime.events import Event, EventType, Receipt, new_id
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
from runtime.store.writer import AuditWriter, DeliveryLog


def now_us() -> int:
    return time.time_ns() // 1000


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


async def test_open_runs_and_events_after_position(store: AuditStore) -> None:
    a, _ = await store.create_run(run_info(), new_thread=True)
    b, _ = await store.create_run(run_info(), new_thread=True)
    await store.write(Batch(events=[(e, True) for e in completed_run(a)]), now_us())
    await store.write(Batch(events=[(completed_run(b)[0], True)]), now_us())
    assert [r.run_id for r in await store.open_runs()] == [b.run_id]
    assert [r.run_id for r in await store.open_runs("other-instance")] == []
    page1 = await store.events_after(0, limit=4)
    page2 = await store.events_after(page1[-1].position, limit=100)
    assert len(page1) == 4 and len(page2) == 3
    assert page1[-1].position < page2[0].position


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
    from monitor.queries import slo_figures

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
    async with store.engine.connect() as conn:
        figures = await slo_figures(
            conn, now_us=t, window_s=3600, delivery_slo_s=1.0, ack_wait_s=10.0
        )
    # Counted: on time (good), late (bad), never acked past the window (bad). Not yet: the
    # two still in flight, though one is already older than the SLO threshold.
    assert (figures["delivery"]["good"], figures["delivery"]["total"]) == (1, 3)
    assert figures["persistence"]["total"] == 6
