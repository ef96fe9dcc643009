"""A stopped daemon exits even when a thread is left blocked (daemon/main.py ``_exit_within``)."""

from __future__ import annotations

import subprocess
import sys

# A thread that never ends, as a blocked one would: without the watch, the interpreter's exit
# would join it for ever.
_STUCK = """
import threading
from stockade.daemon.main import _exit_within

def stuck_in_a_call():
    threading.Event().wait()

threading.Thread(target=stuck_in_a_call, name="stuck").start()
_exit_within(0.2)
"""


def test_a_thread_left_blocked_does_not_hold_the_exit() -> None:
    done = subprocess.run([sys.executable, "-c", _STUCK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "has not exited (threads left: ['stuck'])" in done.stderr
    assert "stuck_in_a_call" in done.stderr  # its stack, to find the defect by


def test_a_process_that_exits_by_itself_is_not_cut_short() -> None:
    code = "from stockade.daemon.main import _exit_within\n_exit_within(30)\nprint('bye')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "bye\n" and "has not exited" not in done.stderr
