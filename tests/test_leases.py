"""Instance ownership (docs/operations.md; issue #11 items 2 and 3): one live process per instance
id, the port bound before the lease and the lease before recovery, and a dead replica's open
runs ended exactly once by a survivor."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from runtime.events import EventType
from runtime.lease import InstanceLease, LeaseHeld
from runtime.protocol import Chat
from runtime.store.audit import AuditStore, Lease, RunInfo

from .conftest import (
    JWT_SECRET,
    make_token,
    open_ws,
    sqlite_url,
    start_server_process,
    wait_until,
)
from .invariants import assert_valid


async def test_a_live_holder_on_this_host_is_refused_at_once(store: AuditStore) -> None:
    first = InstanceLease(store, "x", ttl_s=30)
    first.pid = os.getppid()  # a live process that is not this one
    await first.acquire()
    second = InstanceLease(store, "x", ttl_s=30)
    with pytest.raises(LeaseHeld) as info:
        await second.acquire()
    assert "held by a live runwatch process" in str(info.value)
    assert not second.held
    await first.release()
    await second.acquire()
    assert second.held


async def test_a_holder_elsewhere_is_waited_for_then_replaced_once_expired(
    store: AuditStore,
) -> None:
    first = InstanceLease(store, "x", ttl_s=0.5)
    first.host = "elsewhere/boot/ns"
    await first.acquire()
    second = InstanceLease(store, "x", ttl_s=0.5)
    await second.acquire()  # the first never renews: expired after 0.5 s
    assert second.held
    assert not await first.renew()
    assert first.lost


async def test_a_dead_replicas_runs_are_ended_exactly_once(store: AuditStore) -> None:
    for i in range(5):
        run = RunInfo(f"run{i}", "alice", f"t{i}", "demo", f"m{i}", "dead", 1_000 + i)
        await store.create_run(run, new_thread=True)
    await store.claim_lease(Lease("dead", "gone", "elsewhere", 1, 0, 1), replacing=None)
    ended: list[str] = []
    inside = [0]

    async def take_over(instance_id: str) -> int:
        # As Engine.recover: read the open runs under the claim, end those not ended yet.
        inside[0] += 1
        assert inside[0] == 1, "two survivors took over the same replica at once"
        runs = [r for r in await store.open_runs(instance_id) if r.run_id not in ended]
        await asyncio.sleep(0.05)
        ended.extend(r.run_id for r in runs)
        inside[0] -= 1
        return len(runs)

    survivors = [InstanceLease(store, name, ttl_s=5) for name in ("s1", "s2", "s3")]
    counts = await asyncio.gather(*(s.reap(take_over) for s in survivors))
    assert sorted(counts)[-1] == 5 and sum(counts) == 5
    assert sorted(ended) == [f"run{i}" for i in range(5)]
    assert await store.get_lease("dead") is None  # released after the takeover
    # A live lease is never taken over.
    await store.create_run(RunInfo("live-run", "bob", "tl", "demo", "m", "s1", 1), new_thread=True)
    await survivors[0].acquire()
    assert await survivors[1].reap(take_over) == 0


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_second_serve_on_the_same_database_never_touches_the_first(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "shared.db")
    env = {"RUNWATCH_DATABASE_URL": db, "RUNWATCH_JWT_SECRET": JWT_SECRET}
    first = start_server_process(tmp_path, {**env, "RUNWATCH_INSTANCE_ID": "one"})
    try:
        async with await open_ws(first.ws_url, make_token("alice")) as ws:
            await ws.send(Chat("wait 2", "m").serialize())
            run_id = json.loads(await ws.recv())["run_id"]
            # The same port: refused before the store is touched.
            same_port = await asyncio.to_thread(
                _cli, tmp_path, env, "serve", "--port", str(first.port)
            )
            # Another port (any free one), the same explicit instance id: refused by the lease.
            same_id = await asyncio.to_thread(
                _cli, tmp_path, {**env, "RUNWATCH_INSTANCE_ID": "one"}, "serve", "--port", "0"
            )
            events = []
            while not events or events[-1]["type"] not in ("agent_completed", "agent_error"):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
                if frame.get("run_id") == run_id and "seq" in frame:
                    events.append(frame)
    finally:
        first.proc.terminate()
        first.proc.wait(30)
    for result, words in ((same_port, "cannot listen on"), (same_id, "is held by a live")):
        assert result.returncode == 2, result.stderr
        assert words in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    print(f"\nsame port: {same_port.stderr.strip()}\nsame id:   {same_id.stderr.strip()}")
    assert events[-1]["type"] == "agent_completed"
    store = AuditStore.open(db)
    try:
        stored = await store.run_events(run_id)
    finally:
        await store.close()
    assert_valid(stored)
    assert [e.type for e in stored if e.is_terminal] == [EventType.AGENT_COMPLETED]


async def test_default_instance_ids_are_unique_per_process(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "ids.db")
    env = {"RUNWATCH_DATABASE_URL": db, "RUNWATCH_JWT_SECRET": JWT_SECRET}
    one = start_server_process(tmp_path, {**env, "RUNWATCH_INSTANCE_ID": ""}, name="one")
    two = start_server_process(tmp_path, {**env, "RUNWATCH_INSTANCE_ID": ""}, name="two")
    try:
        for server in (one, two):
            assert httpx.get(f"{server.http_url}/healthz", timeout=5).status_code == 200
        store = AuditStore.open(db)
        try:

            async def two_leases() -> bool:
                rows = [await store.get_lease(i) for i in await _lease_ids(store)]
                return len({r.pid for r in rows if r is not None}) == 2

            await wait_until(two_leases, 10)
        finally:
            await store.close()
    finally:
        for server in (one, two):
            server.proc.terminate()
            server.proc.wait(30)


async def _lease_ids(store: AuditStore) -> list[str]:
    from sqlalchemy import select

    from runtime.store.models import InstanceLeaseRow

    async with store.engine.connect() as conn:
        res = await conn.execute(select(InstanceLeaseRow.instance_id))
        return [r[0] for r in res]
