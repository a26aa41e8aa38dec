"""Fault injection on the audit write path, over real SQLite and PostgreSQL.

Each fault is real: data the database refuses (a NUL, a lone surrogate, a constraint), a full
disk (a small tmpfs), a held lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``LOCK TABLE``), a
statement timeout, an exhausted pool, a connection cut right after ``COMMIT`` (the fault
proxy). Each test checks what a user would: no event a client received is missing from the
store or different there, every run ends, other users keep working, and the readiness and
metric signals move. Each prints one row: fault, events sent, received, stored, lost, runs
unended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from runtime.agents import AgentRegistry
from runtime.client import RunwatchClient
from runtime.events import ErrorCode, Event, EventType, now_us
from runtime.lifecycle import RunLifecycle
from runtime.metrics import EVENT_TYPES
from runtime.protocol import Chat
from runtime.store.audit import AuditStore, Batch, ConnectionOpen
from runtime.store.errors import StoreRejected, StoreUnavailable, storable, translate
from runtime.store.journal import Journal, JournalError
from runtime.store.migrate import upgrade
from runtime.store.models import ConnectionRow

from .conftest import LiveServer, make_settings, open_ws, serve_runtime, sqlite_url, wait_until
from .faultproxy import FaultProxy
from .invariants import assert_valid

PG_DSN = "postgresql://postgres@127.0.0.1:5432/"


def _dsn(url: str) -> str:
    return PG_DSN + url.rsplit("/", 1)[1]


async def _pg(url: str, sql: str) -> None:
    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def tally(fault: str, live: LiveServer, clients: list[RunwatchClient], url: str) -> None:
    """Compare what clients received with the store; print the row; assert nothing is lost."""
    sent = sum(live.metric("runwatch_events_sent_total", {"type": t}) for t in EVENT_TYPES)
    received = [e for c in clients for r in c.runs.values() for e in r.events]
    store = AuditStore.open(url)
    try:
        stored: dict[str, list[Event]] = {}
        for run_id in {e.run_id for e in received}:
            stored[run_id] = await store.run_events(run_id)
            assert_valid(stored[run_id])
        lost = sum(1 for e in received if e not in stored[e.run_id])
        unended = len(await store.open_runs())
    finally:
        await store.close()
    n_stored = sum(len(v) for v in stored.values())
    print(
        f"\nFAULT | {fault} | sent {sent:.0f} | received {len(received)} | stored {n_stored}"
        f" | lost {lost} | unended {unended}"
    )
    assert lost == 0, "every event a client received is in the store, unchanged"
    assert unended == 0, "every run ended"


async def _ready(live: LiveServer) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{live.http_url}/readyz", timeout=5)).status_code


# ---- data the store refuses ----------------------------------------------------------------


async def test_an_unstorable_connection_record_is_isolated_and_stored_cleaned(
    db_url: str, tmp_path: Path
) -> None:
    url = db_url
    backend = url.split("+", 1)[0]
    async with serve_runtime(make_settings(url, data_dir=str(tmp_path / "d"))) as live:
        alice = await live.client("alice")
        bob = await live.client("bob")
        # A NUL (PostgreSQL refuses it) and a lone surrogate (neither driver encodes it) in
        # the optional `client` of one user's connection, queued with everyone's records.
        bad = ConnectionOpen("conn-bad", "mallory", "test", "x\x00y\ud800z", now_us())
        live.rt.deliveries.connection_opened(bad)
        runs = [await alice.chat("what is 3*7"), await bob.chat("hello")]
        for run in runs:
            await run.wait(20)
        await live.rt.writer.flush(10)
        assert live.rt.writer.restarts == 0
        assert not live.rt.writer.degraded, "a refused record never holds the store in journal"
        assert live.metric("runwatch_audit_rejected_total", {"kind": "record"}) == 1
        assert await _ready(live) == 200
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                client = (
                    await conn.execute(
                        select(ConnectionRow.client).where(
                            ConnectionRow.connection_id == "conn-bad"
                        )
                    )
                ).scalar_one()
        finally:
            await engine.dispose()
        assert client == storable("x\x00y\ud800z") == "x\ufffdy\ufffdz"
        await tally(f"{backend}: NUL + surrogate in connect.client", live, [alice, bob], url)


async def test_a_refused_event_gets_a_stand_in_and_its_run_ends(
    db_url: str, tmp_path: Path
) -> None:
    url = db_url
    backend = url.split("+", 1)[0]
    # The database refuses any event whose data holds the word "poison" (a real constraint).
    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(tmp_path / "runwatch.db")) as db:
            db.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.data LIKE '%poison%' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
            db.commit()
    else:
        await _pg(
            url,
            "ALTER TABLE events ADD CONSTRAINT no_poison CHECK (data::text NOT LIKE '%poison%')",
        )
    async with serve_runtime(make_settings(url, data_dir=str(tmp_path / "d"))) as live:
        alice = await live.client("alice")
        bob = await live.client("bob")
        poisoned = await alice.chat("wait 5 poison")
        other = await bob.chat("what is 6*7")
        events = await poisoned.wait(20)
        await other.wait(20)
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), "no seq gap"
        assert events[0].type == EventType.AGENT_STARTED
        assert "poison" not in str(events[0].data), "the stand-in withholds the content"
        terminal = events[-1]
        assert terminal.type == EventType.AGENT_ERROR
        assert terminal.data["code"] == ErrorCode.INTERNAL.value
        assert other.terminal is not None and other.terminal.type == EventType.AGENT_COMPLETED
        assert live.metric("runwatch_audit_rejected_total", {"kind": "event"}) >= 1
        assert live.rt.writer.restarts == 0 and not live.rt.writer.degraded
        await tally(f"{backend}: event refused by a constraint", live, [alice, bob], url)


async def test_a_chat_the_store_refuses_is_answered_invalid_message(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "runwatch.db")
    await asyncio.to_thread(upgrade, url)
    # The database refuses any run whose client_msg_id says "refuse" (a real constraint).
    with contextlib.closing(sqlite3.connect(tmp_path / "runwatch.db")) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON runs WHEN NEW.client_msg_id LIKE 'refuse%' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        db.commit()
    async with serve_runtime(make_settings(url, data_dir=str(tmp_path / "d"))) as live:
        # The run accepted below is not read: open_ws's unbounded queue lets close() finish.
        ws = await open_ws(live.ws_url, live.token("alice"))
        await ws.send(Chat("hello", "refuse-1").serialize())
        answer = json.loads(await ws.recv())
        # Retrying cannot help: not "rate_limited" (retry shortly) but invalid_message.
        assert answer["type"] == "error" and answer["code"] == "invalid_message", answer
        assert answer["ref"] == "refuse-1"
        await ws.send(Chat("hello", "ok-1").serialize())
        accepted = json.loads(await ws.recv())
        assert accepted["type"] == "run_accepted", accepted
        await ws.close()


# ---- timeouts, pools, locks ------------------------------------------------------------------


async def test_statement_timeout_and_pool_exhaustion_are_transient(pg_url: str) -> None:
    # asyncpg's command timeout raises a TimeoutError with an empty message.
    assert isinstance(translate(TimeoutError()), StoreUnavailable)
    assert isinstance(translate(ValueError("surrogates not allowed")), StoreRejected)
    engine = create_async_engine(
        pg_url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.3,
        connect_args={"command_timeout": 0.5},
    )
    store = AuditStore(engine)
    holder = await asyncpg.connect(_dsn(pg_url))
    try:
        await holder.execute("BEGIN; LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable) as slow:
            await store.write(Batch(settles=[("r", 1)]), 1)
        assert slow.value.reason == "timeout"
        await holder.execute("ROLLBACK")
        async with engine.connect():  # the only pooled connection, held
            with pytest.raises(StoreUnavailable) as pool:
                await store.active_runs("alice")
            assert pool.value.reason == "timeout"
        assert await store.run_events("r", 2**31) == []  # no int4 overflow
    finally:
        await holder.close()
        await store.close()


@contextlib.contextmanager
def sqlite_write_lock(path: Path, hold: threading.Event) -> Iterator[None]:
    """Another process's writer: BEGIN IMMEDIATE held until ``hold`` is set."""
    locked = threading.Event()

    def run() -> None:
        db = sqlite3.connect(path, timeout=5, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        hold.wait(60)
        db.execute("ROLLBACK")
        db.close()

    thread = threading.Thread(target=run)
    thread.start()
    locked.wait(10)
    try:
        yield
    finally:
        hold.set()
        thread.join(10)


async def test_a_held_lock_degrades_to_the_journal_in_about_a_second(
    db_url: str, tmp_path: Path
) -> None:
    url = db_url
    backend = url.split("+", 1)[0]
    async with serve_runtime(make_settings(url, data_dir=str(tmp_path / "d"))) as live:
        alice = await live.client("alice")
        run = await alice.chat("wait 6")
        await wait_until(lambda: len(run.events) >= 3, 10)
        release = threading.Event()
        holder: asyncpg.Connection | None = None
        lock = contextlib.nullcontext()
        if backend == "sqlite":
            lock = sqlite_write_lock(tmp_path / "runwatch.db", release)  # type: ignore[assignment]
        else:
            holder = await asyncpg.connect(_dsn(url))
            await holder.execute("BEGIN; LOCK TABLE events, runs IN ACCESS EXCLUSIVE MODE")
        with lock:
            seen = len(run.events)
            started = time.monotonic()
            # Events keep flowing (through the journal) within about a second of the lock.
            await wait_until(lambda: len(run.events) > seen, 3)
            first_after = time.monotonic() - started
            # Another user connects and gets an answer, not a frozen socket or a 1006.
            t0 = time.monotonic()
            bob = await live.client("bob")
            connect_s = time.monotonic() - t0
            await bob.ping(5)
            # Two more thinking steps (a second apart) go through the journal meanwhile.
            journaled = len(run.events)
            await wait_until(lambda: len(run.events) >= journaled + 2, 5)
            assert live.rt.writer.degraded
            assert await _ready(live) == 200, "the journal is progress: still ready"
        if holder is not None:
            await holder.execute("ROLLBACK")
            await holder.close()
        await run.wait(20)
        await wait_until(lambda: not live.rt.writer.degraded, 20)
        after = await bob.chat("what is 2+2")
        await after.wait(20)
        assert first_after < 2.5 and connect_s < 5
        await tally(f"{backend}: store locked by another writer", live, [alice, bob], url)


# ---- outages and the journal -------------------------------------------------------------


async def _surrogate_agent(ctx: Any) -> str:
    for i in range(6):
        await ctx.think(f"step {i} \ud800 lone surrogate")
        await asyncio.sleep(0.5)
    return "done \udfff"


async def test_an_event_with_a_lone_surrogate_survives_the_journal(
    pg_url: str, tmp_path: Path
) -> None:
    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    agents = AgentRegistry.with_builtins()
    agents.register("surrogate", _surrogate_agent)
    try:
        settings = make_settings(url, data_dir=str(tmp_path / "d"))
        async with serve_runtime(settings, agents=agents) as live:
            alice = await live.client("alice")
            run = await alice.chat("go", agent="surrogate")
            await wait_until(lambda: len(run.events) >= 2, 10)
            proxy.down()
            await wait_until(lambda: live.metric("runwatch_audit_journal_depth") > 0, 10)
            # More surrogate steps (0.5 s apart) go through the journal to alice meanwhile.
            down = len(run.events)
            await wait_until(lambda: len(run.events) >= down + 2, 10)
            proxy.up()
            await run.wait(20)
            await wait_until(lambda: not live.rt.writer.degraded, 20)
            assert live.rt.writer.restarts == 0
            await tally("postgresql: surrogate event journaled in an outage", live, [alice], pg_url)
    finally:
        await proxy.stop()


@contextlib.asynccontextmanager
async def small_disk(path: Path, size: str = "256k") -> AsyncIterator[bool]:
    """A tmpfs of ``size`` at ``path``; yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> Path:
    """Fill the disk at ``path`` to the last byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0"):
                pass
    finally:
        os.close(fd)
    return filler


async def _chatty_agent(ctx: Any) -> str:
    for i in range(40):
        await ctx.think(f"{i} " + "y" * 2000)
        await asyncio.sleep(0.2)
    return "done"


async def test_journal_disk_full_during_an_outage_events_wait_and_nothing_is_lost(
    pg_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "disk"
    async with small_disk(data) as mounted:
        proxy = FaultProxy("127.0.0.1", 5432)
        await proxy.start()
        url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        settings = make_settings(
            url, data_dir=str(data), journal_max_bytes=(1 << 30) if mounted else 4096
        )
        agents = AgentRegistry.with_builtins()
        agents.register("chatty", _chatty_agent)
        try:
            async with serve_runtime(settings, agents=agents) as live:
                live.rt.writer.stall_after_s = 1.0
                alice = await live.client("alice")
                run = await alice.chat("go", agent="chatty")
                await wait_until(lambda: len(run.events) >= 3, 10)
                proxy.down()
                await wait_until(lambda: live.metric("runwatch_audit_journal_depth") > 0, 10)
                filler = _fill(data) if mounted else None
                await wait_until(lambda: live.metric("runwatch_audit_journal_errors_total") > 0, 10)
                await wait_until(lambda: live.metric("runwatch_audit_writer_stalled") == 1, 10)
                assert await _ready(live) == 503
                held = len(run.events)
                # The agent goes on (a step every 0.2 s): its events wait for the writer.
                queued = live.metric("runwatch_audit_queue_depth")
                await wait_until(lambda: live.metric("runwatch_audit_queue_depth") >= queued + 3)
                assert len(run.events) == held, "nothing is sent that is not durable"
                if filler is not None:
                    filler.unlink()
                proxy.up()
                await run.wait(30)
                await wait_until(lambda: not live.rt.writer.degraded, 20)
                await wait_until(lambda: live.metric("runwatch_audit_writer_stalled") == 0, 10)
                assert await _ready(live) == 200
                assert live.rt.writer.restarts == 0
                fault = "tmpfs full" if mounted else "journal bound full"
                await tally(f"postgresql outage + {fault}", live, [alice], pg_url)
        finally:
            await proxy.stop()


async def test_a_torn_journal_append_is_never_acknowledged(tmp_path: Path) -> None:
    lc = RunLifecycle("r1", "t1", "demo", lambda: 1_700_000_000_000_000)
    async with small_disk(tmp_path / "disk", "64k") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not allowed here (the bound test covers JournalFull)")
        journal = Journal(tmp_path / "disk" / "j.jsonl", 1 << 30)
        acked: list[Event] = [lc.started("x")]
        await journal.append([(acked[0], True)], 7)
        with pytest.raises(JournalError):
            while True:
                # ~5 KiB per append: the last one is torn by the full disk.
                event = lc.thinking("x" * 5000)
                await journal.append([(event, True)], 7)
                acked.append(event)
        assert journal.path.stat().st_size == journal.size, "the torn bytes were cut off"
        reopened = Journal(journal.path, 1 << 30)
        assert [e.event for e in reopened.pending(1000)] == acked
        assert reopened.corrupt == 0


async def test_journal_damage_before_valid_records_is_reported_not_dropped(
    tmp_path: Path,
) -> None:
    lc = RunLifecycle("r1", "t1", "demo", lambda: 1_700_000_000_000_000)
    path = tmp_path / "j.jsonl"
    journal = Journal(path, 1 << 20)
    events = [lc.started("a"), lc.thinking("b"), lc.thinking("c")]
    for e in events:
        await journal.append([(e, True)], 1)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"b"', b'"B"')  # bit rot in an acknowledged record
    path.write_bytes(b"".join(lines) + b'0badc0de {"event"')  # and a torn tail
    reopened = Journal(path, 1 << 20)
    assert [e.event for e in reopened.pending(10)] == [events[0], events[2]]
    assert reopened.corrupt == 1
    assert list(tmp_path.glob("j.jsonl.corrupt-*")), "the damaged file is kept for the operator"
    assert not path.read_bytes().endswith(b'{"event"'), "the torn tail is cut off"


# ---- ambiguous commits, the writer's own failures, shutdown ----------------------------------


async def test_a_run_whose_commit_answer_was_lost_starts_and_ends(
    pg_url: str, tmp_path: Path
) -> None:
    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    try:
        async with serve_runtime(make_settings(url, data_dir=str(tmp_path / "d"))) as live:
            alice = await live.client("alice")
            proxy.cut_after = (b"INSERT INTO runs", b"COMMIT")
            run = await alice.chat("what is 5*5", timeout=20)
            assert proxy.cuts == 1
            assert not run.duplicate
            events = await run.wait(20)
            assert events[-1].type == EventType.AGENT_COMPLETED
            again = await alice.chat("ignored", client_msg_id="m-1")
            await again.wait(20)
            await tally("postgresql: connection cut after COMMIT", live, [alice], pg_url)
    finally:
        await proxy.stop()


async def test_the_writer_restarts_after_an_unknown_error_and_loses_nothing(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path / "rw.db")
    async with serve_runtime(make_settings(url, data_dir=str(tmp_path / "d"))) as live:
        writer = live.rt.writer
        failures = [RuntimeError("clock broke")]

        def clock() -> int:
            if failures:
                raise failures.pop()
            return now_us()

        writer.clock_us = clock  # the injected clock fails once, mid-commit
        alice = await live.client("alice")
        run = await alice.chat("what is 9*9")
        events = await run.wait(20)
        assert events[-1].type == EventType.AGENT_COMPLETED
        assert writer.restarts == 1 and writer.running
        assert live.metric("runwatch_audit_writer_restarts_total") == 1
        assert writer.status()["last_error"] == "RuntimeError: clock broke"
        await tally("sqlite: writer crash (unknown error)", live, [alice], url)


async def test_shutdown_is_bounded_and_claims_nothing_it_did_not_write(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = make_settings(url, data_dir=str(tmp_path / "d"), drain_s=0.5)
    try:
        async with serve_runtime(settings) as live:
            live.rt.writer.journal = None  # no journal: events can only wait for the store
            alice = await live.client("alice")
            run = await alice.chat("wait 30")
            await wait_until(lambda: len(run.events) >= 2, 10)
            proxy.down()
            # Events committed before the cut are on alice's socket ahead of this pong.
            await alice.ping(5)
            received = len(run.events)
            started = time.monotonic()
            await live.rt.shutdown()
            took = time.monotonic() - started
            assert took < 0.5 + 10 + 5 + 3, f"shutdown took {took:.1f}s"
            assert "could not be written" in caplog.text
            assert len(run.events) == received, "nothing unwritten was sent"
        proxy.up()
        # The next start ends the run (I8) with what the store holds.
        async with serve_runtime(make_settings(pg_url, data_dir=str(tmp_path / "d"))) as again:
            store = again.rt.store
            stored = await store.run_events(run.run_id)
            assert stored[-1].data.get("code") == ErrorCode.RUNTIME_RESTARTED.value
            assert all(e in stored for e in run.events)
            assert await store.open_runs() == []
        print(
            f"\nFAULT | postgresql down at SIGTERM, no journal | received {received}"
            f" | stored {len(stored)} | lost 0 | unended 0 | shutdown {took:.1f}s"
        )
    finally:
        await proxy.stop()


async def test_resume_past_int32_answers_without_a_store_error(pg_url: str, tmp_path: Path) -> None:
    async with serve_runtime(make_settings(pg_url, data_dir=str(tmp_path / "d"))) as live:
        alice = await live.client("alice")
        run = await alice.chat("hello")
        await run.wait(20)
        resumed = await alice.resume(run.run_id, 2**31)
        assert resumed.events == run.events  # nothing past 2^31 to replay; no error
        assert live.metric("runwatch_resumes_total", {"result": "ok"}) == 1
        assert live.metric("runwatch_audit_write_errors_total") == 0
