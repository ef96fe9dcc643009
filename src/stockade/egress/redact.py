"""Taking secret values back out of what leaves an isolate: output, files, results, replies.

A secret's value reaches the host's side of the proxy only; but an upstream
may echo it, and what the isolate then holds it may print or write. Whatever
the host hands back (stdout, stderr, a file read, a cell's result, an HTTP
reply passing through the proxy) goes through a ``Redactor`` first, which
replaces each value and counts the replacements.
"""

from __future__ import annotations

import builtins
import html
import json
import re
import threading
from collections.abc import Iterator, Mapping
from urllib.parse import quote, quote_plus


def written_forms(value: str) -> Iterator[str]:
    """``value`` and the ways a server that echoes it commonly writes it: in upper or lower case;
    escaped in a JSON string (as Python and most libraries do, as Go does, with ``/`` escaped as
    PHP does, or every character as ``\\uXXXX``); percent-encoded (as a path, or a form: ``+`` for
    a space; hex digits in either case); in HTML (as Python, Go and PHP escape it, or with
    numeric entities, decimal or hex). A value is visible ASCII and inner spaces (check_value):
    the code could unescape any of these. A host that writes it another way (base64, reversed)
    is not caught: bind a secret only to hosts that do not echo it."""
    in_json = json.dumps(value)[1:-1]
    encoded = {quote(value, safe=""), quote(value), quote_plus(value)}
    special = {c: ord(c) for c in "&<>\"'/"}
    forms = {
        value,
        value.upper(),
        value.lower(),
        in_json,
        in_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"),
        in_json.replace("/", "\\/"),
        "".join(f"\\u{ord(c):04x}" for c in value),
        "".join(f"\\u{ord(c):04X}" for c in value),
        *encoded,
        *(_PERCENT.sub(lambda m: m.group(0).lower(), e) for e in encoded),
        html.escape(value),
        html.escape(value).replace("&#x27;", "&#039;"),  # PHP's htmlspecialchars, ENT_QUOTES
        html.escape(value, quote=False).replace('"', "&#34;").replace("'", "&#39;"),
        "".join(f"&#x{special[c]:x};" if c in special else c for c in value),
        "".join(f"&#x{special[c]:X};" if c in special else c for c in value),
        "".join(f"&#{special[c]};" if c in special else c for c in value),
    }
    yield from sorted(forms)


_PERCENT = re.compile("%[0-9A-F]{2}")


def each_form(replacements: Mapping[str, str]) -> dict[bytes, bytes]:
    """``replacements`` (value -> what stands for it) with every written form of each value: a
    value's own bytes stand for it even where they are another value's escaped form (``a%2Fb``
    and ``a/b``: the first is its own secret, not the second one escaped)."""
    forms = {w.encode(): r.encode() for v, r in replacements.items() for w in written_forms(v)}
    forms.update((v.encode(), r.encode()) for v, r in replacements.items())
    return forms


class Redactor:
    """Replaces each value of ``replacements`` (value -> what stands for it) and counts the
    replacements, its own or (``tally``) another redactor's: one count for a run."""

    def __init__(self, replacements: Mapping[bytes, bytes], tally: Redactor | None = None) -> None:
        # Longest first: a value that contains another is replaced whole.
        self._pairs = sorted(((v, r) for v, r in replacements.items() if v), key=lambda p: -len(p[0]))
        self._tally = tally if tally is not None else self
        self._lock = threading.Lock()
        self.count = 0  # replacements since the last ``take_count``

    @classmethod
    def markers(cls, values: Mapping[str, str]) -> Redactor:
        """Each value of ``values`` (name -> value), written any of its ways (``written_forms``),
        by ``[REDACTED:NAME]``: what leaves an isolate."""
        return cls(each_form({v: f"[REDACTED:{k}]" for k, v in values.items()}))

    @property
    def longest(self) -> int:
        """The length, in bytes, of the longest form of a value it replaces."""
        return len(self._pairs[0][0]) if self._pairs else 0

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def bytes(self, data: bytes) -> bytes:
        if not self._pairs or not data:
            return data
        found = 0
        for value, marker in self._pairs:
            if value in data:
                found += data.count(value)
                data = data.replace(value, marker)
        self._tally.add(found)
        return data

    def found_in_any_case(self, data: builtins.bytes) -> bool:
        """Whether a value appears in ``data`` whatever the case of either (a header's name, which
        HTTP may lowercase on its way)."""
        folded = data.lower()
        return any(value.lower() in folded for value, _ in self._pairs)

    def text(self, data: str) -> str:
        if not self._pairs or not data:
            return data
        return self.bytes(data.encode("utf-8", "surrogatepass")).decode("utf-8", "surrogatepass")

    def json_text(self, data: str) -> str:
        """``data``, a JSON document, with each value replaced where it appears as JSON writes it."""
        if not self._pairs or not data:
            return data
        found = 0
        for value, marker in self._pairs:
            written = json.dumps(value.decode())[1:-1]
            if written in data:
                found += data.count(written)
                data = data.replace(written, marker.decode())
        self._tally.add(found)
        return data

    def add(self, count: int) -> None:
        """Count replacements made elsewhere (another redactor, the proxy's ``StreamRedactor``) with this run's."""
        if count:
            with self._lock:
                self.count += count

    def take_count(self) -> int:
        with self._lock:
            count, self.count = self.count, 0
        return count


class StreamRedactor:
    """``Redactor`` over a byte stream cut anywhere: a value split between two chunks is still
    found, and a value is never taken for a shorter one it begins with or holds (a value A that
    holds a value B, half of A in hand: B replaced in it would leave A's other half to pass).

    What comes is held until more than twice the longest value's length less one is in hand, then
    scanned once (not at each piece: an upstream that sends a reply a byte at a time would have
    every value looked for in the held-back bytes once per byte, on the egress worker's CPU,
    outside the isolate's cgroup). Only matches that begin more than that length less one from the
    end are replaced and sent on: every value that could begin there is whole in hand, so at each
    place the longest value that begins there is the one found (the leftmost place first: of two
    values that overlap without one holding the other, the later one's end is left). The rest is
    held raw, for the next scan or ``flush``."""

    def __init__(self, values: Mapping[bytes, bytes]) -> None:
        self._values = {v: r for v, r in values.items() if v}
        self._longest_first = tuple(sorted(self._values, key=len, reverse=True))
        self._keep = max(map(len, self._longest_first), default=1) - 1
        self._patterns: dict[tuple[bytes, ...], re.Pattern[bytes]] = {}
        self._held = bytearray()
        self.count = 0

    def feed(self, data: bytes) -> bytes:
        if not self._values:
            return data
        self._held += data
        if len(self._held) <= 2 * self._keep:
            return b""  # at most the held-back part, and as much again: scanned with what comes next
        whole = bytes(self._held)
        out, end = self._replace(whole, len(whole) - self._keep)
        self._held = bytearray(whole[end:])
        return out

    def flush(self) -> bytes:
        whole, self._held = bytes(self._held), bytearray()
        return self._replace(whole, len(whole) + 1)[0]

    def _replace(self, data: bytes, cut: int) -> tuple[bytes, int]:
        """``data`` up to ``cut`` (or the end of a match that begins before it) with every value
        replaced; and where that part ends."""
        # The values in hand looked for one by one first (a fast search each): a pattern of them all
        # would try each at every byte (Python's re has no trie), ten times slower on a reply of none.
        present = tuple(v for v in self._longest_first if v in data)
        if not present:
            end = min(cut, len(data))
            return data[:end], end
        pattern = self._patterns.get(present)
        if pattern is None:
            if len(self._patterns) >= 64:
                self._patterns.clear()
            pattern = self._patterns[present] = re.compile(b"|".join(map(re.escape, present)))
        pieces: list[bytes] = []
        done = 0
        for match in pattern.finditer(data):
            if match.start() >= cut:
                break
            pieces += [data[done : match.start()], self._values[match.group()]]
            done = match.end()
            self.count += 1
        end = max(done, min(cut, len(data)))
        pieces.append(data[done:end])
        return b"".join(pieces), end
