"""A connection reads ahead of the request being answered only as far as its queue has room."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from stockade.broker import wire
from stockade.rpc.codec import JsonLines
from stockade.rpc.connection import MAX_QUEUED_LINES, Connection


class _Transport:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False


class _UnderWay:
    def join(self, connection: Any) -> None:
        connection.line_under_way = "reading"

    def leave(self, connection: Any) -> None:
        connection.line_under_way = None


def _busy_connection(codec: Any) -> tuple[Connection, _Transport]:
    """A connection whose first request is being answered (a run under way): what comes next waits."""
    server: Any = SimpleNamespace(config=SimpleNamespace(max_request_bytes=1 << 20), codec=codec,
                                  lines_under_way=_UnderWay())  # fmt: skip
    connection = Connection(server, 1)
    transport = _Transport()
    connection.transport = transport  # type: ignore[assignment]
    connection.refused = False
    connection._busy = True
    return connection, transport


def test_a_read_of_tiny_requests_queues_no_more_than_the_queue_holds_and_pauses_reading() -> None:
    # 256 KiB of "1\n" was 87,000 frames queued at once, before reading could pause: +170 MB for
    # 60 such connections, without a token.
    async def scenario() -> None:
        for codec, one in ((JsonLines(), b"1\n"), (wire.CborFrames(b"k" * 32), b"\0\0\0\x011")):
            connection, transport = _busy_connection(codec)
            connection.data_received(one * ((256 << 10) // len(one)))
            assert len(connection._lines) == MAX_QUEUED_LINES and not transport.reading
            assert connection._framer.pending and connection.line_under_way is None  # whole lines wait: none partway
            connection._lines.clear()  # as if answered: the next ones come from what was read, not the socket
            connection._busy = False
            taken: list[Any] = []

            def answered(line: Any, taken: list[Any] = taken) -> bool:
                taken.append(line)
                return True

            connection._answer_guarded = answered  # type: ignore[method-assign]
            connection._pump()
            assert len(taken) == (256 << 10) // len(one) - MAX_QUEUED_LINES and transport.reading

    asyncio.run(scenario())
