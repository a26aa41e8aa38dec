"""Cross-replica fan-out through Redis pub/sub, for several runtime replicas behind a load
balancer sharing one PostgreSQL audit store.

Each replica publishes, on one channel, what other replicas need to serve *their* sockets:

- ``run``: a run started here; connections of its owner there subscribe to it (every tab);
- ``ev``: a committed event (I6 holds: only committed events are published); replicas deliver
  it to the owner's local connections (I7: the owner, from the message, never the client);
- ``cancel``: a user asked another replica to cancel a run running here;
- ``ack``: an owner connection there acknowledged an event of a run running here, so the
  origin counts each event's first acknowledgement once;
- ``presence``: which users have connections where, so an event counts as sent live when the
  owner has a tab on any replica.

Redis pub/sub is at-most-once: Redis drops a subscriber that reads too slowly (its output
buffer limit) or on a blip, and what was published meanwhile is gone. So every message carries
its publisher's counter ``n``, and the subscriber connection is named
(``runwatch-sub:<instance>``, ``CLIENT LIST`` shows it). A replica that re-establishes its
subscription, or sees a publisher's counter jump, tells its inbound (``lost``), which
resynchronises the runs it relays from the audit store (:mod:`runtime.relay`).

While Redis is unreachable, messages wait in a bounded outbox (``OUTBOX_LIMIT``), and the
publisher retries with backoff. Past the bound the oldest are dropped and counted
(``runwatch_fanout_dropped_total``): their counters are then missing, which the other replicas see
as a jump and repair from the store, as for any other loss. A long outage costs bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge

from .events import Event, now_us
from .pipeline import Emitted

__all__ = ["BrokerInbound", "BrokerMetrics", "RedisBroker"]

log = logging.getLogger("runwatch.broker")

PRESENCE_EVERY_S = 5.0
PRESENCE_TTL_S = 20.0
#: Messages held for Redis while it is unreachable; past it the oldest are dropped.
OUTBOX_LIMIT = 50_000
#: The first and longest pause between publish retries while Redis is unreachable, and how
#: often a failing publisher says so.
PUBLISH_RETRY_S = (0.1, 2.0)
PUBLISH_LOG_EVERY_S = 30.0


class BrokerMetrics:
    """The publisher's metrics, registered whether or not Redis is configured (at 0)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.outbox_depth = Gauge(
            "runwatch_fanout_outbox_depth",
            "Cross-replica fan-out messages waiting to be published to Redis.",
            registry=registry,
        )
        self.dropped = Counter(
            "runwatch_fanout_dropped_total",
            "Fan-out messages dropped unpublished because the outbox was full (Redis "
            "unreachable); the other replicas repair the gap from the audit store.",
            registry=registry,
        )


class BrokerInbound(Protocol):
    """What this replica does with the other replicas' fan-out."""

    def remote_event(self, event: Event, owner: str, live: bool) -> None: ...

    def remote_run_started(self, run_id: str, owner: str) -> None: ...

    def remote_cancel(self, run_id: str) -> None: ...

    def remote_ack(self, run_id: str, seq: int, acked_us: int) -> None: ...

    def local_users(self) -> set[str]: ...

    def lost(self, reason: str, since_us: int | None) -> None: ...


class RedisBroker:
    """Publishes this replica's fan-out and applies the other replicas'."""

    def __init__(
        self,
        url: str,
        instance_id: str,
        channel: str = "runwatch:fanout",
        *,
        metrics: BrokerMetrics | None = None,
        outbox_limit: int = OUTBOX_LIMIT,
    ) -> None:
        self.url = url
        self.channel = channel
        self.instance = instance_id
        self.metrics = metrics if metrics is not None else BrokerMetrics()
        self.outbox_limit = max(1, outbox_limit)
        self._inbound: BrokerInbound | None = None
        self._redis: aioredis.Redis | None = None
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self.metrics.outbox_depth.set_function(self._outbox.qsize)
        self._tasks: list[asyncio.Task[None]] = []
        #: user -> {instance: last seen (monotonic)} for users with connections elsewhere.
        self._remote: dict[str, dict[str, float]] = {}
        self._sub: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._n = 0
        #: instance -> the last message counter heard from it.
        self._heard: dict[str, int] = {}
        #: Wall clock (µs) of the last message received: a lost subscription is deaf since.
        self._heard_us: int | None = None
        #: instance -> when (its wall clock, µs) its last message heard was queued: what a
        #: jump in its counter lost was queued after that.
        self._heard_t: dict[str, int] = {}
        self.received = 0
        self.published = 0
        self.dropped = 0
        self.resubscribed = 0

    @property
    def subscriber_name(self) -> str:
        """The Redis client name of the subscriber connection (``CLIENT LIST``)."""
        return "runwatch-sub:" + "".join(
            c if c.isalnum() or c in "-_.:" else "_" for c in self.instance
        )

    async def start(self, inbound: BrokerInbound) -> None:
        self._inbound = inbound
        self._redis = aioredis.from_url(self.url, decode_responses=True)
        self._sub = aioredis.from_url(
            self.url, decode_responses=True, client_name=self.subscriber_name
        )
        pubsub: Any = self._sub.pubsub()
        self._pubsub = pubsub
        await pubsub.subscribe(self.channel)
        # redis-py reconnects and resubscribes a dropped pub/sub connection by itself; this
        # callback (after its own) is how we learn that messages may have been lost.
        pubsub.connection.register_connect_callback(self._reconnected)
        self._tasks = [
            asyncio.create_task(self._listen(pubsub), name="runwatch-broker-listen"),
            asyncio.create_task(self._publish_loop(), name="runwatch-broker-publish"),
            asyncio.create_task(self._presence_loop(), name="runwatch-broker-presence"),
        ]

    async def close(self) -> None:
        await self._flush_outbox()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pubsub is not None:
            try:
                if self._pubsub.connection is not None:
                    self._pubsub.connection.deregister_connect_callback(self._reconnected)
                await self._pubsub.aclose()
            except (aioredis.RedisError, OSError) as exc:
                log.info("redis subscription did not close cleanly: %s", exc)
        for client in (self._redis, self._sub):
            if client is not None:
                await client.aclose()

    async def _flush_outbox(self, timeout: float = 2.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outbox.join(), timeout)

    # ---- publishing (ordered: one task drains the outbox) --------------------------------

    def _next(self) -> int:
        self._n += 1
        return self._n

    def _send(self, kind: str, **fields: Any) -> None:
        self._queue(
            json.dumps({"k": kind, "i": self.instance, "n": self._next(), "t": now_us(), **fields})
        )

    def _queue(self, message: str) -> None:
        """Queue a numbered message; when the outbox is full, the oldest gives way (its number
        goes missing, so the subscribers resync)."""
        outbox = self._outbox
        if outbox.qsize() >= self.outbox_limit:
            outbox.get_nowait()
            outbox.task_done()
            self.metrics.dropped.inc()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning(
                    "fan-out outbox full (%d messages, Redis unreachable): dropped %d so far; "
                    "the other replicas resync from the store",
                    self.outbox_limit,
                    self.dropped,
                )
        outbox.put_nowait(message)

    async def _publish_loop(self) -> None:
        assert self._redis is not None
        first, longest = PUBLISH_RETRY_S
        while True:
            messages = [await self._outbox.get()]
            while not self._outbox.empty() and len(messages) < 500:
                messages.append(self._outbox.get_nowait())
            delay = first
            failures = 0
            logged = 0.0
            while True:
                try:
                    # One round trip for everything queued, in order.
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for message in messages:
                            pipe.publish(self.channel, message)
                        await pipe.execute()
                    self.published += len(messages)
                    for _ in messages:
                        self._outbox.task_done()
                    if failures:
                        log.warning("redis publish works again after %d failure(s)", failures)
                    break
                except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                    failures += 1
                    if time.monotonic() - logged >= PUBLISH_LOG_EVERY_S:
                        logged = time.monotonic()
                        log.warning(
                            "redis publish failed (%s); %d message(s) waiting, retrying",
                            exc,
                            len(messages) + self._outbox.qsize(),
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, longest)

    def run_started(self, run_id: str, owner: str) -> None:
        self._send("run", run=run_id, u=owner)

    def committed(self, items: Sequence[Emitted]) -> None:
        """The writer's sink: publish committed events, reusing each one's serialized JSON."""
        head = f'"i":{json.dumps(self.instance)},"t":{now_us()}'
        for item in items:
            self._queue(
                f'{{"k":"ev",{head},"n":{self._next()},"u":{json.dumps(item.owner)},'
                f'"live":{"true" if item.live else "false"},"e":{item.text}}}'
            )

    async def cancel(self, run_id: str) -> None:
        self._send("cancel", run=run_id)

    def ack(self, run_id: str, seq: int, acked_us: int) -> None:
        self._send("ack", run=run_id, seq=seq, t=acked_us)

    def presence_changed(self, users: set[str]) -> None:
        self._send("presence", users=sorted(users))

    async def _presence_loop(self) -> None:
        assert self._inbound is not None
        while True:
            self.presence_changed(self._inbound.local_users())
            await asyncio.sleep(PRESENCE_EVERY_S)

    def owner_elsewhere(self, user_id: str) -> bool:
        """True when ``user_id`` has a connection on another live replica."""
        seen = self._remote.get(user_id)
        if not seen:
            return False
        cutoff = time.monotonic() - PRESENCE_TTL_S
        return any(t >= cutoff for t in seen.values())

    # ---- receiving ---------------------------------------------------------------------

    async def _reconnected(self, connection: Any) -> None:
        # Called by redis-py inside its connect: only note it; the resync runs on its own.
        self.resubscribed += 1
        log.warning("redis subscription was re-established; messages may have been lost")
        asyncio.get_running_loop().call_soon(self._lost, "reconnect")

    def _lost(self, reason: str, since_us: int | None = None) -> None:
        if self._inbound is not None:
            self._inbound.lost(reason, self._heard_us if since_us is None else since_us)

    async def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                log.warning("redis subscription failed (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                try:
                    await pubsub.subscribe(self.channel)
                except (aioredis.RedisError, OSError) as again:
                    # The next read fails too and comes back here, with a warning.
                    log.info("redis resubscribe failed: %s", again)
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                self._apply(json.loads(message["data"]))
            except Exception:
                log.exception("bad fan-out message ignored")
            self._heard_us = now_us()

    def _apply(self, msg: dict[str, Any]) -> None:
        if msg.get("i") == self.instance:
            return
        self.received += 1
        n = msg.get("n")
        if isinstance(n, int):
            instance = str(msg.get("i"))
            heard = self._heard.get(instance)
            heard_t = self._heard_t.get(instance)
            self._heard[instance] = n
            t = msg.get("t")
            if isinstance(t, int):
                self._heard_t[instance] = t
            if heard is not None and n > heard + 1:
                # Before this message is applied, so it waits behind the resync. What was lost
                # was queued after the last message heard from that replica, by its clock (not
                # after the last message heard from anyone: this replica's own keep coming, and
                # a publisher's backlog arrives late).
                log.warning("missed %d fan-out message(s) from %s", n - heard - 1, instance)
                self._lost("lost_messages", heard_t)
        kind = msg.get("k")
        inbound = self._inbound
        assert inbound is not None
        if kind == "ev":
            inbound.remote_event(Event.from_dict(msg["e"]), str(msg["u"]), bool(msg["live"]))
        elif kind == "run":
            inbound.remote_run_started(str(msg["run"]), str(msg["u"]))
        elif kind == "cancel":
            inbound.remote_cancel(str(msg["run"]))
        elif kind == "ack":
            inbound.remote_ack(str(msg["run"]), int(msg["seq"]), int(msg["t"]))
        elif kind == "presence":
            now = time.monotonic()
            users = set(msg.get("users", []))
            instance = str(msg["i"])
            for user in users:
                self._remote.setdefault(user, {})[instance] = now
            for user, seen in list(self._remote.items()):
                if user not in users:
                    seen.pop(instance, None)
                    if not seen:
                        del self._remote[user]
