"""JSON for the agent, on CPython's C accelerator alone.

``import json`` pulls in ``re``, ``enum``, ``functools`` and ``collections``:
~40 ms inside gVisor, where every file the interpreter opens goes through the
gofer. The C functions behind ``json`` (module ``_json``) need none of that.
The output is what ``json.dumps(obj, separators=(",", ":"))`` gives; parsing
accepts what ``json.loads`` accepts (and raises ``ValueError`` like it).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_json: Any  # typeshed describes _json's functions too narrowly for this use
try:
    import _json
except ImportError:  # not CPython: the full module is fine there
    _json = None

_INF = float("inf")
_CONSTANTS = {"-Infinity": -_INF, "Infinity": _INF, "NaN": float("nan")}


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict[str, str] = {}


def _default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


if _json is not None:
    _scan_once = _json.make_scanner(_ScanContext())
    _encode = _json.make_encoder(None, _default, _json.encode_basestring_ascii, None, ":", ",", False, False, True)

    def dumps(obj: Any) -> str:
        return "".join(_encode(obj, 0))

    def loads(data: bytes | str) -> Any:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        start = _skip_ws(text, 0)
        try:
            obj, end = _scan_once(text, start)
        except StopIteration:
            raise ValueError(f"Expecting value at char {start}") from None
        except SystemError:
            # The C scanner reports some errors through json.decoder.JSONDecodeError,
            # which it only finds if json.decoder was imported: without it, CPython
            # signals "returned NULL without setting an exception".
            raise ValueError(f"Invalid JSON after char {start}") from None
        finally:
            _ScanContext.memo.clear()
        end = _skip_ws(text, end)
        if end != len(text):
            raise ValueError(f"Extra data at char {end}")
        return obj

else:  # pragma: no cover
    import json

    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"))

    def loads(data: bytes | str) -> Any:
        return json.loads(data)


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in " \t\n\r":
        i += 1
    return i
