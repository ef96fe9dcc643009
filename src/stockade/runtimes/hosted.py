"""What the gvisor and microvm runtimes share: an isolate held by one host program.

runsc and QEMU are started through ``spawn_in_cgroup``: a shell writes its own
pid into the isolate's cgroups and then execs the program, so the program and
everything it starts are born inside the limits (no window in which a child
escapes them). ``HostedSandbox`` ends such an isolate: close the agent's
socket (the agent, and with it the container or guest, exits), kill the
program through a pidfd, then release the cgroup and the working directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from typing import IO

from ..policy import Policy
from .base import IsolateUsage
from .process.cgroups import IsolateCgroup
from .sandbox import AgentSandbox

PROGRAM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def spawn_in_cgroup(
    cmd: list[str],
    cgroup: IsolateCgroup | None,
    *,
    stdin: int | IO[bytes],
    stdout: int | IO[bytes],
    stderr: int | IO[bytes],
    label: str,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    joins = " ".join(f'echo $$ > "{p}";' for p in (cgroup.procs_files if cgroup else []))
    return subprocess.Popen(
        ["/bin/sh", "-c", f'{joins} exec "$@"', label, *cmd],
        env=PROGRAM_ENV,  # nothing of the caller's environment (a daemon's token, say) in runsc's or QEMU's memory
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=pass_fds,
        start_new_session=True,
    )


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
        if self.cgroup is not None:
            self.cgroup.kill()
            self.cgroup.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _release_program(self) -> None:
        """What the program leaves beyond its process (runsc's state); nothing by default."""


def abandon_start(proc: subprocess.Popen[bytes] | None, cgroup: IsolateCgroup | None, workdir: str) -> None:
    """Undo a start that failed before a sandbox owned its parts."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    if cgroup is not None:
        cgroup.kill()
        cgroup.remove()
    shutil.rmtree(workdir, ignore_errors=True)
