"""The same runtime code on PostgreSQL (asyncpg): runs, receipts and resume."""

from __future__ import annotations

import asyncio

from runtime.events import EventType

from .conftest import make_settings, serve_runtime, wait_until
from .invariants import assert_valid


async def test_runs_on_postgresql(pg_url: str) -> None:
    async with serve_runtime(make_settings(pg_url)) as live:
        clients = [await live.client(f"user{i}") for i in range(10)]
        runs = await asyncio.gather(
            *(c.chat(t) for c, t in zip(clients, ["what is 9*9", "fail tool"] * 5, strict=True))
        )
        for run in runs:
            assert_valid(await run.wait(20))
        slow = await clients[0].chat("wait 10")
        await wait_until(lambda: any(e.type == EventType.TOOL_EXECUTING for e in slow.events), 5)
        await clients[0].cancel(slow.run_id)
        events = await slow.wait(5)
        assert_valid(events)
        assert events[-1].data["code"] == "cancelled"
        replay = await (await live.client("user0")).resume(slow.run_id, 0)
        await replay.wait(5)
        assert [e.event_id for e in replay.events] == [e.event_id for e in events]
        await live.rt.writer.flush(5)
        receipts = await live.rt.store.receipts(runs[3].run_id)
        assert receipts and {r.user_id for r in receipts} == {"user3"}
