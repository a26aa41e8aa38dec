"""Every exception the ``runtime`` package raises, in one tree.

All are defined here, and each module that raises one re-exports it (``from runtime.config
import ConfigError`` keeps working). Each carries what it knows in named fields and builds its
one-line ``str()`` from them; no ``str()`` holds a secret (a token, a password, an API key), and
none is sent to a peer as is: the socket and the HTTP API answer with protocol error codes and
their own fixed texts. Where callers rely on a standard base, it is kept as a second base
(``ConfigError`` is a ``ValueError``, ``LifecycleError`` a ``RuntimeError``).

Exceptions::

    RunwatchError                   the root: ``except RunwatchError`` catches any of these
     +-- ConfigError                a RUNWATCH_* setting runwatch cannot use
     |                              (name, value, expected); also a ValueError
     +-- TracingConfigError         the OTEL_* variables ask for what runwatch cannot export
     |                              with (name, value, reason); also a ValueError
     +-- AuthError                  a token was refused (reason, safe to show)
     +-- LifecycleError             an event would break a run invariant (run_id, expected,
     |                              got): a bug in the runtime; also a RuntimeError
     +-- StoreError                 the audit store failed (reason, detail); driver errors are
     |    |                         translated into these at the store boundary
     |    |                         (``runtime.store.errors.translate``)
     |    +-- StoreUnavailable      transient: retry, then journal
     |    +-- StoreRejected         permanent: this data cannot be stored
     +-- JournalError               an outage-journal append failed (reason, detail): nothing
     |    |                         of it counts as persisted
     |    +-- JournalFull           the journal reached its byte bound (size, limit)
     +-- LeaseError                 the instance lease could not be taken or kept (reason)
     |    +-- LeaseHeld             another live process holds this instance id (lease,
     |                              same_host)
     +-- ToolError                  a tool call failed, as the agent sees it (tool, message)
     +-- ToolArgumentError          arguments that do not match a tool's schema (tool, reason);
     |                              also a ValueError
     +-- CalculatorError            not arithmetic the calculator accepts (reason); also a
     |                              ValueError
     +-- LLMError                   the model endpoint failed or answered something unusable
     |    |                         (reason, status)
     |    +-- LLMConfigError        a RUNWATCH_LLM_* variable is missing or wrong (name, reason)
     +-- ProtocolError              a client connection driven against its rules
     |    +-- InvalidFrame          a client frame's field is missing or of the wrong type
     |    |                         (message); never leaves ``runtime.protocol``, where it
     |    |                         becomes an ``invalid_message`` answer
     |    +-- InvalidState          an input the connection cannot take in its state (action,
     |                              expected, got): a bug in the I/O that feeds it
     +-- SequenceGap                AG-UI: an event arrived out of ``seq`` order (run_id,
     |                              expected, got); the stream ends rather than guess
     +-- ServerError                SDK: the server answered with an ``error`` frame (code,
     |                              message, ref)
     +-- ConnectionClosed           SDK: the connection closed for good, no reconnect (code,
     |                              reason)
     +-- ConnectFailed              SDK: the server could not be reached or did not speak the
                                    protocol (url, reason); also an OSError

``ServerError`` was called ``RunwatchError`` in the SDK before the tree existed; the root took
the name, so ``except RunwatchError`` in client code still catches error frames (and now also
``ConnectionClosed``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store.audit import Lease

__all__ = [
    "AuthError",
    "CalculatorError",
    "ConfigError",
    "ConnectFailed",
    "ConnectionClosed",
    "InvalidFrame",
    "InvalidState",
    "JournalError",
    "JournalFull",
    "LLMConfigError",
    "LLMError",
    "LeaseError",
    "LeaseHeld",
    "LifecycleError",
    "ProtocolError",
    "RunwatchError",
    "SequenceGap",
    "ServerError",
    "StoreError",
    "StoreRejected",
    "StoreUnavailable",
    "ToolArgumentError",
    "ToolError",
    "TracingConfigError",
]


class RunwatchError(Exception):
    """The root of every exception runwatch raises. In its plain form it carries a ``reason``,
    one line saying what went wrong; subclasses add their own fields."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# ---- configuration --------------------------------------------------------------------------


def _shown(name: str, value: str) -> str:
    """A value as it may be printed: a database URL without its password, no secrets."""
    if name.endswith(("SECRET", "TOKEN", "API_KEY")):
        return "***"
    if name == "RUNWATCH_DATABASE_URL" and "@" in value:
        head, _, tail = value.rpartition("@")
        scheme, sep, auth = head.partition("://")
        return f"{scheme}{sep}{auth.split(':', 1)[0]}:***@{tail}" if ":" in auth else value
    return value


class ConfigError(RunwatchError, ValueError):
    """A ``RUNWATCH_*`` variable has a value runwatch cannot use: ``str()`` is one line saying
    what is wrong and what is expected (secrets and passwords shown as ``***``)."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        super().__init__(f"expected {expected}")
        self.name = name
        self.value = value
        self.expected = expected

    def __str__(self) -> str:
        return f"{self.name}={_shown(self.name, self.value)!r}: expected {self.expected}"


class TracingConfigError(RunwatchError, ValueError):
    """The ``OTEL_*`` variables ask for something runwatch cannot export with."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.value = value

    def __str__(self) -> str:
        return f"{self.name}={self.value!r} {self.reason}"


# ---- connections and runs ---------------------------------------------------------------------


class AuthError(RunwatchError):
    """A token was refused; ``reason`` is safe to show (it never contains the token)."""

    def __str__(self) -> str:
        return f"unauthorized: {self.reason}"


class LifecycleError(RunwatchError, RuntimeError):
    """An event that would break a run invariant ("expected X, got Y"): a bug in the runtime,
    never user input."""

    def __init__(self, run_id: str, expected: str, got: str) -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.run_id = run_id
        self.expected = expected
        self.got = got

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.reason}"


# ---- storage ----------------------------------------------------------------------------------


class StoreError(RunwatchError):
    """A failure of the audit store. ``reason`` is a short code (``unavailable``, ``timeout``,
    ``integrity``, ``rejected``...); ``detail`` is the driver's error in one line. Which
    subclass it is answers the writer's one question: can retrying the same write help?"""

    def __init__(self, detail: str, *, reason: str = "error") -> None:
        super().__init__(reason)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class StoreUnavailable(StoreError):
    """The database cannot be reached, is locked, busy, full, or did not answer in time."""


class StoreRejected(StoreError):
    """The database or its driver refuses this data: retrying the same write cannot help."""


class JournalError(RunwatchError):
    """An append to the outage journal did not reach the disk whole; nothing of it counts as
    persisted. ``reason`` is a short code (``io_error``, ``full``, ``broken``)."""

    def __init__(self, detail: str, *, reason: str = "io_error") -> None:
        super().__init__(reason)
        self.detail = detail

    def __str__(self) -> str:
        return f"journal {self.reason}: {self.detail}"


class JournalFull(JournalError):
    """The journal reached its byte bound: callers wait rather than lose events."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} of {limit} bytes", reason="full")
        self.size = size
        self.limit = limit


class LeaseError(RunwatchError):
    """The instance lease could not be taken or kept."""


class LeaseHeld(LeaseError):
    """Another live process holds the lease on this instance id."""

    def __init__(self, lease: Lease, same_host: bool) -> None:
        super().__init__(f"instance id {lease.instance_id!r} is held by a live runwatch process")
        self.lease = lease
        self.same_host = same_host

    def __str__(self) -> str:
        where = f"pid {self.lease.pid} on this host" if self.same_host else self.lease.host
        return (
            f"{self.reason} ({where.split('/')[0]}); stop it, or give this process its own "
            "RUNWATCH_INSTANCE_ID (or leave it unset for a unique one)"
        )


# ---- agents and tools -------------------------------------------------------------------------


class ToolError(RunwatchError):
    """A tool call failed (raised, timed out, bad arguments, unknown tool).

    The ``tool_completed`` event with ``status: "error"`` has already been emitted; the agent
    may catch this and explain, or let it propagate (the run then ends with ``agent_failed``).
    """

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(message)
        self.tool = tool
        self.message = message

    def __str__(self) -> str:
        return f"{self.tool}: {self.message}"


class ToolArgumentError(RunwatchError, ValueError):
    """The arguments do not match the tool's schema."""

    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(reason)
        self.tool = tool

    def __str__(self) -> str:
        return f"{self.tool}: {self.reason}"


class CalculatorError(RunwatchError, ValueError):
    """The expression is not arithmetic the calculator accepts."""


class LLMError(RunwatchError):
    """The model endpoint failed or answered something unusable; ``status`` is the HTTP
    status when it answered with one."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        return prefix + self.reason


class LLMConfigError(LLMError):
    """A ``RUNWATCH_LLM_*`` variable is missing or has a value the agent cannot use."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name

    def __str__(self) -> str:
        return f"{self.name} {self.reason}"


# ---- connections ----------------------------------------------------------------------------


class ProtocolError(RunwatchError):
    """A client connection was driven against its rules (docs/protocol.md)."""


class InvalidFrame(ProtocolError):
    """A client frame's field is missing or of the wrong type; ``runtime.protocol`` turns it
    into an ``invalid_message`` answer, so it never reaches a caller."""


class InvalidState(ProtocolError):
    """An input a :class:`~runtime.connection.ConnectionProtocol` cannot take in its state."""

    def __init__(self, action: str, expected: Any, got: Any) -> None:
        super().__init__(f"{action}: expected {expected.value}, got {got.value}")
        self.action = action
        self.expected = expected
        self.got = got


class SequenceGap(RunwatchError):
    """An event arrived out of ``seq`` order: an AG-UI stream cannot be translated faithfully."""

    def __init__(self, run_id: str, expected: int, got: int) -> None:
        super().__init__(f"run {run_id}: expected seq {expected}, got {got}")
        self.run_id = run_id
        self.expected = expected
        self.got = got


# ---- the client SDK -------------------------------------------------------------------------


class ServerError(RunwatchError):
    """The server answered a frame with ``error``: ``code`` is the protocol error code
    (``unknown_agent``, ``rate_limited``, ``not_found``...), ``ref`` the ``client_msg_id`` or
    ``run_id`` it answers, if any."""

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectionClosed(RunwatchError):
    """The connection closed for good (no reconnect): ``code`` and ``reason`` say why."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(reason)
        self.code = code

    def __str__(self) -> str:
        return f"connection closed: {self.code} ({self.reason or 'no reason'})"


class ConnectFailed(RunwatchError, OSError):
    """The SDK could not open a connection: the server is down or unreachable, the handshake was
    refused (not a runwatch ``/ws``), or no ``connected`` frame came in time. ``url`` is where it
    tried (without credentials) and ``reason`` what went wrong; the cause is chained."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to {url}: {reason}")
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot connect to {self.url}: {self.reason}"
