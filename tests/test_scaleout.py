"""Two runtime replicas sharing PostgreSQL and Redis: fan-out of events, cancels and acks."""

from __future__ import annotations

import os
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from runtime.client import RunwatchClient
from runtime.events import EventType
from runtime.store.audit import AuditStore

from .conftest import (
    JWT_SECRET,
    make_settings,
    make_token,
    serve_runtime,
    service_missing,
    start_server_process,
    wait_until,
)
from .invariants import assert_valid

REDIS_URL = os.environ.get("RUNWATCH_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_url() -> str:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        service_missing(f"Redis not reachable at {REDIS_URL}: {exc}")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.mark.redis
async def test_two_replicas_fan_out_events_cancels_and_acks(pg_url: str, redis_url: str) -> None:
    channel = f"runwatch-test:{os.getpid()}:{id(pg_url)}"
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            serve_runtime(
                make_settings(pg_url, instance_id="a", redis_url=redis_url, redis_channel=channel)
            )
        )
        b = await stack.enter_async_context(
            serve_runtime(
                make_settings(pg_url, instance_id="b", redis_url=redis_url, redis_channel=channel)
            )
        )
        # Both replicas must sign tokens alike: share the secret (set by make_settings).
        tab_a = await a.client("alice")
        tab_b = await b.client("alice")
        await wait_until(
            lambda: a.rt.broker is not None and a.rt.broker.owner_elsewhere("alice"), 10
        )

        # A run on replica A reaches alice's tab on replica B, every event once.
        run = await tab_a.chat("what is 7*8")
        events = await run.wait(10)
        assert_valid(events)
        await wait_until(lambda: run.run_id in tab_b.runs and tab_b.runs[run.run_id].done, 10)
        assert [e.event_id for e in tab_b.runs[run.run_id].events] == [e.event_id for e in events]
        # Both tabs acked; the origin counted each event's first ack once.
        await wait_until(
            lambda: a.metric("runwatch_events_acked_total", {"type": "agent_completed"}) == 1, 10
        )
        assert b.metric("runwatch_events_acked_total", {"type": "agent_completed"}) == 0

        # A cancel sent to replica B stops the run running on replica A.
        slow = await tab_a.chat("wait 20")
        await wait_until(lambda: any(e.type == EventType.TOOL_EXECUTING for e in slow.events), 5)
        await tab_b.cancel(slow.run_id)
        done = await slow.wait(5)
        assert done[-1].data["code"] == "cancelled"

        # Another user on B never sees alice's events. B fans an event out to every
        # connection it goes to at once: once alice's tab on B has the whole run, anything
        # sent to bob with it is queued on bob's socket ahead of the pong to a later ping.
        bob = await b.client("bob")
        hello = await tab_a.chat("hello")
        await hello.wait(10)
        await wait_until(lambda: hello.run_id in tab_b.runs and tab_b.runs[hello.run_id].done, 10)
        await bob.ping()
        assert bob.runs == {}

        # Resume on B of a run that lives on A replays from the store.
        again = await b.client("alice")
        replay = await again.resume(run.run_id, 0)
        await replay.wait(5)
        assert [e.event_id for e in replay.events] == [e.event_id for e in events]


@pytest.mark.redis
async def test_a_replica_killed_for_good_has_its_runs_ended_by_a_survivor(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Issue #11 item 3: a replica SIGKILLed and never restarted. Its open runs end with one
    runtime_restarted each, ended by the surviving replica within about a lease lifetime, and
    live to a tab on the survivor; a resume there answers at once."""
    ttl = 1.5
    env = {
        "RUNWATCH_DATABASE_URL": pg_url,
        "RUNWATCH_JWT_SECRET": JWT_SECRET,
        "RUNWATCH_REDIS_URL": redis_url,
        "RUNWATCH_REDIS_CHANNEL": f"runwatch-test:{os.getpid()}:{id(tmp_path)}",
        "RUNWATCH_LEASE_TTL_S": str(ttl),
    }
    a = start_server_process(tmp_path, {**env, "RUNWATCH_INSTANCE_ID": "a"}, command="runtime")
    b = start_server_process(tmp_path, {**env, "RUNWATCH_INSTANCE_ID": "b"}, command="runtime")
    store = AuditStore.open(pg_url)
    try:
        async with (
            RunwatchClient(a.ws_url, make_token("alice"), reconnect=False) as tab_a,
            RunwatchClient(b.ws_url, make_token("alice")) as tab_b,
        ):
            runs = [await tab_a.chat(f"wait 30 #{i}") for i in range(4)]
            for run in runs:
                await wait_until(
                    lambda r=run: any(e.type == EventType.TOOL_EXECUTING for e in r.events), 10
                )
            watched = await tab_b.resume(runs[0].run_id)
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait(10)
            killed = time.monotonic()

            async def all_ended() -> bool:
                infos = [await store.get_run(r.run_id) for r in runs]
                return all(i is not None and i.ended_us is not None for i in infos)

            await wait_until(all_ended, 4 * ttl + 5)
            took = time.monotonic() - killed
            events = await watched.wait(5)  # live on the survivor's tab
            assert events[-1].data["code"] == "runtime_restarted"
            # A resume of another of them on the survivor answers at once, with the end.
            late = await tab_b.resume(runs[1].run_id, after_seq=0)
            assert late.done and late.events[-1].data["code"] == "runtime_restarted"
        for run in runs:
            stored = await store.run_events(run.run_id)
            assert_valid(stored)
            terminals = [e for e in stored if e.is_terminal]
            assert [e.data["code"] for e in terminals] == ["runtime_restarted"]
        assert await store.open_runs() == []
        metrics = httpx.get(f"{b.http_url}/metrics", timeout=5).text
        assert "runwatch_runs_taken_over_total 4.0" in metrics
        print(
            f"\ndead replica: {len(runs)} open runs ended by the survivor {took:.2f}s after SIGKILL"
        )
        assert took < 3 * ttl + 2
    finally:
        await store.close()
        for server in (a, b):
            if server.proc.poll() is None:
                server.proc.terminate()
                server.proc.wait(30)
