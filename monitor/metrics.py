"""Monitor metrics (SPEC section 6), built on an injected ``CollectorRegistry``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["MonitorMetrics"]


class MonitorMetrics:
    """Every monitor metric object, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.registry = registry
        self.runs_checked = Counter(
            "runwatch_monitor_runs_checked_total",
            "Runs judged by the checker, by verdict (pass, fail).",
            ["verdict"],
            registry=r,
        )
        self.violations = Counter(
            "runwatch_monitor_violations_total",
            "Violations found, by rule.",
            ["rule"],
            registry=r,
        )
        self.open_runs = Gauge(
            "runwatch_monitor_open_runs", "Runs started and not yet ended.", registry=r
        )
        self.stuck_runs = Gauge(
            "runwatch_monitor_stuck_runs", "Runs open past their timeout plus grace.", registry=r
        )
        self.lag_seconds = Gauge(
            "runwatch_monitor_lag_seconds",
            "Age of the newest stored event the checker has not yet read (0 when caught up).",
            registry=r,
        )
        self.last_check = Gauge(
            "runwatch_monitor_last_check_timestamp_seconds",
            "Unix time of the checker's last completed pass.",
            registry=r,
        )
        for verdict in ("pass", "fail"):
            self.runs_checked.labels(verdict=verdict)
