"""How many values a JSON document holds, at most, counted before it is parsed.

Parsed, each JSON value is a Python object of its own, ~50-150 bytes: a 16 MiB request of
``[{},{},...]`` took the daemon half a GiB, where a large request a client means (a file, code,
stdin) is mostly one string. Its separators and openings are counted first (three searches in C);
only when that passes the limit are its strings taken out and the count made again, so that text
full of commas (code, a CSV) is not taken for a flood.
"""

from __future__ import annotations

import json
import re

# A JSON string's escape pairs, then its strings: two passes in C, each match consuming what it
# matched, so nothing is scanned twice (one pattern for a whole string rescanned an unclosed one
# from each escaped quote in it: quadratic, the GIL held, a host stopped for hours).
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')


# The values one request to the daemon may hold, on either door (a file, code or stdin is one string).
MAX_REQUEST_VALUES = 200_000


def too_many_values(request: bytes) -> str | None:
    """Why a request to the daemon (a JSON body, a line) is refused unparsed; None when it is not."""
    if values_at_most(request, MAX_REQUEST_VALUES) <= MAX_REQUEST_VALUES:
        return None
    return f"Invalid request: more than {MAX_REQUEST_VALUES} JSON values (a file or code is one string)"


def values_at_most(data: bytes, limit: int) -> int:
    """At most how many JSON values ``data`` holds: exact enough past ``limit`` to refuse on."""
    quick = openings(data)
    if quick <= limit or json.detect_encoding(data) != "utf-8":
        # UTF-16 or 32 (json's parser reads them too): their strings cannot be told byte by byte, and
        # an escape's NUL half taken for a character left a stray quote that hid the whole flood.
        return quick
    bare = _STRING.sub(b'""', _ESCAPE.sub(b"", data))  # an unclosed string's rest stays, counted: over, not under
    return openings(bare)


def openings(data: bytes) -> int:
    """Its separators and openings, those inside its strings too: never fewer than its values (less one)."""
    return data.count(b",") + data.count(b"[") + data.count(b"{")
