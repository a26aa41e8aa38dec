"""Store outage: PostgreSQL unreachable under load, through a fault-injecting TCP proxy.

No event is lost: events go to the local journal (fsynced; it counts as persisted), delivery
goes on, and the journal drains into the store in order when PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import httpx
import pytest

from runtime.client import RunwatchClient, RunwatchError
from runtime.events import Event
from runtime.store.audit import AuditStore
from runtime.store.journal import Journal

from .conftest import make_settings, serve_runtime, wait_until
from .faultproxy import FaultProxy
from .invariants import assert_valid

#: The outage lasts at least this long (a soak: RUNWATCH_TEST_OUTAGE_S=30); by default it
#: ends as soon as it has shown what it is for (``outage_shown`` in the test).
OUTAGE_S = float(os.environ.get("RUNWATCH_TEST_OUTAGE_S", "0"))
#: Failed writes the outage must see once the journal took over: the writer keeps probing
#: the store with a growing delay (0.05 s doubling), and finds it down each time.
FAILED_WRITES = 6
PROMPTS = ("wait 2", "what is 3*7", "fail tool", "hello", "what time is it")


async def _load(
    client: RunwatchClient, stop: asyncio.Event, received: list[Event], accepted: list[float]
) -> int:
    """Chat until told to stop; ``accepted`` gets the time of every chat the server took."""
    runs = 0
    i = 0
    while not stop.is_set():
        i += 1
        try:
            run = await client.chat(PROMPTS[i % len(PROMPTS)])
        except RunwatchError as exc:
            assert exc.code == "rate_limited"  # the store is down: retry later
            await asyncio.sleep(0.5)
            continue
        accepted.append(time.monotonic())
        received.extend(await run.wait(60))
        runs += 1
    return runs


@pytest.mark.slow
async def test_postgres_outage_under_load_loses_nothing(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "runwatch.server")
    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = make_settings(url, data_dir=str(tmp_path / "data"), chat_burst=1000)
    try:
        async with serve_runtime(settings) as live:
            live.rt.writer.fallback_after_s = 0.5
            clients = [await live.client(f"u{i}") for i in range(10)]
            received: list[Event] = []
            accepted: list[float] = []
            stop = asyncio.Event()
            load = [asyncio.create_task(_load(c, stop, received, accepted)) for c in clients]
            # A long run in flight across the outage: its events keep arriving. It thinks
            # once a second until it is cancelled once the store is back.
            watcher = await live.client("watcher")
            long_run = await watcher.chat("wait 60")

            def seen() -> int:
                return sum(len(r.events) for c in [*clients, watcher] for r in c.runs.values())

            def failed_writes() -> float:
                return live.metric("runwatch_audit_write_errors_total")

            # The load is under way: every client had a run accepted, the long run thinks.
            await wait_until(lambda: len(accepted) >= len(clients) and len(long_run.events) >= 3)
            before = seen()
            proxy.down()
            outage_started = time.monotonic()
            await wait_until(lambda: live.metric("runwatch_audit_store_up") == 0, 20)
            await wait_until(lambda: live.metric("runwatch_audit_journal_depth") > 0, 20)
            # Health says so, and says why in the log.
            async with httpx.AsyncClient() as http:
                health = await http.get(f"{live.http_url}/healthz", timeout=30)
            assert health.status_code == 503, health.text
            assert health.json()["store"] == "unavailable"
            assert "healthz: the audit store did not answer" in caplog.text
            during_start = seen()
            long_run_at = len(long_run.events)
            writes_failed_at = failed_writes()

            def outage_shown() -> bool:
                """The live run got more events through the journal, the writer probed the
                store again and again and found it down, and OUTAGE_S has passed."""
                return (
                    len(long_run.events) >= long_run_at + 3
                    and failed_writes() >= writes_failed_at + FAILED_WRITES
                    and time.monotonic() - outage_started >= OUTAGE_S
                )

            await wait_until(outage_shown, OUTAGE_S + 60)
            delivered_during = seen() - during_start
            journal_peak = live.metric("runwatch_audit_journal_depth")
            proxy.up()
            await wait_until(lambda: not live.rt.writer.degraded, 60)
            # Chats are taken again, from every client, with the journal drained.
            back = time.monotonic()
            await wait_until(lambda: sum(t > back for t in accepted) >= len(clients), 30)
            stop.set()
            runs = sum(await asyncio.gather(*load)) + 1
            await watcher.cancel(long_run.run_id)
            received.extend(await long_run.wait(60))
            await live.rt.writer.flush(30)
            assert live.metric("runwatch_audit_store_up") == 1
            assert live.metric("runwatch_audit_journal_depth") == 0
            assert live.metric("runwatch_audit_write_errors_total") > 0
            journal = live.rt.writer.journal
            assert journal is not None and len(journal) == 0
            assert journal.path.stat().st_size == 0
            outage_s = back - outage_started
    finally:
        await proxy.stop()

    assert delivered_during > 0, "delivery went on during the outage"
    store = AuditStore.open(pg_url)
    try:
        assert await store.open_runs() == [], "every run ended in the store"
        by_run: dict[str, list[Event]] = {}
        for event in received:
            by_run.setdefault(event.run_id, []).append(event)
        lost = 0
        for run_id, events in by_run.items():
            stored = await store.run_events(run_id)
            assert_valid(stored)
            lost += sum(1 for e in events if e not in stored)
        assert lost == 0
    finally:
        await store.close()
    print(
        f"\noutage {outage_s:.1f}s: {runs} runs, {len(received)} events received "
        f"({before} before, {delivered_during} during the outage), journal peak "
        f"{journal_peak:.0f}, lost {lost}"
    )


async def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    from runtime.lifecycle import RunLifecycle

    lc = RunLifecycle("r1", "t1", "demo", lambda: 1_700_000_000_000_000)
    events = [lc.started("x"), lc.thinking("y")]
    journal = Journal(tmp_path / "j.jsonl", 1 << 20)
    await journal.append([(e, True) for e in events], 123)
    with (tmp_path / "j.jsonl").open("a") as f:
        f.write('{"event": {"type": "agent_th')  # a crash mid-append
    reopened = Journal(tmp_path / "j.jsonl", 1 << 20)
    assert [e.event for e in reopened.pending(10)] == events
    assert all(e.committed_us == 123 for e in reopened.pending(10))
    await reopened.drained(2)
    assert len(reopened) == 0 and (tmp_path / "j.jsonl").stat().st_size == 0


async def test_journal_is_bounded(tmp_path: Path) -> None:
    from runtime.lifecycle import RunLifecycle
    from runtime.store.journal import JournalFull

    lc = RunLifecycle("r1", "t1", "demo", lambda: 1_700_000_000_000_000)
    journal = Journal(tmp_path / "j.jsonl", 600)
    await journal.append([(lc.started("x"), True)], 1)
    with pytest.raises(JournalFull):
        await journal.append([(lc.thinking("y" * 1000), True)], 2)
    assert len(journal) == 1
