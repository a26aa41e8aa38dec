"""The incremental checker: follows the audit store by position and judges each run once.

Every pass, in one transaction:

1. read the events past the saved position (with an overlap window, see below) and add their
   runs to ``monitor_pending``;
2. for each pending run: load its events, receipts and run row; if it ended (and its acks had
   ``settle_s`` to arrive) or went stuck, judge it with :func:`monitor.rules.check_run` and store
   the verdict and violations; an ended run leaves ``monitor_pending``, a stuck one stays
   (flagged judged, counted by ``runwatch_monitor_stuck_runs``) until it ends;
3. save the new position.

Because the position, the pending set and the verdicts commit together, a checker stopped at
any point and started again resumes exactly: no run judged twice (``verdicts.run_id`` is the
primary key too), none skipped.

Position and concurrent writers: on PostgreSQL, ``position`` comes from a sequence, and a
transaction holding a lower position can commit after one holding a higher position. A checker
that saved the higher position would never see the lower one. So each pass re-reads the last
``overlap`` positions before the saved one: a late commit within that window is still found
(adding a run already pending is a no-op). The window is generous (default 10,000 events): a
writer would have to fall that far behind to be missed, and even then the run is found by its
later events. SQLite has one writer, so positions commit in order there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.events import now_us
from runtime.store.models import DeliveryRow, EventRow, RunRow
from runtime.store.recorder import AuditStore, StoreError, event_from_row, receipt_from_row

from .metrics import MonitorMetrics
from .models import MonitorPosition, PendingRun, VerdictRow, ViolationRow
from .rules import RuleConfig, RunFacts, RunState, Violation, check_run, run_state

__all__ = ["Checker", "CheckerConfig", "PassResult", "load_facts"]

log = logging.getLogger("runwatch.monitor")


@dataclass(frozen=True)
class CheckerConfig:
    rules: RuleConfig = field(default_factory=RuleConfig)
    #: An ended run is judged once its acks had this long to arrive.
    settle_s: float = 10.0
    batch: int = 5000
    overlap: int = 10_000
    consumer: str = "checker"


@dataclass
class PassResult:
    read: int = 0
    judged: int = 0
    failed: int = 0
    violations: int = 0
    pending: int = 0
    stuck: int = 0


async def load_facts(conn: AsyncConnection, run_id: str) -> tuple[Any, RunFacts] | None:
    """A run's row and its :class:`RunFacts` as the store holds them."""
    return (await load_many(conn, [run_id])).get(run_id)


async def load_many(conn: AsyncConnection, run_ids: list[str]) -> dict[str, tuple[Any, RunFacts]]:
    """:func:`load_facts` for many runs, three queries per chunk instead of three per run."""
    out: dict[str, tuple[Any, RunFacts]] = {}
    for i in range(0, len(run_ids), 500):
        chunk = run_ids[i : i + 500]
        runs = {
            r.run_id: r for r in await conn.execute(select(RunRow).where(RunRow.run_id.in_(chunk)))
        }
        events: dict[str, list[Any]] = {}
        for r in await conn.execute(
            select(EventRow).where(EventRow.run_id.in_(chunk)).order_by(EventRow.position)
        ):
            events.setdefault(r.run_id, []).append(r)
        receipts: dict[str, list[Any]] = {}
        for d in await conn.execute(
            select(DeliveryRow).where(DeliveryRow.run_id.in_(chunk)).order_by(DeliveryRow.id)
        ):
            receipts.setdefault(d.run_id, []).append(d)
        for run_id, run in runs.items():
            rows = events.get(run_id, [])
            out[run_id] = (
                run,
                RunFacts(
                    run_id=run_id,
                    user_id=run.user_id,
                    events=tuple(event_from_row(r) for r in rows),
                    committed_us={r.event_id: r.committed_us for r in rows},
                    live=frozenset(r.event_id for r in rows if r.live),
                    receipts=tuple(receipt_from_row(r) for r in receipts.get(run_id, [])),
                    started_us=run.created_us,
                    timeout_s=run.timeout_s,
                ),
            )
    return out


class Checker:
    """Judges runs from the store; :meth:`step` is one pass, :meth:`run` loops."""

    def __init__(
        self,
        store: AuditStore,
        metrics: MonitorMetrics,
        config: CheckerConfig | None = None,
        *,
        clock_us: Callable[[], int] = now_us,
    ) -> None:
        self.store = store
        self.metrics = metrics
        config = config or CheckerConfig()
        # An unacked live event is only "never acked" past ack_wait_s: judge no earlier.
        if config.settle_s < config.rules.ack_wait_s:
            config = dataclasses.replace(config, settle_s=config.rules.ack_wait_s)
        self.config = config
        self.clock_us = clock_us
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> PassResult:
        result = PassResult()
        now = self.clock_us()
        cfg = self.config
        async with self.store.engine.begin() as conn:
            saved = (
                await conn.execute(
                    select(MonitorPosition.position).where(MonitorPosition.consumer == cfg.consumer)
                )
            ).scalar_one_or_none()
            position = saved or 0
            rows = (
                await conn.execute(
                    select(EventRow.position, EventRow.run_id, EventRow.committed_us)
                    .where(EventRow.position > max(0, position - cfg.overlap))
                    .order_by(EventRow.position)
                    .limit(cfg.batch + cfg.overlap)
                )
            ).all()
            new_rows = [r for r in rows if r.position > position]
            result.read = len(new_rows)
            run_ids = {r.run_id for r in rows}
            if run_ids:
                judged = set(
                    (
                        await conn.execute(
                            select(VerdictRow.run_id).where(VerdictRow.run_id.in_(run_ids))
                        )
                    ).scalars()
                )
                known = set(
                    (
                        await conn.execute(
                            select(PendingRun.run_id).where(PendingRun.run_id.in_(run_ids))
                        )
                    ).scalars()
                )
                fresh = sorted(run_ids - judged - known)
                if fresh:
                    await conn.execute(
                        insert(PendingRun),
                        [{"run_id": r, "first_seen_us": now, "judged": False} for r in fresh],
                    )
            new_position = new_rows[-1].position if new_rows else position
            await self._judge_pending(conn, now, result)
            if saved is None:
                await conn.execute(
                    insert(MonitorPosition).values(
                        consumer=cfg.consumer, position=new_position, updated_us=now
                    )
                )
            else:
                await conn.execute(
                    update(MonitorPosition)
                    .where(MonitorPosition.consumer == cfg.consumer)
                    .values(position=new_position, updated_us=now)
                )
            newest = (await conn.execute(select(func.max(EventRow.position)))).scalar() or 0
            lag = 0.0
            if newest > new_position:
                oldest_unread = (
                    await conn.execute(
                        select(EventRow.committed_us)
                        .where(EventRow.position > new_position)
                        .order_by(EventRow.position)
                        .limit(1)
                    )
                ).scalar()
                lag = max(0.0, (now - (oldest_unread or now)) / 1e6)
        self.metrics.lag_seconds.set(lag)
        self.metrics.open_runs.set(result.pending - result.stuck)
        self.metrics.stuck_runs.set(result.stuck)
        self.metrics.last_check.set(time.time())
        return result

    async def _judge_pending(self, conn: AsyncConnection, now: int, result: PassResult) -> None:
        cfg = self.config
        pending = (
            await conn.execute(
                select(
                    PendingRun.run_id,
                    PendingRun.judged,
                    RunRow.ended_us,
                    RunRow.created_us,
                    RunRow.timeout_s,
                ).join(RunRow, RunRow.run_id == PendingRun.run_id, isouter=True)
            )
        ).all()
        grace_us = cfg.rules.stuck_grace_s * 1_000_000
        due: list[str] = []
        for p in pending:
            if p.created_us is None:
                continue  # events of a run the store does not know: judged when it appears
            if p.ended_us is not None:
                if p.judged:
                    # A stuck run that has ended since: judged already, leave the list.
                    await conn.execute(delete(PendingRun).where(PendingRun.run_id == p.run_id))
                    continue
                if now - p.ended_us < cfg.settle_s * 1_000_000:
                    result.pending += 1
                    continue
            elif now - p.created_us <= p.timeout_s * 1_000_000 + grace_us:
                result.pending += 1  # open, within its time
                continue
            elif p.judged:
                result.pending += 1
                result.stuck += 1
                continue
            due.append(p.run_id)
        loaded = await load_many(conn, due)
        finished: list[str] = []
        for run_id in due:
            if run_id not in loaded:
                continue
            run, facts = loaded[run_id]
            state = run_state(facts, cfg.rules, now)
            if state == RunState.OPEN:
                result.pending += 1
                continue
            await self._store_verdict(conn, run, facts, state, now, result)
            if state == RunState.STUCK:
                result.pending += 1
                result.stuck += 1
                await conn.execute(
                    update(PendingRun).where(PendingRun.run_id == run_id).values(judged=True)
                )
            else:
                finished.append(run_id)
        for i in range(0, len(finished), 500):
            await conn.execute(
                delete(PendingRun).where(PendingRun.run_id.in_(finished[i : i + 500]))
            )

    async def _store_verdict(
        self,
        conn: AsyncConnection,
        run: Any,
        facts: RunFacts,
        state: RunState,
        now: int,
        result: PassResult,
    ) -> list[Violation]:
        violations = check_run(facts, self.config.rules, now)
        verdict = "fail" if violations else "pass"
        await conn.execute(
            insert(VerdictRow).values(
                run_id=run.run_id,
                user_id=run.user_id,
                agent=run.agent,
                thread_id=run.thread_id,
                state=state.value,
                verdict=verdict,
                outcome=run.outcome,
                rules=",".join(sorted({v.rule.value for v in violations})),
                violation_count=len(violations),
                event_count=len(facts.events),
                created_us=run.created_us,
                ended_us=run.ended_us,
                judged_us=now,
            )
        )
        if violations:
            await conn.execute(
                insert(ViolationRow),
                [
                    {
                        "run_id": v.run_id,
                        "rule": v.rule.value,
                        "message": v.message,
                        "seqs": list(v.seqs),
                        "event_ids": list(v.event_ids),
                        "judged_us": now,
                    }
                    for v in violations
                ],
            )
        self.metrics.runs_checked.labels(verdict=verdict).inc()
        for v in violations:
            self.metrics.violations.labels(rule=v.rule.value).inc()
        result.judged += 1
        result.failed += bool(violations)
        result.violations += len(violations)
        return violations

    async def catch_up(self, max_passes: int = 1000) -> PassResult:
        """Pass until nothing new is read (for tests and ``runwatch check``)."""
        total = PassResult()
        for _ in range(max_passes):
            r = await self.step()
            total.read += r.read
            total.judged += r.judged
            total.failed += r.failed
            total.violations += r.violations
            total.pending, total.stuck = r.pending, r.stuck
            if r.read == 0:
                break
        return total

    # ---- the loop -----------------------------------------------------------------------

    def start(self, interval_s: float) -> None:
        self._task = asyncio.create_task(self._loop(interval_s), name="runwatch-checker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self, interval_s: float) -> None:
        while True:
            try:
                result = await self.step()
                if result.read >= self.config.batch:
                    continue  # behind: go again at once
            except StoreError as exc:
                log.warning("checker pass failed: %s", exc)
            except Exception:
                log.exception("checker pass failed")
            await asyncio.sleep(interval_s)
