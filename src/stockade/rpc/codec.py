"""How an RPC server's messages are framed, read and written: JSON lines (the daemon), CBOR frames (the broker).

A codec makes one ``Framer`` per connection (bytes in, whole frames out,
``TOO_LARGE`` in a frame's place when it is over the limit), reads a frame
into a request (``decode``, ValueError when it cannot), writes an answer
(``encode``), and says which bytes a request's HMAC covers (``canonical``).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from pydantic import BaseModel

from ..protocol import auth
from ..result import Serialised

TOO_LARGE = None  # a frame's place in the queue when it was over the limit: answered in its turn


class Framer(Protocol):
    def single(self, data: bytes) -> bytes | None:
        """``data`` as one whole frame when it is exactly that and nothing is buffered (the fast path)."""

    def feed(self, data: bytes) -> list[bytes | None]:
        """The frames ``data`` completes (``TOO_LARGE`` for one over the limit)."""

    def end(self) -> list[bytes | None]:
        """At end of file: what is left that still counts as a frame."""

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not complete yet."""


class Codec(Protocol):
    name: str

    def framer(self, limit: int) -> Framer: ...

    def decode(self, frame: bytes) -> Any: ...

    def encode(self, answer: dict[str, Any]) -> bytes: ...

    def canonical(self, message: dict[str, Any]) -> bytes: ...


class _Lines:
    """Newline-delimited frames; a line over the limit is dropped up to its newline."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False  # inside an oversized line: dropped up to its newline

    def single(self, data: bytes) -> bytes | None:
        if self._buffer or self._skipping:
            return None
        end = data.find(b"\n")
        if end == len(data) - 1 and end <= self.limit:
            return data[:end].strip()
        return None

    def feed(self, data: bytes) -> list[bytes | None]:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return []
            data = data[end + 1 :]
            self._skipping = False
        frames: list[bytes | None] = []
        buffer = self._buffer
        searched = len(buffer)  # what it held has no newline: only the new bytes are searched
        buffer += data
        start, end = 0, buffer.find(b"\n", searched)
        while end >= 0:
            frames.append(self._frame(bytes(buffer[start:end])))
            start = end + 1
            end = buffer.find(b"\n", start)
        del buffer[:start]
        if len(buffer) > self.limit:
            buffer.clear()
            frames.append(TOO_LARGE)
            self._skipping = True
        return [f for f in frames if f != b""]

    def end(self) -> list[bytes | None]:
        if self._skipping or not self._buffer:
            self._buffer.clear()
            return []
        last = self._frame(bytes(self._buffer))  # a last request without its newline still counts
        self._buffer.clear()
        return [last] if last != b"" else []

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _frame(self, line: bytes) -> bytes | None:
        return TOO_LARGE if len(line) > self.limit else line.strip()


class JsonLines:
    """The daemon's codec: one JSON object per line (seed 000)."""

    name = "JSON"

    def framer(self, limit: int) -> Framer:
        return _Lines(limit)

    def decode(self, frame: bytes) -> Any:
        return json.loads(frame)  # ValueError (UnicodeDecodeError is one) when it is not JSON

    def encode(self, answer: dict[str, Any]) -> bytes:
        result = answer.get("result")
        if isinstance(result, BaseModel | Serialised) and answer.get("error") is None:
            # A model or a result goes out through its own serializer (compact, text as UTF-8), in the
            # same key order as every other answer.
            msg_id = json.dumps(answer["id"])
            text = result.model_dump_json() if isinstance(result, BaseModel) else result.to_json()
            return f'{{"result": {text}, "error": null, "id": {msg_id}}}\n'.encode()
        # json.dumps' default separators: the seed's health check shows its answer byte for byte.
        return json.dumps(answer, default=_model_json).encode() + b"\n"

    def canonical(self, message: dict[str, Any]) -> bytes:
        return auth.json_canonical(message)


def _model_json(value: Any) -> Any:
    """A model or a result inside an answer (a list of them): its JSON form."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Serialised):  # ExecResult and the dataclasses it holds
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
