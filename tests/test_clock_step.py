"""Issue #11 item 7, clock steps: a forward wall-clock step of 6 minutes (more than a run's
timeout plus the stuck grace) while runs are open must not make the embedded monitor record
``stuck`` or ``tool_pairing`` violations for healthy runs. ``runwatch serve`` runs under
libfaketime; the step is written to its FAKETIME_TIMESTAMP_FILE partway through a run, and the
monotonic clock is left alone, as an NTP step leaves it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from runtime.client import RunwatchClient
from runtime.events import EventType

from .conftest import make_token, sqlite_url, start_server_process, wait_until

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def violations(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT run_id, rule FROM violations"))


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
        async with RunwatchClient(server.ws_url, make_token("alice", "x" * 40)) as client:
            runs = [await client.chat(f"wait 3 #{i}") for i in range(2)]
            for run in runs:
                await wait_until(
                    lambda r=run: any(e.type == EventType.TOOL_EXECUTING for e in r.events), 10
                )
            step.write_text("+6m\n")  # the wall clock jumps six minutes ahead
            await asyncio.sleep(1.5)  # several monitor passes see the open runs after it
            for run in runs:
                events = await run.wait(20)
                assert events[-1].type == EventType.AGENT_COMPLETED
            ids = {r.run_id for r in runs}
            # Several more monitor passes (0.5 s apart) over the ended runs: none is stuck.
            await asyncio.sleep(2)
            assert [v for v in violations(db) if v[0] in ids] == []
    finally:
        server.proc.terminate()
        server.proc.wait(20)
