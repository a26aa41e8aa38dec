"""The ``demo`` agent: offline and deterministic, with real tools (docs/agents.md).

When a message matches several behaviours, the first of this order wins:
crash, fail tool, wait, arithmetic, time, search.

Every answer is streamed: :func:`stream_answer` sends it as ``text_delta`` chunks of a few words,
paced like a model's tokens, and returns it whole, so the final report is exactly the
concatenation of the deltas (docs/events.md). Answers are short Markdown.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from ..tools.builtin import MAX_WAIT_S
from . import RunContext, ToolError

__all__ = ["CHUNK_PAUSE_S", "chunks", "demo_agent", "find_expression", "stream_answer"]

_WAIT = re.compile(r"\bwait\s+(\d+(?:\.\d+)?)", re.IGNORECASE)
_SEARCH = re.compile(r"\bsearch\s+(.+)", re.IGNORECASE | re.DOTALL)
_TIME = re.compile(r"\b(time|date)\b", re.IGNORECASE)
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_EXPR = re.compile(rf"[(\s\-+]*{_NUMBER}[)\s]*(?:(?:\*\*|//|[-+*/%^×÷])[(\s\-+]*{_NUMBER}[)\s]*)+")

CAPABILITIES = (
    "I am the offline **demo** agent. I can:\n\n"
    "- do arithmetic: `what is 6*7`\n"
    "- tell the time or date: `what time is it`\n"
    "- wait N seconds, thinking once a second: `wait 5`\n"
    "- search the runwatch docs: `search resume`\n"
    "- show a failing tool: `fail tool`\n"
    "- crash on purpose: `crash`"
)
#: Pause between two streamed chunks: visible streaming, yet a whole answer takes well under 1 s.
CHUNK_PAUSE_S = 0.02
_TOKEN = re.compile(r"\s*\S+\s*|\s+")


def chunks(text: str, words: int = 2) -> list[str]:
    """``text`` in pieces of a few words; their concatenation is ``text``, character for
    character (whitespace and newlines included)."""
    tokens = _TOKEN.findall(text)
    return ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]


async def stream_answer(ctx: RunContext, text: str) -> str:
    """Stream ``text`` as ``text_delta`` chunks and return it: the final report must equal the
    concatenation of the deltas."""
    for n, piece in enumerate(chunks(text)):
        if n:
            await asyncio.sleep(CHUNK_PAUSE_S)
        await ctx.delta(piece)
    return text


def find_expression(text: str) -> str | None:
    """The first arithmetic expression with at least one operator in ``text``."""
    match = _EXPR.search(text)
    if match is None:
        return None
    expr = match.group(0).strip()
    # Balance stray parentheses picked up at the edges.
    while expr.count("(") > expr.count(")") and expr.startswith("("):
        expr = expr[1:].strip()
    while expr.count(")") > expr.count("(") and expr.endswith(")"):
        expr = expr[:-1].strip()
    return expr


async def demo_agent(ctx: RunContext) -> str:
    """The demo agent: tools and thinking steps as the message asks, then a streamed answer."""
    return await stream_answer(ctx, await _answer(ctx))


async def _answer(ctx: RunContext) -> str:
    text = ctx.input
    lowered = text.lower()
    if "crash" in lowered:
        await ctx.think("Asked to crash: raising on purpose.")
        raise RuntimeError("the demo agent crashed on purpose")
    if "fail tool" in lowered:
        await ctx.think("Calling the tool that always fails.")
        try:
            await ctx.tool("fail", {})
        except ToolError as exc:
            return (
                f"The `fail` tool failed as expected (*{exc.message}*); "
                "the run still completes and explains."
            )
        return "The fail tool unexpectedly succeeded."
    wait = _WAIT.search(text)
    if wait:
        return await _wait(ctx, float(wait.group(1)))
    expression = find_expression(text)
    if expression is not None:
        await ctx.think(f"This looks like arithmetic: {expression}")
        try:
            result: dict[str, Any] = await ctx.tool("calculator", {"expression": expression})
        except ToolError as exc:
            return f"I could not compute `{expression}`: {exc.message}."
        return f"`{expression}` = **{result['value']}**"
    if _TIME.search(text):
        await ctx.think("Checking the clock.")
        now: dict[str, Any] = await ctx.tool("clock", {})
        return f"It is **{now['time']}** on {now['date']}."
    search = _SEARCH.search(text)
    if search:
        query = search.group(1).strip()[:200]
        await ctx.think(f"Searching the runwatch docs for: {query}")
        found: dict[str, Any] = await ctx.tool("docs_search", {"query": query})
        hits = found.get("hits", [])
        if not hits:
            return f"Nothing in the docs matches *{_plain(query)}*."
        lines = [f"- **{h['file']} › {_plain(h['section'])}**: {h['snippet']}" for h in hits[:3]]
        return f"Top matches for *{_plain(query)}*:\n\n" + "\n".join(lines)
    await ctx.think("No tool needed; listing what I can do.")
    return CAPABILITIES


async def _wait(ctx: RunContext, seconds: float) -> str:
    seconds = min(seconds, MAX_WAIT_S)
    await ctx.think(f"Waiting {_seconds(seconds)}.")
    async with asyncio.TaskGroup() as tg:
        call = tg.create_task(ctx.tool("wait", {"seconds": seconds}))
        elapsed = 0
        while not call.done() and elapsed < int(seconds):
            done, _ = await asyncio.wait({call}, timeout=1.0)
            if not done:
                elapsed += 1
                await ctx.think(f"Still waiting: {elapsed} of {seconds:g} seconds.")
    return f"Waited {_seconds(seconds)}."


def _seconds(seconds: float) -> str:
    return f"{seconds:g} second" + ("" if seconds == 1 else "s")


def _plain(text: str) -> str:
    """Text shown inside Markdown emphasis: no stray markers, one line."""
    return " ".join(text.replace("*", "").replace("`", "").split())
