"""Per-isolate cgroups on v1, v2 and the hybrid of both.

- v2 (most current hosts): one group with memory.max, pids.max, cpu.max; usage
  from memory.peak/cpu.stat; oom kills from memory.events, forks refused from
  pids.events; ``cgroup.kill``.
- v1 (this kind of host): one group per controller (memory, pids, cpu,
  cpuacct) under the host process's own group of that controller, which keeps
  any limit the host itself is under.
- hybrid: v1 controllers for limits plus a controller-less v2 group, only for
  its ``cgroup.kill``.

Groups are named ``stockade-<host pid>-<n>`` so that ``sweep`` can remove what
a dead host left behind. ``STOCKADE_CGROUP_PARENT`` (a path inside the cgroup
hierarchy, like Docker's ``--cgroup-parent``) puts them under a group of the
operator's choosing instead, made if missing. Where a controller cannot be used (rootless without
delegation) the group says so in ``unenforced``; nothing is silently dropped. A limit the kernel
refuses is a ``SandboxStartError`` naming it (``apply_limits``).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import SandboxStartError
from .cgroup_layout import CgroupLayout, detect_layout, enable_controllers

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..base import IsolateUsage

# The CPU an isolate's setup (the runtime's own code: namespaces, runsc's boot, QEMU's) gets
# at least: under a caller's cpu_limit of 0.01 a start would take minutes.
SETUP_CPU = 1.0
_NAME = re.compile(r"^stockade-(\d+)-\d+$")
_counter = itertools.count(1)


class IsolateCgroup:
    """The groups of one isolate; every method is safe to call after the isolate died."""

    def __init__(self, layout: CgroupLayout, name: str) -> None:
        self.layout = layout
        self.name = name
        self._applied: tuple[tuple[int, int, float], list[str]] | None = None
        self._fds: dict[str, int] = {}
        self.dirs: dict[str, str] = {}  # controller (or "v2") -> dir
        made: dict[str, str] = {}  # realpath of parent -> dir, for co-mounted controllers (cpu,cpuacct)
        try:
            for ctrl, parent in layout.v1_parents.items():
                if not layout.v2_limits:
                    real = os.path.realpath(parent)
                    if real not in made:
                        made[real] = _mkdir(os.path.join(parent, name))
                    self.dirs[ctrl] = made[real]
            # On a hybrid host the controller-less v2 group would only add cgroup.kill, and every
            # extra group to join costs the spawn an RCU grace period; killing the namespace's init
            # (pidfd) already ends every process, where the host may signal it (layout.v2_kill).
            if layout.isolates_in_v2 and layout.v2_parent is not None:
                self.dirs["v2"] = _mkdir(os.path.join(layout.v2_parent, name))
        except OSError:
            self.remove(wait_s=0)  # the groups made before the one that failed
            raise

    @property
    def counts_refused_forks(self) -> bool:
        """Whether its pids limit is a cgroup's, whose pids.events counts the forks it refuses."""
        return self.layout.v2_limits or "pids" in self.dirs

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def apply_limits(self, memory_mb: int, pids: int, cpu: float, *, setup: bool = False) -> list[str]:
        """Write the limits; return the ones that could not be applied, with why.

        ``setup``: the runtime is about to build the isolate in this group, so the CPU
        limit is at least ``SETUP_CPU``; the runtime writes the caller's own limits once
        setup is done, before anything of the caller's runs.

        A limit the kernel refuses raises ``SandboxStartError`` naming it: the
        caller destroys the isolate (its limits are then only partly written).
        """
        if setup:
            cpu = max(cpu, SETUP_CPU)
        if self._applied is not None and self._applied[0] == (memory_mb, pids, cpu):
            return list(self._applied[1])  # a pooled isolate built with these very limits
        self._applied = None  # until every limit is written
        missing = self._write_limits(memory_mb, pids, cpu)
        self._applied = ((memory_mb, pids, cpu), missing)
        return list(missing)

    def _write_limits(self, memory_mb: int, pids: int, cpu: float) -> list[str]:
        missing: list[str] = []
        mem = memory_mb * 1024 * 1024
        period = 100_000
        quota = max(1000, int(cpu * period))
        memory_limit = _Limit("memory_mb", memory_mb)
        pids_limit = _Limit("pids_limit", pids)
        cpu_limit = _Limit("cpu_limit", cpu)
        if self.layout.v2_limits:
            v2 = self.dirs["v2"]
            memory_limit.write(os.path.join(v2, "memory.max"), str(mem))
            memory_limit.write(os.path.join(v2, "memory.swap.max"), "0", optional=True)
            pids_limit.write(os.path.join(v2, "pids.max"), str(pids))
            cpu_limit.write(os.path.join(v2, "cpu.max"), f"{quota} {period}")
            return missing
        if "memory" in self.dirs:
            _write_v1_memory(self.dirs["memory"], mem, memory_limit)
        else:
            missing.append(f"memory_mb ({self._why('memory')})")
        if "pids" in self.dirs:
            pids_limit.write(os.path.join(self.dirs["pids"], "pids.max"), str(pids))
        else:
            missing.append(f"pids_limit: cgroup ({self._why('pids')}); RLIMIT_NPROC still applies")
        if "cpu" in self.dirs:
            cpu_limit.write(os.path.join(self.dirs["cpu"], "cpu.cfs_period_us"), str(period))
            cpu_limit.write(os.path.join(self.dirs["cpu"], "cpu.cfs_quota_us"), str(quota))
        else:
            missing.append(f"cpu_limit ({self._why('cpu')})")
        return missing

    def _why(self, ctrl: str) -> str:
        for problem in self.layout.problems:
            if ctrl in problem:
                return problem
        return f"no usable {ctrl} cgroup on this host"

    def usage(self, peak: bool = True) -> IsolateUsage:
        """OOM kills and CPU time so far; the peak memory too unless ``peak=False``.

        ``peak=False`` is the baseline read as a run opens (or as its isolate is
        built): it resets the peak counter to the usage now, so that the run's
        own read is the run's peak, not the held sandbox's lifetime one (v1's
        ``memory.max_usage_in_bytes``; v2's ``memory.peak`` from Linux 6.12, per
        descriptor, so the same one is read; before that the lifetime peak stays).
        """
        # Imported here: the CLI makes its isolate's groups before the runtime (and the Policy
        # that runtimes/base.py brings) is imported, so that the zygote's spare starts sooner.
        from ..base import IsolateUsage

        usage = IsolateUsage()
        if self.layout.v2_limits:
            usage.oom_kills = self._keyed("v2", "memory.events", "oom_kill") or 0
            usage.pids_refused = self._keyed("v2", "pids.events", "max") or 0
            usec = self._keyed("v2", "cpu.stat", "usage_usec")
            usage.cpu_seconds = usec / 1e6 if usec is not None else None
            usage.memory_peak_mb = self._peak_mb("v2", "memory.peak", peak)
            return usage
        if "pids" in self.dirs:
            usage.pids_refused = self._keyed("pids", "pids.events", "max") or 0
        if "memory" in self.dirs:
            usage.oom_kills = self._keyed("memory", "memory.oom_control", "oom_kill") or 0
            usage.memory_peak_mb = self._peak_mb("memory", "memory.max_usage_in_bytes", peak)
        if "cpuacct" in self.dirs:
            ns = self._read_int("cpuacct", "cpuacct.usage")
            usage.cpu_seconds = ns / 1e9 if ns is not None else None
        return usage

    def _peak_mb(self, key: str, name: str, read: bool) -> float | None:
        if not read:
            fd = self._open(key, name, writable=True)
            try:
                if fd is not None:
                    os.pwrite(fd, b"0\n", 0)
            except OSError:
                pass  # a kernel whose memory.peak cannot be reset: the lifetime peak stays
            return None
        top = self._read_int(key, name)
        return round(top / 2**20, 3) if top is not None else None

    def _open(self, key: str, name: str, writable: bool = False) -> int | None:
        # Counters are read several times per run: each file is opened once and
        # pread from the start, which re-generates its contents.
        path = os.path.join(self.dirs[key], name)
        fd = self._fds.get(path)
        if fd is None:
            for flags in (os.O_RDWR, os.O_RDONLY) if writable else (os.O_RDONLY,):
                try:
                    fd = self._fds[path] = os.open(path, flags | os.O_CLOEXEC)
                    break
                except OSError:
                    continue
        return fd

    def _read(self, key: str, name: str) -> bytes | None:
        fd = self._open(key, name)
        try:
            return os.pread(fd, 4096, 0) if fd is not None else None
        except OSError:
            return None

    def _read_int(self, key: str, name: str) -> int | None:
        raw = self._read(key, name)
        try:
            return int(raw.split()[0]) if raw else None
        except ValueError:
            return None

    def _keyed(self, key: str, name: str, field: str) -> int | None:
        raw = self._read(key, name)
        for line in (raw or b"").splitlines():
            label, _, value = line.partition(b" ")
            if label == field.encode():
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def kill(self) -> None:
        v2 = self.dirs.get("v2")
        if v2 and _write_optional(os.path.join(v2, "cgroup.kill"), "1"):
            return
        # v1 has no cgroup.kill: signal each pid listed, once, until no pid appears that was not
        # (a process forked before its signal came). A killed process stays listed while it
        # dies, for milliseconds; signalling it again only took a core the dying need.
        signalled: set[int] = set()
        for _ in range(50):
            fresh = [pid for pid in self.pids() if pid not in signalled]
            if not fresh:
                return
            for pid in fresh:
                signalled.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                with open(procs) as f:
                    found.update(int(x) for x in f.read().split())
            except OSError:
                pass
        return sorted(found)

    def remove(self, wait_s: float = 2.0) -> bool:
        """rmdir every group, waiting for dying processes to leave; True when all are gone."""
        self.close_files()
        deadline = time.monotonic() + wait_s
        pending = {path: path for path in self.dirs.values()}
        pause = 0.001  # an isolate's last exit takes a few ms: look again soon, then less often
        while pending:
            for key, path in list(pending.items()):
                try:
                    os.rmdir(path)
                    del pending[key]
                except FileNotFoundError:
                    del pending[key]
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        del pending[key]
            if not pending or time.monotonic() > deadline:
                break
            self.kill()
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        if pending:
            with _LEFTOVERS_LOCK:
                _LEFTOVERS.update(pending.values())  # retried by the next create(), and by retry_leftovers()
        return not pending


# Groups whose remove() gave up while their processes were still dying (an
# isolate with much memory to free, on a busy host): a long-lived process
# retries them, instead of leaving them until the next start's sweep.
_LEFTOVERS: set[str] = set()
_LEFTOVERS_LOCK = threading.Lock()


def retry_leftovers(wait_s: float = 0.0) -> int:
    """rmdir the groups an earlier remove() had to leave, trying again for up to ``wait_s`` while
    their last processes finish dying; return how many are still there."""
    deadline = time.monotonic() + wait_s
    while True:
        with _LEFTOVERS_LOCK:
            for path in sorted(_LEFTOVERS, key=len, reverse=True):  # a child before its parent
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                _LEFTOVERS.discard(path)
            left = len(_LEFTOVERS)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


class SweptCgroupManager:
    """A runtime's ``CgroupManager``, made on first use, after the groups that dead
    stockade processes left behind (and whatever ``sweep_more`` removes: a runtime's
    own leftovers) are swept."""

    def __init__(self, sweep_more: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._manager: CgroupManager | None = None
        self._sweep_more = sweep_more

    def get(self) -> CgroupManager:
        with self._lock:
            if self._manager is None:
                manager = CgroupManager()
                manager.sweep()
                if self._sweep_more is not None:
                    self._sweep_more()
                self._manager = manager
            return self._manager


class CgroupManager:
    def __init__(self, layout: CgroupLayout | None = None) -> None:
        self.layout = layout or detect_layout()

    def create(self) -> IsolateCgroup:
        if _LEFTOVERS:
            retry_leftovers()
        return IsolateCgroup(self.layout, f"stockade-{os.getpid()}-{next(_counter)}")

    def hand_to(self, uid: int, gid: int) -> None:
        """Before this process drops root to ``uid``: a group of its own under each parent, made and
        given to it (a delegated subtree, as systemd's ``Delegate=``), where it makes, limits, empties
        and removes isolates' groups from then on. The parents themselves are left as they are."""
        # Named as an isolate's group of this process would be (its number 0): once this process is
        # gone, the next stockade process's sweep removes it with what it holds.
        name = f"stockade-{os.getpid()}-0"
        made: dict[str, str] = {}  # a parent's real path (cpu and cpuacct may share one) -> the group made there
        parents = dict(self.layout.v1_parents)
        if self.layout.v2_parent:
            parents["v2"] = self.layout.v2_parent
        for key, parent in parents.items():
            real = os.path.realpath(parent)
            if real not in made:
                group = os.path.join(parent, name)
                os.makedirs(group, exist_ok=True)
                if key == "v2" and self.layout.v2_limits:
                    enable_controllers(os.path.join(group, "cgroup.subtree_control"), {"memory", "pids", "cpu"})
                os.chown(group, uid, gid)
                made[real] = group
            parents[key] = made[real]
        v2 = parents.pop("v2", None)
        # Without root its isolates' uids are not its to signal: their groups' cgroup.kill ends them.
        self.layout = dataclasses.replace(self.layout, v1_parents=parents, v2_parent=v2, v2_kill=v2 is not None)
        self.sweep()  # what a dead daemon of this user left in its groups

    def parents(self) -> list[str]:
        """Every directory this manager makes isolates' groups in."""
        found = list(dict.fromkeys(self.layout.v1_parents.values()))
        if self.layout.v2_parent and self.layout.v2_parent not in found:
            found.append(self.layout.v2_parent)
        return found

    def sweep(self) -> int:
        """Remove groups left by stockade processes that no longer exist; return how many."""
        parents = list(self.layout.v1_parents.values())
        if self.layout.v2_parent:
            parents.append(self.layout.v2_parent)
        removed = 0
        for parent in parents:
            try:
                names = os.listdir(parent)
            except OSError:
                continue
            for name in names:
                match = _NAME.match(name)
                if not match or pid_alive(int(match.group(1))):
                    continue
                removed += _remove_stale(self.layout, parent, name)
        return removed


def _remove_stale(layout: CgroupLayout, parent: str, name: str) -> int:
    """Kill and remove a dead process's group, and first its own groups (a daemon that gave root up
    kept its isolates' groups inside one of its own); how many went."""
    where = os.path.join(parent, name)
    removed = 0
    try:
        inner = [n for n in os.listdir(where) if _NAME.match(n) and os.path.isdir(os.path.join(where, n))]
    except OSError:
        inner = []
    for child in inner:
        removed += _remove_stale(layout, where, child)
    stale = IsolateCgroup.__new__(IsolateCgroup)
    stale.layout, stale.name, stale._applied, stale._fds = layout, name, None, {}
    stale.dirs = {"x": where}
    stale.kill()
    return removed + stale.remove(wait_s=1.0)


def pid_alive(pid: int) -> bool:
    """Does a process with this pid exist (ours counts as alive)?"""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _Limit:
    """A policy limit being written: a refused write is a ``SandboxStartError`` naming it."""

    field: str  # the Policy field, as the caller knows it
    value: int | float

    def write(self, path: str, value: str, optional: bool = False) -> None:
        """Write ``value`` to ``path``; ``optional``: a file the kernel does not offer is skipped."""
        try:
            _write(path, value)
        except OSError as exc:
            # cgroupfs answers a file it does not have with EACCES (it makes no files), not ENOENT.
            if optional and not os.path.exists(path) and os.path.isdir(os.path.dirname(path)):
                return
            raise self.refused(path, value, exc.strerror or str(exc)) from None

    def refused(self, path: str, value: str, why: str) -> SandboxStartError:
        return SandboxStartError(
            f"cannot apply {self.field}={self.value} to the isolate's cgroup: writing {value} to {path} failed: {why}"
        )


def _write_v1_memory(group: str, mem: int, limit: _Limit) -> None:
    """memory.limit_in_bytes and memory.memsw.limit_in_bytes, in an order v1 accepts.

    v1 refuses a memory limit above memory+swap, and memory+swap below memory, at
    every single write: raising, memory+swap goes first; lowering, memory does.
    A group already holds limits when it was written ahead (a pooled isolate, the
    zygote's spare). memsw files exist only with swap accounting.
    """
    memory = os.path.join(group, "memory.limit_in_bytes")
    memsw = os.path.join(group, "memory.memsw.limit_in_bytes")
    # Socket buffers: v1 charges a group's TCP and UDP buffers only once this is written (v2 always
    # does). Uncharged, one isolate's unread loopback connections held the host's whole tcp_mem
    # (and udp_mem): every socket on the host, in every isolate, was cut to its minimum buffer.
    # Written before anything of the code's runs, so every socket it makes is counted.
    limit.write(os.path.join(group, "memory.kmem.tcp.limit_in_bytes"), str(mem), optional=True)
    if not os.path.exists(memsw):
        limit.write(memory, str(mem))
        return
    try:
        with open(memory) as f:
            current = int(f.read())
    except (OSError, ValueError):
        current = None  # the writes below say what is wrong
    order = (memsw, memory) if current is not None and mem > current else (memory, memsw)
    for path in order:
        limit.write(path, str(mem))


def _mkdir(path: str) -> str:
    os.mkdir(path)
    return path


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _write_optional(path: str, value: str) -> bool:
    try:
        _write(path, value)
        return True
    except OSError:
        return False
