"""Every series of a closed label set exists at 0 from process start (docs/metrics.md).

``rate()`` and ``increase()`` see an increment only between two samples, so a series born at
1 hides its first occurrence from every alert. These tests scrape fresh processes for every
closed-set series, and hold the code's label values to the sets the metrics pre-create.
"""

from __future__ import annotations

import ast
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import RULES, VERDICTS, MonitorMetrics
from monitor.rules import Rule, Verdict
from runtime.agents import AgentRegistry
from runtime.delivery import FailureReason
from runtime.events import EventType
from runtime.lifecycle import RunOutcome
from runtime.metrics import (
    CONNECTION_RESULTS,
    DELIVERY_BUCKETS,
    DELIVERY_FAILURE_REASONS,
    DISCONNECT_CODES,
    EVENT_TYPES,
    OTHER,
    PROTOCOL_ERROR_CODES,
    REJECTED_KINDS,
    RESUME_RESULTS,
    RUN_OUTCOMES,
    RuntimeMetrics,
)
from runtime.protocol import CloseCode, ProtocolErrorCode
from runtime.tools import builtin_tools

from .conftest import JWT_SECRET, sqlite_url, start_server_process

ROOT = Path(__file__).resolve().parents[1]

Series = tuple[str, frozenset[tuple[str, str]]]


def series(name: str, **labels: str) -> Series:
    return name, frozenset(labels.items())


def runtime_series(agents: list[str], tools: list[str]) -> set[Series]:
    """What a fresh runtime must export at 0, written from the contract, not from the code."""
    out: set[Series] = set()
    for t in (e.value for e in EventType):
        for name in ("emitted", "sent", "acked", "deferred"):
            out.add(series(f"runwatch_events_{name}_total", type=t))
        out.add(series("runwatch_event_delivery_seconds_count", type=t))
        for le in DELIVERY_BUCKETS:
            out.add(series("runwatch_event_delivery_seconds_bucket", type=t, le=str(le)))
    for reason in DELIVERY_FAILURE_REASONS:
        out.add(series("runwatch_event_delivery_failures_total", reason=reason))
    for result in CONNECTION_RESULTS:
        out.add(series("runwatch_connections_total", result=result))
    for code in [*(str(int(c)) for c in CloseCode), "1005", "1006", "other"]:
        out.add(series("runwatch_disconnects_total", code=code))
    for result in ("ok", "not_found"):
        out.add(series("runwatch_resumes_total", result=result))
    for kind in ("event", "run", "record"):
        out.add(series("runwatch_audit_rejected_total", kind=kind))
    for name in (
        "runwatch_audit_writer_restarts_total",
        "runwatch_audit_journal_errors_total",
        "runwatch_audit_writer_stalled",
    ):
        out.add(series(name))
    for code in (c.value for c in ProtocolErrorCode):
        out.add(series("runwatch_protocol_errors_total", code=code))
    for agent in agents:
        out.add(series("runwatch_runs_started_total", agent=agent))
        out.add(series("runwatch_run_duration_seconds_count", agent=agent))
        for outcome in ("completed", "error", "cancelled", "timeout", "runtime_restarted"):
            out.add(series("runwatch_runs_finished_total", agent=agent, outcome=outcome))
    for tool in tools:
        out.add(series("runwatch_tool_duration_seconds_count", tool=tool))
        for status in ("ok", "error"):
            out.add(series("runwatch_tool_calls_total", tool=tool, status=status))
    return out


def monitor_series() -> set[Series]:
    out = {series("runwatch_monitor_runs_checked_total", verdict=v) for v in ("pass", "fail")}
    out |= {series("runwatch_monitor_violations_total", rule=r.value) for r in Rule}
    return out


def samples(text: str) -> dict[Series, float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def registry_samples(registry: CollectorRegistry) -> dict[Series, float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
    }


def assert_all_at_zero(found: dict[Series, float], expected: set[Series]) -> None:
    missing = sorted(f"{n}{dict(sorted(labels))}" for n, labels in expected - found.keys())
    assert not missing, f"{len(missing)} closed-set series missing:\n" + "\n".join(missing)
    nonzero = {k: v for k, v in found.items() if k in expected and v != 0}
    assert not nonzero, f"not at 0 on a fresh process: {nonzero}"


# ---- the metric objects -------------------------------------------------------------------


def test_fresh_runtime_metrics_export_every_closed_set_series_at_zero() -> None:
    registry = CollectorRegistry()
    RuntimeMetrics(registry, agents=["demo", "llm"], tools=["calculator", "wait"])
    assert_all_at_zero(
        registry_samples(registry), runtime_series(["demo", "llm"], ["calculator", "wait"])
    )


def test_agents_and_tools_registered_later_start_at_zero() -> None:
    registry = CollectorRegistry()
    metrics = RuntimeMetrics(registry)
    assert registry.get_sample_value("runwatch_runs_started_total", {"agent": "late"}) is None
    metrics.agent_registered("late")
    metrics.tool_registered("probe")
    assert_all_at_zero(registry_samples(registry), runtime_series(["late"], ["probe"]))


def test_fresh_monitor_metrics_export_every_rule_and_verdict_at_zero() -> None:
    registry = CollectorRegistry()
    MonitorMetrics(registry, version="9.9.9")
    found = registry_samples(registry)
    assert_all_at_zero(found, monitor_series())
    assert found[series("runwatch_monitor_build_info", version="9.9.9")] == 1


def test_a_client_chosen_close_code_counts_as_other() -> None:
    registry = CollectorRegistry()
    metrics = RuntimeMetrics(registry)
    metrics.disconnects.labels(code="3999").inc()
    metrics.disconnects.labels(code="4008").inc()
    found = registry_samples(registry)
    assert found[series("runwatch_disconnects_total", code=OTHER)] == 1
    assert found[series("runwatch_disconnects_total", code="4008")] == 1
    assert series("runwatch_disconnects_total", code="3999") not in found


# ---- the code uses no label value outside its set -----------------------------------------


def label_literals(metric_attr: str, label: str) -> Iterator[tuple[str, str]]:
    """Every string literal passed as ``label=`` to ``<...>.<metric_attr>.labels(...)``."""
    for path in sorted((ROOT / "runtime").rglob("*.py")) + sorted((ROOT / "monitor").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "labels"
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr == metric_attr
            ):
                continue
            for kw in node.keywords:
                if kw.arg != label:
                    continue
                for const in ast.walk(kw.value):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        yield f"{path.relative_to(ROOT)}:{node.lineno}", const.value


@pytest.mark.parametrize(
    ("metric_attr", "label", "closed_set"),
    [
        ("connections", "result", CONNECTION_RESULTS),
        ("resumes", "result", RESUME_RESULTS),
        ("audit_rejected", "kind", REJECTED_KINDS),
    ],
)
def test_label_values_in_code_are_in_their_closed_set(
    metric_attr: str, label: str, closed_set: tuple[str, ...]
) -> None:
    used = list(label_literals(metric_attr, label))
    assert used, f"no literal {label}= found for {metric_attr}: the scan is stale"
    outside = [(where, value) for where, value in used if value not in closed_set]
    assert not outside, f"label values not pre-created at 0: {outside}"


def test_enum_backed_sets_cover_their_enums() -> None:
    assert set(EVENT_TYPES) == {t.value for t in EventType}
    assert set(PROTOCOL_ERROR_CODES) == {c.value for c in ProtocolErrorCode}
    assert set(RUN_OUTCOMES) == set(RunOutcome.ALL)
    assert set(RULES) == {r.value for r in Rule}
    assert set(VERDICTS) == {v.value for v in Verdict}
    reasons = {v for k, v in vars(FailureReason).items() if k.isupper() and isinstance(v, str)}
    assert reasons == set(DELIVERY_FAILURE_REASONS)
    for code in [*CloseCode, 1000, 1005, 1006, 3000]:
        assert FailureReason.of(code) in DELIVERY_FAILURE_REASONS
    assert {str(int(c)) for c in CloseCode} <= set(DISCONNECT_CODES)


def test_the_documented_label_values_are_the_closed_sets() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()

    def documented(heading: str) -> set[str]:
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"- {heading}"))
        start = doc.index(line)
        end = min(i for i in (doc.find("\n- ", start), doc.find("\n\n", start)) if i > 0)
        return set(re.findall(r"`([a-z0-9_]+)`", doc[start:end])) - {heading.split("`")[1]}

    assert documented("`result` (connections)") == set(CONNECTION_RESULTS)
    assert documented("`result` (resumes)") == set(RESUME_RESULTS)
    assert documented("`kind` (audit rejected)") == set(REJECTED_KINDS)
    assert documented("`reason` (delivery failures)") == set(DELIVERY_FAILURE_REASONS)
    assert documented("`code` (disconnects)") == set(DISCONNECT_CODES)
    assert documented("`code` (protocol errors)") == set(PROTOCOL_ERROR_CODES)


# ---- a fresh process, scraped -------------------------------------------------------------


def scrape_fresh(tmp_path: Path, command: str) -> dict[Series, float]:
    env = {
        "RUNWATCH_DATABASE_URL": sqlite_url(tmp_path / "rw.db"),
        "RUNWATCH_JWT_SECRET": JWT_SECRET,
        "RUNWATCH_ADMIN_TOKEN": "admin-token-for-the-metrics-test",
    }
    server = start_server_process(tmp_path, env, command=command, name=command)
    try:
        return samples(httpx.get(f"{server.http_url}/metrics", timeout=10).text)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)


def test_a_fresh_serve_process_exports_every_closed_set_series_at_zero(tmp_path: Path) -> None:
    found = scrape_fresh(tmp_path, "serve")
    agents = AgentRegistry.with_builtins().names()
    tools = builtin_tools().names()
    assert {"demo", "llm"} <= set(agents) and {"calculator", "fail"} <= set(tools)
    assert_all_at_zero(found, runtime_series(agents, tools) | monitor_series())
    # One process, one runtime and one monitor: each says so once.
    assert sum(1 for name, _ in found if name == "runwatch_build_info") == 1
    assert sum(1 for name, _ in found if name == "runwatch_monitor_build_info") == 1


def test_split_processes_keep_their_series_apart(tmp_path: Path) -> None:
    runtime = scrape_fresh(tmp_path, "runtime")
    monitor = scrape_fresh(tmp_path, "monitor")
    assert_all_at_zero(runtime, runtime_series(["demo"], ["calculator"]))
    assert_all_at_zero(monitor, monitor_series())
    assert not [n for n, _ in runtime if n.startswith("runwatch_monitor_")]
    assert all(n.startswith("runwatch_monitor_") for n, _ in monitor), sorted(
        {n for n, _ in monitor if not n.startswith("runwatch_monitor_")}
    )
