"""The audit store: tables, the group-commit writer, replay and monitor queries, migrations."""

from __future__ import annotations

from .recorder import (
    AckUpdate,
    AuditStore,
    Batch,
    ConnectionClose,
    ConnectionOpen,
    RunInfo,
    StoredEvent,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "AckUpdate",
    "AuditStore",
    "Batch",
    "ConnectionClose",
    "ConnectionOpen",
    "RunInfo",
    "StoreError",
    "StoreUnavailable",
    "StoredEvent",
]
