"""Run lifecycle events: the one envelope used by the socket, the audit store and every API.

An :class:`Event` is a frozen dataclass with exactly one ``to_dict``/``from_dict`` pair
(and ``to_json``/``from_json`` on top), so the bytes a user received, the row in the store and
the JSON the monitor serves can never drift apart.

A :class:`Receipt` records one delivery of one event to one connection: when it was written to
the socket and when (if ever) that connection acknowledged it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

__all__ = [
    "TERMINAL_TYPES",
    "ErrorCode",
    "Event",
    "EventType",
    "Receipt",
    "dumps",
    "format_ts",
    "new_id",
    "now_us",
    "parse_ts",
]


class EventType(StrEnum):
    """Lifecycle event types (docs/events.md)."""

    AGENT_STARTED = "agent_started"
    AGENT_THINKING = "agent_thinking"
    TOOL_EXECUTING = "tool_executing"
    TOOL_COMPLETED = "tool_completed"
    TEXT_DELTA = "text_delta"
    FINAL_REPORT = "final_report"
    AGENT_COMPLETED = "agent_completed"
    AGENT_ERROR = "agent_error"


TERMINAL_TYPES = frozenset({EventType.AGENT_COMPLETED, EventType.AGENT_ERROR})


class ErrorCode(StrEnum):
    """``agent_error.data.code`` values; see :data:`RETRYABLE` for which a client may retry."""

    AGENT_FAILED = "agent_failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    RUNTIME_RESTARTED = "runtime_restarted"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        return self in (ErrorCode.TIMEOUT, ErrorCode.RUNTIME_RESTARTED, ErrorCode.INTERNAL)


def now_us() -> int:
    """The wall clock in epoch microseconds, the unit of every stored time."""
    return time.time_ns() // 1000


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every 10-bit value as its two Crockford base32 characters.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_RANDOM_CHUNK = 10 * 512


class _Ids:
    """ULIDs, fast: the timestamp part is cached per millisecond and the 80 random bits come
    from ``os.urandom`` read in chunks, so an id costs no system call of its own."""

    def __init__(self) -> None:
        self.ms = -1
        self.prefix = ""
        self.random = b""
        self.offset = 0

    def new(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms != self.ms:
            p = _PAIRS
            self.ms = ms
            self.prefix = (p[(ms >> 40) & 1023] + p[(ms >> 30) & 1023] + p[(ms >> 20) & 1023]) + (
                p[(ms >> 10) & 1023] + p[ms & 1023]
            )
        offset = self.offset
        if offset + 10 > len(self.random):
            self.random = os.urandom(_RANDOM_CHUNK)
            offset = 0
        self.offset = offset + 10
        r = int.from_bytes(self.random[offset : offset + 10], "big")
        p = _PAIRS
        return (
            self.prefix
            + (p[r >> 70] + p[(r >> 60) & 1023] + p[(r >> 50) & 1023] + p[(r >> 40) & 1023])
            + (p[(r >> 30) & 1023] + p[(r >> 20) & 1023] + p[(r >> 10) & 1023] + p[r & 1023])
        )


_ids = _Ids()


def new_id() -> str:
    """A fresh time-sortable, unguessable id: a ULID (48-bit millisecond timestamp + 80 bits
    from ``os.urandom``, never incremented from a previous id, so an id says nothing about
    the next one)."""
    return _ids.new()


class _SecondCache:
    """The RFC 3339 text of the current second, computed once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.text = ""


_second = _SecondCache()


def format_ts(micros: int) -> str:
    """Microseconds since the epoch as RFC 3339 UTC with microseconds: ``...T10:00:00.123456Z``."""
    second, micro = divmod(micros, 1_000_000)
    cache = _second
    if second != cache.second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cache.second, cache.text = second, text
    else:
        text = cache.text
    return f"{text}.{micro:06d}Z"


def dumps(obj: Any) -> str:
    """Compact JSON text, UTF-8 kept as is. Values orjson refuses (integers past 64 bits, lone
    surrogates) are written by the standard library with ASCII escapes, so the result is always
    valid JSON that any socket and store can carry."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(obj, separators=(",", ":"))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def parse_ts(text: str) -> int:
    """The inverse of :func:`format_ts`; raises ``ValueError`` on anything else."""
    if not text.endswith("Z"):
        raise ValueError(f"timestamp must be UTC ending in 'Z', got {text!r}")
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    # Integer arithmetic: a float timestamp loses the microseconds of distant dates.
    return (dt - _EPOCH) // _MICROSECOND


@dataclass(frozen=True, slots=True)
class Event:
    """One lifecycle event of one run. ``ts_us`` is the emission time in epoch microseconds."""

    type: EventType
    event_id: str
    run_id: str
    thread_id: str
    seq: int
    ts_us: int
    agent: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ts(self) -> str:
        return format_ts(self.ts_us)

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "event_id": self.event_id,
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "seq": self.seq,
            "ts": self.ts,
            "agent": self.agent,
            "data": self.data,
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Event:
        """Parse an envelope; raises ``ValueError``/``KeyError``/``TypeError`` on a bad one."""
        seq = obj["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError(f"seq must be a positive integer, got {seq!r}")
        data = obj.get("data", {})
        if not isinstance(data, dict):
            raise TypeError("data must be an object")
        for key in ("event_id", "run_id", "thread_id", "agent"):
            if not isinstance(obj[key], str):
                raise TypeError(f"{key} must be a string")
        return cls(
            type=EventType(obj["type"]),
            event_id=obj["event_id"],
            run_id=obj["run_id"],
            thread_id=obj["thread_id"],
            seq=seq,
            ts_us=parse_ts(obj["ts"]),
            agent=obj["agent"],
            data=data,
        )

    @classmethod
    def from_json(cls, text: str) -> Event:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True, slots=True)
class Receipt:
    """One event written to one connection; times are epoch microseconds.

    ``replayed`` is true for frames sent by ``resume`` rather than live.
    """

    event_id: str
    run_id: str
    seq: int
    connection_id: str
    user_id: str
    sent_us: int
    acked_us: int | None = None
    replayed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "run_id": self.run_id,
            "seq": self.seq,
            "connection_id": self.connection_id,
            "user_id": self.user_id,
            "sent_at": format_ts(self.sent_us),
            "acked_at": format_ts(self.acked_us) if self.acked_us is not None else None,
            "replayed": self.replayed,
        }
