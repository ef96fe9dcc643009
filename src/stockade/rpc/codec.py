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
    """Bytes in, frames out, at most as many at a time as the reader has room for: one read
    (256 KiB) of tiny frames would otherwise be tens of thousands of objects at once, before any
    bound on what a connection may queue could pause its reading."""

    def single(self, data: bytes) -> bytes | None:
        """``data`` as one whole frame when it is exactly that and nothing is buffered (the fast path)."""

    def feed(self, data: bytes, room: int) -> list[bytes | None]:
        """The frames ``data`` completes (``TOO_LARGE`` for one over the limit), at most ``room``
        and one ``TOO_LARGE`` (a line cut short at the limit); the others stay buffered
        (``pending``), for the next ``feed`` (``data`` may be empty)."""

    def end(self) -> list[bytes | None]:
        """At end of file, once nothing is ``pending``: what is left that still counts as a frame."""

    @property
    def pending(self) -> bool:
        """Whether whole frames are buffered, left for want of room."""

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
        self._searched = 0  # bytes at the buffer's start known to hold no newline
        self._pending = False
        self._skipping = False  # inside an oversized line: dropped up to its newline

    def single(self, data: bytes) -> bytes | None:
        if self._buffer or self._skipping:
            return None
        end = data.find(b"\n")
        if end == len(data) - 1 and end <= self.limit:
            return data[:end].strip()
        return None

    def feed(self, data: bytes, room: int) -> list[bytes | None]:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return []
            data = data[end + 1 :]
            self._skipping = False
        frames: list[bytes | None] = []
        buffer = self._buffer
        buffer += data
        start, end = 0, buffer.find(b"\n", self._searched)
        while end >= 0 and len(frames) < room:
            frame = self._frame(bytes(buffer[start:end]))
            if frame != b"":  # a blank line is no request
                frames.append(frame)
            start = end + 1
            end = buffer.find(b"\n", start)
        del buffer[:start]
        self._pending = end >= 0
        self._searched = 0 if self._pending else len(buffer)
        if not self._pending and len(buffer) > self.limit:
            buffer.clear()
            self._searched = 0
            frames.append(TOO_LARGE)
            self._skipping = True
        return frames

    def end(self) -> list[bytes | None]:
        if self._skipping or not self._buffer:
            self._buffer.clear()
            return []
        last = self._frame(bytes(self._buffer))  # a last request without its newline still counts
        self._buffer.clear()
        return [last] if last != b"" else []

    @property
    def pending(self) -> bool:
        return self._pending

    @property
    def buffered(self) -> int:
        if not self._pending:
            return len(self._buffer)
        return len(self._buffer) - self._buffer.rfind(b"\n") - 1  # after the last whole line

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
