"""The rules of one client connection, as a sans-I/O state machine (docs/protocol.md).

:class:`ConnectionProtocol` never touches a socket, a clock or the store. The I/O around it
(``session.py`` for ``/ws``, ``agui/stream.py`` for an AG-UI stream) feeds it what happened and
drains what it decided, as the websockets library's ``protocol.py`` does::

    socket text ── receive_frame() ──▶ ConnectionProtocol ── data_to_send() ──▶ socket writes
                                           │        ▲
                        requests_received() │        │ accept() refuse() answer() fail()
                                           ▼        │
                               auth, RunService (the store, the engine)

The rules it holds, each tested with strings and no socket (tests/test_connection.py):

- **connect first**: in :attr:`State.CONNECTING` the only frame accepted is a valid ``connect``;
  anything else, or :meth:`connect_timed_out`, closes with ``4401`` and nothing more is read.
  A second ``connect`` later is ``invalid_message``.
- **frame size**: a text frame over 1 MiB closes with ``1009``.
- **bad frames**: each bad frame gets an ``error`` frame and the connection stays;
  ``max_bad_frames`` of them in a row close with ``4400``, after the last one's ``error``. A
  frame that parses resets the count; an answer such as ``not_found`` to a well-formed frame is
  not a bad frame.
- **ack**: cumulative and clamped to the last seq written to this connection; an ack that does
  not advance does nothing; an ack of a run this connection was never sent asks the runtime
  whether the run is the user's (:class:`CheckOwner`), so a foreign run is ``not_found``.
- **fan-out**: a connection follows every run of its owner that starts after it connected
  (unless made with ``follow_new_runs=False``), and the runs it resumed; a terminal event ends
  the subscription.
- **resume splice**: :meth:`begin_resume` buffers the run's live events while the replay is read
  from the store; :meth:`replay` sends each stored event; :meth:`finish_resume` sends
  ``resumed``, then the buffered events past the replay, then the run continues live: each
  ``seq > after_seq`` exactly once and in order.
- **token expiry**: :meth:`token_expired` closes with ``4401``.
- **closing**: once closed, nothing more is handled or decided; what was decided before the
  close is still sent, then the close frame.

A bad transition (an answer in the wrong state) raises :class:`InvalidState`, naming the state
it expected and the one it found.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .errors import InvalidState
from .events import Event
from .protocol import (
    MAX_FRAME_BYTES,
    Ack,
    Cancel,
    Chat,
    CloseCode,
    Connect,
    FrameError,
    Ping,
    ProtocolErrorCode,
    Resume,
    connected_frame,
    dumps,
    error_frame,
    parse_client_frame,
    pong_frame,
    resumed_frame,
)

__all__ = [
    "BAD_FRAME_CODES",
    "CheckOwner",
    "ConnectionProtocol",
    "InvalidState",
    "Outgoing",
    "Request",
    "State",
]

#: Error codes that count towards ``max_bad_frames``: the frame itself was bad.
BAD_FRAME_CODES = frozenset(
    {
        ProtocolErrorCode.INVALID_JSON,
        ProtocolErrorCode.INVALID_MESSAGE,
        ProtocolErrorCode.UNKNOWN_TYPE,
    }
)


class State(enum.Enum):
    """Where a connection is: waiting for ``connect``, open, or closed."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class CheckOwner:
    """An ack named a run this connection was never sent: the runtime answers ``not_found``
    unless the run is the user's (and then the ack, clamped to nothing, does nothing)."""

    run_id: str


#: What the I/O side must carry out, in order: authenticate a ``connect``; start, resume or
#: cancel a run; record an ack (already clamped and advancing); check a run's owner.
Request = Connect | Chat | Ack | Resume | Cancel | CheckOwner


@dataclass(slots=True)
class Outgoing:
    """One text frame to write; ``event`` when it carries an event (for receipts)."""

    text: str
    event: Event | None = None
    live: bool = False
    replayed: bool = False


class ConnectionProtocol:
    """One connection's state, subscriptions and acks; see the module docstring."""

    __slots__ = (
        "_buffers",
        "_errors",
        "_outgoing",
        "_requests",
        "acked",
        "bad_frames",
        "close_code",
        "follow_new_runs",
        "max_bad_frames",
        "max_frame_bytes",
        "sent",
        "state",
        "subscribed",
    )

    def __init__(
        self,
        *,
        max_bad_frames: int = 20,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        follow_new_runs: bool = True,
        state: State = State.CONNECTING,
    ) -> None:
        self.state = state
        self.max_bad_frames = max_bad_frames
        self.max_frame_bytes = max_frame_bytes
        #: False for a connection that carries only the runs it is given (an AG-UI stream).
        self.follow_new_runs = follow_new_runs
        self.close_code: int | None = None
        self.bad_frames = 0
        #: Runs whose live events this connection gets.
        self.subscribed: set[str] = set()
        #: Highest seq per run written to this connection (the ack clamp).
        self.sent: dict[str, int] = {}
        #: Highest seq per run this connection acknowledged.
        self.acked: dict[str, int] = {}
        # Live events held per run while its replay is read (the resume splice); allocated
        # only while a resume is in progress.
        self._buffers: dict[str, list[tuple[Event, bool]]] | None = None
        self._outgoing: list[Outgoing] = []
        self._requests: list[Request] = []
        self._errors: list[ProtocolErrorCode] = []

    # ---- outputs ------------------------------------------------------------------------

    def data_to_send(self) -> list[Outgoing]:
        """The frames decided since the last call, in order. Nothing before ``connected``:
        events of runs started while the ``connect`` is being answered wait for it."""
        out = self._outgoing
        if not out or self.state is State.CONNECTING:
            return []
        self._outgoing = []
        return out

    def requests_received(self) -> list[Request]:
        """What the runtime must do for the frames received since the last call, in order."""
        out = self._requests
        if out:
            self._requests = []
        return out

    def errors_sent(self) -> list[ProtocolErrorCode]:
        """The codes of the ``error`` frames decided since the last call (for metrics), also
        the last one before a close for too many bad frames."""
        out = self._errors
        if out:
            self._errors = []
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # ---- input from the socket ----------------------------------------------------------

    def receive_frame(self, raw: str | bytes) -> None:
        """One frame as the socket delivered it (text, or bytes for a binary frame)."""
        if self.state is State.CLOSED:
            return
        if len(raw) > self.max_frame_bytes or (
            isinstance(raw, str) and len(raw.encode("utf-8")) > self.max_frame_bytes
        ):
            self.close(CloseCode.FRAME_TOO_BIG)
            return
        frame = parse_client_frame(raw)
        if self.state is State.CONNECTING:
            if isinstance(frame, Connect):
                self._requests.append(frame)
            else:
                # Nothing is handled before the handshake (docs/protocol.md): unauthorized.
                self.close(CloseCode.UNAUTHORIZED)
            return
        if isinstance(frame, FrameError):
            self.fail(frame)
            return
        if isinstance(frame, Connect):
            self.fail(FrameError(ProtocolErrorCode.INVALID_MESSAGE, "already connected"))
            return
        self.bad_frames = 0
        if isinstance(frame, Ping):
            self._send(pong_frame())
        elif isinstance(frame, Ack):
            if frame.run_id not in self.sent:
                self._requests.append(CheckOwner(frame.run_id))
            else:
                seq = self.ack(frame.run_id, frame.seq)
                if seq is not None:
                    self._requests.append(Ack(frame.run_id, seq))
        else:
            self._requests.append(frame)

    def connect_timed_out(self) -> None:
        """No ``connect`` within the connect timeout."""
        if self.state is State.CONNECTING:
            self.close(CloseCode.UNAUTHORIZED)

    def token_expired(self) -> None:
        """A connection does not outlive its token: reconnect with a fresh one and resume."""
        self.close(CloseCode.UNAUTHORIZED)

    def close(self, code: int) -> None:
        """Close (idempotent): nothing more is handled or decided; :attr:`close_code` says why.
        What was decided before the close (the ``error`` answering the frame that closed it,
        events already committed) is still in :meth:`data_to_send`, to be written before the
        close frame; before ``connected`` nothing was ever meant for the peer."""
        if self.state is State.CLOSED:
            return
        if self.state is State.CONNECTING:
            self._outgoing.clear()
        self.state = State.CLOSED
        self.close_code = int(code)
        self._requests.clear()
        self._buffers = None

    # ---- answers from the runtime -------------------------------------------------------

    def accept(
        self,
        connection_id: str,
        user_id: str,
        heartbeat_s: float,
        active_runs: list[dict[str, Any]],
    ) -> None:
        """The ``connect`` was authenticated: send ``connected``; frames are handled from now."""
        self._expect(State.CONNECTING, "accept")
        self.state = State.OPEN
        frame = connected_frame(connection_id, user_id, heartbeat_s, active_runs)
        # First, before any event of a run that started while this was prepared.
        self._outgoing.insert(0, Outgoing(dumps(frame)))

    def refuse(self, code: int) -> None:
        """The ``connect`` was refused (bad token: 4401, too many connections: 4429, server
        restarting: 1012)."""
        self._expect(State.CONNECTING, "refuse")
        self.close(code)

    def answer(self, frame: dict[str, Any]) -> None:
        """A server frame answering a request (``run_accepted``)."""
        if self.state is State.OPEN:
            self._send(frame)

    def fail(self, error: FrameError) -> None:
        """Answer with ``error``; a bad frame counts towards ``max_bad_frames`` in a row."""
        if self.state is not State.OPEN:
            return
        self._send(error_frame(error.code, error.message, error.ref))
        self._errors.append(error.code)
        if error.code in BAD_FRAME_CODES:
            self.bad_frames += 1
            if self.bad_frames >= self.max_bad_frames:
                self.close(CloseCode.PROTOCOL_VIOLATION)

    # ---- runs ---------------------------------------------------------------------------

    def run_started(self, run_id: str) -> None:
        """A run of the owner started: a connection that follows new runs gets it live, also
        one whose ``connected`` is still being prepared (its events wait for it)."""
        if self.follow_new_runs and self.state is not State.CLOSED:
            self.subscribed.add(run_id)

    def follows(self, run_id: str) -> bool:
        """True when a live event of the run would reach this connection (sent or buffered)."""
        if self.state is State.CLOSED:
            return False
        return run_id in self.subscribed or (self._buffers is not None and run_id in self._buffers)

    def event_committed(self, event: Event, live: bool, text: str | None = None) -> bool:
        """A committed event of the owner: sent when subscribed, held while the run is being
        resumed, ignored otherwise. True when the subscription ended (a terminal event)."""
        run_id = event.run_id
        buffers = self._buffers
        if buffers is not None:
            held = buffers.get(run_id)
            if held is not None:
                held.append((event, live))
                return False
        if run_id not in self.subscribed or self.state is State.CLOSED:
            return False
        self._outgoing.append(Outgoing(text or event.to_json(), event, live))
        if event.is_terminal:
            self.subscribed.discard(run_id)
            return True
        return False

    def written(self, run_id: str, seq: int) -> None:
        """The event ``(run_id, seq)`` was written to the socket: it may now be acked."""
        if seq > self.sent.get(run_id, 0):
            self.sent[run_id] = seq

    def ack(self, run_id: str, seq: int) -> int | None:
        """A cumulative ack, clamped to what was written here; the new acked seq, or None when
        it does not advance."""
        seq = min(seq, self.sent.get(run_id, 0))
        if seq <= self.acked.get(run_id, 0):
            return None
        self.acked[run_id] = seq
        return seq

    # ---- the resume splice --------------------------------------------------------------

    def begin_resume(self, run_id: str) -> None:
        """Hold the run's live events from now while its replay is read from the store: an
        event is then in the replay or in the buffer (or both, and sent once), never in
        neither."""
        self.subscribed.discard(run_id)
        if self._buffers is None:
            self._buffers = {}
        self._buffers[run_id] = []

    def replay(self, event: Event) -> None:
        """One stored event of a run being resumed."""
        if self.state is not State.CLOSED:
            self._outgoing.append(Outgoing(event.to_json(), event, replayed=True))

    def finish_resume(self, run_id: str, after_seq: int, replay: list[Event], ended: bool) -> None:
        """The replay (``replay``, already sent through :meth:`replay`) is done: send
        ``resumed``, then the held events past it, then follow the run live unless it ended."""
        held = self._end_hold(run_id)
        if self.state is State.CLOSED:
            return
        last = max(after_seq, replay[-1].seq if replay else 0)
        ended = ended or any(e.is_terminal for e in replay)
        self._send(resumed_frame(run_id, after_seq, len(replay)))
        for event, live in held:
            if event.seq > last:
                self._outgoing.append(Outgoing(event.to_json(), event, live))
                last = event.seq
                ended = ended or event.is_terminal
        if not ended:
            self.subscribed.add(run_id)

    def abort_resume(self, run_id: str) -> None:
        """The replay could not be read: stop holding the run's events (not subscribed)."""
        self._end_hold(run_id)

    def _end_hold(self, run_id: str) -> list[tuple[Event, bool]]:
        buffers = self._buffers
        if buffers is None:
            return []
        held = buffers.pop(run_id, [])
        if not buffers:
            self._buffers = None
        return held

    # ---- internals ----------------------------------------------------------------------

    def _send(self, frame: dict[str, Any]) -> None:
        self._outgoing.append(Outgoing(dumps(frame)))

    def _expect(self, expected: State, action: str) -> None:
        if self.state is not expected:
            raise InvalidState(action, expected, self.state)
