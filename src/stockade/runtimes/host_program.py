"""How the host programs that hold an isolate (runsc, QEMU) are started.

- **Inside the isolate's cgroups from their first instruction**: a shell writes
  its own pid into them and then execs the program, so the program and
  everything it starts are born inside the limits (no window in which a child
  escapes them).
- **With nothing of the caller's environment** (a daemon's token, say) in their
  memory.
- **Under a seccomp filter of stockade's own** (``seccomp.host_program``): no
  file made with a set-user-ID or set-group-ID mode (EPERM), no mode changed to
  one (the chmod is skipped), no call whose mode a filter cannot read
  (``openat2``, ``io_uring``), no call through another ABI, no number the
  syscall table does not name. The code inside is refused the set-ID calls and
  ``openat2`` by the filter inside its boundary already (the process runtime's
  profile in a microVM's guest, gVisor's OCI filter); this is the wall outside
  it. runsc's gofer and Sentry and QEMU's 9p server write the files of
  shared paths on the host as the isolate's leased uid: should the Sentry or the
  guest's kernel fall, a set-ID file planted there would lend that uid to any
  host user who runs it.
- **Under Landlock**, where the runtime gives rules (QEMU's jail).
- **Ended with their host** by a keeper of their own: a small process outside
  the isolate that holds a pipe from the host and a pidfd of the program, and
  on the pipe's end (the host let go of the isolate, or died) kills the program
  and whatever is left in the isolate's cgroup, then removes the group. A guest (or a Sentry) taken over
  would otherwise keep running, on its leased uid, when its host is SIGKILLed:
  the agent's end of the channel closing is the only other thing that ends it.

Seccomp and Landlock confine the thread that asks and what it starts from then
on, so a thread made for one spawn takes them on and ends: the caller's other
threads keep their freedom, and no code runs between fork and exec
(``preexec_fn`` is unsafe in a process with threads).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from typing import IO

from ..agent import linux, rootfs
from .process import seccomp
from .process.cgroups import IsolateCgroup

PROGRAM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
LANDLOCK_ABI = linux.landlock_abi()


def spawn_in_cgroup(
    cmd: list[str],
    cgroup: IsolateCgroup | None,
    *,
    stdin: int | IO[bytes],
    stdout: int | IO[bytes],
    stderr: int | IO[bytes],
    label: str,
    pass_fds: tuple[int, ...] = (),
    landlock: list[tuple[str, int]] | None = None,
    listens_only: bool = False,
    read_only: list[tuple[str, str]] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in ``cgroup``, under the host filter and ``landlock``'s (path, rights) rules
    (None: no Landlock; ignored where the kernel has none), in a session of its own.
    ``listens_only``: it connects to no socket (``seccomp.host_program``). ``read_only``: (source,
    place) pairs, as root: the program runs in a mount namespace of its own where each source is
    bound at its place read-only (the mounts below it too), nosuid and nodev; the host's
    namespace never sees them, and they go with the program's last process."""
    joins = " ".join(f'echo $$ > "{p}";' for p in (cgroup.procs_files if cgroup else []))
    started: list[subprocess.Popen[bytes]] = []
    failure: list[BaseException] = []

    def walled() -> None:
        try:
            if read_only:
                # This thread's own (unshare takes its filesystem context with it), inherited by
                # what it starts; private first, so that no bind here reaches the host's namespace.
                linux.unshare(linux.CLONE_NEWNS)
                linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
                for source, place in read_only:
                    rootfs.bind(source, place, writable=False)
            # A filter, or restrict_self, needs no_new_privs without CAP_SYS_ADMIN (root in a
            # container may lack it); nothing runsc or QEMU start needs to gain privileges.
            linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
            linux.seccomp_install(seccomp.host_program(listens_only))
            if landlock is not None and LANDLOCK_ABI:
                linux.landlock_restrict(LANDLOCK_ABI, landlock, deny_tcp=True, scope=True)
            started.append(
                subprocess.Popen(
                    ["/bin/sh", "-c", f'{joins} exec "$@"', label, *cmd],
                    env=PROGRAM_ENV,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    pass_fds=pass_fds,
                    start_new_session=True,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=walled, name=f"{label}-spawn")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    _keep(started[0], cgroup)
    return started[0]


# The keeper: stdlib only, started with -I -S (no site, nothing of the caller's environment).
_KEEPER = r"""
import os, signal, sys, time
pidfd, procs = int(sys.argv[1]), sys.argv[2:]
groups = [os.path.dirname(path) for path in procs]
while os.read(0, 512):
    pass
try:
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
except OSError:
    pass
deadline = time.monotonic() + 10
while procs and time.monotonic() < deadline:
    left = []
    for path in procs:
        try:
            pids = open(path).read().split()
        except OSError:
            continue  # removed by its host already
        if pids:
            left.append(path)
        pinned = {}
        for pid in pids:
            try:
                pinned[pid] = os.pidfd_open(int(pid))
            except OSError:
                pass  # gone meanwhile
        try:
            still = set(open(path).read().split())  # read again once pinned: a pid listed now is that process
        except OSError:
            still = set()
        for pid, fd in pinned.items():
            try:
                if pid in still:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
    procs = left
    time.sleep(0.05)
for group in groups:  # emptied: removed (one its host removed already is gone)
    try:
        os.rmdir(group)
    except OSError:
        pass
"""
# program -> its keeper and the pipe's write end; by the Popen, never by pid: a pid freed when the
# program is reaped may be a later program's before its isolate's release lets the keeper go.
_keepers: dict[subprocess.Popen[bytes], tuple[subprocess.Popen[bytes], int]] = {}
_keepers_lock = threading.Lock()


def _keep(proc: subprocess.Popen[bytes], cgroup: IsolateCgroup | None) -> None:
    """Start ``proc``'s keeper (above); ``let_go`` ends it once the host has ended the isolate.
    Never fails the spawn: without a keeper, the isolate still ends with its agent's channel."""
    try:
        read_end, write_end = os.pipe()  # neither inherited by anything else the host starts
    except OSError:
        return
    keeper = None
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            keeper = subprocess.Popen(
                # This interpreter (a host's, new enough for pidfds), with nothing of its site or environment.
                [sys.executable, "-I", "-S", "-c", _KEEPER, str(pidfd), *(cgroup.procs_files if cgroup else ())],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(pidfd,),
                env={},
                start_new_session=True,  # a terminal's Ctrl-C to the host's group leaves it to do its work
            )
        finally:
            os.close(pidfd)
    except OSError:
        pass  # the program gone already, or no process to spare
    finally:
        os.close(read_end)
    if keeper is None:
        os.close(write_end)
        return
    with _keepers_lock:
        _keepers[proc] = (keeper, write_end)


def let_go(proc: subprocess.Popen[bytes] | None) -> None:
    """End ``proc``'s keeper: called once the host has ended the isolate itself (its program
    reaped, its cgroup killed), so that the keeper finds nothing left to kill."""
    if proc is None:
        return
    with _keepers_lock:
        kept = _keepers.pop(proc, None)
    if kept is None:
        return
    keeper, write_end = kept
    os.close(write_end)
    try:
        keeper.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            keeper.kill()
        keeper.wait()
