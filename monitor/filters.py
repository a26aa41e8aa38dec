"""The filter values the monitor's API and web UI accept: one parser, so that a value means the
same in both and is refused the same way (with a :class:`~monitor.errors.FilterError`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from .errors import FilterError

__all__ = ["SINCE_HELP", "SINCE_PATTERN", "parse_since"]

SINCE_HELP = "a duration back from now (30m, 1h, 24h, 7d) or an RFC 3339 time"
#: What the page and the API accept for ``since``/``until``: the schema's pattern says the same.
SINCE_PATTERN = (
    r"^(\d{1,6}[smhdw]|\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"([Tt ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)?)?)$"
)
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
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
