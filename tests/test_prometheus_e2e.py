"""End to end with a real Prometheus (Debian's package) scraping a running runwatch.

runwatch runtime and monitor run as processes on one SQLite store; real traffic goes through the
client SDK (answers, failing tools, crashes, cancels, a client that drops mid-run, a resume, a bad
frame); Prometheus scrapes both every second with the alert rules loaded. Then every dashboard
panel's query must parse and return at least one series, and a runtime killed with SIGKILL
mid-run makes RunwatchStuckRuns fire, which resolves once the restarted runtime ends the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from runtime.client import RunwatchClient, RunwatchError
from runtime.events import EventType

from .conftest import (
    JWT_SECRET,
    free_port,
    make_token,
    scale,
    sqlite_url,
    start_server_process,
    wait_until,
)
from .prom import ROOT, Prometheus, binary, concrete, fast_rules, run_prometheus

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]
FAULT_PANELS = {"Violations by rule"}


def panels() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], target["expr"]))
    return out


async def traffic(url: str, stop: asyncio.Event) -> None:
    """Real runs of every kind, until told to stop."""
    clients = [RunwatchClient(url, make_token(f"user{i}")) for i in range(4)]
    for c in clients:
        await c.connect()
    prompts = ["what is 6*7", "fail tool", "crash", "hello", "what time is it", "search resume"]
    i = 0
    try:
        while not stop.is_set():
            c = clients[i % len(clients)]
            i += 1
            try:
                run = await c.chat(prompts[i % len(prompts)])
                await run.wait(20)
            except RunwatchError:
                await asyncio.sleep(0.2)
            if i % 7 == 0:
                # a cancel mid-tool
                run = await c.chat("wait 10")
                await wait_until(
                    lambda r=run: any(e.type == EventType.TOOL_EXECUTING for e in r.events)
                )
                await c.cancel(run.run_id)
                await run.wait(10)
            if i % 9 == 0:
                # a resume of a finished run, and a bad frame
                other = RunwatchClient(url, make_token(c.connected_info["user_id"]))
                await other.connect()
                await (await other.resume(run.run_id, 0)).wait(10)
                await other.send_raw("{not json")
                await other.close()
            if i % 11 == 0:
                # a client that drops mid-run without acking: delivery failure, then deferred
                flaky = RunwatchClient(url, make_token("flaky"), auto_ack=False, reconnect=False)
                await flaky.connect()
                r = await flaky.chat("wait 2")
                await wait_until(lambda r=r: len(r.events) >= 3)
                await flaky.close()
            await asyncio.sleep(0.05)
    finally:
        for c in clients:
            await c.close()


def wait_series(prom: Prometheus, expr: str, timeout: float) -> list:
    deadline = time.monotonic() + timeout * scale()
    result: list = []
    while time.monotonic() < deadline:
        result = prom.query(expr)
        if result:
            return result
        time.sleep(1)
    return result


async def test_dashboards_and_stuck_alert_against_real_prometheus(tmp_path: Path) -> None:
    binary("prometheus")
    db = sqlite_url(tmp_path / "rw.db")
    common = {
        "RUNWATCH_DATABASE_URL": db,
        "RUNWATCH_JWT_SECRET": JWT_SECRET,
        "RUNWATCH_RUN_TIMEOUT_S": "4",
        "RUNWATCH_CHAT_BURST": "100000",
    }
    runtime_port = free_port()
    runtime = start_server_process(
        tmp_path, common, port=runtime_port, command="runtime", name="runtime"
    )
    monitor = start_server_process(
        tmp_path,
        {
            **common,
            "RUNWATCH_ADMIN_TOKEN": "admin-token-for-the-prometheus-test",
            "RUNWATCH_STUCK_GRACE_S": "1",
            "RUNWATCH_MONITOR_INTERVAL_S": "0.5",
        },
        command="monitor",
        name="monitor",
    )
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    try:
        with run_prometheus(
            tmp_path,
            {"runwatch-runtime": [runtime_port], "runwatch-monitor": [monitor.port]},
            fast_rules(rules_dir),
        ) as prom:
            prom.wait_for(prom.targets_up, 30, "both targets up")
            stop = asyncio.Event()
            load = asyncio.create_task(traffic(runtime.ws_url, stop))
            await asyncio.sleep(20 * scale())

            # Every panel query parses and returns data while traffic flows.
            missing = []
            for name, title, expr in panels():
                if title in FAULT_PANELS:
                    continue
                found = await asyncio.to_thread(wait_series, prom, concrete(expr), 20)
                if not found:
                    missing.append(f"{name}: {title}: {expr}")
            stop.set()
            await load
            assert not missing, "panels without data:\n" + "\n".join(missing)
            assert not prom.firing("RunwatchStuckRuns")

            # A run left open by a runtime killed with SIGKILL: the stuck-run alert fires.
            victim = RunwatchClient(runtime.ws_url, make_token("victim"), reconnect=False)
            await victim.connect()
            run = await victim.chat("wait 30")
            await wait_until(lambda: any(e.type == EventType.TOOL_EXECUTING for e in run.events))
            os.kill(runtime.proc.pid, signal.SIGKILL)
            runtime.proc.wait(10)
            await victim.close()
            await asyncio.to_thread(
                prom.wait_for,
                lambda: prom.firing("RunwatchStuckRuns"),
                60,
                "RunwatchStuckRuns firing",
            )
            for name, title, expr in panels():
                if title in FAULT_PANELS:
                    assert await asyncio.to_thread(wait_series, prom, concrete(expr), 30), (
                        f"{name}: {title}"
                    )

            # Recovery: the restarted runtime ends the run; the alert resolves.
            runtime = start_server_process(
                tmp_path, common, port=runtime_port, command="runtime", name="runtime2"
            )
            await asyncio.to_thread(
                prom.wait_for,
                lambda: not prom.firing("RunwatchStuckRuns"),
                60,
                "RunwatchStuckRuns resolved",
            )
            assert re.search(r"recovered \d+ run", runtime.log())
    finally:
        for proc in (runtime.proc, monitor.proc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except Exception:
                    proc.kill()
