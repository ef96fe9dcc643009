"""The broker's messages: canonical CBOR, length-prefixed, each signed with the session key.

A frame is a 4-byte big-endian length and that many bytes of CBOR: one map.
Requests are ``{"method", "params", "id", "ts", "nonce", "hmac"}``, answers
``{"id", "result" | "error", "ts", "nonce", "hmac"}``; ``hmac`` is HMAC-SHA256
under the session key of the map without it, in canonical CBOR (RFC 8949
core deterministic encoding: the same map always gives the same bytes). Both
sides refuse a frame whose HMAC is wrong, whose ``ts`` is outside the replay
window, or whose nonce they have seen (protocol/auth.py, shared with the daemon); the client also
refuses an "answer" that is a request (one key signs both ways: a request sent back verifies).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import struct
from typing import Any

import cbor2

from ..errors import ConfigError
from ..protocol import auth

MAX_FRAME = 64 * 1024
KEY_BYTES = 32
_LENGTH = struct.Struct(">I")


def canonical(message: dict[str, Any]) -> bytes:
    return cbor2.dumps(message, canonical=True)


def frame(message: dict[str, Any], key: bytes) -> bytes:
    body = canonical(auth.sign(message, key, encode=canonical))
    return _LENGTH.pack(len(body)) + body


def length_of(header: bytes) -> int:
    length: int = _LENGTH.unpack(header)[0]
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is larger than {MAX_FRAME}")
    return length


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"not CBOR: {exc}") from None
    if not isinstance(message, dict):
        raise ValueError("a message is a CBOR map")
    return message


def verify(message: dict[str, Any], key: bytes, nonces: auth.NonceCache) -> bool:
    return auth.verify(message, key, nonces, encode=canonical)


def parse_key(raw: str, where: str) -> bytes:
    """``STOCKADE_SESSION_KEY``'s base64 (as the seed's), at least 32 bytes once decoded."""
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where} is not base64") from None
    if len(key) < KEY_BYTES:
        raise ConfigError(f"{where} holds {len(key)} bytes: a session key is at least {KEY_BYTES}")
    return key


def read_key(path: str) -> bytes:
    try:
        with open(path) as f:
            return parse_key(f.read(), f"session key {path}")
    except OSError as exc:
        raise ConfigError(f"cannot read the session key {path}: {exc.strerror}") from None


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key(path: str, key: bytes, gid: int | None = None, owner: int | None = None) -> None:
    """The session key, base64, mode 0640: its owner (the broker) and ``gid`` (the daemon's group) read it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, base64.b64encode(key) + b"\n")
        if gid is not None or owner is not None:
            os.fchown(fd, -1 if owner is None else owner, -1 if gid is None else gid)
        os.fchmod(fd, 0o640)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _Frames:
    """Length-prefixed frames; one over the limit is skipped whole (its length is known)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversized frame still to drop

    def single(self, data: bytes) -> bytes | None:
        if self._buffer or self._skip or len(data) < 4:
            return None
        length = int.from_bytes(data[:4], "big")
        return data[4:] if length == len(data) - 4 and length <= self.limit else None

    def feed(self, data: bytes, room: int) -> list[bytes | None]:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buffer = self._buffer
        buffer += data
        frames: list[bytes | None] = []
        start = 0
        while len(buffer) - start >= 4 and len(frames) < room:
            length = int.from_bytes(buffer[start : start + 4], "big")
            if length > self.limit:
                frames.append(None)  # codec.TOO_LARGE
                dropped = min(length, len(buffer) - start - 4)
                self._skip = length - dropped
                start += 4 + dropped
                continue
            if len(buffer) - start < 4 + length:
                break
            frames.append(bytes(buffer[start + 4 : start + 4 + length]))
            start += 4 + length
        del buffer[:start]
        return frames

    def end(self) -> list[bytes | None]:
        self._buffer.clear()  # a frame cut short by the end is no request
        return []

    @property
    def pending(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 4:
            return False
        length = int.from_bytes(buffer[:4], "big")
        return length > self.limit or len(buffer) >= 4 + length  # TOO_LARGE, or a whole frame

    @property
    def buffered(self) -> int:
        return 0 if self.pending else len(self._buffer)


class CborFrames:
    """The broker's codec (rpc/codec.py): length-prefixed canonical CBOR, every answer signed too."""

    name = "CBOR"

    def __init__(self, key: bytes) -> None:
        self.key = key

    def framer(self, limit: int) -> _Frames:
        return _Frames(limit)

    def decode(self, frame: bytes) -> Any:
        return decode(frame)

    def encode(self, answer: dict[str, Any]) -> bytes:
        return frame(answer, self.key)

    def canonical(self, message: dict[str, Any]) -> bytes:
        return canonical(message)
