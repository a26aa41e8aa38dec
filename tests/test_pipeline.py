"""The event pipeline's guarantees, black box: committed before sent, in order, bounded.

Each test drives a real server over real sockets and checks what the store holds through its
public read API, so it holds for any pipeline that keeps the guarantees (I6 and per-run order):
a bounded outbox stops a runaway agent without losing or reordering an event; a cancel in the
middle of a burst still ends the run cleanly; a SIGKILL loses nothing any client received; a
tool runs only after its ``tool_executing`` is committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from runtime.agents import AgentRegistry, RunContext
from runtime.agents.flood import flood_agent
from runtime.client import ConnectionClosed, RunwatchClient
from runtime.events import Event, EventType
from runtime.protocol import Chat, Connect
from runtime.store.audit import AuditStore
from runtime.tools import Tool, builtin_tools

from .conftest import (
    JWT_SECRET,
    make_settings,
    make_token,
    scale,
    serve_runtime,
    sqlite_url,
    start_server_process,
    wait_until,
)
from .invariants import assert_valid

FLOOD = "flood=runtime.agents.flood:flood_agent"

#: A runaway agent's burst: far more deltas than an outbox or a socket queue should hold.
RUNAWAY_DELTAS = 6000
RUNAWAY_CHARS = 1000
#: The delta before which the store stalls.
STALL_AT = 100
#: How far a runaway agent may run ahead of a stalled store: its bounded outbox plus the one
#: batch in flight hold far fewer events than this, and the burst holds more than twice as many.
QUEUE_BOUND = 2500


def _chunk(index: int, chars: int) -> str:
    """A delta that says where it belongs; random, so compression cannot shrink the load."""
    head = f"{index:06d}:"
    return head + os.urandom(chars // 2).hex()[: chars - len(head)]


class StoreStall:
    """Another connection holding SQLite's write lock: the store stalls, as on a slow disk.
    Kept well under a second, so the writer retries rather than falling back to its journal."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            path, timeout=10, isolation_level=None, check_same_thread=False
        )
        self.held = asyncio.Event()

    async def hold(self) -> None:
        await asyncio.to_thread(self._conn.execute, "BEGIN IMMEDIATE")
        self.held.set()

    async def release(self) -> None:
        await asyncio.to_thread(self._conn.execute, "ROLLBACK")
        self._conn.close()


async def burst_agent(ctx: RunContext) -> str:
    """A tool call open while deltas pour out, until the run is cancelled."""

    async def pour() -> None:
        for i in range(1_000_000):
            await ctx.delta(_chunk(i, 40))

    await asyncio.gather(ctx.tool("wait", {"seconds": 30}), pour())
    return "never"


def _agents(**extra: Any) -> AgentRegistry:
    registry = AgentRegistry.with_builtins()
    for name, agent in extra.items():
        registry.register(name, agent)
    return registry


def _delta_index(event: Event) -> int:
    return int(event.data["text"].split(":", 1)[0])


async def test_outbox_bound_stops_a_runaway_agent_without_losing_or_reordering(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "rw.db"
    stall = StoreStall(db_path)
    emitted = 0

    async def runaway(ctx: RunContext) -> str:
        nonlocal emitted
        for i in range(RUNAWAY_DELTAS):
            if i == STALL_AT:
                await stall.hold()
            await ctx.delta(_chunk(i, RUNAWAY_CHARS))
            emitted += 1
        return "ran away"

    settings = make_settings(sqlite_url(db_path), send_queue_bytes=64 * 1024)
    async with serve_runtime(settings, agents=_agents(runaway=runaway)) as live:
        # A client that reads its run_accepted and then nothing, through a tiny receive buffer.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", live.port))
        slow = await ws_connect(live.ws_url, sock=sock, max_size=None, max_queue=1)
        await slow.send(Connect(live.token("slow")).serialize())
        assert json.loads(await slow.recv())["type"] == "connected"
        await slow.send(Chat("go", "r1", agent="runaway").serialize())
        accepted = json.loads(await slow.recv())
        assert accepted["type"] == "run_accepted"
        run_id = accepted["run_id"]

        depths: list[float] = []
        sampling = True

        async def sample() -> None:
            while sampling:
                depths.append(live.metric("runwatch_audit_queue_depth"))
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample())
        reader = AuditStore.open(sqlite_url(db_path))
        try:
            # The store stalls: the agent may fill its outbox, then it must wait. Release once
            # it has stopped advancing, or has run past the bound, or after 0.8 s at most.
            await asyncio.wait_for(stall.held.wait(), 30 * scale())
            at_hold = last = emitted
            loop = asyncio.get_running_loop()
            began = still_since = loop.time()
            while loop.time() - began < 0.8 and emitted - at_hold <= QUEUE_BOUND:
                await asyncio.sleep(0.01)
                if emitted != last:
                    last, still_since = emitted, loop.time()
                elif loop.time() - still_since >= 0.2:
                    break
            ran_ahead = emitted - at_hold
            await stall.release()

            async def ended() -> bool:
                info = await reader.get_run(run_id)
                return info is not None and info.ended_us is not None

            # The run completes although its only client does not read.
            await wait_until(ended, 60, interval=0.05)
            stored = await reader.run_events(run_id)
        finally:
            sampling = False
            await sampler
            await reader.close()

        # The agent was held back: it never ran far ahead of the stalled store.
        assert ran_ahead <= QUEUE_BOUND, ran_ahead
        assert max(depths) <= QUEUE_BOUND, max(depths)
        # The store has every event, contiguous and in emission order.
        assert_valid(stored)
        assert stored[-1].type == EventType.AGENT_COMPLETED
        deltas = [e for e in stored if e.type == EventType.TEXT_DELTA]
        assert [_delta_index(e) for e in deltas] == list(range(RUNAWAY_DELTAS))

        # The silent client was cut off as a slow consumer; what it got is a prefix, in order.
        assert live.metric("runwatch_disconnects_total", {"code": "4008"}) == 1
        got: list[Event] = []
        with pytest.raises(WsClosed) as closed:
            while True:
                frame = json.loads(await asyncio.wait_for(slow.recv(), 10 * scale()))
                if "seq" in frame:
                    got.append(Event.from_dict(frame))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
        sock.close()
        assert [e.seq for e in got] == list(range(1, len(got) + 1))

        # Resuming after what it got completes the run: every seq once, in order, as stored.
        client = await live.client("slow")
        resumed = await client.resume(run_id, len(got))
        rest = await resumed.wait(30 * scale())
        assert got + rest == stored


async def test_cancel_during_a_burst_ends_the_run_contiguous_and_closed(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "rw.db")
    async with serve_runtime(make_settings(db), agents=_agents(burst=burst_agent)) as live:
        client = await live.client("alice")
        run = await client.chat("pour", agent="burst")
        await wait_until(lambda: len(run.events) >= 1000, 30)
        await client.cancel(run.run_id)
        events = await run.wait(10 * scale())

        reader = AuditStore.open(db)
        try:
            info = await reader.get_run(run.run_id)
            stored = await reader.run_events(run.run_id)
        finally:
            await reader.close()

    assert events[-1].type == EventType.AGENT_ERROR
    assert events[-1].data["code"] == "cancelled"
    # Seqs contiguous, one terminal and last, the open tool call closed (I1, I2, I4).
    assert_valid(events)
    (wait_done,) = [e for e in events if e.type == EventType.TOOL_COMPLETED]
    assert wait_done.data["status"] == "error"
    deltas = [e for e in events if e.type == EventType.TEXT_DELTA]
    assert [_delta_index(e) for e in deltas] == list(range(len(deltas)))
    # The store holds exactly what the client got: nothing after the terminal event.
    assert info is not None and info.outcome == "cancelled"
    assert stored == events


async def test_sigkill_during_a_burst_loses_no_event_a_client_received(
    tmp_path: Path, db_url: str
) -> None:
    env = {"RUNWATCH_DATABASE_URL": db_url, "RUNWATCH_JWT_SECRET": JWT_SECRET}
    server = start_server_process(tmp_path, env, command="runtime", args=["--agent", FLOOD])
    try:
        client = RunwatchClient(server.ws_url, make_token("alice"), reconnect=False)
        await client.connect()
        run = await client.chat("flood 100000 100", agent="flood")
        await wait_until(lambda: len(run.events) >= 1000, 30)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        # Read everything the server wrote before it died, up to the close.
        with pytest.raises(ConnectionClosed):
            await run.wait(10 * scale())
        await client.close()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    received = list(run.events)
    assert not run.done, "the burst was still running when the server was killed"

    store = AuditStore.open(db_url)
    try:
        stored = {e.seq: e for e in await store.run_events(run.run_id)}
    finally:
        await store.close()
    # I6: every event a client received is in the store, identical (id, type, data, ts).
    missing = [e.seq for e in received if stored.get(e.seq) != e]
    assert not missing, f"{len(missing)} received events not in the store, first {missing[:5]}"


PROBE_RUNS = 16
PROBES_PER_RUN = 3


async def test_a_tool_runs_only_after_its_tool_executing_is_committed(db_url: str) -> None:
    reader = AuditStore.open(db_url)
    seen: list[tuple[str, bool]] = []

    async def probe(run_id: str, nonce: str) -> str:
        """The tool's side effect: look in the store for its own ``tool_executing``."""
        events = await reader.run_events(run_id)
        committed = any(
            e.type == EventType.TOOL_EXECUTING and e.data["args"].get("nonce") == nonce
            for e in events
        )
        seen.append((nonce, committed))
        return "looked"

    tools = builtin_tools()
    tools.register(
        Tool(
            "probe",
            "Reports whether its own tool_executing is in the store.",
            probe,
            {
                "type": "object",
                "properties": {"run_id": {"type": "string"}, "nonce": {"type": "string"}},
                "required": ["run_id", "nonce"],
            },
        )
    )

    async def prober(ctx: RunContext) -> str:
        for i in range(PROBES_PER_RUN):
            for _ in range(10):
                await ctx.delta(".")
            await ctx.tool("probe", {"run_id": ctx.run_id, "nonce": f"{ctx.run_id}/{i}"})
        return "probed"

    settings = make_settings(db_url, chat_burst=1000)
    agents = _agents(prober=prober, flood=flood_agent)
    try:
        async with serve_runtime(settings, agents=agents, tools=tools) as live:
            clients = [await live.client(f"user{i}") for i in range(4)]
            # Other runs keep the writer busy while the probes run.
            floods = [await c.chat("flood 500 100", agent="flood") for c in clients]
            probes = [
                await clients[i % len(clients)].chat(f"probe {i}", agent="prober")
                for i in range(PROBE_RUNS)
            ]
            done = await asyncio.gather(*(r.wait(60 * scale()) for r in floods + probes))
    finally:
        await reader.close()

    assert all(events[-1].type == EventType.AGENT_COMPLETED for events in done)
    assert len(seen) == PROBE_RUNS * PROBES_PER_RUN
    assert [nonce for nonce, committed in seen if not committed] == []
