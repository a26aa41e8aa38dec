"""The incremental checker: follows the audit store by position and judges each run once.

A pass has three phases, and only the last one writes:

1. **read**, on a read connection (no write lock; in SQLite's WAL mode readers never block the
   runtime's writer): the saved position, the events past it, the pending runs, and for every
   run that is due (ended, with ``settle_s`` for its acks to arrive, or stuck) its run row,
   events and receipts, a few hundred runs per query;
2. **judge**, pure CPU outside any transaction: :func:`monitor.rules.check_run` for each due
   run, in slices of ``slice_s`` with the event loop let run between them, because inside
   ``runwatch serve`` the checker shares its loop with the runtime's sockets;
3. **write**, one short transaction: verdicts and violations (one ``executemany`` each), the
   pending-set changes and the new position. An ended run leaves ``monitor_pending``; a stuck
   one stays (flagged judged, counted by ``runwatch_monitor_stuck_runs``) until it ends.

Exactly once: nothing is written before phase 3, and phase 3 commits verdicts, pending set
and position together, so a checker stopped at any point and started again repeats at most a
pass that never committed: no run judged twice, none skipped. The write is conditional on the
position row being what phase 1 read (``position`` and ``updated_us``, which every pass
changes): if another checker of the same consumer committed in between, the pass is
discarded and done again from the new state, instead of judging from a stale pending set
(``verdicts.run_id`` is the primary key too, as a last guard).

Position and concurrent writers: on PostgreSQL, ``position`` comes from a sequence, and a
transaction holding a lower position can commit after one holding a higher position. A checker
that saved the higher position would never see the lower one. So each pass also looks at the
last ``overlap`` positions before the saved one for runs neither judged nor pending (one
anti-join in the database): a late commit within that window is still found. The window is
generous (default 10,000 events): a writer would have to fall that far behind to be missed,
and even then the run is found by its later events. SQLite has one writer, so positions commit
in order there and the window is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.events import now_us
from runtime.store.audit import AuditStore
from runtime.store.errors import StoreError
from runtime.store.monitoring import (
    MonitorReader,
    MonitorStore,
    PassWrite,
    RunClock,
    StoredRun,
    Tracking,
    VerdictRecord,
    ViolationRecord,
)

from .metrics import MonitorMetrics
from .rules import RuleConfig, RunFacts, RunState, Verdict, Violation, check_run, run_state

__all__ = ["Checker", "CheckerConfig", "Pacer", "PassResult", "run_facts"]

log = logging.getLogger("runwatch.monitor")


class SteadyClock:
    """Wall-clock microseconds that advance with the monotonic clock: read the wall clock once,
    then add elapsed monotonic time, so a wall-clock step (forward or back) does not move it.
    Events stamped after a forward step look younger to it for the size of the step: the
    monitor judges such runs later, never wrongly."""

    def __init__(self) -> None:
        self._wall_us = now_us()
        self._mono_ns = time.monotonic_ns()

    def __call__(self) -> int:
        return self._wall_us + (time.monotonic_ns() - self._mono_ns) // 1000


@dataclass(frozen=True)
class CheckerConfig:
    rules: RuleConfig = field(default_factory=RuleConfig)
    #: An ended run is judged once its acks had this long to arrive.
    settle_s: float = 10.0
    #: Events read per pass.
    batch: int = 5000
    #: Positions before the saved one re-examined on PostgreSQL (see the module docstring).
    overlap: int = 10_000
    consumer: str = "checker"
    #: Runs judged per pass at most: bounds the write transaction (the rest wait one pass).
    max_judge: int = 1000
    #: Runs loaded per query.
    load_chunk: int = 200
    #: CPU time judged before the event loop gets a turn.
    slice_s: float = 0.005
    #: While behind, the share of time the loop spends in passes (it sleeps the rest), so that
    #: catching up a backlog leaves the runtime CPU and, inside ``runwatch serve``, its loop.
    busy_share: float = 0.5


@dataclass
class PassResult:
    read: int = 0
    judged: int = 0
    failed: int = 0
    violations: int = 0
    pending: int = 0
    stuck: int = 0
    #: Pending runs that have not ended and are not stuck (``runwatch_monitor_open_runs``): an
    #: ended run waiting out its ack window, or its turn to be judged, is not open.
    open_runs: int = 0
    #: More work was ready than one pass takes: pass again at once.
    more: bool = False


def run_facts(stored: StoredRun) -> RunFacts:
    """What the rule engine judges of a run, from what the store holds of it."""
    run = stored.run
    return RunFacts(
        run_id=run.run_id,
        user_id=run.user_id,
        events=stored.events,
        committed_us=stored.committed_us,
        live=stored.live,
        receipts=stored.receipts,
        remote_connections=stored.remote_connections,
        started_us=run.created_us,
        timeout_s=run.timeout_s,
    )


class Pacer:
    """Cooperative slicing of CPU work: :meth:`due` once ``slice_s`` passed since the last
    turn the event loop had; :meth:`pause` gives it one."""

    def __init__(self, slice_s: float) -> None:
        self.slice_s = slice_s
        self._deadline = time.perf_counter() + slice_s

    def due(self) -> bool:
        return time.perf_counter() >= self._deadline

    async def pause(self) -> None:
        await asyncio.sleep(0)
        self._deadline = time.perf_counter() + self.slice_s


# ---- one pass, as data ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A run the checker is not finished with: pending already, or first seen this pass.
    ``clock`` is None while the store has events of the run but no run row."""

    run_id: str
    fresh: bool
    judged: bool
    clock: RunClock | None


@dataclass
class _Snapshot:
    """What the read phase found; nothing of it is written yet."""

    #: The position row as read; None before the first pass.
    read: Tracking | None
    position: int
    candidates: list[_Candidate]
    due: list[_Candidate]
    lag_s: float


@dataclass
class _Outcome:
    """What the judge phase decided: the rows of the write phase and the metrics after it."""

    new_pending: list[tuple[str, bool]] = field(default_factory=list)
    mark_judged: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    verdicts: list[VerdictRecord] = field(default_factory=list)
    violations: list[ViolationRecord] = field(default_factory=list)
    #: The violations of each run judged, for the metrics.
    judged: list[list[Violation]] = field(default_factory=list)


# ---- the checker ---------------------------------------------------------------------------


class Checker:
    """Judges runs from the store; :meth:`step` is one pass, :meth:`start` loops them."""

    def __init__(
        self,
        store: AuditStore,
        metrics: MonitorMetrics,
        config: CheckerConfig | None = None,
        *,
        clock_us: Callable[[], int] | None = None,
    ) -> None:
        self.store = MonitorStore(store)
        self.metrics = metrics
        config = config or CheckerConfig()
        # An unacked live event is only "never acked" past ack_wait_s: judge no earlier.
        if config.settle_s < config.rules.ack_wait_s:
            config = dataclasses.replace(config, settle_s=config.rules.ack_wait_s)
        self.config = config
        # I8 judged on elapsed time, not on the wall clock: a wall-clock step (NTP, a VM
        # resumed) must not make healthy open runs look stuck.
        self.clock_us = clock_us if clock_us is not None else SteadyClock()
        # Positions commit in order on SQLite (one writer): no window to re-examine.
        self._overlap = config.overlap if store.dialect == "postgresql" else 0
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> PassResult:
        """One pass: read, judge, then write in one short transaction."""
        now = self.clock_us()
        result = PassResult()
        async with self.store.reading() as reader:
            snapshot = await self._read(reader, now, result)
            outcome = await self._judge(reader, snapshot, now, result)
        if not await self._write(snapshot, outcome, now):
            log.info(
                "checker %s: another checker committed first; pass again", self.config.consumer
            )
            return PassResult(more=True)
        for violations in outcome.judged:  # counted once committed
            verdict = Verdict.FAIL if violations else Verdict.PASS
            self.metrics.runs_checked.labels(verdict=verdict).inc()
            for v in violations:
                self.metrics.violations.labels(rule=v.rule.value).inc()
        self.metrics.lag_seconds.set(snapshot.lag_s)
        self.metrics.open_runs.set(result.open_runs)
        self.metrics.stuck_runs.set(result.stuck)
        self.metrics.last_check.set(time.time())
        return result

    # ---- phase 1: read ------------------------------------------------------------------

    async def _read(self, reader: MonitorReader, now: int, result: PassResult) -> _Snapshot:
        cfg = self.config
        saved = await reader.tracking(cfg.consumer)
        position = saved.position if saved is not None else 0
        # One event more than a pass takes: the oldest unread, whose age is the lag.
        read = await reader.events_after(position, cfg.batch + 1)
        unread = read[cfg.batch] if len(read) > cfg.batch else None
        read = read[: cfg.batch]
        result.read = len(read)
        result.more = unread is not None
        new_position = read[-1].position if read else position
        pending = await reader.pending_runs()
        known = {p.run_id for p in pending}
        seen = {e.run_id for e in read} - known
        fresh = seen - await reader.judged(sorted(seen))
        if self._overlap and position > 0:
            fresh.update(await reader.unfollowed_runs(max(0, position - self._overlap), position))
        clocks = await reader.run_clocks(sorted(fresh))
        candidates = [_Candidate(p.run_id, False, p.judged, p.clock) for p in pending]
        candidates += [_Candidate(r, True, False, clocks.get(r)) for r in sorted(fresh)]
        due = [c for c in candidates if self._is_due(c, now)]
        # The lag: how long the oldest unread event, or the longest-waiting run that is due
        # and left for a later pass, has waited (a judging backlog is lag too).
        behind = [] if unread is None else [unread.committed_us]
        if len(due) > cfg.max_judge:
            due.sort(key=self._due_us)
            behind.append(self._due_us(due[cfg.max_judge]))
            due = due[: cfg.max_judge]
            result.more = True
        lag = max(0.0, (now - min(behind)) / 1e6) if behind else 0.0
        return _Snapshot(saved, new_position, candidates, due, lag)

    def _due_us(self, c: _Candidate) -> int:
        """When a due run became due: settled after its end, or stuck after its timeout."""
        assert c.clock is not None
        if c.clock.ended_us is not None:
            return c.clock.ended_us + int(self.config.settle_s * 1_000_000)
        timeout_us = c.clock.timeout_s * 1_000_000
        return c.clock.created_us + int(timeout_us + self.config.rules.stuck_grace_s * 1_000_000)

    def _is_due(self, c: _Candidate, now: int) -> bool:
        """Whether a run is to be judged now (ended and settled, or stuck and not judged)."""
        if c.clock is None:
            return False  # events of a run the store does not know: judged when it appears
        if c.clock.ended_us is not None:
            return not c.judged and now - c.clock.ended_us >= self.config.settle_s * 1_000_000
        timeout_us = c.clock.timeout_s * 1_000_000
        grace_us = self.config.rules.stuck_grace_s * 1_000_000
        return not c.judged and now - c.clock.created_us > timeout_us + grace_us

    # ---- phase 2: judge -----------------------------------------------------------------

    async def _judge(
        self, reader: MonitorReader, snapshot: _Snapshot, now: int, result: PassResult
    ) -> _Outcome:
        cfg = self.config
        out = _Outcome()
        stuck_now: set[str] = set()
        finished: set[str] = set()
        pacer = Pacer(cfg.slice_s)
        # Chunk by chunk: a chunk's facts are garbage before the next one loads, so few
        # objects live long enough for the full (stop-the-world) garbage collections.
        due = [c.run_id for c in snapshot.due]
        for at in range(0, len(due), cfg.load_chunk):
            ids = due[at : at + cfg.load_chunk]
            loaded = await reader.load_runs(ids, pacer)
            for run_id in ids:
                stored = loaded.get(run_id)
                if stored is None:
                    continue  # the run row went away (retention): it stays pending
                facts = run_facts(stored)
                state = run_state(facts, cfg.rules, now)
                if state == RunState.OPEN:
                    continue
                violations = check_run(facts, cfg.rules, now)
                self._record(out, stored, state, violations, now)
                (stuck_now if state == RunState.STUCK else finished).add(run_id)
                if pacer.due():
                    await pacer.pause()  # let the runtime's sockets run
            del loaded
        for c in snapshot.candidates:
            ended = c.clock is not None and c.clock.ended_us is not None
            if c.run_id in finished or (ended and c.judged):
                if not c.fresh:
                    out.drop.append(c.run_id)
                continue
            stuck = c.run_id in stuck_now or c.judged
            if c.clock is not None:
                result.pending += 1
                result.open_runs += not ended and not stuck
            result.stuck += stuck
            if c.fresh:
                out.new_pending.append((c.run_id, c.run_id in stuck_now))
            elif c.run_id in stuck_now:
                out.mark_judged.append(c.run_id)
        for violations in out.judged:
            result.judged += 1
            result.failed += bool(violations)
            result.violations += len(violations)
        return out

    @staticmethod
    def _record(
        out: _Outcome, stored: StoredRun, state: RunState, violations: list[Violation], now: int
    ) -> None:
        run = stored.run
        out.verdicts.append(
            VerdictRecord(
                run_id=run.run_id,
                user_id=run.user_id,
                agent=run.agent,
                thread_id=run.thread_id,
                state=state.value,
                verdict=(Verdict.FAIL if violations else Verdict.PASS).value,
                outcome=run.outcome,
                rules=tuple(sorted({v.rule.value for v in violations})),
                violation_count=len(violations),
                event_count=len(stored.events),
                created_us=run.created_us,
                ended_us=run.ended_us,
                judged_us=now,
            )
        )
        out.violations += [
            ViolationRecord(v.run_id, v.rule.value, v.message, v.seqs, v.event_ids, now)
            for v in violations
        ]
        out.judged.append(violations)

    # ---- phase 3: write -----------------------------------------------------------------

    async def _write(self, snapshot: _Snapshot, out: _Outcome, now: int) -> bool:
        """Verdicts, violations, pending set and position in one transaction; False when
        another checker of the same consumer committed since this pass read."""
        return await self.store.commit_pass(
            PassWrite(
                consumer=self.config.consumer,
                read=snapshot.read,
                position=snapshot.position,
                now_us=now,
                new_pending=out.new_pending,
                mark_judged=out.mark_judged,
                drop=out.drop,
                verdicts=out.verdicts,
                violations=out.violations,
            )
        )

    # ---- catching up and the loop -------------------------------------------------------

    async def catch_up(self, max_passes: int = 1000) -> PassResult:
        """Pass until nothing new is read and nothing due is left (for tests, benchmarks and
        ``runwatch check``)."""
        total = PassResult()
        for _ in range(max_passes):
            r = await self.step()
            total.read += r.read
            total.judged += r.judged
            total.failed += r.failed
            total.violations += r.violations
            total.pending, total.stuck, total.open_runs = r.pending, r.stuck, r.open_runs
            if r.read == 0 and not r.more:
                break
        return total

    def start(self, interval_s: float) -> None:
        self._task = asyncio.create_task(self._loop(interval_s), name="runwatch-checker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self, interval_s: float) -> None:
        share = min(1.0, max(0.01, self.config.busy_share))
        # Logged once per change of state (failing with a new error, or working again), never
        # once per pass: a store that stays unwritable is one line, not one every interval.
        failing: str | None = None
        while True:
            try:
                started = time.perf_counter()
                result = await self.step()
                if failing is not None:
                    log.warning("checker passes work again (after: %s)", failing)
                    failing = None
                if result.more:
                    # Behind: go again soon, after a pause in proportion to the pass.
                    await asyncio.sleep((time.perf_counter() - started) * (1 - share) / share)
                    continue
            except StoreError as exc:
                if str(exc) != failing:
                    log.error("checker pass failed: %s (retrying every %gs)", exc, interval_s)
                failing = str(exc)
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                if text != failing:
                    log.exception("checker pass failed (retrying every %gs)", interval_s)
                failing = text
            await asyncio.sleep(interval_s)
