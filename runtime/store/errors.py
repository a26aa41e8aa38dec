"""Store errors: what a driver error means for the writer, decided once, at the store boundary.

Every exception that leaves :class:`~runtime.store.audit.AuditStore` is a
:class:`~runtime.errors.StoreError` (the classes live in :mod:`runtime.errors`, the package's one
exception tree, and are re-exported here). The question the writer asks is only "can retrying
help?", so the branch is decided by :func:`translate` from the driver error's type and its
SQLSTATE, never from its message::

    StoreError                  a failure of the audit store
     +-- StoreUnavailable       transient: unreachable, locked, timed out, pool exhausted,
     |                          disk full, cancelled, serialization failure; retry, then journal
     +-- StoreRejected          permanent: this data cannot be stored (a value the driver or the
                                database refuses, a constraint); never retried as is

A batch that is rejected is split by the writer until the offending item is alone (see
``writer.py``); :func:`storable` makes the stand-in the store can hold.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
from typing import Any

from sqlalchemy import exc as sa_exc

from ..errors import StoreError, StoreRejected, StoreUnavailable

__all__ = [
    "INT32_MAX",
    "StoreError",
    "StoreRejected",
    "StoreUnavailable",
    "describe",
    "storable",
    "translate",
]

#: The largest value of the store's 32-bit ``seq`` columns; client numbers are clamped to it.
INT32_MAX = 2**31 - 1
_INT64 = 2**63

# SQLSTATE classes (PostgreSQL appendix A). Transient: the same statement can succeed later.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "55", "57", "58", "XX"})
# Permanent: the data or the statement is wrong.
_PERMANENT_CLASSES = frozenset({"22", "23", "42", "2B", "0A"})


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the driver error under ``exc`` (asyncpg sets ``sqlstate``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            return code
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


def _driver_error(exc: BaseException) -> BaseException:
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def describe(exc: BaseException) -> str:
    """One line naming the error: its type and its text squeezed to one line, never indexed."""
    driver = _driver_error(exc)
    # The driver's own text: SQLAlchemy's wrapper adds the statement and its parameters.
    text = " ".join(str(driver).split())
    name = type(driver).__name__
    return f"{name}: {text[:300]}" if text else name


def translate(exc: BaseException) -> StoreError:
    """The :class:`StoreError` that ``exc`` (raised by the driver or SQLAlchemy) means."""
    if isinstance(exc, StoreError):
        return exc
    message = describe(exc)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, sa_exc.TimeoutError)):
        # A statement over its time limit, or no pooled connection free in time.
        return StoreUnavailable(message, reason="timeout")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StoreUnavailable(message, reason="unavailable")
    state = _sqlstate(exc)
    if state is not None:
        if state[:2] in _PERMANENT_CLASSES:
            reason = "integrity" if state.startswith("23") else "rejected"
            return StoreRejected(message, reason=reason)
        if state[:2] in _TRANSIENT_CLASSES:
            return StoreUnavailable(
                message, reason="timeout" if state == "57014" else "unavailable"
            )
    driver = _driver_error(exc)
    if isinstance(exc, sa_exc.IntegrityError) or isinstance(driver, sqlite3.IntegrityError):
        return StoreRejected(message, reason="integrity")
    if isinstance(driver, (sqlite3.DataError, sqlite3.InterfaceError, sqlite3.ProgrammingError)):
        return StoreRejected(message, reason="rejected")
    if isinstance(driver, (UnicodeError, OverflowError, ValueError, TypeError)):
        # A value the driver cannot encode (a lone surrogate, an integer past 64 bits).
        return StoreRejected(message, reason="rejected")
    if _driver_data_error(driver):
        return StoreRejected(message, reason="rejected")
    # Connection loss, locks, I/O errors, a full disk, anything else the driver raises:
    # retrying may help, and the writer falls back to the journal meanwhile.
    return StoreUnavailable(message, reason="unavailable")


def _driver_data_error(driver: BaseException) -> bool:
    """asyncpg's own argument errors ("invalid input for query argument") carry no SQLSTATE:
    they are raised before the statement reaches the server, as ``DataError``."""
    cause = driver.__cause__
    for candidate in (driver, cause):
        if candidate is None:
            continue
        module = type(candidate).__module__
        if module.startswith("asyncpg") and type(candidate).__name__ in (
            "DataError",
            "InvalidArgumentValueError",
        ):
            return True
        if isinstance(candidate, (UnicodeError, OverflowError)):
            return True
    return False


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _text(value: str) -> str:
    return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value


def storable(value: Any) -> Any:
    """``value`` with what no store column can hold replaced: NUL and lone UTF-16 surrogates
    become U+FFFD, integers past 64 bits and non-finite floats become text. Returns the same
    object when nothing needed replacing."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        items = [(storable(str(k)), storable(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, (list, tuple)):
        out = [storable(v) for v in value]
        if all(a is b for a, b in zip(out, value, strict=True)):
            return value
        return out
    return _text(repr(value))
