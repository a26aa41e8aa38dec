"""Instance ownership (docs/operations.md): one live process per instance id, and every run ends
even when its replica never returns (I8).

A runtime holds a lease on its instance id in the audit store (``instance_leases``) before it
recovers anything, and renews it every third of ``ttl_s``. Two live processes never share an
id: a second one is refused at once when the holder is a live process on the same host (its
pid exists in the same pid namespace), and after one lease lifetime otherwise.

A lease that expires (or is missing while the instance still owns open runs) belongs to a
dead replica. Every replica looks for such leases at start and every half lease lifetime, and
claims one with a compare-and-set in the store, so exactly one survivor wins; it ends the dead
replica's open runs with ``agent_error{runtime_restarted}`` through its own writer (so clients
of those runs get it live, on any replica) and then deletes the lease.

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    LeaseError
     +-- LeaseHeld     another live process holds this instance id
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from .errors import LeaseError, LeaseHeld, StoreError
from .store.audit import AuditStore, Lease

__all__ = ["InstanceLease", "LeaseError", "LeaseHeld", "host_key"]

log = logging.getLogger("runwatch.lease")

#: Ends one dead instance's open runs; returns how many it ended.
TakeOver = Callable[[str], Awaitable[int]]


def _read(path: str) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text().strip()
    return ""


def host_key() -> str:
    """Host name, kernel boot id and pid namespace: two processes with the same key see the
    same pids, so one can tell for certain that the other's pid is gone."""
    pidns = ""
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}/{pidns}"[:300]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class InstanceLease:
    """This process's lease on ``instance_id``, and the reaper of dead replicas' leases."""

    def __init__(
        self,
        store: AuditStore,
        instance_id: str,
        *,
        ttl_s: float = 15.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self.ttl_s = ttl_s
        self.clock = clock
        self.holder = secrets.token_hex(16)
        self.host = host_key()
        self.pid = os.getpid()
        self.held = False
        #: Set when the lease was lost to another process (a long pause, a partition).
        self.lost = False
        self.runs_taken_over = Counter(
            "runwatch_runs_taken_over_total",
            "Open runs of a dead replica (lease expired) ended here with runtime_restarted.",
            registry=registry,
        )
        self.takeovers = Counter(
            "runwatch_instance_takeovers_total",
            "Dead replicas (expired instance leases) whose open runs this process ended.",
            registry=registry,
        )

    def _now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    def _mine(self, instance_id: str) -> Lease:
        now = self._now_us()
        return Lease(
            instance_id, self.holder, self.host, self.pid, now, now + int(self.ttl_s * 1e6)
        )

    def is_dead(self, lease: Lease) -> bool:
        """True when ``lease``'s holder is certainly gone: expired, or a pid that no longer
        exists on this host. This process's own pid proves nothing (another runtime in this
        process, or a reused pid): such a lease is waited out."""
        if lease.holder == self.holder:
            return False
        if lease.expires_us < self._now_us():
            return True
        if lease.host == self.host and lease.pid != self.pid:
            return not _pid_alive(lease.pid)
        return False

    # ---- own lease ----------------------------------------------------------------------

    async def acquire(self, wait_s: float | None = None) -> None:
        """Take the lease on this instance id before anything is recovered.

        A holder that is certainly dead is replaced at once; a live one on this host is
        refused at once (:class:`LeaseHeld`); one elsewhere is waited for up to ``wait_s``
        (default: one lease lifetime and a bit), in case it crashed and stopped renewing."""
        wait = self.ttl_s * 1.2 if wait_s is None else wait_s
        deadline = time.monotonic() + wait
        while True:
            current = await self.store.get_lease(self.instance_id)
            if current is None or current.holder == self.holder or self.is_dead(current):
                replacing = current if current is not None else None
                if current is not None and current.holder == self.holder:
                    self.held = await self.store.renew_lease(
                        self.instance_id, self.holder, self._mine(self.instance_id).expires_us
                    )
                else:
                    self.held = await self.store.claim_lease(
                        self._mine(self.instance_id), replacing=replacing
                    )
                if self.held:
                    log.info("holding the lease on instance id %r", self.instance_id)
                    return
                continue  # someone else won the race: read again
            same_host = current.host == self.host and current.pid != self.pid
            if same_host or time.monotonic() >= deadline:
                raise LeaseHeld(current, same_host)
            await asyncio.sleep(min(self.ttl_s / 4, max(0.05, deadline - time.monotonic())))

    async def renew(self) -> bool:
        """Extend the lease; False (and :attr:`lost`) when another process took it."""
        if not self.held:
            return False
        expires = self._mine(self.instance_id).expires_us
        if await self.store.renew_lease(self.instance_id, self.holder, expires):
            return True
        self.held = False
        self.lost = True
        log.error(
            "lost the lease on instance id %r: another process took over its runs; this "
            "process no longer starts runs (restart it)",
            self.instance_id,
        )
        return False

    async def release(self) -> None:
        """Give the lease up (graceful shutdown, after every local run ended)."""
        if self.held:
            self.held = False
            await self.store.release_lease(self.instance_id, self.holder)

    # ---- dead replicas ------------------------------------------------------------------

    async def reap(self, take_over: TakeOver, only: str | None = None) -> int:
        """End the open runs of every dead instance (or of ``only``); returns how many runs
        were ended here. Each dead instance is taken over by exactly one process."""
        if only is not None:
            candidates = [only]
        else:
            candidates = await self.store.open_run_instances()
        ended = 0
        for instance_id in candidates:
            if instance_id == self.instance_id:
                continue
            current = await self.store.get_lease(instance_id)
            if current is not None and not self.is_dead(current):
                continue
            if not await self.store.claim_lease(self._mine(instance_id), replacing=current):
                continue  # another survivor won it, or the holder renewed
            try:
                count = await take_over(instance_id)
            finally:
                with contextlib.suppress(StoreError):
                    await self.store.release_lease(instance_id, self.holder)
            self.takeovers.inc()
            self.runs_taken_over.inc(count)
            ended += count
            log.warning(
                "instance %r is gone (lease expired): ended its %d open run(s) with "
                "runtime_restarted",
                instance_id,
                count,
            )
        return ended

    async def keep(self, take_over: TakeOver) -> None:
        """Renew the lease every third of its lifetime and reap dead replicas every half:
        the background task of a running runtime."""
        last_reap = time.monotonic()
        while self.held:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self.renew():
                    return
                if time.monotonic() - last_reap >= self.ttl_s / 2:
                    last_reap = time.monotonic()
                    await self.reap(take_over)
            except StoreError as exc:
                # The lease outlives a short outage; renewals retry at the next tick.
                log.warning("instance lease: store unavailable (%s); retrying", exc)
