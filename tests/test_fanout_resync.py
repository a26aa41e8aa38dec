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

from runtime.relay import DEAF_MARGIN_US, RESYNC_REASONS

from .conftest import LiveServer, make_settings, serve_runtime, wait_until
from .faultproxy import FaultProxy
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


async def _replicas(
    stack: AsyncExitStack, pg_url: str, channel: str, redis_a: str, redis_b: str
) -> tuple[LiveServer, LiveServer]:
    """Replicas a (which runs alice's chats) and b on one store, each reaching Redis at its
    own URL."""
    a = await stack.enter_async_context(
        serve_runtime(
            make_settings(
                pg_url, instance_id="a", redis_url=redis_a, redis_channel=channel, chat_burst=RUNS
            )
        )
    )
    b = await stack.enter_async_context(
        serve_runtime(
            make_settings(pg_url, instance_id="b", redis_url=redis_b, redis_channel=channel)
        )
    )
    return a, b


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
        a, b = await _replicas(stack, pg_url, channel, redis_url, redis_url)
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


@pytest.mark.redis
async def test_a_publisher_cut_from_redis_drops_beyond_its_bound_and_replicas_resync(
    pg_url: str,
    redis_url: str,  # noqa: F811
) -> None:
    """Replica A loses Redis while it streams runs of alice, whose tab is on replica B. A's
    outbox stays within its bound (the oldest messages are dropped and counted); once Redis is
    back, B sees the jump in A's counter and replays what was dropped from the store, so the
    tab gets every run, runs started during the outage included, complete and in seq order,
    although B heard its own messages after the loss began."""
    channel = f"runwatch-test:{os.getpid()}:{id(pg_url)}:publisher-cut"
    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(proxy.stop)
        a, b = await _replicas(
            stack, pg_url, channel, f"redis://127.0.0.1:{proxy.port}/0", redis_url
        )
        broker = a.rt.broker
        assert broker is not None
        broker.outbox_limit = LIMIT = 20
        tab_a = await a.client("alice")
        tab_b = await b.client("alice")
        await wait_until(lambda: broker.owner_elsewhere("alice"), 10)
        before = await tab_a.chat("hello before")
        await before.wait(20)
        await wait_until(lambda: before.run_id in tab_b.runs and tab_b.runs[before.run_id].done, 10)

        proxy.down()
        during = []
        for i in range(6):
            during.append(await tab_a.chat(f"search outage #{i}"))
        for run in during:
            await run.wait(20)
        # The outage outlasts the relay's clock margin, and meanwhile alice chats on B too, so
        # B keeps hearing messages (its own): the loss from A started before them.
        await asyncio.sleep(DEAF_MARGIN_US / 1e6 + 0.5)
        on_b = await tab_b.chat("hello from b")
        await on_b.wait(20)
        depth = a.metric("runwatch_fanout_outbox_depth")
        assert depth <= LIMIT
        assert a.metric("runwatch_fanout_dropped_total") > 0
        assert b.metric("runwatch_fanout_resyncs_total", {"reason": "lost_messages"}) == 0
        proxy.up()

        after = await tab_a.chat("hello after")
        await after.wait(20)
        run_ids = [before.run_id, *(r.run_id for r in during), after.run_id]

        def arrived() -> bool:
            return all(r in tab_b.runs and tab_b.runs[r].done for r in run_ids)

        await wait_until(arrived, 30)
        for run_id in run_ids:
            assert [e.event_id for e in tab_b.runs[run_id].events] == [
                e.event_id for e in tab_a.runs[run_id].events
            ]
        assert tab_b.gap_resumes == 0
        assert b.metric("runwatch_fanout_resyncs_total", {"reason": "lost_messages"}) > 0
        dropped = a.metric("runwatch_fanout_dropped_total")
        print(
            f"dropped on A: {dropped:.0f}; outbox depth in the outage: {depth:.0f} (bound "
            f"{LIMIT}); runs repaired on B: {b.rt.relay.runs_repaired}"
        )
