"""A host started in the background (``cmd &``, ``nohup``) ignores SIGINT and SIGQUIT, and an
ignored signal stays ignored across fork and exec. The code in an isolate must still get the
signals a fresh process has, on every runtime: else an interpreter's interrupt, a cell's timeout
and the code's own ``kill -INT`` reach nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conformance.test_run_code_like_python import RUNTIMES
from tests.conftest import require

HOST = r"""
import json, sys, threading, time
import stockade
from stockade import Policy

with stockade.Sandbox(Policy(runtime=sys.argv[1], timeout_seconds=60)) as sb:
    handler = sb.run_code("import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    probe = (
        "import signal as s; print(s.getsignal(s.SIGINT) is s.default_int_handler, s.getsignal(s.SIGQUIT) == s.SIG_DFL)"
    )
    command = sb.exec(["python3", "-c", probe]).stdout
    with sb.interpreter() as py:
        py.run("x = 41")
        # Interrupted once the cell runs (sent before, it would reach nothing); short sleeps, as Python
        # heeds a SIGINT that lands just before a sleep begins only once that sleep ends.
        sleeping = threading.Event()
        threading.Thread(target=lambda: sleeping.wait(30) and py.interrupt()).start()
        began = time.monotonic()
        cell = py.run(
            "import time\nprint('sleeping', flush=True)\nfor _ in range(600):\n    time.sleep(0.05)",
            on_output=lambda s, d: sleeping.set(),
        )
        took = time.monotonic() - began
        after = py.run("x + 1")
print(json.dumps({
    "handler": handler.stdout.strip(), "command": command.strip(),
    "cell": cell.exception.name if cell.exception else None, "took": took,
    "after": after.results[0].text if after.results else after.stderr,
}))
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_code_gets_fresh_signals_from_a_host_that_ignores_them(runtime: str) -> None:
    require(runtime)
    # What a shell does to a background job: SIGINT and SIGQUIT ignored, then the host started.
    host = subprocess.run(
        ["sh", "-c", 'trap "" INT QUIT; exec "$0" -c "$1" "$2"', sys.executable, HOST, runtime],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert host.returncode == 0, host.stderr[-2000:]
    seen = json.loads(host.stdout.splitlines()[-1])
    assert seen["handler"] == "True"  # Python's KeyboardInterrupt handler, as a fresh interpreter has
    assert seen["command"] == "True True", seen  # a command's, as a fresh process has them
    assert seen["cell"] == "KeyboardInterrupt" and seen["took"] < 20, seen  # the interrupt reached the cell
    assert seen["after"] == "42", seen  # and the interpreter's state was kept
