"""Shared fixtures: real servers on ephemeral ports, real SQLite and PostgreSQL stores.

``RUNWATCH_REQUIRE_SERVICES=1`` (set by CI) turns every "service missing" skip into a failure.
``RUNWATCH_TEST_TIMEOUT_SCALE`` multiplies every bounded wait in the suite.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from runtime.agents import AgentRegistry
from runtime.auth import TokenAuthority
from runtime.client import RunwatchClient
from runtime.config import Settings
from runtime.protocol import Connect
from runtime.server import Runtime, create_app
from runtime.store.audit import AuditStore
from runtime.store.migrate import upgrade
from runtime.tools import ToolRegistry

JWT_SECRET = "test-secret-not-for-production-0123456789"
PG_ADMIN_DSN = os.environ.get("RUNWATCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def scale() -> float:
    return float(os.environ.get("RUNWATCH_TEST_TIMEOUT_SCALE", "1") or 1)


def require_services() -> bool:
    return os.environ.get("RUNWATCH_REQUIRE_SERVICES") == "1"


def service_missing(reason: str) -> None:
    """Skip on a laptop; fail under CI, where every service must be there."""
    if require_services():
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


@contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens, held for the block: the socket is bound but
    never listens, so a connection to it is refused and no other process can take the port
    meanwhile (a port found free and then let go can be taken before it is used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` (sync or async) until true, within ``timeout`` × the scale."""
    deadline = time.monotonic() + timeout * scale()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout * scale():.1f}s")
        await asyncio.sleep(interval)


# ---- databases ----------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


_pg_counter = itertools.count()


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL template database for this test session."""
    name = f"rwtpl_{os.getpid()}"
    try:
        _pg_admin(f"DROP DATABASE IF EXISTS {name}")
        _pg_admin(f"CREATE DATABASE {name}")
    except Exception as exc:
        service_missing(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}")
    upgrade(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
    yield name
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    name = f"rwt_{os.getpid()}_{next(_pg_counter)}"
    _pg_admin(f"CREATE DATABASE {name} TEMPLATE {pg_template}")
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    url = sqlite_url(tmp_path / "runwatch.db")
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs against real SQLite and real PostgreSQL."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "runwatch.db")
        upgrade(url)
        return url
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[AuditStore]:
    s = AuditStore.open(db_url)
    yield s
    await s.close()


# ---- servers ------------------------------------------------------------------------------


@dataclass
class LiveServer:
    """A runwatch runtime served by uvicorn on an ephemeral port, in this event loop."""

    rt: Runtime
    port: int
    server: uvicorn.Server
    clients: list[RunwatchClient] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, ttl_s: float = 3600) -> str:
        return self.rt.tokens.mint(user, ttl_s=ttl_s)

    async def client(self, user: str, **kwargs: Any) -> RunwatchClient:
        c = RunwatchClient(self.ws_url, self.token(user), **kwargs)
        await c.connect()
        self.clients.append(c)
        return c

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return float(self.rt.registry.get_sample_value(name, labels or {}) or 0.0)


@dataclass
class ServedApp:
    server: uvicorn.Server
    port: int


@asynccontextmanager
async def serve_app(app: Any, **config: Any) -> AsyncIterator[ServedApp]:
    """Serve an ASGI app with uvicorn in this event loop, on a port the kernel picks: the
    socket is bound here, before uvicorn's public ``Server.serve(sockets=...)`` gets it, and
    the port is read from it, so no other process can take the port in between."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config)
        )
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await wait_until(lambda: server.started or task.done(), 20)
        if task.done():
            task.result()
            raise AssertionError("uvicorn stopped before it started")
        try:
            yield ServedApp(server, port)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30 * scale())


@asynccontextmanager
async def serve_runtime(
    settings: Settings, agents: AgentRegistry | None = None, tools: ToolRegistry | None = None
) -> AsyncIterator[LiveServer]:
    await asyncio.to_thread(upgrade, settings.database_url)
    rt = Runtime(settings, agents=agents, tools=tools)
    async with serve_app(
        create_app(rt), ws_max_size=1_048_576, lifespan="on", timeout_graceful_shutdown=5
    ) as served:
        live = LiveServer(rt=rt, port=served.port, server=served.server)
        try:
            yield live
        finally:
            for c in live.clients:
                await c.close()
            await rt.shutdown(drain_s=0)


async def open_ws(url: str, token: str | None = None, **options: Any) -> ClientConnection:
    """A raw WebSocket to ``/ws`` for tests of the wire protocol; with ``token``, the
    ``connect`` frame is sent and the ``connected`` answer read.

    Its receive queue is unbounded (``max_queue=None``) unless ``options`` say otherwise: a
    test that leaves its runs' events unread can still close at once. With websockets' default
    bound (16 frames) the client stops reading, never reads the server's close frame, and
    ``close()`` waits out its 10 s close timeout (then reports 1006)."""
    ws = await ws_connect(url, **{"max_queue": None, **options})
    if token is not None:
        await ws.send(Connect(token).serialize())
        first = json.loads(await asyncio.wait_for(ws.recv(), 10 * scale()))
        assert first["type"] == "connected", first
    return ws


def make_settings(db: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db,
        "jwt_secret": JWT_SECRET,
        "instance_id": "test",
        # Local data (the outage journal) beside the test's database, never in the checkout.
        "data_dir": str(
            Path(db.split(":///", 1)[1]).parent / "runwatch-data"
            if db.startswith("sqlite")
            else tempfile.mkdtemp(prefix="runwatch-test-data-")
        ),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveServer]:
    """A runtime on SQLite in ``tmp_path``."""
    async with serve_runtime(make_settings(sqlite_url(tmp_path / "rw.db"))) as server:
        yield server


# ---- subprocess servers (crash tests, browser tests, Prometheus) ---------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


_PORT_TAKEN = "cannot listen on"
_server_logs = itertools.count()


def start_server_process(
    tmp_path: Path,
    env_extra: dict[str, str],
    *,
    port: int | None = None,
    command: str = "serve",
    name: str = "server",
    args: Sequence[str] = (),
) -> ServerProcess:
    """Start ``runwatch <command>`` as a child and wait until ``/healthz`` answers 200.

    Without ``port`` the child binds port 0 itself and the test reads the port it got from
    the line ``runwatch: listening on http://HOST:PORT`` it prints once bound, so no other
    process can take the port between choosing and binding it. With ``port`` (a restart on the
    address clients and Prometheus already know), a child that finds its port taken (runwatch
    binds first and exits 2, "cannot listen on ...") is started again until the deadline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env.update({"PYTHONUNBUFFERED": "1", "RUNWATCH_INSTANCE_ID": "test"})
    env.update(env_extra)
    deadline = time.monotonic() + 30 * scale()
    while True:
        bind = port if port is not None else 0
        log_path = tmp_path / f"{name}-{next(_server_logs)}.log"
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "runtime.cli",
                    command,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(bind),
                    *args,
                ],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        sp = ServerProcess(proc, bind, log_path)
        if _wait_healthy(sp, deadline):
            return sp
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server did not become healthy:\n{sp.log()}")
        if bind and _PORT_TAKEN in sp.log() and time.monotonic() < deadline:
            continue
        raise AssertionError(f"server exited with {proc.returncode}:\n{sp.log()}")


_LISTENING = re.compile(r"^runwatch: listening on http://\S+:(\d+)$", re.MULTILINE)


def _listening_port(sp: ServerProcess) -> int | None:
    """The port the child says it bound (``runwatch: listening on ...``), or None yet."""
    match = _LISTENING.search(sp.log())
    return int(match.group(1)) if match else None


def _wait_healthy(sp: ServerProcess, deadline: float) -> bool:
    """Poll until the child listens and answers ``/healthz`` with 200 (True), or exits or
    the deadline passes (False). A ``sp.port`` of 0 is filled in once the child listens."""
    import httpx

    while time.monotonic() < deadline:
        if sp.proc.poll() is not None:
            return False
        if not sp.port:
            sp.port = _listening_port(sp) or 0
        if sp.port:
            try:
                if httpx.get(f"{sp.http_url}/healthz", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    return False


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        service_missing("Debian chromium is not installed (/usr/bin/chromium)")
    return path


def make_token(user: str, secret: str = JWT_SECRET, ttl_s: float = 3600) -> str:
    return TokenAuthority(secret).mint(user, ttl_s=ttl_s)
