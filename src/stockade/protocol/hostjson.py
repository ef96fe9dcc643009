"""The host's JSON: ``json.loads`` and ``json.dumps``, byte for byte, by the shortest path.

The daemon and its client each touch JSON a few times per request, mostly
right after sleeping: on this kind of VM a process that has slept runs its
next steps several times slower than in a hot loop, in proportion to the
code it passes through (docs/performance.md). ``json.dumps`` builds a C
encoder on every call, behind two Python frames; ``json.loads`` detects the
encoding and matches a regular expression before the C scanner starts.
Measured right after a 30 ms sleep: ``json.loads`` of a request line 84 µs,
``raw_decode`` of the same line 46 µs; ``json.dumps(..., sort_keys=True)``
82 µs, a C encoder built once 56 µs. The output and the errors are the
standard library's (tests/unit/test_hostjson.py compares them; the agent has its own
codec, agent/jsoncodec.py, as it runs without the standard json module).
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any

_DECODER = json.JSONDecoder()
_PLAIN = json.JSONEncoder()
_SORTED = json.JSONEncoder(sort_keys=True)


def _c_encoder(like: json.JSONEncoder) -> Callable[[Any], str]:
    """``like.encode``, through one C encoder built now instead of one per call.

    The encoder is built without cycle detection (its ``markers`` would be
    shared by every call, and an encoding that fails part way leaves entries
    behind in them); a structure that contains itself then fails with
    ``RecursionError`` instead of ``ValueError``. Where the C accelerator is
    missing, ``like.encode`` itself.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return like.encode
    encode_one = make(
        None,
        like.default,
        json.encoder.encode_basestring_ascii,
        None,
        like.key_separator,
        like.item_separator,
        like.sort_keys,
        like.skipkeys,
        like.allow_nan,
    )

    def encode(obj: Any) -> str:
        return "".join(encode_one(obj, 0))

    return encode


dumps: Callable[[Any], str] = _c_encoder(_PLAIN)
"""``json.dumps(obj)``: default separators, ASCII only."""

canonical: Callable[[Any], str] = _c_encoder(_SORTED)
"""``json.dumps(obj, sort_keys=True)``: the form a request's HMAC covers."""


def loads(line: bytes) -> Any:
    """``json.loads(line)``: the same value, or the same error.

    A UTF-8 document with no space around it (a request line, stripped) goes
    straight to the decoder's C scanner; anything else (a BOM, another
    encoding, leading space, a second document, bad JSON) is left to
    ``json.loads``, whose answer or error is then the one returned.
    """
    try:
        text = line.decode("utf-8")
        value, end = _DECODER.raw_decode(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return json.loads(line)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        return json.loads(line)  # "Extra data", as json.loads words it
    return value


def id_json(msg_id: Any) -> str:
    """``json.dumps(msg_id)`` for a request id, with no encoder at all for the usual integer."""
    if type(msg_id) is int:
        return str(msg_id)
    if msg_id is None:
        return "null"
    return dumps(msg_id)
