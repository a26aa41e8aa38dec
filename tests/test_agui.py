"""``/agui`` driven by the official AG-UI client (``@ag-ui/client`` ``HttpAgent`` and the shipped
``RunwatchHttpAgent``) from one node process against a live server: the golden path, a failing
tool, two tool calls open at once with results out of order, a crash, a timeout, a cancel, a
streamed answer, a run resumed mid-way after its connection dropped, and a retried POST.

tests/agui/drive.mjs checks every stream (SSE ids, official schema and verifier, exactly one
terminal event, every tool result after its call); here we check what each scenario must show,
what the audit store holds (same run, receipts acked by write completion of an ``agui-sse``
connection) and that ``runwatch check`` passes every run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from runtime.agents import AgentRegistry, RunContext
from runtime.store.models import ConnectionRow, DeliveryRow, EventRow, RunRow
from runtime.tools import Tool, builtin_tools

from .conftest import make_settings, scale, serve_runtime, service_missing, sqlite_url

AGUI_DIR = Path(__file__).resolve().parent / "agui"
AGENT_MODULE = (
    Path(__file__).resolve().parent.parent / "runtime" / "static" / "agui" / "runwatch-agent.mjs"
)
SCENARIOS = (
    "golden",
    "fail_tool",
    "parallel",
    "crash",
    "timeout",
    "cancel",
    "streamed",
    "retry",
    "resume",
)


async def _sleepy(seconds: float, label: str = "") -> dict[str, Any]:
    await asyncio.sleep(seconds)
    return {"slept": seconds, "label": label}


def _tools() -> Any:
    tools = builtin_tools()
    tools.register(
        Tool(
            "sleepy",
            "Sleep a while and say so.",
            _sleepy,
            {
                "type": "object",
                "properties": {"seconds": {"type": "number"}, "label": {"type": "string"}},
                "required": ["seconds"],
            },
        )
    )
    return tools


async def parallel_agent(ctx: RunContext) -> str:
    # Two calls open at once; the second (fast) finishes first.
    slow, fast = await asyncio.gather(
        ctx.tool("sleepy", {"seconds": 0.4, "label": "slow"}),
        ctx.tool("sleepy", {"seconds": 0.05, "label": "fast"}),
    )
    return f"{slow['label']} and {fast['label']} are done."


async def streamer_agent(ctx: RunContext) -> str:
    # Text, a tool call (closes the text message), more text; the answer is the last segment.
    await ctx.think("Planning the answer.")
    await ctx.delta("Let me check. ")
    value = await ctx.tool("calculator", {"expression": "6*7"})
    await ctx.delta("The answer")
    await ctx.delta(f" is {value['value']}.")
    return f"The answer is {value['value']}."


async def slow_agent(ctx: RunContext) -> str:
    await ctx.delta("Part one. ")
    await asyncio.sleep(1.0 * scale())
    await ctx.delta("Part two.")
    await ctx.tool("sleepy", {"seconds": 1.0 * scale(), "label": "pending"})
    return "Part one. Part two."


def _agents() -> AgentRegistry:
    agents = AgentRegistry.with_builtins()
    agents.register("parallel", parallel_agent)
    agents.register("streamer", streamer_agent)
    agents.register("slow", slow_agent)
    return agents


def _node_ready() -> str:
    node = shutil.which("node")
    if node is None:
        service_missing("node is not installed")
    if not (AGUI_DIR / "node_modules" / "@ag-ui" / "client").is_dir():
        service_missing("tests/agui/node_modules missing: run `npm ci` in tests/agui")
    assert node is not None
    return node


def _types(stream: dict[str, Any]) -> list[str]:
    return list(stream["types"])


def _events(stream: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in stream["events"] if e["type"] == kind]


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant" and m.get("content")]


@pytest.fixture(scope="module")
def results_and_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """Every scenario against one server, from one node process."""
    node = _node_ready()
    tmp = tmp_path_factory.mktemp("agui")
    db = sqlite_url(tmp / "rw.db")
    settings = make_settings(db, run_timeout_s=4 * scale(), data_dir=str(tmp / "data"))

    async def drive() -> dict[str, Any]:
        async with serve_runtime(settings, agents=_agents(), tools=_tools()) as live:
            config = {
                "url": live.http_url,
                "tokens": {name: live.token(f"agui-{name}") for name in SCENARIOS},
                "agent_module": str(AGENT_MODULE),
                "scale": scale(),
            }
            (tmp / "config.json").write_text(json.dumps(config))
            proc = await asyncio.create_subprocess_exec(
                node,
                str(AGUI_DIR / "drive.mjs"),
                str(tmp / "config.json"),
                cwd=AGUI_DIR,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 120 * scale())
            except TimeoutError:
                proc.kill()
                raise
            assert proc.returncode == 0, err.decode()
            results: dict[str, Any] = json.loads(out)
            results["stderr"] = err.decode()
            # Every receipt and ack reaches the store before the server stops.
            await live.rt.writer.flush(timeout=10)
            results["metrics"] = {
                "failures": sum(
                    live.metric("runwatch_event_delivery_failures_total", {"reason": r})
                    for r in ("disconnected", "slow_consumer", "server_restart", "error")
                ),
                "acked": live.metric("runwatch_events_acked_total", {"type": "agent_started"}),
            }
            return results

    return asyncio.run(drive()), db


@pytest.fixture(scope="module")
def results(results_and_db: tuple[dict[str, Any], str]) -> dict[str, Any]:
    return results_and_db[0]


def test_every_scenario_passes_the_official_client(results: dict[str, Any]) -> None:
    failed = {n: results[n]["error"] for n in SCENARIOS if not results[n]["ok"]}
    assert not failed, failed
    # The client's enforcement stage strips unknown material with a warning: there is none.
    assert results["warnings"] == [], results["warnings"]


def test_golden_path(results: dict[str, Any]) -> None:
    r = results["golden"]
    (stream,) = r["streams"]
    types = _types(stream)
    assert types[0] == "RUN_STARTED" and types[-1] == "RUN_FINISHED"
    started = _events(stream, "RUN_STARTED")[0]
    assert started["runId"] == r["runId"]
    assert started["metadata"]["runwatch"]["run_id"] == stream["run_id"]
    (call,) = _events(stream, "TOOL_CALL_START")
    assert call["toolCallName"] == "calculator"
    (result,) = _events(stream, "TOOL_CALL_RESULT")
    assert result["toolCallId"] == call["toolCallId"]
    assert result["metadata"]["runwatch"]["status"] == "ok"
    assert "duration_ms" in result["metadata"]["runwatch"]
    assert json.loads(result["content"])["value"] == 42
    assert {"REASONING_START", "REASONING_MESSAGE_CONTENT", "REASONING_END"} <= set(types)
    # Every event carries its time and the runwatch event it comes from.
    for event in stream["events"]:
        assert isinstance(event["timestamp"], int)
        raw = event["rawEvent"]
        assert raw["run_id"] == stream["run_id"] and raw["seq"] >= 1 and raw["event_id"]
    (answer,) = [t for t in _texts(r["messages"]) if "42" in t]
    assert answer.count("42") == 1


def test_failing_tool_is_a_result_with_an_error_and_the_run_completes(
    results: dict[str, Any],
) -> None:
    (stream,) = results["fail_tool"]["streams"]
    (result,) = _events(stream, "TOOL_CALL_RESULT")
    details = result["metadata"]["runwatch"]
    assert details["status"] == "error" and details["error"]
    assert result["content"] == details["error"]
    assert _types(stream)[-1] == "RUN_FINISHED"


def test_two_tool_calls_open_at_once_with_results_out_of_order(results: dict[str, Any]) -> None:
    (stream,) = results["parallel"]["streams"]
    types = _types(stream)
    starts = _events(stream, "TOOL_CALL_START")
    results_ = _events(stream, "TOOL_CALL_RESULT")
    assert len(starts) == 2 and len(results_) == 2
    # Both calls are started before either has its result; the second finishes first.
    assert types.index("TOOL_CALL_RESULT") > max(
        i for i, t in enumerate(types) if t == "TOOL_CALL_END"
    )
    assert [r["toolCallId"] for r in results_] == [starts[1]["toolCallId"], starts[0]["toolCallId"]]
    assert types[-1] == "RUN_FINISHED"


@pytest.mark.parametrize(
    ("scenario", "code"),
    [("crash", "agent_failed"), ("timeout", "timeout"), ("cancel", "cancelled")],
)
def test_failed_runs_end_in_run_error_never_run_finished(
    results: dict[str, Any], scenario: str, code: str
) -> None:
    (stream,) = results[scenario]["streams"]
    types = _types(stream)
    assert "RUN_FINISHED" not in types
    error = stream["events"][-1]
    assert error["type"] == "RUN_ERROR" and error["code"] == code
    assert error["metadata"]["runwatch"]["retryable"] is (code == "timeout")
    if scenario in ("timeout", "cancel"):
        # The open tool call was closed (I4) before the terminal event.
        (result,) = _events(stream, "TOOL_CALL_RESULT")
        assert result["metadata"]["runwatch"]["status"] == "error"


def test_cancel_answers_for_the_run(results: dict[str, Any]) -> None:
    answer = results["cancel"]["cancel_answer"]
    assert answer["runId"] == results["cancel"]["runId"]
    assert answer["run_id"] == results["cancel"]["streams"][0]["run_id"]


def test_streamed_answer_is_never_duplicated_or_reopened(results: dict[str, Any]) -> None:
    r = results["streamed"]
    (stream,) = r["streams"]
    starts = [e["messageId"] for e in _events(stream, "TEXT_MESSAGE_START")]
    assert len(starts) == len(set(starts)) == 2
    # The tool call closed the first message; the answer is the second, once.
    assert _texts(r["messages"]) == ["Let me check. ", "The answer is 42."]
    content = "".join(e["delta"] for e in _events(stream, "TEXT_MESSAGE_CONTENT"))
    assert content == "Let me check. The answer is 42."


def test_retried_post_replays_the_same_run(
    results: dict[str, Any], results_and_db: tuple[dict[str, Any], str]
) -> None:
    r = results["retry"]
    (first,) = r["first_streams"]
    (again,) = r["streams"]
    assert again["run_id"] == first["run_id"]
    assert again["events"] == first["events"]

    async def runs_with_id() -> int:
        from runtime.store.audit import AuditStore

        store = AuditStore.open(results_and_db[1])
        try:
            async with store.engine.connect() as conn:
                rows = await conn.execute(
                    select(RunRow.run_id).where(RunRow.client_msg_id == r["runId"])
                )
                return len(rows.all())
        finally:
            await store.close()

    assert asyncio.run(runs_with_id()) == 1


def test_resume_after_a_drop_gives_a_snapshot_then_live_events(results: dict[str, Any]) -> None:
    r = results["resume"]
    dropped = r["dropped_frames"]
    assert dropped[-1]["type"] == "TEXT_MESSAGE_CONTENT"
    assert r["last_event_id"] == dropped[-1]["id"]
    (stream,) = r["streams"]
    types = _types(stream)
    assert types[:3] == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "TEXT_MESSAGE_START"]
    assert types[-1] == "RUN_FINISHED"
    snapshot = _events(stream, "MESSAGES_SNAPSHOT")[0]["messages"]
    assert snapshot[0] == {
        "id": f"{stream['run_id']}-user",
        "role": "user",
        "content": "tell me in two parts",
    }
    assert _texts(snapshot) == ["Part one. "]
    reopened = _events(stream, "TEXT_MESSAGE_START")[0]["messageId"]
    assert reopened == next(m for m in snapshot if m["role"] == "assistant")["id"]
    # The text streamed before the drop is there once, the rest follows it.
    assert _texts(r["messages"]) == ["Part one. Part two."]
    # A second client connected by runId while the tool call was open: its stream reopens
    # the call (START/END, arguments in the snapshot) and gets its result live.
    (page,) = r["page_streams"]
    ptypes = _types(page)
    assert ptypes[:4] == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "TOOL_CALL_START", "TOOL_CALL_END"]
    assert "TOOL_CALL_ARGS" not in ptypes
    assert ptypes[-2:] == ["TOOL_CALL_RESULT", "RUN_FINISHED"]
    (call,) = [
        c for m in _events(page, "MESSAGES_SNAPSHOT")[0]["messages"] for c in m.get("toolCalls", [])
    ]
    assert _events(page, "TOOL_CALL_RESULT")[0]["toolCallId"] == call["id"]
    assert _texts(r["page_messages"]) == ["Part one. Part two."]


def test_runs_are_ordinary_runs_in_the_store_and_clean_under_runwatch_check(
    results: dict[str, Any], results_and_db: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    db = results_and_db[1]

    async def read() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        from runtime.store.audit import AuditStore

        store = AuditStore.open(db)
        try:
            async with store.engine.connect() as conn:
                runs = (await conn.execute(select(RunRow))).all()
                events = (await conn.execute(select(EventRow))).all()
                deliveries = (await conn.execute(select(DeliveryRow))).all()
                conns = (await conn.execute(select(ConnectionRow))).all()
            return runs, events, deliveries, conns
        finally:
            await store.close()

    runs, events, deliveries, conns = asyncio.run(read())
    assert len(runs) == len(SCENARIOS)  # the retried POST started nothing
    assert {c.client for c in conns} == {"agui-sse"}
    assert all(c.closed_us is not None for c in conns)
    by_run: dict[str, list[Any]] = {}
    for e in events:
        by_run.setdefault(e.run_id, []).append(e)
    resumed = results["resume"]["streams"][0]["run_id"]
    for run in runs:
        if run.run_id != resumed:
            # A stream was there from the first event: every event was sent live.
            assert all(e.live for e in by_run[run.run_id]), run.agent
    # SSE acks are write completions: every live event has an acked receipt, sent first.
    acked = {d.event_id for d in deliveries if d.acked_us is not None}
    assert all(d.acked_us is None or d.acked_us >= d.sent_us for d in deliveries)
    assert {e.event_id for e in events if e.live} <= acked
    assert results["metrics"]["failures"] == 0
    assert results["metrics"]["acked"] == len(SCENARIOS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env.update(RUNWATCH_DATABASE_URL=db)
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "check", "--since", "1h", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    verdicts = json.loads(out.stdout)
    judged = verdicts["runs"]
    assert len(judged) == len(SCENARIOS)
    assert all(v["verdict"] == "pass" for v in judged), judged
