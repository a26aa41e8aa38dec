"""Generates runwatch's Grafana dashboards (provisioning-ready JSON) from one description.

    python dashboards/generate.py          # writes dashboards/*.json
    python dashboards/generate.py --check  # exits 1 if the committed JSON is stale

Each dashboard has a stable ``uid``, a ``datasource`` template variable (no ``${DS_...}``
inputs), ``job`` and ``instance`` variables, and every panel a unit. Every raw metric is read
through :func:`m`, which filters on ``job`` and ``instance``, so one set of dashboards serves the
embedded deployment (one job) and the split one (a runtime job and a monitor job) alike; the
recording rules aggregate every runwatch target. Panel ids are unique and the layout fills the
24-column grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
#: Every runwatch process exports one of these (``runwatch serve`` both): the targets to list.
TARGETS = '{__name__=~"runwatch_build_info|runwatch_monitor_build_info"}'
SCOPE = 'job=~"$job", instance=~"$instance"'


#: The description of panels that read a recording rule.
SERVICE_WIDE = (
    "Service-wide: a recording rule over every runwatch target (job and instance do not apply)."
)


def m(metric: str, matchers: str = "") -> str:
    """``metric`` as scraped from the targets picked in the ``job`` and ``instance`` variables."""
    return f"{metric}{{{SCOPE}{', ' + matchers if matchers else ''}}}"


def summed(fn: str, metric: str, by: str = "") -> str:
    """``sum [by (...)] (fn(metric[$__rate_interval]))`` over the picked targets."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({fn}({m(metric)}[{RATE}]))"


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value query variable, all values by default."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"runwatch-{name}"},
        "includeAll": True,
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
    }


def target(expr: str, legend: str = "", ref: str = "A", fmt: str = "time_series") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "format": fmt}


def panel(
    title: str,
    targets: list[dict[str, Any]],
    unit: str,
    *,
    kind: str = "timeseries",
    w: int = 12,
    h: int = 8,
    description: str = "",
    thresholds: list[tuple[float | None, str]] | None = None,
) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    p: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {},
        "_size": (w, h),
    }
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    if kind == "heatmap":
        p["options"] = {"calculate": False, "yAxis": {"unit": unit}, "color": {"scheme": "Oranges"}}
    return p


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Left to right, top to bottom, on the 24-column grid; ids in order."""
    x = y = row_h = 0
    out = []
    for i, p in enumerate(panels, start=1):
        w, h = p.pop("_size")
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"] = i
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        row_h = max(row_h, h)
        out.append(p)
    return out


def dashboard(
    uid: str, title: str, description: str, panels: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["runwatch"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                variable("job", "Job", f"label_values({TARGETS}, job)"),
                variable(
                    "instance",
                    "Instance",
                    f'label_values({TARGETS[:-1]}, job=~"$job"}}, instance)',
                ),
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": layout(panels),
    }


def q(quantile: float, metric: str, by: str = "le") -> str:
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({m(metric + '_bucket')}[{RATE}])))"


def overview() -> dict[str, Any]:
    return dashboard(
        "runwatch-overview",
        "runwatch / Overview",
        "Traffic, runs, tools and connections of the runwatch runtime.",
        [
            panel(
                "Events emitted by type",
                [
                    target(
                        summed("rate", "runwatch_events_emitted_total", "type"),
                        "{{type}}",
                    )
                ],
                "ops",
            ),
            panel(
                "Event frames sent by type (live and replayed)",
                [
                    target(
                        summed("rate", "runwatch_events_sent_total", "type"),
                        "{{type}}",
                    )
                ],
                "ops",
            ),
            panel(
                "Runs started by agent",
                [
                    target(
                        summed("rate", "runwatch_runs_started_total", "agent"),
                        "{{agent}}",
                    )
                ],
                "ops",
                w=8,
            ),
            panel(
                "Runs finished by outcome",
                [
                    target(
                        summed("rate", "runwatch_runs_finished_total", "outcome"),
                        "{{outcome}}",
                    )
                ],
                "ops",
                w=8,
            ),
            panel(
                "Run duration",
                [
                    target(q(0.5, "runwatch_run_duration_seconds"), "p50"),
                    target(q(0.95, "runwatch_run_duration_seconds"), "p95", "B"),
                ],
                "s",
                w=8,
            ),
            panel(
                "Tool calls by tool and status",
                [
                    target(
                        summed("rate", "runwatch_tool_calls_total", "tool, status"),
                        "{{tool}} {{status}}",
                    )
                ],
                "ops",
            ),
            panel(
                "Tool duration p95 by tool",
                [target(q(0.95, "runwatch_tool_duration_seconds", "le, tool"), "{{tool}}")],
                "s",
            ),
            panel(
                "Processes scraped",
                [
                    target(f"count({m('runwatch_build_info')})", "runtimes", "A"),
                    target(f"count({m('runwatch_monitor_build_info')})", "monitors", "B"),
                ],
                "short",
                kind="stat",
                w=6,
                description="Each process counts once (runwatch serve is one runtime and one "
                "monitor); more than there are processes means a target scraped twice.",
            ),
            panel(
                "Open connections",
                [target(f"sum({m('runwatch_connections_open')})", "open")],
                "short",
                kind="stat",
                w=6,
            ),
            panel(
                "Connection attempts by result",
                [
                    target(
                        summed("rate", "runwatch_connections_total", "result"),
                        "{{result}}",
                    )
                ],
                "ops",
                w=6,
            ),
            panel(
                "Disconnects by close code",
                [
                    target(
                        summed("rate", "runwatch_disconnects_total", "code"),
                        "{{code}}",
                    )
                ],
                "ops",
                w=6,
            ),
            panel(
                "Resumes by result",
                [
                    target(
                        summed("rate", "runwatch_resumes_total", "result"),
                        "{{result}}",
                    )
                ],
                "ops",
                w=6,
            ),
            panel(
                "Replayed event frames",
                [target(summed("rate", "runwatch_replayed_events_total"), "replayed")],
                "ops",
            ),
            panel(
                "Protocol errors by code",
                [
                    target(
                        summed("rate", "runwatch_protocol_errors_total", "code"),
                        "{{code}}",
                    )
                ],
                "ops",
            ),
        ],
    )


def delivery() -> dict[str, Any]:
    slo = [(None, "red"), (0.999, "green")]
    return dashboard(
        "runwatch-delivery-slo",
        "runwatch / Delivery SLO",
        "99.9% of events acknowledged by the user's client within 1 s: "
        "SLI, burn rates, budget, latency.",
        [
            panel(
                "Delivery SLI, last 1 h",
                [target("1 - runwatch:delivery_sli_error_ratio:rate1h", "SLI")],
                "percentunit",
                kind="stat",
                w=6,
                thresholds=slo,
                description=SERVICE_WIDE,
            ),
            panel(
                "Delivery SLI, last 1 d",
                [target("1 - runwatch:delivery_sli_error_ratio:rate1d", "SLI")],
                "percentunit",
                kind="stat",
                w=6,
                thresholds=slo,
                description=SERVICE_WIDE,
            ),
            panel(
                "Error budget left (3 d)",
                [target("runwatch:delivery_error_budget_remaining:ratio3d", "budget")],
                "percentunit",
                kind="stat",
                w=6,
                thresholds=[(None, "red"), (0.25, "orange"), (0.5, "green")],
                description=SERVICE_WIDE,
            ),
            panel(
                "Events resolved (acked or failed)",
                [target("runwatch:delivery_events:rate5m", "events/s")],
                "ops",
                kind="stat",
                w=6,
                description=SERVICE_WIDE,
            ),
            panel(
                "Burn rate",
                [
                    target("runwatch:delivery_burn_rate:rate5m", "5m", "A"),
                    target("runwatch:delivery_burn_rate:rate30m", "30m", "B"),
                    target("runwatch:delivery_burn_rate:rate1h", "1h", "C"),
                    target("runwatch:delivery_burn_rate:rate6h", "6h", "D"),
                    target("runwatch:delivery_burn_rate:rate1d", "1d", "E"),
                ],
                "none",
                description="1 = spending the budget exactly over the SLO period; "
                "pages at 14.4 (1 h) and 6 (6 h). "
                "Service-wide: recording rules over every runwatch target.",
                thresholds=[(None, "green"), (6, "orange"), (14.4, "red")],
            ),
            panel(
                "Error ratio (late or never acked)",
                [
                    target("runwatch:delivery_sli_error_ratio:rate5m", "5m"),
                    target("runwatch:delivery_sli_error_ratio:rate1h", "1h", "B"),
                ],
                "percentunit",
                description=SERVICE_WIDE,
            ),
            panel(
                "Emit to client ack latency",
                [
                    target(q(0.5, "runwatch_event_delivery_seconds"), "p50", "A"),
                    target(q(0.9, "runwatch_event_delivery_seconds"), "p90", "B"),
                    target(q(0.99, "runwatch_event_delivery_seconds"), "p99", "C"),
                ],
                "s",
            ),
            panel(
                "Emit to client ack latency heatmap",
                [
                    target(
                        summed("increase", "runwatch_event_delivery_seconds_bucket", "le"),
                        "{{le}}",
                        fmt="heatmap",
                    )
                ],
                "s",
                kind="heatmap",
            ),
            panel(
                "Emit to socket write latency",
                [
                    target(q(0.5, "runwatch_event_send_seconds"), "p50"),
                    target(q(0.99, "runwatch_event_send_seconds"), "p99", "B"),
                ],
                "s",
                w=8,
            ),
            panel(
                "Acked vs sent live",
                [
                    target(summed("rate", "runwatch_events_acked_total"), "acked", "A"),
                    target(
                        summed("rate", "runwatch_events_sent_total")
                        + " - "
                        + summed("rate", "runwatch_replayed_events_total"),
                        "sent live",
                        "B",
                    ),
                ],
                "ops",
                w=8,
            ),
            panel(
                "Delivery failures and deferred events",
                [
                    target(
                        summed("rate", "runwatch_event_delivery_failures_total", "reason"),
                        "failed: {{reason}}",
                        "A",
                    ),
                    target(
                        summed("rate", "runwatch_events_deferred_total"),
                        "deferred (owner offline)",
                        "B",
                    ),
                ],
                "ops",
                w=8,
                description="Failed: sent live and never acked before the connection closed; "
                "they count against the delivery SLI. Deferred: emitted while the owner had no "
                "live connection on the run; outside the SLI, the client gets them by resume.",
            ),
        ],
    )


def run_health() -> dict[str, Any]:
    return dashboard(
        "runwatch-run-health",
        "runwatch / Run health",
        "What the monitor finds in the stored runs, the monitor's own health, and the audit store.",
        [
            panel(
                "Violations by rule",
                [
                    target(
                        summed("increase", "runwatch_monitor_violations_total", "rule"),
                        "{{rule}}",
                    )
                ],
                "short",
                description="Runs breaking a rule; see docs/monitor.md for each rule.",
            ),
            panel(
                "Runs judged by verdict",
                [
                    target(
                        summed("rate", "runwatch_monitor_runs_checked_total", "verdict"),
                        "{{verdict}}",
                    )
                ],
                "ops",
            ),
            panel(
                "Stuck runs",
                [target(f"max({m('runwatch_monitor_stuck_runs')})", "stuck")],
                "short",
                kind="stat",
                w=6,
                thresholds=[(None, "green"), (1, "red")],
            ),
            panel(
                "Open runs",
                [target(f"max({m('runwatch_monitor_open_runs')})", "open")],
                "short",
                kind="stat",
                w=6,
            ),
            panel(
                "Monitor lag",
                [target(f"max({m('runwatch_monitor_lag_seconds')})", "lag")],
                "s",
                kind="stat",
                w=6,
                thresholds=[(None, "green"), (120, "red")],
            ),
            panel(
                "Since the monitor's last pass",
                [
                    target(
                        f"time() - max({m('runwatch_monitor_last_check_timestamp_seconds')})", "age"
                    )
                ],
                "s",
                kind="stat",
                w=6,
                thresholds=[(None, "green"), (300, "red")],
            ),
            panel(
                "Emit to commit latency",
                [
                    target(q(0.5, "runwatch_event_persist_seconds"), "p50", "A"),
                    target(q(0.99, "runwatch_event_persist_seconds"), "p99", "B"),
                ],
                "s",
                description="Persistence SLO: 99.9% within 250 ms.",
            ),
            panel(
                "Committed within 250 ms (30 m)",
                [target("runwatch:persist_within_slo:ratio30m", "ratio")],
                "percentunit",
                kind="stat",
                w=6,
                thresholds=[(None, "red"), (0.999, "green")],
                description=SERVICE_WIDE,
            ),
            panel(
                "Audit store up",
                [target(f"min({m('runwatch_audit_store_up')})", "up")],
                "bool",
                kind="stat",
                w=6,
                thresholds=[(None, "red"), (1, "green")],
            ),
            panel(
                "Audit queue and journal",
                [
                    target(f"sum({m('runwatch_audit_queue_depth')})", "writer queue", "A"),
                    target(f"sum({m('runwatch_audit_journal_depth')})", "outage journal", "B"),
                ],
                "short",
                w=8,
            ),
            panel(
                "Group commit size",
                [
                    target(q(0.5, "runwatch_audit_batch_size"), "p50"),
                    target(q(0.99, "runwatch_audit_batch_size"), "p99", "B"),
                ],
                "short",
                w=8,
            ),
            panel(
                "Audit write errors",
                [target(summed("increase", "runwatch_audit_write_errors_total"), "errors")],
                "short",
                w=8,
            ),
        ],
    )


DASHBOARDS = {
    "overview.json": overview,
    "delivery-slo.json": delivery,
    "run-health.json": run_health,
}


def render() -> dict[str, str]:
    return {
        name: json.dumps(build(), indent=2, sort_keys=False) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("stale dashboards (run python dashboards/generate.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
