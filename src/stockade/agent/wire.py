"""Framing and JSON-RPC 2.0 for the guest agent protocol (seed 001).

A frame is ``[u32 little-endian length][payload]``; the payload is one UTF-8
JSON-RPC 2.0 object. Frames larger than ``MAX_FRAME`` (10 MiB) are refused
before a single payload byte is read, so a hostile peer cannot make either side
allocate more than that.

This module is stdlib-only: it is imported by the agent inside isolates (run by
``/usr/bin/python3 -I``) and by the host. Both sides use the same functions.
"""

from __future__ import annotations

import binascii
import os
import struct

from . import jsoncodec

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any

MAX_FRAME = 10 * 1024 * 1024  # seed 001: "Max message size: 10MB"
# Raw bytes a message can carry base64-encoded (output, stdin, file data) and
# still fit one frame: 7 MiB grows to 9.33 MiB, leaving room for the rest.
MAX_DATA_BYTES = 7 * 1024 * 1024
MAX_FILE_PIECE = MAX_FRAME // 2  # what one read_file reply carries (base64 grows it by 4/3)
VSOCK_PORT = 5252  # seed 001: the agent's port where vsock exists

# JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

_HEADER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size


class FrameError(Exception):
    """The byte stream does not hold a valid frame (too large, cut short)."""


class RPCError(Exception):
    """A JSON-RPC error, raised by a method handler or decoded from a reply."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte cap")
    return _HEADER.pack(len(payload)) + payload


def encode_message(message: dict[str, Any]) -> bytes:
    return encode_frame(jsoncodec.dumps(message).encode())


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes; EOFError if the peer closes first."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a descriptor (pipe, device, file), however the kernel splits it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def frame_length(header: bytes) -> int:
    """The payload length a frame's 4-byte header announces; FrameError past the cap."""
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"frame length {length} exceeds the {MAX_FRAME}-byte cap")
    return int(length)


def read_frame(sock: socket.socket) -> bytes:
    """Read one frame; EOFError on a clean close before a header, FrameError otherwise."""
    first = sock.recv(HEADER_SIZE)
    if not first:
        raise EOFError("peer closed the connection")
    try:
        header = first + (recv_exact(sock, HEADER_SIZE - len(first)) if len(first) < HEADER_SIZE else b"")
        return recv_exact(sock, frame_length(header))
    except EOFError as exc:
        raise FrameError("connection closed in the middle of a frame") from exc


def decode_payload(payload: bytes) -> Any:
    """Bytes to JSON; RPCError(PARSE_ERROR) for bad UTF-8 or bad JSON."""
    try:
        return jsoncodec.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise RPCError(PARSE_ERROR, "Parse error", str(exc)) from None


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode_message(message))


def request(method: str, params: dict[str, Any], msg_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}


def response(msg_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def error_response(msg_id: Any, error: RPCError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": error.to_json()}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def b64encode(data: bytes) -> str:
    """Base64 without ``base64`` (which imports ``re``: slow to load under gVisor)."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict base64 (like ``base64.b64decode(validate=True)``); ValueError when malformed."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(str(exc)) from None
