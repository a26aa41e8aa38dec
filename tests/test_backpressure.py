"""Slow consumers, isolation under load, and the limits that keep one client from hurting others."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from pathlib import Path

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from runtime.agents import AgentRegistry
from runtime.agents.flood import flood_agent
from runtime.client import RunwatchClient
from runtime.events import EventType
from runtime.protocol import Chat, Connect

from .conftest import LiveServer, make_settings, serve_runtime, sqlite_url, wait_until
from .invariants import assert_valid


def agents() -> AgentRegistry:
    registry = AgentRegistry.with_builtins()
    registry.register("flood", flood_agent)
    return registry


async def _latencies(client: RunwatchClient, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        run = await client.chat("what is 2*3")
        async for event in run:
            out.append(time.time() - event.ts_us / 1e6)
    return out


async def test_slow_consumer_is_closed_with_4008_and_recovers_by_resume(tmp_path: Path) -> None:
    queue_bytes = 64 * 1024
    settings = make_settings(sqlite_url(tmp_path / "rw.db"), send_queue_bytes=queue_bytes)
    async with serve_runtime(settings, agents=agents()) as live:
        healthy = [await live.client(f"healthy{i}") for i in range(20)]
        baseline = statistics.median(
            [x for lat in await asyncio.gather(*(_latencies(c, 2) for c in healthy)) for x in lat]
        )

        # A client that stops reading: a tiny receive buffer and no recv() calls.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", live.port))
        slow = await ws_connect(live.ws_url, sock=sock, max_size=None, max_queue=1)
        await slow.send(Connect(live.token("slow")).serialize())
        await slow.recv()
        await slow.send(Chat("flood 3000 4000", "f1", agent="flood").serialize())
        await wait_until(
            lambda: live.metric("runwatch_disconnects_total", {"code": "4008"}) == 1, 30
        )

        # The healthy clients kept their latency while the slow one was being cut off.
        during = statistics.median(
            [x for lat in await asyncio.gather(*(_latencies(c, 2) for c in healthy)) for x in lat]
        )
        assert during < max(baseline * 5, 0.25), (baseline, during)
        # Server-side memory for it stayed bounded: nothing of it is left queued.
        assert live.rt.hub.connections("slow") == set()
        assert (
            live.metric("runwatch_event_delivery_failures_total", {"reason": "slow_consumer"}) > 0
        )

        # Reading now shows the 4008 close after whatever was already in flight.
        try:
            while True:
                await asyncio.wait_for(slow.recv(), 10)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 4008
        await slow.close()
        sock.close()

        # After reconnecting, resume brings every event back.
        again = await live.client("slow")
        listed = [r["run_id"] for r in again.active_runs]
        assert listed, "the flood run is listed for the returning client"
        run_id = listed[0]
        replay = await again.resume(run_id, 0)
        events = await replay.wait(60)
        assert_valid(events)
        deltas = [e for e in events if e.type == EventType.TEXT_DELTA]
        assert len(deltas) == 3000


async def test_isolation_under_load(tmp_path: Path) -> None:
    async with serve_runtime(make_settings(sqlite_url(tmp_path / "rw.db"))) as live:
        users = [f"user{i}" for i in range(20)]
        conns = {u: [await live.client(u) for _ in range(3)] for u in users}
        prompts = ["what is 4*4", "fail tool", "hello", "wait 1", "what time is it"]

        async def work(user: str) -> list[str]:
            runs = []
            for i, client in enumerate(conns[user]):
                run = await client.chat(prompts[(i + len(user)) % len(prompts)])
                runs.append(run)
            for run in runs:
                assert_valid(await run.wait(30))
            return [r.run_id for r in runs]

        run_ids = await asyncio.gather(*(work(u) for u in users))
        await live.rt.writer.flush(10)
        for user, ids in zip(users, run_ids, strict=True):
            # Every tab got every run of its own user, and nothing else.
            for client in conns[user]:
                await wait_until(lambda c=client: all(r.done for r in c.runs.values()), 10)
                assert set(client.runs) == set(ids)
            for run_id in ids:
                receipts = await live.rt.store.receipts(run_id)
                assert receipts, run_id
                assert {r.user_id for r in receipts} == {user}
                # Three tabs, each got each event once.
                per_conn: dict[str, list[int]] = {}
                for r in receipts:
                    per_conn.setdefault(r.connection_id, []).append(r.seq)
                assert len(per_conn) == 3
                for seqs in per_conn.values():
                    assert seqs == sorted(set(seqs))


async def test_one_connection_per_tab_limit_is_per_user(live: LiveServer) -> None:
    clients = [await live.client("dave") for _ in range(10)]
    other = await live.client("erin")
    assert other.connection_id
    assert len(live.rt.hub.connections("dave")) == 10
    for c in clients:
        await c.close()
    await wait_until(lambda: live.rt.hub.connections("dave") == set(), 5)
