"""The rule engine: one run's stored events and delivery receipts in, violations out (pure).

Each rule checks one invariant and owns one kind of fault, so a fault is reported once, by the
rule that explains it:

=================  ==========================================================================
``started``        I1 head: seq 1 is ``agent_started``; no second start; nothing before it
``sequence``       I1, I5: seqs contiguous from 1, no duplicates, store order follows seq,
                   ``ts`` never decreases, every event names this run
``terminal``       I2: an ended run has exactly one terminal event and it is the last; the
                   error code is known and ``retryable`` matches it
``thinking``       I3: a completed run thought at least once before completing
``final_report``   I3: a completed run has exactly one ``final_report`` before completing
``tool_pairing``   I4: every ``tool_executing`` has one later ``tool_completed`` before the
                   terminal event, ids unique, no completion without its call, status valid
``persisted``      I6: every delivered event is in the store, committed before it was sent
``isolation``      I7: every delivery went to a connection of the run's owner
``stuck``          I8: a run open past its timeout plus grace
``delivery_slo``   every event emitted while an owner connection was live was acked in time
=================  ==========================================================================

These include the checks of AG-UI's client-side verifier (no event after the terminal one:
``terminal``; no second start: ``started``; no end without start: ``started``; no finish while
a tool call is open: ``tool_pairing``), and what it cannot see: a run that never ends, gaps and
duplicates, late or missing delivery, delivery to another user.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from runtime.events import TERMINAL_TYPES, ErrorCode, Event, EventType, Receipt
from runtime.metrics import DELIVERY_SLO_S

if TYPE_CHECKING:
    from runtime.config import Settings

__all__ = [
    "JUDGED_STATES",
    "Rule",
    "RuleConfig",
    "RunFacts",
    "RunState",
    "Verdict",
    "Violation",
    "check_run",
    "first_acks",
    "rule_config",
    "run_state",
]


class Rule(StrEnum):
    """The rules, by the name every output uses (API, UI, metrics, ``runwatch check``)."""

    STARTED = "started"
    SEQUENCE = "sequence"
    TERMINAL = "terminal"
    THINKING = "thinking"
    FINAL_REPORT = "final_report"
    TOOL_PAIRING = "tool_pairing"
    PERSISTED = "persisted"
    ISOLATION = "isolation"
    STUCK = "stuck"
    DELIVERY_SLO = "delivery_slo"

    @property
    def meaning(self) -> str:
        """What a violation of this rule means, in a line for an operator."""
        return _MEANINGS[self]


_MEANINGS = {
    Rule.STARTED: "a run did not begin with agent_started (I1)",
    Rule.SEQUENCE: "gaps, duplicates or disorder in seq, or time going back (I1, I5)",
    Rule.TERMINAL: "no single terminal event at the end (I2)",
    Rule.THINKING: "a completed run never showed thinking (I3)",
    Rule.FINAL_REPORT: "a completed run without exactly one answer (I3)",
    Rule.TOOL_PAIRING: "a tool call that never completed, or a completion without a call (I4)",
    Rule.PERSISTED: "an event delivered that the store does not hold, or before its commit (I6)",
    Rule.ISOLATION: "an event delivered to another user (I7): critical",
    Rule.STUCK: "a run that never ended (I8)",
    Rule.DELIVERY_SLO: "an event acked late or never by a live owner connection",
}


class RunState(StrEnum):
    OPEN = "open"
    ENDED = "ended"
    STUCK = "stuck"


#: The states of a judged run (an open run has no verdict).
JUDGED_STATES: tuple[str, ...] = (RunState.ENDED.value, RunState.STUCK.value)


class Verdict(StrEnum):
    """A judged run passes every rule or fails at least one."""

    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule in one run: which events, and why."""

    rule: Rule
    run_id: str
    message: str
    seqs: tuple[int, ...] = ()
    event_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.value,
            "run_id": self.run_id,
            "message": self.message,
            "seqs": list(self.seqs),
            "event_ids": list(self.event_ids),
        }

    def __str__(self) -> str:
        return f"{self.rule.value}: {self.message}"


@dataclass(frozen=True)
class RunFacts:
    """What the store knows of one run.

    ``events`` are in store order (position). ``committed_us`` maps event_id to its commit
    time; ``live`` holds the event_ids emitted while an owner connection was subscribed (the
    others were deferred and are outside the delivery SLI). ``receipts`` are every delivery of
    an event of this run, to any connection.
    """

    run_id: str
    user_id: str
    events: tuple[Event, ...]
    committed_us: Mapping[str, int] = field(default_factory=dict)
    live: frozenset[str] = frozenset()
    receipts: tuple[Receipt, ...] = ()
    #: Connections (of ``receipts``) served by another replica than the run's: their send
    #: times are another host's clock.
    remote_connections: frozenset[str] = frozenset()
    started_us: int = 0
    timeout_s: float | None = None


@dataclass(frozen=True)
class RuleConfig:
    """Thresholds. ``ack_wait_s``: an unacked live event younger than this is still in flight,
    not a violation."""

    delivery_slo_s: float = DELIVERY_SLO_S
    run_timeout_s: float = 300.0
    stuck_grace_s: float = 60.0
    ack_wait_s: float = 10.0
    #: ``persisted`` compares a commit time and a send time: taken by one clock when one
    #: replica did both, by two hosts' clocks when another replica sent the frame, where this
    #: much difference is allowed.
    clock_skew_s: float = 0.25


def rule_config(settings: Settings) -> RuleConfig:
    """The thresholds an operator set (``RUNWATCH_DELIVERY_SLO_S`` and the others)."""
    return RuleConfig(
        delivery_slo_s=settings.delivery_slo_s,
        run_timeout_s=settings.run_timeout_s,
        stuck_grace_s=settings.stuck_grace_s,
        clock_skew_s=settings.clock_skew_s,
    )


def _terminal(facts: RunFacts) -> Event | None:
    return next((e for e in facts.events if e.type in TERMINAL_TYPES), None)


def run_state(facts: RunFacts, config: RuleConfig, now_us: int) -> RunState:
    """``ended`` once a terminal event is stored; ``stuck`` when open past timeout + grace."""
    if _terminal(facts) is not None:
        return RunState.ENDED
    timeout = facts.timeout_s if facts.timeout_s is not None else config.run_timeout_s
    started = facts.started_us or (facts.events[0].ts_us if facts.events else now_us)
    if now_us - started > (timeout + config.stuck_grace_s) * 1_000_000:
        return RunState.STUCK
    return RunState.OPEN


def check_run(facts: RunFacts, config: RuleConfig, now_us: int) -> list[Violation]:
    """Every violation of one run, judged as of ``now_us``."""
    out: list[Violation] = []
    state = run_state(facts, config, now_us)
    ordered = sorted(facts.events, key=lambda e: e.seq)
    out += _started(facts, ordered)
    out += _sequence(facts, ordered)
    out += _terminal_rule(facts, ordered, state)
    out += _completion(facts, ordered)
    out += _tool_pairing(facts, ordered, state)
    out += _persisted(facts, config)
    out += _isolation(facts)
    if state == RunState.STUCK:
        timeout = facts.timeout_s if facts.timeout_s is not None else config.run_timeout_s
        out.append(
            Violation(
                Rule.STUCK,
                facts.run_id,
                f"no terminal event {timeout:g}s + {config.stuck_grace_s:g}s grace after start",
                (ordered[-1].seq,) if ordered else (),
            )
        )
    out += _delivery(facts, config, now_us, state)
    return out


def _v(rule: Rule, facts: RunFacts, message: str, *events: Event) -> Violation:
    return Violation(
        rule, facts.run_id, message, tuple(e.seq for e in events), tuple(e.event_id for e in events)
    )


def _started(facts: RunFacts, ordered: list[Event]) -> list[Violation]:
    out = []
    starts = [e for e in ordered if e.type == EventType.AGENT_STARTED]
    if not ordered:
        return [Violation(Rule.STARTED, facts.run_id, "the run has no events")]
    if not starts:
        out.append(_v(Rule.STARTED, facts, "no agent_started: the run ends without a start"))
    elif ordered[0].type != EventType.AGENT_STARTED or ordered[0].seq != 1:
        first = ordered[0]
        out.append(
            _v(
                Rule.STARTED,
                facts,
                f"seq {first.seq} ({first.type.value}) comes before agent_started",
                first,
            )
        )
    for extra in starts[1:]:
        out.append(_v(Rule.STARTED, facts, f"a second agent_started at seq {extra.seq}", extra))
    return out


def _sequence(facts: RunFacts, ordered: list[Event]) -> list[Violation]:
    out = []
    counts = Counter(e.seq for e in ordered)
    for seq, n in sorted(counts.items()):
        if n > 1:
            dupes = [e for e in ordered if e.seq == seq]
            out.append(_v(Rule.SEQUENCE, facts, f"seq {seq} appears {n} times", *dupes))
    ids = Counter(e.event_id for e in ordered)
    for event_id, n in ids.items():
        if n > 1:
            out.append(
                Violation(
                    Rule.SEQUENCE,
                    facts.run_id,
                    f"event_id {event_id} stored {n} times",
                    (),
                    (event_id,),
                )
            )
    seqs = sorted(counts)
    expected = 1
    for seq in seqs:
        if seq > expected:
            missing = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
            out.append(
                Violation(
                    Rule.SEQUENCE, facts.run_id, f"seq {missing} missing before seq {seq}", (seq,)
                )
            )
        expected = seq + 1
    for prev, cur in itertools.pairwise(facts.events):
        if cur.seq < prev.seq:
            out.append(
                _v(Rule.SEQUENCE, facts, f"seq {cur.seq} stored after seq {prev.seq}", prev, cur)
            )
    for prev, cur in itertools.pairwise(ordered):
        if cur.ts_us < prev.ts_us and cur.seq != prev.seq:
            out.append(
                _v(
                    Rule.SEQUENCE,
                    facts,
                    f"ts goes back between seq {prev.seq} and {cur.seq}",
                    prev,
                    cur,
                )
            )
    for e in ordered:
        if e.run_id != facts.run_id:
            out.append(_v(Rule.SEQUENCE, facts, f"seq {e.seq} names another run {e.run_id}", e))
    return out


def _terminal_rule(facts: RunFacts, ordered: list[Event], state: RunState) -> list[Violation]:
    out = []
    terminals = [e for e in ordered if e.type in TERMINAL_TYPES]
    for extra in terminals[1:]:
        out.append(
            _v(
                Rule.TERMINAL,
                facts,
                f"a second terminal event ({extra.type.value}) at seq {extra.seq}",
                extra,
            )
        )
    if terminals:
        first = terminals[0]
        after = [e for e in ordered if e.seq > first.seq and e.type not in TERMINAL_TYPES]
        for e in after:
            out.append(
                _v(
                    Rule.TERMINAL,
                    facts,
                    f"{e.type.value} at seq {e.seq} after the terminal event at seq {first.seq}",
                    e,
                )
            )
        for t in terminals:
            if t.type == EventType.AGENT_ERROR:
                code = t.data.get("code")
                try:
                    known = ErrorCode(str(code))
                except ValueError:
                    out.append(_v(Rule.TERMINAL, facts, f"unknown agent_error code {code!r}", t))
                    continue
                if t.data.get("retryable") is not known.retryable:
                    out.append(
                        _v(
                            Rule.TERMINAL,
                            facts,
                            f"agent_error {known.value} must have retryable={known.retryable}",
                            t,
                        )
                    )
    return out


def _completion(facts: RunFacts, ordered: list[Event]) -> list[Violation]:
    out = []
    done = next((e for e in ordered if e.type == EventType.AGENT_COMPLETED), None)
    finals = [e for e in ordered if e.type == EventType.FINAL_REPORT]
    for extra in finals[1:]:
        out.append(_v(Rule.FINAL_REPORT, facts, f"a second final_report at seq {extra.seq}", extra))
    if done is None:
        return out
    if not any(e.type == EventType.AGENT_THINKING and e.seq < done.seq for e in ordered):
        out.append(_v(Rule.THINKING, facts, "the run completed without any agent_thinking", done))
    before = [e for e in finals if e.seq < done.seq]
    if not finals:
        out.append(_v(Rule.FINAL_REPORT, facts, "the run completed without a final_report", done))
    elif not before:
        out.append(
            _v(
                Rule.FINAL_REPORT,
                facts,
                f"final_report at seq {finals[0].seq} comes after agent_completed",
                finals[0],
                done,
            )
        )
    return out


def _tool_pairing(facts: RunFacts, ordered: list[Event], state: RunState) -> list[Violation]:
    out = []
    terminal = next((e for e in ordered if e.type in TERMINAL_TYPES), None)
    calls: dict[str, Event] = {}
    completions: dict[str, list[Event]] = {}
    for e in ordered:
        call_id = str(e.data.get("tool_call_id"))
        if e.type == EventType.TOOL_EXECUTING:
            if call_id in calls:
                out.append(
                    _v(
                        Rule.TOOL_PAIRING,
                        facts,
                        f"tool_call_id {call_id} used twice",
                        calls[call_id],
                        e,
                    )
                )
            else:
                calls[call_id] = e
        elif e.type == EventType.TOOL_COMPLETED:
            completions.setdefault(call_id, []).append(e)
            if e.data.get("status") not in ("ok", "error"):
                out.append(
                    _v(
                        Rule.TOOL_PAIRING,
                        facts,
                        f"tool_completed at seq {e.seq} has status {e.data.get('status')!r}",
                        e,
                    )
                )
    for call_id, done in completions.items():
        call = calls.get(call_id)
        if call is None:
            out.append(
                _v(
                    Rule.TOOL_PAIRING,
                    facts,
                    f"tool_completed {call_id} at seq {done[0].seq} without its tool_executing",
                    *done,
                )
            )
            continue
        if done[0].seq < call.seq:
            out.append(
                _v(
                    Rule.TOOL_PAIRING,
                    facts,
                    f"tool_completed {call_id} comes before its tool_executing",
                    call,
                    done[0],
                )
            )
        for extra in done[1:]:
            out.append(
                _v(Rule.TOOL_PAIRING, facts, f"tool call {call_id} completed twice", call, extra)
            )
        if terminal is not None and done[0].seq > terminal.seq:
            out.append(
                _v(
                    Rule.TOOL_PAIRING,
                    facts,
                    f"tool call {call_id} completed after the terminal event",
                    done[0],
                    terminal,
                )
            )
    for call_id, call in calls.items():
        if call_id not in completions and (terminal is not None or state == RunState.STUCK):
            where = f"the run ended at seq {terminal.seq}" if terminal else "the run is stuck"
            out.append(
                _v(
                    Rule.TOOL_PAIRING,
                    facts,
                    f"tool call {call_id} ({call.data.get('tool')}) never completed: {where}",
                    call,
                )
            )
    return out


def _persisted(facts: RunFacts, config: RuleConfig) -> list[Violation]:
    out = []
    stored = {e.event_id: e for e in facts.events}
    for r in facts.receipts:
        event = stored.get(r.event_id)
        if event is None or event.seq != r.seq:
            out.append(
                Violation(
                    Rule.PERSISTED,
                    facts.run_id,
                    f"seq {r.seq} was delivered to connection {r.connection_id} "
                    "but is not in the store",
                    (r.seq,),
                    (r.event_id,),
                )
            )
            continue
        committed = facts.committed_us.get(r.event_id)
        # Another replica's send time is its host's clock, not the committer's.
        skew_us = (
            int(config.clock_skew_s * 1_000_000)
            if r.connection_id in facts.remote_connections
            else 0
        )
        if committed is not None and r.sent_us < committed - skew_us:
            out.append(
                _v(
                    Rule.PERSISTED,
                    facts,
                    f"seq {r.seq} was sent {(committed - r.sent_us) / 1000:.1f} ms "
                    "before it was committed",
                    event,
                )
            )
    for e in facts.events:
        if facts.committed_us and e.event_id not in facts.committed_us:
            out.append(_v(Rule.PERSISTED, facts, f"seq {e.seq} has no commit time", e))
    return _dedupe(out)


def _isolation(facts: RunFacts) -> list[Violation]:
    out = []
    for r in facts.receipts:
        if r.user_id != facts.user_id:
            out.append(
                Violation(
                    Rule.ISOLATION,
                    facts.run_id,
                    f"seq {r.seq} was delivered to user {r.user_id!r}, not to the owner",
                    (r.seq,),
                    (r.event_id,),
                )
            )
    return out


def first_acks(receipts: Iterable[Receipt], owner: str) -> dict[str, int]:
    """When each event was first acked by a connection of the run's ``owner``, by event_id
    (an ack by anyone else is no delivery to the owner: I7)."""
    first: dict[str, int] = {}
    for r in receipts:
        if r.acked_us is not None and r.user_id == owner:
            first[r.event_id] = min(first.get(r.event_id, r.acked_us), r.acked_us)
    return first


def _delivery(facts: RunFacts, config: RuleConfig, now_us: int, state: RunState) -> list[Violation]:
    out = []
    first_ack = first_acks(facts.receipts, facts.user_id)
    slo_us = config.delivery_slo_s * 1_000_000
    late: list[tuple[Event, float]] = []
    missing: list[Event] = []
    for e in sorted(facts.events, key=lambda e: e.seq):
        if e.event_id not in facts.live:
            continue  # deferred: the owner had no live connection; outside the SLI
        acked = first_ack.get(e.event_id)
        if acked is None:
            if now_us - e.ts_us > config.ack_wait_s * 1_000_000:
                missing.append(e)
        elif acked - e.ts_us > slo_us:
            late.append((e, (acked - e.ts_us) / 1e6))
    if late:
        worst = max(s for _, s in late)
        out.append(
            _v(
                Rule.DELIVERY_SLO,
                facts,
                f"{len(late)} event(s) acked later than {config.delivery_slo_s:g}s "
                f"(worst {worst:.2f}s)",
                *[e for e, _ in late],
            )
        )
    if missing:
        out.append(
            _v(Rule.DELIVERY_SLO, facts, f"{len(missing)} live event(s) never acked", *missing)
        )
    return out


def _dedupe(violations: list[Violation]) -> list[Violation]:
    seen = set()
    out = []
    for v in violations:
        key = (v.rule, v.message)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out
