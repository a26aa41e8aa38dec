"""Every exception the ``monitor`` package raises, in one tree.

Each carries what it knows in named fields and builds its one-line ``str()`` from them. Store
failures are not here: they arrive as :class:`runtime.store.errors.StoreError`, already
translated at the store boundary, and the monitor passes them on as they are.

Exceptions::

    MonitorError            the root: ``except MonitorError`` catches any of these
     +-- FilterError        a filter value the API and the web UI refuse (field, reason, got);
     |                      also a ValueError
     +-- UnknownRun         ``runwatch check --run`` names a run the store does not hold
                            (run_id); also a LookupError
"""

from __future__ import annotations

__all__ = ["FilterError", "MonitorError", "UnknownRun"]


class MonitorError(Exception):
    """The root of every exception the monitor raises."""


class FilterError(MonitorError, ValueError):
    """A filter value the monitor does not accept: ``field`` names it, ``reason`` says what
    it accepts, ``got`` is the value (cut short), when there is one to show."""

    def __init__(self, field: str, reason: str, got: str | None = None) -> None:
        super().__init__(field, reason, got)
        self.field = field
        self.reason = reason
        self.got = got

    def __str__(self) -> str:
        text = f"{self.field}: {self.reason}"
        return text if self.got is None else f"{text}; got {self.got!r}"


class UnknownRun(MonitorError, LookupError):
    """A run id the audit store does not hold."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"no run {self.run_id}"
