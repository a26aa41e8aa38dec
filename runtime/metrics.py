"""Runtime metrics (docs/metrics.md), built on an injected ``CollectorRegistry``.

Names, labels and units are part of the contract: dashboards and alert rules query them.
No user, run, thread or connection id is ever a label.

Every label whose values form a closed set exports each of its series at 0 from the moment
the metrics are built (per-agent and per-tool series from registration, see
:meth:`RuntimeMetrics.agent_registered`), because ``rate()`` and ``increase()`` only see an
increment between two samples: a series born at 1 hides its first occurrence, and that is
the one an alert must not miss. The sets are the constants below (documented in
``docs/metrics.md``); ``tests/test_metrics_zero.py`` scrapes a fresh process for them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .events import EventType
from .lifecycle import RunOutcome
from .protocol import CloseCode, ProtocolErrorCode

__all__ = [
    "CONNECTION_RESULTS",
    "DELIVERY_BUCKETS",
    "DELIVERY_FAILURE_REASONS",
    "DELIVERY_SLO_S",
    "DISCONNECT_CODES",
    "EVENT_TYPES",
    "OTHER",
    "PERSIST_BUCKETS",
    "PERSIST_SLO_S",
    "PROTOCOL_ERROR_CODES",
    "REJECTED_KINDS",
    "RESUME_RESULTS",
    "RUN_OUTCOMES",
    "TOOL_STATUSES",
    "UNKNOWN_TOOL",
    "ClosedLabel",
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

# The closed label sets (docs/metrics.md). A value used in code and missing here would be born
# at 1 and hide its first occurrence; tests/test_metrics_zero.py checks the code against them.

#: ``type``: the event types.
EVENT_TYPES: tuple[str, ...] = tuple(t.value for t in EventType)
#: ``outcome`` of ``runwatch_runs_finished_total``.
RUN_OUTCOMES: tuple[str, ...] = RunOutcome.ALL
#: ``status`` of ``runwatch_tool_calls_total``.
TOOL_STATUSES: tuple[str, ...] = ("ok", "error")
#: The ``tool`` label of a call to a tool that is not registered (an agent's invention).
UNKNOWN_TOOL = "unknown"
#: ``result`` of ``runwatch_connections_total`` (set in ``runtime/session.py``).
CONNECTION_RESULTS: tuple[str, ...] = (
    "accepted",
    "unauthorized",
    "no_connect",
    "timeout",
    "too_many",
    "shutting_down",
    "abandoned",
)
#: ``result`` of ``runwatch_resumes_total`` (set in ``runtime/runs.py``).
RESUME_RESULTS: tuple[str, ...] = ("ok", "not_found")
#: ``reason`` of ``runwatch_event_delivery_failures_total`` (``runtime.delivery.FailureReason``).
DELIVERY_FAILURE_REASONS: tuple[str, ...] = (
    "disconnected",
    "slow_consumer",
    "server_restart",
    "token_expired",
    "protocol_violation",
    "error",
)
#: ``code`` of ``runwatch_protocol_errors_total``.
PROTOCOL_ERROR_CODES: tuple[str, ...] = tuple(c.value for c in ProtocolErrorCode)
#: ``kind`` of ``runwatch_audit_rejected_total``: what the store refused for good (set in
#: ``runtime/store/writer.py``).
REJECTED_KINDS: tuple[str, ...] = ("event", "run", "record")
#: Counted in place of a label value outside its closed set.
OTHER = "other"
#: ``code`` of ``runwatch_disconnects_total``: the codes runwatch closes with, the two a
#: server sees when the peer sends none (1005) or vanishes (1006), and ``other`` for any
#: other code a client chooses to close with (a client must not mint series).
DISCONNECT_CODES: tuple[str, ...] = (
    *sorted({str(int(c)) for c in CloseCode} | {"1005", "1006"}),
    OTHER,
)

M = TypeVar("M", Counter, Histogram)


class ClosedLabel(Generic[M]):
    """A labelled metric whose ``label`` is held to a closed set: any other value is counted
    as ``other``. Used where a peer, not runwatch, picks the value."""

    def __init__(self, metric: M, label: str, values: Collection[str]) -> None:
        self.metric: M = metric
        self.label = label
        self.values = frozenset(values)

    def labels(self, **labels: str) -> M:
        if labels[self.label] not in self.values:
            labels[self.label] = OTHER
        return self.metric.labels(**labels)


class RuntimeMetrics:
    """Every runtime metric object, registered on ``registry``, each closed-set series at 0.

    ``agents`` and ``tools`` are the names registered at start; their series start at 0 here,
    and :meth:`agent_registered` / :meth:`tool_registered` do the same for later ones.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        version: str = "0.0.0",
        *,
        agents: Iterable[str] = (),
        tools: Iterable[str] = (),
    ) -> None:
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
        self.disconnects = ClosedLabel(
            Counter(
                "runwatch_disconnects_total",
                "Closed connections, by close code.",
                ["code"],
                registry=r,
            ),
            "code",
            DISCONNECT_CODES,
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
        self.audit_rejected = Counter(
            "runwatch_audit_rejected_total",
            "Items the audit store refused for good (isolated from their batch), by kind.",
            ["kind"],
            registry=r,
        )
        self.audit_writer_restarts = Counter(
            "runwatch_audit_writer_restarts_total",
            "Audit writer restarts after an unexpected error.",
            registry=r,
        )
        self.audit_journal_errors = Counter(
            "runwatch_audit_journal_errors_total",
            "Failed appends to the local outage journal (full bound, full disk, I/O error).",
            registry=r,
        )
        #: 1 while the audit writer has work it cannot make progress on (``/readyz`` is 503);
        #: the writer sets its function (see ``AuditWriter``).
        self.audit_writer_stalled = Gauge(
            "runwatch_audit_writer_stalled",
            "1 while the audit writer has pending events and has made no progress for a while.",
            registry=r,
        )
        self.build_info = Info("runwatch_build", "runwatch version.", registry=r)
        self.build_info.info({"version": version})
        self.store_up.set(1)
        self._zero_closed_sets()
        self.registered(agents=agents, tools=tools)

    def _zero_closed_sets(self) -> None:
        """Create every series of every closed label set, at 0 (see the module docstring)."""
        for t in EVENT_TYPES:
            for per_type in (
                self.events_emitted,
                self.events_sent,
                self.events_acked,
                self.events_deferred,
            ):
                per_type.labels(type=t)
            self.delivery_seconds.labels(type=t)
        for reason in DELIVERY_FAILURE_REASONS:
            self.delivery_failures.labels(reason=reason)
        for result in CONNECTION_RESULTS:
            self.connections.labels(result=result)
        for code in DISCONNECT_CODES:
            self.disconnects.labels(code=code)
        for result in RESUME_RESULTS:
            self.resumes.labels(result=result)
        for kind in REJECTED_KINDS:
            self.audit_rejected.labels(kind=kind)
        for code in PROTOCOL_ERROR_CODES:
            self.protocol_errors.labels(code=code)

    def agent_registered(self, name: str) -> None:
        """Start the agent's run series at 0, so its first run (and first error) is seen."""
        self.runs_started.labels(agent=name)
        for outcome in RUN_OUTCOMES:
            self.runs_finished.labels(agent=name, outcome=outcome)
        self.run_duration.labels(agent=name)

    def tool_registered(self, name: str) -> None:
        """Start the tool's call series at 0, so its first call (and first failure) is seen."""
        for status in TOOL_STATUSES:
            self.tool_calls.labels(tool=name, status=status)
        self.tool_duration.labels(tool=name)

    def registered(self, *, agents: Iterable[str] = (), tools: Iterable[str] = ()) -> None:
        """:meth:`agent_registered` and :meth:`tool_registered` for each name."""
        for name in agents:
            self.agent_registered(name)
        for name in tools:
            self.tool_registered(name)
        self.tool_registered(UNKNOWN_TOOL)
