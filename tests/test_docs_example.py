"""The README's protocol example, sent to a live server: what it shows is what the server sends."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import websockets

from .conftest import LiveServer

README = Path(__file__).resolve().parents[1] / "README.md"


def example_frames() -> list[tuple[str, dict[str, Any]]]:
    """(direction, frame) of the README's protocol block. Elided envelopes (``… "seq":2,``)
    keep their ``type``, ``seq`` and ``data``."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## Protocol quick start", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    frames = []
    for line in block.strip().splitlines():
        arrow, _, body = line.partition(" ")
        try:
            frame = json.loads(body)
        except ValueError:
            frame = {"type": re.search(r'"type":"(\w+)"', body).group(1)}  # type: ignore[union-attr]
            frame["seq"] = int(re.search(r'"seq":(\d+)', body).group(1))  # type: ignore[union-attr]
            data_at = body.index('"data":') + len('"data":')
            frame["data"], _ = json.JSONDecoder().raw_decode(body[data_at:])
        frames.append((arrow, frame))
    return frames


def shape(value: Any) -> Any:
    """Keys and value types, recursively: what a client parses, not the values themselves."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


async def test_readme_protocol_example_matches_the_server(live: LiveServer) -> None:
    frames = example_frames()
    sent = [f for arrow, f in frames if arrow == "→"]
    shown = [f for arrow, f in frames if arrow == "←"]
    received: list[dict[str, Any]] = []
    async with websockets.connect(live.ws_url) as ws:
        for frame in sent:
            if frame["type"] == "connect":
                frame = {**frame, "token": live.token("alice")}
            if frame["type"] == "ack":
                frame = {**frame, "run_id": received[-1]["run_id"]}
            await ws.send(json.dumps(frame))
            if frame["type"] == "ack":
                break
            while True:
                got = json.loads(await ws.recv())
                received.append(got)
                if got["type"] in ("connected", "agent_completed", "agent_error"):
                    break
            if frame["type"] == "chat":
                assert received[-1]["type"] == "agent_completed"
    assert [f["type"] for f in received] == [f["type"] for f in shown]
    for doc, real in zip(shown, received, strict=True):
        if "seq" in doc:
            assert doc["seq"] == real["seq"], doc["type"]
        if "data" in doc:
            assert shape(doc["data"]) == shape(real["data"]), doc["type"]
        if len(doc) > 3:  # a full frame in the README: every field, with the right types
            assert shape(doc) == shape(real), doc["type"]
    # The values the README shows are the values the server sends, timings aside.
    for doc, real in zip(shown, received, strict=True):
        if doc["type"] in ("tool_executing", "tool_completed", "text_delta", "final_report"):
            untimed = {k: v for k, v in real["data"].items() if k != "duration_ms"}
            assert {k: v for k, v in doc["data"].items() if k != "duration_ms"} == untimed
        if doc["type"] == "agent_thinking":
            assert doc["data"] == real["data"]


def test_the_events_page_lists_every_type_and_error_code() -> None:
    """``docs/events.md`` names every event type and every ``agent_error`` code, each with the
    ``retryable`` value the runtime sends."""
    from runtime.events import ErrorCode, EventType

    page = (README.parent / "docs" / "events.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (.*) \|$", page, re.M)}
    for kind in EventType:
        assert kind.value in rows, f"docs/events.md does not list {kind.value}"
    for code in ErrorCode:
        assert code.value in rows, f"docs/events.md does not list agent_error code {code.value}"
        retryable = rows[code.value].rsplit("|", 1)[-1].strip()
        assert retryable == str(code.retryable).lower(), (code.value, retryable)
