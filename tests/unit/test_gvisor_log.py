"""Reading the Sentry's debug log: every traced call counted once, under its real name,
however the log is cut into pieces and whatever the code names its tasks."""

from __future__ import annotations

from stockade import Policy
from stockade.runtimes.drain import Lines
from stockade.runtimes.gvisor import MAX_LOG_LINE, GvisorSandbox
from stockade.runtimes.violations import ViolationLog

HEAD = b"I1202 03:48:59.317470    2709 strace.go:611] "
LOG = (
    HEAD.replace(b"611", b"199")
    + b"Args: [runsc-sandbox --strace-syscalls=ptrace,mount]\n"
    # An enter record whose argument (the code's bytes) looks like an exit record of another call.
    + HEAD
    + b'[   2:   2] python3 E mount(0x10000 "[ 2: 2] x X ptrace(0x0) = 0 (0x0) errno=1 (x)", <null>)\n'
    + HEAD
    + b'[   2:   2] python3 X mount(0x10000 "[ 2: 2] x X ptrace(0x0) = 0 (0x0) errno=1 (x)", <null>)'
    + b" = 0 (0x0) errno=1 (operation not permitted) (2.035\xc2\xb5s)\n"
    # A task named "a\nb": its records come in two lines.
    + HEAD
    + b"[   2:   2] a\nb E ptrace(PTRACE_ATTACH, 0xf423f, 0x0, 0x0)\n"
    + HEAD
    + b"[   2:   2] a\nb X ptrace(PTRACE_ATTACH, 0xf423f, 0x0, 0x0)"
    + b" = 0 (0x0) errno=3 (no such process) (330ns)\n"
    # Allowed by gVisor's own kernel: reported, not refused.
    + HEAD
    + b"[   3:   3] x X ptrace( X unshare(CLONE_NEWUSER) = 0 (0x0) (1.2\xc2\xb5s)\n"
    + HEAD.replace(b"strace.go:611", b"compat.go:120")
    + b"Unsupported syscall rseq(0x7fb3,0x20). It is likely...\n"
    + HEAD.replace(b"strace.go:611", b"compat.go:120")
    + b"Unsupported syscall personality(0xffff). It is...\n"
)


def _reader() -> GvisorSandbox:
    sb = GvisorSandbox.__new__(GvisorSandbox)  # only its log reading: no runsc
    sb.policy, sb._kill_reason, sb.violation_log = Policy(), None, ViolationLog()
    sb._log, sb._record = Lines(MAX_LOG_LINE), b""
    return sb


def test_each_call_once_under_its_real_name_however_the_log_is_cut() -> None:
    for size in (1, 7, 64, len(LOG)):
        sb = _reader()
        for i in range(0, len(LOG), size):
            sb._read_log(LOG[i : i + size])
        report = sb.violation_log.take()
        assert report.counts == {"mount": 1, "ptrace": 1, "unshare": 1, "personality": 1}, size
        assert report.blocked == 3  # unshare was allowed
        by_name = {v.syscall: v for v in report.records}
        assert by_name["ptrace"].description == "ptrace: refused by gVisor (no such process)"
        assert not by_name["unshare"].blocked and by_name["unshare"].violation_type == "sensitive_syscall"
        assert by_name["personality"].violation_type == "unsupported_syscall"
