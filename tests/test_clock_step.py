"""Issue #11 item 7, clock steps: a forward wall-clock step of 6 minutes (more than a run's
timeout plus the stuck grace) while runs are open must not make the embedded monitor record
``stuck`` or ``tool_pairing`` violations for healthy runs. ``runwatch serve`` runs under
libfaketime; the step is written to its FAKETIME_TIMESTAMP_FILE partway through a run, and the
monotonic clock is left alone, as an NTP step leaves it."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx
import pytest

from runtime.client import RunwatchClient
from runtime.events import EventType
from runtime.store.audit import AuditStore

from .conftest import make_token, sqlite_url, start_server_process, wait_until
from .invariants import assert_valid

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


STEP_S = 6 * 60


def violations(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT run_id, rule FROM violations"))


async def last_check(http: httpx.AsyncClient) -> float:
    """When the monitor last finished a pass, by the server's (stepped) wall clock."""
    text = (await http.get("/metrics")).text
    found = re.search(r"^runwatch_monitor_last_check_timestamp_seconds (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_forward_clock_step_makes_no_healthy_run_stuck(tmp_path: Path) -> None:
    if not LIBFAKETIME.exists():
        pytest.skip("libfaketime is not installed (Debian package faketime)")
    db = tmp_path / "runwatch.db"
    step = tmp_path / "faketime"
    step.write_text("+0\n")
    env = {
        "RUNWATCH_DATABASE_URL": sqlite_url(db),
        "RUNWATCH_JWT_SECRET": "x" * 40,
        "RUNWATCH_MONITOR_INTERVAL_S": "0.5",
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(step),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    server = start_server_process(tmp_path, env)
    try:
        async with (
            RunwatchClient(server.ws_url, make_token("alice", "x" * 40)) as client,
            httpx.AsyncClient(base_url=server.http_url, timeout=5) as http,
        ):
            runs = [await client.chat(f"wait 4 #{i}") for i in range(2)]
            for run in runs:
                await wait_until(
                    lambda r=run: any(e.type == EventType.TOOL_EXECUTING for e in r.events), 10
                )
            step.write_text("+6m\n")  # the wall clock jumps six minutes ahead
            stepped = time.time() + STEP_S
            # Monitor passes (0.5 s apart) over the open runs for a second after the step:
            # none may find them stuck (its clock is steady; the events' wall clock jumped).
            await wait_until(lambda: _after(last_check(http), stepped + 1.0), 10)
            assert not all(run.done for run in runs), "the passes saw the runs open"
            for run in runs:
                events = await run.wait(20)
                assert events[-1].type == EventType.AGENT_COMPLETED
            ids = {r.run_id for r in runs}
            assert [v for v in violations(db) if v[0] in ids] == []
            # An ended run is judged settle_s (10 s) after its end by the monitor's steady
            # clock, and the step makes these ends look six minutes younger: no verdict on
            # them comes within the test. What it will judge is checked on the stored runs.
            store = AuditStore.open(sqlite_url(db))
            try:
                for run_id in ids:

                    async def stored_end(run_id: str = run_id) -> bool:
                        info = await store.get_run(run_id)
                        return info is not None and info.ended_us is not None

                    await wait_until(stored_end, 10)
                    assert_valid(await store.run_events(run_id))
            finally:
                await store.close()
    finally:
        server.proc.terminate()
        server.proc.wait(20)


async def _after(value: Awaitable[float], when: float) -> bool:
    return await value >= when
