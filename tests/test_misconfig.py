"""Issue #11 item 6: every configuration mistake is one line on stderr and exit status 2.

Each case runs the real command in a subprocess, from a directory without a store, and asserts
exit 2, exactly one line on stderr, no traceback; ``check`` and ``purge`` never create a
database. ``--debug`` brings the traceback back.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.store.migrate import current_revision, head_revision, schema_behind, upgrade

RUNWATCH = str(Path(sys.executable).parent / "runwatch")
SECRET = "s" * 40


def run(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RUNWATCH_JWT_SECRET": SECRET}
    return subprocess.run(
        [RUNWATCH, *args],
        cwd=tmp_path,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def serve_args() -> list[str]:
    # Port 0: a misconfigured server exits before it serves, and a port chosen by the kernel
    # at bind time cannot be taken by another process first.
    return ["serve", "--host", "127.0.0.1", "--port", "0"]


CASES = {
    "malformed database url": (
        ["migrate"],
        {"RUNWATCH_DATABASE_URL": "nonsense"},
        "RUNWATCH_DATABASE_URL='nonsense': expected a database URL",
    ),
    "unsupported driver": (
        ["migrate"],
        {"RUNWATCH_DATABASE_URL": "mysql://x@db/runwatch"},
        "expected one of the drivers sqlite+aiosqlite, postgresql+asyncpg (got mysql)",
    ),
    "missing directory": (
        None,
        {"RUNWATCH_DATABASE_URL": "sqlite+aiosqlite:////nonexistent/dir/runwatch.db"},
        "/nonexistent/dir does not exist: create it",
    ),
    "unreachable database": (
        None,
        {"RUNWATCH_DATABASE_URL": "postgresql+asyncpg://postgres:pw@127.0.0.1:1/test"},
        "cannot use the audit store postgresql+asyncpg://postgres:***@127.0.0.1:1/test",
    ),
    "bad log level": (None, {"RUNWATCH_LOG_LEVEL": "loud"}, "RUNWATCH_LOG_LEVEL='loud'"),
    "short secret for token": (
        ["token", "--user", "alice"],
        {"RUNWATCH_JWT_SECRET": "short"},
        "at least 32 bytes long (make one with: openssl rand -hex 32)",
    ),
    "an agent module that is not there": (
        [*serve_args(), "--agent", "no_such_module:agent"],
        {},
        "--agent/--tool='no_such_module:agent': expected importable code",
    ),
    "a tool that is not there": (
        [*serve_args(), "--tool", "json:no_such_function"],
        {},
        "expected importable code",
    ),
    "check without a store here": (["check"], {}, "no audit store at"),
    "purge without a store here": (["purge", "--older-than", "30d"], {}, "no audit store at"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_misconfiguration_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    args, env, expected = CASES[case]
    done = run(tmp_path, args or serve_args(), env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("runwatch: ") and expected in lines[0]
    # No verb creates a database where none was asked for.
    assert not (tmp_path / "runwatch.db").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = run(tmp_path, ["--debug", "migrate"], {"RUNWATCH_DATABASE_URL": "nonsense"})
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_check_names_the_store_it_opened(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    env = {"RUNWATCH_DATABASE_URL": f"sqlite+aiosqlite:///{db}"}
    assert run(tmp_path, ["migrate"], env).returncode == 0
    done = run(tmp_path, ["check"], env)
    assert done.returncode == 0, done.stderr
    assert f"runwatch: checking sqlite+aiosqlite:///{db}" in done.stderr


def test_no_migrate_against_an_old_schema_refuses_to_start(tmp_path: Path) -> None:
    """``--no-migrate`` on a store an older runwatch made: one line saying what to run, exit
    2, instead of a server whose every write is refused as bad data."""
    db = tmp_path / "audit.db"
    url = f"sqlite+aiosqlite:///{db}"
    upgrade(url, "0002")
    done = run(tmp_path, [*serve_args(), "--no-migrate"], {"RUNWATCH_DATABASE_URL": url})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "runwatch: the audit store's schema is at revision 0002; this runwatch needs "
        f"{head_revision()}: run `runwatch migrate` first (or start without --no-migrate)"
    )
    assert current_revision(url) == "0002", "nothing was migrated"


def test_schema_behind_is_none_at_head_and_for_a_newer_schema(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    assert schema_behind(url) is not None and "no runwatch schema" in str(schema_behind(url))
    upgrade(url)
    assert schema_behind(url) is None
    # Another replica ran a newer runwatch's migration first (a rolling upgrade).
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_a_newer_runwatch'")
    assert schema_behind(url) is None
