"""HMAC request signing for the daemon's Unix-socket RPC (seed 000, plus replay protection).

A signed request carries ``ts`` (unix seconds) and ``nonce`` (random hex) and
``hmac`` = HMAC-SHA256(token, json.dumps(request_without_hmac, sort_keys=True)),
exactly the seed's construction over a request that now includes ``ts`` and
``nonce``. The server refuses a bad or missing HMAC, a ``ts`` outside its window
and a nonce it has already seen, so a captured request cannot be replayed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib
import itertools
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from .hostjson import canonical

DEFAULT_WINDOW_S = 30.0


_BLOCK = 64  # SHA-256's block size, in bytes
# Messages up to this size are hashed by the interpreter's own SHA-256, longer
# ones by OpenSSL's: a request line is a few hundred bytes, and there the
# smaller code costs less right after an idle spell (30 against 44 µs for a
# whole MAC here); a large one (a file's data) is faster through OpenSSL.
_SHORT = 2048


def _small_sha256() -> Callable[..., Any]:
    """CPython's built-in SHA-256 (``_sha2`` from 3.12, ``_sha256`` before), else hashlib's."""
    for name in ("_sha2", "_sha256"):
        try:
            return cast(Callable[..., Any], importlib.import_module(name).sha256)
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


@functools.lru_cache(maxsize=8)
def _keyed(token: str) -> tuple[Any, Any, Any, Any]:
    """HMAC-SHA256 under ``token`` (RFC 2104), keyed once: the inner and outer
    hashes with the padded key already absorbed, for short messages and for
    long ones. Every request is signed or checked with the same token, so
    each MAC copies two of these instead of keying afresh; two plain hash
    copies cost a third less here than copying an ``hmac`` object, right
    after a sleep (docs/performance.md)."""
    key = token.encode("utf-8")
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner_pad, outer_pad = bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)
    small = _small_sha256()
    return small(inner_pad), small(outer_pad), hashlib.sha256(inner_pad), hashlib.sha256(outer_pad)


class _Nonces:
    """Nonces unique to this process: a random prefix and a counter.

    A nonce only has to be new (the HMAC is what makes it unforgeable), so it
    takes a counter instead of a call to the kernel's random source per
    request. A forked child draws a fresh prefix, or it would repeat its
    parent's nonces and see its requests refused as replays.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def next(self) -> str:
        # The prefix has a fixed length, so prefix + decimal count never repeats;
        # str() of an int costs half a format spec right after an idle spell.
        return self._prefix + str(next(self._counter))


_NONCES = _Nonces()
os.register_at_fork(after_in_child=_NONCES.reset)


def compute_hmac(request: dict[str, Any], token: str) -> str:
    unsigned = {k: v for k, v in request.items() if k != "hmac"}
    return _mac(canonical(unsigned).encode("utf-8"), token)


def _mac(message: bytes, token: str) -> str:
    """HMAC-SHA256(token, message) as hex: exactly ``hmac.new(...).hexdigest()`` (tested)."""
    short_inner, short_outer, long_inner, long_outer = _keyed(token)
    keyed_inner, keyed_outer = (short_inner, short_outer) if len(message) <= _SHORT else (long_inner, long_outer)
    inner = keyed_inner.copy()
    inner.update(message)
    outer = keyed_outer.copy()
    outer.update(inner.digest())
    return str(outer.hexdigest())


def _stamped(request: dict[str, Any], now: float | None) -> dict[str, Any]:
    # Milliseconds, as round(time.time(), 3) would give, by integer arithmetic:
    # round() of a float runs the decimal conversion, 20 µs here after a sleep.
    ts = time.time_ns() // 1_000_000 / 1000 if now is None else round(now, 3)
    return {**request, "ts": ts, "nonce": _NONCES.next()}


def sign(request: dict[str, Any], token: str, now: float | None = None) -> dict[str, Any]:
    """Return ``request`` with ``ts``, ``nonce`` and ``hmac`` added."""
    signed = _stamped(request, now)
    signed["hmac"] = compute_hmac(signed, token)
    return signed


def signed_line(request: dict[str, Any], token: str, now: float | None = None) -> bytes:
    """``sign(request)`` as the JSON bytes to send, serialized once.

    The canonical form the HMAC covers is sent as is, with the ``hmac`` member
    added at its end: the server parses it and checks the same bytes.
    """
    body = canonical(_stamped(request, now))
    return f'{body[:-1]}, "hmac": "{_mac(body.encode("utf-8"), token)}"}}'.encode()


class NonceCache:
    """Nonces seen within the window; bounded, oldest evicted first."""

    # How often the nonces too old to matter are dropped: not on every request,
    # which would cost each one a walk to the oldest entry.
    SWEEP_EVERY_S = 1.0

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_entries: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
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


def verify(
    request: dict[str, Any], token: str, nonces: NonceCache, now: float | None = None, raw: bytes | None = None
) -> bool:
    """Constant-time HMAC check, then freshness, then replay; never raises.

    ``raw``, the line ``request`` was parsed from, lets a line shaped like
    ``signed_line``'s be checked over its own bytes instead of a re-serialization.
    """
    given = request.get("hmac")
    if not isinstance(given, str):
        return False
    if not (
        _signed_bytes_match(raw, given, token)
        or hmac.compare_digest(given.encode(), compute_hmac(request, token).encode())
    ):
        return False
    now = time.time() if now is None else now
    ts, nonce = request.get("ts"), request.get("nonce")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or abs(now - ts) > nonces.window_s:
        return False
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
        return False
    return nonces.add(nonce, now)


def _signed_bytes_match(raw: bytes | None, given: str, token: str) -> bool:
    """True if ``raw`` is canonical bytes + ``, "hmac": "<given>"}`` and ``given`` is their HMAC.

    Sound because the MAC covers every byte but the appended member: the only
    line that passes for a signed body is that body with its own HMAC appended,
    and the request parsed from it is the body's, plus ``hmac``.
    """
    if raw is None:
        return False
    suffix = f', "hmac": "{given}"}}'.encode()
    if not raw.endswith(suffix) or len(raw) <= len(suffix):
        return False
    return hmac.compare_digest(given.encode(), _mac(raw[: -len(suffix)] + b"}", token).encode())
