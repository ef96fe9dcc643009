"""HMAC request signing for the daemon's Unix-socket RPC (seed 000, plus replay protection).

A signed request carries ``ts`` (unix seconds) and ``nonce`` (random hex) and
``hmac`` = HMAC-SHA256(token, json.dumps(request_without_hmac, sort_keys=True)),
exactly the seed's construction over a request that now includes ``ts`` and
``nonce``. The server refuses a bad or missing HMAC, a ``ts`` outside its window
and a nonce it has already seen, so a captured request cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from typing import Any

DEFAULT_WINDOW_S = 30.0


def compute_hmac(request: dict[str, Any], token: str) -> str:
    unsigned = {k: v for k, v in request.items() if k != "hmac"}
    message = json.dumps(unsigned, sort_keys=True).encode("utf-8")
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(request: dict[str, Any], token: str, now: float | None = None) -> dict[str, Any]:
    """Return ``request`` with ``ts``, ``nonce`` and ``hmac`` added."""
    signed = dict(request)
    signed["ts"] = round(time.time() if now is None else now, 3)
    signed["nonce"] = secrets.token_hex(16)
    signed["hmac"] = compute_hmac(signed, token)
    return signed


class NonceCache:
    """Nonces seen within the window; bounded, oldest evicted first."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_entries: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, nonce: str, now: float) -> bool:
        """Record ``nonce``; False if it was already seen (a replay)."""
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if now - seen_at <= self.window_s * 2 and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


def verify(request: dict[str, Any], token: str, nonces: NonceCache, now: float | None = None) -> bool:
    """Constant-time HMAC check, then freshness, then replay; never raises."""
    given = request.get("hmac")
    if not isinstance(given, str):
        return False
    expected = compute_hmac(request, token)
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return False
    now = time.time() if now is None else now
    ts, nonce = request.get("ts"), request.get("nonce")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or abs(now - ts) > nonces.window_s:
        return False
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
        return False
    return nonces.add(nonce, now)
