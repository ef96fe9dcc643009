"""Framing and JSON-RPC helpers shared by the host and the agent."""

from __future__ import annotations

import socket
import struct

import pytest

from stockade.agent import wire


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_frame_round_trip() -> None:
    a, b = _pair()
    with a, b:
        wire.send_message(a, wire.request("ping", {}, 7))
        payload = wire.read_frame(b)
        assert wire.decode_payload(payload) == {"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {}}


def test_header_is_u32_little_endian() -> None:
    frame = wire.encode_frame(b"abc")
    assert frame[:4] == struct.pack("<I", 3) and frame[4:] == b"abc"


def test_oversized_frame_refused_before_reading_payload() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(struct.pack("<I", wire.MAX_FRAME + 1))
        with pytest.raises(wire.FrameError, match="exceeds"):
            wire.read_frame(b)


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(wire.FrameError):
        wire.encode_frame(b"x" * (wire.MAX_FRAME + 1))


def test_truncated_frame_is_an_error_not_a_hang() -> None:
    a, b = _pair()
    with b:
        a.sendall(struct.pack("<I", 100) + b"short")
        a.close()
        with pytest.raises(wire.FrameError, match="middle of a frame"):
            wire.read_frame(b)


def test_clean_close_is_eof() -> None:
    a, b = _pair()
    with b:
        a.close()
        with pytest.raises(EOFError):
            wire.read_frame(b)


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"{not json", b""])
def test_bad_payload_is_parse_error(payload: bytes) -> None:
    with pytest.raises(wire.RPCError) as info:
        wire.decode_payload(payload)
    assert info.value.code == wire.PARSE_ERROR


def test_error_response_shape() -> None:
    err = wire.RPCError(wire.INVALID_PARAMS, "bad", {"x": 1})
    assert wire.error_response(3, err) == {
        "jsonrpc": "2.0",
        "id": 3,
        "error": {"code": -32602, "message": "bad", "data": {"x": 1}},
    }
