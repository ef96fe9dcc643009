"""One host uid per live isolate, from a range no host account uses.

Per-user kernel quotas (inotify instances and watches, queued real-time
signals, POSIX message-queue bytes, user namespaces, ...) are counted per
host uid. Isolates that shared one uid shared those quotas: one sandbox could
exhaust them for every other, and for host processes running as that uid.
So, as root, each isolate runs as a uid of its own from
``STOCKADE_SANDBOX_UIDS`` (``first-last``; the gid is the same number).

A uid is leased like a slot, across every stockade process on the host (the
daemon, SDK callers, the CLI): the lease is an exclusive ``flock`` on
``<lock dir>/<uid>``, which the kernel drops when its holder exits however it
ends, and the file is removed when the isolate is released. The file names
the isolate's cgroups; a uid whose file outlived its holder, or whose
isolate's cgroups could not be removed, is skipped while those cgroups hold a
process (the host was killed and the zygote has not finished cleaning up), so
a uid is never handed out while in use. Files of dead holders are swept when
an allocator first leases. The lock directory is per kernel: two stockade
installs on one kernel that do not share ``/run`` need disjoint ranges.

A daemon that gives root up leases from a directory of its user's own
(``hand_to``), which root's processes do not read, and they from one it
cannot read: so the two never take the same uid, each takes its own half of
the range, root's processes the even places in it, such a daemon the odd.

Rootless, stockade cannot switch uids: every isolate runs as the caller's own
uid and shares its per-user quotas (docs/threat-model.md says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import random
import stat
from collections.abc import Sequence

from ...errors import ConfigError, SandboxStartError

# systemd's UIDS-GIDS.md lists 0x70000000-0x7FFFFFFF as unused by any
# allocator it knows (nspawn's container ranges end below, and its "foreign"
# range starts above 0x7FFE0000); 65,536 of them are more than enough isolates.
DEFAULT_RANGE = "1879048192-1879113727"
LOCK_DIR = "/run/stockade/uids"
_LEASE_MAX = 64 * 1024  # what a lease file may hold (the cgroup paths)


class UidRange:
    """The configured range, checked once against the host's accounts and subordinate ids."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> UidRange:
        """``STOCKADE_SANDBOX_UIDS`` (settings.py), of ``env`` when given."""
        from ...settings import Settings, current

        first, last = (Settings.load(env) if env is not None else current()).sandbox_uids
        return cls(first, last)

    def check_unused(self, etc: str = "/etc") -> None:
        """Refuse a range that a host account or group (an isolate's gid is its uid's
        number), or a user's subordinate ids, overlap."""
        for entry in pwd.getpwall():
            if self.first <= entry.pw_uid <= self.last:
                raise ConfigError(
                    f"STOCKADE_SANDBOX_UIDS {self.first}-{self.last} holds uid {entry.pw_uid} "
                    f"of the host account {entry.pw_name!r}: choose a range no account uses"
                )
        for group in grp.getgrall():
            if self.first <= group.gr_gid <= self.last:
                raise ConfigError(
                    f"STOCKADE_SANDBOX_UIDS {self.first}-{self.last} holds gid {group.gr_gid} "
                    f"of the host group {group.gr_name!r} (an isolate's gid is its uid): choose a range no group uses"
                )
        for name in ("subuid", "subgid"):
            for owner, start, count in _subordinate_ranges(os.path.join(etc, name)):
                if start <= self.last and self.first < start + count:
                    raise ConfigError(
                        f"STOCKADE_SANDBOX_UIDS {self.first}-{self.last} overlaps {owner}'s subordinate ids "
                        f"{start}-{start + count - 1} in {etc}/{name}: choose a range no one else maps"
                    )


def _subordinate_ranges(path: str) -> list[tuple[str, int, int]]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    ranges = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            ranges.append((parts[0], int(parts[1]), int(parts[2])))
    return ranges


class UidLease:
    """One uid, held until ``release``; the lock goes with the process that holds it."""

    def __init__(self, uid: int, fd: int, path: str) -> None:
        self.uid = uid
        self._fd = fd
        self._path = path

    def record(self, cgroup_procs: list[str]) -> None:
        """Name the isolate's cgroups, so that nobody takes this uid while they hold a process."""
        data = json.dumps(cgroup_procs).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self, keep_record: bool = False) -> None:
        """Give the uid back. Idempotent.

        ``keep_record``: the isolate's cgroups could not be removed (a process
        still dying in them); the file stays, naming them, so the uid is not
        taken again until they are empty (and a later sweep removes it).
        """
        if self._fd >= 0:
            if not keep_record:
                with contextlib.suppress(OSError):
                    os.unlink(self._path)  # while locked: a taker checks it locked the file still named so
            os.close(self._fd)  # drops the flock
            self._fd = -1


class UidAllocator:
    def __init__(self, uid_range: UidRange, lock_dir: str = LOCK_DIR) -> None:
        self.range = uid_range
        self.lock_dir = lock_dir
        self._half = 0  # the places in the range this allocator takes: even (root's), odd (hand_to)
        self._checked = False

    def lease(self, cgroup_procs: list[str] | None = None) -> UidLease:
        """A uid no live isolate uses, from a random place in the range (few collisions);
        ``cgroup_procs``, the isolate's cgroups, are recorded in it (``UidLease.record``)."""
        lease = self._take()
        if cgroup_procs is not None:
            try:
                lease.record(cgroup_procs)
            except OSError as exc:
                lease.release()
                raise SandboxStartError(
                    f"cannot record the lease of uid {lease.uid} in {self.lock_dir}: {exc}"
                ) from None
        return lease

    def _take(self) -> UidLease:
        if not self._checked:
            self.range.check_unused()
            self._check_lock_dir()
            self.sweep()
            self._checked = True
        size = (self.range.last - self.range.first + 1 - self._half + 1) // 2  # the uids of this half
        if size == 0:
            raise SandboxStartError(
                f"STOCKADE_SANDBOX_UIDS ({self.range.first}-{self.range.last}) holds no uid for a daemon that gave "
                "root up: it takes every other uid of the range (root's processes the rest), so it needs two at least"
            )
        # Where the search starts is no secret (the flock decides who holds a uid), only spread:
        # the system's randomness, through random's, not secrets' (whose import, OpenSSL's start
        # included, would hold up the CLI's early ask for its isolate's spare: factory.py).
        start = random.SystemRandom().randrange(size)
        for step in range(size):
            uid = self.range.first + self._half + 2 * ((start + step) % size)
            lease = self._try(uid)
            if lease is not None:
                return lease
        which = "the odd" if self._half else "the even"
        raise SandboxStartError(
            f"every uid at {which} places of STOCKADE_SANDBOX_UIDS ({self.range.first}-{self.range.last}) "
            "is in use by a live isolate"
        )

    def hand_to(self, uid: int, gid: int) -> None:
        """Before this process drops root to ``uid``: leases in a directory of that user's own
        (``/run/stockade/uids-<uid>``), made by root if missing and only then given to it; root
        never touches what is in it, nor shares its own. Neither can see the other's leases, so
        from here this allocator takes the odd places of the range, root's processes the even."""
        self.lock_dir = f"{self.lock_dir}-{uid}"
        self._half = 1
        try:
            os.mkdir(self.lock_dir, 0o700)
            os.chown(self.lock_dir, uid, gid, follow_symlinks=False)
        except FileExistsError:
            pass  # a previous daemon's: _check_lock_dir holds it to this user, 0700, a real directory

    def _check_lock_dir(self) -> None:
        """The leases' directory is this process's owner's alone: anyone who could
        write there could take or fake a lease."""
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        st = os.lstat(self.lock_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(
                f"{self.lock_dir} (the uid leases) must be a directory owned by uid {os.geteuid()} "
                f"with mode 0700; it is {stat.filemode(st.st_mode)} owned by uid {st.st_uid}"
            )

    def sweep(self) -> None:
        """Remove the files of leases whose holders died (a SIGKILLed host) and whose
        isolates are gone: otherwise each would stay until its uid came up again."""
        for name in os.listdir(self.lock_dir):
            if not name.isdigit():
                continue
            lease = self._try(int(name))
            if lease is not None:
                lease.release()

    def _try(self, uid: int) -> UidLease | None:
        path = os.path.join(self.lock_dir, str(uid))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Released (and unlinked) between our open and our lock: that file is
            # no longer the uid's, and another taker may hold the new one.
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        if _still_running(os.pread(fd, _LEASE_MAX, 0), uid):
            os.close(fd)
            return None
        return UidLease(uid, fd, path)


def _still_running(recorded: bytes, uid: int) -> bool:
    """Whether the cgroups a lease file names still hold a process (its holder died first,
    or kept it for them); a lease of no cgroup (a host without one) that was kept: whether
    a process still runs as ``uid``."""
    try:
        procs_files = json.loads(recorded) if recorded else []
    except ValueError:
        return False
    if procs_files == [] and recorded.strip() == b"[]":
        return bool(processes_of({uid}))
    for path in procs_files if isinstance(procs_files, list) else []:
        try:
            with open(str(path), "rb") as f:
                if f.read(16).strip():
                    return True
        except OSError:
            continue  # the group is gone
    return False


def processes_of(uids: set[int], pids: Sequence[int] | None = None) -> list[int]:
    """The live host processes (of ``pids``, else all) with a uid in ``uids``, any of
    their real, effective, saved or filesystem uids; a zombie counts only while another
    of its threads still runs."""
    found = []
    for pid in pids if pids is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:", "Threads:")))
        except OSError:
            continue  # gone meanwhile
        if fields.get("State", "Z").split()[:1] == ["Z"] and fields.get("Threads", "1").strip() in ("", "0", "1"):
            continue  # dead, waiting for its parent: it runs nothing
        if uids.intersection(int(i) for i in fields.get("Uid", "").split()):
            found.append(pid)
    return found
