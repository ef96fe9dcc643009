"""The seccomp profile as data, and the BPF program it compiles to.

The program is checked by running it through a small classic-BPF interpreter
written here, on the seccomp_data of representative calls.
"""

from __future__ import annotations

import struct

import pytest

from stockade.agent import linux
from stockade.runtimes.process import seccomp
from stockade.runtimes.process.syscalls_x86_64 import SYSCALLS_X86_64 as NR

# Seed 003 and issue 2 name these; each must be blocked.
REQUIRED = [
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot", "setns",
    "unshare", "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
    "quotactl", "syslog", "swapon", "swapoff", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    "userfaultfd", "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "acct", "settimeofday",
    "clock_settime", "adjtimex", "io_uring_setup",
]  # fmt: skip


def run_bpf(program: bytes, nr: int, args: tuple[int, ...] = (0,) * 6, arch: int = seccomp.AUDIT_ARCH_X86_64) -> int:
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    insns = [struct.unpack("<HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # and #k
            acc &= k
        elif code == 0x06:  # ret #k
            return k
        elif code in (0x15, 0x35, 0x45):
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


@pytest.fixture(scope="module")
def program() -> bytes:
    return seccomp.compile_profile()


def test_every_rule_says_why() -> None:
    for rule in seccomp.load_profile():
        assert rule.comment.strip(), rule.syscall
        assert rule.syscall in NR


@pytest.mark.parametrize("name", REQUIRED)
def test_required_syscalls_are_blocked_and_reported(program: bytes, name: str) -> None:
    assert run_bpf(program, NR[name]) == seccomp.RET_USER_NOTIF


@pytest.mark.parametrize("name", ["read", "write", "openat", "mmap", "execve", "wait4", "exit_group", "getpid"])
def test_ordinary_syscalls_pass(program: bytes, name: str) -> None:
    assert run_bpf(program, NR[name]) == seccomp.RET_ALLOW


def test_clone_is_checked_by_flags(program: bytes) -> None:
    assert run_bpf(program, NR["clone"], (0x01200011, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW  # fork()
    for flag in (linux.CLONE_NEWUSER, linux.CLONE_NEWNS, linux.CLONE_NEWNET, linux.CLONE_NEWPID):
        assert run_bpf(program, NR["clone"], (flag | 17, 0, 0, 0, 0, 0)) == seccomp.RET_USER_NOTIF


def test_clone3_falls_back_to_clone(program: bytes) -> None:
    assert run_bpf(program, NR["clone3"]) == seccomp.RET_ERRNO | 38  # ENOSYS


def test_socket_rules(program: bytes) -> None:
    sock = NR["socket"]
    assert run_bpf(program, sock, (2, 1, 0, 0, 0, 0)) == seccomp.RET_ALLOW  # AF_INET, SOCK_STREAM
    assert run_bpf(program, sock, (2, 3, 1, 0, 0, 0)) == seccomp.RET_USER_NOTIF  # AF_INET, SOCK_RAW
    assert run_bpf(program, sock, (10, 3 | 0x80000, 58, 0, 0, 0)) == seccomp.RET_USER_NOTIF  # INET6 RAW|CLOEXEC
    assert run_bpf(program, sock, (17, 2, 0, 0, 0, 0)) == seccomp.RET_USER_NOTIF  # AF_PACKET
    assert run_bpf(program, sock, (16, 3, 0, 0, 0, 0)) == seccomp.RET_ALLOW  # netlink raw: ip(8) needs it


def test_ioctl_tiocsti_only(program: bytes) -> None:
    assert run_bpf(program, NR["ioctl"], (0, 0x5412, 0, 0, 0, 0)) == seccomp.RET_USER_NOTIF
    assert run_bpf(program, NR["ioctl"], (0, 0x5401, 0, 0, 0, 0)) == seccomp.RET_ALLOW  # TCGETS


def test_personality_query_allowed_weakening_blocked(program: bytes) -> None:
    assert run_bpf(program, NR["personality"], (0xFFFFFFFF, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
    assert run_bpf(program, NR["personality"], (0x0400000, 0, 0, 0, 0, 0)) == seccomp.RET_USER_NOTIF


def test_foreign_architecture_and_x32_refused(program: bytes) -> None:
    assert run_bpf(program, NR["read"], arch=0x40000003) == seccomp.RET_KILL_PROCESS  # i386
    assert run_bpf(program, 0x40000000 | NR["read"]) == seccomp.RET_ERRNO | 38


def test_rule_lookup_matches_the_program() -> None:
    rule = seccomp._rule_for(NR["socket"], (17, 2, 0, 0, 0, 0))
    assert rule is not None and "AF_PACKET" in rule.comment
    assert seccomp._rule_for(NR["socket"], (2, 1, 0, 0, 0, 0)) is None


def test_a_guest_filters_report_is_read_with_the_profiles_own_rule() -> None:
    from stockade.runtimes.microvm.runtime import guest_violation

    v = guest_violation({"nr": NR["unshare"], "args": [0x10000000], "pid": 42})
    assert v is not None and v.syscall == "unshare" and v.severity == "CRITICAL" and v.pid == 42
    assert v.detection_layer == "SECCOMP" and "inside the guest" in v.description
    # The arguments pick the rule, as on the host: TIOCSTI is its own rule.
    tiocsti = guest_violation({"nr": NR["ioctl"], "args": [0, 0x5412], "pid": 1})
    assert tiocsti is not None and "TIOCSTI" in tiocsti.description
    # A guest may send anything: what is malformed is dropped, never raised on.
    for params in (
        {},
        {"nr": "272", "args": []},
        {"nr": True, "args": []},
        {"nr": -1, "args": []},
        {"nr": 1 << 40, "args": []},
        {"nr": 272, "args": "0"},
        {"nr": 272, "args": [0] * 7},
        {"nr": 272, "args": [-1]},
        {"nr": 272, "args": [1 << 64]},
        {"nr": 272, "args": [1.5]},
    ):
        assert guest_violation(params) is None, params
    assert guest_violation({"nr": 272, "args": [], "pid": "x"}) is not None  # an odd pid is only left out


def test_a_guest_cannot_flood_the_hosts_record_or_report_without_a_filter() -> None:
    import threading

    from stockade import Policy
    from stockade.runtimes.microvm.runtime import MAX_GUEST_VIOLATIONS, MicrovmSandbox

    # Only the reporting half of a sandbox: no VM is needed to feed it notices.
    sb = MicrovmSandbox.__new__(MicrovmSandbox)
    sb.policy, sb.guest_seccomp = Policy(), False
    sb._violations, sb._violations_lock = [], threading.Lock()
    notice = {"nr": NR["unshare"], "args": [0x10000000], "pid": 9}
    sb._agent_notice("violation", notice)
    assert sb.violations() == []  # a guest whose agent is not under the filter has nothing to report
    sb.guest_seccomp = True
    for _ in range(MAX_GUEST_VIOLATIONS + 50):
        sb._agent_notice("violation", notice)
    sb._agent_notice("output", notice)  # not a report
    assert len(sb.violations()) == MAX_GUEST_VIOLATIONS
