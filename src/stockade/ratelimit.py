"""Rate limits: a sliding window per client key (seed 000's requests per second), and a token
bucket for what one isolate may make the host do (answers, parses, messages) outside its cgroup."""

from __future__ import annotations

import ipaddress
import time
from collections import deque


class SlidingWindowLimiter:
    """At most ``limit`` events per key in any ``window_s`` seconds."""

    def __init__(self, limit: int, window_s: float = 1.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: dict[object, deque[float]] = {}
        self._sweep_at = 0.0

    def allow(self, key: object, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now >= self._sweep_at:
            self._sweep(now)
        events = self._events.get(key)
        if events is None:  # not setdefault: that would build a deque on every call
            events = self._events[key] = deque()
        while events and now - events[0] >= self.window_s:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def _sweep(self, now: float) -> None:
        """Forget keys with no event in the window: a client naming a new key per request
        (an HTTP ``agent_id``) must not grow the daemon's memory. Once a window."""
        stale = [key for key, events in self._events.items() if not events or now - events[-1] >= self.window_s]
        for key in stale:
            del self._events[key]
        self._sweep_at = now + self.window_s

    def __len__(self) -> int:
        return len(self._events)

    def wait_s(self, key: object, now: float | None = None) -> float:
        """Seconds until ``key`` may make its next event (0 when it may now)."""
        now = time.monotonic() if now is None else now
        events = self._events.get(key)
        if not events or len(events) < self.limit:
            return 0.0
        return max(0.0, self.window_s - (now - events[0]))


class TokenBucket:
    """``rate`` a second sustained, ``burst`` at once. Not locked: one owner thread, or its lock."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, time.monotonic() if now is None else now

    def take(self, amount: float = 1.0, now: float | None = None) -> bool:
        """Take ``amount`` if the bucket holds it; False (nothing taken) when it does not."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def spend(self, amount: float, now: float | None = None) -> float:
        """Take ``amount``, a cost known once paid, into debt if need be; what is left (below 0: owed)."""
        self.take(0.0, now)
        self.tokens -= amount
        return self.tokens

    def ready_at(self, amount: float) -> float:
        """When the bucket will hold ``amount`` (monotonic seconds; now or earlier if it does)."""
        return self.at + max(0.0, amount - self.tokens) / self.rate


def peer_network(host: str | None) -> str:
    """The network a client is counted in: its /24 (IPv4, mapped IPv4 too) or its /64 (IPv6); the
    host's loopback, all of it, is one (any local user may send from any of 127.0.0.0/8)."""
    if not host:
        return ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
