"""Every rule of one connection (docs/protocol.md), tested on the sans-I/O protocol: strings in,
frames and requests out, no socket."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.connection import CheckOwner, ConnectionProtocol, InvalidState, Outgoing, State
from runtime.events import Event, EventType
from runtime.protocol import (
    MAX_FRAME_BYTES,
    Ack,
    Cancel,
    Chat,
    CloseCode,
    Connect,
    FrameError,
    Ping,
    ProtocolErrorCode,
    Resume,
    parse_client_frame,
    serialize_client_frame,
)

RUN = "01RUN"


def event(seq: int, run_id: str = RUN, kind: EventType | None = None) -> Event:
    if kind is None:
        kind = EventType.AGENT_STARTED if seq == 1 else EventType.AGENT_THINKING
    data: dict[str, Any] = {"input": "hi"} if kind is EventType.AGENT_STARTED else {}
    if kind is EventType.AGENT_THINKING:
        data = {"step": seq, "text": "…"}
    elif kind is EventType.AGENT_COMPLETED:
        data = {"duration_ms": 1}
    return Event(
        type=kind,
        event_id=f"E{run_id}{seq:04d}",
        run_id=run_id,
        thread_id="T",
        seq=seq,
        ts_us=1_700_000_000_000_000 + seq,
        agent="demo",
        data=data,
    )


def frames(out: list[Outgoing]) -> list[dict[str, Any]]:
    return [json.loads(o.text) for o in out]


def kinds(out: list[Outgoing]) -> list[str]:
    return [
        f["type"] if f["type"] != "agent_thinking" else f"thinking{f['seq']}" for f in frames(out)
    ]


def open_protocol(**kwargs: Any) -> ConnectionProtocol:
    p = ConnectionProtocol(**kwargs)
    p.receive_frame(Connect("token").serialize())
    assert p.requests_received() == [Connect("token")]
    p.accept("C1", "alice", 20.0, [])
    assert kinds(p.data_to_send()) == ["connected"]
    return p


def sent_through(p: ConnectionProtocol, out: list[Outgoing]) -> None:
    """What the sender does after writing each event frame."""
    for item in out:
        if item.event is not None:
            p.written(item.event.run_id, item.event.seq)


# ---- client frames: one parse/serialize pair ---------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_id = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=50,
)
_seq = st.integers(min_value=0, max_value=2**31)
client_frames = st.one_of(
    st.builds(Connect, token=_id, client=st.none() | _id),
    st.builds(
        Chat,
        text=_text.filter(bool),
        client_msg_id=_id,
        thread_id=st.none() | _id,
        agent=st.none() | _id,
    ),
    st.builds(Ack, run_id=_id, seq=_seq),
    st.builds(Resume, run_id=_id, after_seq=_seq),
    st.builds(Cancel, run_id=_id),
    st.just(Ping()),
)


@given(client_frames)
def test_client_frames_round_trip(frame: Any) -> None:
    assert parse_client_frame(serialize_client_frame(frame)) == frame


def test_serialized_frames_leave_optional_fields_out() -> None:
    assert json.loads(Connect("t").serialize()) == {"type": "connect", "token": "t"}
    assert json.loads(Chat("hi", "m1").serialize()) == {
        "type": "chat",
        "text": "hi",
        "client_msg_id": "m1",
    }
    assert json.loads(Ping().serialize()) == {"type": "ping"}


# ---- connect first -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        Ping().serialize(),
        Chat("hi", "m").serialize(),
        "not json",
        '{"type": "connect"}',
        b"binary",
        "",
    ],
)
def test_anything_before_connect_closes_4401(first: str | bytes) -> None:
    p = ConnectionProtocol()
    p.receive_frame(first)
    assert p.state is State.CLOSED and p.close_code == CloseCode.UNAUTHORIZED
    assert p.requests_received() == [] and p.data_to_send() == []
    p.receive_frame(Connect("t").serialize())  # nothing more is read
    assert p.requests_received() == []


def test_connect_timeout_closes_4401_and_is_ignored_once_open() -> None:
    p = ConnectionProtocol()
    p.connect_timed_out()
    assert p.close_code == CloseCode.UNAUTHORIZED
    q = open_protocol()
    q.connect_timed_out()
    assert q.state is State.OPEN


def test_refused_connect_closes_with_the_given_code() -> None:
    p = ConnectionProtocol()
    p.receive_frame(Connect("bad").serialize())
    assert p.requests_received() == [Connect("bad")]
    p.refuse(CloseCode.TOO_MANY_CONNECTIONS)
    assert p.closed and p.close_code == 4429


def test_answers_in_the_wrong_state_say_what_was_expected() -> None:
    p = open_protocol()
    with pytest.raises(InvalidState, match="accept: expected connecting, got open"):
        p.accept("C", "alice", 20.0, [])
    p.close(CloseCode.NORMAL)
    with pytest.raises(InvalidState, match="refuse: expected connecting, got closed"):
        p.refuse(CloseCode.UNAUTHORIZED)


def test_second_connect_is_invalid_message() -> None:
    p = open_protocol()
    p.receive_frame(Connect("again").serialize())
    assert p.requests_received() == []
    (error,) = frames(p.data_to_send())
    assert error["type"] == "error" and error["code"] == "invalid_message"
    assert p.errors_sent() == [ProtocolErrorCode.INVALID_MESSAGE]


def test_connected_goes_before_events_of_runs_started_meanwhile() -> None:
    p = ConnectionProtocol()
    p.receive_frame(Connect("t").serialize())
    p.requests_received()
    p.run_started(RUN)  # while active_runs is read
    p.event_committed(event(1), live=True)
    assert p.data_to_send() == []  # nothing before connected
    p.accept("C1", "alice", 20.0, [{"run_id": "old", "last_seq": 3}])
    out = frames(p.data_to_send())
    assert [f["type"] for f in out] == ["connected", "agent_started"]
    assert out[0]["active_runs"] == [{"run_id": "old", "last_seq": 3}]
    assert out[0]["protocol"] == 1 and out[0]["user_id"] == "alice"


# ---- frames --------------------------------------------------------------------------------


def test_ping_is_answered_by_the_protocol() -> None:
    p = open_protocol()
    p.receive_frame(Ping().serialize())
    assert kinds(p.data_to_send()) == ["pong"] and p.requests_received() == []


def test_valid_frames_become_requests_in_order() -> None:
    p = open_protocol()
    for frame in (Chat("hi", "m1"), Resume(RUN, 0), Cancel(RUN)):
        p.receive_frame(frame.serialize())
    assert p.requests_received() == [Chat("hi", "m1"), Resume(RUN, 0), Cancel(RUN)]


def test_frame_over_the_limit_closes_1009() -> None:
    p = open_protocol(max_frame_bytes=100)
    p.receive_frame(Chat("x" * 100, "m").serialize())
    assert p.close_code == CloseCode.FRAME_TOO_BIG
    q = open_protocol()
    # Measured in UTF-8 bytes: 2 bytes a character here.
    q.receive_frame(
        json.dumps({"type": "ping", "pad": "é" * (MAX_FRAME_BYTES // 2)}, ensure_ascii=False)
    )
    assert q.close_code == CloseCode.FRAME_TOO_BIG


def test_bad_frames_in_a_row_close_4400_and_a_good_one_resets_the_count() -> None:
    p = open_protocol(max_bad_frames=3)
    p.receive_frame("nope")
    p.receive_frame(b"\x00")
    p.receive_frame(Ping().serialize())  # resets
    p.receive_frame('{"type": "dance"}')
    p.receive_frame("[]")
    assert p.state is State.OPEN
    codes = [f.get("code") for f in frames(p.data_to_send())]
    assert codes == ["invalid_json", "invalid_json", None, "unknown_type", "invalid_message"]
    p.receive_frame("{")
    assert p.close_code == CloseCode.PROTOCOL_VIOLATION
    # The frame that closed the connection is answered too, before the close frame.
    assert p.errors_sent()[-1] == ProtocolErrorCode.INVALID_JSON
    assert [f["code"] for f in frames(p.data_to_send())] == ["invalid_json"]
    # Nothing after it is handled or answered.
    p.receive_frame("{")
    p.receive_frame(Ping().serialize())
    assert p.data_to_send() == [] and p.requests_received() == []


def test_answers_to_good_frames_are_not_bad_frames() -> None:
    p = open_protocol(max_bad_frames=2)
    for _ in range(5):
        p.fail(FrameError(ProtocolErrorCode.NOT_FOUND, "no such run", RUN))
    assert p.state is State.OPEN
    assert [f["ref"] for f in frames(p.data_to_send())] == [RUN] * 5


# ---- acks ----------------------------------------------------------------------------------


def test_ack_is_cumulative_clamped_to_what_was_written_and_advancing() -> None:
    p = open_protocol()
    p.run_started(RUN)
    for seq in (1, 2, 3):
        p.event_committed(event(seq), live=True)
    out = p.data_to_send()
    sent_through(p, out[:2])  # seq 3 is queued, not yet written
    p.receive_frame(Ack(RUN, 99).serialize())
    assert p.requests_received() == [Ack(RUN, 2)]
    p.receive_frame(Ack(RUN, 2).serialize())
    p.receive_frame(Ack(RUN, 1).serialize())
    assert p.requests_received() == []  # not advancing: nothing to do
    sent_through(p, out[2:])
    p.receive_frame(Ack(RUN, 3).serialize())
    assert p.requests_received() == [Ack(RUN, 3)]


def test_ack_of_a_run_never_sent_here_asks_for_its_owner() -> None:
    p = open_protocol()
    p.receive_frame(Ack("someone-elses", 5).serialize())
    assert p.requests_received() == [CheckOwner("someone-elses")]


# ---- fan-out -------------------------------------------------------------------------------


def test_new_runs_are_followed_until_their_terminal_event() -> None:
    p = open_protocol()
    p.event_committed(event(1, "before"), live=True)  # not subscribed: ignored
    p.run_started(RUN)
    assert p.follows(RUN)
    p.event_committed(event(1), live=True)
    assert p.event_committed(event(2, kind=EventType.AGENT_COMPLETED), live=True) is True
    assert not p.follows(RUN)
    p.event_committed(event(3), live=True)
    assert [(f["run_id"], f["seq"]) for f in frames(p.data_to_send())] == [(RUN, 1), (RUN, 2)]


def test_a_stream_connection_follows_only_what_it_is_given() -> None:
    p = ConnectionProtocol(follow_new_runs=False, state=State.OPEN)
    p.run_started(RUN)
    assert not p.follows(RUN)


# ---- the resume splice ---------------------------------------------------------------------


def test_resume_sends_replay_then_resumed_then_held_events_each_once() -> None:
    p = open_protocol()
    p.begin_resume(RUN)
    assert p.follows(RUN)
    # Live events committed while the replay is read: seq 3 is in both, 4 only here.
    p.event_committed(event(3), live=True)
    p.event_committed(event(4), live=True)
    replay = [event(2), event(3)]
    for e in replay:
        p.replay(e)
    p.finish_resume(RUN, after_seq=1, replay=replay, ended=False)
    out = p.data_to_send()
    assert kinds(out) == ["thinking2", "thinking3", "resumed", "thinking4"]
    assert [o.replayed for o in out] == [True, True, False, False]
    assert frames(out)[2] == {"type": "resumed", "run_id": RUN, "after_seq": 1, "replayed": 2}
    p.event_committed(event(5), live=True)  # then live
    assert kinds(p.data_to_send()) == ["thinking5"]


def test_resume_past_the_end_replays_nothing_and_does_not_follow_an_ended_run() -> None:
    p = open_protocol()
    p.begin_resume(RUN)
    p.finish_resume(RUN, after_seq=9, replay=[], ended=True)
    assert frames(p.data_to_send()) == [
        {"type": "resumed", "run_id": RUN, "after_seq": 9, "replayed": 0}
    ]
    assert not p.follows(RUN)


def test_a_terminal_event_held_during_resume_ends_the_subscription() -> None:
    p = open_protocol()
    p.begin_resume(RUN)
    p.event_committed(event(2, kind=EventType.AGENT_COMPLETED), live=True)
    p.finish_resume(RUN, after_seq=1, replay=[], ended=False)
    assert kinds(p.data_to_send()) == ["resumed", "agent_completed"]
    assert not p.follows(RUN)


def test_an_aborted_resume_holds_nothing_and_follows_nothing() -> None:
    p = open_protocol()
    p.run_started(RUN)
    p.begin_resume(RUN)
    p.abort_resume(RUN)
    assert not p.follows(RUN)
    p.event_committed(event(1), live=True)
    assert p.data_to_send() == []


# ---- closing -------------------------------------------------------------------------------


def test_token_expiry_closes_4401_and_nothing_more_is_handled() -> None:
    p = open_protocol()
    p.run_started(RUN)
    p.event_committed(event(1), live=True)
    p.token_expired()
    assert p.close_code == CloseCode.UNAUTHORIZED and not p.follows(RUN)
    p.receive_frame(Ping().serialize())
    p.event_committed(event(2), live=True)
    # Committed before the expiry: still written, before the close frame; nothing after.
    assert [(f["run_id"], f["seq"]) for f in frames(p.data_to_send())] == [(RUN, 1)]
    assert p.data_to_send() == [] and p.requests_received() == []


def test_a_close_before_connected_sends_nothing() -> None:
    p = ConnectionProtocol()
    p.receive_frame(Connect("t").serialize())
    p.run_started(RUN)
    p.event_committed(event(1), live=True)  # a run that started while the connect was checked
    p.refuse(CloseCode.UNAUTHORIZED)
    assert p.data_to_send() == []


def test_close_is_idempotent_and_keeps_the_first_code() -> None:
    p = open_protocol()
    p.close(CloseCode.SLOW_CONSUMER)
    p.close(CloseCode.NORMAL)
    assert p.close_code == CloseCode.SLOW_CONSUMER
