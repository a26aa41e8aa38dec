"""Traces of runs (docs/tracing.md): a real OTLP/HTTP receiver on loopback decodes what the
runtime exports; the span plans and the id mapping are tested as pure code."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from monitor.api import MonitorAuth
from monitor.web import build_web
from runtime.events import EventType, Receipt, new_id
from runtime.pipeline import Emitted
from runtime.store.audit import AuditStore
from runtime.store.migrate import upgrade
from runtime.store.writer import DeliveryLog
from runtime.tracing import (
    RunTracer,
    SpanPlan,
    TraceMetrics,
    build_tracer,
    run_id_of,
    tool_error_type,
    trace_id_of,
    trace_url,
    tracing_requested,
)

from . import test_llm_agent
from .conftest import (
    closed_port,
    make_settings,
    serve_app,
    serve_runtime,
    sqlite_url,
    wait_until,
)
from .invariants import assert_valid
from .test_checker import lifecycle, now_us, receipts, write_run
from .test_llm_agent import FakeOpenAI, fake_openai, llm_env  # noqa: F401

ERRORS = "runwatch_trace_export_errors_total"

# ---- a real OTLP/HTTP receiver ---------------------------------------------------------------


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    status_code: int
    status_message: str
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(items: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in items}


@dataclass
class Receiver:
    """Decodes every ``ExportTraceServiceRequest`` it is sent (protobuf over HTTP)."""

    port: int = 0
    spans: list[Span] = field(default_factory=list)
    requests: int = 0

    async def traces(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        self.requests += 1
        for rs in message.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.kind,
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                            _attrs(s.attributes),
                            [(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events],
                            s.status.code,
                            s.status.message,
                            resource,
                        )
                    )
        body = ExportTraceServiceResponse().SerializeToString()
        return Response(body, media_type="application/x-protobuf")

    def trace(self, run_id: str) -> list[Span]:
        trace_id = trace_id_of(run_id)
        return [s for s in self.spans if s.trace_id == trace_id]

    def root(self, run_id: str) -> Span | None:
        return next((s for s in self.trace(run_id) if not s.parent_id), None)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = Starlette(routes=[Route("/v1/traces", rec.traces, methods=["POST"])])
    async with serve_app(app, lifespan="off") as served:
        rec.port = served.port
        yield rec


def otel_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, **extra: str) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "runwatch-test")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


# ---- pure: ids, urls, error types, configuration --------------------------------------------


def test_trace_id_is_the_run_ids_bits_and_back() -> None:
    for _ in range(50):
        run_id = new_id()
        trace_id = trace_id_of(run_id)
        assert trace_id is not None and len(trace_id) == 32 and int(trace_id, 16) != 0
        assert run_id_of(trace_id) == run_id
        assert run_id_of(trace_id.upper()) == run_id
    assert trace_id_of("01ARZ3NDEKTSV4RRFFQ69G5FAV") == "01563e3ab5d3d6764c61efb99302bd5b"
    for bad in ("", "not-a-ulid", "8ZZZZZZZZZZZZZZZZZZZZZZZZZ", "01ARZ3NDEKTSV4RRFFQ69G5FA!"):
        assert trace_id_of(bad) is None
    for bad in ("", "0" * 32, "xyz" + "0" * 29, "0" * 31):
        assert run_id_of(bad) is None


def test_trace_url_template() -> None:
    run_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    assert trace_url(None, run_id) is None
    assert trace_url("", run_id) is None
    assert (
        trace_url("https://tempo.example/trace/{trace_id}?run={run_id}", run_id)
        == "https://tempo.example/trace/01563e3ab5d3d6764c61efb99302bd5b?run=" + run_id
    )
    assert trace_url("https://t/{trace_id}", "not-a-run") is None


def test_tool_error_types_are_a_closed_small_set() -> None:
    assert tool_error_type("fail", "RuntimeError: the fail tool always fails") == "RuntimeError"
    assert tool_error_type("wait", "timed out after 5s") == "timeout"
    assert tool_error_type("wait", "cancelled") == "cancelled"
    assert tool_error_type("x", "unknown tool 'x'") == "unknown_tool"
    assert tool_error_type("calculator", "calculator: missing argument 'e'") == "invalid_arguments"
    assert tool_error_type("wait", "cancelled: the run was cancelled") == "cancelled"
    assert tool_error_type("wait", "timeout: the run exceeded its 1s timeout") == "timeout"
    assert tool_error_type("wait", "ended") == "ended"
    assert tool_error_type("wait", "something odd happened") == "_OTHER"


def test_tracing_is_requested_only_by_an_endpoint() -> None:
    url = "http://127.0.0.1:4318"
    assert not tracing_requested({})
    assert not tracing_requested({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": url})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url + "/v1/traces"})
    assert not tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_SDK_DISABLED": "true"})
    assert not tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_TRACES_EXPORTER": "none"}
    )
    assert tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_TRACES_EXPORTER": "console, otlp"}
    )


# ---- unset: nothing imported, nothing exported ----------------------------------------------

_UNSET_PROBE = """
import asyncio, os, sys
from prometheus_client import CollectorRegistry
from runtime.config import Settings
from runtime.server import Runtime
os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
registry = CollectorRegistry()
rt = Runtime(Settings(database_url=sys.argv[1], instance_id="probe"), registry=registry)
assert rt.tracer is None, rt.tracer
assert registry.get_sample_value("runwatch_trace_export_errors_total") == 0.0
# (redis-py imports opentelemetry.sdk.metrics by itself when the SDK is installed.)
tracing = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "runtime.otlp")
loaded = sorted(m for m in sys.modules if m.startswith(tracing))
assert not loaded, loaded
print("ok")
"""


def test_unset_variables_import_and_export_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", _UNSET_PROBE, sqlite_url(tmp_path / "probe.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


async def test_unset_variables_leave_runs_untraced(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    async with serve_runtime(make_settings(sqlite_url(tmp_path / "rw.db"))) as live:
        assert live.rt.tracer is None
        assert live.rt.delivery.observer is None and live.rt.engine.telemetry is None
        client = await live.client("alice")
        events = await (await client.chat("what is 6*7")).wait(20)
        assert events[-1].type == EventType.AGENT_COMPLETED
        assert live.metric(ERRORS) == 0.0
    assert receiver.requests == 0


# ---- demo runs against the receiver ---------------------------------------------------------


async def test_demo_runs_export_genai_spans(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    otel_env(monkeypatch, f"http://127.0.0.1:{receiver.port}")
    settings = make_settings(sqlite_url(tmp_path / "rw.db"), tool_timeout_s=30)
    async with serve_runtime(settings) as live:
        assert live.rt.tracer is not None
        client = await live.client("alice")
        ok = await (await client.chat("what is 6*7")).wait(20)
        failed_tool = await (await client.chat("fail tool")).wait(20)
        crash = await (await client.chat("crash")).wait(20)
        waiting = await client.chat("wait 30")
        async for event in waiting:
            if event.type == EventType.TOOL_EXECUTING:
                await client.cancel(waiting.run_id)
        cancelled = await waiting.wait(20)
        runs = {"ok": ok, "fail tool": failed_tool, "crash": crash, "cancel": cancelled}
        for events in runs.values():
            assert_valid(events)
        ids = {name: events[0].run_id for name, events in runs.items()}
        await wait_until(lambda: all(receiver.root(r) for r in ids.values()), 20)
        assert live.metric(ERRORS) == 0.0

    for name, run_id in ids.items():
        spans = receiver.trace(run_id)
        root = receiver.root(run_id)
        assert root is not None, name
        # One trace per run, its id the run id's bits; every other span a child of the root.
        assert root.trace_id == trace_id_of(run_id)
        assert all(s.parent_id == root.span_id for s in spans if s is not root), name
        assert root.name == "invoke_agent demo" and root.kind == 1  # INTERNAL
        a = root.attributes
        assert a["gen_ai.operation.name"] == "invoke_agent"
        assert a["gen_ai.provider.name"] == "runwatch"
        assert a["gen_ai.agent.name"] == "demo"
        assert a["gen_ai.conversation.id"] == runs[name][0].thread_id
        assert a["runwatch.run_id"] == run_id
        assert "runwatch.user_id" not in a
        # Content is off by default: no messages, no thinking text, no tool arguments.
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
        assert root.resource["service.name"] == "runwatch-test"
        assert root.resource["deployment.environment.name"] == "test"
        assert root.resource["service.instance.id"] == "test"
        # Explicit times: from agent_started's emission to the terminal event.
        events = runs[name]
        assert root.start_ns == events[0].ts_us * 1000
        assert root.end_ns >= events[-1].ts_us * 1000
        names = [e[0] for e in root.events]
        assert names[:3] == ["runwatch.committed", "runwatch.first_sent", "runwatch.first_acked"]
        committed, sent, acked = (e[1] for e in root.events[:3])
        assert root.start_ns <= committed <= sent <= acked
        thinking = [e for e in root.events if e[0] == "runwatch.agent_thinking"]
        assert len(thinking) == sum(1 for e in events if e.type == EventType.AGENT_THINKING)
        assert all("runwatch.text" not in e[2] for e in thinking)
        for tool in [s for s in spans if s.name.startswith("execute_tool ")]:
            assert tool.kind == 1
            assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
            assert tool.attributes["gen_ai.tool.type"] == "function"
            assert "gen_ai.tool.call.arguments" not in tool.attributes
            assert root.start_ns <= tool.start_ns <= tool.end_ns <= root.end_ns

    ok_root = receiver.root(ids["ok"])
    assert ok_root is not None
    assert ok_root.status_code == 0 and "error.type" not in ok_root.attributes  # UNSET
    (calc,) = by_name(receiver.trace(ids["ok"]), "execute_tool calculator")
    executing = next(e for e in ok if e.type == EventType.TOOL_EXECUTING)
    assert calc.attributes["gen_ai.tool.name"] == "calculator"
    assert calc.attributes["gen_ai.tool.call.id"] == executing.data["tool_call_id"]
    assert calc.status_code == 0 and "error.type" not in calc.attributes
    assert calc.start_ns == executing.ts_us * 1000

    # The failing tool: its span is an error; the run itself completed and explained.
    fail_root = receiver.root(ids["fail tool"])
    (fail,) = by_name(receiver.trace(ids["fail tool"]), "execute_tool fail")
    assert fail.status_code == 2 and fail.attributes["error.type"] == "RuntimeError"
    assert fail_root is not None and fail_root.status_code == 0

    # The crash: the run's span carries the agent_error code.
    crash_root = receiver.root(ids["crash"])
    assert crash_root is not None
    assert crash_root.status_code == 2 and crash_root.attributes["error.type"] == "agent_failed"
    assert "the agent failed" in crash_root.status_message

    # The cancel: the run and its open tool call both end as errors, never as a success.
    cancel_root = receiver.root(ids["cancel"])
    (wait,) = by_name(receiver.trace(ids["cancel"]), "execute_tool wait")
    assert cancel_root is not None and cancel_root.status_code == 2
    assert cancel_root.attributes["error.type"] == "cancelled"
    assert cancel_root.attributes["runwatch.outcome"] == "cancelled"
    assert wait.status_code == 2 and wait.attributes["error.type"] == "cancelled"


# ---- the llm agent: two model rounds ---------------------------------------------------------


async def test_llm_run_has_chat_spans_with_usage_and_content(
    tmp_path: Path,
    receiver: Receiver,
    llm_env: FakeOpenAI,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    otel_env(
        monkeypatch,
        f"http://127.0.0.1:{receiver.port}",
        OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true",
    )
    plain_sse = test_llm_agent.sse

    def sse_with_usage(chunks: list[dict[str, Any]]) -> str:
        # The endpoint streams token usage in a last chunk, as with stream_options.include_usage.
        n = len(llm_env.requests)
        usage = {"prompt_tokens": 100 * n, "completion_tokens": 7 * n}
        last = {"id": f"chatcmpl-{n}", "model": "test-model-0613", "choices": [], "usage": usage}
        return plain_sse([*chunks, last])

    monkeypatch.setattr(test_llm_agent, "sse", sse_with_usage)
    settings = make_settings(sqlite_url(tmp_path / "rw.db"), trace_user_id=True)
    async with serve_runtime(settings) as live:
        client = await live.client("alice")
        events = await (await client.chat("what is 6*7", agent="llm")).wait(20)
        assert_valid(events)
        run_id = events[0].run_id
        await wait_until(lambda: receiver.root(run_id) is not None, 20)

    assert llm_env.requests[0]["stream_options"] == {"include_usage": True}
    spans = receiver.trace(run_id)
    root = receiver.root(run_id)
    assert root is not None and root.name == "invoke_agent llm"
    chats = sorted(by_name(spans, "chat test-model"), key=lambda s: s.start_ns)
    assert len(chats) == 2
    (tool,) = by_name(spans, "execute_tool calculator")
    assert {s.parent_id for s in spans if s is not root} == {root.span_id}
    # Model rounds and tool calls in the order they happened.
    assert chats[0].end_ns <= tool.start_ns <= tool.end_ns <= chats[1].start_ns
    for n, chat in enumerate(chats, start=1):
        a = chat.attributes
        assert chat.kind == 3  # CLIENT
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == "test-model"
        assert a["gen_ai.response.model"] == "test-model-0613"
        assert a["gen_ai.response.id"] == f"chatcmpl-{n}"
        assert a["gen_ai.usage.input_tokens"] == 100 * n
        assert a["gen_ai.usage.output_tokens"] == 7 * n
        assert 0 < a["gen_ai.response.time_to_first_chunk"] < (chat.end_ns - chat.start_ns) / 1e9
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == llm_env.port
        assert chat.status_code == 0
    assert chats[0].attributes["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert chats[1].attributes["gen_ai.response.finish_reasons"] == ["stop"]
    # Content captured on request: messages in the GenAI form, the reasoning step on its round.
    inputs = json.loads(chats[1].attributes["gen_ai.input.messages"])
    assert [m["role"] for m in inputs] == ["system", "user", "assistant", "tool"]
    assert inputs[2]["parts"][0]["type"] == "tool_call"
    response = inputs[3]["parts"][0]
    assert response["type"] == "tool_call_response" and response["id"] == "call_a"
    assert json.loads(response["response"])["value"] == 42
    output = json.loads(chats[1].attributes["gen_ai.output.messages"])
    assert output[0]["parts"] == [{"type": "text", "content": "The answer is 42."}]
    assert output[0]["finish_reason"] == "stop"
    reasoning = [e for e in chats[0].events if e[0] == "runwatch.agent_thinking"]
    assert [e[2]["runwatch.text"] for e in reasoning] == ["The user wants arithmetic."]
    assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"expression": "6*7"}
    assert json.loads(tool.attributes["gen_ai.tool.call.result"])["value"] == 42
    a = root.attributes
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.request.model"] == "test-model"
    assert a["gen_ai.usage.input_tokens"] == 300 and a["gen_ai.usage.output_tokens"] == 21
    assert a["runwatch.user_id"] == "alice"
    assert json.loads(a["gen_ai.input.messages"])[0]["parts"][0]["content"] == "what is 6*7"
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"] == "The answer is 42."


async def test_failed_model_round_is_an_error_span(
    tmp_path: Path,
    receiver: Receiver,
    llm_env: FakeOpenAI,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    otel_env(monkeypatch, f"http://127.0.0.1:{receiver.port}")
    llm_env.mode = "error"
    async with serve_runtime(make_settings(sqlite_url(tmp_path / "rw.db"))) as live:
        client = await live.client("alice")
        events = await (await client.chat("hi", agent="llm")).wait(20)
        run_id = events[0].run_id
        await wait_until(lambda: receiver.root(run_id) is not None, 20)
    (chat,) = by_name(receiver.trace(run_id), "chat test-model")
    assert chat.status_code == 2 and chat.attributes["error.type"] == "500"
    assert "gen_ai.input.messages" not in chat.attributes
    root = receiver.root(run_id)
    assert root is not None and root.attributes["error.type"] == "agent_failed"


# ---- export never slows or breaks a run ------------------------------------------------------


async def test_receiver_down_leaves_runs_alone_and_counts_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="runwatch.tracing")
    # Nothing listens on the port, and nothing can take it while the test runs.
    with closed_port() as port:
        otel_env(monkeypatch, f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_TIMEOUT="1")
        async with serve_runtime(make_settings(sqlite_url(tmp_path / "rw.db"))) as live:
            assert live.metric(ERRORS) == 0.0  # the series exists from the start
            client = await live.client("alice")
            for _ in range(2):
                started = time.monotonic()
                events = await (await client.chat("what is 6*7")).wait(20)
                assert_valid(events)
                assert events[-1].type == EventType.AGENT_COMPLETED
                assert time.monotonic() - started < 5
                await wait_until(lambda n=_ + 1: live.metric(ERRORS) >= n, 20)
    failing = [r for r in caplog.records if "trace export" in r.getMessage()]
    # Logged once per state change, not once per failed export; the exporter's own lines held.
    assert len(failing) == 1 and "is failing" in failing[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]


async def test_sampler_always_off_exports_nothing(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    otel_env(monkeypatch, f"http://127.0.0.1:{receiver.port}", OTEL_TRACES_SAMPLER="always_off")
    async with serve_runtime(make_settings(sqlite_url(tmp_path / "rw.db"))) as live:
        assert live.rt.tracer is not None
        client = await live.client("alice")
        events = await (await client.chat("what is 6*7")).wait(20)
        assert events[-1].type == EventType.AGENT_COMPLETED
        # Closing flushes the batch processor: whatever was queued has been sent by now.
        await live.rt.tracer.close()
    assert receiver.spans == []


# ---- the monitor links a run to its trace, and a trace to its run ----------------------------


async def test_run_page_links_to_the_trace(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    otel_env(monkeypatch, f"http://127.0.0.1:{receiver.port}")
    db = sqlite_url(tmp_path / "rw.db")
    async with serve_runtime(make_settings(db)) as live:
        client = await live.client("alice")
        events = await (await client.chat("what is 6*7")).wait(20)
        run_id = events[0].run_id
        await wait_until(lambda: receiver.root(run_id) is not None, 20)
    trace_id = trace_id_of(run_id)
    assert trace_id is not None
    admin = "admin-token-for-trace-links-0123"

    async def page(template: str | None, path: str) -> httpx.Response:
        settings = make_settings(db, admin_token=admin, trace_url_template=template)
        store = AuditStore.open(db)
        try:
            app = FastAPI()
            app.include_router(build_web(store, settings, MonitorAuth(settings)))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as http:
                return await http.get(path, headers={"Authorization": f"Bearer {admin}"})
        finally:
            await store.close()

    linked = await page("https://tempo.example/trace/{trace_id}", f"/monitor/runs/{run_id}")
    assert linked.status_code == 200
    assert f'href="https://tempo.example/trace/{trace_id}"' in linked.text
    plain = await page(None, f"/monitor/runs/{run_id}")
    assert plain.status_code == 200 and "trace-link" not in plain.text
    back = await page(None, f"/monitor/traces/{trace_id.upper()}")
    assert back.status_code == 303 and back.headers["location"] == f"/monitor/runs/{run_id}"
    assert (await page(None, "/monitor/traces/nothex")).status_code == 404


async def test_run_ended_by_startup_recovery_is_traced(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run a crashed process left open gets its trace from the process that ends it."""
    otel_env(monkeypatch, f"http://127.0.0.1:{receiver.port}")
    db = sqlite_url(tmp_path / "rw.db")
    await asyncio.to_thread(upgrade, db)
    store = AuditStore.open(db)
    try:
        run_id = new_id()
        lc = lifecycle(run_id, now_us() - 5_000_000)
        events = [lc.started("wait 30"), lc.thinking("working")]
        await write_run(store, events, receipts(events), created_us=events[0].ts_us)
    finally:
        await store.close()
    async with serve_runtime(make_settings(db)):  # instance "test", as the open run's
        await wait_until(lambda: receiver.root(run_id) is not None, 20)
    root = receiver.root(run_id)
    assert root is not None and root.name == "invoke_agent demo"
    assert root.attributes["error.type"] == "runtime_restarted" and root.status_code == 2
    assert root.attributes["runwatch.recovered"] is True
    assert root.attributes["gen_ai.conversation.id"] == "t-" + run_id


def test_tracing_that_cannot_work_is_off_with_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings("sqlite+aiosqlite:///unused.db")
    metrics = TraceMetrics(CollectorRegistry())
    url = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    bad = build_tracer(settings, metrics, {**url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert bad is None
    assert "'http/json' is not supported" in caplog.text
    # The otel extra not installed: runwatch serves runs untraced and says why.
    monkeypatch.setitem(sys.modules, "runtime.otlp", None)
    assert build_tracer(settings, metrics, url) is None
    assert "install runwatch[otel]" in caplog.text
    assert build_tracer(settings, metrics, {}) is None


# ---- the plan, without an SDK ----------------------------------------------------------------


@dataclass
class ListBackend:
    plans: list[tuple[int, SpanPlan]] = field(default_factory=list)
    closed: bool = False

    def emit(self, trace_id: int, plan: SpanPlan) -> None:
        self.plans.append((trace_id, plan))

    def shutdown(self) -> None:
        self.closed = True


async def test_plan_keeps_milestones_and_bounds_span_events() -> None:
    backend = ListBackend()
    tracer = RunTracer(backend, max_events=5)
    run_id = new_id()
    lc = lifecycle(run_id, now_us())
    events = [lc.started("hi"), *[lc.thinking(f"step {n}") for n in range(10)]]
    events += [lc.tool_executing("call_1", "wait", {"seconds": 1})]
    events += [*lc.close_open_tools("ended"), lc.final_report("done"), lc.completed()]
    tracer.run_started(run_id, "alice")
    for n, event in enumerate(events):
        item = Emitted.of(event, "alice", live=True)
        item.committed_us = event.ts_us + 100
        tracer.committed([item])
        if n == 0:
            tracer.recorder(DeliveryLog()).record_receipt(
                Receipt(event.event_id, run_id, 1, "c", "alice", event.ts_us + 200)
            )
            tracer.first_acked(run_id, 1, event.ts_us + 300)
    await wait_until(lambda: backend.plans, 5)
    ((trace_id, root),) = backend.plans
    assert f"{trace_id:032x}" == trace_id_of(run_id)
    assert [e.name for e in root.events][:3] == [
        "runwatch.committed",
        "runwatch.first_sent",
        "runwatch.first_acked",
    ]
    assert [e.ts_us - events[0].ts_us for e in root.events[:3]] == [100, 200, 300]
    assert len(root.events) == 5 and root.attributes["runwatch.thinking_steps"] == 10
    assert root.end_us == events[-1].ts_us + 100  # the terminal event's commit
    (tool,) = root.children
    assert tool.error_type == "ended" and tool.attributes["error.type"] == "ended"
    await tracer.close()
    await tracer.close()
    assert backend.closed and len(backend.plans) == 1
