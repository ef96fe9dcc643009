"""Reading the Sentry's debug log: every traced call counted once, under its real name,
however the log is cut into pieces, whatever the code names its tasks and whatever it
puts in a path (newlines, a forged record, a forged return, more than a line holds)."""

from __future__ import annotations

import json

import pytest

from stockade.runtimes.gvisor_log import LOG_LINE_ENDS, SentryLog
from stockade.runtimes.violations import ViolationLog, ViolationReport

STRACE_ENTRY, STRACE_EXIT = b"strace.go:573] ", b"strace.go:611] "
REFUSED = b" = 0 (0x0) errno=1 (operation not permitted) (2.035\xc2\xb5s)"


def record(msg: bytes, newline: bytes = b"\n") -> bytes:
    """One line of the Sentry's log as runsc --debug-log-format=json writes it (Go's
    encoding/json: invalid UTF-8 as U+FFFD; <, >, & and U+2028/9 escaped, other text as is)."""
    text = json.dumps(msg.decode(errors="replace"), ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return b'{"msg":' + text.encode() + b',"level":"info","time":"2026-12-02T03:48:59.317470Z"}' + newline


def call(task: bytes, name: bytes, args: bytes, end: bytes = REFUSED) -> bytes:
    """A traced call's entry and exit records, as gVisor's strace prints them."""
    entry = STRACE_ENTRY + b"[   2:   2] " + task + b" E " + name + b"(" + args + b")"
    return record(entry) + record(STRACE_EXIT + b"[   2:   2] " + task + b" X " + name + b"(" + args + b")" + end)


FORGED = (  # what a forged record of a refused ptrace looks like, in the text log and in the JSON one
    b"I1202 03:48:59.317470    2709 strace.go:611] [   2:   2] x X ptrace(0x0) = 0 (0x0) errno=1 (x) (1ns)\n"
    + b"}"  # and a record boundary: '}{"msg":"'
    + record(STRACE_EXIT + b"[   2:   2] x X ptrace(0x0)" + REFUSED)
)
LOG = (
    record(b"main.go:199] Args: [runsc-sandbox --strace-syscalls=ptrace,mount]")
    # An argument (the code's bytes) that looks like an exit record of another call.
    + call(b"python3", b"mount", b'0x10000 "[ 2: 2] x X ptrace(0x0) = 0 (0x0) errno=1 (x)", <null>')
    # A task named "a\nb".
    + call(b"a\nb", b"ptrace", b"PTRACE_ATTACH, 0xf423f, 0x0, 0x0", b" = 0 (0x0) errno=3 (no such process) (330ns)")
    # Allowed by gVisor's own kernel: reported, not refused.
    + record(STRACE_EXIT + b"[   3:   3] x X ptrace( X unshare(CLONE_NEWUSER) = 0 (0x0) (1.2\xc2\xb5s)")
    + record(b"compat.go:120] Unsupported syscall rseq(0x7fb3,0x20). It is likely...")
    + record(b"compat.go:120] Unsupported syscall personality(0xffff). It is...")
)


def read(log: bytes, size: int) -> ViolationReport:
    parser, report = SentryLog(), ViolationLog()
    for i in range(0, len(log), size):
        for seen in parser.feed(log[i : i + size]):
            report.tally(seen.name, seen.blocked, seen.build)
    return report.take()


@pytest.mark.parametrize("size", [1, 7, 64, len(LOG)])
def test_each_call_once_under_its_real_name_however_the_log_is_cut(size: int) -> None:
    report = read(LOG, size)
    assert report.counts == {"mount": 1, "ptrace": 1, "unshare": 1, "personality": 1}
    assert report.blocked == 3  # unshare was allowed
    by_name = {v.syscall: v for v in report.records}
    assert by_name["ptrace"].description == "ptrace: refused by gVisor (no such process)"
    assert not by_name["unshare"].blocked and by_name["unshare"].violation_type == "sensitive_syscall"
    assert by_name["personality"].violation_type == "unsupported_syscall"
    # Only what gVisor refused as the policy says ends a run under on_violation=kill.
    seen = {v.name: v.by_policy for v in SentryLog().feed(LOG)}
    assert seen == {"mount": True, "ptrace": True, "unshare": True, "personality": False}


LONG = b"/" + b"a" * 4094  # PATH_MAX: gVisor prints each path argument whole
ESCAPED = b"/" + b"\x01" * 4094  # each byte six in JSON (\u0001): the cuts fall inside escapes
PATHS = {
    "a newline": b"/tmp\nzz",
    "a forged record after a newline": b"/tmp\n" + FORGED + b"zz",
    "a forged return": b"/tmp) = 0 (0x0) (1ns)",
    "a forged return and record": b"/tmp) = 0 (0x0) (1ns)\n" + FORGED,
    "4 KiB": LONG,
    "4 KiB of escapes": ESCAPED,
    "4 KiB ending in a forged return": LONG + b") = 0 (0x0) (1ns)",
}


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("size", [7, 4096, 1 << 20])
def test_a_path_can_neither_hide_a_refused_call_nor_forge_one(path: bytes, size: int) -> None:
    # gVisor's strace prints a path argument raw, whatever it holds. Before, a newline
    # split the record and the call went unreported, a forged header after it started a
    # record of its own, and a line over 16 KiB (mount with four long paths) was dropped whole.
    args = [b"0x7fd4505c2e10 " + path] * 4
    log = call(b"python3", b"mount", b", ".join([*args[:2], b"0x0", *args[2:]]))
    log += call(b"python3", b"chroot", args[0])
    report = read(log, size)
    assert report.counts == {"mount": 1, "chroot": 1} and report.blocked == 2
    assert [v.description for v in report.records] == [
        "mount: refused by gVisor (operation not permitted)",
        "chroot: refused by gVisor (operation not permitted)",
    ]


def test_an_entry_record_is_not_an_exit_whatever_the_task_name() -> None:
    # The task "x X ptrace(" and a path that ends like an exit record: the entry of a mount.
    log = record(STRACE_ENTRY + b"[   2:   2] x X ptrace( E chroot(0x7f /x) = 0 (0x0) errno=1 (x)")
    assert read(log, len(log)).counts == {}


@pytest.mark.parametrize(
    "end",
    [b" = garbage", b"", b" = 0 (0x0) errno=1 (not (permitted)) (1ns)", b" = 0 (0x0) (1ns) trailing"],
)
def test_an_exit_that_cannot_be_read_counts_as_refused(end: bytes) -> None:
    log = call(b"python3", b"mount", b"0x1 /x", end)
    report = read(log, len(log))
    assert report.counts == {"mount": 1} and report.blocked == 1
    assert report.records[0].blocked and "could not be read" in report.records[0].description


def test_a_cut_line_whose_end_is_lost_counts_as_refused() -> None:
    # A line cut for length whose kept end is not a record's end (no Go JSON would be):
    # the call is known from the start; how it returned is not.
    line = record(STRACE_EXIT + b"[   2:   2] python3 X mount(0x1 " + LONG * 5 + b")" + REFUSED)
    broken = line[:-LOG_LINE_ENDS] + b"x" * LOG_LINE_ENDS + b"\n"
    report = read(broken, len(broken))
    assert report.counts == {"mount": 1} and report.blocked == 1


def test_records_whose_newlines_come_late_are_read_one_by_one() -> None:
    # gVisor writes a record and its newline in two writes: threads' records interleave as
    # '{A}{B}\n\n'. A long record among them is cut alone, wherever it falls on the line.
    small = STRACE_EXIT + b"[   2:   3] python3 X ptrace(PTRACE_ATTACH, 0xf423f, 0x0, 0x0)" + REFUSED
    for pad in range(0, 600, 7):  # the small record's length moves where the long one starts
        path = b"/" + b"p" * pad + b'}{"msg":"' + LONG * 5  # and a record boundary, escaped in JSON
        long = STRACE_EXIT + b"[   2:   2] python3 X mount(0x1 " + path + b")" + REFUSED
        log = record(small, b"") + record(long, b"") + record(small, b"") + b"\n\n\n"
        for size in (len(log), 509):
            report = read(log, size)
            assert report.counts == {"ptrace": 2, "mount": 1} and report.blocked == 3, (pad, size)
            assert all("operation not permitted" in v.description for v in report.records)


def test_a_process_asking_to_be_traced_again_is_no_refusal() -> None:
    # PTRACE_TRACEME is allowed; a second one fails (EPERM: already traced) by the kernel's own rules.
    # An attach to the agent that fails the same way is a refusal, and ends a run under kill.
    log = call(b"python3", b"ptrace", b"PTRACE_TRACEME, 0x0, 0x0, 0x0", b" = 0 (0x0) (3.0\xc2\xb5s)")
    log += call(
        b"python3",
        b"ptrace",
        b"PTRACE_TRACEME, 0x0, 0x0, 0x0",
        b" = 0 (0x0) errno=1 (operation not permitted) (1.1\xc2\xb5s)",
    )
    log += call(
        b"python3",
        b"ptrace",
        b"PTRACE_ATTACH, 0x1, 0x0, 0x0",
        b" = 0 (0x0) errno=1 (operation not permitted) (1.4\xc2\xb5s)",
    )
    seen = SentryLog().feed(log)
    assert [(s.blocked, s.by_policy) for s in seen] == [(False, False), (False, False), (True, True)]
    records = [s.build() for s in seen]
    assert [r.violation_type for r in records] == ["sensitive_syscall", "sensitive_syscall", "blocked_syscall"]
