"""The ``llm`` agent: any OpenAI-compatible chat-completions endpoint, with tool calling and
token streaming (OpenAI, vLLM, Ollama, llama.cpp server).

Configuration, read when a run starts: ``RUNWATCH_LLM_BASE_URL`` (e.g.
``http://127.0.0.1:11434/v1``), ``RUNWATCH_LLM_MODEL``, ``RUNWATCH_LLM_API_KEY`` (optional, sent as
a bearer token, never logged), ``RUNWATCH_LLM_TIMEOUT_S`` (per request, default 60),
``RUNWATCH_LLM_MAX_STEPS`` (model and tool rounds, default 8).

Streamed content goes out as ``ctx.delta`` chunks; reasoning (``reasoning_content``) as
``ctx.think`` steps; tool calls through ``ctx.tool`` (so the runtime emits their events), with
results or errors fed back to the model. The returned text is the final report.

Exceptions::

    LLMError
     +-- LLMConfigError
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import RunContext, ToolError

__all__ = ["LLMConfigError", "LLMError", "llm_agent"]

SYSTEM_PROMPT = "You are a helpful assistant. Use the tools when they help; answer concisely."


class LLMError(Exception):
    """The model endpoint failed or answered something unusable."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        return prefix + str(self.args[0])


class LLMConfigError(LLMError):
    """A required ``RUNWATCH_LLM_*`` variable is missing."""


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
            raise LLMConfigError("RUNWATCH_LLM_BASE_URL is not set")
        if not model:
            raise LLMConfigError("RUNWATCH_LLM_MODEL is not set")
        try:
            timeout = float(os.environ.get("RUNWATCH_LLM_TIMEOUT_S", "60"))
            steps = int(os.environ.get("RUNWATCH_LLM_MAX_STEPS", "8"))
        except ValueError as exc:
            raise LLMConfigError(f"bad RUNWATCH_LLM_* number: {exc}") from None
        return cls(base.rstrip("/"), model, os.environ.get("RUNWATCH_LLM_API_KEY"), timeout, steps)


@dataclass
class _Turn:
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)


async def _stream_turn(
    client: httpx.AsyncClient, cfg: _Config, messages: list[dict[str, Any]], ctx: RunContext
) -> _Turn:
    body: dict[str, Any] = {"model": cfg.model, "messages": messages, "stream": True}
    tools = ctx.tool_schemas()
    if tools:
        body["tools"] = tools
        body["tool_choice"] = "auto"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    turn = _Turn()
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
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or choice.get("message") or {}
                    content = delta.get("content")
                    if content:
                        turn.content += str(content)
                        await ctx.delta(str(content))
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if reasoning:
                        turn.reasoning += reasoning
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
        raise LLMError(f"cannot reach the model endpoint: {type(exc).__name__}") from exc
    if turn.reasoning.strip():
        await ctx.think(turn.reasoning.strip()[:4000])
    return turn


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
