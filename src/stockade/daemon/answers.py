"""What the daemon holds of answers its clients have not read yet: bounded, daemon-wide.

A held sandbox's ``read_file`` answers up to 32 MiB in one answer (base64 in a JSON line on the
socket, the bytes on HTTP). A client that asks and never reads leaves that answer in the daemon's
memory, in its connection's write buffer, for as long as the connection stays open: one answer a
connection, but the socket admits 64 connections per uid and the HTTP door more. So the room for
such answers is one budget for the whole daemon (``ANSWER_BUDGET``), of which one owner may take a
share (``OWNER_SHARE``): a read whose answer, with what already waits unread (the socket
connections' write buffers, HTTP bodies being sent), would pass either is refused "busy", its data
dropped. Other answers (a run's: tens of MiB at most, its 7 MiB of output as escaped text and as
bytes) are made without a check, since the run they report has happened; but a caller whose unread
answers fill its share already (or everyone's the budget, some of them its own) has its new
requests refused "busy" until it reads them (``refuse_new``), and so has a held sandbox's run that
waited for its turn meanwhile: a run's answer cannot be its way round the budget, one connection's
buffer at a time. Control calls (cancel, interrupt, close, status: ``Method.small_answer``) are
never refused so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ..errors import DaemonBusyError

ANSWER_BUDGET = 256 << 20  # eight of the largest answers at once
# What one owner (a uid on the socket, the HTTP API's principal) may hold of it: so that one who
# leaves answers unread fills its own share, not everyone's room.
OWNER_SHARE = 96 << 20


class AnswerBudget:
    """Bytes of answers the daemon holds for its clients: a file answer checked as it is made
    (``check``), new work refused while a caller's fill its share (``refuse_new``)."""

    def __init__(self, limit: int = ANSWER_BUDGET, share: int = OWNER_SHARE) -> None:
        self.limit, self.share = limit, share
        self.sending: dict[str, int] = {}  # HTTP bodies being sent, by owner
        # Each door's unsent bytes (the socket connections' write buffers), of one owner or (None) all.
        self.unsent: list[Callable[[str | None], int]] = []

    def held(self, owner: str | None = None) -> int:
        sending = sum(self.sending.values()) if owner is None else self.sending.get(owner, 0)
        return sending + sum(unsent(owner) for unsent in self.unsent)

    def check(self, size: int, owner: str) -> None:
        """Room for one more answer of ``size`` bytes for ``owner``, or ``DaemonBusyError``. Called
        once the answer is made and before the loop runs anything else: on the socket it then goes
        straight into its connection's write buffer, which ``unsent`` counts until it is read."""
        mine = self.held(owner)
        if mine + size > self.share:
            raise DaemonBusyError(
                f"busy: the daemon holds {mine >> 20} MiB of answers for {owner} that have not been read "
                f"yet (at most {self.share >> 20} MiB for one caller): read those, or read less at once "
                "(max_bytes, or download)"
            )
        held = self.held()
        if held + size > self.limit:
            raise DaemonBusyError(
                f"busy: the daemon holds {held >> 20} MiB of answers that their clients have not read yet "
                f"(at most {self.limit >> 20} MiB): try again shortly, or read less at once (max_bytes, or download)"
            )

    def refuse_new(self, owner: str) -> None:
        """``DaemonBusyError`` when ``owner``'s unread answers fill its share, or everyone's fill the
        budget and some are its own: no new work for it, whose answer would wait unread with the
        others. (A caller with nothing unread is not held to account for the others.)"""
        mine, held = self.held(owner), self.held()
        if mine >= self.share or (held >= self.limit and mine > 0):
            whose = f"{mine >> 20} MiB of answers for {owner}" if mine >= self.share else f"{held >> 20} MiB of answers"
            raise DaemonBusyError(
                f"busy: the daemon holds {whose} that have not been read yet (at most "
                f"{(self.share if mine >= self.share else self.limit) >> 20} MiB): read those answers first"
            )

    @contextlib.contextmanager
    def hold(self, size: int, owner: str) -> Iterator[None]:
        """``size`` bytes of ``owner``'s counted while the block runs, unchecked: an answer made
        already, being sent."""
        self.sending[owner] = self.sending.get(owner, 0) + size
        try:
            yield
        finally:
            left = self.sending[owner] - size
            if left:
                self.sending[owner] = left
            else:
                del self.sending[owner]


def answer_size(data_bytes: int) -> int:
    """What an answer carrying ``data_bytes`` of a file takes (base64, and a line around it)."""
    return (data_bytes + 2) // 3 * 4 + 4096
