"""Isolation levels, their honest security scores, and trust levels (seed 004).

Scores follow seed 004's scale (0 = none, 100 = a TEE) but describe what each
level really is *here*: a kernel exploit reachable through the allowed
syscalls crosses the process level; gVisor puts a user-space kernel between
the code and the host; a microVM has a kernel of its own behind a hypervisor
(with KVM, hardware virtualisation; under TCG, a software emulator).

A trust level names the weakest isolation it accepts. ``STOCKADE_TRUST_MAP``
overrides the mapping, e.g. ``trusted=process,verified=process,untrusted=gvisor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TrustLevel = Literal["trusted", "verified", "untrusted"]
LEVELS = ("none", "process", "gvisor", "microvm")
# Every runtime stockade ships, by name (runtimes/manager.py builds them; fake is level
# none). Here, where the CLI can name them without importing any runtime.
RUNTIME_NAMES = ("process", "gvisor", "microvm", "fake")


@dataclass(frozen=True)
class LevelInfo:
    level: str
    score: int
    boundary: str
    tradeoff: str


LEVEL_INFO = {
    "none": LevelInfo("none", 0, "nothing: the code runs as a plain child process", "development and tests only"),
    "process": LevelInfo(
        "process",
        40,
        "namespaces, pivot_root, seccomp (60+ syscalls blocked and reported), cgroups, rlimits, Landlock; "
        "shares the host kernel",
        "starts in ms; a kernel bug reachable through allowed syscalls escapes it",
    ),
    "gvisor": LevelInfo(
        "gvisor",
        70,
        "gVisor's user-space kernel (runsc) handles every syscall; the host sees a small, filtered set",
        "a cold start of ~0.2 s (docs/performance.md), on the gVisor platform probed as fastest here; "
        "some syscalls unsupported",
    ),
    "microvm": LevelInfo(
        "microvm",
        80,
        "a guest kernel of its own behind QEMU microvm (hardware virtualisation with KVM; software emulation "
        "with TCG, which is slower and has a larger emulator surface), the code confined inside the guest as "
        "a process isolate is (namespaces, a minimal root, no capabilities, the process profile's seccomp), "
        "and QEMU itself jailed on the host (seccomp, Landlock, no network, no capabilities)",
        "seconds to boot cold under TCG; amortised by a warm pool",
    ),
}

NOT_OFFERED = {
    "unikernel": "no unikernel toolchain (Unikraft, HermitCore) is packaged for this host",
    "tee": "no trusted-execution hardware (SEV-SNP, TDX) is exposed to this host",
}

DEFAULT_TRUST_MAP: dict[str, str] = {"trusted": "process", "verified": "gvisor", "untrusted": "microvm"}


def rank(level: str) -> int:
    return LEVELS.index(level)


def trust_map(env: dict[str, str] | None = None) -> dict[str, str]:
    """Each trust level's minimum isolation: the defaults, with ``STOCKADE_TRUST_MAP`` over them."""
    from .settings import Settings, current

    return {**DEFAULT_TRUST_MAP, **(Settings.load(env) if env is not None else current()).trust_map}
