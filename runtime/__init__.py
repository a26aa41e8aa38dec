"""runwatch runtime: runs agents behind a WebSocket chat endpoint and emits every lifecycle event
to the user's sockets and to an append-only audit store."""

from __future__ import annotations

__version__ = "0.1.0"
