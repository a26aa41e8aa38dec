"""Run sequencing as pure code: I1 to I5 by construction."""

from __future__ import annotations

import itertools

import pytest

from runtime.events import ErrorCode, EventType
from runtime.lifecycle import LifecycleError, RunLifecycle

from .invariants import assert_valid


def make(clock: list[int] | None = None) -> RunLifecycle:
    ticks = iter(clock) if clock is not None else itertools.count(1_000_000, 10)
    return RunLifecycle(run_id="r", thread_id="t", agent="demo", clock_us=lambda: next(ticks))


def test_completed_run_is_valid() -> None:
    lc = make()
    events = [
        lc.started("hi"),
        lc.thinking("a"),
        lc.tool_executing("c1", "calculator", {"expression": "1+1"}),
        lc.tool_executing("c2", "clock", {}),
        lc.tool_completed("c2", result={}),
        lc.tool_completed("c1", result={"value": 2}),
        lc.final_report("2"),
        lc.completed(),
    ]
    assert_valid(events)
    assert [e.seq for e in events] == list(range(1, 9))
    assert lc.outcome == "completed"
    assert events[2].data == {
        "tool_call_id": "c1",
        "tool": "calculator",
        "args": {"expression": "1+1"},
    }
    assert events[5].data["status"] == "ok"


def test_ts_never_decreases_when_the_clock_steps_back() -> None:
    lc = make([5_000_000, 4_000_000, 3_000_000, 6_000_000, 1, 2])
    events = [lc.started("x"), lc.thinking("a"), lc.thinking("b"), lc.final_report("r")]
    events.append(lc.completed())
    assert [e.ts_us for e in events] == [5_000_000, 5_000_000, 5_000_000, 6_000_000, 6_000_000]


def test_nothing_after_the_terminal_event() -> None:
    lc = make()
    lc.started("x")
    lc.error(ErrorCode.CANCELLED, "bye")
    with pytest.raises(LifecycleError, match="expected no event after the terminal one"):
        lc.thinking("late")


def test_first_event_must_be_started() -> None:
    with pytest.raises(LifecycleError, match="expected agent_started first, got agent_thinking"):
        make().thinking("x")


def test_completion_requires_thinking_answer_and_closed_tools() -> None:
    lc = make()
    lc.started("x")
    with pytest.raises(LifecycleError):
        lc.completed()
    lc.thinking("t")
    lc.tool_executing("c1", "wait", {})
    lc.final_report("r")
    with pytest.raises(LifecycleError, match="no open tool call"):
        lc.completed()


def test_fail_closes_every_open_tool_call_first() -> None:
    lc = make()
    events = [lc.started("x"), lc.thinking("t")]
    events.append(lc.tool_executing("c1", "wait", {"seconds": 5}))
    events.append(lc.tool_executing("c2", "clock", {}))
    events.extend(lc.fail(ErrorCode.CANCELLED, "the run was cancelled"))
    assert_valid(events)
    assert [e.type for e in events[-3:]] == [
        EventType.TOOL_COMPLETED,
        EventType.TOOL_COMPLETED,
        EventType.AGENT_ERROR,
    ]
    assert all(e.data["status"] == "error" for e in events[-3:-1])
    assert events[-1].data == {
        "code": "cancelled",
        "message": "the run was cancelled",
        "retryable": False,
    }
    assert lc.outcome == "cancelled"


def test_tool_call_ids_are_unique() -> None:
    lc = make()
    lc.started("x")
    lc.tool_executing("c1", "clock", {})
    lc.tool_completed("c1", result=None)
    with pytest.raises(LifecycleError, match="reused"):
        lc.tool_executing("c1", "clock", {})


def test_restore_rebuilds_open_tool_calls() -> None:
    lc = make()
    events = [lc.started("x"), lc.thinking("t"), lc.tool_executing("c1", "wait", {})]
    restored = RunLifecycle.restore("r", "t", "demo", events, lambda: 9_000_000)
    tail = restored.fail(ErrorCode.RUNTIME_RESTARTED, "restarted")
    assert_valid(events + tail)
    assert tail[-1].data["retryable"] is True


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (ErrorCode.AGENT_FAILED, False),
        (ErrorCode.TIMEOUT, True),
        (ErrorCode.CANCELLED, False),
        (ErrorCode.RUNTIME_RESTARTED, True),
        (ErrorCode.INTERNAL, True),
    ],
)
def test_retryable_follows_the_code(code: ErrorCode, retryable: bool) -> None:
    assert code.retryable is retryable
