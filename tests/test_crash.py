"""A server killed with SIGKILL mid-run, restarted on the same database (I6, I8)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from runtime.client import RunwatchClient
from runtime.events import Event, EventType
from runtime.store.audit import AuditStore

from .conftest import JWT_SECRET, make_token, sqlite_url, start_server_process, wait_until
from .invariants import assert_valid


async def test_sigkill_mid_run_ends_with_runtime_restarted(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "rw.db")
    env = {"RUNWATCH_DATABASE_URL": db, "RUNWATCH_JWT_SECRET": JWT_SECRET}
    server = start_server_process(tmp_path, env)
    received: list[Event] = []
    try:
        client = RunwatchClient(server.ws_url, make_token("alice"), reconnect=False)
        await client.connect()
        run = await client.chat("wait 30")
        await wait_until(lambda: any(e.type == EventType.TOOL_EXECUTING for e in run.events), 10)
        await wait_until(lambda: len(run.events) >= 5, 10)
        received = list(run.events)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        await client.close()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

    restarted = start_server_process(tmp_path, env)
    try:
        store = AuditStore.open(db)
        try:
            stored = await store.run_events(run.run_id)
            info = await store.get_run(run.run_id)
        finally:
            await store.close()
        # Every event any client received is in the store (I6).
        for event in received:
            assert event in stored
        assert_valid(stored)
        assert stored[-1].type == EventType.AGENT_ERROR
        assert stored[-1].data["code"] == "runtime_restarted"
        assert stored[-1].data["retryable"] is True
        tool_done = [e for e in stored if e.type == EventType.TOOL_COMPLETED]
        assert tool_done and tool_done[-1].data["status"] == "error"
        assert info is not None and info.outcome == "runtime_restarted"

        # The returning client sees the run in active_runs and resumes it to the end.
        client = RunwatchClient(restarted.ws_url, make_token("alice"))
        await client.connect()
        listed = {r["run_id"]: r["last_seq"] for r in client.active_runs}
        assert listed[run.run_id] == stored[-1].seq
        resumed = await client.resume(run.run_id, received[-1].seq)
        await asyncio.wait_for(resumed.wait(), 10)
        assert [e.seq for e in resumed.events] == [
            e.seq for e in stored if e.seq > received[-1].seq
        ]
        await client.close()
    finally:
        restarted.proc.send_signal(signal.SIGTERM)
        restarted.proc.wait(30)
    assert "recovered 1 run" in restarted.log()


async def test_sigterm_drains_then_ends_the_rest_with_runtime_restarted(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "rw.db")
    env = {
        "RUNWATCH_DATABASE_URL": db,
        "RUNWATCH_JWT_SECRET": JWT_SECRET,
        "RUNWATCH_DRAIN_S": "2",
    }
    server = start_server_process(tmp_path, env)
    try:
        client = RunwatchClient(server.ws_url, make_token("alice"), reconnect=False)
        await client.connect()
        short = await client.chat("wait 1")
        long = await client.chat("wait 30")
        await wait_until(lambda: len(long.events) >= 3, 10)
        server.proc.send_signal(signal.SIGTERM)
        short_events = await short.wait(15)
        long_events = await long.wait(15)
        assert server.proc.wait(30) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    assert_valid(short_events)
    assert short_events[-1].type == EventType.AGENT_COMPLETED, "a short run finishes in the drain"
    assert_valid(long_events)
    assert long_events[-1].data["code"] == "runtime_restarted"
    # Sockets were closed with 1012 after the terminal events were delivered.
    await wait_until(lambda: client._closed_for_good is not None, 10)
    assert client._closed_for_good is not None and client._closed_for_good.code == 1012
    store = AuditStore.open(db)
    try:
        assert await store.open_runs() == []
    finally:
        await store.close()
