"""The ``demo`` agent: offline and deterministic, with real tools (SPEC section 4).

When a message matches several behaviours, the first of this order wins:
crash, fail tool, wait, arithmetic, time, search.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from ..tools.builtin import MAX_WAIT_S
from . import RunContext, ToolError

__all__ = ["demo_agent", "find_expression"]

_WAIT = re.compile(r"\bwait\s+(\d+(?:\.\d+)?)", re.IGNORECASE)
_SEARCH = re.compile(r"\bsearch\s+(.+)", re.IGNORECASE | re.DOTALL)
_TIME = re.compile(r"\b(time|date)\b", re.IGNORECASE)
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_EXPR = re.compile(rf"[(\s\-+]*{_NUMBER}[)\s]*(?:(?:\*\*|//|[-+*/%^×÷])[(\s\-+]*{_NUMBER}[)\s]*)+")

CAPABILITIES = (
    'I can: do arithmetic ("what is 6*7"), tell the time or date, wait N seconds '
    '("wait 5", thinking once a second), search the runwatch docs ("search resume"), '
    'show a failing tool ("fail tool"), and crash on purpose ("crash").'
)


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
            return f"The `fail` tool failed as expected ({exc.message}); the run still completes."
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
            return f"I could not compute {expression}: {exc.message}."
        return f"{expression} = {result['value']}"
    if _TIME.search(text):
        await ctx.think("Checking the clock.")
        now: dict[str, Any] = await ctx.tool("clock", {})
        return f"It is {now['time']} on {now['date']}."
    search = _SEARCH.search(text)
    if search:
        query = search.group(1).strip()[:200]
        await ctx.think(f"Searching the runwatch docs for: {query}")
        found: dict[str, Any] = await ctx.tool("docs_search", {"query": query})
        hits = found.get("hits", [])
        if not hits:
            return f"Nothing in the docs matches {query!r}."
        lines = [f"- {h['file']} › {h['section']}: {h['snippet']}" for h in hits[:3]]
        return f"Top matches for {query!r}:\n" + "\n".join(lines)
    await ctx.think("No tool needed; listing what I can do.")
    return CAPABILITIES


async def _wait(ctx: RunContext, seconds: float) -> str:
    seconds = min(seconds, MAX_WAIT_S)
    await ctx.think(f"Waiting {seconds:g} seconds.")
    async with asyncio.TaskGroup() as tg:
        call = tg.create_task(ctx.tool("wait", {"seconds": seconds}))
        elapsed = 0
        while not call.done() and elapsed < int(seconds):
            done, _ = await asyncio.wait({call}, timeout=1.0)
            if not done:
                elapsed += 1
                await ctx.think(f"Still waiting: {elapsed} of {seconds:g} seconds.")
    return f"Waited {seconds:g} seconds."
