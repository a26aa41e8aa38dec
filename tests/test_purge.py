"""``runwatch purge``: everything of a purged run goes in one transaction (events, deliveries,
the monitor's verdicts and violations), a few hundred runs per transaction; short durations
need --force; --dry-run deletes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import event, text

from runtime.events import Event, EventType, Receipt
from runtime.store import audit
from runtime.store.audit import AuditStore, Batch, RunInfo
from runtime.store.migrate import upgrade

from .conftest import sqlite_url


async def _seed(store: AuditStore, run_id: str, *, ended: bool) -> None:
    await store.create_run(
        RunInfo(run_id, "alice", f"t-{run_id}", "demo", f"m-{run_id}", "i", 1_000),
        new_thread=True,
    )
    kinds = [EventType.AGENT_STARTED, EventType.AGENT_THINKING]
    data: list[dict[str, object]] = [{"input": ""}, {"step": 1, "text": "x"}]
    if ended:
        kinds.append(EventType.AGENT_ERROR)
        data.append({"code": "internal", "message": "x", "retryable": True})
    events = [
        Event(kind, f"{run_id}-e{i}", run_id, f"t-{run_id}", i + 1, 2_000 + i, "demo", d)
        for i, (kind, d) in enumerate(zip(kinds, data, strict=True))
    ]
    receipts = [Receipt(e.event_id, run_id, e.seq, "c", "alice", 3_000) for e in events]
    await store.write(Batch(events=[(e, True) for e in events], receipts=receipts), 2_500)
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO verdicts (run_id, user_id, agent, thread_id, state, verdict, rules,"
                " violation_count, event_count, created_us, judged_us) VALUES (:r, 'alice',"
                " 'demo', 't', 'ended', 'fail', '[]', 1, 3, 1000, 5000)"
            ),
            {"r": run_id},
        )
        await conn.execute(
            text(
                "INSERT INTO violations (run_id, rule, message, seqs, event_ids, judged_us)"
                " VALUES (:r, 'thinking', 'x', '[]', '[]', 5000)"
            ),
            {"r": run_id},
        )


async def _count(store: AuditStore, table: str, run_id: str) -> int:
    async with store.engine.connect() as conn:
        res = await conn.execute(
            text(f"SELECT count(*) FROM {table} WHERE run_id = :r"), {"r": run_id}
        )
        return int(res.scalar_one())


TABLES = ("runs", "events", "deliveries", "verdicts", "violations")


async def test_purge_removes_everything_of_a_run_and_dry_run_nothing(store: AuditStore) -> None:
    await _seed(store, "old", ended=True)
    await _seed(store, "open", ended=False)
    dry = await store.purge(10_000, dry_run=True)
    assert dry == {"runs": 1, "events": 3, "deliveries": 3, "verdicts": 1, "violations": 1}
    assert [await _count(store, t, "old") for t in TABLES] == [1, 3, 3, 1, 1]
    done = await store.purge(10_000)
    assert done == dry
    assert [await _count(store, t, "old") for t in TABLES] == [0, 0, 0, 0, 0]
    # A run still open is never purged, whatever its age.
    assert [await _count(store, t, "open") for t in TABLES] == [1, 2, 2, 1, 1]


async def test_purge_commits_chunk_by_chunk_so_the_writer_is_never_locked_out_for_long(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long purge must not hold SQLite's write lock until it ends (the runtime's writer
    gives up on it after 250 ms and falls back to its journal): each chunk of runs commits."""
    monkeypatch.setattr(audit, "PURGE_CHUNK", 3)
    old = [f"old{i}" for i in range(7)]
    for run_id in old:
        await _seed(store, run_id, ended=True)
    await _seed(store, "open", ended=False)
    dry = await store.purge(10_000, dry_run=True)
    assert dry == {"runs": 7, "events": 21, "deliveries": 21, "verdicts": 7, "violations": 7}
    commits: list[int] = []
    listener = lambda _conn: commits.append(1)  # noqa: E731
    event.listen(store.engine.sync_engine, "commit", listener)
    try:
        done = await store.purge(10_000)
    finally:
        event.remove(store.engine.sync_engine, "commit", listener)
    assert done == dry
    # Three chunks (3, 3, 1 runs), then threads and connections: one transaction each.
    assert len(commits) == 4
    for run_id in old:
        assert [await _count(store, t, run_id) for t in TABLES] == [0, 0, 0, 0, 0]
    assert [await _count(store, t, "open") for t in TABLES] == [1, 2, 2, 1, 1]
    assert await store.purge(10_000) == dict.fromkeys(TABLES, 0), "again: nothing left"


def _runwatch(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "purge", *args],
        env={"RUNWATCH_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_purge_refuses_short_durations_without_force(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "rw.db")
    upgrade(url)
    refused = _runwatch(tmp_path, url, "--older-than", "0d")
    assert refused.returncode == 2
    assert "refusing to purge runs younger than 1h" in refused.stderr
    assert "Traceback" not in refused.stderr
    # A dry run deletes nothing, so it previews any duration without --force.
    dry = _runwatch(tmp_path, url, "--older-than", "0d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("runwatch: would purge 0 runs") and "rw.db" in dry.stdout
    # ... and says that the real purge would be refused.
    assert "without --dry-run this purge needs --force" in dry.stderr
    forced = _runwatch(tmp_path, url, "--older-than", "0d", "--dry-run", "--force")
    assert forced.returncode == 0 and "needs --force" not in forced.stderr
