"""The ``llm`` agent: any OpenAI-compatible chat-completions endpoint, with tool calling and
token streaming (OpenAI, vLLM, Ollama, llama.cpp server).

Configuration, read when a run starts: ``RUNWATCH_LLM_BASE_URL`` (e.g.
``http://127.0.0.1:11434/v1``), ``RUNWATCH_LLM_MODEL``, ``RUNWATCH_LLM_API_KEY`` (optional, sent as
a bearer token, never logged), ``RUNWATCH_LLM_TIMEOUT_S`` (per request, default 60),
``RUNWATCH_LLM_MAX_STEPS`` (model and tool rounds, default 8).

Streamed content goes out as ``ctx.delta`` chunks as it arrives. Reasoning (``reasoning_content``
or ``reasoning`` deltas, as vLLM, llama.cpp server, Ollama and others send it) goes out live as
``ctx.think`` steps, a sentence or a paragraph at a time (see :class:`_Reasoning`), and what
arrived before a broken stream is still emitted before the run fails. Tool calls go through
``ctx.tool`` (so the runtime emits their events), with results or errors fed back to the model.
The returned text is the final report. Each request is reported with ``ctx.model_round`` (the
``chat {model}`` span of the run's trace: model, token usage when the endpoint streams it,
time to the first chunk, ``error.type`` on failure).

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    LLMError
     +-- LLMConfigError
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from ..errors import LLMConfigError, LLMError
from ..events import now_us
from . import ModelRound, RunContext, ToolError

__all__ = ["LLMConfigError", "LLMError", "config_problem", "llm_agent"]

_N = TypeVar("_N", int, float)

SYSTEM_PROMPT = "You are a helpful assistant. Use the tools when they help; answer concisely."


@dataclass
class _Config:
    base_url: str
    model: str
    api_key: str | None
    timeout_s: float
    max_steps: int

    @classmethod
    def from_env(cls) -> _Config:
        base = os.environ.get("RUNWATCH_LLM_BASE_URL")
        model = os.environ.get("RUNWATCH_LLM_MODEL")
        if not base:
            raise LLMConfigError("RUNWATCH_LLM_BASE_URL", "is not set")
        if not model:
            raise LLMConfigError("RUNWATCH_LLM_MODEL", "is not set")
        timeout = _number("RUNWATCH_LLM_TIMEOUT_S", "60", float)
        steps = _number("RUNWATCH_LLM_MAX_STEPS", "8", int)
        return cls(base.rstrip("/"), model, os.environ.get("RUNWATCH_LLM_API_KEY"), timeout, steps)


def _number(name: str, default: str, kind: type[_N]) -> _N:
    raw = os.environ.get(name) or default
    try:
        return kind(raw)
    except ValueError:
        raise LLMConfigError(name, f"must be a number ({kind.__name__}), got {raw!r}") from None


_SENTENCE_END = re.compile(r"[.!?:;]\s+|\n")


class _Reasoning:
    """Streams a model's reasoning as thinking steps while it arrives.

    Pieces are buffered and flushed as one ``agent_thinking`` step at the end of a sentence or a
    line, when ``max_wait_s`` passed since the last step or ``max_chars`` are waiting, and
    always when the reasoning ends (content or a tool call starts, the stream ends or breaks).
    """

    def __init__(self, ctx: RunContext, *, max_wait_s: float = 1.0, max_chars: int = 600) -> None:
        self._ctx = ctx
        self._buffer = ""
        self._last = time.monotonic()
        self.max_wait_s = max_wait_s
        self.max_chars = max_chars
        self.text = ""

    async def add(self, piece: str) -> None:
        self._buffer += piece
        self.text += piece
        if len(self._buffer) >= self.max_chars or time.monotonic() - self._last >= self.max_wait_s:
            await self.flush()
            return
        ends = list(_SENTENCE_END.finditer(self._buffer))
        if ends:
            cut = ends[-1].end()
            head, self._buffer = self._buffer[:cut], self._buffer[cut:]
            await self._step(head)

    async def flush(self) -> None:
        head, self._buffer = self._buffer, ""
        await self._step(head)

    async def _step(self, text: str) -> None:
        self._last = time.monotonic()
        if text.strip():
            await self._ctx.think(text.strip()[:4000])


def config_problem() -> str | None:
    """Why the ``llm`` agent cannot run with this environment, or ``None`` when it can."""
    try:
        _Config.from_env()
    except LLMConfigError as exc:
        return str(exc)
    return None


@dataclass
class _Turn:
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    first_chunk_s: float | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    response_model: str | None = None
    response_id: str | None = None


def _error_type(exc: BaseException) -> str:
    """``error.type`` of a failed model round: the HTTP status, else the transport error."""
    if isinstance(exc, LLMError):
        if exc.status is not None:
            return str(exc.status)
        if exc.__cause__ is not None:
            return type(exc.__cause__).__name__
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__


def _report_round(
    ctx: RunContext,
    cfg: _Config,
    messages: list[dict[str, Any]],
    turn: _Turn,
    started_us: int,
    error: BaseException | None = None,
) -> None:
    url = httpx.URL(cfg.base_url)
    usage = turn.usage
    tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    ctx.model_round(
        ModelRound(
            model=cfg.model,
            started_us=started_us,
            ended_us=now_us(),
            first_chunk_s=turn.first_chunk_s,
            response_model=turn.response_model,
            response_id=turn.response_id,
            input_tokens=tokens_in if isinstance(tokens_in, int) else None,
            output_tokens=tokens_out if isinstance(tokens_out, int) else None,
            finish_reasons=(turn.finish_reason,) if turn.finish_reason else (),
            error_type=None if error is None else _error_type(error),
            error_message="" if error is None else str(error)[:300],
            server_address=url.host or None,
            server_port=url.port or (443 if url.scheme == "https" else 80),
            messages=messages,
            output_text=turn.content,
            output_tool_calls=[turn.tool_calls[i] for i in sorted(turn.tool_calls)],
        )
    )


async def _stream_turn(
    client: httpx.AsyncClient, cfg: _Config, messages: list[dict[str, Any]], ctx: RunContext
) -> _Turn:
    """One request, streamed; reported as a model round whether it succeeds or fails."""
    turn = _Turn()
    started_us = now_us()
    try:
        await _read_turn(client, cfg, messages, ctx, turn)
    except BaseException as exc:
        _report_round(ctx, cfg, messages, turn, started_us, exc)
        raise
    _report_round(ctx, cfg, messages, turn, started_us)
    return turn


async def _read_turn(
    client: httpx.AsyncClient,
    cfg: _Config,
    messages: list[dict[str, Any]],
    ctx: RunContext,
    turn: _Turn,
) -> None:
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": messages,
        "stream": True,
        # Token usage in the last chunk (OpenAI, vLLM, Ollama, llama.cpp server): for traces.
        "stream_options": {"include_usage": True},
    }
    tools = ctx.tool_schemas()
    if tools:
        body["tools"] = tools
        body["tool_choice"] = "auto"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    reasoning = _Reasoning(ctx)
    started = time.monotonic()
    try:
        async with client.stream(
            "POST", f"{cfg.base_url}/chat/completions", json=body, headers=headers
        ) as response:
            if response.status_code >= 400:
                text = (await response.aread()).decode("utf-8", "replace")[:300]
                raise LLMError(
                    f"the model endpoint refused the request: {text}", status=response.status_code
                )
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise LLMError("malformed stream chunk from the model endpoint") from None
                if turn.first_chunk_s is None:
                    turn.first_chunk_s = time.monotonic() - started
                if isinstance(chunk.get("usage"), dict):
                    turn.usage = chunk["usage"]
                turn.response_model = chunk.get("model") or turn.response_model
                turn.response_id = chunk.get("id") or turn.response_id
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or choice.get("message") or {}
                    thought = delta.get("reasoning_content") or delta.get("reasoning")
                    if thought:
                        await reasoning.add(str(thought))
                    content = delta.get("content")
                    if content:
                        await reasoning.flush()
                        turn.content += str(content)
                        await ctx.delta(str(content))
                    if delta.get("tool_calls"):
                        await reasoning.flush()
                    for call in delta.get("tool_calls") or []:
                        slot = turn.tool_calls.setdefault(
                            int(call.get("index", 0)), {"id": "", "name": "", "arguments": ""}
                        )
                        slot["id"] = call.get("id") or slot["id"]
                        fn = call.get("function") or {}
                        slot["name"] += fn.get("name") or ""
                        slot["arguments"] += fn.get("arguments") or ""
                    if choice.get("finish_reason"):
                        turn.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as exc:
        # Reasoning that arrived is shown, also when the stream broke before the turn ended.
        await reasoning.flush()
        if reasoning.text or turn.content or turn.tool_calls:
            raise LLMError(f"the model's stream broke: {type(exc).__name__}") from exc
        raise LLMError(f"cannot reach the model endpoint: {type(exc).__name__}") from exc
    except LLMError:
        await reasoning.flush()
        raise
    await reasoning.flush()
    turn.reasoning = reasoning.text


async def llm_agent(ctx: RunContext) -> str:
    cfg = _Config.from_env()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": ctx.input},
    ]
    async with httpx.AsyncClient(timeout=cfg.timeout_s) as client:
        for _ in range(cfg.max_steps):
            turn = await _stream_turn(client, cfg, messages, ctx)
            if not turn.tool_calls:
                return turn.content
            calls = [turn.tool_calls[i] for i in sorted(turn.tool_calls)]
            await ctx.think("Calling tools: " + ", ".join(c["name"] for c in calls))
            messages.append(
                {
                    "role": "assistant",
                    "content": turn.content or None,
                    "tool_calls": [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]},
                        }
                        for c in calls
                    ],
                }
            )
            for call in calls:
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call["id"],
                        "content": await _run_tool(ctx, call),
                    }
                )
    return "I stopped after the maximum number of tool rounds without a final answer."


async def _run_tool(ctx: RunContext, call: dict[str, Any]) -> str:
    try:
        args = json.loads(call["arguments"] or "{}")
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
    except ValueError as exc:
        return json.dumps({"error": f"invalid arguments: {exc}"})
    try:
        result = await ctx.tool(call["name"], args)
    except ToolError as exc:
        return json.dumps({"error": exc.message})
    return json.dumps(result, default=str)
