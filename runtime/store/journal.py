"""The local outage journal: a write-ahead log of the events the audit store could not take.

While the audit store is failing, the writer appends events here; an event appended here counts
as persisted for ``after_persist`` (it survives a crash of this process), so delivery goes on
through a store outage. When the store is back, the writer drains the journal into it in order
(inserts are idempotent by ``event_id``, so a drain that is interrupted and repeated writes each
event once), then truncates the file.

Records are lines ``<crc32 of the JSON, 8 hex digits> <JSON, ASCII only>``. An append counts only
once every byte is written (short writes are continued) and fsynced; a failed append (disk
full, I/O error) is cut off again (``ftruncate`` to the size before it) and raises, so nothing
was acknowledged and nothing torn is left for the next append to follow. On load, a torn last
record is one no append ever acknowledged: it is cut off with a warning. A bad record followed by
good ones is damage to acknowledged data: it is never dropped silently; the file is copied aside
(``<name>.corrupt-<time>``), the damage logged as an error and counted in :attr:`Journal.corrupt`.

On start, a journal left by a crashed process is drained before anything else is written, so
startup recovery sees every event that any client may have received.

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    JournalError        an append failed: nothing of it counts as persisted
     +-- JournalFull    the journal reached its byte bound: callers wait rather than lose events
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import JournalError, JournalFull
from ..events import Event

__all__ = ["Journal", "JournalEntry", "JournalError", "JournalFull"]

log = logging.getLogger("runwatch.journal")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    event: Event
    live: bool
    committed_us: int


def _record(obj: dict[str, object]) -> bytes:
    # ASCII JSON: a lone surrogate or a NUL in an event is escaped, never an encoding error.
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _parse(line: bytes) -> JournalEntry:
    """One record; raises ValueError (or KeyError, TypeError) when it is torn or damaged."""
    if line[:1] == b"{":
        body = line  # a record written before checksums (an older runwatch): JSON only
    else:
        crc, _, body = line.partition(b" ")
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
            raise ValueError("checksum mismatch")
    obj = json.loads(body)
    return JournalEntry(Event.from_dict(obj["event"]), bool(obj["live"]), int(obj["committed_us"]))


class Journal:
    """A checksummed, fsynced JSON-lines write-ahead log with a read cursor."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: Damaged records found on load (acknowledged data that cannot be read back).
        self.corrupt = 0
        self._size = 0
        self._entries: list[JournalEntry] = self._load()
        #: Set when a failed append could not be cut off again: appends refuse until restart
        #: (a new record must never follow torn bytes).
        self._broken: str | None = None
        self._lock = asyncio.Lock()

    def _load(self) -> list[JournalEntry]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        entries: list[JournalEntry] = []
        good_end = 0
        offset = 0
        bad: list[int] = []
        while offset < len(data):
            newline = data.find(b"\n", offset)
            end = len(data) if newline < 0 else newline + 1
            line = data[offset:end].rstrip(b"\r\n")
            try:
                if newline < 0:
                    raise ValueError("no end of record")
                if line.strip():
                    entries.append(_parse(line))
                good_end = end
            except (ValueError, KeyError, TypeError):
                bad.append(offset)
            offset = end
        torn_tail = bool(bad) and bad[-1] >= good_end
        damaged = [b for b in bad if b < good_end]
        if damaged:
            self.corrupt = len(damaged)
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            shutil.copyfile(self.path, aside)
            log.error(
                "journal %s: %d damaged record(s) before valid ones; acknowledged events may be "
                "missing from the store; the file is kept as %s",
                self.path,
                len(damaged),
                aside,
            )
        if torn_tail:
            # The last append never completed, so it was never acknowledged: no client was
            # sent its events. Cut it off so the next append starts on a record boundary.
            log.warning(
                "journal %s: torn last record (%d bytes) cut off", self.path, len(data) - good_end
            )
            with self.path.open("r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
            self._size = good_end
        else:
            self._size = len(data)
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
        """Append ``events`` durably; once this returns they count as persisted. Raises
        :class:`JournalError` (nothing appended) on a full bound, a full disk or an I/O error."""
        data = b"".join(
            _record({"event": e.to_dict(), "live": live, "committed_us": committed_us})
            for e, live in events
        )
        async with self._lock:
            if self._broken is not None:
                raise JournalError(self._broken, reason="broken")
            if self._size + len(data) > self.max_bytes:
                raise JournalFull(self._size + len(data), self.max_bytes)
            await asyncio.to_thread(self._write, data, self._size)
            self._size += len(data)
            self._entries.extend(JournalEntry(e, live, committed_us) for e, live in events)

    def _write(self, data: bytes, size_before: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError("write made no progress")
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            self._cut(fd, size_before)
            raise JournalError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            os.close(fd)

    def _cut(self, fd: int, size: int) -> None:
        """Remove a failed append's bytes, so nothing torn stays in the log."""
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:
            self._broken = f"a failed append could not be cut off ({exc}); restart to recover"
            log.error("journal %s: %s", self.path, self._broken)

    async def drained(self, count: int) -> None:
        """The oldest ``count`` entries are in the store; truncate once everything is."""
        async with self._lock:
            del self._entries[:count]
            if not self._entries:
                await asyncio.to_thread(self._truncate)
                self._size = 0
                self._broken = None

    def _truncate(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
