"""Reading the gVisor Sentry's debug log: which traced calls the code made, and how they returned.

The runtime has runsc write the Sentry's log as JSON (``--debug-log-format=json``)
into a FIFO the host drains; each piece read goes to ``SentryLog.feed``, which
returns the violations in it. Everything in a record that the code controls (a
path, a task name) is read as what it is: it can neither hide a call, nor split
a record, nor forge one; a record whose end cannot be read counts as refused.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import NamedTuple

from ..result import SecurityViolation
from .drain import CUT, Lines

MAX_LOG_LINE = 16384  # of a longer line of that log (long paths) only its two ends are read:
LOG_LINE_ENDS = 512  # gVisor's start of a record (task, call) and its end (return, errno) lie there
# glibc registers rseq at every start; gVisor does not implement it, and that is harmless.
BENIGN_UNSUPPORTED = {"rseq"}
# The Sentry's log is written as JSON, an object a record: {"msg": "<file>:<line>] ...",
# "level": ..., "time": ...}. gVisor's strace prints a path argument as it is: in its text
# log a newline in a path split a record (the call went unreported) and could start a line
# that looked like a record of its own (a forged one). In JSON every byte of the code's is
# escaped inside "msg", and a record's message is read from its start, gVisor's own words.
_MSG_START, _MSG_END = b'{"msg":"', b'","level":"'  # how Go writes gVisor's JSON record
# gVisor writes a record, then its newline, in two writes: another thread's record can come
# between ('{A}{B}\n\n'). A record starts right after the one before it ends: '}{"msg":"',
# which no byte of the code's makes (its quotes are escaped), nor a newline.
_BOUNDARY = b"}" + _MSG_START
# An strace exit: "[pid:tid] <task name> X <syscall>(<args>) = <ret> (<hex>)[ errno=N (<why>)] (<time>)".
# The task name is the code's to choose (prctl PR_SET_NAME): up to 15 bytes of anything,
# spaces, " X name(" and newlines included. Taken greedily, it ends at the last " X name("
# (or " E name(", an entry) within those 15 bytes: the real one, since the arguments gVisor
# prints after it begin with what it formats itself (constants, addresses), never with the
# code's bytes. The arguments are the code's (paths, any length, anything in them): the
# return value and errno are read after the message's last ") = ", which is gVisor's.
_STRACE = re.compile(r"[\w.-]+:\d+\] \[\s*(\d+):\s*(\d+)\] (?s:.{0,15}) ([EX]) (\w+)\(")
_STRACE_EXIT = re.compile(r"\) = -?\d+ \(0x[0-9a-f]+\)(?: errno=(\d+) \(([^)]*)\))?(?: \([^()]*\))?")
_UNSUPPORTED = re.compile(r"[\w.-]+:\d+\] Unsupported syscall (\w+)\(")
# gVisor prints ptrace's request by name (its own formatting, before any byte of the code's).
_ASKS_TO_BE_TRACED = "PTRACE_TRACEME,"


class Seen(NamedTuple):
    name: str  # the call's
    blocked: bool  # whether it failed
    build: Callable[[], SecurityViolation]  # what makes its record
    # Refused as the policy says (a traced call gVisor refused), not a call gVisor's kernel
    # lacks (copy_file_range from cp, say): only the former ends a run under on_violation=kill.
    by_policy: bool


class SentryLog:
    """The parser of one sandbox's Sentry log, fed as it is read."""

    def __init__(self) -> None:
        self._lines = Lines(MAX_LOG_LINE, LOG_LINE_ENDS)
        self._held = b""  # the end of the log read so far, if it may be the start of a _BOUNDARY

    def feed(self, chunk: bytes) -> list[Seen]:
        """The violations in the next piece of the log."""
        found: list[Seen] = []
        for line in self._lines.feed(self._one_record_a_line(chunk)):
            if b" X " not in line and b"Unsupported syscall" not in line:
                continue  # most lines (an strace exit has " X " after the task name, whatever that is)
            message = _message(line)
            if message is None:
                continue
            start, end = message
            if (m := _STRACE.match(start)) is not None:
                if m.group(3) == "X":
                    pid, name = int(m.group(1)), m.group(4)
                    if name == "ptrace" and start.startswith(_ASKS_TO_BE_TRACED, m.end()):
                        # Allowed; it fails only for a process already traced (EPERM), which is its
                        # own affair, not a refusal: reported as the sensitive call it is.
                        found.append(Seen(name, False, functools.partial(_traced, name, False, "", pid), False))
                    else:
                        found.append(Seen(name, *_exit(name, end, pid), by_policy=True))
            elif (u := _UNSUPPORTED.match(start)) is not None:
                name = u.group(1)
                if name not in BENIGN_UNSUPPORTED:
                    found.append(Seen(name, True, functools.partial(_unsupported, name), by_policy=False))
        return found

    def _one_record_a_line(self, chunk: bytes) -> bytes:
        """``chunk`` with a newline between two records where gVisor wrote none (yet)."""
        data, self._held = self._held + chunk, b""
        for n in range(min(len(_BOUNDARY) - 1, len(data)), 0, -1):
            if _BOUNDARY.startswith(data[-n:]):
                data, self._held = data[:-n], data[-n:]
                break
        return data.replace(_BOUNDARY, b"}\n" + _MSG_START)


def _message(line: bytes) -> tuple[str, str] | None:
    """The message of a line of the Sentry's JSON log, as its start and its end: the same
    text for a whole line; for a line ``Lines`` cut, what its first and last bytes say."""
    if CUT not in line:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        msg = record.get("msg") if isinstance(record, dict) else None
        return (msg, msg) if isinstance(msg, str) else None
    first, last = line.split(CUT, 1)
    start = _json_piece(first[len(_MSG_START) :], cut_at_end=True) if first.startswith(_MSG_START) else None
    at = last.rfind(_MSG_END)
    end = _json_piece(last[:at], cut_at_end=False) if at >= 0 else None
    return None if start is None else (start, end or "")


def _json_piece(raw: bytes, cut_at_end: bool) -> str | None:
    """The text of a piece of a JSON string cut at one end, perhaps inside an escape
    (``\\u00e9``) or a UTF-8 character: the bytes past the last whole one are left out."""
    for trim in range(7):
        piece = raw[: len(raw) - trim] if cut_at_end else raw[trim:]
        try:
            text = json.loads(b'"' + piece + b'"')
        except ValueError:  # UnicodeDecodeError included
            continue
        return text if isinstance(text, str) else None
    return None


def _exit(name: str, end: str, pid: int) -> tuple[bool, Callable[[], SecurityViolation]]:
    """Whether a traced call was refused, and its report, from the end of its exit record.
    A record whose end cannot be read is counted as a refused call: fail closed."""
    at = end.rfind(") = ")
    m = _STRACE_EXIT.fullmatch(end, at) if at >= 0 else None
    if m is None:
        return True, functools.partial(_unreadable, name, pid)
    refused = m.group(1) is not None
    return refused, functools.partial(_traced, name, refused, m.group(2) or "", pid)


def _traced(name: str, refused: bool, why: str, pid: int) -> SecurityViolation:
    """The report of a traced call: refused by gVisor (``why``: its errno's words) or allowed."""
    return SecurityViolation(
        violation_type="blocked_syscall" if refused else "sensitive_syscall",
        syscall=name,
        severity="HIGH",
        description=(
            f"{name}: refused by gVisor ({why})"
            if refused
            else f"{name}: allowed inside gVisor's kernel, never reached the host"
        ),
        detection_layer="GVISOR",
        blocked=refused,
        pid=pid,
    )


def _unreadable(name: str, pid: int) -> SecurityViolation:
    return SecurityViolation(
        violation_type="blocked_syscall",
        syscall=name,
        severity="HIGH",
        description=f"{name}: counted as refused: gVisor's record of how it returned could not be read",
        detection_layer="GVISOR",
        blocked=True,
        pid=pid,
    )


def _unsupported(name: str) -> SecurityViolation:
    return SecurityViolation(
        violation_type="unsupported_syscall",
        syscall=name,
        severity="LOW",
        description=f"{name}: not implemented by gVisor (the call failed with ENOSYS)",
        detection_layer="GVISOR",
        blocked=True,
    )
