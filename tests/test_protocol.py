"""The wire protocol as pure code: frames in, frames or errors out."""

from __future__ import annotations

import json

import pytest

from runtime.protocol import (
    Ack,
    Cancel,
    Chat,
    CloseCode,
    Connect,
    FrameError,
    Ping,
    ProtocolErrorCode,
    Resume,
    connected_frame,
    error_frame,
    parse_client_frame,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"connect","token":"t"}', Connect("t")),
        ('{"type":"connect","token":"t","client":"c"}', Connect("t", "c")),
        ('{"type":"chat","text":"hi","client_msg_id":"m"}', Chat("hi", "m")),
        (
            '{"type":"chat","text":"hi","client_msg_id":"m","thread_id":"th","agent":"demo"}',
            Chat("hi", "m", "th", "demo"),
        ),
        ('{"type":"ack","run_id":"r","seq":3}', Ack("r", 3)),
        ('{"type":"resume","run_id":"r","after_seq":0}', Resume("r", 0)),
        ('{"type":"cancel","run_id":"r"}', Cancel("r")),
        ('{"type":"ping"}', Ping()),
    ],
)
def test_valid_frames_parse(text: str, expected: object) -> None:
    assert parse_client_frame(text) == expected


@pytest.mark.parametrize(
    ("raw", "code", "ref"),
    [
        ("{not json", ProtocolErrorCode.INVALID_JSON, None),
        (b'{"type":"ping"}', ProtocolErrorCode.INVALID_JSON, None),
        ("[1,2]", ProtocolErrorCode.INVALID_MESSAGE, None),
        ('"text"', ProtocolErrorCode.INVALID_MESSAGE, None),
        ('{"no":"type"}', ProtocolErrorCode.INVALID_MESSAGE, None),
        ('{"type":5}', ProtocolErrorCode.INVALID_MESSAGE, None),
        ('{"type":"nope","run_id":"r1"}', ProtocolErrorCode.UNKNOWN_TYPE, "r1"),
        ('{"type":"chat","client_msg_id":"m1"}', ProtocolErrorCode.INVALID_MESSAGE, "m1"),
        ('{"type":"chat","text":5,"client_msg_id":"m1"}', ProtocolErrorCode.INVALID_MESSAGE, "m1"),
        ('{"type":"chat","text":"x","client_msg_id":""}', ProtocolErrorCode.INVALID_MESSAGE, None),
        ('{"type":"ack","run_id":"r1","seq":"3"}', ProtocolErrorCode.INVALID_MESSAGE, "r1"),
        ('{"type":"ack","run_id":"r1","seq":-1}', ProtocolErrorCode.INVALID_MESSAGE, "r1"),
        ('{"type":"ack","run_id":"r1","seq":true}', ProtocolErrorCode.INVALID_MESSAGE, "r1"),
        ('{"type":"resume","run_id":"r1"}', ProtocolErrorCode.INVALID_MESSAGE, "r1"),
        ('{"type":"cancel"}', ProtocolErrorCode.INVALID_MESSAGE, None),
        ('{"type":"connect"}', ProtocolErrorCode.INVALID_MESSAGE, None),
        ("[" * 100_000, ProtocolErrorCode.INVALID_JSON, None),
    ],
)
def test_bad_frames_get_their_code(
    raw: str | bytes, code: ProtocolErrorCode, ref: str | None
) -> None:
    result = parse_client_frame(raw)
    assert isinstance(result, FrameError)
    assert result.code == code
    assert result.ref == ref
    assert result.message


def test_error_frame_carries_ref_only_when_given() -> None:
    assert error_frame(ProtocolErrorCode.NOT_FOUND, "no such run") == {
        "type": "error",
        "code": "not_found",
        "message": "no such run",
    }
    assert error_frame(ProtocolErrorCode.NOT_FOUND, "x", "r")["ref"] == "r"


def test_connected_writes_whole_seconds_as_an_integer() -> None:
    assert json.dumps(connected_frame("c", "u", 20.0, [])["heartbeat_s"]) == "20"
    assert connected_frame("c", "u", 2.5, [])["heartbeat_s"] == 2.5


def test_close_codes_are_the_spec_values() -> None:
    assert CloseCode.UNAUTHORIZED == 4401
    assert CloseCode.PROTOCOL_VIOLATION == 4400
    assert CloseCode.SLOW_CONSUMER == 4008
    assert CloseCode.TOO_MANY_CONNECTIONS == 4429
    assert CloseCode.SERVER_RESTARTING == 1012
    assert CloseCode.FRAME_TOO_BIG == 1009
    assert CloseCode.INTERNAL_ERROR == 1011


def test_unknown_type_message_is_bounded() -> None:
    result = parse_client_frame(json.dumps({"type": "x" * 10_000}))
    assert isinstance(result, FrameError)
    assert len(result.message) < 200
