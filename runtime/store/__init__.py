"""The audit store: tables, the group-commit writer, replay and monitor queries, migrations."""

from __future__ import annotations

from .audit import (
    AckUpdate,
    AuditStore,
    Batch,
    ConnectionClose,
    ConnectionOpen,
    RunInfo,
    StoredEvent,
)
from .errors import StoreError, StoreRejected, StoreUnavailable

__all__ = [
    "AckUpdate",
    "AuditStore",
    "Batch",
    "ConnectionClose",
    "ConnectionOpen",
    "RunInfo",
    "StoreError",
    "StoreRejected",
    "StoreUnavailable",
    "StoredEvent",
]
