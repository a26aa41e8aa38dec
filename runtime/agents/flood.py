"""The ``flood`` agent: emits many ``text_delta`` events as fast as it can, for load and
backpressure tests. Not registered by default; add it with
``runwatch serve --agent flood=runtime.agents.flood:flood_agent``.

"flood N S" sends N deltas of S characters (defaults 1000 and 200; at most 100000 and 10000).
"""

from __future__ import annotations

import os
import re

from . import RunContext

__all__ = ["flood_agent"]

_ARGS = re.compile(r"(\d+)(?:\s+(\d+))?")


async def flood_agent(ctx: RunContext) -> str:
    match = _ARGS.search(ctx.input)
    count = min(int(match.group(1)), 100_000) if match else 1000
    size = min(int(match.group(2)), 10_000) if match and match.group(2) else 200
    await ctx.think(f"Sending {count} deltas of {size} characters.")
    for _ in range(count):
        # Random text: compression (permessage-deflate) must not shrink the load away.
        await ctx.delta(os.urandom((size + 1) // 2).hex()[:size])
    return f"sent {count} deltas"
