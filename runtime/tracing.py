"""OpenTelemetry traces of runs, following the GenAI semantic conventions (docs/tracing.md).

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, every run that
executes on this replica becomes one trace (docs/tracing.md)::

    invoke_agent {agent}            the run: agent_started .. terminal event committed
     +-- chat {model}               each model round the agent reports (the llm agent)
     +-- execute_tool {tool}        each tool call: tool_executing .. tool_completed

Thinking steps and the delivery milestones (first event committed, first sent, first acked) are
span events. The trace id is the run id's 128 bits (a ULID), so a run page links to its trace
and a trace id names its run (:func:`trace_id_of`, :func:`run_id_of`).

This module is pure and always importable: :class:`RunTracer` is one more
:class:`~runtime.pipeline.RunSink` that records what it needs of each run from the committed
events and turns a finished run into a :class:`SpanPlan` (plain data, tested without an SDK).
Only :func:`build_tracer`, when the variables are set, imports :mod:`runtime.otlp`, which
hands plans to the OpenTelemetry SDK (batch span processor, OTLP exporter). Unset, nothing of
OpenTelemetry is imported by runwatch and nothing is exported. Export happens on the SDK's
worker thread: it never slows or fails a run; failed exports count in
``runwatch_trace_export_errors_total``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from .agents import ModelRound
from .events import Event, EventType, Receipt
from .pipeline import Emitted

if TYPE_CHECKING:
    from .config import Settings
    from .delivery import DeliveryRecorder
    from .store.audit import AckUpdate

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "RunTracer",
    "SpanBackend",
    "SpanEventPlan",
    "SpanPlan",
    "TraceMetrics",
    "build_tracer",
    "run_id_of",
    "tool_error_type",
    "trace_id_of",
    "trace_url",
    "tracing_requested",
]

log = logging.getLogger("runwatch.tracing")

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: The ``gen_ai.provider.name`` of a run that reported no model round (the demo agent).
RUNTIME_PROVIDER = "runwatch"
#: Content attributes are cut to this many characters (backends limit attribute sizes).
MAX_CONTENT_CHARS = 16_384

# ---- run id <-> trace id -----------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_VALUE = {c: i for i, c in enumerate(_CROCKFORD)}


def trace_id_of(run_id: str) -> str | None:
    """The trace id of a run: its ULID's 128 bits as 32 lowercase hex digits.

    None when ``run_id`` is not a ULID (26 Crockford base32 characters)."""
    value = _ulid_int(run_id)
    return None if value is None else f"{value:032x}"


def _ulid_int(run_id: str) -> int | None:
    if len(run_id) != 26 or run_id[0] not in "01234567":
        return None
    value = 0
    for char in run_id.upper():
        digit = _CROCKFORD_VALUE.get(char)
        if digit is None:
            return None
        value = value * 32 + digit
    return value or None


def run_id_of(trace_id: str) -> str | None:
    """The run id a trace id was derived from (the inverse of :func:`trace_id_of`)."""
    if len(trace_id) != 32:
        return None
    try:
        value = int(trace_id, 16)
    except ValueError:
        return None
    if value == 0:
        return None
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def trace_url(template: str | None, run_id: str) -> str | None:
    """``RUNWATCH_TRACE_URL_TEMPLATE`` filled in for a run: ``{trace_id}`` (32 hex digits) and
    ``{run_id}`` are replaced; None without a template or for a run id that is not a ULID."""
    trace_id = trace_id_of(run_id)
    if not template or trace_id is None:
        return None
    return template.replace("{trace_id}", trace_id).replace("{run_id}", run_id)


# ---- configuration -----------------------------------------------------------------------


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def tracing_requested(env: Mapping[str, str]) -> bool:
    """True when the standard variables ask for OTLP traces: an endpoint is set, the SDK is
    not disabled (``OTEL_SDK_DISABLED``) and ``OTEL_TRACES_EXPORTER`` (if set) names ``otlp``."""
    if not (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return False
    if _true(env.get("OTEL_SDK_DISABLED")):
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    return not exporters or "otlp" in [e.strip().lower() for e in exporters.split(",")]


class TraceMetrics:
    """The tracing metric, registered whether or not tracing is on (a series exists at 0)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.export_errors = Counter(
            "runwatch_trace_export_errors_total",
            "Trace export requests that failed (collector down, refused or too slow); "
            "their spans are lost, runs are unaffected.",
            registry=registry,
        )


class SpanBackend(Protocol):
    """Where finished plans go: :class:`runtime.otlp.OtlpBackend` (the SDK), or a test's list."""

    def emit(self, trace_id: int, plan: SpanPlan) -> None: ...

    def shutdown(self) -> None:
        """Flush and stop, bounded in time; blocking (called in a worker thread)."""
        ...


def build_tracer(
    settings: Settings, metrics: TraceMetrics, env: Mapping[str, str] | None = None
) -> RunTracer | None:
    """A :class:`RunTracer` exporting over OTLP when the ``OTEL_*`` variables ask for it.

    None when they do not (then nothing of OpenTelemetry is imported), and None with an error
    logged when they do but tracing cannot work (the ``otel`` extra is not installed, or an
    unsupported protocol): a tracing problem never keeps runwatch from serving runs."""
    env = os.environ if env is None else env
    if not tracing_requested(env):
        return None
    try:
        from .otlp import OtlpBackend, TracingConfigError
    except ImportError as exc:
        log.error(
            "OTEL_EXPORTER_OTLP_* is set but OpenTelemetry is not installed (%s): "
            "install runwatch[otel]; runs are not traced",
            exc,
        )
        return None
    try:
        backend = OtlpBackend.from_env(env, metrics, instance_id=settings.instance_id)
    except TracingConfigError as exc:
        log.error("tracing is off: %s", exc)
        return None
    capture = _true(env.get(CAPTURE_CONTENT_ENV))
    log.info(
        "exporting a trace per run to %s (message content %s)",
        backend.endpoint,
        "captured" if capture else "not captured",
    )
    return RunTracer(backend, capture_content=capture, trace_user_id=settings.trace_user_id)


# ---- span plans (plain data) ---------------------------------------------------------------

AttributeValue = str | bool | int | float | Sequence[str]


@dataclass
class SpanEventPlan:
    name: str
    ts_us: int
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


@dataclass
class SpanPlan:
    """One span to export, with explicit times (epoch microseconds) and its children.

    ``kind`` is ``internal`` or ``client``; with ``error_type`` set, the span's status is
    ERROR with ``error_message`` as its description."""

    name: str
    kind: str
    start_us: int
    end_us: int
    attributes: dict[str, AttributeValue]
    events: list[SpanEventPlan] = field(default_factory=list)
    error_type: str | None = None
    error_message: str = ""
    children: list[SpanPlan] = field(default_factory=list)


_EXCEPTION_PREFIX = re.compile(r"^([A-Za-z_][\w.]*): ")


def tool_error_type(tool: str, error: str) -> str:
    """A low-cardinality ``error.type`` for a failed tool call, from its ``tool_completed``
    error text (the engine's wording): ``timeout``, ``cancelled``, ``unknown_tool``,
    ``invalid_arguments``, ``ended`` (still open when the run completed), the run's error code
    when the run ended under it, the exception class the tool raised, or ``_OTHER``."""
    if error == "cancelled":
        return "cancelled"
    if error == "ended":
        return "ended"
    if error.startswith("timed out after "):
        return "timeout"
    if error.startswith("unknown tool "):
        return "unknown_tool"
    if error.startswith(f"{tool}: "):
        return "invalid_arguments"
    match = _EXCEPTION_PREFIX.match(error)
    return match.group(1)[:64] if match else "_OTHER"


def _content(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text[:MAX_CONTENT_CHARS]


def _text_message(role: str, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "parts": [{"type": "text", "content": text}]}
    if finish_reason is not None:
        message["finish_reason"] = finish_reason
    return message


def genai_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages in the GenAI input messages form (role + typed parts)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = str(message.get("role", "user"))
        parts: list[dict[str, Any]] = []
        if role == "tool":
            parts.append(
                {
                    "type": "tool_call_response",
                    "id": message.get("tool_call_id"),
                    "response": message.get("content"),
                }
            )
        else:
            if message.get("content"):
                parts.append({"type": "text", "content": message["content"]})
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                parts.append(
                    {
                        "type": "tool_call",
                        "id": call.get("id"),
                        "name": fn.get("name"),
                        "arguments": fn.get("arguments"),
                    }
                )
        out.append({"role": role, "parts": parts})
    return out


@dataclass
class _ToolCall:
    call_id: str
    tool: str
    start_us: int
    args: Any = None
    end_us: int | None = None
    status: str = ""
    error: str = ""
    result: Any = None


@dataclass
class _Thought:
    seq: int
    step: int
    ts_us: int
    text: str


@dataclass
class _Run:
    """What the tracer remembers of one run until its trace is exported."""

    run_id: str
    owner: str
    thread_id: str = ""
    agent: str = ""
    input: str = ""
    started_us: int | None = None
    first_commit: tuple[int, int] | None = None
    first_sent: tuple[int, int] | None = None
    first_acked: tuple[int, int] | None = None
    live: bool = False
    thoughts: list[_Thought] = field(default_factory=list)
    thinking_steps: int = 0
    tools: dict[str, _ToolCall] = field(default_factory=dict)
    rounds: list[ModelRound] = field(default_factory=list)
    round_content: list[tuple[str, str]] = field(default_factory=list)
    text_deltas: int = 0
    final_report: str | None = None
    terminal: Event | None = None
    terminal_committed_us: int = 0
    timer: asyncio.TimerHandle | None = None


def build_plan(
    run: _Run, *, capture_content: bool, trace_user_id: bool, max_events: int = 128
) -> SpanPlan:
    """The spans of one ended run (pure: the record in, plain data out)."""
    terminal = run.terminal
    assert terminal is not None
    end_us = max(terminal.ts_us, run.terminal_committed_us)
    start_us = run.started_us if run.started_us is not None else terminal.ts_us
    rounds = run.rounds
    provider = rounds[0].provider if rounds else RUNTIME_PROVIDER
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.provider.name": provider,
        "gen_ai.agent.name": run.agent or terminal.agent,
        "gen_ai.conversation.id": run.thread_id or terminal.thread_id,
        "runwatch.run_id": run.run_id,
        "runwatch.events": terminal.seq,
        "runwatch.thinking_steps": run.thinking_steps,
        "runwatch.text_deltas": run.text_deltas,
        "runwatch.tool_calls": len(run.tools),
    }
    if rounds:
        attrs["gen_ai.request.model"] = rounds[0].model
        attrs["runwatch.model_rounds"] = len(rounds)
        inputs = [r.input_tokens for r in rounds if r.input_tokens is not None]
        outputs = [r.output_tokens for r in rounds if r.output_tokens is not None]
        if inputs:
            attrs["gen_ai.usage.input_tokens"] = sum(inputs)
        if outputs:
            attrs["gen_ai.usage.output_tokens"] = sum(outputs)
    if trace_user_id:
        attrs["runwatch.user_id"] = run.owner
    if run.started_us is None:
        # Ended by startup recovery: the process that ran it is gone, and so is its record.
        attrs["runwatch.recovered"] = True
    error_type: str | None = None
    message = ""
    if terminal.type is EventType.AGENT_ERROR:
        error_type = str(terminal.data.get("code", "_OTHER"))
        message = str(terminal.data.get("message", ""))
        attrs["error.type"] = error_type
        attrs["runwatch.outcome"] = error_type
    else:
        attrs["runwatch.outcome"] = "completed"
    if capture_content:
        attrs["gen_ai.input.messages"] = _content([_text_message("user", run.input)])
        if run.final_report is not None:
            attrs["gen_ai.output.messages"] = _content(
                [_text_message("assistant", run.final_report, "stop")]
            )
    root = SpanPlan(
        f"invoke_agent {attrs['gen_ai.agent.name']}",
        "internal",
        start_us,
        end_us,
        attrs,
        error_type=error_type,
        error_message=message,
    )
    # Delivery milestones first: they are never the ones dropped at the event limit.
    for name, milestone in (
        ("runwatch.committed", run.first_commit),
        ("runwatch.first_sent", run.first_sent),
        ("runwatch.first_acked", run.first_acked),
    ):
        if milestone is not None:
            seq, ts_us = milestone
            root.events.append(SpanEventPlan(name, ts_us, {"runwatch.seq": seq}))
    chats = [
        _chat_plan(r, content, capture_content)
        for r, content in zip(rounds, run.round_content, strict=True)
    ]
    budget = max(0, max_events - len(root.events))
    for thought in run.thoughts:
        # A reasoning step streamed during a model round belongs to that round's span.
        owner = next((c for c in chats if c.start_us <= thought.ts_us <= c.end_us), root)
        if owner is root:
            if budget == 0:
                continue
            budget -= 1
        event_attrs: dict[str, AttributeValue] = {
            "runwatch.seq": thought.seq,
            "runwatch.step": thought.step,
        }
        if capture_content:
            event_attrs["runwatch.text"] = thought.text[:MAX_CONTENT_CHARS]
        owner.events.append(SpanEventPlan("runwatch.agent_thinking", thought.ts_us, event_attrs))
    for chat in chats:
        del chat.events[max_events:]
    root.children.extend(chats)
    for call in run.tools.values():
        root.children.append(_tool_plan(call, end_us, capture_content))
    root.children.sort(key=lambda span: span.start_us)
    return root


def _chat_plan(r: ModelRound, content: tuple[str, str], capture: bool) -> SpanPlan:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": r.operation,
        "gen_ai.provider.name": r.provider,
        "gen_ai.request.model": r.model,
        "gen_ai.request.stream": True,
    }
    optional: dict[str, AttributeValue | None] = {
        "gen_ai.response.model": r.response_model,
        "gen_ai.response.id": r.response_id,
        "gen_ai.usage.input_tokens": r.input_tokens,
        "gen_ai.usage.output_tokens": r.output_tokens,
        "gen_ai.response.time_to_first_chunk": r.first_chunk_s,
        "gen_ai.response.finish_reasons": list(r.finish_reasons) or None,
        "server.address": r.server_address,
        "server.port": r.server_port,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    if capture:
        attrs["gen_ai.input.messages"], attrs["gen_ai.output.messages"] = content
    end_us = max(r.ended_us, r.started_us)
    if r.error_type is not None:
        attrs["error.type"] = r.error_type
    return SpanPlan(
        f"{r.operation} {r.model}",
        "client",
        r.started_us,
        end_us,
        attrs,
        error_type=r.error_type,
        error_message=r.error_message,
    )


def _tool_plan(call: _ToolCall, run_end_us: int, capture: bool) -> SpanPlan:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": call.tool,
        "gen_ai.tool.call.id": call.call_id,
        "gen_ai.tool.type": "function",
        "runwatch.tool.status": call.status or "error",
    }
    error_type = None
    if call.status != "ok":
        # I4 closes every call; one still open here was cut off by the run's end.
        error_type = tool_error_type(call.tool, call.error) if call.status else "ended"
        attrs["error.type"] = error_type
    if capture:
        attrs["gen_ai.tool.call.arguments"] = _content(call.args)
        if call.status == "ok":
            attrs["gen_ai.tool.call.result"] = _content(call.result)
    end_us = call.end_us if call.end_us is not None else run_end_us
    return SpanPlan(
        f"execute_tool {call.tool}",
        "internal",
        call.start_us,
        max(end_us, call.start_us),
        attrs,
        error_type=error_type,
        error_message=call.error,
    )


# ---- the tracer: a run sink ----------------------------------------------------------------


class _ObservedRecorder:
    """The hub's delivery recorder, passed through, noting each traced run's first send."""

    def __init__(self, inner: DeliveryRecorder, tracer: RunTracer) -> None:
        self._inner = inner
        self._tracer = tracer

    def record_receipt(self, receipt: Receipt) -> None:
        self._inner.record_receipt(receipt)
        run = self._tracer._runs.get(receipt.run_id)
        if run is not None and run.first_sent is None:
            run.first_sent = (receipt.seq, receipt.sent_us)

    def record_ack(self, ack: AckUpdate) -> None:
        self._inner.record_ack(ack)

    def settle(self, run_id: str, settled_us: int) -> None:
        self._inner.settle(run_id, settled_us)


class RunTracer:
    """Records each run executing here from its committed events and exports its trace.

    It is a :class:`~runtime.pipeline.RunSink` (after the hub and the broker), the hub's
    delivery observer (first ack) and the engine's telemetry (model rounds). A run's trace is
    built once its terminal event is committed and its first event acknowledged, or
    ``settle_grace_s`` later at most (a run nobody watched has no first ack), on the event
    loop but outside the writer's commit path; the SDK exports it from its own thread.
    """

    def __init__(
        self,
        backend: SpanBackend,
        *,
        capture_content: bool = False,
        trace_user_id: bool = False,
        settle_grace_s: float = 2.0,
        max_events: int = 128,
    ) -> None:
        self.backend = backend
        self.capture_content = capture_content
        self.trace_user_id = trace_user_id
        self.settle_grace_s = settle_grace_s
        self.max_events = max_events
        self._runs: dict[str, _Run] = {}
        self._build_failed = False
        self._closed = False

    # ---- wiring -------------------------------------------------------------------------

    def recorder(self, inner: DeliveryRecorder) -> DeliveryRecorder:
        """Wrap the hub's delivery recorder to see each run's first send."""
        return _ObservedRecorder(inner, self)

    # ---- RunSink ------------------------------------------------------------------------

    def run_started(self, run_id: str, owner: str) -> None:
        if not self._closed:
            self._runs[run_id] = _Run(run_id, owner)

    def committed(self, items: Sequence[Emitted]) -> None:
        if self._closed:
            return
        for item in items:
            event = item.event
            run = self._runs.get(event.run_id)
            if run is None:
                # Startup recovery ends runs of a previous process without run_started.
                if event.type is not EventType.AGENT_STARTED and not event.is_terminal:
                    continue
                run = self._runs[event.run_id] = _Run(event.run_id, item.owner)
            self._record(run, event, item)

    def _record(self, run: _Run, event: Event, item: Emitted) -> None:
        kind = event.type
        data = event.data
        run.live = run.live or item.live
        if run.first_commit is None:
            run.first_commit = (event.seq, item.committed_us)
        if kind is EventType.TEXT_DELTA:
            run.text_deltas += 1
        elif kind is EventType.AGENT_THINKING:
            run.thinking_steps += 1
            if len(run.thoughts) < self.max_events:
                run.thoughts.append(
                    _Thought(event.seq, int(data.get("step", 0)), event.ts_us, str(data["text"]))
                )
        elif kind is EventType.TOOL_EXECUTING:
            call_id = str(data["tool_call_id"])
            run.tools[call_id] = _ToolCall(
                call_id, str(data["tool"]), event.ts_us, data.get("args")
            )
        elif kind is EventType.TOOL_COMPLETED:
            call = run.tools.get(str(data["tool_call_id"]))
            if call is not None:
                call.end_us = event.ts_us
                call.status = str(data.get("status", "error"))
                call.error = str(data.get("error") or "")
                call.result = data.get("result")
        elif kind is EventType.AGENT_STARTED:
            run.started_us = event.ts_us
            run.thread_id = event.thread_id
            run.agent = event.agent
            run.input = str(data.get("input", ""))
        elif kind is EventType.FINAL_REPORT:
            run.final_report = str(data.get("text", ""))
        if event.is_terminal:
            run.terminal = event
            run.terminal_committed_us = item.committed_us
            self._ended(run)

    def _ended(self, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        if run.first_acked is not None or not run.live:
            # Built on the next loop turn: never inside the writer's commit path.
            loop.call_soon(self._export, run.run_id)
        else:
            run.timer = loop.call_later(self.settle_grace_s, self._export, run.run_id)

    # ---- observers ----------------------------------------------------------------------

    def first_acked(self, run_id: str, seq: int, acked_us: int) -> None:
        """The hub: the run's first acknowledgement by an owner connection."""
        run = self._runs.get(run_id)
        if run is None or run.first_acked is not None:
            return
        run.first_acked = (seq, acked_us)
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
            asyncio.get_running_loop().call_soon(self._export, run_id)

    def model_round(self, run_id: str, report: ModelRound) -> None:
        """The engine: the agent finished a model round (``ctx.model_round``)."""
        run = self._runs.get(run_id)
        if run is None or run.terminal is not None:
            return
        content = ("", "")
        if self.capture_content:
            # Serialized now: the agent goes on appending to its message list.
            finish = report.finish_reasons[0] if report.finish_reasons else None
            output = _text_message("assistant", report.output_text, finish)
            output["parts"] = [p for p in output["parts"] if p["content"]]
            output["parts"] += [
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": call.get("name"),
                    "arguments": call.get("arguments"),
                }
                for call in report.output_tool_calls
            ]
            content = (_content(genai_messages(report.messages)), _content([output]))
        run.rounds.append(report)
        run.round_content.append(content)

    # ---- export -------------------------------------------------------------------------

    def _export(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is None or run.terminal is None:
            return
        if run.timer is not None:
            run.timer.cancel()
        trace_id = _ulid_int(run_id)
        if trace_id is None:
            return
        try:
            plan = build_plan(
                run,
                capture_content=self.capture_content,
                trace_user_id=self.trace_user_id,
                max_events=self.max_events,
            )
            self.backend.emit(trace_id, plan)
        except Exception:
            # A tracing bug must not reach the run; say so once, not per run.
            if not self._build_failed:
                self._build_failed = True
                log.exception(
                    "building the trace of run %s failed; later failures are quiet", run_id
                )

    async def close(self) -> None:
        """Export the ended runs still waiting for their first ack, then flush and stop the
        exporter (bounded; in a worker thread, so the event loop goes on). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for run_id in [r for r, run in self._runs.items() if run.terminal is not None]:
            self._export(run_id)
        self._runs.clear()
        await asyncio.to_thread(self.backend.shutdown)
