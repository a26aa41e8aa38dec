"""The runwatch → AG-UI mapping, as pure code: events in, AG-UI events and snapshots out."""

from __future__ import annotations

import itertools
import json

import pytest
from ag_ui.core import BaseEvent

from runtime.agui import RunTranslator, SequenceGap, frame_id, sse_frames
from runtime.events import ErrorCode, Event
from runtime.lifecycle import RunLifecycle

T0 = 1_800_000_000_000_000


def lifecycle() -> RunLifecycle:
    clock = itertools.count(T0, 1000)
    return RunLifecycle("R", "T", "demo", lambda: next(clock))


def translator() -> RunTranslator:
    return RunTranslator(run_id="R", thread_id="T", agui_run_id="client-run")


def run(events: list[Event]) -> tuple[RunTranslator, list[BaseEvent]]:
    tr = translator()
    out: list[BaseEvent] = []
    for event in events:
        out.extend(tr.translate(event))
    return tr, out


def types(events: list[BaseEvent]) -> list[str]:
    return [e.type.value for e in events]


def texts(tr: RunTranslator) -> list[str]:
    return [m.content for m in tr.messages() if m.role == "assistant" and m.content]


def test_golden_run_maps_event_by_event() -> None:
    lc = lifecycle()
    tr, out = run(
        [
            lc.started("what is 6*7"),
            lc.thinking("Working on it."),
            lc.tool_executing("call_1", "calculator", {"expression": "6*7"}),
            lc.tool_completed("call_1", result={"value": 42}),
            lc.delta("It is "),
            lc.delta("42."),
            lc.final_report("It is 42."),
            lc.completed(),
        ]
    )
    assert types(out) == [
        "RUN_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_END",
        "REASONING_END",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    started = out[0].model_dump(by_alias=True)
    assert started["runId"] == "client-run" and started["threadId"] == "T"
    assert started["metadata"] == {"runwatch": {"run_id": "R"}}
    for event in out:
        assert event.timestamp is not None and event.timestamp >= T0 // 1000
        assert event.raw_event["run_id"] == "R" and event.raw_event["event_id"]
    result = out[9].model_dump(by_alias=True)
    assert result["toolCallId"] == "R-call_1"
    assert result["metadata"]["runwatch"]["status"] == "ok"
    assert json.loads(result["content"]) == {"value": 42}
    assert texts(tr) == ["It is 42."]
    assert tr.ended


def test_a_tool_call_closes_the_open_text_and_later_text_is_a_new_message() -> None:
    lc = lifecycle()
    tr, out = run(
        [
            lc.started("x"),
            lc.thinking("t"),
            lc.delta("Let me check. "),
            lc.tool_executing("call_1", "clock", {}),
            lc.tool_completed("call_1", result={"time": "10:00"}),
            lc.delta("It is ten."),
            lc.final_report("It is ten."),
            lc.completed(),
        ]
    )
    assert types(out)[8:11] == ["TEXT_MESSAGE_END", "TOOL_CALL_START", "TOOL_CALL_ARGS"]
    starts = [e.message_id for e in out if e.type.value == "TEXT_MESSAGE_START"]
    assert starts == ["R-m3", "R-m6"]
    # The call belongs to the text message before it; the result follows that message.
    ids = [m.id for m in tr.messages()]
    assert ids == ["R-user", "R-r2", "R-m3", "R-call_1-result", "R-m6"]
    assert texts(tr) == ["Let me check. ", "It is ten."]


@pytest.mark.parametrize(
    ("deltas", "answer", "expected", "extra"),
    [
        ([], "All done.", ["All done."], ["TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT"]),
        (["All ", "done."], "All done.", ["All done."], []),
        (["All "], "All done.", ["All done."], ["TEXT_MESSAGE_CONTENT"]),
        (["Thinking aloud."], "The answer.", ["Thinking aloud.", "The answer."], None),
        ([], "", [], []),
    ],
    ids=["not-streamed", "streamed", "streamed-then-extended", "different", "empty"],
)
def test_final_report_never_duplicates_or_reopens_streamed_text(
    deltas: list[str], answer: str, expected: list[str], extra: list[str] | None
) -> None:
    lc = lifecycle()
    tr = translator()
    for event in [lc.started("x"), lc.thinking("t"), *(lc.delta(d) for d in deltas)]:
        tr.translate(event)
    out = tr.translate(lc.final_report(answer))
    assert texts(tr) == expected
    if extra is not None:
        closing = ["TEXT_MESSAGE_END"] if expected else []
        assert types(out) == [*extra, *closing]
    starts = [e for e in out if e.type.value == "TEXT_MESSAGE_START"]
    if deltas:
        assert all(e.message_id != "R-m3" for e in starts)  # never the streamed one again


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_ends_in_run_error_with_its_code(code: ErrorCode) -> None:
    lc = lifecycle()
    tr = translator()
    tr.translate(lc.started("x"))
    tr.translate(lc.delta("partial"))
    out: list[BaseEvent] = []
    for event in lc.fail(code, "stopped"):
        out.extend(tr.translate(event))
    assert types(out)[-1] == "RUN_ERROR" and "RUN_FINISHED" not in types(out)
    assert out[-1].code == code.value
    assert out[-1].metadata == {"runwatch": {"retryable": code.retryable}}
    assert "TEXT_MESSAGE_END" in types(out)


def test_nothing_after_the_terminal_event_and_no_result_without_its_call() -> None:
    lc = lifecycle()
    tr = translator()
    started = lc.started("x")
    tr.translate(started)
    tr.translate(lc.thinking("t"))
    stray = Event(
        type=started.type.TOOL_COMPLETED,
        event_id="e2",
        run_id="R",
        thread_id="T",
        seq=3,
        ts_us=T0 + 5000,
        agent="demo",
        data={"tool_call_id": "nope", "tool": "x", "status": "ok", "duration_ms": 1},
    )
    assert tr.translate(stray) == []
    lc.seq = 3  # the stray took seq 3
    done = [lc.final_report(""), lc.completed()]
    assert types([e for event in done for e in tr.translate(event)]) == ["RUN_FINISHED"]
    after = Event(
        type=started.type.AGENT_THINKING,
        event_id="e5",
        run_id="R",
        thread_id="T",
        seq=6,
        ts_us=T0 + 9000,
        agent="demo",
        data={"step": 9, "text": "late"},
    )
    assert tr.translate(after) == []


def test_a_gap_in_seq_is_refused() -> None:
    lc = lifecycle()
    tr = translator()
    tr.translate(lc.started("x"))
    lc.thinking("skipped")
    with pytest.raises(SequenceGap, match="expected seq 2, got 3"):
        tr.translate(lc.thinking("seen"))


def test_resume_head_reopens_the_open_text_and_pending_calls() -> None:
    lc = lifecycle()
    tr, _ = run(
        [
            lc.started("two parts"),
            lc.delta("Part one. "),
            lc.tool_executing("call_1", "wait", {"seconds": 1}),
            lc.tool_executing("call_2", "clock", {}),
            lc.tool_completed("call_2", result={}),
            lc.delta("Part two"),
        ]
    )
    head = tr.resume_head([], T0 + 10_000_000)
    assert types(head) == [
        "RUN_STARTED",
        "MESSAGES_SNAPSHOT",
        "TEXT_MESSAGE_START",
        "TOOL_CALL_START",
        "TOOL_CALL_END",
    ]
    snapshot = head[1].model_dump(by_alias=True)["messages"]
    assert [m["id"] for m in snapshot] == ["R-user", "R-m2", "R-call_2-result", "R-m6"]
    assert snapshot[1]["toolCalls"][0]["function"] == {
        "name": "wait",
        "arguments": '{"seconds":1}',
    }
    assert snapshot[3]["content"] == "Part two"
    assert head[2].message_id == "R-m6"
    assert head[3].tool_call_id == "R-call_1" and head[3].parent_message_id == "R-m2"
    # A live event after the head: no second RUN_STARTED, the text continues.
    more = tr.translate(lc.delta("!"))
    assert types(more) == ["TEXT_MESSAGE_CONTENT"]


def test_resume_head_of_an_ended_run_is_its_snapshot_and_its_terminal() -> None:
    lc = lifecycle()
    earlier = [m for m in translator().messages()]
    tr, out = run(
        [
            lc.started("x"),
            lc.thinking("t"),
            lc.delta("done"),
            lc.final_report("done"),
            lc.completed(),
        ]
    )
    head = tr.resume_head(earlier, T0)
    assert types(head) == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "RUN_FINISHED"]
    assert head[-1] is out[-1]


def test_sse_frames_carry_the_run_and_seq_as_id() -> None:
    lc = lifecycle()
    tr = translator()
    text = sse_frames(tr.translate(lc.started("x")), frame_id("R", 1))
    assert text.startswith("id: R:1\ndata: {") and text.endswith("}\n\n")
    assert json.loads(text.split("data: ", 1)[1])["type"] == "RUN_STARTED"
