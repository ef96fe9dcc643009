"""HMAC request signing for the daemon's Unix-socket RPC (seed 000, plus replay protection).

A signed request carries ``ts`` (unix seconds) and ``nonce`` (random hex) and
``hmac`` = HMAC-SHA256(token, json.dumps(request_without_hmac, sort_keys=True)),
exactly the seed's construction over a request that now includes ``ts`` and
``nonce``. The server refuses a bad or missing HMAC, a ``ts`` outside its window
and a nonce it has already seen, so a captured request cannot be replayed.

Boring on purpose: ``hmac.new`` and ``hmac.compare_digest``, ``json`` and
``secrets`` from the standard library, nothing hand-rolled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

DEFAULT_WINDOW_S = 30.0


Encode = Callable[[dict[str, Any]], bytes]


def json_canonical(message: dict[str, Any]) -> bytes:
    """The seed's signed form: ``json.dumps(message, sort_keys=True)``."""
    return json.dumps(message, sort_keys=True).encode()


def compute_hmac(request: dict[str, Any], token: str | bytes, encode: Encode = json_canonical) -> str:
    """HMAC-SHA256 under ``token`` of the request without its ``hmac`` member (as ``encode``
    writes it: the daemon's JSON, the broker's canonical CBOR), as hex."""
    unsigned = {k: v for k, v in request.items() if k != "hmac"}
    key = token.encode() if isinstance(token, str) else token
    return hmac.new(key, encode(unsigned), hashlib.sha256).hexdigest()


def sign(
    request: dict[str, Any], token: str | bytes, now: float | None = None, encode: Encode = json_canonical
) -> dict[str, Any]:
    """Return ``request`` with ``ts``, ``nonce`` and ``hmac`` added."""
    # Milliseconds, rounded down: a request is never stamped later than it was made.
    ts = time.time_ns() // 1_000_000 / 1000 if now is None else round(now, 3)
    signed = {**request, "ts": ts, "nonce": secrets.token_hex(16)}
    signed["hmac"] = compute_hmac(signed, token, encode)
    return signed


def signed_line(request: dict[str, Any], token: str, now: float | None = None) -> bytes:
    """``sign(request)`` as the JSON bytes to send (without the newline)."""
    return json.dumps(sign(request, token, now)).encode()


class NonceCache:
    """Nonces seen within the window; bounded, oldest evicted first."""

    # How often the nonces too old to matter are dropped: not on every request,
    # which would cost each one a walk to the oldest entry.
    SWEEP_EVERY_S = 1.0

    def __init__(
        self, window_s: float = DEFAULT_WINDOW_S, max_entries: int = 1_000_000, since: float | None = None
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        # No request signed before this (its server's start, a whole second: a client's ts may be
        # coarse) is taken: the nonces seen before it are not known here, and a request caught then
        # could be sent again after a restart. Held only for one window from the start (by the
        # monotonic clock): past it, no ts the window accepts is older, and a wall clock stepped
        # back later cannot make every request look too old.
        self.since = since
        self.since_until = time.monotonic() + window_s
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._sweep_at = -math.inf

    def add(self, nonce: str, now: float) -> bool:
        """Record ``nonce``; False if it was already seen (a replay)."""
        seen = self._seen
        if now >= self._sweep_at or len(seen) >= self.max_entries:
            self._sweep(now)
        if nonce in seen:
            return False
        seen[nonce] = now
        return True

    def _sweep(self, now: float) -> None:
        # A nonce is kept for twice the window: a request is refused by its ts
        # once it is a window old either way, so none still accepted is forgotten.
        seen = self._seen
        while seen:
            oldest, seen_at = next(iter(seen.items()))
            if now - seen_at <= self.window_s * 2 and len(seen) < self.max_entries:
                break
            del seen[oldest]
        self._sweep_at = now + self.SWEEP_EVERY_S


def _before(ts: float, since: float) -> bool:
    """Whether ``ts`` was stamped before ``since``: a whole second (a coarse clock's) counts from the
    second ``since`` falls in, any other ts from ``since`` itself."""
    return ts < (math.floor(since) if float(ts).is_integer() else since)


def verify(
    request: dict[str, Any],
    token: str | bytes,
    nonces: NonceCache,
    now: float | None = None,
    encode: Encode = json_canonical,
) -> bool:
    """Constant-time HMAC check, then freshness, then replay; never raises."""
    given = request.get("hmac")
    if not isinstance(given, str):
        return False
    try:
        expected = compute_hmac(request, token, encode)
    except (TypeError, ValueError, RecursionError):  # a value the encoder cannot write, or nested past its depth
        return False
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return False
    now = time.time() if now is None else now
    ts, nonce = request.get("ts"), request.get("nonce")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return False
    if isinstance(ts, int) and not -(2**53) <= ts <= 2**53:  # as a float it would overflow, or not be itself
        return False
    if not abs(now - ts) <= nonces.window_s:
        return False
    if nonces.since is not None and time.monotonic() < nonces.since_until and _before(ts, nonces.since):
        return False
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
        return False
    return nonces.add(nonce, now)
