"""Clocks (issue #11 item 7): the token expiry timer honours the leeway that verification
allows (docs/protocol.md), so a token accepted inside it is not closed at once."""

from __future__ import annotations

import asyncio
import json
import time

from runtime.protocol import Ping

from .conftest import LiveServer, open_ws


async def test_a_token_inside_the_leeway_stays_open_until_the_leeway_ends(
    live: LiveServer,
) -> None:
    live.rt.tokens.leeway_s = 3.0
    # Expired a second ago (``exp`` is whole seconds: one to two seconds ago): still accepted
    # (leeway 3 s), and closed one to two seconds later.
    token = live.rt.tokens.mint("alice", ttl_s=-1)
    async with await open_ws(live.ws_url, token) as ws:
        opened = time.monotonic()
        await ws.send(Ping().serialize())
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong"}
        await asyncio.wait_for(ws.wait_closed(), 10)
        lived = time.monotonic() - opened
    assert ws.close_code == 4401
    assert 0.5 < lived < 5.0, lived
