"""Runs over a real socket to a real server: every invariant on every kind of run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import generate_latest

from runtime.agents import AgentRegistry, RunContext, ToolError
from runtime.client import RunwatchClient
from runtime.events import EventType, new_id, now_us
from runtime.store.audit import RunInfo

from .conftest import LiveServer, make_settings, serve_runtime, sqlite_url, wait_until
from .invariants import assert_valid


def types(events: list) -> list[str]:
    return [e.type.value for e in events]


async def test_plain_answer(live: LiveServer) -> None:
    client = await live.client("alice")
    run = await client.chat("hello there")
    events = await run.wait(10)
    assert_valid(events)
    kinds = types(events)
    deltas = kinds.count("text_delta")
    assert deltas >= 2, "the demo agent streams its answer"
    assert kinds == [
        "agent_started",
        "agent_thinking",
        "agent_thinking",
        *["text_delta"] * deltas,
        "final_report",
        "agent_completed",
    ]
    assert "arithmetic" in events[-2].data["text"]
    assert "".join(e.data["text"] for e in events[3:-2]) == events[-2].data["text"]
    assert events[0].data == {"input": "hello there"}
    assert all(e.run_id == run.run_id and e.thread_id == run.thread_id for e in events)


async def test_arithmetic_answer_uses_the_calculator(live: LiveServer) -> None:
    client = await live.client("alice")
    events = await (await client.chat("what is 6*7")).wait(10)
    assert_valid(events)
    executing = [e for e in events if e.type == EventType.TOOL_EXECUTING]
    completed = [e for e in events if e.type == EventType.TOOL_COMPLETED]
    assert [e.data["tool"] for e in executing] == ["calculator"]
    assert completed[0].data["status"] == "ok"
    assert completed[0].data["result"]["value"] == 42
    assert "42" in next(e for e in events if e.type == EventType.FINAL_REPORT).data["text"]


async def test_failing_tool_still_completes_and_explains(live: LiveServer) -> None:
    client = await live.client("alice")
    events = await (await client.chat("please fail tool")).wait(10)
    assert_valid(events)
    done = next(e for e in events if e.type == EventType.TOOL_COMPLETED)
    assert done.data["status"] == "error"
    assert done.data["tool"] == "fail"
    assert "always fails" in done.data["error"]
    assert events[-1].type == EventType.AGENT_COMPLETED
    assert "failed" in next(e for e in events if e.type == EventType.FINAL_REPORT).data["text"]
    assert live.metric("runwatch_tool_calls_total", {"tool": "fail", "status": "error"}) == 1


async def test_agent_crash_ends_with_agent_failed(live: LiveServer) -> None:
    client = await live.client("alice")
    events = await (await client.chat("crash now")).wait(10)
    assert_valid(events)
    assert events[-1].type == EventType.AGENT_ERROR
    assert events[-1].data["code"] == "agent_failed"
    assert events[-1].data["retryable"] is False
    assert not any(e.type == EventType.FINAL_REPORT for e in events)
    assert live.metric("runwatch_runs_finished_total", {"agent": "demo", "outcome": "error"}) == 1


async def test_run_timeout_closes_the_open_tool_call(tmp_path: Path) -> None:
    settings = make_settings(sqlite_url(tmp_path / "rw.db"), run_timeout_s=1.0)
    async with serve_runtime(settings) as live:
        client = await live.client("alice")
        events = await (await client.chat("wait 10")).wait(10)
    assert_valid(events)
    assert events[-1].data["code"] == "timeout"
    assert events[-1].data["retryable"] is True
    wait_done = next(e for e in events if e.type == EventType.TOOL_COMPLETED)
    assert wait_done.data["status"] == "error"


async def test_cancel_mid_tool(live: LiveServer) -> None:
    client = await live.client("alice")
    run = await client.chat("wait 20")
    await wait_until(lambda: any(e.type == EventType.TOOL_EXECUTING for e in run.events), 5)
    started = asyncio.get_running_loop().time()
    await client.cancel(run.run_id)
    events = await run.wait(5)
    # A cancel takes effect within 1 s.
    assert asyncio.get_running_loop().time() - started < 1.0 * 2
    assert_valid(events)
    assert events[-1].data["code"] == "cancelled"
    completed = [e for e in events if e.type == EventType.TOOL_COMPLETED]
    assert completed and all(e.data["status"] == "error" for e in completed)
    assert not any(e.type == EventType.AGENT_COMPLETED for e in events)
    # A cancel of a run that has ended is ignored: no error, nothing emitted.
    await client.cancel(run.run_id)
    await client.ping()
    assert client.errors.empty()
    assert len(run.events) == len(events)


async def test_fifty_concurrent_clients_two_runs_each(live: LiveServer) -> None:
    users = [f"user{i}" for i in range(50)]
    clients = await asyncio.gather(*(live.client(u) for u in users))
    prompts = ["what is 12*12", "hello", "what time is it", "search resume", "fail tool"]

    async def two_runs(i: int, client: RunwatchClient) -> list:
        runs = [
            await client.chat(prompts[i % len(prompts)]),
            await client.chat(prompts[(i + 1) % len(prompts)]),
        ]
        return [await r.wait(60) for r in runs]

    results = await asyncio.gather(*(two_runs(i, c) for i, c in enumerate(clients)))
    for user, client, runs in zip(users, clients, results, strict=True):
        for events in runs:
            assert_valid(events)
        # Isolation: a client only ever holds its own runs.
        for run in client.runs.values():
            stored = await live.rt.store.get_run(run.run_id)
            assert stored is not None and stored.user_id == user
    assert live.metric("runwatch_runs_started_total", {"agent": "demo"}) == 100


async def test_duplicate_client_msg_id_starts_nothing(live: LiveServer) -> None:
    client = await live.client("alice")
    first = await client.chat("what is 1+1", client_msg_id="msg-1")
    await first.wait(10)
    again = await client.chat("something else entirely", client_msg_id="msg-1")
    assert again.run_id == first.run_id
    assert again.duplicate is True
    assert live.metric("runwatch_runs_started_total", {"agent": "demo"}) == 1
    # The same id from another user is that user's own message.
    other = await (await live.client("bob")).chat("hi", client_msg_id="msg-1")
    assert other.run_id != first.run_id and other.duplicate is False


async def test_thread_is_reused_and_foreign_thread_is_not_found(live: LiveServer) -> None:
    alice = await live.client("alice")
    first = await alice.chat("hello")
    second = await alice.chat("hello again", thread_id=first.thread_id)
    assert second.thread_id == first.thread_id
    bob = await live.client("bob")
    try:
        await bob.chat("sneaky", thread_id=first.thread_id)
    except Exception as exc:
        assert getattr(exc, "code", None) == "not_found"
    else:
        raise AssertionError("a foreign thread_id must get not_found")
    # The refused chat did not use up its id.


async def test_connected_lists_active_runs(live: LiveServer) -> None:
    alice = await live.client("alice")
    running = await alice.chat("wait 5")
    finished = await alice.chat("what is 2+2")
    await finished.wait(10)
    await wait_until(lambda: len(running.events) >= 2, 5)

    async def settled() -> bool:
        # The first tab acked the terminal event: the run leaves active_runs.
        return finished.run_id not in {
            r["run_id"] for r in await live.rt.store.active_runs("alice")
        }

    await wait_until(settled, 5)
    second = await live.client("alice")
    listed = {r["run_id"]: r["last_seq"] for r in second.active_runs}
    # The running one is listed; the finished one was acked by the first tab, so it is not.
    assert running.run_id in listed and listed[running.run_id] >= 2
    assert finished.run_id not in listed
    await alice.cancel(running.run_id)
    await running.wait(5)


async def test_runs_before_connect_are_listed_and_resumable(live: LiveServer) -> None:
    alice = await live.client("alice", auto_ack=False)
    run = await alice.chat("what is 3*3")
    events = await run.wait(10)
    later = await live.client("alice")
    assert {"run_id": run.run_id, "last_seq": events[-1].seq} in later.active_runs
    replayed = await later.resume(run.run_id, 0)
    await replayed.wait(5)
    assert [e.event_id for e in replayed.events] == [e.event_id for e in events]


async def test_a_made_up_tool_is_counted_as_unknown(tmp_path: Path) -> None:
    async def inventive(ctx: RunContext) -> str:
        await ctx.think("calling a tool that does not exist")
        try:
            await ctx.tool("no_such_tool_" + ctx.run_id, {})
        except ToolError as exc:
            return f"could not: {exc.message}"
        return "unexpected"

    agents = AgentRegistry.with_builtins()
    agents.register("inventive", inventive)
    settings = make_settings(sqlite_url(tmp_path / "rw.db"))
    async with serve_runtime(settings, agents=agents) as live:
        client = await live.client("alice")
        run = await client.chat("go", agent="inventive")
        events = [e async for e in run]
        assert_valid(events)
        completed = [e for e in events if e.type == EventType.TOOL_COMPLETED]
        assert completed[0].data["status"] == "error"
        # The invented name is not a label: the call counts under "unknown", no series added.
        assert live.metric("runwatch_tool_calls_total", {"tool": "unknown", "status": "error"}) == 1
        exposed = generate_latest(live.rt.registry).decode()
        assert "no_such_tool_" not in exposed


async def test_a_run_created_but_never_started_starts_on_the_retry(live: LiveServer) -> None:
    # The writer committed the run, but its answer was lost (an ambiguous commit): the chat was
    # refused, and the client retries with the same client_msg_id.
    ghost = RunInfo(
        run_id=new_id(),
        user_id="alice",
        thread_id=new_id(),
        agent="demo",
        client_msg_id="m-ghost",
        instance_id=live.rt.settings.instance_id,
        created_us=now_us(),
    )
    await live.rt.store.create_run(ghost, new_thread=True)
    client = await live.client("alice")
    run = await client.chat("what is 6*7", client_msg_id="m-ghost")
    assert run.run_id == ghost.run_id
    events = await run.wait(10)
    assert_valid(events)
    assert events[-1].type == EventType.AGENT_COMPLETED
    # A second retry finds the run started: nothing starts twice.
    again = await client.chat("what is 6*7", client_msg_id="m-ghost")
    assert again.run_id == ghost.run_id
    await live.rt.writer.flush(5)
    assert len(await live.rt.store.run_events(ghost.run_id)) == len(events)
