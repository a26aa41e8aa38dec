"""The runtime's one exception tree, and errors that must not be swallowed.

The tree: every exception class defined in ``runtime`` descends from
:class:`runtime.errors.RunwatchError`, the docstring of :mod:`runtime.errors` draws each one
under its real parent, and each renders its fields in one line. The swallowed errors: a run
whose terminal event the store refuses still ends (I8), over real SQLite and PostgreSQL; a
failing ``on_stop`` hook is logged and the others still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import pkgutil
import re
import socket
import sqlite3
from pathlib import Path

import asyncpg
import pytest

import runtime
from runtime import errors
from runtime.auth import TokenAuthority
from runtime.client import RunwatchClient
from runtime.client import RunwatchError as ClientRoot
from runtime.errors import (
    AuthError,
    CalculatorError,
    ConfigError,
    ConnectFailed,
    ConnectionClosed,
    JournalError,
    JournalFull,
    LeaseHeld,
    LifecycleError,
    LLMConfigError,
    LLMError,
    RunwatchError,
    ServerError,
    StoreRejected,
    StoreUnavailable,
    ToolArgumentError,
    ToolError,
    TracingConfigError,
)
from runtime.events import ErrorCode, EventType
from runtime.server import Runtime
from runtime.store.audit import AuditStore, Lease

from .conftest import LiveServer, make_settings, serve_runtime, sqlite_url, wait_until
from .invariants import assert_valid

# Alembic scripts: run by alembic with its own context, never imported as modules.
_NOT_IMPORTABLE = "runtime.store.migrations"


def _runtime_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the ``runtime`` package, by dotted name."""
    found: dict[str, type[BaseException]] = {}
    names = ["runtime"] + [
        info.name
        for info in pkgutil.walk_packages(runtime.__path__, "runtime.")
        if not info.name.startswith(_NOT_IMPORTABLE)
    ]
    for name in names:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("runtime")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_runtime_exception_descends_from_the_root() -> None:
    found = _runtime_exceptions()
    assert "runtime.errors.StoreError" in found and "runtime.errors.LeaseHeld" in found
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, RunwatchError))
    assert not outside, f"exceptions outside the tree rooted at RunwatchError: {outside}"


def _drawn_tree() -> dict[str, str | None]:
    """The tree drawn in ``runtime.errors``' docstring: each name and its drawn parent."""
    assert errors.__doc__ is not None
    block = errors.__doc__.split("Exceptions::", 1)[1].split("\n\n")[1]
    parents: dict[str, str | None] = {}
    by_column: dict[int, str] = {}
    for line in block.splitlines():
        branch = line.find("+-- ")
        if branch == -1:
            name = line.split()[0]
            if not parents:  # the root; other lines without a branch continue a description
                parents[name] = None
                by_column[line.index(name)] = name
            continue
        match = re.match(r"\+-- (\w+)", line[branch:])
        assert match, line
        name = match.group(1)
        parents[name] = by_column[branch - 1]
        by_column[branch + 4] = name
    return parents


def test_the_docstring_draws_every_exception_under_its_real_parent() -> None:
    drawn = _drawn_tree()
    rooted = {cls for cls in _runtime_exceptions().values() if issubclass(cls, RunwatchError)}
    assert set(drawn) == {cls.__name__ for cls in rooted}
    for cls in rooted:
        parent = next((b for b in cls.__bases__ if issubclass(b, RunwatchError)), None)
        assert drawn[cls.__name__] == (parent.__name__ if parent else None), cls


def test_the_modules_that_raise_them_re_export_the_same_classes() -> None:
    from runtime import agents, auth, client, config, lease, lifecycle, tools
    from runtime.agents import llm
    from runtime.store import errors as store_errors
    from runtime.store import journal
    from runtime.tools import builtin

    assert config.ConfigError is ConfigError and auth.AuthError is AuthError
    assert lifecycle.LifecycleError is LifecycleError and lease.LeaseHeld is LeaseHeld
    assert store_errors.StoreRejected is StoreRejected and journal.JournalFull is JournalFull
    assert agents.ToolError is ToolError and tools.ToolArgumentError is ToolArgumentError
    assert builtin.CalculatorError is CalculatorError and llm.LLMConfigError is LLMConfigError
    assert client.ServerError is ServerError and client.ConnectionClosed is ConnectionClosed
    # The SDK's old name for an error frame is the root now: `except RunwatchError` still
    # catches error frames.
    assert ClientRoot is RunwatchError and issubclass(ServerError, ClientRoot)


LEASE = Lease("replica-1", "holder", "box/boot/ns", 4242, 0, 1)

RENDERED = [
    (
        ConfigError("RUNWATCH_LOG_LEVEL", "loud", "one of debug, info"),
        "RUNWATCH_LOG_LEVEL='loud': expected one of debug, info",
    ),
    (
        ConfigError("RUNWATCH_JWT_SECRET", "hunter2", "at least 32 bytes long"),
        "RUNWATCH_JWT_SECRET='***': expected at least 32 bytes long",
    ),
    (
        ConfigError("RUNWATCH_DATABASE_URL", "postgresql+asyncpg://u:pw@db/x", "reachable"),
        "RUNWATCH_DATABASE_URL='postgresql+asyncpg://u:***@db/x': expected reachable",
    ),
    (
        TracingConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "is not supported"),
        "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported",
    ),
    (AuthError("token expired"), "unauthorized: token expired"),
    (
        LifecycleError("r1", "agent_started first", "agent_thinking"),
        "run r1: expected agent_started first, got agent_thinking",
    ),
    (
        StoreUnavailable("OperationalError: locked", reason="timeout"),
        "timeout: OperationalError: locked",
    ),
    (
        StoreRejected("IntegrityError: CHECK", reason="integrity"),
        "integrity: IntegrityError: CHECK",
    ),
    (JournalError("OSError: no space"), "journal io_error: OSError: no space"),
    (JournalFull(300, 256), "journal full: 300 of 256 bytes"),
    (
        LeaseHeld(LEASE, same_host=True),
        "instance id 'replica-1' is held by a live runwatch process (pid 4242 on this host); "
        "stop it, or give this process its own RUNWATCH_INSTANCE_ID (or leave it unset for a "
        "unique one)",
    ),
    (ToolError("calculator", "division by zero"), "calculator: division by zero"),
    (ToolArgumentError("wait", "missing argument 'seconds'"), "wait: missing argument 'seconds'"),
    (CalculatorError("division by zero"), "division by zero"),
    (LLMError("refused", status=429), "HTTP 429: refused"),
    (LLMConfigError("RUNWATCH_LLM_MODEL", "is not set"), "RUNWATCH_LLM_MODEL is not set"),
    (ServerError("not_found", "no such run", "run-1"), "not_found: no such run"),
    (ConnectionClosed(4401, "unauthorized"), "connection closed: 4401 (unauthorized)"),
    (ConnectionClosed(None), "connection closed: None (no reason)"),
    (
        ConnectFailed("ws://127.0.0.1:8000/ws", "Connection refused"),
        "cannot connect to ws://127.0.0.1:8000/ws: Connection refused",
    ),
]


@pytest.mark.parametrize(("exc", "text"), RENDERED, ids=[type(e).__name__ for e, _ in RENDERED])
def test_each_exception_renders_its_fields_in_one_line(exc: RunwatchError, text: str) -> None:
    assert str(exc) == text
    assert "\n" not in str(exc)


def test_the_standard_bases_callers_rely_on_are_kept() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(TracingConfigError, ValueError)
    assert issubclass(ToolArgumentError, ValueError) and issubclass(CalculatorError, ValueError)
    assert issubclass(LifecycleError, RuntimeError)


def test_a_secret_too_short_to_sign_with_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as refused:
        TokenAuthority("short-secret")
    assert refused.value.name == "RUNWATCH_JWT_SECRET"
    assert "short-secret" not in str(refused.value)


async def test_the_sdk_raises_error_frames_as_server_errors(live: LiveServer) -> None:
    client = await live.client("alice")
    with pytest.raises(RunwatchError) as refused:
        await client.chat("hi", agent="no-such-agent")
    assert isinstance(refused.value, ServerError)
    assert refused.value.code == "unknown_agent" and refused.value.ref is not None


async def _refused_port() -> int:
    """A port bound but not listening: a connection to it is refused at once."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    _REFUSING.append(holder)
    return int(holder.getsockname()[1])


_REFUSING: list[socket.socket] = []


async def test_the_sdk_raises_connect_failed_when_it_cannot_reach_the_server(
    live: LiveServer,
) -> None:
    """Every way the first connect fails is a ``ConnectFailed`` (a ``RunwatchError`` and an
    ``OSError``) naming where it tried, never a bare library or OS exception."""
    refused = f"ws://user:pw@127.0.0.1:{await _refused_port()}/ws?token=secret"
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _r, w: accepted.append(w), "127.0.0.1", 0)
    silent_url = f"ws://127.0.0.1:{silent.sockets[0].getsockname()[1]}/ws"
    cases = [
        (refused, "Connection refused"),
        (live.http_url.replace("http", "ws") + "/nope", "HTTP 403"),
        (live.http_url + "/ws", "not a ws:// or wss:// URL"),
        (silent_url, "no handshake within 0.3s"),
    ]
    try:
        for url, reason in cases:
            client = RunwatchClient(url, live.token("alice"), open_timeout_s=0.3)
            with pytest.raises(RunwatchError) as failed:
                await client.connect()
            assert isinstance(failed.value, ConnectFailed) and isinstance(failed.value, OSError)
            assert reason in str(failed.value), str(failed.value)
            assert failed.value.__cause__ is not None
            assert "secret" not in str(failed.value) and "pw" not in str(failed.value)
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()
        for holder in _REFUSING:
            holder.close()


async def test_a_refused_fixed_token_is_not_retried_for_ever(live: LiveServer) -> None:
    """A client whose fixed token the server refuses on a reconnect (the secret was rotated)
    gives up with ``ConnectionClosed(4401)`` instead of reconnecting in silence."""
    client = await live.client("alice", max_backoff_s=0.05)
    run = await client.chat("wait 5")
    live.rt.tokens.secret = "a-rotated-secret-of-at-least-32-bytes"
    await client.drop()
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            async for _ in run:
                pass
    assert closed.value.code == 4401


# ---- I8: a run whose terminal event the store refuses still ends ------------------------------


async def _refuse(url: str, tmp_path: Path, sqlite_sql: str, pg_sql: str) -> None:
    """Make the database itself refuse some events (a real trigger or constraint)."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(tmp_path / "runwatch.db")) as db:
            db.execute(sqlite_sql)
            db.commit()
    else:
        conn = await asyncpg.connect(
            "postgresql://postgres@127.0.0.1:5432/" + url.rsplit("/", 1)[1]
        )
        try:
            await conn.execute(pg_sql)
        finally:
            await conn.close()


async def test_a_run_whose_terminal_event_is_refused_still_ends(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The store refuses every agent_completed, stand-ins included: the run cannot end as
    # completed, and must not stay open until a restart (I8).
    await _refuse(
        db_url,
        tmp_path,
        "CREATE TRIGGER no_completed BEFORE INSERT ON events WHEN NEW.type = 'agent_completed' "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END",
        "ALTER TABLE events ADD CONSTRAINT no_completed CHECK (type <> 'agent_completed')",
    )
    caplog.set_level(logging.WARNING, logger="runwatch.engine")
    async with serve_runtime(make_settings(db_url, data_dir=str(tmp_path / "d"))) as live:
        client = await live.client("alice")
        events = await (await client.chat("what is 6*7")).wait(20)
        assert_valid(events)
        assert events[-2].type == EventType.FINAL_REPORT, "the answer the store took was sent"
        assert events[-1].type == EventType.AGENT_ERROR
        assert events[-1].data["code"] == ErrorCode.INTERNAL.value
        assert (
            live.metric("runwatch_runs_finished_total", {"agent": "demo", "outcome": "error"}) == 1
        )
        store = AuditStore.open(db_url)
        try:
            assert await store.open_runs() == []
            assert await store.run_events(events[0].run_id) == events
        finally:
            await store.close()
    assert "ended from the store with agent_error{internal}" in caplog.text


async def test_a_run_that_cannot_be_ended_is_said_and_left_to_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runtime.engine.END_RETRY_S", (0.01, 0.02))
    url = sqlite_url(tmp_path / "runwatch.db")
    settings = make_settings(url, data_dir=str(tmp_path / "d"))
    async with serve_runtime(settings) as live:
        # Refuse every terminal event from now on: nothing can end a run.
        await _refuse(
            url,
            tmp_path,
            "CREATE TRIGGER no_end BEFORE INSERT ON events WHEN NEW.type IN "
            "('agent_completed', 'agent_error') BEGIN SELECT RAISE(ABORT, 'refused'); END",
            "",
        )
        client = await live.client("alice")
        run = await client.chat("hello")
        await wait_until(lambda: "could not be ended" in caplog.text, 20)
        assert "recovery at the next start" in caplog.text
        assert not run.done
    with contextlib.closing(sqlite3.connect(tmp_path / "runwatch.db")) as db:
        db.execute("DROP TRIGGER no_end")
        db.commit()
    async with serve_runtime(settings):
        store = AuditStore.open(url)
        try:
            assert await store.open_runs() == []
            events = await store.run_events(run.run_id)
        finally:
            await store.close()
    assert_valid(events)
    assert events[-1].data["code"] == ErrorCode.RUNTIME_RESTARTED.value


# ---- shutdown: a failing on_stop hook -----------------------------------------------------------


async def test_a_failing_on_stop_hook_is_logged_and_the_others_still_run(
    sqlite_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = Runtime(make_settings(sqlite_db, data_dir=str(tmp_path / "d")))
    stopped: list[str] = []

    async def broken() -> None:
        raise OSError("the exporter's socket is gone")

    async def checker() -> None:
        stopped.append("checker")

    rt.on_stop.extend([broken, checker])
    await rt.start()
    with caplog.at_level(logging.ERROR, logger="runwatch.server"):
        await rt.shutdown(drain_s=0)
    assert stopped == ["checker"]
    [record] = [r for r in caplog.records if "on_stop hook" in r.getMessage()]
    assert "broken" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)
