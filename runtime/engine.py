"""Runs agents: the runtime, not the agent, emits every lifecycle event.

For each run the engine starts a supervisor task that emits ``agent_started`` and the systematic
``agent_thinking``, runs the agent in an inner task under the run timeout, and ends the run with
exactly one terminal event whatever happens (I2, I8): ``final_report`` + ``agent_completed``
emitted together, or ``agent_error`` with ``agent_failed``, ``timeout``, ``cancelled``,
``runtime_restarted`` or ``internal``. Tool calls go through :meth:`_Context.tool`, which emits
``tool_executing`` and, in a ``finally``, ``tool_completed`` (I4); the supervisor closes any tool
call still open before the terminal event.

Every emission goes through :meth:`Engine._emit`: the lifecycle assigns seq, ts and event_id
(I1, I5) synchronously, the envelope is serialized once, and the events go to the writer through
the run's bounded outbox (see :mod:`runtime.pipeline`); the writer commits them in groups and
hands them, committed, to the hub and the broker (I6, I7). The agent waits only when its outbox
is full, and for the commit of a ``tool_executing`` (before the tool runs) and of the terminal
event (before the run counts as finished). One emission's events are created and queued with no
await in between, so a cancel never splits them (``final_report`` + ``agent_completed``).

A run whose terminal event cannot be emitted (the supervisor failed, or the store refused the
terminal event for good) is still ended (I8): from what the store holds, as recovery would, with
``agent_error{internal}``, retried with backoff while the store is failing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .agents import AgentRegistry, ModelRound, RunTelemetry, ToolError
from .events import ErrorCode, Event, now_us
from .hub import Hub
from .lifecycle import LifecycleError, RunLifecycle, RunOutcome
from .metrics import UNKNOWN_TOOL, RuntimeMetrics
from .pipeline import Emitted, Outbox, RunSink
from .store.audit import AuditStore, RunInfo
from .store.writer import AuditWriter
from .tools import ToolArgumentError, ToolRegistry

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger("runwatch.engine")

#: An agent that never waits yields the event loop after this many emissions.
YIELD_EVERY = 64
#: How many recently started run ids the engine remembers.
STARTED_MEMORY = 10_000
#: Tries at ending a run from the store when its own terminal event failed, and the first and
#: longest pause between them (about ten seconds in all).
END_ATTEMPTS = 8
END_RETRY_S = (0.1, 5.0)


@dataclass(frozen=True)
class EngineConfig:
    run_timeout_s: float = 300.0
    tool_timeout_s: float = 60.0
    #: How long a cancelled agent gets to unwind before the run is ended without it.
    cancel_grace_s: float = 0.5
    instance_id: str = "runwatch"
    #: Events a run may have emitted and not yet handed to a commit; the agent waits beyond.
    outbox_limit: int = 1024


@dataclass
class _ActiveRun:
    info: RunInfo
    input: str
    lc: RunLifecycle
    outbox: Outbox
    #: The hub's answer to "is an owner connection watching?", valid at ``watch_version``.
    watched_here: bool = False
    watch_version: int = -1
    #: Emissions since the run's agent last gave the event loop a turn.
    unyielded: int = 0
    supervisor: asyncio.Task[None] | None = None
    inner: asyncio.Future[str] | None = None
    #: Why the run is being stopped early (cancel, timeout, shutdown), if it is.
    stop_code: ErrorCode | None = None
    finishing: bool = False
    tool_seq: int = 0


class _Context:
    """The :class:`~runtime.agents.RunContext` handed to an agent."""

    def __init__(self, engine: Engine, run: _ActiveRun) -> None:
        self._engine = engine
        self._run = run
        self.run_id = run.info.run_id
        self.thread_id = run.info.thread_id
        self.user_id = run.info.user_id
        self.agent = run.info.agent
        self.input = run.input

    async def think(self, text: str) -> None:
        await self._engine._emit(self._run, lambda lc: [lc.thinking(str(text))])

    async def delta(self, text: str) -> None:
        await self._engine._emit(self._run, lambda lc: [lc.delta(str(text))])

    def tool_schemas(self) -> list[dict[str, Any]]:
        return self._engine.tools.schemas()

    def model_round(self, report: ModelRound) -> None:
        telemetry = self._engine.telemetry
        if telemetry is not None:
            telemetry.model_round(self.run_id, report)

    async def tool(self, name: str, args: dict[str, Any] | None = None) -> Any:
        engine, run = self._engine, self._run
        args = dict(args or {})
        run.tool_seq += 1
        call_id = f"call_{run.tool_seq}"
        # The tool's side effects happen only once its tool_executing is committed (I6).
        await engine._emit(run, lambda lc: [lc.tool_executing(call_id, name, args)], durable=True)
        started = time.monotonic()
        status, error, result = "error", "cancelled", None
        try:
            tool = engine.tools.get(name)
            if tool is None:
                error = f"unknown tool {name!r}"
                raise ToolError(name, error)
            timeout = tool.timeout_s or engine.config.tool_timeout_s
            try:
                result = await asyncio.wait_for(tool.call(args), timeout)
            except TimeoutError:
                error = f"timed out after {timeout:g}s"
                raise ToolError(name, error) from None
            except ToolArgumentError as exc:
                error = str(exc)
                raise ToolError(name, error) from exc
            except (asyncio.CancelledError, ToolError):
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                raise ToolError(name, error) from exc
            status, error = "ok", ""
            return result
        finally:
            # I4: every tool_executing gets its tool_completed, also on error and cancel.
            # A tool name the agent made up is not a label value: it counts as "unknown".
            label = name if engine.tools.get(name) is not None else UNKNOWN_TOOL
            engine.metrics.tool_calls.labels(tool=label, status=status).inc()
            engine.metrics.tool_duration.labels(tool=label).observe(time.monotonic() - started)
            if status == "ok":
                await engine._emit(
                    run, lambda lc: _complete_if_open(lc, call_id, result=_jsonable(result))
                )
            else:
                await engine._emit(run, lambda lc: _complete_if_open(lc, call_id, error=error))


def _complete_if_open(
    lc: RunLifecycle, call_id: str, *, result: Any = None, error: str | None = None
) -> list[Event]:
    if call_id not in lc.open_tools or lc.ended:
        return []
    return [lc.tool_completed(call_id, result=result, error=error)]


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


class Engine:
    """Starts, cancels, times out and recovers runs."""

    def __init__(
        self,
        store: AuditStore,
        writer: AuditWriter,
        hub: Hub,
        sink: RunSink,
        metrics: RuntimeMetrics,
        agents: AgentRegistry,
        tools: ToolRegistry,
        config: EngineConfig,
        *,
        clock_us: Callable[[], int] = now_us,
        telemetry: RunTelemetry | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.hub = hub
        self.sink = sink
        self.metrics = metrics
        self.agents = agents
        self.tools = tools
        self.config = config
        self.clock_us = clock_us
        #: Where agents' model rounds go (the run tracer); None when tracing is off.
        self.telemetry = telemetry
        self.active: dict[str, _ActiveRun] = {}
        self.accepting = True
        #: Runs this engine started lately (a retried chat never starts one twice).
        self._started: set[str] = set()
        self._started_order: deque[str] = deque()

    # ---- emission -----------------------------------------------------------------------

    async def _emit(
        self,
        run: _ActiveRun,
        make: Callable[[RunLifecycle], list[Event]],
        *,
        durable: bool = False,
    ) -> None:
        """Emit the events ``make`` creates; with ``durable``, return once they are committed.

        The wait for outbox space comes before the events exist, so a cancel there emits
        nothing; once created, the events are queued with no await in between."""
        if run.outbox.full:
            await run.outbox.wait_space()
            run.unyielded = 0
        elif run.unyielded >= YIELD_EVERY:
            # An agent emitting in a tight loop still lets the loop breathe: other users'
            # sends, client frames (a cancel) and the writer get their turn.
            run.unyielded = 0
            await asyncio.sleep(0)
        run.unyielded += 1
        last: Emitted | None = None
        live = self._watched(run)
        for event in make(run.lc):
            last = self._submit(event, run.info.user_id, run.outbox, live)
        if durable and last is not None:
            last.durable = asyncio.get_running_loop().create_future()
            # Shielded: a cancel of the waiter leaves the event queued for its commit.
            await asyncio.shield(last.durable)

    def _watched(self, run: _ActiveRun) -> bool:
        """Whether an owner connection watches the run (its events are sent live), with this
        replica's answer kept until a subscription changes anywhere in the hub."""
        hub = self.hub
        if run.watch_version != hub.version:
            run.watched_here = hub.watched_here(run.info.run_id, run.info.user_id)
            run.watch_version = hub.version
        if run.watched_here:
            return True
        return hub.remote is not None and hub.remote.owner_elsewhere(run.info.user_id)

    def _submit(self, event: Event, owner: str, outbox: Outbox | None, live: bool) -> Emitted:
        # Counted (emitted, deferred) by the writer as it takes the event into a batch.
        item = Emitted.of(event, owner, live, outbox)
        if outbox is not None:
            outbox.add()
        self.writer.submit(item)
        return item

    # ---- runs ---------------------------------------------------------------------------

    def start(self, info: RunInfo, text: str) -> bool:
        """Start a run that the store already holds. The owner's connections are subscribed
        before the first event is emitted, so every open tab sees the whole run. A run is
        started once: False when this engine already started it."""
        if info.run_id in self._started:
            return False
        self._started.add(info.run_id)
        self._started_order.append(info.run_id)
        if len(self._started_order) > STARTED_MEMORY:
            self._started.discard(self._started_order.popleft())
        lc = RunLifecycle(
            run_id=info.run_id, thread_id=info.thread_id, agent=info.agent, clock_us=self.clock_us
        )
        run = _ActiveRun(info=info, input=text, lc=lc, outbox=Outbox(self.config.outbox_limit))
        self.active[info.run_id] = run
        self.sink.run_started(info.run_id, info.user_id)
        self.metrics.runs_started.labels(agent=info.agent).inc()
        run.supervisor = asyncio.create_task(self._supervise(run), name=f"run-{info.run_id}")
        return True

    def cancel(self, run_id: str, code: ErrorCode = ErrorCode.CANCELLED) -> bool:
        """Stop a running run; False when it is not running here or is already finishing."""
        run = self.active.get(run_id)
        if run is None or run.finishing or run.stop_code is not None:
            return run is not None
        run.stop_code = code
        if run.inner is not None:
            run.inner.cancel()
        return True

    async def _supervise(self, run: _ActiveRun) -> None:
        info = run.info
        started = time.monotonic()
        try:
            await self._emit(run, lambda lc: [lc.started(run.input)])
            # The runtime's systematic thinking step: every run shows one (I3).
            await self._emit(
                run, lambda lc: [lc.thinking(f"Working on it with the {info.agent} agent.")]
            )
            code, message, answer = await self._run_agent(run, started)
            run.finishing = True
            # The terminal event is committed before the run counts as finished (I8).
            if code is None:
                await self._emit(
                    run,
                    lambda lc: [
                        *lc.close_open_tools("ended"),
                        lc.final_report(answer),
                        lc.completed(),
                    ],
                    durable=True,
                )
            else:
                await self._emit(run, lambda lc: lc.fail(code, message), durable=True)
        except Exception:
            log.exception("run %s: internal error", info.run_id)
            await self._end_after_failure(run)
        finally:
            self.active.pop(info.run_id, None)
            outcome = run.lc.outcome or RunOutcome.ERROR
            self.metrics.runs_finished.labels(agent=info.agent, outcome=outcome).inc()
            self.metrics.run_duration.labels(agent=info.agent).observe(time.monotonic() - started)

    async def _run_agent(
        self, run: _ActiveRun, started: float
    ) -> tuple[ErrorCode | None, str, str]:
        """Run the agent; returns (error code or None, error message, answer)."""
        agent = self.agents.get(run.info.agent)
        if agent is None:
            return ErrorCode.AGENT_FAILED, f"unknown agent {run.info.agent!r}", ""
        if run.stop_code is not None:
            return run.stop_code, _STOP_MESSAGES[run.stop_code], ""
        run.inner = asyncio.ensure_future(agent(_Context(self, run)))
        remaining = run.info.timeout_s - (time.monotonic() - started)
        done, _ = await asyncio.wait({run.inner}, timeout=max(0.0, remaining))
        if not done:
            if run.stop_code is None:
                run.stop_code = ErrorCode.TIMEOUT
            run.inner.cancel()
        if run.stop_code is not None:
            # Give the agent a moment to unwind (its tool calls emit their completions).
            await asyncio.wait({run.inner}, timeout=self.config.cancel_grace_s)
            message = _STOP_MESSAGES[run.stop_code]
            if run.stop_code == ErrorCode.TIMEOUT:
                message = f"the run exceeded its {run.info.timeout_s:g}s timeout"
            return run.stop_code, message, ""
        try:
            answer = run.inner.result()
        except asyncio.CancelledError:
            return ErrorCode.CANCELLED, _STOP_MESSAGES[ErrorCode.CANCELLED], ""
        except LifecycleError:
            raise
        except Exception as exc:
            log.info("run %s: agent raised %r", run.info.run_id, exc)
            return (
                ErrorCode.AGENT_FAILED,
                f"the agent failed: {type(exc).__name__}: {exc}"[:500],
                "",
            )
        return None, "", str(answer if answer is not None else "")

    # ---- recovery and shutdown ----------------------------------------------------------

    async def _end_after_failure(self, run: _ActiveRun) -> None:
        """I8: end a run whose supervisor failed. First with ``agent_error{internal}`` through
        its own lifecycle; when that cannot be emitted, or the lifecycle has ended already but
        its terminal event never reached the store (refused for good), from what the store
        holds, as recovery would, retried with backoff. Only when every try fails is the run
        left to recovery at the next start (or to a survivor's takeover), and that is logged."""
        info = run.info
        if not run.lc.ended:
            try:
                await self._emit(
                    run, lambda lc: lc.fail(ErrorCode.INTERNAL, _INTERNAL_MESSAGE), durable=True
                )
                return
            except Exception:
                log.exception("run %s: ending it with agent_error{internal} failed", info.run_id)
        delay, longest = END_RETRY_S
        for attempt in range(1, END_ATTEMPTS + 1):
            try:
                # Read the store only once it holds every event written so far (I6).
                await self.writer.wait_journal_drained()
                run.lc, _ = await self._end_from_store(info, ErrorCode.INTERNAL, _INTERNAL_MESSAGE)
            except Exception as exc:
                if attempt == END_ATTEMPTS:
                    log.error(
                        "run %s: could not be ended (%s); it stays open until recovery at the "
                        "next start or a takeover ends it",
                        info.run_id,
                        exc,
                    )
                    return
                log.warning(
                    "run %s: ending it from the store failed (%s); retrying in %.1fs",
                    info.run_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
                continue
            log.warning("run %s: ended from the store with agent_error{internal}", info.run_id)
            return

    async def _end_from_store(
        self, info: RunInfo, code: ErrorCode, message: str
    ) -> tuple[RunLifecycle, bool]:
        """End a run from its stored events: ``agent_started`` when it has none, its open tool
        calls closed, ``agent_error{code}``; returns once that is committed. Returns the run's
        lifecycle as the store now holds it, and False when it had ended already (nothing was
        written)."""
        events = await self.store.run_events(info.run_id)
        lc = RunLifecycle.restore(info.run_id, info.thread_id, info.agent, events, self.clock_us)
        if lc.ended:
            return lc, False
        new = [lc.started("")] if lc.seq == 0 else []
        new.extend(lc.fail(code, message))
        live = self.hub.is_watched(info.run_id, info.user_id)
        items = [self._submit(event, info.user_id, None, live) for event in new]
        items[-1].durable = asyncio.get_running_loop().create_future()
        await items[-1].durable
        return lc, True

    async def recover(self, instance_id: str | None = None) -> int:
        """I8: end every run left open by a crash with ``agent_error{runtime_restarted}``."""
        count = 0
        for info in await self.store.open_runs(instance_id):
            if info.run_id in self.active:
                continue
            _, ended = await self._end_from_store(
                info,
                ErrorCode.RUNTIME_RESTARTED,
                "the runtime restarted while this run was in progress",
            )
            if ended:
                self.metrics.runs_finished.labels(
                    agent=info.agent, outcome=RunOutcome.RUNTIME_RESTARTED
                ).inc()
                count += 1
        if count:
            log.warning("recovered %d run(s) left open: ended with runtime_restarted", count)
        return count

    async def drain(self, drain_s: float) -> int:
        """Stop accepting; give running runs ``drain_s`` to finish, then end the rest with
        ``runtime_restarted``. Returns how many were ended that way."""
        self.accepting = False
        tasks = [r.supervisor for r in self.active.values() if r.supervisor is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        left = list(self.active.values())
        for run in left:
            self.cancel(run.info.run_id, ErrorCode.RUNTIME_RESTARTED)
        tasks = [r.supervisor for r in left if r.supervisor is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        return len(left)


_INTERNAL_MESSAGE = "internal error"
_STOP_MESSAGES = {
    ErrorCode.CANCELLED: "the run was cancelled",
    ErrorCode.TIMEOUT: "the run timed out",
    ErrorCode.RUNTIME_RESTARTED: "the runtime is restarting",
    ErrorCode.INTERNAL: _INTERNAL_MESSAGE,
    ErrorCode.AGENT_FAILED: "the agent failed",
}
