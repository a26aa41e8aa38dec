"""Hostile input: at least 10,000 generated frames against a live server.

Random JSON, wrong types, huge strings, deep nesting, unicode and binary frames: no 1011, no
unhandled exception in the log, and a healthy client on the same server keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from runtime.protocol import Ping

from .conftest import LiveServer, open_ws

FRAMES = int(os.environ.get("RUNWATCH_FUZZ_FRAMES", "10000"))
BATCH = 200  # frames per generated example: 50+ examples make 10,000 frames

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
_types = st.sampled_from(["connect", "chat", "ack", "resume", "cancel", "ping", "", "CHAT", "x"])
_fields = st.fixed_dictionaries(
    {"type": _types | _json},
    optional={
        "text": _json | st.text(max_size=2000),
        "client_msg_id": _json | st.text(min_size=1, max_size=300),
        "run_id": _json | st.text(max_size=300),
        "seq": _json,
        "after_seq": _json,
        "thread_id": _json,
        "agent": _json | st.sampled_from(["demo", "nope", ""]),
        "token": _json,
    },
)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


_common = st.one_of(
    _fields.map(lambda d: json.dumps(d)),
    _json.map(json.dumps),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.sampled_from(
        ['{"type":"ping"}', '{"type":"ack","run_id":"x","seq":1}', "\u00e9\u4e2d\U0001f600"]
    ),
)
_rare = st.one_of(
    st.integers(min_value=10, max_value=200_000).map(_deep),
    st.integers(min_value=10_000, max_value=400_000).map(
        lambda n: json.dumps({"type": "chat", "text": "€" * n, "client_msg_id": "big"})
    ),
)
# A batch of small frames, and sometimes one deep or oversize frame (closing with 1009).
_batch = st.tuples(
    st.lists(_common, min_size=BATCH, max_size=BATCH), st.none() | _rare | _rare
).map(lambda t: [*t[0], t[1]] if t[1] is not None else t[0])


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
async def test_ten_thousand_hostile_frames(live: LiveServer) -> None:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    healthy = await live.client("healthy")
    stats = {"frames": 0, "attacks": 0, "closes": {}}
    loop = asyncio.get_running_loop()

    async def open_attacker() -> tuple[websockets.ClientConnection, asyncio.Task[None]]:
        ws = await open_ws(live.ws_url, live.token("attacker"), max_size=None)
        pongs: asyncio.Queue[None] = asyncio.Queue()

        async def read() -> None:
            # Keep reading the error frames, as a real client would.
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    if json.loads(raw) == {"type": "pong"}:
                        pongs.put_nowait(None)

        ws.pongs = pongs  # type: ignore[attr-defined]
        return ws, asyncio.create_task(read())

    def closed_with(ws: websockets.ClientConnection) -> int | None:
        return ws.close_code

    async def attack(frames: list[str | bytes]) -> None:
        ws, reader = await open_attacker()
        for frame in frames:
            try:
                await ws.send(frame)
                stats["frames"] += 1
                await asyncio.sleep(0)  # let the reader see a close as soon as it comes
            except ConnectionClosed:
                await reader
                code = closed_with(ws)
                stats["closes"][code] = stats["closes"].get(code, 0) + 1  # type: ignore[index]
                assert code in (4400, 1009), f"closed with {code}"
                ws, reader = await open_attacker()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(Ping().serialize())
        pong = asyncio.ensure_future(ws.pongs.get())  # type: ignore[attr-defined]
        await asyncio.wait([pong, reader], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not pong.done():
            # No pong: only because the server closed the connection, with a protocol close code.
            pong.cancel()
            await reader
            assert closed_with(ws) in (4400, 1009), closed_with(ws)
        await ws.close()
        await reader
        # Between attacks the healthy client keeps working (under its own chat rate).
        stats["attacks"] += 1
        await healthy.ping()
        if stats["attacks"] % 5 == 0:
            events = await (await healthy.chat("what is 1+1")).wait(10)
            assert events[-1].type.value == "agent_completed"

    @settings(
        max_examples=max(1, FRAMES // BATCH) + 5,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(_batch)
    def run(frames: list[str | bytes]) -> None:
        asyncio.run_coroutine_threadsafe(attack(frames), loop).result(120)

    try:
        await asyncio.to_thread(run)
    finally:
        logging.getLogger().removeHandler(errors)
    assert stats["frames"] >= FRAMES
    assert 1011 not in stats["closes"]  # type: ignore[operator]
    assert [r.getMessage() for r in errors.records] == []
    assert live.metric("runwatch_disconnects_total", {"code": "1011"}) == 0
    answered = sum(
        live.metric("runwatch_protocol_errors_total", {"code": c})
        for c in (
            "invalid_json",
            "invalid_message",
            "unknown_type",
            "not_found",
            "unknown_agent",
            "rate_limited",
        )
    )
    print(
        f"\nhostile input: {stats['frames']} frames sent, {answered:.0f} answered with an error "
        f"frame, closes {stats['closes']}"
    )
