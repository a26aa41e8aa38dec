"""Delivery semantics: resume, second tabs, isolation, acks and their metrics."""

from __future__ import annotations

import asyncio
import json

import pytest

from runtime.client import RunwatchError
from runtime.events import Event, EventType
from runtime.protocol import Connect, Resume

from .conftest import LiveServer, open_ws, wait_until
from .invariants import assert_valid


async def test_resume_after_a_dropped_socket_gets_every_missed_event_once(
    live: LiveServer,
) -> None:
    client = await live.client("alice")
    run = await client.chat("wait 3")
    await wait_until(lambda: any(e.type == EventType.TOOL_EXECUTING for e in run.events), 5)
    before = len(run.events)
    await client.drop()
    events = await run.wait(20)
    assert client.reconnects >= 1
    assert_valid(events)
    assert len(events) > before
    # Every thinking step once: the resume sent nothing twice that the client kept.
    steps = [e.data["step"] for e in events if e.type == EventType.AGENT_THINKING]
    assert steps == sorted(set(steps))
    assert live.metric("runwatch_resumes_total", {"result": "ok"}) >= 1


async def test_raw_resume_sends_each_later_seq_exactly_once_then_resumed(
    live: LiveServer,
) -> None:
    alice = await live.client("alice")
    run = await alice.chat("wait 2")
    await wait_until(lambda: len(run.events) >= 3, 5)
    token = live.token("alice")
    async with await open_ws(live.ws_url) as ws:
        await ws.send(Connect(token).serialize())
        connected = json.loads(await ws.recv())
        assert run.run_id in {r["run_id"] for r in connected["active_runs"]}
        await ws.send(Resume(run.run_id, after_seq=1).serialize())
        frames = []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            frames.append(frame)
            if frame.get("type") in ("agent_completed", "agent_error"):
                break
    kinds = [f["type"] for f in frames]
    resumed_at = kinds.index("resumed")
    replay = frames[:resumed_at]
    assert frames[resumed_at]["replayed"] == len(replay)
    assert frames[resumed_at]["after_seq"] == 1
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(2, seqs[-1] + 1)), "each seq > after_seq exactly once, in order"


async def test_resume_of_a_finished_run_replays_it_whole(live: LiveServer) -> None:
    client = await live.client("alice")
    original = await (await client.chat("what is 5*5")).wait(10)
    other = await live.client("alice")
    replay = await other.resume(original[0].run_id, 0)
    await replay.wait(5)
    assert [e.to_dict() for e in replay.events] == [e.to_dict() for e in original]
    # Past the last seq: nothing to replay.
    token = live.token("alice")
    async with await open_ws(live.ws_url, token) as ws:
        await ws.send(Resume(original[0].run_id, after_seq=99).serialize())
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert frame == {
            "type": "resumed",
            "run_id": original[0].run_id,
            "after_seq": 99,
            "replayed": 0,
        }


async def test_a_second_tab_gets_every_event(live: LiveServer) -> None:
    tab1 = await live.client("alice")
    tab2 = await live.client("alice")
    run = await tab1.chat("what is 7*6")
    events = await run.wait(10)
    await wait_until(lambda: run.run_id in tab2.runs and tab2.runs[run.run_id].done, 5)
    seen = tab2.runs[run.run_id].events
    assert [e.event_id for e in seen] == [e.event_id for e in events]


async def test_isolation_foreign_runs_are_not_found(live: LiveServer) -> None:
    alice = await live.client("alice")
    bob = await live.client("bob")
    run = await alice.chat("wait 2")
    await wait_until(lambda: len(run.events) >= 2, 5)
    with pytest.raises(RunwatchError) as err:
        await bob.resume(run.run_id, 0)
    assert err.value.code == "not_found"
    await bob.cancel(run.run_id)
    await bob.ack(run.run_id, 2)
    codes = [(await asyncio.wait_for(bob.errors.get(), 5)).code for _ in range(2)]
    assert codes == ["not_found", "not_found"]
    # The same answer for a run that does not exist at all: existence never leaks.
    await bob.cancel("01NOSUCHRUN0000000000000000")
    missing = await asyncio.wait_for(bob.errors.get(), 5)
    assert missing.code == "not_found" and missing.message == "no such run"
    events = await run.wait(10)
    assert events[-1].type == EventType.AGENT_COMPLETED, "bob's cancel had no effect"
    assert bob.runs == {}, "bob never receives a foreign event"


async def test_ack_is_clamped_and_counts_delivery_once(live: LiveServer) -> None:
    tab1 = await live.client("alice")
    tab2 = await live.client("alice")
    events = await (await tab1.chat("what is 1+2")).wait(10)
    run_id = events[0].run_id
    await wait_until(lambda: run_id in tab2.runs and tab2.runs[run_id].done, 5)
    await tab1.ack(run_id, 10_000)  # past the last seq: clamped
    await tab1.ping()
    await tab2.ping()
    n = len(events)
    await wait_until(
        lambda: live.metric("runwatch_events_acked_total", {"type": "agent_completed"}) == 1, 5
    )
    acked = sum(live.metric("runwatch_events_acked_total", {"type": t.value}) for t in EventType)
    assert acked == n, "two tabs acked every event; each counts once"
    assert live.metric("runwatch_event_delivery_seconds_count", {"type": "agent_started"}) == 1
    assert live.metric("runwatch_events_sent_total", {"type": "agent_started"}) == 2
    await live.rt.writer.flush(5)
    receipts = await live.rt.store.receipts(run_id)
    assert len(receipts) == 2 * n
    assert all(r.acked_us is not None and r.acked_us >= r.sent_us for r in receipts)
    assert {r.user_id for r in receipts} == {"alice"}


async def test_events_while_offline_are_deferred(live: LiveServer) -> None:
    client = await live.client("alice")
    run = await client.chat("wait 2")
    await wait_until(lambda: len(run.events) >= 2, 5)
    await client.close()
    await wait_until(lambda: live.rt.hub.connections("alice") == set(), 5)
    await wait_until(lambda: not live.rt.engine.active, 10)
    deferred = live.metric("runwatch_events_deferred_total", {"type": "agent_completed"})
    assert deferred == 1
    stored = await live.rt.store.stored_events(run.run_id)
    assert stored[0].live is True and stored[-1].live is False


async def test_store_holds_every_event_any_client_received(live: LiveServer) -> None:
    client = await live.client("alice")
    runs = [await client.chat(t) for t in ("what is 2*21", "fail tool", "crash")]
    received: list[Event] = []
    for run in runs:
        received.extend(await run.wait(10))
    for event in received:
        stored = await live.rt.store.run_events(event.run_id)
        assert event in stored
