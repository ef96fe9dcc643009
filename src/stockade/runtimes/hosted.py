"""What the gvisor and microvm runtimes share: an isolate held by one host program.

runsc and QEMU are started by host_program.py (inside the isolate's cgroups,
under a seccomp filter of stockade's own). ``HostedSandbox`` ends such an
isolate: close the agent's socket (the agent, and with it the container or
guest, exits), kill the program through a pidfd, then release the cgroup, the
host uids and the working directory.

As root, each such isolate runs on host uids of its own, leased as a process
isolate's uid is (process/uids.py): the uid its code is known by on the host
(the owner of what it writes in a shared path, the only one whose files it
reads there beyond what others may) and, for gVisor, the uid runsc's Sentry
and gofer run as. Never root's, never a host account's, never another
isolate's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

from ..policy import Policy
from .base import IsolateUsage
from .host_program import let_go
from .process.cgroups import IsolateCgroup, pid_alive
from .process.factory import release_uid
from .process.uids import UidAllocator, UidLease, UidRange, processes_of
from .sandbox import AgentSandbox


class HostedSandbox(AgentSandbox):
    """An isolate run by ``proc`` (runsc, QEMU), limited by ``cgroup``, with files in ``workdir``."""

    wait_s = 10.0  # how long the program gets to exit by itself once its agent is gone

    def __init__(
        self,
        policy: Policy,
        conn: socket.socket,
        proc: subprocess.Popen[bytes],
        workdir: str,
        cgroup: IsolateCgroup | None,
    ) -> None:
        super().__init__(policy, conn, 0.0)
        self.proc = proc
        self.workdir = workdir
        self.cgroup = cgroup
        self.pidfd = -1  # the process whose death ends the isolate
        self.uids: list[UidLease] = []  # the host uids it runs as (lease_uids), given back with its cgroup
        self._released = False

    def usage(self, peak: bool = True) -> IsolateUsage:
        return self.cgroup.usage(peak) if self.cgroup else IsolateUsage()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.conn.shutdown(socket.SHUT_RDWR)
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.proc.wait(timeout=self.wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._release_program()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        _end_isolate(self.proc, self.cgroup, self.uids)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _release_program(self) -> None:
        """What the program leaves beyond its process (runsc's state); nothing by default."""


def abandon_start(
    proc: subprocess.Popen[bytes] | None,
    cgroup: IsolateCgroup | None,
    workdir: str,
    uids: Sequence[UidLease] = (),
) -> None:
    """Undo a start that failed before a sandbox owned its parts."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    _end_isolate(proc, cgroup, uids)
    shutil.rmtree(workdir, ignore_errors=True)


def _end_isolate(proc: subprocess.Popen[bytes] | None, cgroup: IsolateCgroup | None, uids: Sequence[UidLease]) -> None:
    """Kill what is left of the isolate and give its uids back once nothing runs as them; then let
    its program's keeper go (which ends whatever this could not)."""
    try:
        if cgroup is not None:
            cgroup.kill()
            gone = cgroup.remove()
        else:
            # No cgroup to empty (a host without one): a Sentry or gofer that outlived runsc
            # still runs as a leased uid, which must not go to another isolate before it ends.
            gone = kill_uid_processes({lease.uid for lease in uids})
        release_uids(uids, gone)
    finally:
        let_go(proc)


def kill_uid_processes(uids: set[int], wait_s: float = 5.0) -> bool:
    """SIGKILL every host process with a uid in ``uids`` (leased, so only the isolate's
    own); whether none is left within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while uids:
        found = processes_of(uids)
        if not found:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in found:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # gone meanwhile
            try:
                if pid in processes_of(uids, (pid,)):  # still the same process: the pidfd pins it
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)
        time.sleep(0.02)
    return True


_allocator: UidAllocator | None = None
_allocator_lock = threading.Lock()


def readable_by_all(root: str) -> None:
    """Make the tree at ``root`` readable (directories traversable) by every uid, whatever
    the umask it was written under: runsc's gofer and QEMU run on leased uids and read
    the files a root daemon writes for them (a systemd unit's ``UMask=0077`` would
    otherwise leave them root's alone). Links are left as they are; a file becomes 0644,
    or 0755 if it had an execute bit: writable by root alone, never set-ID."""
    for top, _dirs, files in os.walk(root):  # links to directories are not followed
        os.chmod(top, 0o755)  # noqa: S103 - the point: others' uids read it
        for name in files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def closed_to_others(directory: str) -> str | None:
    """The first path that keeps another uid from reading ``directory``'s files (a parent
    it may not traverse, the directory, a file in it), or None: a leased uid reads it."""
    parts = os.path.abspath(directory).split(os.sep)
    for i in range(2, len(parts) + 1):
        path = os.sep.join(parts[:i])
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return path
    if not os.stat(directory).st_mode & stat.S_IROTH:
        return directory
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.stat(path).st_mode & stat.S_IROTH:
            return path
    return None


def lease_uids(count: int, cgroup: IsolateCgroup | None) -> list[UidLease]:
    """As root, ``count`` host uids of the isolate's own, each naming its cgroup (so that
    none is handed out again while the group holds a process); rootless, none: the
    program runs as the caller, and so does the code (docs/threat-model.md)."""
    global _allocator
    if os.geteuid() != 0:
        return []
    leases: list[UidLease] = []
    with _allocator_lock:  # its first lease checks the range and sweeps dead holders' files
        if _allocator is None:
            _allocator = UidAllocator(UidRange.from_env())
        try:
            for _ in range(count):
                leases.append(_allocator.lease(cgroup.procs_files if cgroup is not None else []))
        except BaseException:
            release_uids(leases, True)
            raise
    return leases


def release_uids(uids: Sequence[UidLease], cgroup_gone: bool) -> None:
    for uid in uids:
        release_uid(uid, cgroup_gone)


def sweep_dead_hosts_dirs(prefix: str) -> None:
    """Remove the temporary directories named ``<prefix><pid>-...`` (a gVisor bundle, a microVM's
    run directory) whose stockade process is gone: a host killed with SIGKILL leaves them."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        if name.startswith(prefix):
            pid = name[len(prefix) :].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
