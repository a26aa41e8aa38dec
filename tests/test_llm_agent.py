"""The llm agent against a fake OpenAI-compatible server at the wire, through the real runtime."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.events import EventType

from .conftest import LiveServer, scale, serve_app
from .invariants import assert_valid


def sse(chunks: list[dict[str, Any]]) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def delta(**d: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": d, "finish_reason": None}]}


def finish(reason: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


REASONING = [
    "The user asks for the answer to everything. ",
    "That is a reference to a novel. ",
    "In it, a computer thinks for millions of years. ",
    "Its answer is a number. ",
    "The number is forty-two. ",
    "I will say so briefly.",
]
REASONING_PAUSE_S = 0.6  # six pieces: reasoning streams for over three seconds


async def slow_reasoning(broken: bool) -> AsyncIterator[str]:
    """Reasoning a piece at a time over several seconds, then the answer; or, when ``broken``,
    the connection drops in the middle of the reasoning."""
    for n, piece in enumerate(REASONING):
        if broken and n == 4:
            raise ConnectionResetError("the model server went away")
        yield sse([delta(reasoning_content=piece)])[: -len("data: [DONE]\n\n")]
        await asyncio.sleep(REASONING_PAUSE_S)
    yield sse([delta(content="It is "), delta(content="42."), finish("stop")])


class FakeOpenAI:
    """Scripted chat-completions over SSE; records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.mode = "tools"
        self.port = 0

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "error":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        if self.mode in ("slow_reasoning", "broken"):
            return StreamingResponse(
                slow_reasoning(self.mode == "broken"), media_type="text/event-stream"
            )
        has_tool_result = any(m.get("role") == "tool" for m in body["messages"])
        if self.mode == "tools" and not has_tool_result:
            chunks = [
                delta(reasoning_content="The user wants arithmetic."),
                delta(
                    tool_calls=[
                        {
                            "index": 0,
                            "id": "call_a",
                            "function": {"name": "calculator", "arguments": ""},
                        }
                    ]
                ),
                delta(tool_calls=[{"index": 0, "function": {"arguments": '{"expression": '}}]),
                delta(tool_calls=[{"index": 0, "function": {"arguments": '"6*7"}'}}]),
                finish("tool_calls"),
            ]
        elif self.mode == "bad_args" and not has_tool_result:
            chunks = [
                delta(
                    tool_calls=[
                        {
                            "index": 0,
                            "id": "call_b",
                            "function": {"name": "calculator", "arguments": "{oops"},
                        }
                    ]
                ),
                finish("tool_calls"),
            ]
        else:
            chunks = [delta(content="The answer "), delta(content="is 42."), finish("stop")]
        return StreamingResponse(iter([sse(chunks)]), media_type="text/event-stream")


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    app = Starlette(routes=[Route("/v1/chat/completions", fake.completions, methods=["POST"])])
    async with serve_app(app, lifespan="off") as served:
        fake.port = served.port
        yield fake


@pytest.fixture
def llm_env(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    monkeypatch.setenv("RUNWATCH_LLM_BASE_URL", f"http://127.0.0.1:{fake_openai.port}/v1")
    monkeypatch.setenv("RUNWATCH_LLM_MODEL", "test-model")
    monkeypatch.setenv("RUNWATCH_LLM_API_KEY", "sk-test-key")
    return fake_openai


async def test_tool_call_then_streamed_answer(live: LiveServer, llm_env: FakeOpenAI) -> None:
    client = await live.client("alice")
    events = await (await client.chat("what is 6*7", agent="llm")).wait(20)
    assert_valid(events)
    kinds = [e.type for e in events]
    assert EventType.TOOL_EXECUTING in kinds and EventType.TEXT_DELTA in kinds
    done = next(e for e in events if e.type == EventType.TOOL_COMPLETED)
    assert done.data["tool"] == "calculator" and done.data["result"]["value"] == 42
    assert (
        next(e for e in events if e.type == EventType.FINAL_REPORT).data["text"]
        == "The answer is 42."
    )
    thoughts = [e.data["text"] for e in events if e.type == EventType.AGENT_THINKING]
    assert "The user wants arithmetic." in thoughts
    # The model got the tool result back under its tool_call_id, and the key as a bearer.
    second = llm_env.requests[1]["messages"]
    tool_msg = next(m for m in second if m["role"] == "tool")
    assert tool_msg["tool_call_id"] == "call_a" and json.loads(tool_msg["content"])["value"] == 42
    assert llm_env.headers[0]["authorization"] == "Bearer sk-test-key"
    assert any(t["function"]["name"] == "calculator" for t in llm_env.requests[0]["tools"])


async def test_invalid_tool_arguments_go_back_to_the_model(
    live: LiveServer, llm_env: FakeOpenAI
) -> None:
    llm_env.mode = "bad_args"
    client = await live.client("alice")
    events = await (await client.chat("compute", agent="llm")).wait(20)
    assert_valid(events)
    assert events[-1].type == EventType.AGENT_COMPLETED
    tool_msg = next(m for m in llm_env.requests[1]["messages"] if m["role"] == "tool")
    assert "invalid arguments" in tool_msg["content"]


async def test_endpoint_error_fails_the_run(live: LiveServer, llm_env: FakeOpenAI) -> None:
    llm_env.mode = "error"
    client = await live.client("alice")
    events = await (await client.chat("hi", agent="llm")).wait(20)
    assert_valid(events)
    assert events[-1].data["code"] == "agent_failed"
    assert "HTTP 500" in events[-1].data["message"]
    assert "sk-test-key" not in events[-1].data["message"]


async def test_missing_configuration_fails_clearly(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNWATCH_LLM_BASE_URL", raising=False)
    client = await live.client("alice")
    events = await (await client.chat("hi", agent="llm")).wait(20)
    assert events[-1].data["code"] == "agent_failed"
    assert "RUNWATCH_LLM_BASE_URL is not set" in events[-1].data["message"]


async def test_reasoning_streams_live_as_thinking_steps(
    live: LiveServer, llm_env: FakeOpenAI
) -> None:
    """Reasoning that takes seconds is shown while it arrives, not when the turn ends."""
    llm_env.mode = "slow_reasoning"
    client = await live.client("alice")
    run = await client.chat("what is the answer?", agent="llm")
    started = time.monotonic()
    arrivals: list[tuple[float, Any]] = []
    async for event in run:
        arrivals.append((time.monotonic() - started, event))
    events = [e for _, e in arrivals]
    assert_valid(events)
    assert events[-1].type == EventType.AGENT_COMPLETED
    steps = [(t, e.data["text"]) for t, e in arrivals if e.type == EventType.AGENT_THINKING]
    reasoning = [(t, text) for t, text in steps if text in {p.strip() for p in REASONING}]
    assert [text for _, text in reasoning] == [p.strip() for p in REASONING]
    answer_at = next(t for t, e in arrivals if e.type == EventType.TEXT_DELTA)
    # The first thought reached the client seconds before the answer began, and the thoughts
    # arrived spread over the reasoning, not in one burst at its end.
    assert answer_at - reasoning[0][0] >= 4 * REASONING_PAUSE_S
    assert reasoning[-1][0] - reasoning[0][0] >= 3 * REASONING_PAUSE_S
    assert reasoning[0][0] < 2.0 * scale()
    final = next(e for e in events if e.type == EventType.FINAL_REPORT)
    assert final.data["text"] == "It is 42."


async def test_reasoning_is_kept_when_the_stream_breaks(
    live: LiveServer, llm_env: FakeOpenAI
) -> None:
    llm_env.mode = "broken"
    client = await live.client("alice")
    events = await (await client.chat("what is the answer?", agent="llm")).wait(30)
    assert_valid(events)
    thoughts = [e.data["text"] for e in events if e.type == EventType.AGENT_THINKING]
    for piece in REASONING[:4]:
        assert piece.strip() in thoughts, thoughts
    assert REASONING[4].strip() not in thoughts
    assert events[-1].type == EventType.AGENT_ERROR
    assert events[-1].data["code"] == "agent_failed"
    assert "stream broke" in events[-1].data["message"]


def test_a_bad_number_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.agents.llm import config_problem

    monkeypatch.setenv("RUNWATCH_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("RUNWATCH_LLM_MODEL", "m")
    monkeypatch.setenv("RUNWATCH_LLM_MAX_STEPS", "many")
    assert config_problem() == "RUNWATCH_LLM_MAX_STEPS must be a number (int), got 'many'"
    monkeypatch.setenv("RUNWATCH_LLM_MAX_STEPS", "3")
    monkeypatch.setenv("RUNWATCH_LLM_TIMEOUT_S", "soon")
    assert config_problem() == "RUNWATCH_LLM_TIMEOUT_S must be a number (float), got 'soon'"
    monkeypatch.delenv("RUNWATCH_LLM_TIMEOUT_S")
    assert config_problem() is None
