"""An independent oracle for I1-I5 over one run's event stream, for the runtime's tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from runtime.events import ErrorCode, Event, EventType


def violations(events: Sequence[Event]) -> list[str]:
    """Every broken invariant of a finished run's events (in the order received)."""
    out: list[str] = []
    if not events:
        return ["no events"]
    seqs = [e.seq for e in events]
    if seqs != list(range(1, len(events) + 1)):
        out.append(f"I1: seqs not contiguous from 1: {seqs}")
    if events[0].type != EventType.AGENT_STARTED:
        out.append("I1: seq 1 is not agent_started")
    if sum(e.type == EventType.AGENT_STARTED for e in events) != 1:
        out.append("I1: not exactly one agent_started")
    terminals = [e for e in events if e.is_terminal]
    if len(terminals) != 1 or not events[-1].is_terminal:
        out.append(f"I2: terminals {[e.seq for e in terminals]}, last is {events[-1].type}")
    last = events[-1]
    if last.type == EventType.AGENT_COMPLETED:
        finals = [e for e in events if e.type == EventType.FINAL_REPORT]
        if not any(e.type == EventType.AGENT_THINKING for e in events):
            out.append("I3: completed without agent_thinking")
        if len(finals) != 1:
            out.append(f"I3: {len(finals)} final_report")
    if last.type == EventType.AGENT_ERROR:
        code = ErrorCode(last.data["code"])
        if last.data["retryable"] != code.retryable:
            out.append("agent_error.retryable does not match its code")
    open_calls: dict[str, Event] = {}
    seen_ids: set[str] = set()
    for e in events:
        if e.type == EventType.TOOL_EXECUTING:
            call_id = e.data["tool_call_id"]
            if call_id in seen_ids:
                out.append(f"I4: tool_call_id {call_id} reused")
            seen_ids.add(call_id)
            open_calls[call_id] = e
        elif e.type == EventType.TOOL_COMPLETED:
            if open_calls.pop(e.data["tool_call_id"], None) is None:
                out.append(f"I4: tool_completed without tool_executing at seq {e.seq}")
            if e.data["status"] not in ("ok", "error"):
                out.append(f"I4: bad status at seq {e.seq}")
    if open_calls:
        out.append(f"I4: tool calls never completed: {sorted(open_calls)}")
    for a, b in itertools.pairwise(events):
        if b.ts_us < a.ts_us:
            out.append(f"I5: ts decreases at seq {b.seq}")
    return out


def assert_valid(events: Sequence[Event]) -> None:
    problems = violations(events)
    assert not problems, problems
