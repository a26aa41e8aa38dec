"""One run's event sequencing, as pure code (invariants I1 to I5 by construction).

:class:`RunLifecycle` hands out the events of one run: it assigns ``seq`` (I1), keeps ``ts``
non-decreasing (I5), tracks open tool calls (I4), counts thinking steps and the final report
(I3) and refuses anything after the terminal event (I2). A wrong transition raises
:class:`LifecycleError` ("expected X, got Y"): that is a bug in the runtime, never user input.

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    LifecycleError
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import LifecycleError
from .events import ErrorCode, Event, EventType, new_id

__all__ = ["LifecycleError", "RunLifecycle", "RunOutcome"]


class RunOutcome:
    """``runwatch_runs_finished_total{outcome}`` values."""

    COMPLETED = "completed"
    ERROR = "error"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    RUNTIME_RESTARTED = "runtime_restarted"

    ALL = (COMPLETED, ERROR, CANCELLED, TIMEOUT, RUNTIME_RESTARTED)

    @staticmethod
    def of_error(code: ErrorCode) -> str:
        if code == ErrorCode.CANCELLED:
            return RunOutcome.CANCELLED
        if code == ErrorCode.TIMEOUT:
            return RunOutcome.TIMEOUT
        if code == ErrorCode.RUNTIME_RESTARTED:
            return RunOutcome.RUNTIME_RESTARTED
        return RunOutcome.ERROR


@dataclass
class OpenToolCall:
    tool_call_id: str
    tool: str
    started_us: int


@dataclass
class RunLifecycle:
    """Sequencing state of one run. ``clock_us`` returns the wall clock in epoch microseconds."""

    run_id: str
    thread_id: str
    agent: str
    clock_us: Callable[[], int]
    seq: int = 0
    last_ts_us: int = 0
    started_us: int = 0
    thinking_steps: int = 0
    final_reports: int = 0
    terminal: Event | None = None
    open_tools: dict[str, OpenToolCall] = field(default_factory=dict)
    _used_tool_ids: set[str] = field(default_factory=set)

    @property
    def ended(self) -> bool:
        return self.terminal is not None

    @property
    def outcome(self) -> str | None:
        if self.terminal is None:
            return None
        if self.terminal.type == EventType.AGENT_COMPLETED:
            return RunOutcome.COMPLETED
        return RunOutcome.of_error(ErrorCode(self.terminal.data["code"]))

    def _next(self, kind: EventType, data: dict[str, Any]) -> Event:
        if self.terminal is not None:
            raise LifecycleError(self.run_id, "no event after the terminal one", kind.value)
        if self.seq == 0 and kind != EventType.AGENT_STARTED:
            raise LifecycleError(self.run_id, "agent_started first", kind.value)
        if self.seq > 0 and kind == EventType.AGENT_STARTED:
            raise LifecycleError(self.run_id, "one agent_started", "a second one")
        # I5: ts never decreases along seq, even if the wall clock steps back.
        ts = max(self.clock_us(), self.last_ts_us)
        self.seq += 1
        self.last_ts_us = ts
        return Event(
            type=kind,
            event_id=new_id(),
            run_id=self.run_id,
            thread_id=self.thread_id,
            seq=self.seq,
            ts_us=ts,
            agent=self.agent,
            data=data,
        )

    def started(self, input_text: str) -> Event:
        event = self._next(EventType.AGENT_STARTED, {"input": input_text})
        self.started_us = event.ts_us
        return event

    def thinking(self, text: str) -> Event:
        self.thinking_steps += 1
        return self._next(EventType.AGENT_THINKING, {"step": self.thinking_steps, "text": text})

    def delta(self, text: str) -> Event:
        return self._next(EventType.TEXT_DELTA, {"text": text})

    def tool_executing(self, tool_call_id: str, tool: str, args: dict[str, Any]) -> Event:
        # I4: tool_call_ids are unique within a run.
        if tool_call_id in self._used_tool_ids:
            raise LifecycleError(self.run_id, "a new tool_call_id", f"reused {tool_call_id!r}")
        event = self._next(
            EventType.TOOL_EXECUTING, {"tool_call_id": tool_call_id, "tool": tool, "args": args}
        )
        self._used_tool_ids.add(tool_call_id)
        self.open_tools[tool_call_id] = OpenToolCall(tool_call_id, tool, event.ts_us)
        return event

    def tool_completed(
        self,
        tool_call_id: str,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> Event:
        call = self.open_tools.get(tool_call_id)
        if call is None:
            raise LifecycleError(self.run_id, "an open tool call", f"unknown {tool_call_id!r}")
        now = max(self.clock_us(), self.last_ts_us)
        data: dict[str, Any] = {
            "tool_call_id": tool_call_id,
            "tool": call.tool,
            "status": "error" if error is not None else "ok",
            "duration_ms": round((now - call.started_us) / 1000, 3),
        }
        if error is not None:
            data["error"] = error
        else:
            data["result"] = result
        event = self._next(EventType.TOOL_COMPLETED, data)
        del self.open_tools[tool_call_id]
        return event

    def close_open_tools(self, error: str) -> list[Event]:
        """I4: every open tool call gets its ``tool_completed`` (status error), oldest first."""
        return [self.tool_completed(call_id, error=error) for call_id in list(self.open_tools)]

    def final_report(self, text: str) -> Event:
        if self.final_reports:
            raise LifecycleError(self.run_id, "one final_report", "a second one")
        self.final_reports += 1
        return self._next(EventType.FINAL_REPORT, {"text": text})

    def completed(self, usage: dict[str, Any] | None = None) -> Event:
        # I3/I4: a completed run has thought, answered, and closed every tool call.
        if self.thinking_steps == 0:
            raise LifecycleError(self.run_id, "agent_thinking before completion", "none")
        if self.final_reports != 1:
            raise LifecycleError(self.run_id, "final_report before completion", "none")
        if self.open_tools:
            raise LifecycleError(self.run_id, "no open tool call", f"{len(self.open_tools)} open")
        now = max(self.clock_us(), self.last_ts_us)
        data: dict[str, Any] = {"duration_ms": round((now - self.started_us) / 1000, 3)}
        if usage:
            data["usage"] = usage
        event = self._next(EventType.AGENT_COMPLETED, data)
        self.terminal = event
        return event

    def error(self, code: ErrorCode, message: str) -> Event:
        if self.open_tools:
            raise LifecycleError(self.run_id, "no open tool call", f"{len(self.open_tools)} open")
        event = self._next(
            EventType.AGENT_ERROR,
            {"code": code.value, "message": message, "retryable": code.retryable},
        )
        self.terminal = event
        return event

    def fail(self, code: ErrorCode, message: str) -> list[Event]:
        """Close open tool calls, then end the run with ``agent_error``: the I8 ending."""
        events = self.close_open_tools(f"{code.value}: {message}")
        events.append(self.error(code, message))
        return events

    @classmethod
    def restore(
        cls,
        run_id: str,
        thread_id: str,
        agent: str,
        events: Iterable[Event],
        clock_us: Callable[[], int],
    ) -> RunLifecycle:
        """Rebuild the state of a run from its stored events (startup recovery)."""
        lc = cls(run_id=run_id, thread_id=thread_id, agent=agent, clock_us=clock_us)
        for event in sorted(events, key=lambda e: e.seq):
            lc.seq = event.seq
            lc.last_ts_us = max(lc.last_ts_us, event.ts_us)
            if event.type == EventType.AGENT_STARTED:
                lc.started_us = event.ts_us
            elif event.type == EventType.AGENT_THINKING:
                lc.thinking_steps += 1
            elif event.type == EventType.FINAL_REPORT:
                lc.final_reports += 1
            elif event.type == EventType.TOOL_EXECUTING:
                call_id = str(event.data.get("tool_call_id"))
                lc._used_tool_ids.add(call_id)
                lc.open_tools[call_id] = OpenToolCall(
                    call_id, str(event.data.get("tool")), event.ts_us
                )
            elif event.type == EventType.TOOL_COMPLETED:
                lc.open_tools.pop(str(event.data.get("tool_call_id")), None)
            elif event.is_terminal:
                lc.terminal = event
        return lc
