"""User agents and tools (docs/agents.md): ``--agent`` and ``--tool`` from the current
directory, tools described by a plain function's docstring and annotations."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from runtime.protocol import Chat
from runtime.tools import load_tool, tool_from_callable

from .conftest import JWT_SECRET, make_token, open_ws, start_server_process

USER_MODULE = '''
from runtime.agents import RunContext


def shout(text: str, times: int = 1, loud: bool = False) -> str:
    """Repeat the text in capitals.

    Everything after the first paragraph stays out of the description."""
    return " ".join([text.upper()] * times)


async def hello(ctx: RunContext) -> str:
    await ctx.think("about to shout")
    out = await ctx.tool("shout", {"text": ctx.input, "times": 2})
    return f"**{out}**"
'''


def shout(text: str, times: int = 1, tags: list[str] | None = None) -> str:
    """Repeat the text.

    More words."""
    return text * times


def test_a_function_becomes_a_described_tool() -> None:
    tool = tool_from_callable(shout)
    assert tool.name == "shout" and tool.description == "Repeat the text."
    assert tool.parameters == {
        "type": "object",
        "properties": {"text": {"type": "string"}, "times": {"type": "integer"}, "tags": {}},
        "required": ["text"],
    }
    renamed = load_tool("echo=tests.test_user_code:shout")
    assert renamed.name == "echo" and renamed.func is shout


async def test_serve_runs_an_agent_and_a_tool_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "myagent.py").write_text(USER_MODULE)
    server = start_server_process(
        tmp_path,
        {"RUNWATCH_JWT_SECRET": JWT_SECRET},
        args=["--agent", "myagent:hello", "--tool", "myagent:shout"],
    )
    try:
        async with await open_ws(server.ws_url, make_token("alice")) as ws:
            await ws.send(Chat("hi", "m1", agent="hello").serialize())
            frames = []
            while not frames or frames[-1]["type"] not in ("agent_completed", "agent_error"):
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        kinds = [f["type"] for f in frames]
        assert kinds[-1] == "agent_completed", frames
        done = next(f for f in frames if f["type"] == "tool_completed")
        assert done["data"]["tool"] == "shout" and done["data"]["result"] == "HI HI"
        assert next(f for f in frames if f["type"] == "final_report")["data"]["text"] == "**HI HI**"
    finally:
        server.proc.terminate()
        server.proc.wait(30)
