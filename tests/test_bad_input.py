"""Bad input gets its protocol error or close code, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from runtime.protocol import Chat, Connect, Ping

from .conftest import (
    LiveServer,
    make_settings,
    make_token,
    open_ws,
    serve_runtime,
    sqlite_url,
    wait_until,
)


async def connect(live: LiveServer, user: str = "alice") -> ClientConnection:
    return await open_ws(live.ws_url, live.token(user), max_size=None)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 15)
    return closed.value.rcvd.code if closed.value.rcvd else None


async def healthy(live: LiveServer) -> None:
    client = await live.client("healthy")
    events = await (await client.chat("what is 2+2")).wait(10)
    assert events[-1].type.value == "agent_completed"


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("not json at all", "invalid_json", None),
        (b"\x00\x01binary", "invalid_json", None),
        ("[1, 2, 3]", "invalid_message", None),
        ('{"text": "no type"}', "invalid_message", None),
        ('{"type": "teleport", "run_id": "r9"}', "unknown_type", "r9"),
        ('{"type": "chat", "client_msg_id": "m7"}', "invalid_message", "m7"),
        ('{"type": "chat", "text": ["x"], "client_msg_id": "m8"}', "invalid_message", "m8"),
        ('{"type": "ack", "run_id": "r1"}', "invalid_message", "r1"),
        ('{"type": "resume", "run_id": "r1", "after_seq": "0"}', "invalid_message", "r1"),
        ('{"type": "connect", "token": "again"}', "invalid_message", None),
        (
            '{"type": "chat", "text": "x", "client_msg_id": "m9", "agent": "nope"}',
            "unknown_agent",
            "m9",
        ),
        ('{"type": "resume", "run_id": "01NOSUCHRUN", "after_seq": 0}', "not_found", "01NOSUCHRUN"),
    ],
)
async def test_bad_frames_get_their_error_and_the_connection_stays(
    live: LiveServer, frame: str | bytes, code: str, ref: str | None
) -> None:
    ws = await connect(live)
    await ws.send(frame)
    error = await recv(ws)
    assert error["type"] == "error"
    assert error["code"] == code
    assert error.get("ref") == ref
    assert "Traceback" not in error["message"]
    await ws.send(Ping().serialize())
    assert (await recv(ws)) == {"type": "pong"}
    await ws.close()
    await healthy(live)


async def test_a_refused_chat_does_not_use_up_its_id(live: LiveServer) -> None:
    ws = await connect(live)
    await ws.send(Chat("hi", "m1", agent="nope").serialize())
    assert (await recv(ws))["code"] == "unknown_agent"
    await ws.send(Chat("hi", "m1").serialize())
    accepted = await recv(ws)
    assert accepted["type"] == "run_accepted" and accepted["duplicate"] is False
    await ws.close()


async def test_too_many_bad_frames_in_a_row_close_with_4400(live: LiveServer) -> None:
    # A burst past the limit: every frame up to the limit is answered, the last one too, and
    # then the connection closes with 4400; nothing after it is answered.
    limit = live.rt.settings.max_bad_frames
    ws = await connect(live)
    for _ in range(limit + 5):
        await ws.send("{bad")
    answers: list[dict[str, Any]] = []
    with pytest.raises(ConnectionClosed):
        while True:
            answers.append(await recv(ws))
    assert [a["code"] for a in answers] == ["invalid_json"] * limit
    assert ws.close_code == 4400
    await healthy(live)


async def test_good_frames_reset_the_bad_frame_count(live: LiveServer) -> None:
    ws = await connect(live)
    for _ in range(3):
        for _ in range(live.rt.settings.max_bad_frames - 1):
            await ws.send("{bad")
        await ws.send(Ping().serialize())
    frames = [await recv(ws) for _ in range(3 * live.rt.settings.max_bad_frames)]
    assert frames.count({"type": "pong"}) == 3
    await ws.close()


@pytest.mark.parametrize(
    "first",
    [
        '{"type": "ping"}',
        '{"type": "chat", "text": "hi", "client_msg_id": "x"}',
        "garbage",
        b"binary",
        '{"type": "connect", "token": "not-a-jwt"}',
        '{"type": "connect"}',
    ],
)
async def test_anything_but_a_valid_connect_first_closes_with_4401(
    live: LiveServer, first: str | bytes
) -> None:
    ws = await open_ws(live.ws_url)
    await ws.send(first)
    assert await close_code(ws) == 4401
    await healthy(live)


async def test_expired_and_foreign_tokens_close_with_4401(live: LiveServer) -> None:
    for token in (
        make_token("alice", ttl_s=-3600),
        make_token("alice", secret="another-secret-of-enough-length-0123456789"),
    ):
        ws = await open_ws(live.ws_url)
        await ws.send(Connect(token).serialize())
        assert await close_code(ws) == 4401
    assert live.metric("runwatch_connections_total", {"result": "unauthorized"}) == 2


async def test_a_connection_does_not_outlive_its_token(live: LiveServer) -> None:
    live.rt.tokens.leeway_s = 0
    ws = await open_ws(live.ws_url, live.token("alice", ttl_s=1))
    assert await close_code(ws) == 4401


async def test_no_connect_within_the_deadline_closes_with_4401(tmp_path: Path) -> None:
    settings = make_settings(sqlite_url(tmp_path / "rw.db"), connect_timeout_s=0.5)
    async with serve_runtime(settings) as live:
        ws = await open_ws(live.ws_url)
        assert await close_code(ws) == 4401
        assert live.metric("runwatch_connections_total", {"result": "timeout"}) == 1


async def test_oversize_frame_closes_with_1009(live: LiveServer) -> None:
    ws = await connect(live)
    await ws.send(Chat("x" * 1_100_000, "big").serialize())
    assert await close_code(ws) == 1009
    await healthy(live)


async def test_eleventh_connection_closes_with_4429(live: LiveServer) -> None:
    sockets = [await connect(live, "carol") for _ in range(10)]
    extra = await open_ws(live.ws_url)
    await extra.send(Connect(live.token("carol")).serialize())
    assert await close_code(extra) == 4429
    await sockets[0].close()
    await wait_until(lambda: len(live.rt.hub.connections("carol")) < 10, 5)
    again = await connect(live, "carol")
    await again.close()
    for ws in sockets[1:]:
        await ws.close()


async def test_chat_rate_limit_per_user(tmp_path: Path) -> None:
    settings = make_settings(sqlite_url(tmp_path / "rw.db"), chat_burst=3, chat_refill_per_s=0.01)
    async with serve_runtime(settings) as live:
        ws = await connect(live)
        answers = []
        for i in range(5):
            await ws.send(Chat("hi", f"m{i}").serialize())
        while len(answers) < 5:
            frame = await recv(ws)
            if frame["type"] in ("run_accepted", "error"):
                answers.append(frame)
        kinds = [a.get("code", a["type"]) for a in answers]
        assert kinds == ["run_accepted"] * 3 + ["rate_limited"] * 2
        assert answers[3]["ref"] == "m3"
        # Another user has a bucket of their own.
        other = await (await live.client("bob")).chat("hi")
        assert other.run_id
        await ws.close()
