"""The zygote's spare children: not forked again and again when they keep dying before use."""

from __future__ import annotations

import os
import select
import socket
import tempfile
import time

import pytest

from stockade.agent.zygote import DEAD_SPARES_TO_STOP
from stockade.runtimes.process.zygote import Zygote


def _next_pid(fifo: int, timeout: float) -> int | None:
    """The pid the next child of the zygote writes to its "cgroup.procs", or None."""
    ready, _, _ = select.select([fifo], [], [], timeout)
    return int(os.read(fifo, 64)) if ready else None


def test_spares_that_keep_dying_are_no_longer_forked(process_runtime: str) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: the spare must fail at its uid change, which only root attempts")
    # Every child of the zygote first writes its pid to "cgroup.procs" (here a FIFO
    # this test reads), then fails to take the uid -5: the spare dies before use,
    # and the build asked for instead reports the error.
    where = tempfile.mkdtemp(prefix="stockade-zygote-test-")
    path = os.path.join(where, "cgroup.procs")
    os.mkfifo(path)
    fifo = os.open(path, os.O_RDWR)  # never EOF, writers never block
    zygote = Zygote()
    try:
        config = {"cgroup_procs": [path], "outer_uid": -5, "outer_gid": -5}
        for _ in range(DEAD_SPARES_TO_STOP):
            zygote.prepare([path], -5, -5)
            assert _next_pid(fifo, 10) is not None  # a spare was forked (and dies)
            time.sleep(0.1)
            host, guest = socket.socketpair()
            zygote.spawn(config, guest.fileno())
            guest.close()
            host.settimeout(10)
            assert host.recv(1) == b"E"  # the build asked for ran, and said why it failed
            host.close()
            assert _next_pid(fifo, 10) is not None
        zygote.prepare([path], -5, -5)
        assert _next_pid(fifo, 0.5) is None, "the zygote forked yet another spare"
    finally:
        zygote.close()
        os.close(fifo)
        os.unlink(path)
        os.rmdir(where)
