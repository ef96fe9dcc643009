"""What the daemon holds of file answers its clients have not read yet: bounded, daemon-wide.

A held sandbox's ``read_file`` answers up to 32 MiB in one answer (base64 in a JSON line on the
socket, the bytes on HTTP). A client that asks and never reads leaves that answer in the daemon's
memory, in its connection's write buffer, for as long as the connection stays open: one answer a
connection, but the socket admits 64 connections per uid and the HTTP door more. So the room for
such answers is one budget for the whole daemon (``ANSWER_BUDGET``): a read whose answer, with
what already waits unread (the socket connections' write buffers, HTTP bodies being sent), would
pass it is refused "busy", its data dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ..errors import DaemonBusyError

ANSWER_BUDGET = 256 << 20  # eight of the largest answers at once


class AnswerBudget:
    """Bytes of answers the daemon holds for its clients, checked as each file answer is made."""

    def __init__(self, limit: int = ANSWER_BUDGET) -> None:
        self.limit = limit
        self.reserved = 0  # HTTP bodies being sent
        # Each door's unsent bytes (the socket connections' write buffers).
        self.unsent: list[Callable[[], int]] = []

    def held(self) -> int:
        return self.reserved + sum(unsent() for unsent in self.unsent)

    def check(self, size: int) -> None:
        """Room for one more answer of ``size`` bytes, or ``DaemonBusyError``. Called once the answer
        is made and before the loop runs anything else: on the socket it then goes straight into its
        connection's write buffer, which ``unsent`` counts until the client has read it."""
        held = self.held()
        if held + size > self.limit:
            raise DaemonBusyError(
                f"busy: the daemon holds {held >> 20} MiB of file answers that their clients have not "
                f"read yet (at most {self.limit >> 20} MiB): try again shortly, or read less at once "
                "(max_bytes, or download)"
            )

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """``size`` bytes counted while the block runs, unchecked: an answer made already, being sent."""
        self.reserved += size
        try:
            yield
        finally:
            self.reserved -= size


def answer_size(data_bytes: int) -> int:
    """What an answer carrying ``data_bytes`` of a file takes (base64, and a line around it)."""
    return (data_bytes + 2) // 3 * 4 + 4096
