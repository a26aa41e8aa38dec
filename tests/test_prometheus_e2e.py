"""End to end with a real Prometheus (Debian's package) scraping a running runwatch, with the
scrape configurations of docs/operations.md (intervals shortened to 1 s) and the shipped rules
(``for:`` shortened; the delivery SLI windows too where a burn-rate alert is awaited).

Split deployment: runtime and monitor processes on one SQLite store; real traffic through the
client SDK (answers, failing tools, crashes, cancels, a client that drops mid-run, a resume, a
bad frame). Every dashboard panel, with its ``job``/``instance`` variables resolved as Grafana
does, returns data; a runtime killed with SIGKILL makes RunwatchRuntimeDown and
RunwatchStuckRuns fire, which resolve once the restarted runtime ends the run.

Embedded deployment: one fresh ``runwatch serve``, scraped once. Every panel returns data on
healthy traffic, each process counts once, and the first tool-pairing violation, the first
isolation violation (both written into the live store as tests/test_checker.py seeds its
corpus) and the first failed delivery each fire their alert. Run with ``-s`` to see the
timeline of each: when the fault was written, when the counter moved, when the alert fired.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from runtime.client import RunwatchClient, RunwatchError
from runtime.events import Event, EventType, Receipt, new_id, now_us
from runtime.lifecycle import RunLifecycle
from runtime.store.audit import AuditStore, Batch, RunInfo

from .conftest import (
    JWT_SECRET,
    make_token,
    scale,
    sqlite_url,
    start_server_process,
    wait_until,
)
from .prom import (
    ROOT,
    SHORT_SLI_WINDOWS,
    Prometheus,
    binary,
    concrete,
    fast_rules,
    resolve_variables,
    run_prometheus,
    scrape_config,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def panel_queries(prom: Prometheus) -> list[tuple[str, str, str]]:
    """Every panel query of every dashboard as Grafana sends it with all targets picked:
    (dashboard file, panel title, PromQL)."""
    out = []
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        model = json.loads(path.read_text())
        variables = resolve_variables(prom, model)
        for panel in model["panels"]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], concrete(target["expr"], variables)))
    return out


def numbers(result: list[dict[str, Any]]) -> list[float]:
    """The values of an instant query that are numbers (a 0 is data; NaN is not)."""
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if not math.isnan(v)]


def wait_numbers(prom: Prometheus, expr: str, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout * scale()
    found: list[float] = []
    while time.monotonic() < deadline:
        found = numbers(prom.query(expr))
        if found:
            return found
        time.sleep(0.25)
    return found


async def assert_every_panel_has_data(prom: Prometheus, timeout: float = 20) -> None:
    missing = []
    for name, title, expr in await asyncio.to_thread(panel_queries, prom):
        if not await asyncio.to_thread(wait_numbers, prom, expr, timeout):
            missing.append(f"{name}: {title}: {expr}")
    assert not missing, "panels without data:\n" + "\n".join(missing)


def value(prom: Prometheus, expr: str) -> float | None:
    found = numbers(prom.query(expr))
    return found[0] if len(found) == 1 else None


def assert_counted_once(prom: Prometheus) -> None:
    """Each process is one runtime and/or one monitor, whatever the jobs."""
    assert value(prom, "count(runwatch_build_info)") == 1
    assert value(prom, "count(runwatch_monitor_build_info)") == 1
    for alert in ("RunwatchScrapedTwice", "RunwatchRuntimeDown", "RunwatchMonitorDown"):
        assert not prom.firing(alert), alert


#: Rounds of :func:`traffic` in which every kind of run, cancel, resume, bad frame and
#: dropped client has happened at least once (the 11th is the first dropped client).
ALL_KINDS = 11


async def traffic(url: str, stop: asyncio.Event, rounds: list[int]) -> None:
    """Real runs of every kind, until told to stop; ``rounds`` gets each finished round."""
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
            rounds.append(i)
            await asyncio.sleep(0.05)
    finally:
        for c in clients:
            await c.close()


async def test_split_deployment_dashboards_and_down_alerts(tmp_path: Path) -> None:
    binary("prometheus")
    db = sqlite_url(tmp_path / "rw.db")
    common = {
        "RUNWATCH_DATABASE_URL": db,
        "RUNWATCH_JWT_SECRET": JWT_SECRET,
        "RUNWATCH_RUN_TIMEOUT_S": "4",
        "RUNWATCH_CHAT_BURST": "100000",
    }
    runtime = start_server_process(tmp_path, common, command="runtime", name="runtime")
    runtime_port = runtime.port  # the restarted runtime comes back on it: the same target
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
    config = scrape_config(
        "split",
        {"runtime-1:8000": [runtime_port], "monitor:8001": [monitor.port]},
        fast_rules(rules_dir),
    )
    try:
        with run_prometheus(tmp_path, config) as prom:
            prom.wait_for(prom.targets_up, 30, "both targets up")
            stop = asyncio.Event()
            rounds: list[int] = []
            load = asyncio.create_task(traffic(runtime.ws_url, stop, rounds))
            await wait_until(lambda: len(rounds) >= ALL_KINDS or load.done(), 60)
            if load.done():
                load.result()

            # Every panel query, variables resolved, returns data while traffic flows (each
            # is asked again until it does, while the traffic goes on).
            try:
                await assert_every_panel_has_data(prom)
            finally:
                stop.set()
                await load
            assert_counted_once(prom)
            assert not prom.firing("RunwatchStuckRuns")

            # A run left open by a runtime killed with SIGKILL: the runtime is down, and its
            # run is stuck. The monitor is still up.
            victim = RunwatchClient(runtime.ws_url, make_token("victim"), reconnect=False)
            await victim.connect()
            run = await victim.chat("wait 30")
            await wait_until(lambda: any(e.type == EventType.TOOL_EXECUTING for e in run.events))
            os.kill(runtime.proc.pid, signal.SIGKILL)
            runtime.proc.wait(10)
            await victim.close()
            await asyncio.to_thread(
                prom.wait_for,
                lambda: prom.firing("RunwatchRuntimeDown"),
                30,
                "RunwatchRuntimeDown firing",
            )
            assert not prom.firing("RunwatchMonitorDown")
            await asyncio.to_thread(
                prom.wait_for,
                lambda: prom.firing("RunwatchStuckRuns"),
                60,
                "RunwatchStuckRuns firing",
            )

            # Recovery: the restarted runtime ends the run; both alerts resolve.
            runtime = start_server_process(
                tmp_path, common, port=runtime_port, command="runtime", name="runtime2"
            )
            await asyncio.to_thread(
                prom.wait_for,
                lambda: (
                    not prom.firing("RunwatchStuckRuns") and not prom.firing("RunwatchRuntimeDown")
                ),
                60,
                "RunwatchStuckRuns and RunwatchRuntimeDown resolved",
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


# ---- the embedded deployment and the first faults --------------------------------------


def _lifecycle(run_id: str, t0: int) -> RunLifecycle:
    clock = itertools.count(t0, 1000)
    return RunLifecycle(run_id, "t-" + run_id, "demo", lambda: next(clock))


def _receipts(events: list[Event], user: str) -> list[Receipt]:
    return [
        Receipt(e.event_id, e.run_id, e.seq, "conn-" + user, user, e.ts_us + 2000, e.ts_us + 5000)
        for e in events
    ]


def unpaired_tool_run(run_id: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    """A completed run whose tool call never completed (I4)."""
    lc = _lifecycle(run_id, t0)
    events = [
        lc.started("what is 6*7"),
        lc.thinking("t"),
        lc.tool_executing("c1", "calculator", {"expression": "6*7"}),
        lc.final_report("42"),
    ]
    lc.open_tools.clear()
    events.append(lc.completed())
    return events, _receipts(events, "alice")


def leaked_run(run_id: str, t0: int) -> tuple[list[Event], list[Receipt]]:
    """A healthy run of alice's, one event of which also went to mallory's connection (I7)."""
    lc = _lifecycle(run_id, t0)
    events = [
        lc.started("what is 6*7"),
        lc.thinking("t"),
        lc.tool_executing("c1", "calculator", {"expression": "6*7"}),
        lc.tool_completed("c1", result={"value": 42}),
        lc.final_report("42"),
        lc.completed(),
    ]
    return events, [*_receipts(events, "alice"), *_receipts(events[2:3], "mallory")]


async def write_faulty_run(store: AuditStore, fault: Any, *, created_us: int) -> tuple[str, float]:
    """Write one faulty run into the live store; returns its run id and when it was written."""
    run_id = new_id()
    events, receipts = fault(run_id, created_us)
    info = RunInfo(run_id, "alice", "t-" + run_id, "demo", "m-" + run_id, "seed", created_us)
    await store.create_run(info, new_thread=True)
    await store.write(
        Batch(events=[(e, True) for e in events], receipts=receipts), events[-1].ts_us + 1000
    )
    return run_id, time.time()


async def fail_one_delivery(url: str) -> float:
    """A client that receives live events and drops without acking: the first failed
    delivery. Returns when the connection closed."""
    flaky = RunwatchClient(url, make_token("flaky"), auto_ack=False, reconnect=False)
    await flaky.connect()
    run = await flaky.chat("wait 3")
    await wait_until(lambda: len(run.events) >= 3)
    await flaky.close()
    return time.time()


@dataclasses.dataclass
class Timeline:
    fault: str
    counter: str
    alert: str
    written: float
    moved: float | None = None
    pending: float | None = None
    fired: float | None = None

    def line(self) -> str:
        def at(t: float | None) -> str:
            if t is None:
                return "never"
            clock = datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]
            return f"{clock} (+{t - self.written:.2f} s)"

        return (
            f"{self.fault}\n"
            f"  written  {at(self.written)}\n"
            f"  counter  {at(self.moved)}  {self.counter}\n"
            f"  pending  {at(self.pending) if self.pending else 'none (the rule has no for:)'}\n"
            f"  fired    {at(self.fired)}  {self.alert}"
        )


def first_above_zero(prom: Prometheus, selector: str, since: float) -> float | None:
    window = int(time.time() - since) + 30
    return next((ts for ts, v in prom.samples(selector, window) if ts >= since - 5 and v > 0), None)


def read_timeline(prom: Prometheus, t: Timeline) -> Timeline:
    """When the counter moved (the first scrape that saw it above 0) and when the alert went
    pending and firing (the first ``ALERTS`` sample of each state), from Prometheus' own data."""
    t.moved = first_above_zero(prom, t.counter, t.written)
    t.pending = first_above_zero(
        prom, f'ALERTS{{alertname="{t.alert}", alertstate="pending"}}', t.written
    )
    t.fired = first_above_zero(
        prom, f'ALERTS{{alertname="{t.alert}", alertstate="firing"}}', t.written
    )
    return t


async def healthy_traffic(url: str) -> None:
    client = RunwatchClient(url, make_token("alice"))
    await client.connect()
    try:
        for text in ("what is 6*7", "hello", "what time is it", "search resume", "what is 2+2"):
            await (await client.chat(text)).wait(20)
    finally:
        await client.close()


async def test_embedded_first_faults_fire_their_alerts(tmp_path: Path) -> None:
    binary("prometheus")
    db = sqlite_url(tmp_path / "rw.db")
    server = start_server_process(
        tmp_path,
        {
            "RUNWATCH_DATABASE_URL": db,
            "RUNWATCH_JWT_SECRET": JWT_SECRET,
            "RUNWATCH_ADMIN_TOKEN": "admin-token-for-the-prometheus-test",
            "RUNWATCH_MONITOR_INTERVAL_S": "0.5",
        },
        command="serve",
        name="serve",
    )
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    config = scrape_config(
        "embedded",
        {"127.0.0.1:8000": [server.port]},
        fast_rules(rules_dir, sli_windows=SHORT_SLI_WINDOWS),
    )
    assert len(config["scrape_configs"]) == 1, "runwatch serve is scraped by one job"
    store = AuditStore.open(db)
    try:
        with run_prometheus(tmp_path, config) as prom:
            prom.wait_for(prom.targets_up, 30, "target up")
            # Before any fault, the series the alerts read are there, at 0.
            for selector in (
                'runwatch_monitor_violations_total{rule="tool_pairing"}',
                'runwatch_monitor_violations_total{rule="isolation"}',
                'runwatch_event_delivery_failures_total{reason="disconnected"}',
            ):
                prom.wait_for(lambda s=selector: value(prom, s) == 0, 10, f"{selector} at 0")

            await healthy_traffic(server.ws_url)
            await assert_every_panel_has_data(prom)
            assert_counted_once(prom)
            for alert in (
                "RunwatchUnpairedToolCalls",
                "RunwatchCrossUserDelivery",
                "RunwatchDeliverySLOFastBurn",
            ):
                assert not prom.firing(alert), f"{alert} fires on healthy traffic"

            # The first fault of each kind since the process started.
            t0 = now_us()
            _, unpaired_at = await write_faulty_run(store, unpaired_tool_run, created_us=t0)
            _, leaked_at = await write_faulty_run(store, leaked_run, created_us=t0)
            failed_at = await fail_one_delivery(server.ws_url)
            timelines = [
                Timeline(
                    "first unpaired tool call (I4), written into the store",
                    'runwatch_monitor_violations_total{rule="tool_pairing"}',
                    "RunwatchUnpairedToolCalls",
                    unpaired_at,
                ),
                Timeline(
                    "first cross-user delivery (I7), written into the store",
                    'runwatch_monitor_violations_total{rule="isolation"}',
                    "RunwatchCrossUserDelivery",
                    leaked_at,
                ),
                Timeline(
                    "first failed delivery: a client dropped without acking",
                    'runwatch_event_delivery_failures_total{reason="disconnected"}',
                    "RunwatchDeliverySLOFastBurn",
                    failed_at,
                ),
            ]
            for t in timelines:
                await asyncio.to_thread(
                    prom.wait_for, lambda t=t: prom.firing(t.alert), 60, f"{t.alert} firing"
                )
            print("\nalert timeline, one runwatch serve, scrape and rule evaluation every 1 s:")
            for t in timelines:
                print((await asyncio.to_thread(read_timeline, prom, t)).line())
                assert t.moved is not None and t.fired is not None and t.fired >= t.moved

            # One violation reads as one, in the raw series and on the dashboard.
            assert value(prom, 'sum(runwatch_monitor_violations_total{rule="tool_pairing"})') == 1
            assert value(prom, 'sum(runwatch_monitor_violations_total{rule="isolation"})') == 1
            assert_counted_once(prom)
            violations = next(
                expr
                for name, title, expr in await asyncio.to_thread(panel_queries, prom)
                if title == "Violations by rule"
            )
            by_rule = {r["metric"]["rule"]: float(r["value"][1]) for r in prom.query(violations)}
            assert by_rule["tool_pairing"] > 0 and by_rule["isolation"] > 0
            assert by_rule["sequence"] == 0
    finally:
        await store.close()
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(30)
            except Exception:
                server.proc.kill()
