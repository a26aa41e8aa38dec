"""The Python client SDK for runwatch's WebSocket protocol.

    async with RunwatchClient("ws://127.0.0.1:8000/ws", token) as client:
        run = await client.chat("what is 6*7")
        async for event in run:
            print(event.type, event.data)

The client acknowledges every event it receives (``auto_ack``), de-duplicates by
``(run_id, seq)``, and when the socket drops it reconnects with backoff, re-sends chats that
were not yet accepted (same ``client_msg_id``, so the server starts nothing twice) and resumes
every unfinished run from its last seq. Iterating a :class:`Run` yields each event exactly once,
in ``seq`` order, until the terminal event. A gap in a run's seqs (an event lost between
replicas) is never waited out: the client resumes the run from the store at once.

Reconnects back off exponentially (with jitter) up to ``max_backoff_s``; the backoff starts
over only once a connection has stayed up for ``stable_after_s``, so a server that accepts and
then drops the socket at once is not hammered.

Every frame the client sends is a client frame of :mod:`runtime.protocol`, serialized by it
(the same parse/serialize pair the server uses).

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    RunwatchError            the root of every runwatch exception
     +-- ServerError         an ``error`` frame (``code``, ``message``, ``ref``)
     +-- ConnectionClosed    the server closed the socket and the client will not reconnect
     +-- ConnectFailed       the server could not be reached, refused the WebSocket handshake
                             or sent no ``connected`` in time (also an ``OSError``)

``ServerError`` was called ``RunwatchError`` before runwatch had one exception tree: the root
took the name, so ``except RunwatchError`` still catches error frames (and now also
``ConnectionClosed`` and ``ConnectFailed``); code that reads ``.code``/``.ref`` should catch
``ServerError``. Once connected, a dropped socket is never raised: the client reconnects (each
failed try logged at debug) until :meth:`RunwatchClient.close`, or gives up with
``ConnectionClosed`` when the server closed it for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as _WsClosed

from .errors import ConnectFailed, ConnectionClosed, RunwatchError, ServerError
from .events import Event
from .protocol import Ack, Cancel, Chat, ClientFrame, CloseCode, Connect, Ping, Resume
from .tasks import stop_task

__all__ = [
    "ConnectFailed",
    "ConnectionClosed",
    "Run",
    "RunwatchClient",
    "RunwatchError",
    "ServerError",
]

log = logging.getLogger("runwatch.client")

TokenSource = str | Callable[[], Awaitable[str]]

#: Close codes after which reconnecting (and resuming) is the right thing to do.
_RECONNECT = {
    1001,
    1006,
    1011,
    1012,
    1013,
    CloseCode.SLOW_CONSUMER,
    CloseCode.TOO_MANY_CONNECTIONS,
}


@dataclass
class Run:
    """One run as this client sees it: its events, each once, in seq order."""

    run_id: str
    thread_id: str | None = None
    duplicate: bool = False
    #: The seq this client's copy starts after (0 unless first seen through a resume).
    base_seq: int = 0
    events: list[Event] = field(default_factory=list)
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)
    _pending: dict[int, Event] = field(default_factory=dict, repr=False)
    _failure: BaseException | None = field(default=None, repr=False)

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else self.base_seq

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].is_terminal

    @property
    def terminal(self) -> Event | None:
        return self.events[-1] if self.done else None

    @property
    def has_gap(self) -> bool:
        """True while events past a missing seq are held back, waiting for it."""
        return bool(self._pending)

    def _add(self, event: Event) -> bool:
        """Add an event; False for a duplicate. Out-of-order events wait for the gap."""
        if event.seq <= self.last_seq or event.seq in self._pending:
            return False
        self._pending[event.seq] = event
        while self.last_seq + 1 in self._pending:
            self.events.append(self._pending.pop(self.last_seq + 1))
        return True

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        await self._notify()

    def _has_more(self, index: int) -> bool:
        return len(self.events) > index or self._failure is not None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        index = 0
        while True:
            async with self._cond:
                await self._cond.wait_for(functools.partial(self._has_more, index))
                batch = self.events[index:]
                failure = self._failure
            for event in batch:
                index += 1
                yield event
                if event.is_terminal:
                    return
            if not batch and failure is not None:
                raise failure

    async def wait(self, timeout: float | None = None) -> list[Event]:
        """Wait for the terminal event; returns every event of the run."""

        async def _collect() -> list[Event]:
            async for _ in self:
                pass
            return list(self.events)

        return await asyncio.wait_for(_collect(), timeout)


def _os_reason(exc: OSError) -> str:
    """What the OS said, in its own words ("Connection refused", "Name or service not known")."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc) or type(exc).__name__
    return os.strerror(exc.errno)


def _safe_url(url: str) -> str:
    """``url`` without user info or query string: safe to put in an exception or a log."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RunwatchClient:
    """A reconnecting client for ``/ws``. ``token`` is a string or an async function returning
    a fresh one (called again after a ``4401`` close)."""

    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        auto_ack: bool = True,
        reconnect: bool = True,
        max_backoff_s: float = 5.0,
        client_name: str = "runwatch-python/0.1",
        open_timeout_s: float = 10.0,
        stable_after_s: float | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self.auto_ack = auto_ack
        self.reconnect = reconnect
        self.max_backoff_s = max_backoff_s
        #: How long a connection must last before the reconnect backoff starts over.
        self.stable_after_s = (
            stable_after_s if stable_after_s is not None else max(1.0, 2 * max_backoff_s)
        )
        self.client_name = client_name
        self.open_timeout_s = open_timeout_s
        self.runs: dict[str, Run] = {}
        self.connected_info: dict[str, Any] = {}
        self.errors: asyncio.Queue[ServerError] = asyncio.Queue()
        self.reconnects = 0
        self.duplicates_dropped = 0
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._ready = asyncio.Event()
        self._closed_for_good: ConnectionClosed | None = None
        self._chats: dict[str, tuple[Chat, asyncio.Future[Run]]] = {}
        self._resumes: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._pongs: list[asyncio.Future[None]] = []
        #: Runs with a gap-filling resume in flight (one at a time per run).
        self._gap_resumes: set[str] = set()
        self.gap_resumes = 0
        self._opened_at = 0.0
        self._send_lock = asyncio.Lock()

    # ---- connection ---------------------------------------------------------------------

    async def __aenter__(self) -> RunwatchClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _get_token(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def _open(self) -> dict[str, Any]:
        """Open the socket and authenticate. The library's and the OS's failures become
        :class:`ConnectFailed` (or :class:`ConnectionClosed` when the server closed it)."""
        where = _safe_url(self.url)
        try:
            ws = await websockets.connect(
                self.url, open_timeout=self.open_timeout_s, max_size=None, ping_interval=20
            )
        except websockets.InvalidURI as exc:
            raise ConnectFailed(where, "not a ws:// or wss:// URL") from exc
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            raise ConnectFailed(
                where, f"the server answered HTTP {status}, not a WebSocket"
            ) from exc
        except websockets.InvalidHandshake as exc:
            raise ConnectFailed(where, f"the WebSocket handshake failed ({exc})") from exc
        except TimeoutError as exc:
            raise ConnectFailed(where, f"no handshake within {self.open_timeout_s}s") from exc
        except OSError as exc:
            raise ConnectFailed(where, _os_reason(exc)) from exc
        try:
            await ws.send(Connect(await self._get_token(), self.client_name).serialize())
            first = json.loads(await asyncio.wait_for(ws.recv(), self.open_timeout_s))
        except _WsClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            raise ConnectionClosed(code, exc.rcvd.reason if exc.rcvd else "") from None
        except TimeoutError as exc:
            await ws.close()
            raise ConnectFailed(where, f"no connected frame within {self.open_timeout_s}s") from exc
        except ValueError as exc:
            await ws.close()
            raise ConnectFailed(where, "the server's first frame is not JSON") from exc
        except BaseException:
            await ws.close()
            raise
        if not isinstance(first, dict) or first.get("type") != "connected":
            await ws.close()
            got = first.get("type") if isinstance(first, dict) else type(first).__name__
            raise ConnectionClosed(None, f"expected connected, got {got!r}")
        self._ws = ws
        self._opened_at = time.monotonic()
        self.connected_info = first
        self._ready.set()
        return first

    async def connect(self) -> dict[str, Any]:
        """Connect and authenticate; returns the ``connected`` frame."""
        first = await self._open()
        self._reader = asyncio.create_task(self._read_loop(), name="runwatch-client-reader")
        return first

    @property
    def connection_id(self) -> str | None:
        return self.connected_info.get("connection_id")

    @property
    def active_runs(self) -> list[dict[str, Any]]:
        return list(self.connected_info.get("active_runs", []))

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        await stop_task(self._reader, log)

    async def drop(self) -> None:
        """Abort the socket as if the network failed (the client reconnects by itself)."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _send(self, frame: ClientFrame) -> None:
        await self._ready.wait()
        if self._closed_for_good is not None:
            raise self._closed_for_good
        assert self._ws is not None
        async with self._send_lock:
            with contextlib.suppress(_WsClosed):
                await self._ws.send(frame.serialize())

    # ---- requests -----------------------------------------------------------------------

    async def chat(
        self,
        text: str,
        *,
        agent: str | None = None,
        thread_id: str | None = None,
        client_msg_id: str | None = None,
        timeout: float = 30.0,
    ) -> Run:
        """Start a run; returns it once the server accepted it (``run_accepted``)."""
        msg_id = client_msg_id or uuid.uuid4().hex
        frame = Chat(text, msg_id, thread_id=thread_id, agent=agent)
        future: asyncio.Future[Run] = asyncio.get_running_loop().create_future()
        self._chats[msg_id] = (frame, future)
        try:
            await self._send(frame)
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._chats.pop(msg_id, None)

    async def resume(self, run_id: str, after_seq: int | None = None) -> Run:
        """Replay a run from ``after_seq`` (default: what this client already has)."""
        known = self.runs.get(run_id)
        after = (known.last_seq if known else 0) if after_seq is None else after_seq
        if known is None:
            # A run first seen mid-stream starts after ``after``.
            self.runs[run_id] = Run(run_id, base_seq=after)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._resumes[run_id] = future
        try:
            await self._send(Resume(run_id, after))
            await asyncio.wait_for(future, 30)
        except BaseException:
            if known is None and not self.runs[run_id].events:
                del self.runs[run_id]
            raise
        return self.runs[run_id]

    async def cancel(self, run_id: str) -> None:
        await self._send(Cancel(run_id))

    async def ack(self, run_id: str, seq: int) -> None:
        await self._send(Ack(run_id, seq))

    async def ping(self, timeout: float = 10.0) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        await self._send(Ping())
        await asyncio.wait_for(future, timeout)

    async def send_raw(self, text: str | bytes) -> None:
        """Send a frame as is (for tests of the server's input handling)."""
        await self._ready.wait()
        assert self._ws is not None
        await self._ws.send(text)

    # ---- reading ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = 0.1
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for raw in ws:
                    await self._dispatch(json.loads(raw))
                code, reason = (ws.close_code, ws.close_reason or "")
            except _WsClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                reason = exc.rcvd.reason if exc.rcvd else ""
            except (OSError, json.JSONDecodeError) as exc:
                code, reason = None, repr(exc)
            self._ready.clear()
            self._gap_resumes.clear()
            if self._closing:
                return
            if time.monotonic() - self._opened_at >= self.stable_after_s:
                backoff = 0.1
            retry = self.reconnect and (
                code is None or code in _RECONNECT or code == CloseCode.UNAUTHORIZED
            )
            if code == CloseCode.UNAUTHORIZED and isinstance(self._token, str):
                retry = False  # a fixed token that was refused will be refused again
            if not retry:
                await self._give_up(ConnectionClosed(code, reason))
                return
            while not self._closing:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.max_backoff_s)
                try:
                    await self._open()
                except ConnectionClosed as exc:
                    if exc.code == CloseCode.UNAUTHORIZED and isinstance(self._token, str):
                        # A fixed token the server refuses now will be refused again.
                        await self._give_up(exc)
                        return
                    log.debug("reconnect failed: %s", exc)
                    continue
                except (ConnectFailed, _WsClosed) as exc:
                    log.debug("reconnect failed: %s", exc)
                    continue
                break
            if self._closing:
                return
            self.reconnects += 1
            await self._after_reconnect()

    async def _after_reconnect(self) -> None:
        # Chats that were never accepted: send again, same client_msg_id (idempotent).
        for frame, future in list(self._chats.values()):
            if not future.done():
                await self._send(frame)
        for run in list(self.runs.values()):
            if not run.done:
                await self._send(Resume(run.run_id, run.last_seq))

    async def _give_up(self, exc: ConnectionClosed) -> None:
        self._closed_for_good = exc
        self._ready.set()
        for _frame, future in self._chats.values():
            if not future.done():
                future.set_exception(exc)
        for waiting in self._resumes.values():
            if not waiting.done():
                waiting.set_exception(exc)
        for run in self.runs.values():
            if not run.done:
                await run._fail(exc)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "run_accepted":
            run = self.runs.setdefault(frame["run_id"], Run(frame["run_id"]))
            run.thread_id = frame.get("thread_id")
            run.duplicate = bool(frame.get("duplicate"))
            pending = self._chats.get(frame.get("client_msg_id", ""))
            if pending is not None and not pending[1].done():
                pending[1].set_result(run)
        elif kind == "resumed":
            self._gap_resumes.discard(frame.get("run_id", ""))
            resumed = self._resumes.pop(frame.get("run_id", ""), None)
            if resumed is not None and not resumed.done():
                resumed.set_result(frame)
        elif kind == "pong":
            while self._pongs:
                fut = self._pongs.pop(0)
                if not fut.done():
                    fut.set_result(None)
                    break
        elif kind == "error":
            err = ServerError(frame.get("code", ""), frame.get("message", ""), frame.get("ref"))
            ref = err.ref or ""
            if ref in self._chats and not self._chats[ref][1].done():
                self._chats[ref][1].set_exception(err)
            elif ref in self._resumes and not self._resumes[ref].done():
                self._resumes.pop(ref).set_exception(err)
            else:
                self.errors.put_nowait(err)
        elif kind == "connected":
            self.connected_info = frame
        elif isinstance(kind, str) and "seq" in frame:
            event = Event.from_dict(frame)
            run = self.runs.setdefault(event.run_id, Run(event.run_id, event.thread_id))
            if run._add(event):
                await run._notify()
                if self.auto_ack:
                    await self.ack(run.run_id, run.last_seq)
            else:
                self.duplicates_dropped += 1
            if run.has_gap and run.run_id not in self._gap_resumes:
                # A seq is missing on a healthy socket (lost between replicas): the store
                # has it, so resume from the last contiguous seq instead of waiting.
                self._gap_resumes.add(run.run_id)
                self.gap_resumes += 1
                log.info("run %s: gap after seq %d; resuming", run.run_id, run.last_seq)
                await self._send(Resume(run.run_id, run.last_seq))
