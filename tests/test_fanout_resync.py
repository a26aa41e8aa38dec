"""Issue #11 item 4: cross-replica fan-out never delivers a gap silently.

Redis drops a slow subscriber (its output-buffer limit) and whatever was published meanwhile is
gone. Replica B's subscriber connection is killed several times while replica A streams runs
of alice; alice's tab on B must still get every run, complete and in seq order, with no gap for
the SDK to repair, because B resynchronises the runs it relays from the store.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack

import pytest

from runtime.relay import RESYNC_REASONS

from .conftest import make_settings, serve_runtime, wait_until
from .test_scaleout import redis_url  # noqa: F401  (fixture)

KILLS = 5
RUNS = 36


async def _kill_subscriber(redis: object, name: str) -> bool:
    """``CLIENT KILL ID`` of the connection named ``name`` (only that replica's subscriber)."""
    clients = await redis.client_list()  # type: ignore[attr-defined]
    ids = [c["id"] for c in clients if c.get("name") == name]
    for client_id in ids:
        await redis.execute_command("CLIENT", "KILL", "ID", client_id)  # type: ignore[attr-defined]
    return bool(ids)


@pytest.mark.redis
async def test_a_dropped_subscriber_resyncs_from_the_store_without_gaps(
    pg_url: str,
    redis_url: str,  # noqa: F811
) -> None:
    import redis.asyncio as aioredis

    channel = f"runwatch-test:{os.getpid()}:{id(pg_url)}:resync"
    admin = aioredis.from_url(redis_url, decode_responses=True)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(admin.aclose)
        a = await stack.enter_async_context(
            serve_runtime(
                make_settings(
                    pg_url,
                    instance_id="a",
                    redis_url=redis_url,
                    redis_channel=channel,
                    chat_burst=RUNS,
                )
            )
        )
        b = await stack.enter_async_context(
            serve_runtime(
                make_settings(pg_url, instance_id="b", redis_url=redis_url, redis_channel=channel)
            )
        )
        assert b.rt.broker is not None
        name = b.rt.broker.subscriber_name
        tab_a = await a.client("alice")
        tab_b = await b.client("alice")
        await wait_until(
            lambda: a.rt.broker is not None and a.rt.broker.owner_elsewhere("alice"), 10
        )

        async def killer() -> int:
            killed = 0
            for _ in range(KILLS):
                await asyncio.sleep(0.25)
                killed += await _kill_subscriber(admin, name)
                # Killed again only once redis-py has resubscribed.
                await wait_until(
                    lambda k=killed: b.rt.broker is not None and b.rt.broker.resubscribed >= k, 10
                )
            return killed

        async def load() -> list[str]:
            texts = ["what is 6*7", "wait 1", "fail tool", "search resume", "hello"]
            runs = []
            for i in range(RUNS):
                runs.append(await tab_a.chat(f"{texts[i % len(texts)]} #{i}"))
                await asyncio.sleep(0.03)
            for run in runs:
                await run.wait(20)
            return [run.run_id for run in runs]

        killed, run_ids = await asyncio.gather(killer(), load())
        assert killed == KILLS

        def arrived() -> bool:
            return all(r in tab_b.runs and tab_b.runs[r].done for r in run_ids)

        await wait_until(arrived, 20)
        for run_id in run_ids:
            seqs = [e.seq for e in tab_b.runs[run_id].events]
            assert seqs == list(range(1, len(seqs) + 1))
            origin = [e.event_id for e in tab_a.runs[run_id].events]
            assert [e.event_id for e in tab_b.runs[run_id].events] == origin
        # Every seq arrived in order: the SDK never had to fill a gap itself.
        assert tab_b.gap_resumes == 0
        resynced = {
            r: b.metric("runwatch_fanout_resyncs_total", {"reason": r}) for r in RESYNC_REASONS
        }
        print(f"resyncs on B: {resynced}; runs repaired: {b.rt.relay.runs_repaired} of {RUNS}")
        assert b.rt.broker.resubscribed >= KILLS
