"""The hub, the per-connection sender and delivery accounting, without a socket: an in-memory
transport stands where the WebSocket would (it is runwatch's own interface, ``Transport``),
and metrics are read from a fresh registry."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry

from runtime.connection import ConnectionProtocol, State
from runtime.delivery import DeliveryTracker, FailureReason
from runtime.events import Event, EventType, Receipt
from runtime.hub import Hub
from runtime.metrics import RuntimeMetrics
from runtime.protocol import CloseCode, Connect
from runtime.sender import Connection
from runtime.store.audit import AckUpdate

from .conftest import wait_until


class MemoryTransport:
    """Takes what the sender writes; ``block`` holds writes, like a peer that stops reading."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.closed: tuple[int, str] | None = None
        self.block = asyncio.Event()
        self.block.set()

    async def send_text(self, text: str) -> None:
        await self.block.wait()
        self.texts.append(text)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(t) for t in self.texts]


class Recorder:
    def __init__(self) -> None:
        self.receipts: list[Receipt] = []
        self.acks: list[AckUpdate] = []
        self.settled: list[str] = []

    def record_receipt(self, receipt: Receipt) -> None:
        self.receipts.append(receipt)

    def record_ack(self, ack: AckUpdate) -> None:
        self.acks.append(ack)

    def settle(self, run_id: str, settled_us: int) -> None:
        self.settled.append(run_id)


class World:
    def __init__(self, **hub_kwargs: Any) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RuntimeMetrics(self.registry)
        self.recorder = Recorder()
        self.tracker = DeliveryTracker(self.metrics, self.recorder)
        self.hub = Hub(self.metrics, self.tracker, **hub_kwargs)

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def connect(self, user: str, transport: MemoryTransport | None = None) -> Connection | None:
        protocol = ConnectionProtocol()
        protocol.receive_frame(Connect("t").serialize())
        protocol.requests_received()
        conn = self.hub.open(
            f"c{len(self.hub.all_connections())}", user, transport or MemoryTransport(), protocol
        )
        if conn is not None:
            protocol.accept(conn.id, user, 20.0, [])
            conn.flush()
        return conn


def event(run_id: str, seq: int, kind: EventType = EventType.AGENT_THINKING) -> Event:
    data: dict[str, Any] = {"step": seq, "text": "x" * 50}
    if kind is EventType.AGENT_COMPLETED:
        data = {"duration_ms": 1}
    return Event(kind, f"E{run_id}{seq}", run_id, "T", seq, 1_700_000_000_000_000, "demo", data)


async def test_events_reach_only_the_owners_connections() -> None:
    w = World()
    alice_t, bob_t = MemoryTransport(), MemoryTransport()
    w.connect("alice", alice_t)
    w.connect("bob", bob_t)
    w.hub.run_started("R1", "alice")
    for seq in (1, 2):
        w.hub.publish(event("R1", seq), "alice", live=True)
    await wait_until(lambda: len(alice_t.texts) == 3, 2)
    assert [f["type"] for f in bob_t.frames()] == ["connected"]
    assert {r.user_id for r in w.recorder.receipts} == {"alice"}
    assert w.sample("runwatch_events_sent_total", type="agent_thinking") == 2


async def test_the_connection_limit_per_user() -> None:
    w = World(max_connections_per_user=2)
    assert w.connect("dave") is not None and w.connect("dave") is not None
    assert w.connect("dave") is None
    assert w.connect("erin") is not None
    assert w.sample("runwatch_connections_open") == 3


async def test_first_acks_count_once_across_tabs_and_settle_the_run() -> None:
    w = World()
    tabs = [w.connect("alice"), w.connect("alice")]
    w.hub.run_started("R1", "alice")
    w.hub.publish(event("R1", 1), "alice", live=True)
    w.hub.publish(event("R1", 2, EventType.AGENT_COMPLETED), "alice", live=True)
    for tab in tabs:
        assert tab is not None
        await wait_until(lambda tab=tab: tab.protocol.sent.get("R1") == 2, 2)
    for tab in tabs:
        assert tab is not None
        seq = tab.protocol.ack("R1", 2)
        assert seq == 2
        await w.hub.ack(tab, "R1", seq)
    assert w.sample("runwatch_events_acked_total", type="agent_thinking") == 1
    assert w.sample("runwatch_events_acked_total", type="agent_completed") == 1
    assert w.recorder.settled == ["R1"]
    assert len(w.recorder.acks) == 2  # each connection's ack is recorded


async def test_unacked_live_events_fail_when_the_last_owner_connection_closes() -> None:
    w = World()
    one, two = w.connect("alice"), w.connect("alice")
    assert one is not None and two is not None
    w.hub.run_started("R1", "alice")
    for seq in (1, 2, 3):
        w.hub.publish(event("R1", seq), "alice", live=True)
    await wait_until(lambda: one.protocol.sent.get("R1") == 3 == two.protocol.sent.get("R1"), 2)
    await w.hub.ack(one, "R1", one.protocol.ack("R1", 1) or 0)
    # The other tab still has the run: it may yet ack.
    one.close(CloseCode.GOING_AWAY, send=False)
    w.hub.remove(one, CloseCode.GOING_AWAY)
    assert w.sample("runwatch_event_delivery_failures_total", reason="disconnected") == 0
    two.close(CloseCode.UNAUTHORIZED, send=False)
    w.hub.remove(two, CloseCode.UNAUTHORIZED)
    assert w.sample("runwatch_event_delivery_failures_total", reason="token_expired") == 2
    # Counted once: a later ack of a failed event is not a success.
    w.tracker.remote_acked("R1", 3, 0)
    assert w.sample("runwatch_events_acked_total", type="agent_thinking") == 1


async def test_a_client_that_stops_reading_is_closed_as_a_slow_consumer() -> None:
    w = World(max_queue_bytes=2_000)
    transport = MemoryTransport()
    conn = w.connect("slow", transport)
    assert conn is not None
    transport.block.clear()
    w.hub.run_started("R1", "slow")
    seq = 0
    while not conn.closed:
        seq += 1
        w.hub.publish(event("R1", seq), "slow", live=True)
        assert seq < 100, "the queue bound never closed the connection"
    assert conn.close_code == CloseCode.SLOW_CONSUMER
    transport.block.set()
    await conn.wait_closed()
    assert transport.closed is not None and transport.closed[0] == CloseCode.SLOW_CONSUMER
    w.hub.remove(conn, CloseCode.SLOW_CONSUMER)
    # Queued and never written: not delivered, and said so under its reason.
    failed = w.sample("runwatch_event_delivery_failures_total", reason=FailureReason.SLOW_CONSUMER)
    assert failed == seq


async def test_a_protocol_close_closes_the_transport_once() -> None:
    w = World()
    transport = MemoryTransport()
    conn = w.connect("alice", transport)
    assert conn is not None
    for _ in range(20):
        conn.protocol.receive_frame("not json")
    conn.flush()
    assert conn.protocol.state is State.CLOSED
    await conn.wait_closed()
    assert transport.closed is not None and transport.closed[0] == CloseCode.PROTOCOL_VIOLATION
    conn.close(CloseCode.NORMAL)  # idempotent
    assert conn.close_code == CloseCode.PROTOCOL_VIOLATION


async def test_a_protocol_close_writes_every_answer_decided_before_it() -> None:
    # A burst of bad frames faster than the socket writes: every error is written, the last
    # one too, then the close frame.
    w = World()
    transport = MemoryTransport()
    conn = w.connect("alice", transport)
    assert conn is not None
    transport.block.clear()
    for _ in range(25):
        conn.protocol.receive_frame("not json")
        conn.flush()
    assert conn.close_code == CloseCode.PROTOCOL_VIOLATION and transport.closed is None
    transport.block.set()
    await conn.wait_closed()
    codes = [f.get("code") for f in transport.frames()[1:]]
    assert codes == ["invalid_json"] * 20
    assert transport.closed is not None and transport.closed[0] == CloseCode.PROTOCOL_VIOLATION


async def test_events_written_while_closing_count_as_sent_and_the_rest_as_dropped() -> None:
    w = World()
    transport = MemoryTransport()
    conn = w.connect("alice", transport)
    assert conn is not None
    w.hub.run_started("R1", "alice")
    transport.block.clear()
    for seq in (1, 2, 3):
        w.hub.publish(event("R1", seq), "alice", live=True)
    conn.protocol.token_expired()
    conn.flush()
    assert not w.hub.watched_here("R1", "alice")  # closing: no longer a live watcher
    transport.block.set()
    await conn.wait_closed()
    assert conn.protocol.sent["R1"] == 3 and not conn.dropped
    assert transport.closed is not None and transport.closed[0] == CloseCode.UNAUTHORIZED
    w.hub.remove(conn, CloseCode.UNAUTHORIZED)
    assert w.sample("runwatch_event_delivery_failures_total", reason="token_expired") == 3


async def test_a_closing_connection_does_not_count_towards_the_limit() -> None:
    w = World(max_connections_per_user=1)
    transport = MemoryTransport()
    old = w.connect("dave", transport)
    assert old is not None
    transport.block.clear()  # still writing its last frames
    old.protocol.receive_frame("{")
    old.close(CloseCode.INTERNAL_ERROR)
    assert w.connect("dave") is not None
    transport.block.set()
    await old.wait_closed()


async def test_watched_here_follows_subscriptions_and_resumes() -> None:
    w = World()
    conn = w.connect("alice")
    assert conn is not None
    assert not w.hub.watched_here("R1", "alice")
    version = w.hub.version
    w.hub.begin_resume(conn, "R1")
    assert w.hub.watched_here("R1", "alice") and w.hub.version > version
    w.hub.finish_resume(conn, "R1", 0, [], ended=False)
    assert w.hub.watched_here("R1", "alice")
    w.hub.publish(event("R1", 1, EventType.AGENT_COMPLETED), "alice", live=True)
    assert not w.hub.watched_here("R1", "alice")
