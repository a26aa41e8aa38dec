"""The local outage journal: where events go while the audit store is failing.

An append-only file of JSON lines in the data directory, fsynced on every append, bounded in
bytes. An event appended here counts as persisted for ``after_persist`` (it survives a crash of
this process), so delivery goes on through a store outage. When the store is back, the writer
drains the journal into it in order (inserts are idempotent by ``event_id``, so a drain that is
interrupted and repeated writes each event once), then truncates the file.

On start, a journal left by a crashed process is drained before anything else is written, so
startup recovery sees every event that any client may have received.

Exceptions::

    JournalFull     the journal reached its byte bound: callers wait rather than lose events
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..events import Event

__all__ = ["Journal", "JournalEntry", "JournalFull"]


class JournalFull(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"journal full: {size} of {limit} bytes")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class JournalEntry:
    event: Event
    live: bool
    committed_us: int


class Journal:
    """An fsynced JSON-lines journal with a read cursor."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: list[JournalEntry] = self._load()
        self._size = self.path.stat().st_size if self.path.exists() else 0
        self._lock = asyncio.Lock()

    def _load(self) -> list[JournalEntry]:
        if not self.path.exists():
            return []
        entries = []
        with self.path.open("r", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                    entries.append(
                        JournalEntry(
                            Event.from_dict(obj["event"]),
                            bool(obj["live"]),
                            int(obj["committed_us"]),
                        )
                    )
                except (ValueError, KeyError, TypeError):
                    # A torn last line from a crash mid-write: that append never returned, so
                    # no client was sent the event; it is safe to drop.
                    break
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._size

    def pending(self, limit: int) -> list[JournalEntry]:
        """The oldest ``limit`` entries not yet drained."""
        return self._entries[:limit]

    async def append(self, events: list[tuple[Event, bool]], committed_us: int) -> None:
        lines = "".join(
            json.dumps(
                {"event": e.to_dict(), "live": live, "committed_us": committed_us},
                separators=(",", ":"),
                ensure_ascii=False,
            )
            + "\n"
            for e, live in events
        ).encode("utf-8")
        async with self._lock:
            if self._size + len(lines) > self.max_bytes:
                raise JournalFull(self._size + len(lines), self.max_bytes)
            await asyncio.to_thread(self._write, lines)
            self._size += len(lines)
            self._entries.extend(JournalEntry(e, live, committed_us) for e, live in events)

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def drained(self, count: int) -> None:
        """The oldest ``count`` entries are in the store; truncate once everything is."""
        async with self._lock:
            del self._entries[:count]
            if not self._entries:
                await asyncio.to_thread(self._truncate)
                self._size = 0

    def _truncate(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
