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
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ulid import ULID

__all__ = [
    "TERMINAL_TYPES",
    "ErrorCode",
    "Event",
    "EventType",
    "Receipt",
    "format_ts",
    "new_id",
    "now_us",
    "parse_ts",
]


class EventType(StrEnum):
    """Lifecycle event types (SPEC section 2)."""

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


def new_id() -> str:
    """A fresh time-sortable, unguessable id (ULID with 80 bits from ``os.urandom``)."""
    return str(ULID(_ulid_bytes()))


def _ulid_bytes() -> bytes:
    # 48-bit millisecond timestamp + 80 random bits, never incremented from a previous id,
    # so an id says nothing about the next one.
    ms = int(datetime.now(UTC).timestamp() * 1000)
    return ms.to_bytes(6, "big") + os.urandom(10)


def format_ts(micros: int) -> str:
    """Microseconds since the epoch as RFC 3339 UTC with microseconds: ``...T10:00:00.123456Z``."""
    dt = datetime.fromtimestamp(micros // 1_000_000, tz=UTC).replace(microsecond=micros % 1_000_000)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> int:
    """The inverse of :func:`format_ts`; raises ``ValueError`` on anything else."""
    if not text.endswith("Z"):
        raise ValueError(f"timestamp must be UTC ending in 'Z', got {text!r}")
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


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
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

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
