"""What confines QEMU itself on the host: the second wall, for when the guest breaks the first.

The guest's kernel is the boundary a microVM offers; QEMU, the program that
emulates its devices (9p, virtio-serial, the CPU itself under TCG), is host
code that parses what the guest sends. A guest that takes QEMU over through
one of its bugs gets whatever QEMU has. So, as Firecracker's jailer does for
its VMM, QEMU is started with as little as it needs:

- **seccomp** (QEMU's own ``-sandbox``): no ``execve``/``fork`` of other
  programs, no uid or gid changes, no obsolete syscalls, no scheduler or
  resource controls. A restore therefore reads its snapshot from a file
  descriptor stockade opened, not from a ``cat`` QEMU would spawn, and a
  snapshot is written the same way (snapshot.py). Beneath it, stockade's own
  filter (host_program.py): no set-ID mode on any file 9p writes.
- **a network namespace of its own** (and an IPC one): the VM has no network
  device, so QEMU needs no network; taken over, it reaches no host address,
  no abstract Unix socket and no other process's System V IPC. Its sockets
  only listen: the host filter refuses it ``connect()`` and every unix
  socket but a stream or seqpacket one, so no host service's socket is
  reached by its path either.
- **Landlock**: QEMU opens only what it needs: read its own program, the
  libraries and ``/usr`` (the guest's ``/usr`` is that share), the guest
  image, a few files of ``/etc``, ``/proc`` and ``/sys``; read and write
  its run directory, the few device nodes it uses and the policy's shared
  paths (as shared); no TCP; no signal to a process outside its domain.
- **an unprivileged uid of its own**: as root, QEMU runs as a host uid
  leased for its isolate (hosted.py), with no capability and no new
  privileges, in a user namespace where that uid is the guest's uid 1000.
  What the guest reads and writes in a shared path, 9p's files, is reached
  as that uid: the host's own permissions hold (a file private to the host's
  uid 1000, or root's, is out of reach, and shows as ``nobody``'s); what
  the guest writes is that uid's, and the guest sees it as its own. Taken
  over, QEMU is a uid no account and no other isolate has.

Unprivileged, the namespaces come from a user namespace that maps only the
caller's own uid (where the host allows one); QEMU then runs as its caller
with no capability anywhere on the host (docs/threat-model.md).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable

from ...agent import linux
from ...agent.rootfs import INNER_UID  # the code's uid in the guest, and QEMU's in its namespace
from ...errors import SandboxStartError
from ...policy import Policy
from ..host_program import LANDLOCK_ABI

# QEMU's -sandbox: seccomp on, and each optional group of syscalls denied.
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@functools.lru_cache(maxsize=4)
def seccomp_supported(qemu: str) -> bool:
    """Whether this QEMU was built with seccomp: one that was not refuses ``-sandbox on``."""
    try:
        probe = subprocess.run(
            [qemu, "-M", "none", "-nodefaults", "-display", "none", "-sandbox", SECCOMP, "-qmp", "stdio"],
            input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and b'"return"' in probe.stdout


def prefix(uid: int | None, accel: str) -> list[str]:
    """The command that execs QEMU confined: its own network and IPC namespaces, no new
    privileges, and as root ``uid`` (the isolate's leased host uid) with no capability,
    mapped to the guest's uid 1000. ``uid`` None: unprivileged, QEMU runs as its caller."""
    if uid is None and os.geteuid() == 0:
        raise SandboxStartError("as root, QEMU runs on a leased uid of its own, and none was given")
    if shutil.which("setpriv") is None:  # util-linux, essential on Debian
        if uid is not None:
            raise SandboxStartError("setpriv (util-linux) is not installed: QEMU would run as root")
        return namespaces()
    if uid is None:
        return [*namespaces(), "setpriv", "--no-new-privs", "--"]
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", *_device_groups(accel), "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]  # fmt: skip
    return [*namespaces(), *drop, *guest_uid_map()]


def _device_groups(accel: str) -> list[str]:
    """/dev/kvm's group, when it is the way to it (udev's ``0660 root:kvm``); never gid 0 (a
    /dev/kvm that is root's alone cannot be QEMU's, and the accelerator's probe settles on TCG)."""
    group = kvm_group(_kvm_stat()) if accel == "kvm" else None
    return ["--clear-groups"] if group is None else [f"--groups={group}"]


def _kvm_stat() -> os.stat_result | None:
    try:
        return os.stat("/dev/kvm")
    except OSError:
        return None


def kvm_group(st: os.stat_result | None) -> int | None:
    """The group a leased uid needs to open a /dev/kvm of this mode and owner; None where
    others may open it anyway, or no group but root's would do."""
    if st is not None and st.st_mode & 0o006 != 0o006 and st.st_mode & 0o060 == 0o060 and st.st_gid != 0:
        return st.st_gid
    return None


def kvm_reachable(st: os.stat_result | None, euid: int) -> tuple[bool, str]:
    """Whether QEMU, on the uid it will run as, may open a /dev/kvm of this stat, and what
    that depends on (the accelerator's cached probe is only good while that stays the same)."""
    if st is None:
        return False, "no /dev/kvm"
    if euid != 0:  # QEMU runs as the caller
        return os.access("/dev/kvm", os.R_OK | os.W_OK), f"uid {euid}"
    # As root, QEMU runs on a leased uid, with no group but /dev/kvm's own (not gid 0).
    shape = f"leased uid, /dev/kvm {st.st_mode & 0o777:o} gid {st.st_gid}"
    return st.st_mode & 0o006 == 0o006 or kvm_group(st) is not None, shape


def kvm_access() -> tuple[bool, str]:
    return kvm_reachable(_kvm_stat(), os.geteuid())


@functools.lru_cache(maxsize=1)
def guest_uid_map() -> list[str]:
    """``unshare`` for a user namespace in which QEMU's host uid is the guest's uid 1000 (so
    that the guest owns what it writes through 9p); [] where this host lets no unprivileged
    user make one: QEMU keeps its host uid, and the guest sees its files as another's."""
    command = ["unshare", "--user", f"--map-user={INNER_UID}", f"--map-group={INNER_UID}", "--"]
    if shutil.which("unshare") is None:
        return []
    probe = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *command, "true"]
    try:
        works = subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return command if works else []


def namespaces() -> list[str]:
    """``unshare`` for a network and an IPC namespace of QEMU's own; [] where the host allows none."""
    return _namespaces(os.geteuid())


@functools.lru_cache(maxsize=2)
def _namespaces(euid: int) -> list[str]:
    if shutil.which("unshare") is None:
        return []
    command = ["unshare", "--net", "--ipc"]
    if euid != 0:
        command[1:1] = ["--user", "--map-current-user"]
    try:
        works = subprocess.run([*command, "--", "true"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return [*command, "--"] if works else []


def describe(qemu: str) -> str:
    """One line for ``doctor`` and the runtime's details: what confines QEMU here."""
    own = "seccomp" if seccomp_supported(qemu) else "no seccomp of its own (this QEMU was built without it)"
    parts = [own, "stockade's set-ID filter"]
    parts.append(f"Landlock ABI {LANDLOCK_ABI}" if LANDLOCK_ABI else "no Landlock (this kernel has none)")
    parts.append("own network and IPC namespaces" if namespaces() else "the host's network namespace (no unshare)")
    if shutil.which("setpriv") is None:
        parts.append("the caller's privileges (no setpriv)")
    elif os.geteuid() == 0:
        mapped = "as the guest's uid 1000" if guest_uid_map() else "unmapped: no user namespace for it here"
        parts.append(f"a leased uid of its own ({mapped}), no capabilities, no new privileges")
    else:
        parts.append("the caller's uid, no new privileges")
    return ", ".join(parts)


# What QEMU may open, beyond the descriptors it is handed (its log, a snapshot).
_READ = linux.LL_READ_FILE | linux.LL_READ_DIR
_PROGRAMS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")  # its own program and libraries; 9p's /usr
_CONFIG = ("/etc/ld.so.cache", "/etc/ld.so.preload", "/etc/gnutls", "/etc/libnl", "/etc/selinux", "/etc/qemu")
# CPUs, NUMA nodes, huge-page and KVM module settings, its own status: all world-readable.
_KERNEL_VIEWS = ("/proc", "/sys/devices/system", "/sys/bus", "/sys/kernel/mm", "/sys/module")
RUNDIR_RIGHTS = (
    _READ | linux.LL_WRITE_FILE | linux.LL_TRUNCATE | linux.LL_MAKE_SOCK | linux.LL_REMOVE_FILE
)  # fmt: skip
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom", "/dev/random", "/dev/kvm")


def file_rules(
    policy: Policy, qemu: str, rundir: str, image_dir: str, cgroup_files: Iterable[str]
) -> list[tuple[str, int]]:
    """Landlock's allow-list for one QEMU: (path, rights) pairs; a path that does not exist is skipped."""
    everything = linux.landlock_fs_rights(LANDLOCK_ABI)
    # QEMU's own install prefix (its bin/.. : firmware and modules under share/ and lib/),
    # wherever it was installed, and the usual system locations.
    program = os.path.realpath(qemu)
    prefix = os.path.dirname(os.path.dirname(program))
    own = prefix if prefix not in ("/", "") else program  # never the whole tree for a binary at /
    rules = [(path, _READ | linux.LL_EXECUTE) for path in (*_PROGRAMS, own)]
    rules += [(path, _READ) for path in (*_CONFIG, *_KERNEL_VIEWS, image_dir, *library_dirs(program))]
    # unshare maps the uid of its user namespace through /proc/self (whose pid is not known
    # here), as the leased uid or the caller: QEMU never runs as uid 0, whose owner bits alone
    # would let it write sysctls.
    rules.append(("/proc", _READ | linux.LL_WRITE_FILE))
    rules += [(path, _READ | linux.LL_WRITE_FILE | linux.LL_IOCTL_DEV) for path in _DEVICES]
    # Its run directory: its sockets (made, and removed as it closes them) and the console's
    # FIFO, which the host made. No file or directory of its own: taken over, it could otherwise
    # fill the host's disk there, outside every limit the VM has.
    rules.append((rundir, RUNDIR_RIGHTS))
    # The shell that starts QEMU writes its own pid into the isolate's cgroups first.
    rules += [(path, linux.LL_WRITE_FILE | linux.LL_TRUNCATE) for path in cgroup_files]
    rules += [(m.source, everything if m.writable else _READ) for m in policy.filesystem_access]
    return rules


def library_dirs(program: str) -> tuple[str, ...]:
    """The directories of the shared libraries ``program`` loads, outside the usual places.

    A QEMU built into a prefix of its own may take its libraries from elsewhere
    (a Nix store path each, an RPATH into another tree): its jail must let it
    read those, or it dies before its first line. Read once per build of it.
    """
    try:
        st = os.stat(program)
    except OSError:
        return ()
    return _library_dirs(program, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _library_dirs(program: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        out = subprocess.run(["ldd", program], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    dirs: set[str] = set()
    for line in out.splitlines():
        path = line.split("=>")[-1].strip().split(" (")[0].strip()
        if path.startswith("/"):
            dirs.add(os.path.dirname(os.path.realpath(path)))
    usual = tuple(p + "/" for p in _PROGRAMS)
    return tuple(sorted(d for d in dirs if not (d + "/").startswith(usual)))
