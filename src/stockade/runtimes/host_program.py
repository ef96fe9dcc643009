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

Seccomp and Landlock confine the thread that asks and what it starts from then
on, so a thread made for one spawn takes them on and ends: the caller's other
threads keep their freedom, and no code runs between fork and exec
(``preexec_fn`` is unsafe in a process with threads).
"""

from __future__ import annotations

import subprocess
import threading
from typing import IO

from ..agent import linux
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
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in ``cgroup``, under the host filter and ``landlock``'s (path, rights) rules
    (None: no Landlock; ignored where the kernel has none), in a session of its own."""
    joins = " ".join(f'echo $$ > "{p}";' for p in (cgroup.procs_files if cgroup else []))
    started: list[subprocess.Popen[bytes]] = []
    failure: list[BaseException] = []

    def walled() -> None:
        try:
            # A filter, or restrict_self, needs no_new_privs without CAP_SYS_ADMIN (root in a
            # container may lack it); nothing runsc or QEMU start needs to gain privileges.
            linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
            linux.seccomp_install(seccomp.host_program())
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
    return started[0]
