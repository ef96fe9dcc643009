"""Host side of the zygote: start it, hand it isolate configs, stop it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading

from ...errors import SandboxStartError

TYPE_CHECKING = False  # not typing's (nor json at the top): the CLI starts a zygote before its other imports
if TYPE_CHECKING:
    from typing import Any


def system_python() -> str:
    """The isolates' interpreter, the host's own (``STOCKADE_GUEST_PYTHON``, /usr/bin/python3)."""
    from ...settings import current

    return current().guest_python


ZYGOTE_CLOSE = b'{"op": "close"}'  # agent/zygote.py's CLOSE
ZYGOTE_CLOSE_WAIT_S = 10.0  # past it (a hung zygote a daemon without root cannot kill), close returns
# The directory holding the stdlib-only ``agent`` package; the zygote imports it as top-level ``agent``.
AGENT_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = (
    f"import sys; sys.path.insert(0, {AGENT_PARENT!r}); from agent import zygote; "
    "zygote.main(int(sys.argv[1]), *sys.argv[2:4])"
)


class Zygote:
    """One pre-started ``/usr/bin/python3 -I -S`` that forks isolates on request."""

    def __init__(
        self,
        python: str | None = None,
        wait: bool = True,
        sandbox_uids: tuple[int, int] | bool | None = True,
        cgroup_parents: list[str] | None = None,
        odd_uids_only: bool = False,
    ) -> None:
        python = python or system_python()
        # As root: the uids it may make isolates run as (True: the settings'), fixed now, so that a caller
        # that later drops to a user of its own cannot have it run anything as root or as another account.
        # None: no such check (a test that feeds it requests only a broken host would send).
        uids: list[str] = []
        if sandbox_uids is True and os.getuid() == 0:
            from ...settings import current

            sandbox_uids = current().sandbox_uids
        if isinstance(sandbox_uids, tuple):
            # A daemon that gives root up leases the odd places of the range (uids.py): held to them.
            uids = [f"{sandbox_uids[0]}-{sandbox_uids[1]}" + (":odd" if odd_uids_only else "")]
            if cgroup_parents:  # a daemon about to give root up: its delegated groups, the only ones
                uids.append("\n".join(cgroup_parents))
        self.python = python
        self._lock = threading.Lock()
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The zygote must be the system interpreter: after pivot_root only /usr is
            # visible, and code run in the isolate imports the stdlib from there.
            # Its environment is empty: nothing of the caller's (secrets included)
            # is ever in the memory that isolates are built from. No site (-S): it runs the
            # stdlib-only agent, and its isolates exec interpreters of their own.
            self.proc = subprocess.Popen(
                [python, "-I", "-S", "-c", _BOOT, str(child.fileno()), *uids],
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=[child.fileno()],
                close_fds=True,
            )
        except OSError as exc:
            host.close()
            raise SandboxStartError(
                f"cannot start the zygote {python} (the isolates' interpreter, STOCKADE_GUEST_PYTHON): {exc.strerror}"
            ) from None
        finally:
            child.close()
        self.ctl = host
        self._ready = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the zygote has booted (``wait=False`` lets a caller overlap that)."""
        if self._ready:
            return
        self.ctl.settimeout(15)
        try:
            if self.ctl.recv(16) != b"ready":
                raise OSError("zygote did not say ready")
        except OSError as exc:
            self.close()
            raise SandboxStartError(f"the zygote ({self.python}) failed to start: {exc}") from None
        self.ctl.settimeout(None)
        self._ready = True

    def spawn(self, config: dict[str, Any], agent_fd: int) -> None:
        payload = _encode(config)
        with self._lock:
            self.wait_ready()
            try:
                socket.send_fds(self.ctl, [payload], [agent_fd])
            except OSError as exc:
                raise SandboxStartError(f"the zygote is gone: {exc}") from None

    def prepare(self, cgroup_procs: list[str], outer_uid: int | None, outer_gid: int | None) -> None:
        """Have the zygote make its next child now: in these cgroups, as the
        sandbox uid, in fresh namespaces, its pid-namespace init waiting.

        Moving a process between cgroups waits for an RCU grace period (up to
        ~10 ms on an idle host), and unsharing seven namespaces and forking into
        the pid namespace take ~1.5 ms more; none of it depends on the policy,
        so the next start does not wait for it. The isolate itself (mounts,
        rlimits, capabilities, Landlock, seccomp, agent) is still built when
        asked for. A config whose cgroups or uid differ is built the usual way.
        """
        payload = _encode(
            {"op": "prepare", "cgroup_procs": cgroup_procs, "outer_uid": outer_uid, "outer_gid": outer_gid}
        )
        # Not waiting for "ready": the zygote reads this once it has booted, and a zygote that
        # never does is reported by the spawn that follows.
        with self._lock:
            try:
                self.ctl.sendall(payload)
            except OSError as exc:
                raise SandboxStartError(f"the zygote is gone: {exc}") from None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        # Said first: EOF alone reads as the host's death, which the zygote waits a while to be
        # sure of (and a daemon that gave root up cannot kill it instead).
        with contextlib.suppress(OSError):
            self.ctl.send(ZYGOTE_CLOSE, socket.MSG_DONTWAIT)  # a wedged zygote's full buffer: EOF says it
        try:
            self.ctl.close()
        finally:
            if self.proc.poll() is None:
                try:
                    self.proc.kill()
                except PermissionError:
                    pass  # a daemon that gave root up: its zygote (root) ends as its socket closes
            try:
                self.proc.wait(ZYGOTE_CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                pass  # only a root zygote this process may not kill: it ends with its host (PDEATHSIG)


def _encode(message: dict[str, Any]) -> bytes:
    import json  # here, once the zygote is booting (see TYPE_CHECKING above)

    return json.dumps(message).encode()
