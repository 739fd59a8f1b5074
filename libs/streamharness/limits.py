"""Rate limits: token buckets per session and per tenant (the gateway's questions and instruction
changes, ingest's frames per tenant).

A bucket holds ``burst`` tokens and refills at ``rate`` per second; :meth:`TokenBucket.take` either
takes one and returns 0, or takes none and returns the seconds until one is there (what a
RESOURCE_EXHAUSTED says as "resets in"). Limits of a tenant are per replica: with N gateway
replicas a tenant gets up to N times the rate (the chart's replica count is the multiplier).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Buckets:
    """One bucket per name (a tenant), created on first use; the least recently used are forgotten
    beyond ``max_names`` (a forgotten bucket comes back full, which only ever errs on the lenient side)."""

    def __init__(self, rate: float, burst: float, max_names: int = 100_000) -> None:
        self.rate, self.burst, self.max_names = rate, burst, max_names
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, name: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = self._buckets[name] = TokenBucket(self.rate, self.burst, stamp=now)
                if len(self._buckets) > self.max_names:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(name)
            return bucket.take(now)
