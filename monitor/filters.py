"""The filter values the monitor's API and web UI accept: one parser, so that a value means the
same in both and is refused the same way (with a :class:`~monitor.errors.FilterError`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from runtime.protocol import is_poison

from .errors import FilterError

__all__ = [
    "RUN_CURSOR_PATTERN",
    "SINCE_HELP",
    "SINCE_PATTERN",
    "VIOLATION_CURSOR_PATTERN",
    "check_text",
    "holdable",
    "parse_since",
    "valid_run_cursor",
    "violation_cursor",
]

SINCE_HELP = "a duration back from now (30m, 1h, 24h, 7d) or an RFC 3339 time"
#: What the page and the API accept for ``since``/``until``: the schema's pattern says the same.
SINCE_PATTERN = (
    r"^([0-9]{1,6}[smhdw]|[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"([Tt ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
    r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?)?)$"
)
#: The cursors the pages and the API give out, in ASCII digits only (``int`` takes other
#: scripts' digits, ``str.isdigit`` even superscripts).
RUN_CURSOR_PATTERN = r"^[01]:[0-9]{1,18}:[0-9A-Za-z]{1,64}$"
VIOLATION_CURSOR_PATTERN = r"^[0-9]{1,18}$"
_DURATION = re.compile(r"^([0-9]{1,6})([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now_us: int, field: str = "since") -> int:
    """``1h``, ``24h``, ``7d`` (back from ``now_us``) or an RFC 3339 time (``Z`` or an offset;
    a date alone is midnight UTC) → epoch microseconds."""
    value = text.strip()
    match = _DURATION.match(value)
    if match:
        # Further back than the epoch means "from the beginning".
        return max(now_us - int(match.group(1)) * _UNIT_S[match.group(2)] * 1_000_000, 0)
    if re.match(SINCE_PATTERN, value):
        try:
            parsed = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
        except ValueError:
            parsed = None
        if parsed is not None:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            try:
                return int(parsed.timestamp()) * 1_000_000 + parsed.microsecond
            except (OverflowError, OSError, ValueError):
                pass
    raise FilterError(field, f"expected {SINCE_HELP}", value[:60])


def valid_run_cursor(cursor: str) -> bool:
    """A cursor of the runs list, as :data:`RUN_CURSOR_PATTERN` says."""
    return re.match(RUN_CURSOR_PATTERN, cursor) is not None


def violation_cursor(cursor: str) -> int:
    """The id a violations cursor stands for; :class:`FilterError` unless it is one."""
    if re.match(VIOLATION_CURSOR_PATTERN, cursor) is None:
        raise FilterError("cursor", "not a cursor this page gave out", cursor[:60])
    return int(cursor)


def holdable(value: str) -> bool:
    """Whether the store can hold ``value`` at all: PostgreSQL text refuses NUL, and no
    encoding takes a lone surrogate. A filter or id that is not can match nothing."""
    return not is_poison(value)


def check_text(field: str, value: str | None, limit: int) -> str | None:
    """A free-text filter (agent, user, thread): at most ``limit`` characters the store can
    hold, else :class:`FilterError`; empty is no filter."""
    if not value:
        return None
    if len(value) > limit:
        raise FilterError(field, f"at most {limit} characters", value[:60])
    if not holdable(value):
        raise FilterError(field, "no NUL or unpaired surrogate characters", value[:60])
    return value
