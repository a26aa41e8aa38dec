"""A crash loop: SIGKILL the server at a random moment under load, restart it, 20 times.

Afterwards every run has ended, and no event any client received is missing from the store.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from monitor.report import judge_runs
from monitor.rules import RuleConfig
from runtime.client import RunwatchClient, RunwatchError
from runtime.events import Event, now_us
from runtime.store.audit import AuditStore

from .conftest import JWT_SECRET, make_token, sqlite_url, start_server_process, wait_until
from .invariants import assert_valid

KILLS = int(os.environ.get("RUNWATCH_CRASH_LOOP_KILLS", "20"))
#: Seeds the kill moments and each client's prompts and pauses; printed, so a failing loop
#: can be run again as it was (the client SDK's reconnect jitter is not seeded).
SEED = int(os.environ.get("RUNWATCH_CRASH_LOOP_SEED", "7"))
PROMPTS = ("wait 2", "what is 6*7", "fail tool", "hello", "wait 1", "crash")


async def _load(
    client: RunwatchClient, rng: random.Random, stop: asyncio.Event, accepted: list[float]
) -> int:
    """Chat until told to stop; ``accepted`` gets the time of every chat the server took."""
    started = 0
    i = rng.randrange(len(PROMPTS))
    while not stop.is_set():
        i += 1
        try:
            await client.chat(PROMPTS[i % len(PROMPTS)], timeout=60)
            started += 1
            accepted.append(time.monotonic())
        except (RunwatchError, TimeoutError):
            await asyncio.sleep(0.2)  # the server is down or restarting: retry shortly
            continue
        await asyncio.sleep(rng.uniform(0, 0.3))
    return started


@pytest.mark.slow
async def test_crash_loop(tmp_path: Path) -> None:
    print(f"\ncrash loop seed {SEED} (RUNWATCH_CRASH_LOOP_SEED={SEED} runs it again)")
    rng = random.Random(SEED)
    db = sqlite_url(tmp_path / "rw.db")
    env = {"RUNWATCH_DATABASE_URL": db, "RUNWATCH_JWT_SECRET": JWT_SECRET}
    server = start_server_process(tmp_path, env, command="runtime")
    clients = [
        RunwatchClient(server.ws_url, make_token(f"user{i}"), max_backoff_s=0.3) for i in range(10)
    ]
    for c in clients:
        await c.connect()
    stop = asyncio.Event()
    accepted: list[float] = []
    load = [
        asyncio.create_task(_load(c, random.Random(f"{SEED}:{i}"), stop, accepted))
        for i, c in enumerate(clients)
    ]
    try:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.3, 2.0))  # the kill comes at a random moment
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
            # The same address: the clients reconnect to it by themselves.
            server = start_server_process(tmp_path, env, port=server.port, command="runtime")
        # The last server takes chats from the clients that reconnected to it.
        last_start = time.monotonic()
        await wait_until(lambda: sum(t > last_start for t in accepted) >= len(clients), 60)
        stop.set()
        started = sum(await asyncio.gather(*load))
        # Every run a client knows of comes to its end, resumed from the store if need be.
        for client in clients:
            for run in list(client.runs.values()):
                await asyncio.wait_for(run.wait(), 60)
    finally:
        stop.set()
        for c in clients:
            await c.close()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)

    received: list[Event] = [e for c in clients for r in c.runs.values() for e in r.events]
    store = AuditStore.open(db)
    try:
        assert await store.open_runs() == [], "every run ended"
        lost = 0
        restarted = 0
        runs = {e.run_id for e in received}
        for run_id in runs:
            stored = await store.run_events(run_id)
            assert_valid(stored)
            lost += sum(1 for e in received if e.run_id == run_id and e not in stored)
            restarted += stored[-1].data.get("code") == "runtime_restarted"
        assert lost == 0
        # The monitor finds nothing but the expected: events sent by a killed server that no
        # client acknowledged before the kill (delivery_slo).
        judged = await judge_runs(
            store, RuleConfig(ack_wait_s=1), since_us=0, run_id=None, now_us=now_us() + 60_000_000
        )
        found = {v["rule"] for r in judged for v in r["violations"]}
        assert found <= {"delivery_slo"}, found
        assert all(r["state"] == "ended" for r in judged)
    finally:
        await store.close()
    print(
        f"\ncrash loop (seed {SEED}): {KILLS} kills, {started} chats accepted, "
        f"{len(runs)} runs seen by clients, {len(received)} events received, "
        f"{restarted} runs ended by runtime_restarted, lost {lost}"
    )
