"""The seccomp profile (data), its BPF compiler, and the host-side supervisor.

The profile is ``seccomp_profile.json``: every rule names a syscall, an action
and the reason it is there. ``compile_profile`` turns it into a classic-BPF
program for x86_64's calls. Rules with action ``notify`` return
``SECCOMP_RET_USER_NOTIF``: the kernel suspends the call and asks the
listener, which the isolate hands to the host at start. A syscall number the
table in ``syscalls_x86_64.py`` does not name (one newer than the profile, or
a negative one) is refused and reported too, by the profile's
``unknown_syscalls`` entry: a kernel upgrade cannot open a hole the profile
was never told about. So is every call through the kernel's other ABIs
(i386's ``int 0x80``, x32's numbers), by its ``other_abis`` entry: their
numbers are not the ones the rules name.

``Supervisor`` is one host thread that answers every isolate's notifications:
each blocked call fails (EPERM; an unknown number or another ABI's call
ENOSYS, as on a kernel without it, so libc falls back) and is recorded as a
``SecurityViolation`` (``detection_layer="SECCOMP"``; another ABI's call is
named by its ABI and number: ``i386_syscall_21``, ``x32_syscall_165``). The
report comes from the host, not from code inside the sandbox, so the
sandboxed code cannot hide or forge it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from ...agent import linux
from ...result import SecurityViolation
from .syscalls_x86_64 import SYSCALLS_X86_64

AUDIT_ARCH_X86_64 = linux.AUDIT_ARCH_X86_64
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
NEGATIVE = 0x80000000  # a syscall number this high is negative to the kernel: no call of any ABI

RET_KILL_PROCESS = 0x80000000
RET_USER_NOTIF = 0x7FC00000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

_LD_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_AND = 0x54
_RET = 0x06

SYSCALL_NAMES = {nr: name for name, nr in SYSCALLS_X86_64.items()}
UNKNOWN = "unknown_syscalls"  # the profile's entry for numbers the table does not name
OTHER_ABIS = "other_abis"  # the profile's entry for calls through i386's or x32's ABI


@dataclass(frozen=True)
class Rule:
    syscall: str
    action: str  # notify | errno | kill
    severity: str
    comment: str
    when: dict[str, Any] | list[dict[str, Any]] | None = None
    errno: int = errno.EPERM
    report: bool = True


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


@cache
def _load() -> tuple[tuple[Rule, ...], Rule, Rule]:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp_profile.json")) as f:
        return _parse(json.load(f))


def _parse(raw: dict[str, Any]) -> tuple[tuple[Rule, ...], Rule, Rule]:
    """The profile's rules, and its entries for unknown numbers and other ABIs, checked."""
    rules = []
    for entry in raw["rules"]:
        if entry["syscall"] not in SYSCALLS_X86_64:
            raise ValueError(f"seccomp profile names unknown syscall {entry['syscall']!r}")
        rules.append(_rule(entry["syscall"], entry))
    unknown, other = _rule(UNKNOWN, raw[UNKNOWN]), _rule(OTHER_ABIS, raw[OTHER_ABIS])
    for rule in (unknown, other):
        if rule.when is not None:
            raise ValueError(f"{rule.syscall} cannot have conditions: a call no rule names has no arguments to read")
    if other.action == "notify" and other.errno != unknown.errno:
        # A microVM guest's agent answers both by number ranges, with one errno (guest_answers).
        raise ValueError(f"{OTHER_ABIS} is answered with the errno of {UNKNOWN}")
    return tuple(rules), unknown, other


def _rule(syscall: str, entry: dict[str, Any]) -> Rule:
    if not entry.get("comment"):
        raise ValueError(f"seccomp rule for {syscall} has no comment saying why")
    rule = Rule(
        syscall=syscall,
        action=entry["action"],
        severity=entry.get("severity", "HIGH"),
        comment=entry["comment"],
        when=entry.get("when"),
        errno=entry.get("errno", errno.EPERM),
        report=entry.get("report", True),
    )
    if rule.action == "notify" and rule.errno != errno.EPERM and syscall not in (UNKNOWN, OTHER_ABIS):
        # A microVM guest's agent answers its notifications knowing only the unknown numbers' errno.
        raise ValueError(f"seccomp rule for {syscall}: a notify rule is answered EPERM")
    return rule


def load_profile() -> tuple[Rule, ...]:
    return _load()[0]


def unknown_rule() -> Rule:
    """What becomes of a syscall number the table does not name."""
    return _load()[1]


def other_abis_rule() -> Rule:
    """What becomes of a call through i386's or x32's ABI."""
    return _load()[2]


@cache
def unknown_ranges() -> tuple[tuple[int, int], ...]:
    """The numbers below the x32 bit that the table does not name, as inclusive ranges.

    The table has a hole where x86_64 skipped the numbers other architectures
    use (337-423 today; the kernel fills it with x86-only calls now and then),
    and ends at the newest call the profile was reviewed for.
    """
    ranges = []
    expected = 0
    for nr in sorted(set(SYSCALLS_X86_64.values())):
        if nr > expected:
            ranges.append((expected, nr - 1))
        expected = nr + 1
    ranges.append((expected, X32_SYSCALL_BIT - 1))
    return tuple(ranges)


def is_unknown(call: int) -> bool:
    """A number the table does not name, or a negative one (``call`` as ``linux.seccomp_notif_recv`` gives it)."""
    return (call not in SYSCALL_NAMES and 0 <= call < X32_SYSCALL_BIT) or NEGATIVE <= call < 1 << 32


def is_other_abi(call: int) -> bool:
    """A call through i386's ABI (its arch above the number) or x32's (bit 30 set)."""
    return X32_SYSCALL_BIT <= call < NEGATIVE or call >> 32 == AUDIT_ARCH_I386


def is_call(call: int) -> bool:
    """Whether ``call`` can be a call as ``linux.seccomp_notif_recv`` gives it (a guest may send anything)."""
    return 0 <= call < 1 << 32 or call >> 32 == AUDIT_ARCH_I386


def call_name(call: int) -> tuple[str, str]:
    """What a report calls ``call``: its name, and for another ABI's call the ABI in words."""
    nr = call & 0xFFFFFFFF
    if call >> 32 == AUDIT_ARCH_I386:
        return f"i386_syscall_{nr}", "int 0x80 or sysenter: i386's ABI and its numbers"
    if X32_SYSCALL_BIT <= nr < NEGATIVE:
        return f"x32_syscall_{nr - X32_SYSCALL_BIT}", "x32's ABI: an x86_64 number with bit 30 set"
    if nr >= NEGATIVE:
        return f"syscall_{nr - (1 << 32)}", ""
    return SYSCALL_NAMES.get(nr, f"syscall_{nr}"), ""


def guest_answers() -> str:
    """The errno of unknown numbers and other ABIs' calls, and their ranges (calls as
    ``linux.seccomp_notif_recv`` gives them), for a microVM guest's agent:
    ``38:337-423,470-18446744073709551615``.

    The guest's agent answers its filter's notifications without the profile:
    EPERM, except for these.
    """
    ranges = [*unknown_ranges(), (X32_SYSCALL_BIT, NEGATIVE - 1), (NEGATIVE, (1 << 32) - 1), (1 << 32, (1 << 64) - 1)]
    merged = [ranges[0]]
    for lo, hi in ranges[1:]:
        if lo == merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return f"{unknown_rule().errno}:" + ",".join(f"{lo}-{hi}" for lo, hi in merged)


def _action(rule: Rule) -> int:
    if rule.action == "notify":
        return RET_USER_NOTIF
    if rule.action == "errno":
        return RET_ERRNO | (rule.errno & 0xFFFF)
    if rule.action == "kill":
        return RET_KILL_PROCESS
    raise ValueError(f"unknown seccomp action {rule.action!r}")


def conditions(rule: Rule) -> list[dict[str, Any]]:
    """A rule's conditions on its arguments, all of which must hold ([]: none)."""
    when = rule.when
    if when is None:
        return []
    return list(when) if isinstance(when, list) else [when]


def _test(cond: dict[str, Any], fail: int) -> list[bytes]:
    """Instructions that fall through when ``cond`` holds and jump ``fail`` past their end otherwise."""
    # args[i] in struct seccomp_data: its low 32 bits, or its high ones ("high": a pointer's upper word)
    offset = 16 + 8 * int(cond["arg"]) + (4 if cond.get("high") else 0)
    load = _insn(_LD_ABS, offset)
    op = cond["op"]
    if op == "eq":
        return [load, _insn(_JEQ, cond["value"], 0, fail)]
    if op == "masked_any":
        return [load, _insn(_JSET, cond["value"], 0, fail)]
    if op == "masked_eq":
        return [load, _insn(_AND, cond["mask"]), _insn(_JEQ, cond["value"], 0, fail)]
    if op == "not_in":
        values = list(cond["values"])
        masked = [load] + ([_insn(_AND, cond["mask"])] if "mask" in cond else [])
        # equal to an allowed value: jump over the remaining tests, then ``fail`` more
        return masked + [_insn(_JEQ, v, len(values) - 1 - i + fail, 0) for i, v in enumerate(values)]
    raise ValueError(f"unknown condition op {op!r}")


def _condition(rule: Rule) -> list[bytes]:
    """Instructions ending in ``ret action`` when every condition holds; otherwise they fall through."""
    tests = conditions(rule)
    body: list[bytes] = [_insn(_RET, _action(rule))]
    for cond in reversed(tests):
        # a failed test skips the rest of the body, which is already built behind it
        body = _test(cond, len(body)) + body
    return body


def _holds(cond: dict[str, Any], args: tuple[int, ...]) -> bool:
    value = (args[int(cond["arg"])] >> (32 if cond.get("high") else 0)) & 0xFFFFFFFF
    op = cond["op"]
    return bool(
        (op == "eq" and value == cond["value"])
        or (op == "masked_any" and value & cond["value"])
        or (op == "masked_eq" and value & cond["mask"] == cond["value"])
        or (op == "not_in" and value & cond.get("mask", 0xFFFFFFFF) not in cond["values"])
    )


@cache
def default_program() -> bytes:
    """The profile's BPF, compiled once: every isolate, and the microVM image (and its key), use it."""
    return compile_profile()


def compile_profile(
    rules: tuple[Rule, ...] | None = None, *, unknown: int | None = None, other: int | None = None
) -> bytes:
    """BPF for ``rules`` (the profile's); ``unknown`` and ``other``: what a number the table does
    not name and a call through another ABI return (the profile's entries' actions)."""
    rules = load_profile() if rules is None else rules
    unknown = _action(unknown_rule()) if unknown is None else unknown
    other = _action(other_abis_rule()) if other is None else other
    program = [
        _insn(_LD_ABS, 4),  # arch
        _insn(_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        _insn(_RET, other),  # i386: int 0x80, sysenter; its numbers are not the rules'
        _insn(_LD_ABS, 0),  # nr
        _insn(_JGE, NEGATIVE, 0, 1),
        _insn(_RET, unknown),  # negative: no call's number
        _insn(_JGE, X32_SYSCALL_BIT, 0, 1),
        _insn(_RET, other),  # x32
    ]
    for lo, hi in unknown_ranges():
        if hi == X32_SYSCALL_BIT - 1:  # every number from lo up (the x32 bit was refused above)
            program += [_insn(_JGE, lo, 0, 1), _insn(_RET, unknown)]
        else:
            program += [_insn(_JGE, lo, 0, 2), _insn(_JGE, hi + 1, 1, 0), _insn(_RET, unknown)]
    groups: dict[str, list[Rule]] = {}
    for rule in rules:
        groups.setdefault(rule.syscall, []).append(rule)
    for name, group in groups.items():
        body: list[bytes] = []
        unconditional = [r for r in group if r.when is None]
        for rule in group:
            if rule.when is not None:
                body += _condition(rule)
        body.append(_insn(_RET, _action(unconditional[0]) if unconditional else RET_ALLOW))
        if len(body) > 255:
            raise ValueError(f"too many conditions for {name}")
        program.append(_insn(_JEQ, SYSCALLS_X86_64[name], 0, len(body)))
        program += body  # every path through a body ends in ret, so A still holds nr after a skip
    program.append(_insn(_RET, RET_ALLOW))
    return b"".join(program)


SET_ID = 0o6000  # S_ISUID | S_ISGID


def namespace_clone_rule() -> Rule:
    """The profile's rule for ``clone`` with a ``CLONE_NEW*`` flag."""
    (rule,) = [r for r in load_profile() if r.syscall == "clone" and r.when is not None]
    return rule


def set_id_rules() -> tuple[Rule, ...]:
    """The profile's rules that refuse a set-user-ID or set-group-ID mode (chmod, open with
    O_CREAT, mknod, ...): in a shared directory such a file would make any host user who may
    run it the isolate's leased uid, which a later isolate may hold."""
    return tuple(
        r for r in load_profile() if any(c["op"] == "masked_any" and c["value"] == SET_ID for c in conditions(r))
    )


# Calls whose mode a filter cannot read (openat2's sits in memory; io_uring's IORING_OP_OPENAT
# runs past seccomp): ENOSYS, as from a kernel without them, so the program falls back.
_UNREADABLE_MODES = tuple(
    Rule(name, "errno", "HIGH", "a mode a filter cannot read", errno=errno.ENOSYS, report=False)
    for name in ("openat2", "io_uring_setup")
)


# The socket families a host program may open: runsc (its network "none") and QEMU (no network
# device) need Unix sockets, and at most the address families of their own empty network namespace
# and netlink. Taken over, either would otherwise open AF_VSOCK (no namespace holds it: it reaches
# the host's vsock ports and the hypervisor), AF_PACKET, or a family loaded as a module on first use.
_HOST_SOCKET_FAMILIES = (
    Rule("socket", "errno", "HIGH", "a socket family no host program needs", errno=errno.EAFNOSUPPORT,
         report=False, when={"arg": 0, "op": "not_in", "values": [1, 2, 10, 16]}),
    Rule("socketpair", "errno", "HIGH", "only unix sockets come in pairs", errno=errno.EAFNOSUPPORT,
         report=False, when={"arg": 0, "op": "not_in", "values": [1]}),
)  # fmt: skip


# Of the set-ID calls, those that change a mode are skipped with success (errno 0) on the host:
# a guest's 9p asks QEMU to chmod a directory it makes in a set-group-ID directory with the bit
# the kernel added (EPERM would fail the mkdir), and what stays is the mode the host gave it.
_SKIPPED_ON_HOST = ("chmod", "fchmod", "fchmodat", "fchmodat2")


# A program that only listens (QEMU: its QMP and agent sockets are servers) reaches no socket by
# its path: a network namespace of its own holds no filesystem's sockets, and Landlock does not
# govern connecting to them (a host service's, the user's session bus, a rootless daemon's).
# connect() is refused, and so is every unix socket but a stream or a seqpacket one: a datagram
# socket sends to any path without connecting (and the kernel makes a SOCK_RAW one a datagram one).
_UNIX_CONNECTED_TYPES = {"arg": 1, "op": "not_in", "mask": 0xF, "values": [socket.SOCK_STREAM, socket.SOCK_SEQPACKET]}
_LISTENS_ONLY = (
    Rule("connect", "errno", "HIGH", "a program that only listens connects to nothing", errno=errno.EACCES,
         report=False),
    Rule("socket", "errno", "HIGH", "a unix datagram socket sends to any path", errno=errno.EACCES,
         report=False, when=[{"arg": 0, "op": "eq", "value": 1}, _UNIX_CONNECTED_TYPES]),
    Rule("socketpair", "errno", "HIGH", "a unix datagram socket sends to any path", errno=errno.EACCES,
         report=False, when=_UNIX_CONNECTED_TYPES),
)  # fmt: skip


@cache
def host_program(listens_only: bool = False) -> bytes:
    """BPF for the host programs that hold an isolate (runsc, with its Sentry and gofer; QEMU):
    the profile's set-ID rules (a file made with such a mode: EPERM; a mode changed to one:
    skipped), the calls whose mode it cannot read, socket families beyond unix, inet, inet6 and
    netlink (EAFNOSUPPORT), every call through another ABI and every
    number the table does not name (ENOSYS, as from a kernel without them); anything else is
    allowed, the program's own filter deciding. The outer wall: it holds should the Sentry or
    the guest's kernel fall, as the filters inside them then no longer would.
    ``listens_only`` (QEMU's; runsc's gofer and Sentry connect to each other): no connect(), and
    no unix datagram socket (EACCES)."""
    rules = tuple(
        replace(r, action="errno", errno=0 if r.syscall in _SKIPPED_ON_HOST else errno.EPERM, report=False)
        for r in set_id_rules()
    )
    rules += _UNREADABLE_MODES + _HOST_SOCKET_FAMILIES + (_LISTENS_ONLY if listens_only else ())
    enosys = RET_ERRNO | errno.ENOSYS
    return compile_profile(rules, unknown=enosys, other=enosys)


def rule_for(nr: int, args: tuple[int, ...]) -> Rule | None:
    """The rule that refuses the call ``nr`` (as ``linux.seccomp_notif_recv`` gives it), or None."""
    if is_other_abi(nr):
        return other_abis_rule()
    if is_unknown(nr):
        return unknown_rule()
    name = SYSCALL_NAMES.get(nr)
    for rule in load_profile():
        if rule.syscall == name and all(_holds(c, args) for c in conditions(rule)):
            return rule
    return None


def violation_for(nr: int, args: tuple[int, ...], pid: int | None, where: str = "") -> SecurityViolation:
    """The report of a call the profile blocked: which rule, how severe, and why (its comment).

    ``nr`` is the call as ``linux.seccomp_notif_recv`` gives it; ``where`` says whose
    filter saw it, when it was not the host's (a microVM guest's).
    """
    rule = rule_for(nr, args)
    name, abi = call_name(nr)
    detail = rule.comment if rule else "blocked by the seccomp profile"
    return SecurityViolation(
        violation_type="blocked_syscall",
        syscall=name,
        severity=rule.severity if rule else "HIGH",  # type: ignore[arg-type]
        description=f"{name}{f' ({abi})' if abi else ''}: {detail}{where}",
        detection_layer="SECCOMP",
        blocked=True,
        pid=pid,
    )
