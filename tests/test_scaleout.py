"""Two runtime replicas sharing PostgreSQL and Redis: fan-out of events, cancels and acks."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack

import pytest

from runtime.events import EventType

from .conftest import make_settings, serve_runtime, service_missing, wait_until
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

        # Another user on B never sees alice's events.
        bob = await b.client("bob")
        await (await tab_a.chat("hello")).wait(10)
        await asyncio.sleep(0.3)
        assert bob.runs == {}

        # Resume on B of a run that lives on A replays from the store.
        again = await b.client("alice")
        replay = await again.resume(run.run_id, 0)
        await replay.wait(5)
        assert [e.event_id for e in replay.events] == [e.event_id for e in events]
