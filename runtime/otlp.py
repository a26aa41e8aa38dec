"""The OpenTelemetry SDK side of run traces: imported only when ``OTEL_EXPORTER_OTLP_*`` is set.

:class:`OtlpBackend` turns :class:`~runtime.tracing.SpanPlan` trees into SDK spans with their
explicit start and end times, the root's trace id taken from the run id, and hands them to a
``BatchSpanProcessor`` (bounded queue, ``OTEL_BSP_*``) in front of the OTLP exporter
(``http/protobuf`` by default; ``grpc`` when ``opentelemetry-exporter-otlp-proto-grpc`` is
installed). Everything else is the SDK's own reading of the standard variables: endpoint,
headers, timeout, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
span limits.

Export runs on the processor's thread. A failed export counts in
``runwatch_trace_export_errors_total`` and is logged once when export starts failing and once
when it recovers (the exporter's own per-attempt messages are kept back, their last one named in
that log line).

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    TracingConfigError
"""

from __future__ import annotations

import contextvars
import logging
import random
import threading
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import __version__
from .errors import TracingConfigError
from .tracing import SpanPlan, TraceMetrics

__all__ = ["OtlpBackend", "TracingConfigError"]

log = logging.getLogger("runwatch.tracing")

_KINDS = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT}


class _RunIds(IdGenerator):
    """Random span ids; the trace id of a run's root span is the run id (set around its start)."""

    def __init__(self) -> None:
        self.next_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
            "runwatch_trace_id", default=None
        )

    def generate_span_id(self) -> int:
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self.next_trace_id.get() or random.getrandbits(128) or 1


class _KeepLast(logging.Filter):
    """Holds back the exporter's per-attempt log records, remembering the last one's text."""

    def __init__(self) -> None:
        super().__init__()
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        self.last = record.getMessage()[:300]
        return False


class _ObservedExporter(SpanExporter):
    """The OTLP exporter, with failures counted and logged once per state change."""

    def __init__(
        self, inner: SpanExporter, metrics: TraceMetrics, endpoint: str, reasons: _KeepLast
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self.endpoint = endpoint
        self.reasons = reasons
        self.failing = False
        self.failures = 0
        self._shutdown_once = threading.Lock()
        self._shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the processor's thread
            self.reasons.last = f"{type(exc).__name__}: {exc}"[:300]
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            if self.failing:
                self.failing = False
                log.warning(
                    "trace export to %s recovered after %d failed export(s)",
                    self.endpoint,
                    self.failures,
                )
            return result
        self.metrics.export_errors.inc()
        self.failures += 1
        if not self.failing:
            self.failing = True
            log.error(
                "trace export to %s is failing (%s): spans are dropped, runs are unaffected; "
                "counted in runwatch_trace_export_errors_total",
                self.endpoint,
                self.reasons.last or "no reason given",
            )
        return result

    def shutdown(self) -> None:
        with self._shutdown_once:
            if self._shut:
                return
            self._shut = True
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _protocol(env: Mapping[str, str]) -> tuple[str, str]:
    """The export protocol and the variable that chose it (the traces one wins)."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if env.get(name):
            return env[name].strip(), name
    return "http/protobuf", "OTEL_EXPORTER_OTLP_PROTOCOL"


def _endpoint(env: Mapping[str, str], protocol: str) -> str:
    """Where spans go, as the exporter resolves it (for log lines only)."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    return base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"


def _resource(env: Mapping[str, str], instance_id: str) -> Resource:
    """The SDK's resource from ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, with
    runwatch's defaults where they say nothing: ``service.name=runwatch``, its version, and
    ``service.instance.id`` = ``RUNWATCH_INSTANCE_ID`` (instead of the SDK's random one)."""
    detected = Resource.create()
    attrs = dict(detected.attributes)
    if str(attrs.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        attrs[SERVICE_NAME] = "runwatch"
    attrs.setdefault(SERVICE_VERSION, __version__)
    if f"{SERVICE_INSTANCE_ID}=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", "").replace(" ", ""):
        attrs[SERVICE_INSTANCE_ID] = instance_id
    return Resource(attrs, detected.schema_url)


class OtlpBackend:
    """Span plans in, OTLP out, through the SDK's batch span processor."""

    def __init__(
        self,
        exporter: SpanExporter,
        metrics: TraceMetrics,
        *,
        endpoint: str,
        resource: Resource | None = None,
        shutdown_grace_s: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.shutdown_grace_s = shutdown_grace_s
        self._reasons = _KeepLast()
        self._quiet: list[logging.Logger] = []
        self.exporter = _ObservedExporter(exporter, metrics, endpoint, self._reasons)
        self._ids = _RunIds()
        # Our own provider, never the global one: FastAPI and others may use that.
        self.provider = TracerProvider(
            resource=resource or Resource.create(),
            id_generator=self._ids,
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("runwatch", __version__)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], metrics: TraceMetrics, *, instance_id: str
    ) -> OtlpBackend:
        protocol, variable = _protocol(env)
        exporter: SpanExporter
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
            quiet = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
        elif protocol == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcSpanExporter,
                )
            except ImportError:
                raise TracingConfigError(
                    variable, protocol, "needs opentelemetry-exporter-otlp-proto-grpc"
                ) from None
            exporter = GrpcSpanExporter()
            quiet = "opentelemetry.exporter.otlp.proto.grpc.exporter"
        else:
            raise TracingConfigError(
                variable,
                protocol,
                "is not supported: use http/protobuf (the default) or grpc",
            )
        backend = cls(
            exporter,
            metrics,
            endpoint=_endpoint(env, protocol),
            resource=_resource(env, instance_id),
        )
        backend.quiet(logging.getLogger(quiet))
        return backend

    def quiet(self, logger: logging.Logger) -> None:
        """Keep back ``logger``'s per-attempt records: the state-change lines replace them."""
        logger.addFilter(self._reasons)
        self._quiet.append(logger)

    def emit(self, trace_id: int, plan: SpanPlan) -> None:
        """Start and end the plan's spans with their recorded times (the SDK exports them)."""
        token = self._ids.next_trace_id.set(trace_id)
        try:
            root = self._start(plan, None)
        finally:
            self._ids.next_trace_id.reset(token)
        parent = trace.set_span_in_context(root)
        for child in plan.children:
            self._end(self._start(child, parent), child)
        self._end(root, plan)

    def _start(self, plan: SpanPlan, parent: Context | None) -> trace.Span:
        return self.tracer.start_span(
            plan.name,
            context=parent,
            kind=_KINDS[plan.kind],
            attributes=plan.attributes,
            start_time=plan.start_us * 1000,
        )

    def _end(self, span: trace.Span, plan: SpanPlan) -> None:
        for event in plan.events:
            span.add_event(event.name, event.attributes, timestamp=event.ts_us * 1000)
        if plan.error_type is not None:
            span.set_status(Status(StatusCode.ERROR, plan.error_message[:500] or plan.error_type))
        span.end(end_time=plan.end_us * 1000)

    def shutdown(self) -> None:
        """Flush what is queued, for ``shutdown_grace_s`` at most: past that the exporter is
        stopped (its retries end, an attempt in flight ends at its own timeout)."""
        stop = threading.Timer(self.shutdown_grace_s, self.exporter.shutdown)
        stop.daemon = True
        stop.start()
        try:
            self.provider.shutdown()
        finally:
            stop.cancel()
            for logger in self._quiet:
                logger.removeFilter(self._reasons)
