"""Poison strings at the edge (issue #11, item 1): a NUL character or a lone UTF-16 surrogate in
any client string gets ``invalid_message`` naming the field, never a closed socket, a stuck run
or a traceback; arbitrary strings from one user never stop another user's run from being stored
and delivered; the SDK backs off across reconnects that fail again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from runtime.client import RunwatchClient
from runtime.protocol import FrameError, Ping, ProtocolErrorCode, dumps, parse_client_frame
from runtime.store.audit import AuditStore

from .conftest import make_settings, open_ws, serve_runtime, wait_until

POISONS = ["\x00", "\ud83d", "\udfff", "a\ud800b", "ok\x00"]

#: Every client string field, with a frame that is valid apart from it.
FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("token", {"type": "connect", "token": "t"}),
    ("client", {"type": "connect", "token": "t", "client": "c"}),
    ("text", {"type": "chat", "text": "hi", "client_msg_id": "m"}),
    ("client_msg_id", {"type": "chat", "text": "hi", "client_msg_id": "m"}),
    ("thread_id", {"type": "chat", "text": "hi", "client_msg_id": "m", "thread_id": "t"}),
    ("agent", {"type": "chat", "text": "hi", "client_msg_id": "m", "agent": "demo"}),
    ("run_id", {"type": "ack", "run_id": "r", "seq": 1}),
    ("run_id", {"type": "resume", "run_id": "r", "after_seq": 0}),
    ("run_id", {"type": "cancel", "run_id": "r"}),
    ("type", {"type": "ping"}),
]


def _wire(frame: dict[str, Any]) -> str:
    # ensure_ascii: a lone surrogate travels as a JSON escape, as a browser's JSON.stringify
    # of a cut emoji does.
    return json.dumps(frame)


@pytest.mark.parametrize("poison", POISONS, ids=repr)
@pytest.mark.parametrize(("field", "frame"), FIELDS, ids=lambda v: v if isinstance(v, str) else "")
def test_poison_in_any_field_is_invalid_message_naming_it(
    field: str, frame: dict[str, Any], poison: str
) -> None:
    result = parse_client_frame(_wire({**frame, field: poison}))
    assert isinstance(result, FrameError)
    assert result.code == ProtocolErrorCode.INVALID_MESSAGE
    assert f"'{field}'" in result.message
    # The answer itself is always sendable, whatever it echoes.
    dumps({"type": "error", "code": result.code.value, "message": result.message}).encode()
    if result.ref is not None:
        assert "\x00" not in result.ref
        result.ref.encode("utf-8")


def test_poison_nested_or_in_a_key_names_its_path() -> None:
    nested = parse_client_frame(_wire({"type": "ping", "x": {"y": ["ok", "\ud83d"]}}))
    assert isinstance(nested, FrameError) and "'x.y[1]'" in nested.message
    key = parse_client_frame(_wire({"type": "ping", "k\x00": 1}))
    assert isinstance(key, FrameError) and "contains a NUL" in key.message


def test_valid_text_passes_unchanged() -> None:
    text = "caf\u00e9 \u4e2d \U0001f600 \\u0000 literally"
    # A surrogate *pair* escape decodes to one character: valid.
    raw = '{"type":"chat","text":"\\ud83d\\ude00' + json.dumps(text)[1:] + ',"client_msg_id":"m"}'
    frame = parse_client_frame(raw)
    assert not isinstance(frame, FrameError), frame
    assert frame.text == "\U0001f600" + text  # type: ignore[union-attr]


def test_server_frames_are_always_encodable() -> None:
    for value in POISONS:
        dumps({"type": "error", "code": "x", "message": value, "ref": value}).encode("utf-8")


# ---- live: both backends ----------------------------------------------------------------

_poisoned = st.tuples(st.text(max_size=20), st.sampled_from(POISONS), st.text(max_size=20)).map(
    "".join
)
_any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
_attack = st.tuples(st.sampled_from(range(len(FIELDS))), _poisoned | _any_text)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _answer(ws: websockets.ClientConnection, want: set[str]) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame["type"] in want:
            return frame


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
async def test_arbitrary_strings_never_stop_another_users_run(db_url: str) -> None:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    loop = asyncio.get_running_loop()
    stats = {"attacks": 0, "invalid": 0, "bob_runs": 0}
    cfg = make_settings(db_url, chat_burst=1000, chat_refill_per_s=1000.0)
    async with serve_runtime(cfg) as live:
        bob = await live.client("bob")
        alice = await open_ws(live.ws_url, live.token("alice"))
        store = AuditStore.open(db_url)

        async def attack(index: int, value: str) -> None:
            nonlocal alice
            field, frame = FIELDS[index]
            stats["attacks"] += 1
            frame = {**frame, field: value}
            if field == "client_msg_id":
                frame[field] = value or "x"
            if frame["type"] == "connect":
                # A poisoned handshake closes only that socket (4401), never another one.
                ws = await open_ws(live.ws_url)
                await ws.send(_wire(frame))
                with contextlib.suppress(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                await ws.wait_closed()
                assert ws.close_code == 4401
            else:
                await alice.send(_wire(frame))
                await alice.send(Ping().serialize())
                answer = await _answer(alice, {"error", "pong", "run_accepted"})
                if answer["type"] == "error" and answer["code"] == "invalid_message":
                    stats["invalid"] += 1
                await _answer(alice, {"pong"}) if answer["type"] != "pong" else None
            # Alice's socket is still open and answering.
            await alice.send(Ping().serialize())
            await _answer(alice, {"pong"})
            if stats["attacks"] % 8 == 0:
                run = await bob.chat("what is 6*7")
                events = await run.wait(15)
                assert events[-1].type.value == "agent_completed"
                stored = await store.run_events(run.run_id)
                assert [e.seq for e in stored] == [e.seq for e in events]
                stats["bob_runs"] += 1

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(_attack)
        def run(case: tuple[int, str]) -> None:
            asyncio.run_coroutine_threadsafe(attack(*case), loop).result(60)

        try:
            await asyncio.to_thread(run)
            # Every run alice started with an arbitrary text ended, and none is left open.
            await wait_until(lambda: not live.rt.engine.active, 30)
            assert await store.open_runs() == []
        finally:
            logging.getLogger().removeHandler(errors)
            await alice.close()
            await store.close()
    assert stats["invalid"] > 0 and stats["bob_runs"] >= 5
    assert [r.getMessage() for r in errors.records] == []


# ---- the SDK: backoff across failing reconnects; a gap resumes at once ------------------


async def test_sdk_backs_off_when_every_connection_drops_at_once() -> None:
    opened: list[float] = []

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.recv()
        opened.append(time.monotonic())
        await ws.send(json.dumps({"type": "connected", "connection_id": "c", "active_runs": []}))
        await ws.close(1011)

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = RunwatchClient(f"ws://127.0.0.1:{port}/ws", "tok", max_backoff_s=0.8)
        await client.connect()
        await wait_until(lambda: len(opened) >= 5, 10)
        await client.close()
    # The pauses before the 2nd to 5th connections: backing off across connections that
    # fail at once gives 0.1, 0.2, 0.4, 0.8 s (each times a jitter of 0.5 to 1.5), at least
    # 0.75 s in all and 0.4 s for the last; reset-on-connect would give 0.05 to 0.15 s each.
    gaps = [b - a for a, b in itertools.pairwise(opened[:5])]
    assert max(gaps) >= 0.35, gaps
    assert sum(gaps) >= 0.7, gaps


def _event(seq: int, kind: str = "agent_thinking") -> dict[str, Any]:
    return {
        "type": kind,
        "event_id": f"e{seq:04d}",
        "run_id": "R",
        "thread_id": "T",
        "seq": seq,
        "ts": "2026-11-22T10:00:00.000000Z",
        "agent": "demo",
        "data": {"step": seq, "text": "x"} if kind == "agent_thinking" else {"duration_ms": 1},
    }


async def test_sdk_resumes_from_the_store_on_a_seq_gap() -> None:
    resumes: list[dict[str, Any]] = []

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "connected", "connection_id": "c", "active_runs": []}))
        for seq in (1, 2, 5):  # 3 and 4 were lost between replicas
            await ws.send(json.dumps(_event(seq)))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "resume":
                resumes.append(frame)
                for seq in range(frame["after_seq"] + 1, 6):
                    await ws.send(json.dumps(_event(seq)))
                await ws.send(json.dumps({"type": "resumed", "run_id": "R", "after_seq": 2}))
                await ws.send(json.dumps(_event(6, "agent_completed")))

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with RunwatchClient(f"ws://127.0.0.1:{port}/ws", "tok") as client:
            await wait_until(lambda: "R" in client.runs)
            events = await client.runs["R"].wait(10)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert [(r["run_id"], r["after_seq"]) for r in resumes] == [("R", 2)]
