"""Per-user kernel quotas are not shared between isolates (each runs as a host uid of its own).

Sandbox A exhausts a quota that the kernel counts per host uid, and holds it;
sandbox B, at the same time, must still get its own. Both quotas are small
and bounded, so a broken boundary costs nothing but this test.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

import stockade

HOLD_S = 20  # how long A holds the quota at most; B's check ends it much sooner (A is closed)

INOTIFY_HOG = f"""
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
held = []
while libc.inotify_init1(0) >= 0:
    held.append(1)
print("full", len(held), ctypes.get_errno(), flush=True)
time.sleep({HOLD_S})
"""
INOTIFY_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
print(fd >= 0, os.strerror(ctypes.get_errno()) if fd < 0 else "")
"""
# Queued real-time signals count against RLIMIT_SIGPENDING per user: sigqueue
# (not kill, which may drop) says EAGAIN once the user's queue is full.
SIGNAL_HOG = f"""
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
queued = 0
while libc.sigqueue(os.getpid(), signal.SIGRTMIN, ctypes.c_void_p(0)) == 0:
    queued += 1
print("full", queued, ctypes.get_errno(), flush=True)
time.sleep({HOLD_S})
"""
SIGNAL_PROBE = """
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
ok = libc.sigqueue(os.getpid(), signal.SIGRTMIN, ctypes.c_void_p(0)) == 0
timer = ctypes.c_void_p()
ok_timer = libc.timer_create(1, None, ctypes.byref(timer)) == 0  # CLOCK_MONOTONIC, SIGEV_SIGNAL/SIGALRM
print(ok and ok_timer, os.strerror(ctypes.get_errno()))
"""


def _while_held(hog: str, probe: Callable[[stockade.Sandbox], stockade.ExecResult]) -> stockade.ExecResult:
    """Run ``hog`` in sandbox A until it says it is full, then ``probe`` in sandbox B."""
    full = threading.Event()
    said: list[bytes] = []

    def seen(stream: str, data: bytes) -> None:
        said.append(data)
        if b"full" in b"".join(said):
            full.set()

    with stockade.Sandbox(timeout_seconds=HOLD_S + 10) as a, stockade.Sandbox() as b:
        hog_result: list[stockade.ExecResult] = []
        thread = threading.Thread(target=lambda: hog_result.append(a.run_code(hog, on_output=seen)))
        thread.start()
        try:
            assert full.wait(HOLD_S), f"the hog never filled its quota: {said}"
            assert b"full 0 " not in b"".join(said), f"the hog got nothing to hold: {said}"
            return probe(b)
        finally:
            a.close()  # ends the hog now
            thread.join(HOLD_S + 10)


@pytest.fixture(autouse=True)
def _as_root(process_runtime: str) -> None:
    if os.getuid() != 0:
        pytest.skip("per-isolate host uids need root; rootless isolates share the caller's uid (documented)")


def test_inotify_instances_of_one_sandbox_do_not_starve_another() -> None:
    result = _while_held(INOTIFY_HOG, lambda b: b.run_code(INOTIFY_PROBE))
    assert result.stdout.startswith("True"), f"B could not make an inotify instance: {result.stdout}{result.stderr}"


def test_queued_signals_of_one_sandbox_do_not_starve_another() -> None:
    result = _while_held(SIGNAL_HOG, lambda b: b.run_code(SIGNAL_PROBE))
    assert result.stdout.startswith("True"), f"B could not queue a signal or make a timer: {result.stdout}"


def test_concurrent_sandboxes_run_as_distinct_host_uids() -> None:
    with stockade.Sandbox() as a, stockade.Sandbox() as b:
        maps = [s.exec(["cat", "/proc/self/uid_map"]).stdout.split() for s in (a, b)]
    outer = [int(m[1]) for m in maps]
    assert outer[0] != outer[1], maps
    assert all(uid not in {0, 65534} for uid in outer)
