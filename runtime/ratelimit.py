"""A token bucket per key (the chat rate per user): ``burst`` tokens, ``refill_per_s`` back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TokenBuckets"]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    def __init__(
        self,
        burst: int,
        refill_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.burst = burst
        self.refill_per_s = refill_per_s
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, key: str) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.updated) * self.refill_per_s
            )
            bucket.updated = now
        return bucket

    def allowed(self, key: str) -> bool:
        """True (and one token taken) when ``key`` may act now."""
        bucket = self._bucket(key)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def retry_after(self, key: str) -> float:
        bucket = self._bucket(key)
        if bucket.tokens >= 1.0 or self.refill_per_s <= 0:
            return 0.0
        return (1.0 - bucket.tokens) / self.refill_per_s

    def _evict(self, now: float) -> None:
        # Full buckets carry no state worth keeping.
        for key in [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.refill_per_s >= self.burst
        ]:
            del self._buckets[key]
