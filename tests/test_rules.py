"""The rule engine, pure: a unit test per rule, and generated runs with one mutation each."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.rules import Rule, RuleConfig, RunFacts, RunState, check_run, run_state
from runtime.events import ErrorCode, Event, EventType, Receipt
from runtime.lifecycle import RunLifecycle

T0 = 1_800_000_000_000_000
CFG = RuleConfig(delivery_slo_s=1.0, run_timeout_s=300, stuck_grace_s=60, ack_wait_s=30)
LATER = T0 + 3_600_000_000  # judged an hour later: nothing is in flight any more


def lifecycle(run_id: str = "r1", step_us: int = 1000) -> RunLifecycle:
    clock = itertools.count(T0, step_us)
    return RunLifecycle(run_id, "t1", "demo", lambda: next(clock))


def facts_for(
    events: list[Event],
    *,
    owner: str = "alice",
    ack_delay_us: int = 5_000,
    deliver_to: Callable[[Event], list[str]] | None = None,
) -> RunFacts:
    """Stored facts of a healthy delivery: each event committed 1 ms after emission, sent
    1 ms later to one owner connection, acked ``ack_delay_us`` after emission."""
    receipts = []
    for e in events:
        for user in deliver_to(e) if deliver_to else [owner]:
            receipts.append(
                Receipt(
                    e.event_id,
                    e.run_id,
                    e.seq,
                    f"c-{user}",
                    user,
                    e.ts_us + 2000,
                    e.ts_us + ack_delay_us,
                )
            )
    return RunFacts(
        run_id=events[0].run_id if events else "r1",
        user_id=owner,
        events=tuple(events),
        committed_us={e.event_id: e.ts_us + 1000 for e in events},
        live=frozenset(e.event_id for e in events),
        receipts=tuple(receipts),
        started_us=T0,
    )


def completed_run() -> list[Event]:
    lc = lifecycle()
    return [
        lc.started("what is 6*7"),
        lc.thinking("working"),
        lc.tool_executing("c1", "calculator", {"expression": "6*7"}),
        lc.tool_completed("c1", result={"value": 42}),
        lc.final_report("42"),
        lc.completed(),
    ]


def rules_of(facts: RunFacts, now: int = LATER) -> set[Rule]:
    return {v.rule for v in check_run(facts, CFG, now)}


def test_a_healthy_run_has_no_violation() -> None:
    assert check_run(facts_for(completed_run()), CFG, LATER) == []


def test_started() -> None:
    events = completed_run()
    assert rules_of(facts_for(events[1:])) >= {Rule.STARTED}
    second = dataclasses.replace(events[0], event_id="dup-start", seq=7)
    found = check_run(facts_for([*events, second]), CFG, LATER)
    assert any(v.rule == Rule.STARTED and "second agent_started" in v.message for v in found)
    assert check_run(RunFacts("r9", "alice", ()), CFG, LATER)[0].rule == Rule.STARTED


def test_sequence_gap_duplicate_reorder_and_time() -> None:
    events = completed_run()
    gap = check_run(facts_for(events[:2] + events[3:]), CFG, LATER)
    assert any(v.rule == Rule.SEQUENCE and "seq 3 missing" in v.message for v in gap)
    dup = dataclasses.replace(events[1], event_id="other")
    assert Rule.SEQUENCE in rules_of(facts_for([*events[:2], dup, *events[2:]]))
    swapped = [events[0], events[2], events[1], *events[3:]]
    found = check_run(facts_for(swapped), CFG, LATER)
    assert [v.rule for v in found] == [Rule.SEQUENCE]
    back = dataclasses.replace(events[2], ts_us=events[1].ts_us - 10)
    assert Rule.SEQUENCE in rules_of(facts_for([*events[:2], back, *events[3:]]))


def test_terminal() -> None:
    events = completed_run()
    lc = lifecycle()
    extra = dataclasses.replace(
        events[1], seq=7, event_id="late", ts_us=events[-1].ts_us + 1, data={"step": 9, "text": "x"}
    )
    found = check_run(facts_for([*events, extra]), CFG, LATER)
    assert [v.rule for v in found] == [Rule.TERMINAL]
    assert "after the terminal event" in found[0].message
    lc = lifecycle()
    err = [lc.started("x"), *lc.fail(ErrorCode.TIMEOUT, "slow")]
    bad = dataclasses.replace(err[-1], data={**err[-1].data, "retryable": False})
    assert rules_of(facts_for([err[0], bad])) == {Rule.TERMINAL}


def test_no_terminal_is_open_then_stuck() -> None:
    events = completed_run()[:3]
    facts = facts_for(events)
    assert run_state(facts, CFG, T0 + 10_000_000) == RunState.OPEN
    assert run_state(facts, CFG, LATER) == RunState.STUCK
    assert rules_of(facts, LATER) == {Rule.STUCK, Rule.TOOL_PAIRING}
    assert rules_of(facts_for(completed_run()[:2]), LATER) == {Rule.STUCK}


def test_thinking_and_final_report() -> None:
    events = completed_run()
    no_thinking = [events[0], *[dataclasses.replace(e, seq=e.seq - 1) for e in events[2:]]]
    assert rules_of(facts_for(no_thinking)) == {Rule.THINKING}
    no_final = [*events[:4], dataclasses.replace(events[5], seq=5)]
    assert rules_of(facts_for(no_final)) == {Rule.FINAL_REPORT}
    two = [
        *events[:5],
        dataclasses.replace(events[4], event_id="f2", seq=6),
        dataclasses.replace(events[5], seq=7),
    ]
    assert rules_of(facts_for(two)) == {Rule.FINAL_REPORT}


def test_tool_pairing() -> None:
    lc = lifecycle()
    events = [lc.started("x"), lc.thinking("t"), lc.tool_executing("c1", "wait", {})]
    events += [lc.final_report("r")]
    lc.open_tools.clear()
    events.append(lc.completed())
    found = check_run(facts_for(events), CFG, LATER)
    assert [v.rule for v in found] == [Rule.TOOL_PAIRING]
    assert "never completed" in found[0].message
    orphan = dataclasses.replace(
        completed_run()[3], data={"tool_call_id": "zz", "tool": "x", "status": "ok"}
    )
    base = completed_run()
    assert Rule.TOOL_PAIRING in rules_of(facts_for([*base[:3], orphan, *base[4:]]))


def test_persisted() -> None:
    events = completed_run()
    facts = facts_for(events)
    early = [
        dataclasses.replace(r, sent_us=r.sent_us - 5000) if r.seq == 2 else r
        for r in facts.receipts
    ]
    assert rules_of(dataclasses.replace(facts, receipts=tuple(early))) == {Rule.PERSISTED}
    ghost = Receipt("ghost", "r1", 9, "c-alice", "alice", T0, T0 + 10)
    assert rules_of(dataclasses.replace(facts, receipts=(*facts.receipts, ghost))) == {
        Rule.PERSISTED
    }


def test_isolation() -> None:
    events = completed_run()
    facts = facts_for(events, deliver_to=lambda e: ["alice", "bob"] if e.seq == 3 else ["alice"])
    found = check_run(facts, CFG, LATER)
    assert [v.rule for v in found] == [Rule.ISOLATION]
    assert "'bob'" in found[0].message and found[0].seqs == (3,)


def test_delivery_slo_late_missing_and_deferred() -> None:
    events = completed_run()
    late = facts_for(events, ack_delay_us=1_500_000)
    found = check_run(late, CFG, LATER)
    assert [v.rule for v in found] == [Rule.DELIVERY_SLO] and "later than 1s" in found[0].message
    unacked = dataclasses.replace(
        facts_for(events),
        receipts=tuple(dataclasses.replace(r, acked_us=None) for r in facts_for(events).receipts),
    )
    assert rules_of(unacked) == {Rule.DELIVERY_SLO}
    # Still in flight shortly after emission: not judged yet.
    assert rules_of(unacked, now=T0 + 1_000_000) == set()
    # Deferred events (no live owner connection) are outside the SLI.
    assert rules_of(dataclasses.replace(unacked, live=frozenset())) == set()


def test_delivery_slo_flags_a_gap_the_client_never_received() -> None:
    """Issue #11 item 4: seqs lost between replicas (never written to the owner's socket, so
    no receipt) are live events never acked, even when the client acked the seqs around them;
    a run that never arrived at all is flagged too."""
    events = completed_run()
    received = facts_for(events, deliver_to=lambda e: [] if e.seq in (3, 4) else ["alice"])
    found = [v for v in check_run(received, CFG, LATER) if v.rule == Rule.DELIVERY_SLO]
    assert (
        len(found) == 1
        and found[0].seqs == (3, 4)
        and "2 live event(s) never acked" in (found[0].message)
    )
    never = facts_for(events, deliver_to=lambda e: [])
    assert rules_of(never) == {Rule.DELIVERY_SLO}


# ---- generated runs -------------------------------------------------------------------


@st.composite
def valid_runs(draw: st.DrawFn) -> RunFacts:
    lc = lifecycle(step_us=draw(st.integers(min_value=0, max_value=50_000)))
    events = [lc.started(draw(st.text(max_size=20))), lc.thinking("t")]
    open_calls: list[str] = []
    for i in range(draw(st.integers(min_value=0, max_value=6))):
        action = draw(st.sampled_from(["call", "finish", "think", "delta"]))
        if action == "call":
            events.append(lc.tool_executing(f"c{i}", "clock", {}))
            open_calls.append(f"c{i}")
        elif action == "finish" and open_calls:
            call = open_calls.pop(draw(st.integers(0, len(open_calls) - 1)))
            ok = draw(st.booleans())
            events.append(
                lc.tool_completed(call, result=1) if ok else lc.tool_completed(call, error="x")
            )
        elif action == "think":
            events.append(lc.thinking("more"))
        else:
            events.append(lc.delta("chunk"))
    ending = draw(st.sampled_from(["completed", *list(ErrorCode)]))
    if ending == "completed":
        events += lc.close_open_tools("ended")
        events += [lc.final_report("answer"), lc.completed()]
    else:
        events += lc.fail(ErrorCode(ending), "stopped")
    tabs = draw(st.lists(st.sampled_from(["alice"]), min_size=1, max_size=3))
    receipts = []
    for n, _tab in enumerate(tabs):
        for e in events:
            receipts.append(
                Receipt(
                    e.event_id,
                    e.run_id,
                    e.seq,
                    f"c{n}",
                    "alice",
                    e.ts_us + 2000,
                    e.ts_us + draw(st.integers(3000, 900_000)),
                )
            )
    return RunFacts(
        run_id="r1",
        user_id="alice",
        events=tuple(events),
        committed_us={e.event_id: e.ts_us + 1000 for e in events},
        live=frozenset(e.event_id for e in events),
        receipts=tuple(receipts),
        started_us=T0,
    )


@settings(max_examples=200, deadline=None)
@given(valid_runs())
def test_valid_runs_have_no_violation(facts: RunFacts) -> None:
    assert check_run(facts, CFG, LATER) == []


def _renumber(events: list[Event]) -> tuple[Event, ...]:
    return tuple(dataclasses.replace(e, seq=i + 1) for i, e in enumerate(events))


@settings(max_examples=150, deadline=None)
@given(valid_runs(), st.data())
def test_each_mutation_is_caught_by_its_rule(facts: RunFacts, data: st.DataObject) -> None:
    events = list(facts.events)
    kind = data.draw(
        st.sampled_from(
            [
                "drop",
                "duplicate",
                "reorder",
                "drop_terminal",
                "open_tool",
                "leak",
                "late_ack",
                "early_send",
            ]
        )
    )
    if kind == "drop":
        i = data.draw(st.integers(1, len(events) - 2))
        mutated = dataclasses.replace(facts, events=tuple(events[:i] + events[i + 1 :]))
        assert Rule.SEQUENCE in rules_of(mutated)
    elif kind == "duplicate":
        i = data.draw(st.integers(0, len(events) - 1))
        dup = dataclasses.replace(events[i], event_id=events[i].event_id + "-dup")
        mutated = dataclasses.replace(facts, events=(*events, dup))
        assert Rule.SEQUENCE in rules_of(mutated)
    elif kind == "reorder":
        i = data.draw(st.integers(0, len(events) - 2))
        swapped = events[:i] + [events[i + 1], events[i]] + events[i + 2 :]
        mutated = dataclasses.replace(facts, events=tuple(swapped))
        assert rules_of(mutated) == {Rule.SEQUENCE}
    elif kind == "drop_terminal":
        mutated = dataclasses.replace(facts, events=tuple(events[:-1]))
        assert run_state(mutated, CFG, T0 + 1_000_000) == RunState.OPEN
        assert Rule.STUCK in rules_of(mutated, LATER)
    elif kind == "open_tool":
        done = [i for i, e in enumerate(events) if e.type == EventType.TOOL_COMPLETED]
        if not done:
            return
        i = data.draw(st.sampled_from(done))
        kept = _renumber(events[:i] + events[i + 1 :])
        seq_of = {e.event_id: e.seq for e in kept}
        receipts = tuple(
            dataclasses.replace(r, seq=seq_of[r.event_id])
            for r in facts.receipts
            if r.event_id in seq_of
        )
        mutated = dataclasses.replace(facts, events=kept, receipts=receipts)
        assert rules_of(mutated) == {Rule.TOOL_PAIRING}
    elif kind == "leak":
        r = data.draw(st.sampled_from(facts.receipts))
        leaked = dataclasses.replace(r, connection_id="evil", user_id="mallory")
        mutated = dataclasses.replace(facts, receipts=(*facts.receipts, leaked))
        assert rules_of(mutated) == {Rule.ISOLATION}
    elif kind == "late_ack":
        e = data.draw(st.sampled_from(events))
        receipts = tuple(
            dataclasses.replace(r, acked_us=e.ts_us + 1_500_000) if r.event_id == e.event_id else r
            for r in facts.receipts
        )
        assert rules_of(dataclasses.replace(facts, receipts=receipts)) == {Rule.DELIVERY_SLO}
    else:
        e = data.draw(st.sampled_from(events))
        receipts = tuple(
            dataclasses.replace(r, sent_us=e.ts_us) if r.event_id == e.event_id else r
            for r in facts.receipts
        )
        assert rules_of(dataclasses.replace(facts, receipts=receipts)) == {Rule.PERSISTED}
