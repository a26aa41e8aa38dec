"""Benchmarks of a real ``runwatch runtime`` process.

    python -m runtime.bench [load] --clients 50 --runs 20
    python -m runtime.bench compare [--postgres | --no-postgres] [--quick]

``load`` (the default): starts a runtime in a subprocess (SQLite in a temp dir, unless
``--database-url`` says otherwise), connects N clients with the SDK, has each run R chats back to
back, and prints the emit-to-client latency (client receive time minus the event's ``ts``: commit,
fan-out and socket write included) as median / p90 / p99 / max, and events and runs per second.
Both ends share this machine's clock, so the latency needs no clock sync.

``compare``: starts, side by side, a bare FastAPI/uvicorn WebSocket server, a python-socketio
server (both in ``bench_peers.py``) and runwatch on SQLite (and on a fresh PostgreSQL database
when one is reachable), each in its own uvicorn subprocess, and measures from this process:
streaming frames/s to one client and to many, runwatch's emit-to-client latency under an
open-loop load at half its maximum run rate, and the memory of an idle connection. Every figure
is printed with its ratio and the target it meets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx
import websockets

from .auth import TokenAuthority
from .client import RunwatchClient
from .events import TERMINAL_TYPES, now_us
from .protocol import Ack, Chat, Connect

SECRET = "bench-secret-bench-secret-bench-secret-0123"
PROMPTS = ("what is 12*12", "hello", "what time is it", "fail tool", "search resume")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    workdir: Path,
    database_url: str | None,
    env_extra: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """``runwatch runtime`` in a subprocess on a free port, once it answers /healthz."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env.update(
        RUNWATCH_JWT_SECRET=SECRET,
        RUNWATCH_DATABASE_URL=database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
        RUNWATCH_CHAT_BURST="100000",
        RUNWATCH_LOG_LEVEL="warning",
    )
    env.update(env_extra or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "runtime", "--port", str(port), *(args or [])],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, port
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("bench: the server did not start")


async def _client_load(url: str, user: str, runs: int, latencies: list[float]) -> int:
    client = RunwatchClient(url, TokenAuthority(SECRET).mint(user))
    await client.connect()
    events = 0
    try:
        for i in range(runs):
            run = await client.chat(PROMPTS[i % len(PROMPTS)])
            async for event in run:
                latencies.append((now_us() - event.ts_us) / 1e6)
                events += 1
    finally:
        await client.close()
    return events


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(args: argparse.Namespace, port: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/ws"
    latencies: list[float] = []
    started = time.monotonic()
    counts = await asyncio.gather(
        *(_client_load(url, f"bench{i}", args.runs, latencies) for i in range(args.clients))
    )
    elapsed = time.monotonic() - started
    return {
        "clients": args.clients,
        "runs": args.clients * args.runs,
        "events": sum(counts),
        "seconds": round(elapsed, 2),
        "events_per_s": round(sum(counts) / elapsed, 1),
        "runs_per_s": round(args.clients * args.runs / elapsed, 1),
        "latency_ms": {
            "median": round(statistics.median(latencies) * 1000, 2),
            "p90": round(_pct(latencies, 0.90) * 1000, 2),
            "p99": round(_pct(latencies, 0.99) * 1000, 2),
            "max": round(max(latencies) * 1000, 2),
        },
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _load(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench [load]", description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--runs", type=int, default=20, help="chats per client")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="runwatch-bench-") as tmp:
        proc, port = start_server(Path(tmp), args.database_url)
        try:
            result = asyncio.run(_run(args, port))
        finally:
            _stop(proc)
    if args.json:
        print(json.dumps(result))
    else:
        lat = result["latency_ms"]
        print(
            f"{result['clients']} clients, {result['runs']} runs, {result['events']} events "
            f"in {result['seconds']} s\n"
            f"throughput: {result['events_per_s']} events/s, {result['runs_per_s']} runs/s\n"
            f"emit-to-client latency: median {lat['median']} ms, p90 {lat['p90']} ms, "
            f"p99 {lat['p99']} ms, max {lat['max']} ms"
        )
    return 0


# ---- compare: runwatch side by side with a bare server and python-socketio -----------------

FLOOD_AGENT = "flood=runtime.agents.flood:flood_agent"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: runwatch clients acknowledge cumulatively every this many events (and the terminal one).
ACK_EVERY = 100


@dataclass
class Target:
    """One server under test, in its own subprocess."""

    name: str
    kind: str  # "bare" | "socketio" | "runwatch"
    proc: subprocess.Popen[bytes]
    port: int

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_peer(kind: str) -> Target:
    """A reference server (``bench_peers``) under uvicorn, like runwatch: no compression."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"runtime.bench_peers:{kind}_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--ws-per-message-deflate",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = "/healthz" if kind == "bare" else "/socket.io/?EIO=4&transport=polling"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                return Target(kind, kind, proc, port)
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"bench: the {kind} server did not start")


async def _ws(url: str) -> websockets.ClientConnection:
    return await websockets.connect(url, max_size=None, compression=None, ping_interval=None)


async def authenticate(ws: websockets.ClientConnection, token: str) -> dict[str, Any]:
    """Send ``connect`` on a raw socket to runwatch's ``/ws``; returns the ``connected`` frame."""
    await ws.send(Connect(token).serialize())
    connected: dict[str, Any] = json.loads(await ws.recv())
    assert connected["type"] == "connected", connected
    return connected


class _Streamer:
    """One client connection that asks its server for ``count`` frames and parses each one as
    JSON. The three protocols differ only in how they ask; the per-frame work is the same."""

    def __init__(self, target: Target, user: str) -> None:
        self.target = target
        self.user = user
        self.ws: websockets.ClientConnection | None = None
        self.closed_with: int | None = None

    async def open(self) -> None:
        base = f"ws://127.0.0.1:{self.target.port}"
        if self.target.kind == "bare":
            self.ws = await _ws(f"{base}/ws")
        elif self.target.kind == "socketio":
            self.ws = await _ws(f"{base}/socket.io/?EIO=4&transport=websocket")
            opening = await self.ws.recv()
            assert isinstance(opening, str) and opening.startswith("0"), opening
            await self.ws.send("40")  # Socket.IO connect to the default namespace
            while not str(await self.ws.recv()).startswith("40"):
                pass
        else:
            self.ws = await _ws(f"{base}/ws")
            await authenticate(self.ws, TokenAuthority(SECRET).mint(self.user))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def stream(self, count: int, size: int) -> int:
        """Frames received (for runwatch: event frames of one ``flood`` run, terminal included)."""
        ws = self.ws
        assert ws is not None
        received = 0
        try:
            if self.target.kind == "bare":
                await ws.send(json.dumps({"count": count, "size": size}))
                while received < count:
                    json.loads(await ws.recv())
                    received += 1
            elif self.target.kind == "socketio":
                await ws.send("42" + json.dumps(["flood", {"count": count, "size": size}]))
                while received < count:
                    message = await ws.recv()
                    if message == "2":  # Engine.IO ping
                        await ws.send("3")
                    elif isinstance(message, str) and message.startswith("42"):
                        json.loads(message[2:])
                        received += 1
            else:
                received = await self._runwatch_flood(ws, count, size)
        except websockets.ConnectionClosed as exc:
            self.closed_with = exc.rcvd.code if exc.rcvd else -1
        return received

    async def _runwatch_flood(self, ws: websockets.ClientConnection, count: int, size: int) -> int:
        await ws.send(Chat(f"flood {count} {size}", uuid.uuid4().hex, agent="flood").serialize())
        received = acked = 0
        while True:
            frame = json.loads(await ws.recv())
            if "seq" not in frame:
                if frame.get("type") == "error":
                    raise SystemExit(f"bench: runwatch refused the chat: {frame}")
                continue
            received += 1
            seq = frame["seq"]
            terminal = frame["type"] in TERMINAL_TYPES
            if terminal or seq - acked >= ACK_EVERY:
                await ws.send(Ack(frame["run_id"], seq).serialize())
                acked = seq
            if terminal:
                return received


@dataclass
class Throughput:
    frames: int
    seconds: float
    server_cpu_pct: float
    client_cpu_pct: float
    closed: list[int] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


async def _throughput(target: Target, clients: int, count: int, size: int) -> Throughput:
    """``clients`` connections, each streaming ``count`` frames at once; aggregate frames/s."""
    streamers = [_Streamer(target, f"flood{i}") for i in range(clients)]
    await asyncio.gather(*(s.open() for s in streamers))
    try:
        await streamers[0].stream(min(count, 200), size)  # warm-up
        server0, client0 = target.cpu_s(), time.process_time()
        started = time.perf_counter()
        frames = await asyncio.gather(*(s.stream(count, size) for s in streamers))
        seconds = time.perf_counter() - started
        server1, client1 = target.cpu_s(), time.process_time()
    finally:
        await asyncio.gather(*(s.close() for s in streamers))
    return Throughput(
        frames=sum(frames),
        seconds=seconds,
        server_cpu_pct=100 * (server1 - server0) / seconds,
        client_cpu_pct=100 * (client1 - client0) / seconds,
        closed=[s.closed_with for s in streamers if s.closed_with is not None],
    )


async def _runwatch_frame_bytes(target: Target, size: int) -> int:
    """The length of one runwatch ``text_delta`` frame carrying ``size`` characters."""
    streamer = _Streamer(target, "measure")
    await streamer.open()
    ws = streamer.ws
    assert ws is not None
    try:
        await ws.send(Chat(f"flood 1 {size}", "m", agent="flood").serialize())
        while True:
            raw = await ws.recv()
            frame = json.loads(raw)
            if frame.get("type") == "text_delta":
                return len(raw)
    finally:
        await streamer.close()


async def _latency(
    target: Target, clients: int, runs: int, seconds: float, rate: float | None = None
) -> dict[str, Any]:
    """Closed loop first (``clients`` × ``runs`` chats back to back: the maximum run rate),
    then an open loop of Poisson arrivals at half that rate (or at ``rate`` runs/s, to compare
    runs at the same load) over the same ``clients``."""
    url = f"ws://127.0.0.1:{target.port}/ws"
    closed_latencies: list[float] = []
    started = time.monotonic()
    await asyncio.gather(
        *(_client_load(url, f"closed{i}", runs, closed_latencies) for i in range(clients))
    )
    max_rate = clients * runs / (time.monotonic() - started)
    rate = rate or max_rate / 2

    sdk = [RunwatchClient(url, TokenAuthority(SECRET).mint(f"open{i}")) for i in range(clients)]
    await asyncio.gather(*(c.connect() for c in sdk))
    latencies: list[float] = []

    async def one(client: RunwatchClient, prompt: str) -> None:
        run = await client.chat(prompt)
        async for event in run:
            latencies.append((now_us() - event.ts_us) / 1e6)

    rng = random.Random(8)
    tasks: list[asyncio.Task[None]] = []
    begin = next_at = time.monotonic()
    try:
        while True:
            next_at += rng.expovariate(rate)
            if next_at > begin + seconds:
                break
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            k = len(tasks)
            tasks.append(asyncio.create_task(one(sdk[k % clients], PROMPTS[k % len(PROMPTS)])))
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await asyncio.gather(*(c.close() for c in sdk))
    return {
        "max_runs_per_s": round(max_rate, 1),
        "offered_runs_per_s": round(rate, 1),
        "runs": len(tasks),
        "events": len(latencies),
        "p50_ms": round(_pct(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_pct(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "closed_loop_p50_ms": round(_pct(closed_latencies, 0.50) * 1000, 2),
        "closed_loop_p99_ms": round(_pct(closed_latencies, 0.99) * 1000, 2),
    }


async def _idle_memory(target: Target, count: int) -> float:
    """KiB of server memory per idle (connected, authenticated where it applies) connection."""
    from .bench_memory import idle_connection_cost

    tokens = TokenAuthority(SECRET)

    async def connect(i: int) -> Any:
        streamer = _Streamer(target, f"idle{i // 10}")  # runwatch: 10 connections per user
        if target.kind == "runwatch":
            streamer.ws = await _ws(f"ws://127.0.0.1:{target.port}/ws")
            await authenticate(streamer.ws, tokens.mint(f"idle{i // 10}"))
        else:
            await streamer.open()
        return streamer

    cost = await idle_connection_cost(target.proc.pid, connect, count, settle_s=1.0)
    return float(cost["per_idle_connection_kib"])


def _versions() -> str:
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return (
        f"python {platform.python_version()}, uvicorn {v('uvicorn')}, "
        f"websockets {v('websockets')}, python-socketio {v('python-socketio')}, "
        f"fastapi {v('fastapi')}, uvloop {v('uvloop')}; {os.cpu_count()} CPUs"
    )


def _pg_admin(dsn: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=3)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def _postgres_database(admin_dsn: str, required: bool) -> Iterator[str | None]:
    """A fresh, migrated PostgreSQL database for the run (None if unreachable and optional)."""
    from .store.migrate import upgrade

    name = f"runwatch_bench_{os.getpid()}"
    try:
        _pg_admin(admin_dsn, f"CREATE DATABASE {name}")
    except Exception as exc:
        if required:
            raise SystemExit(f"bench: PostgreSQL not reachable at {admin_dsn}: {exc}") from None
        print(f"(PostgreSQL not reachable at {admin_dsn}: skipping runwatch on PostgreSQL)")
        yield None
        return
    host = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+asyncpg://{host}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        _pg_admin(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = "≥" if higher_is_better else "≤"
    return f"{'meets' if ok else 'MISSES'} target {sign} {target:g}"


async def _compare(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    bare = next(t for t in targets if t.kind == "bare")
    runwatches = [t for t in targets if t.kind == "runwatch"]
    frame_bytes = await _runwatch_frame_bytes(runwatches[0], args.size)
    result: dict[str, Any] = {"versions": _versions(), "frame_bytes": frame_bytes}
    print(_versions())
    print(f"frames: {frame_bytes} bytes (a runwatch text_delta of {args.size} characters)\n")

    def show(label: str, t: Throughput) -> None:
        note = f", closed {sorted(set(t.closed))} x{len(t.closed)}" if t.closed else ""
        print(
            f"  {label:<18} {t.per_s:>9.0f} frames/s  ({t.frames} in {t.seconds:.2f} s; "
            f"server CPU {t.server_cpu_pct:.0f}%, client CPU {t.client_cpu_pct:.0f}%{note})"
        )

    if args.idle:
        print(f"idle memory per connection ({args.idle} idle connections):")
        memory = {t.name: await _idle_memory(t, args.idle) for t in targets}
        for name, kib in memory.items():
            verdict = (
                "  " + _verdict(kib, 30, higher_is_better=False) if name.startswith("run") else ""
            )
            print(f"  {name:<18} {kib:>9.1f} KiB{verdict}")
        result["idle_kib_per_connection"] = memory
        print()

    print(f"one streaming run to one client ({args.frames} frames):")
    single: dict[str, Throughput] = {}
    for t in targets:
        single[t.name] = await _throughput(t, 1, args.frames, frame_bytes)
        show(t.name, single[t.name])
    for t in runwatches:
        to_bare = single[t.name].per_s / single["bare"].per_s
        to_sio = single[t.name].per_s / single["socketio"].per_s
        print(f"  {t.name + '/bare':<27} = {to_bare:5.2f}x  {_verdict(to_bare, 0.5)}")
        print(f"  {t.name + '/socketio':<27} = {to_sio:5.2f}x  {_verdict(to_sio, 1.5)}")
    result["single"] = {k: round(v.per_s, 1) for k, v in single.items()}
    print()

    print(f"{args.clients} concurrent streaming runs ({args.frames_each} frames each):")
    many: dict[str, Throughput] = {}
    for t in [bare, *runwatches]:
        many[t.name] = await _throughput(t, args.clients, args.frames_each, frame_bytes)
        show(t.name, many[t.name])
    for t in runwatches:
        ratio = many[t.name].per_s / many["bare"].per_s
        print(f"  {t.name + '/bare':<27} = {ratio:5.2f}x  {_verdict(ratio, 0.5)}")
    result["many"] = {k: round(v.per_s, 1) for k, v in many.items()}
    print()

    if args.latency_s > 0:
        load = (
            f"{args.latency_rate:g} runs/s" if args.latency_rate else "half the closed-loop maximum"
        )
        print(
            f"emit-to-client latency, {args.clients} clients chatting `demo`, open loop at "
            f"{load}, {args.latency_s:g} s:"
        )
        result["latency"] = {}
        for t in runwatches:
            lat = await _latency(t, args.clients, args.runs, args.latency_s, args.latency_rate)
            result["latency"][t.name] = lat
            print(
                f"  {t.name:<18} max {lat['max_runs_per_s']} runs/s closed loop; offered "
                f"{lat['offered_runs_per_s']} runs/s: {lat['runs']} runs, {lat['events']} "
                f"events\n"
                f"  {'':<18} p50 {lat['p50_ms']} ms ({_verdict(lat['p50_ms'], 3, False)}), "
                f"p99 {lat['p99_ms']} ms ({_verdict(lat['p99_ms'], 10, False)}), "
                f"max {lat['max_ms']} ms"
            )
    return result


def _compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.bench compare",
        description="runwatch side by side with a bare WebSocket server and python-socketio.",
    )
    parser.add_argument("--frames", type=int, default=20000, help="frames of the one-client run")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--frames-each", type=int, default=1000, help="frames per client run")
    parser.add_argument("--size", type=int, default=200, help="text_delta characters")
    parser.add_argument("--runs", type=int, default=4, help="closed-loop chats per client")
    parser.add_argument("--latency-s", type=float, default=10.0, help="open-loop duration")
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="open-loop runs/s (default: half the measured closed-loop maximum)",
    )
    parser.add_argument("--idle", type=int, default=500, help="idle connections (0: skip)")
    pg = parser.add_mutually_exclusive_group()
    pg.add_argument("--postgres", action="store_true", help="require runwatch on PostgreSQL")
    pg.add_argument("--no-postgres", action="store_true", help="skip runwatch on PostgreSQL")
    parser.add_argument("--pg-admin-dsn", default=os.environ.get("RUNWATCH_BENCH_PG", PG_ADMIN_DSN))
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        import socketio  # noqa: F401
    except ImportError:
        print(
            "bench: compare needs python-socketio for its reference server: "
            "pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        args.frames, args.frames_each, args.runs = 2000, 100, 2
        args.latency_s, args.idle = min(args.latency_s, 3.0), min(args.idle, 100)

    targets: list[Target] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runwatch-cmp-")))
        pg_url = (
            None
            if args.no_postgres
            else stack.enter_context(_postgres_database(args.pg_admin_dsn, args.postgres))
        )

        @stack.callback
        def stop_all() -> None:
            for t in targets:
                _stop(t.proc)

        targets.append(_start_peer("bare"))
        targets.append(_start_peer("socketio"))
        for name, url in (("runwatch-sqlite", None), ("runwatch-postgres", pg_url)):
            if name.endswith("postgres") and url is None:
                continue
            workdir = tmp / name  # own journal directory per runtime
            workdir.mkdir()
            proc, port = start_server(workdir, url, args=["--agent", FLOOD_AGENT])
            targets.append(Target(name, "runwatch", proc, port))
        result = asyncio.run(_compare(args, targets))
    if args.json:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "compare":
        return _compare_main(args[1:])
    if args and args[0] == "load":
        args = args[1:]
    return _load(args)


if __name__ == "__main__":
    raise SystemExit(main())
