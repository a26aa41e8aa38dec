"""Memory benchmark: what 1,000 idle connections and one slow consumer cost the server.

    python -m runtime.bench_memory --idle 1000

Starts ``runwatch runtime`` in a subprocess and reads its resident memory (``VmRSS``) from
``/proc``: at rest, with N idle authenticated connections, and while one client that never reads
receives a flood of events (until the server closes it with 4008). Prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import websockets

from .auth import TokenAuthority
from .bench import SECRET, authenticate, start_server
from .client import RunwatchClient
from .protocol import Chat


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def idle_connection_cost(
    pid: int, connect: Callable[[int], Awaitable[Any]], count: int, settle_s: float = 2.0
) -> dict[str, float]:
    """The server's resident memory before and with ``count`` idle connections, each opened by
    ``connect(i)`` (which returns something with an async ``close()``), and the cost of one."""
    await asyncio.sleep(settle_s)
    base = rss_mib(pid)
    conns = [await connect(i) for i in range(count)]
    await asyncio.sleep(settle_s)
    with_idle = rss_mib(pid)
    for conn in conns:
        await conn.close()
    return {
        "base_mib": round(base, 1),
        "idle_connections": count,
        "with_idle_mib": round(with_idle, 1),
        "per_idle_connection_kib": round((with_idle - base) * 1024 / max(count, 1), 1),
    }


async def _measure(pid: int, port: int, idle: int, flood: str) -> dict[str, float]:
    url = f"ws://127.0.0.1:{port}/ws"
    tokens = TokenAuthority(SECRET)
    warm = RunwatchClient(url, tokens.mint("warmup"))
    await warm.connect()
    await (await warm.chat("what is 1+1")).wait(10)
    await warm.close()

    async def connect(i: int) -> websockets.ClientConnection:
        ws = await websockets.connect(url)
        await authenticate(ws, tokens.mint(f"idle{i // 10}"))
        return ws

    idle_cost = await idle_connection_cost(pid, connect, idle)
    await asyncio.sleep(2)
    after_idle = rss_mib(pid)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    slow = await websockets.connect(url, sock=sock, max_size=None, max_queue=1)
    await authenticate(slow, tokens.mint("slow"))
    await slow.send(Chat(flood, "flood", agent="flood").serialize())
    peak = after_idle
    closed_after = None
    started = time.monotonic()
    async with httpx.AsyncClient() as http:
        while time.monotonic() - started < 120:
            await asyncio.sleep(0.1)
            peak = max(peak, rss_mib(pid))
            metrics = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
            if 'runwatch_disconnects_total{code="4008"} 1.0' in metrics:
                closed_after = time.monotonic() - started
                break
    await asyncio.sleep(1)
    peak = max(peak, rss_mib(pid))
    sock.close()
    return {
        **idle_cost,
        "after_idle_closed_mib": round(after_idle, 1),
        "slow_consumer_peak_mib": round(peak, 1),
        "slow_consumer_extra_mib": round(peak - after_idle, 1),
        "slow_consumer_closed_after_s": round(closed_after, 2) if closed_after else -1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench_memory", description=__doc__)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--queue-bytes", type=int, default=1_048_576)
    parser.add_argument("--flood", default="flood 20000 4000", help="the slow client's chat")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="runwatch-mem-") as tmp:
        proc, port = start_server(
            Path(tmp),
            None,
            {"RUNWATCH_SEND_QUEUE_BYTES": str(args.queue_bytes)},
            ["--agent", "flood=runtime.agents.flood:flood_agent"],
        )
        try:
            result = asyncio.run(_measure(proc.pid, port, args.idle, args.flood))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        print(json.dumps(result))
    else:
        r = result
        print(
            f"server RSS at rest: {r['base_mib']} MiB\n"
            f"{r['idle_connections']} idle connections: {r['with_idle_mib']} MiB "
            f"({r['per_idle_connection_kib']} KiB each)\n"
            f"one slow consumer (send queue {args.queue_bytes} bytes): peak "
            f"{r['slow_consumer_peak_mib']} MiB (+{r['slow_consumer_extra_mib']} MiB), closed "
            f"with 4008 after {r['slow_consumer_closed_after_s']} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
