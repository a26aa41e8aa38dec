"""The event envelope and its building blocks: ids, the wall clock, timestamps and JSON text."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from runtime.events import Event, EventType, dumps, format_ts, new_id, now_us, parse_ts

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid_ms(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 32 + CROCKFORD.index(ch)
    return value >> 80


def test_new_id_is_a_ulid_of_now_and_unique() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(50_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids[::5000]:
        assert len(text) == 26 and set(text) <= set(CROCKFORD)
        assert before <= _ulid_ms(text) <= after
    # Time-sortable: a later millisecond sorts after an earlier one.
    first = new_id()
    time.sleep(0.002)
    assert new_id()[:10] > first[:10]


@given(st.integers(min_value=0, max_value=253_402_300_799_999_999))
def test_format_ts_is_rfc3339_with_microseconds(micros: int) -> None:
    dt = datetime.fromtimestamp(micros // 1_000_000, tz=UTC).replace(microsecond=micros % 1_000_000)
    text = format_ts(micros)
    assert text == dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert parse_ts(text) == micros


def test_dumps_is_compact_json_and_always_valid() -> None:
    assert dumps({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'
    # What the fast encoder refuses still comes out as valid, ASCII-escaped JSON.
    for value in ({"n": 2**80}, {"s": "x\ud800y"}):
        assert json.loads(dumps(value)) == value


def test_now_us_is_the_wall_clock_in_epoch_microseconds() -> None:
    before = time.time_ns() // 1000
    now = now_us()
    after = time.time_ns() // 1000
    assert isinstance(now, int) and before <= now <= after


@given(
    st.sampled_from(EventType),
    st.integers(min_value=1, max_value=2**31 - 1),
    st.integers(min_value=0, max_value=253_402_300_799_999_999),
    st.dictionaries(st.text(max_size=5), st.text(max_size=20) | st.integers(), max_size=3),
)
def test_an_event_survives_its_one_serialize_parse_pair(
    kind: EventType, seq: int, ts_us: int, data: dict[str, object]
) -> None:
    event = Event(kind, new_id(), new_id(), new_id(), seq, ts_us, "demo", dict(data))
    assert Event.from_json(event.to_json()) == event
    assert Event.from_dict(json.loads(event.to_json())) == event
