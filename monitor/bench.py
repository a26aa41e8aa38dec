"""Checker benchmarks: how fast the checker judges, and what it costs the runtime beside it.

    python -m monitor.bench --runs 2000
    python -m monitor.bench --backlog 5000 --under-load
    python -m monitor.bench --follow 60

``--runs N`` (the default mode) writes N completed runs of 12 events each (with a receipt per
event) into a fresh SQLite store (or ``--database-url``), then times the checker judging all of
them: runs judged per second.

``--backlog N --under-load`` writes N ended runs into a fresh SQLite store, starts a real
``runwatch runtime`` process on it, drives chat load with the client SDK from a separate process,
measures the runtime's ``runwatch_event_persist_seconds`` (p99 from the histogram buckets of
its ``/metrics``) over a window without the checker, then runs the checker's loop in this
process against the same database file until the backlog is judged, and measures the same p99
over that window, then over one more window without the checker (the machine's noise). It
also prints how long the checker kept this process's event loop from running (the embedded
``runwatch serve`` shares one loop between checker and runtime).

``--follow S`` starts the runtime, drives it at its maximum run rate for S seconds with the
checker following in this process, and prints the monitor's lag and the runs waiting to be
judged every few seconds: the checker keeps up when both stay bounded.

The benchmarks print numbers; they assert nothing. The machine is shared and noisy: compare
figures measured side by side, and repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import multiprocessing.synchronize
import queue
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from runtime.auth import TokenAuthority
from runtime.events import Event, Receipt, new_id, now_us
from runtime.lifecycle import RunLifecycle
from runtime.store.audit import AuditStore, Batch, RunInfo
from runtime.store.migrate import upgrade

from .checker import Checker, CheckerConfig
from .metrics import MonitorMetrics
from .rules import RuleConfig

SECRET = "monitor-bench-secret-monitor-bench-secret-0123"
PROMPTS = ("what is 12*12", "hello", "what time is it", "fail tool", "search resume")
PERSIST = "runwatch_event_persist_seconds"


def _run_events(run_id: str, t0: int) -> list[Event]:
    clock = itertools.count(t0, 1000)
    lc = RunLifecycle(run_id, "t-" + run_id, "demo", lambda: next(clock))
    events = [lc.started("bench"), lc.thinking("a"), lc.thinking("b")]
    for i in range(3):
        events += [lc.tool_executing(f"c{i}", "clock", {}), lc.tool_completed(f"c{i}", result=i)]
    events += [lc.delta("x"), lc.final_report("done"), lc.completed()]
    return events  # 12 events


async def _fill(store: AuditStore, runs: int) -> int:
    t0 = now_us() - 600_000_000
    events_total = 0
    for start in range(0, runs, 100):
        batch = Batch()
        for _ in range(min(100, runs - start)):
            rid = new_id()
            batch.new_runs.append((RunInfo(rid, "u", "t-" + rid, "demo", rid, "b", t0), True))
            events = _run_events(rid, t0)
            batch.events += [(e, True) for e in events]
            batch.receipts += [
                Receipt(e.event_id, rid, e.seq, "c", "u", e.ts_us + 2000, e.ts_us + 5000)
                for e in events
            ]
            events_total += len(events)
        await store.write(batch, t0 + 1000)
    return events_total


# ---- the event loop's stalls ------------------------------------------------------------


@dataclass
class LoopProbe:
    """Measures how late a 5 ms timer fires: what the loop's other tasks suffer."""

    delays: list[float] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.delays.append(time.perf_counter() - t - 0.005)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> str:
        if not self.delays:
            return "no samples"
        d = sorted(self.delays)
        p99 = d[min(len(d) - 1, int(0.99 * len(d)))]
        return f"p99 {p99 * 1000:.1f} ms, max {d[-1] * 1000:.1f} ms"


# ---- mode 1: judging throughput ---------------------------------------------------------


async def _bench(url: str, runs: int) -> dict[str, float]:
    store = AuditStore.open(url)
    try:
        events = await _fill(store, runs)
        checker = Checker(
            store,
            MonitorMetrics(CollectorRegistry()),
            CheckerConfig(rules=RuleConfig(ack_wait_s=1), settle_s=1),
        )
        probe = LoopProbe()
        probe.start()
        started = time.perf_counter()
        result = await checker.catch_up()
        elapsed = time.perf_counter() - started
        await probe.stop()
    finally:
        await store.close()
    print(f"event loop delay while judging: {probe.summary()}")
    return {
        "runs": result.judged,
        "events": events,
        "seconds": round(elapsed, 2),
        "runs_per_s": round(result.judged / elapsed, 1),
        "violations": result.violations,
    }


# ---- chat load in another process -------------------------------------------------------


def _load_process(
    url: str, clients: int, stop: multiprocessing.synchronize.Event, out: multiprocessing.Queue
) -> None:
    """Entry point of the load process: ``clients`` SDK clients chat back to back."""
    from runtime.client import RunwatchClient

    async def one(i: int) -> tuple[int, int]:
        client = RunwatchClient(url, TokenAuthority(SECRET).mint(f"load{i}"))
        await client.connect()
        runs = events = 0
        try:
            for n in itertools.count():
                if stop.is_set():
                    break
                run = await client.chat(PROMPTS[(n + i) % len(PROMPTS)])
                events += len(await run.wait(60))
                runs += 1
        finally:
            await client.close()
        return runs, events

    async def main() -> tuple[int, int]:
        done = await asyncio.gather(*(one(i) for i in range(clients)))
        return sum(r for r, _ in done), sum(e for _, e in done)

    out.put(asyncio.run(main()))


@dataclass
class Histogram:
    """Cumulative bucket counts of one histogram, as scraped."""

    buckets: dict[float, float]

    def __sub__(self, other: Histogram) -> Histogram:
        return Histogram({le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()})

    @property
    def count(self) -> float:
        return self.buckets.get(float("inf"), 0.0)

    def quantile(self, q: float) -> float:
        """As PromQL's ``histogram_quantile``: linear within the bucket that holds rank q."""
        total = self.count
        if total <= 0:
            return float("nan")
        rank = q * total
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            n = self.buckets[le]
            if n >= rank:
                if le == float("inf"):
                    return lower
                return lower + (le - lower) * (rank - below) / max(n - below, 1e-12)
            lower, below = le, n
        return lower

    def above(self, threshold: float) -> float:
        """How many observations exceeded ``threshold`` (a bucket bound)."""
        return self.count - self.buckets.get(threshold, 0.0)


def scrape_histogram(http_url: str, name: str) -> Histogram:
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return Histogram(
                {
                    float(s.labels["le"]): s.value
                    for s in family.samples
                    if s.name == name + "_bucket"
                }
            )
    raise SystemExit(f"bench: the runtime exports no {name}")


@contextlib.contextmanager
def runtime_under_load(
    workdir: Path, url: str, clients: int, runtime_src: str | None = None
) -> Iterator[tuple[str, _Load]]:
    """A ``runwatch runtime`` process on ``url`` with ``clients`` chatting from a process.

    ``runtime_src``: a source tree (e.g. ``git archive`` of a commit) the runtime process
    imports instead of the installed package, to measure a fixed version of the runtime."""
    from runtime.bench import start_server

    env = {"RUNWATCH_JWT_SECRET": SECRET}
    if runtime_src:
        env["PYTHONPATH"] = str(Path(runtime_src).resolve())
    proc, port = start_server(workdir, url, env_extra=env)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    out: multiprocessing.Queue = ctx.Queue()
    loader = ctx.Process(
        target=_load_process, args=(f"ws://127.0.0.1:{port}/ws", clients, stop, out)
    )
    load = _Load(stop, out, loader)
    loader.start()
    try:
        yield f"http://127.0.0.1:{port}", load
    finally:
        stop.set()
        load.finish()
        loader.join(60)
        if loader.is_alive():
            loader.kill()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class _Load:
    stop: multiprocessing.synchronize.Event
    out: multiprocessing.Queue
    process: multiprocessing.process.BaseProcess
    runs: int = 0
    events: int = 0

    def finish(self) -> None:
        self.stop.set()
        try:
            self.runs, self.events = self.out.get(timeout=90)
        except queue.Empty:
            print("bench: a load process sent no counts within 90 s", file=sys.stderr)


def _counter(http_url: str, name: str) -> float:
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                total += s.value
    return total


def _judged(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value("runwatch_monitor_runs_checked_total", {"verdict": v}) or 0.0
        for v in ("pass", "fail")
    )


def _fmt(h: Histogram) -> str:
    return (
        f"p99 {h.quantile(0.99) * 1000:.1f} ms, p50 {h.quantile(0.5) * 1000:.1f} ms, "
        f"{h.above(0.05):.0f} of {h.count:.0f} events over 50 ms, "
        f"{h.above(0.25):.0f} over 250 ms"
    )


# ---- mode 2: a backlog judged while the runtime is under load ---------------------------


async def _backlog(
    url: str, backlog: int, clients: int, window_s: float, workdir: Path, runtime_src: str | None
) -> None:
    store = AuditStore.open(url)
    try:
        await _fill(store, backlog)
    finally:
        await store.close()
    with runtime_under_load(workdir, url, clients, runtime_src) as (http_url, load):
        await asyncio.sleep(3)  # warm up: every client connected and chatting
        h0 = await asyncio.to_thread(scrape_histogram, http_url, PERSIST)
        e0 = await asyncio.to_thread(_counter, http_url, "runwatch_events_emitted_total")
        await asyncio.sleep(window_s)
        h1 = await asyncio.to_thread(scrape_histogram, http_url, PERSIST)
        e1 = await asyncio.to_thread(_counter, http_url, "runwatch_events_emitted_total")
        store = AuditStore.open(url)
        registry = CollectorRegistry()
        checker = Checker(store, MonitorMetrics(registry), CheckerConfig())
        probe = LoopProbe()
        probe.start()
        started = time.perf_counter()
        checker.start(1.0)  # the checker's own loop, as in ``runwatch monitor``
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if _judged(registry) >= backlog:
                    break
                await asyncio.sleep(0.05)
        finally:
            elapsed = time.perf_counter() - started
            await checker.stop()
            await probe.stop()
            await store.close()
        judged = _judged(registry)
        h2 = await asyncio.to_thread(scrape_histogram, http_url, PERSIST)
        e2 = await asyncio.to_thread(_counter, http_url, "runwatch_events_emitted_total")
        # The same window again, without the checker: how much the machine's noise moved.
        await asyncio.sleep(window_s)
        h3 = await asyncio.to_thread(scrape_histogram, http_url, PERSIST)
        e3 = await asyncio.to_thread(_counter, http_url, "runwatch_events_emitted_total")
    print(f"runtime under load: {clients} clients chatting, SQLite, {load.runs} runs in total")
    print(
        f"  without the checker, before ({window_s:.0f} s, {(e1 - e0) / window_s:.0f} events/s):"
        f" persist {_fmt(h1 - h0)}"
    )
    print(
        f"  while the checker judged the backlog ({elapsed:.1f} s, "
        f"{(e2 - e1) / elapsed:.0f} events/s): persist {_fmt(h2 - h1)}"
    )
    print(
        f"  without the checker, after ({window_s:.0f} s, {(e3 - e2) / window_s:.0f} events/s): "
        f"persist {_fmt(h3 - h2)}"
    )
    print(
        f"checker: {judged:.0f} runs judged in {elapsed:.2f} s "
        f"({judged / elapsed:.0f} runs/s, busy_share {checker.config.busy_share:g}) beside the "
        "runtime; "
        f"event loop delay in its process: {probe.summary()}"
    )


# ---- mode 3: following the runtime at its maximum run rate ------------------------------


async def _follow(
    url: str, seconds: float, clients: int, workdir: Path, runtime_src: str | None
) -> None:
    registry = CollectorRegistry()
    with runtime_under_load(workdir, url, clients, runtime_src) as (http_url, load):
        store = AuditStore.open(url)
        checker = Checker(store, MonitorMetrics(registry), CheckerConfig())
        checker.start(1.0)
        probe = LoopProbe()
        probe.start()
        lags: list[float] = []
        h0 = await asyncio.to_thread(scrape_histogram, http_url, PERSIST)
        started = time.monotonic()
        try:
            print("   t   runs ended  judged  pending  lag s")
            for tick in itertools.count(1):
                await asyncio.sleep(1)
                lag = registry.get_sample_value("runwatch_monitor_lag_seconds") or 0.0
                lags.append(lag)
                if tick % 5 == 0 or time.monotonic() - started >= seconds:
                    ended = await asyncio.to_thread(
                        _counter, http_url, "runwatch_runs_finished_total"
                    )
                    judged = _judged(registry)
                    pending = registry.get_sample_value("runwatch_monitor_open_runs") or 0.0
                    print(f"{tick:4d} {ended:12.0f} {judged:7.0f} {pending:8.0f} {lag:6.2f}")
                if time.monotonic() - started >= seconds:
                    break
            persist = await asyncio.to_thread(scrape_histogram, http_url, PERSIST) - h0
        finally:
            await checker.stop()
            await probe.stop()
            await store.close()
    half = len(lags) // 2
    print(
        f"runtime: {load.runs} runs in {seconds:.0f} s ({load.runs / seconds:.0f} runs/s, "
        f"{load.events / seconds:.0f} events/s, {clients} clients); persist {_fmt(persist)}"
    )
    print(
        f"monitor lag: max {max(lags):.2f} s in the first half, "
        f"{max(lags[half:]):.2f} s in the second; event loop delay: {probe.summary()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitor.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=2000, help="runs to judge (default mode)")
    parser.add_argument("--database-url", default=None, help="default mode only")
    parser.add_argument("--backlog", type=int, default=None, help="runs judged under load")
    parser.add_argument("--under-load", action="store_true", help="with --backlog")
    parser.add_argument("--follow", type=float, default=None, help="seconds to follow")
    parser.add_argument("--clients", type=int, default=20, help="chat clients for the load")
    parser.add_argument("--window", type=float, default=5.0, help="baseline window, seconds")
    parser.add_argument(
        "--runtime-src",
        default=None,
        help="run the runtime process from this source tree (e.g. a git archive of a commit)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="runwatch-monitor-bench-") as tmp:
        workdir = Path(tmp)
        url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        upgrade(url)
        if args.backlog is not None:
            if not args.under_load:
                parser.error("--backlog needs --under-load")
            asyncio.run(
                _backlog(url, args.backlog, args.clients, args.window, workdir, args.runtime_src)
            )
            return 0
        if args.follow is not None:
            asyncio.run(_follow(url, args.follow, args.clients, workdir, args.runtime_src))
            return 0
        r = asyncio.run(_bench(url, args.runs))
    print(
        f"checker judged {r['runs']:.0f} runs ({r['events']:.0f} events, 12 per run) in "
        f"{r['seconds']} s: {r['runs_per_s']} runs/s ({r['violations']:.0f} violations)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
