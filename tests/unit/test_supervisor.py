"""The seccomp supervisor's bookkeeping of listener fds.

A listener hangs up when every task under its filter has exited, which can be
well before the owner releases the isolate (teardown runs in the background).
The fd must stay open until the owner's ``forget``: if it were closed at the
hang-up, the next isolate's listener could get the same fd number, and the late
``forget`` would unregister and close that one instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from stockade.result import SecurityViolation
from stockade.runtimes.process.supervisor import Supervisor


def _ignore(name: str, blocked: bool, build: Callable[[], SecurityViolation]) -> None:
    return None


def _wait_unpolled(sup: Supervisor, fd: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sup._epoll.modify(fd, 0)  # raises once the supervisor has stopped polling it
        except FileNotFoundError:
            return
        except OSError:
            return
        time.sleep(0.01)
    raise AssertionError("the supervisor never noticed the hang-up")


def test_a_hung_up_listener_keeps_its_fd_until_its_owner_forgets_it() -> None:
    sup = Supervisor()
    old_r, old_w = os.pipe()
    sup.watch(old_r, _ignore)
    os.close(old_w)  # EPOLLHUP on old_r, as when the isolate's last task exits
    _wait_unpolled(sup, old_r)
    os.fstat(old_r)  # still open: nobody else can be given this fd number yet

    new_r, new_w = os.pipe()
    assert old_r not in (new_r, new_w)
    sup.watch(new_r, _ignore)
    sup.forget(old_r)  # the old isolate's late release
    assert new_r in sup._sinks
    os.fstat(new_r)
    sup.forget(new_r)
    os.close(new_w)
    assert sup._sinks == {}
