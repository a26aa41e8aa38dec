"""Load benchmark: N concurrent clients against a real ``runwatch runtime`` process.

    python -m runtime.bench --clients 50 --runs 20

Starts a runtime in a subprocess (SQLite in a temp dir, unless ``--url`` points at a running
server), connects N clients with the SDK, has each run R chats back to back, and prints the
emit-to-client latency (client receive time minus the event's ``ts``: commit, fan-out and socket
write included) as median / p90 / p99 / max, and events and runs per second. Both ends share
this machine's clock, so the latency needs no clock sync.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .auth import TokenAuthority
from .client import RunwatchClient

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
                latencies.append(time.time() - event.ts_us / 1e6)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__)
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
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
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


if __name__ == "__main__":
    raise SystemExit(main())
