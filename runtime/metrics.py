"""Runtime metrics (SPEC section 6), built on an injected ``CollectorRegistry``.

Names, labels and units are part of the contract: dashboards and alert rules query them.
Label values are closed sets (documented in ``docs/metrics.md``); no user, run, thread or
connection id is ever a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = [
    "DELIVERY_BUCKETS",
    "DELIVERY_SLO_S",
    "PERSIST_BUCKETS",
    "PERSIST_SLO_S",
    "RuntimeMetrics",
]

#: SLO thresholds; every histogram has a bucket exactly at its threshold.
DELIVERY_SLO_S = 1.0
PERSIST_SLO_S = 0.25

DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PERSIST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
SEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
RUN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOOL_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class RuntimeMetrics:
    """Every runtime metric object, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, version: str = "0.0.0") -> None:
        r = registry
        self.registry = registry
        self.events_emitted = Counter(
            "runwatch_events_emitted_total", "Events emitted by the runtime.", ["type"], registry=r
        )
        self.events_sent = Counter(
            "runwatch_events_sent_total",
            "Event frames written to a socket, live or replayed.",
            ["type"],
            registry=r,
        )
        self.events_acked = Counter(
            "runwatch_events_acked_total",
            "Live-sent events acknowledged by an owner connection (counted once per event).",
            ["type"],
            registry=r,
        )
        self.events_deferred = Counter(
            "runwatch_events_deferred_total",
            "Events emitted while the owner had no live connection subscribed to the run.",
            ["type"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "runwatch_event_delivery_seconds",
            "Emission to first client acknowledgement, for events sent live.",
            ["type"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.send_seconds = Histogram(
            "runwatch_event_send_seconds",
            "Emission to socket write, live sends only.",
            buckets=SEND_BUCKETS,
            registry=r,
        )
        self.persist_seconds = Histogram(
            "runwatch_event_persist_seconds",
            "Emission to commit in the audit store (or the local journal).",
            buckets=PERSIST_BUCKETS,
            registry=r,
        )
        self.delivery_failures = Counter(
            "runwatch_event_delivery_failures_total",
            "Events sent live but never acknowledged before the connection closed.",
            ["reason"],
            registry=r,
        )
        self.audit_queue_depth = Gauge(
            "runwatch_audit_queue_depth", "Items waiting for the audit writer.", registry=r
        )
        self.audit_batch_size = Histogram(
            "runwatch_audit_batch_size",
            "Items per group commit.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.audit_write_errors = Counter(
            "runwatch_audit_write_errors_total", "Failed audit store commits.", registry=r
        )
        self.runs_started = Counter(
            "runwatch_runs_started_total", "Runs started.", ["agent"], registry=r
        )
        self.runs_finished = Counter(
            "runwatch_runs_finished_total",
            "Runs ended, by outcome.",
            ["agent", "outcome"],
            registry=r,
        )
        self.run_duration = Histogram(
            "runwatch_run_duration_seconds",
            "Run duration from start to terminal event.",
            ["agent"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "runwatch_tool_calls_total", "Tool calls, by status.", ["tool", "status"], registry=r
        )
        self.tool_duration = Histogram(
            "runwatch_tool_duration_seconds",
            "Tool call duration.",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=r,
        )
        self.connections_open = Gauge(
            "runwatch_connections_open", "Authenticated WebSocket connections open.", registry=r
        )
        self.connections = Counter(
            "runwatch_connections_total",
            "WebSocket connection attempts, by result.",
            ["result"],
            registry=r,
        )
        self.disconnects = Counter(
            "runwatch_disconnects_total", "Closed connections, by close code.", ["code"], registry=r
        )
        self.resumes = Counter(
            "runwatch_resumes_total", "Resume requests, by result.", ["result"], registry=r
        )
        self.replayed_events = Counter(
            "runwatch_replayed_events_total", "Event frames sent by resume.", registry=r
        )
        self.protocol_errors = Counter(
            "runwatch_protocol_errors_total", "Error frames sent, by code.", ["code"], registry=r
        )
        self.journal_depth = Gauge(
            "runwatch_audit_journal_depth",
            "Events held in the local journal waiting for the audit store.",
            registry=r,
        )
        self.store_up = Gauge(
            "runwatch_audit_store_up", "1 when the last audit store commit succeeded.", registry=r
        )
        self.build_info = Info("runwatch_build", "runwatch version.", registry=r)
        self.build_info.info({"version": version})
        self.store_up.set(1)
