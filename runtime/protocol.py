"""The wire protocol of ``/ws`` (docs/protocol.md), as pure code: frames in, frames out.

Client frames are parsed into frozen dataclasses by :func:`parse_client_frame`, which never
raises for bad input: it returns a :class:`FrameError` carrying the protocol's error code (or the
close code when the frame must end the connection). Server frames are built by the ``*_frame``
functions, which return plain dicts ready for JSON.

No socket here: the handler in ``server.py`` feeds text in and writes what comes out, so every
rule below is tested with strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from enum import IntEnum, StrEnum
from typing import Any, ClassVar

from .errors import InvalidFrame
from .events import dumps as _dumps

__all__ = [
    "CLOSE_REASONS",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "Cancel",
    "Chat",
    "ClientFrame",
    "CloseCode",
    "Connect",
    "FrameError",
    "Ping",
    "ProtocolErrorCode",
    "Resume",
    "error_frame",
    "is_poison",
    "parse_client_frame",
    "poisoned_field",
    "serialize_client_frame",
]

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1_048_576
MAX_ID_LEN = 200


class CloseCode(IntEnum):
    """WebSocket close codes runwatch uses; see :data:`CLOSE_REASONS`."""

    NORMAL = 1000
    GOING_AWAY = 1001
    FRAME_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVER_RESTARTING = 1012
    PROTOCOL_VIOLATION = 4400
    UNAUTHORIZED = 4401
    SLOW_CONSUMER = 4008
    TOO_MANY_CONNECTIONS = 4429


CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.FRAME_TOO_BIG: "frame too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.SERVER_RESTARTING: "server restarting: reconnect and resume",
    CloseCode.PROTOCOL_VIOLATION: "protocol violation: too many bad frames in a row",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.SLOW_CONSUMER: "slow consumer: reconnect and resume",
    CloseCode.TOO_MANY_CONNECTIONS: "too many connections for this user",
}


class ProtocolErrorCode(StrEnum):
    """``error.code`` values sent to the client; the connection stays open."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    NOT_FOUND = "not_found"
    UNKNOWN_AGENT = "unknown_agent"
    RATE_LIMITED = "rate_limited"


class _ClientFrameBase:
    """The serialize half of a client frame's parse/serialize pair (:func:`parse_client_frame`
    is the other): used by the SDK, the benchmarks and the tests, so no client writes a frame
    by hand. Optional fields that are None are left out, as a client would."""

    __slots__ = ()
    TYPE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                frame[f.name] = value
        return frame

    def serialize(self) -> str:
        """The frame as JSON text, ready for a WebSocket text frame."""
        # ASCII escapes: a frame carrying a lone surrogate (a test of the server's poison
        # check) still encodes as UTF-8 on the socket.
        return json.dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Connect(_ClientFrameBase):
    TYPE: ClassVar[str] = "connect"
    token: str
    client: str | None = None


@dataclass(frozen=True, slots=True)
class Chat(_ClientFrameBase):
    TYPE: ClassVar[str] = "chat"
    text: str
    client_msg_id: str
    thread_id: str | None = None
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class Ack(_ClientFrameBase):
    TYPE: ClassVar[str] = "ack"
    run_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Resume(_ClientFrameBase):
    TYPE: ClassVar[str] = "resume"
    run_id: str
    after_seq: int


@dataclass(frozen=True, slots=True)
class Cancel(_ClientFrameBase):
    TYPE: ClassVar[str] = "cancel"
    run_id: str


@dataclass(frozen=True, slots=True)
class Ping(_ClientFrameBase):
    TYPE: ClassVar[str] = "ping"


ClientFrame = Connect | Chat | Ack | Resume | Cancel | Ping


@dataclass(frozen=True, slots=True)
class FrameError:
    """A client frame that could not be accepted: answer with ``error`` (the connection stays)."""

    code: ProtocolErrorCode
    message: str
    ref: str | None = None

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


def _ref_of(obj: dict[str, Any]) -> str | None:
    for key in ("client_msg_id", "run_id"):
        value = obj.get(key)
        if isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN and not is_poison(value):
            return value
    return None


def is_poison(text: str) -> bool:
    """True for a string no store or socket can hold: a NUL character or a lone UTF-16
    surrogate (JSON escapes like ``"\\ud83d"`` decode to one; a valid pair decodes to a
    single character and passes)."""
    if "\x00" in text:
        return True
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _field_name(path: tuple[str | int, ...]) -> str:
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            shown = (
                part if not is_poison(part) else part.encode("utf-8", "backslashreplace").decode()
            )
            name += shown if not name else f".{shown}"
    return name or "frame"


def poisoned_field(obj: Any) -> str | None:
    """The name of the first string (value or key) in ``obj`` that carries a NUL character or
    a lone surrogate, such as ``text`` or ``data.items[2]``; None when every string is clean.

    Iterative, so a deeply nested frame cannot exhaust the stack."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if is_poison(value):
                return _field_name(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if is_poison(key):
                    return _field_name((*path, key))
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in enumerate(value))
    return None


def _str_field(obj: dict[str, Any], key: str, *, required: bool, max_len: int | None) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise InvalidFrame(f"'{key}' is required")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise InvalidFrame(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value:
        raise InvalidFrame(f"'{key}' must not be empty")
    if max_len is not None and len(value) > max_len:
        raise InvalidFrame(f"'{key}' is longer than {max_len} characters")
    return value


def _int_field(obj: dict[str, Any], key: str, *, minimum: int) -> int:
    if key not in obj:
        raise InvalidFrame(f"'{key}' is required")
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidFrame(f"'{key}' must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise InvalidFrame(f"'{key}' must be >= {minimum}")
    if value > 2**53:
        raise InvalidFrame(f"'{key}' is out of range")
    return value


#: Longest chat text accepted (characters); the frame limit bounds it anyway.
MAX_CHAT_CHARS = 100_000


def parse_client_frame(text: str | bytes) -> ClientFrame | FrameError:
    """Parse one client frame. Binary frames and bad JSON give ``invalid_json``."""
    if isinstance(text, bytes):
        return FrameError(ProtocolErrorCode.INVALID_JSON, "binary frames are not accepted")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return FrameError(ProtocolErrorCode.INVALID_JSON, "frame is not valid JSON")
    if not isinstance(obj, dict):
        return FrameError(ProtocolErrorCode.INVALID_MESSAGE, "frame must be a JSON object")
    ref = _ref_of(obj)
    poisoned = poisoned_field(obj)
    if poisoned is not None:
        # No client input reaches the store, or a socket, that they cannot hold (docs/protocol.md).
        return FrameError(
            ProtocolErrorCode.INVALID_MESSAGE,
            f"'{poisoned}' contains a NUL character or a lone UTF-16 surrogate",
            ref,
        )
    kind = obj.get("type")
    if kind is None:
        return FrameError(ProtocolErrorCode.INVALID_MESSAGE, "frame has no 'type'", ref)
    if not isinstance(kind, str):
        return FrameError(ProtocolErrorCode.INVALID_MESSAGE, "'type' must be a string", ref)
    try:
        if kind == "connect":
            token = _str_field(obj, "token", required=True, max_len=16_384)
            client = _str_field(obj, "client", required=False, max_len=200)
            assert token is not None
            return Connect(token=token, client=client)
        if kind == "chat":
            text_ = _str_field(obj, "text", required=True, max_len=MAX_CHAT_CHARS)
            msg_id = _str_field(obj, "client_msg_id", required=True, max_len=MAX_ID_LEN)
            thread_id = _str_field(obj, "thread_id", required=False, max_len=MAX_ID_LEN)
            agent = _str_field(obj, "agent", required=False, max_len=MAX_ID_LEN)
            assert text_ is not None and msg_id is not None
            return Chat(text=text_, client_msg_id=msg_id, thread_id=thread_id, agent=agent)
        if kind == "ack":
            run_id = _str_field(obj, "run_id", required=True, max_len=MAX_ID_LEN)
            assert run_id is not None
            return Ack(run_id=run_id, seq=_int_field(obj, "seq", minimum=0))
        if kind == "resume":
            run_id = _str_field(obj, "run_id", required=True, max_len=MAX_ID_LEN)
            assert run_id is not None
            return Resume(run_id=run_id, after_seq=_int_field(obj, "after_seq", minimum=0))
        if kind == "cancel":
            run_id = _str_field(obj, "run_id", required=True, max_len=MAX_ID_LEN)
            assert run_id is not None
            return Cancel(run_id=run_id)
        if kind == "ping":
            return Ping()
    except InvalidFrame as exc:
        return FrameError(ProtocolErrorCode.INVALID_MESSAGE, f"{kind}: {exc}", ref)
    shown = kind if len(kind) <= 40 else kind[:40] + "…"
    return FrameError(ProtocolErrorCode.UNKNOWN_TYPE, f"unknown frame type {shown!r}", ref)


def serialize_client_frame(frame: ClientFrame) -> str:
    """The inverse of :func:`parse_client_frame`: ``parse_client_frame(serialize_client_frame(f))
    == f`` for every valid frame."""
    return frame.serialize()


def error_frame(code: ProtocolErrorCode, message: str, ref: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code.value, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return frame


def connected_frame(
    connection_id: str, user_id: str, heartbeat_s: float, active_runs: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "type": "connected",
        "connection_id": connection_id,
        "user_id": user_id,
        "protocol": PROTOCOL_VERSION,
        # Whole seconds are written as such (20, not 20.0), as the protocol reference shows.
        "heartbeat_s": int(heartbeat_s) if float(heartbeat_s).is_integer() else heartbeat_s,
        "active_runs": active_runs,
    }


def run_accepted_frame(
    client_msg_id: str, run_id: str, thread_id: str, duplicate: bool
) -> dict[str, Any]:
    return {
        "type": "run_accepted",
        "client_msg_id": client_msg_id,
        "run_id": run_id,
        "thread_id": thread_id,
        "duplicate": duplicate,
    }


def resumed_frame(run_id: str, after_seq: int, replayed: int) -> dict[str, Any]:
    return {"type": "resumed", "run_id": run_id, "after_seq": after_seq, "replayed": replayed}


def pong_frame() -> dict[str, Any]:
    return {"type": "pong"}


def dumps(frame: dict[str, Any]) -> str:
    """A server frame as JSON text that always encodes as UTF-8: a lone surrogate anywhere
    (in a stored event or an echoed value) is written as an ASCII escape, never as a frame
    the socket cannot send."""
    return _dumps(frame)
