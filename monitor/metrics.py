"""Monitor metrics (docs/metrics.md), built on an injected ``CollectorRegistry``.

Every monitor series is named ``runwatch_monitor_*``, so where the monitor runs inside
``runwatch serve`` its series stay apart from the runtime's on the one ``/metrics``;
``runwatch_monitor_build_info`` says a monitor is scraped, whatever the scrape job is called.
Each ``rule`` and ``verdict`` series exists at 0 from the start, so that ``increase()`` sees
the first violation (see ``runtime/metrics.py``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from runtime import __version__

from .rules import Rule, Verdict

__all__ = ["RULES", "VERDICTS", "MonitorMetrics"]

#: ``rule`` of ``runwatch_monitor_violations_total``: every rule of the engine.
RULES: tuple[str, ...] = tuple(r.value for r in Rule)
#: ``verdict`` of ``runwatch_monitor_runs_checked_total``.
VERDICTS: tuple[str, ...] = tuple(v.value for v in Verdict)


class MonitorMetrics:
    """Every monitor metric object, registered on ``registry``, each closed-set series at 0."""

    def __init__(self, registry: CollectorRegistry, version: str = __version__) -> None:
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
            "How long the oldest stored event not yet read, or the longest-waiting run due to "
            "be judged and left for a later pass, has waited (0 when caught up).",
            registry=r,
        )
        self.last_check = Gauge(
            "runwatch_monitor_last_check_timestamp_seconds",
            "Unix time of the checker's last completed pass (0 until the first one).",
            registry=r,
        )
        self.build_info = Info("runwatch_monitor_build", "runwatch monitor version.", registry=r)
        self.build_info.info({"version": version})
        for verdict in VERDICTS:
            self.runs_checked.labels(verdict=verdict)
        for rule in RULES:
            self.violations.labels(rule=rule)
