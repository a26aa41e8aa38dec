"""What a user can do with runs, whatever the transport: chat, resume, cancel, acknowledge.

:class:`RunService` holds the rules of docs/protocol.md that are about runs rather than frames:
idempotent ``chat`` by ``client_msg_id`` (a refused chat does not use up its id), the chat rate,
ownership (anything naming another user's run or thread is ``not_found``, the same answer as
"no such run", so existence never leaks: I7), the resume splice (replay from the store, then
live, each seq once and in order), and cancel across replicas. The ``/ws`` session feeds it
parsed frames and writes what it answers; other transports use it the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .engine import Engine
from .events import new_id, now_us
from .hub import Hub
from .metrics import RuntimeMetrics
from .protocol import Chat, FrameError, ProtocolErrorCode
from .ratelimit import TokenBuckets
from .sender import Connection
from .store.audit import AuditStore, RunInfo
from .store.writer import AuditWriter

__all__ = ["Accepted", "RemoteCancel", "RunService"]

log = logging.getLogger("runwatch.runs")


class RemoteCancel(Protocol):
    """Cancels a run executing on another replica (the Redis broker)."""

    async def cancel(self, run_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Accepted:
    """A chat accepted: the run (new, or the original one for a reused ``client_msg_id``)."""

    run: RunInfo
    duplicate: bool


def _not_found(ref: str, what: str = "run") -> FrameError:
    # Same answer for "no such run" and "not yours": existence never leaks.
    return FrameError(ProtocolErrorCode.NOT_FOUND, f"no such {what}", ref)


class RunService:
    """Starts, resumes, cancels and acknowledges runs on behalf of one authenticated user."""

    def __init__(
        self,
        store: AuditStore,
        writer: AuditWriter,
        engine: Engine,
        hub: Hub,
        metrics: RuntimeMetrics,
        chat_rate: TokenBuckets,
        *,
        instance_id: str,
        run_timeout_s: float,
        remote: RemoteCancel | None = None,
        orphans: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.engine = engine
        self.hub = hub
        self.metrics = metrics
        self.chat_rate = chat_rate
        self.instance_id = instance_id
        self.run_timeout_s = run_timeout_s
        self.remote = remote
        #: Ends a dead replica's open runs at once (given its instance id); see lease.py.
        self.orphans = orphans

    async def _settle_orphan(self, run: RunInfo) -> RunInfo:
        """A run that is open and owned by another instance: if that replica is dead, its
        runs end now (runtime_restarted), so a cancel or resume of it answers at once."""
        if (
            run.ended_us is None
            and run.instance_id != self.instance_id
            and self.orphans is not None
            and run.run_id not in self.engine.active
        ):
            await self.orphans(run.instance_id)
            return await self.store.get_run(run.run_id) or run
        return run

    async def owned_run(self, user_id: str, run_id: str) -> RunInfo | None:
        run = await self.store.get_run(run_id)
        if run is None or run.user_id != user_id:
            return None
        return run

    async def active_runs(self, user_id: str) -> list[dict[str, Any]]:
        return await self.store.active_runs(user_id)

    # ---- chat ---------------------------------------------------------------------------

    async def chat(
        self, user_id: str, chat: Chat, *, adopt_thread: bool = False
    ) -> Accepted | FrameError:
        """Start a run for ``chat`` (or find the one its ``client_msg_id`` already started).

        ``adopt_thread``: a ``thread_id`` nobody owns yet becomes a new thread of this user
        (AG-UI clients name their threads); one owned by someone else is still ``not_found``."""
        ref = chat.client_msg_id
        existing = await self.store.find_run_by_msg(user_id, chat.client_msg_id)
        if existing is not None:
            # Idempotent: the original run, whatever the text; nothing starts, unless the
            # original never did (its creation committed, but the answer was lost).
            if await self._never_started(existing):
                log.warning("run %s was created but never started: starting it", existing.run_id)
                self.engine.start(existing, chat.text)
            return Accepted(existing, duplicate=True)
        agent = chat.agent or self.engine.agents.default
        if self.engine.agents.get(agent) is None:
            return FrameError(ProtocolErrorCode.UNKNOWN_AGENT, f"no agent named {agent!r}", ref)
        new_thread = chat.thread_id is None
        thread_id = chat.thread_id or new_id()
        if not new_thread:
            owner = await self.store.thread_owner(thread_id)
            if owner is None and adopt_thread:
                new_thread = True
            elif owner != user_id:
                return _not_found(ref, "thread")
        if not self.engine.accepting:
            return FrameError(ProtocolErrorCode.RATE_LIMITED, "the server is restarting", ref)
        if not self.chat_rate.allowed(user_id):
            wait = max(0.1, self.chat_rate.retry_after(user_id))
            return FrameError(
                ProtocolErrorCode.RATE_LIMITED, f"too many chats; retry in {wait:.1f}s", ref
            )
        info = RunInfo(
            run_id=new_id(),
            user_id=user_id,
            thread_id=thread_id,
            agent=agent,
            client_msg_id=chat.client_msg_id,
            instance_id=self.instance_id,
            created_us=now_us(),
            timeout_s=self.run_timeout_s,
        )
        run, duplicate = await self.writer.create_run(info, new_thread)
        if not duplicate:
            self.engine.start(run, chat.text)
        return Accepted(run, duplicate)

    async def _never_started(self, run: RunInfo) -> bool:
        """A run of this instance that is open, not running here and has no event: its
        ``create_run`` committed while the writer reported it failed (an ambiguous commit)."""
        if run.ended_us is not None or run.instance_id != self.instance_id:
            return False
        if run.run_id in self.engine.active:
            return False
        return not await self.store.run_events(run.run_id)

    # ---- ack / resume / cancel ----------------------------------------------------------

    async def check_owner(self, user_id: str, run_id: str) -> FrameError | None:
        """``not_found`` unless the run is the user's (an ack of a run never sent here)."""
        if await self.owned_run(user_id, run_id) is None:
            return _not_found(run_id)
        return None

    async def record_ack(self, conn: Connection, run_id: str, seq: int) -> None:
        """``conn`` acknowledged up to ``seq`` (clamped and advancing: its protocol said so)."""
        await self.hub.ack(conn, run_id, seq)

    async def resume(self, conn: Connection, run_id: str, after_seq: int) -> FrameError | None:
        """Replay ``seq > after_seq`` from the store, send ``resumed``, then continue live
        (the splice is the connection's rule: ``ConnectionProtocol.begin_resume``)."""
        run = await self.owned_run(conn.user_id, run_id)
        if run is None:
            self.metrics.resumes.labels(result="not_found").inc()
            return _not_found(run_id)
        run = await self._settle_orphan(run)
        self.hub.begin_resume(conn, run.run_id)
        try:
            events = await self.store.run_events(run.run_id, after_seq)
            for event in events:
                # Flow control: a long replay waits for the socket instead of filling the queue.
                await conn.wait_writable()
                conn.protocol.replay(event)
                conn.flush()
        except BaseException:
            # Not swallowed: the error goes on to the caller; only the hold ends here.
            self.hub.abort_resume(conn, run.run_id)
            raise
        self.hub.finish_resume(conn, run.run_id, after_seq, events, run.ended_us is not None)
        self.metrics.resumes.labels(result="ok").inc()
        return None

    async def cancel(self, user_id: str, run_id: str) -> FrameError | None:
        active = self.engine.active.get(run_id)
        if active is not None:
            if active.info.user_id != user_id:
                return _not_found(run_id)
            self.engine.cancel(run_id)
            return None
        run = await self.owned_run(user_id, run_id)
        if run is None:
            return _not_found(run_id)
        run = await self._settle_orphan(run)
        if run.ended_us is None and self.remote is not None:
            await self.remote.cancel(run_id)
        # A run that has ended: the cancel is ignored.
        return None
