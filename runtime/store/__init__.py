"""The audit store: the schema (the runtime's tables and the monitor's), the group-commit writer,
replay queries, the read models of chat clients (``reads``) and of the monitor
(``monitoring``), migrations."""

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
