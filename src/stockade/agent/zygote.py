"""The process runtime's zygote: an interpreter that has paid start-up once.

The host starts it as ``/usr/bin/python3 -I`` with a SOCK_SEQPACKET control
socket whose fd number is its argument. Each message is an isolate config (JSON) with one descriptor
attached: the isolate's end of its agent socket. The zygote forks; the child
builds the isolate (``confine.start_isolate``) and becomes its agent without an
exec, so an isolate costs a fork and the confinement syscalls, never an
interpreter start.

The zygote is single-threaded (fork-safe), a child subreaper (it reaps every
isolate init), and dies with its host (PDEATHSIG and EOF on the control socket).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys

from . import confine, linux

CONFIG_MAX = 1 << 20


def main(ctl_fd: int) -> None:
    ctl = socket.socket(fileno=ctl_fd)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() == 1:
        os._exit(0)  # the host died before PDEATHSIG was armed
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # Everything imported so far is shared with every isolate: keep the
    # collector from touching (and so copying) those pages after fork.
    gc.freeze()
    ctl.sendall(b"ready")
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap()
        if ctl.fileno() in ready:
            try:
                raw, fds, _flags, _addr = socket.recv_fds(ctl, CONFIG_MAX, 1)
            except OSError:
                raw, fds = b"", []
            if not raw:
                return
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            _spawn(ctl, raw, fds[0], (wake_r, wake_w))


def _spawn(ctl: socket.socket, raw: bytes, agent_fd: int, wake_fds: tuple[int, int]) -> None:
    pid = os.fork()
    if pid == 0:
        conn = socket.socket(fileno=agent_fd)
        try:
            ctl.close()
            for fd in wake_fds:
                os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)
            config = confine.decode_config(raw)
        except BaseException as exc:  # noqa: BLE001
            confine._report_failure(conn, "config", exc)
            os._exit(1)
        confine.start_isolate(config, conn)
    os.close(agent_fd)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
