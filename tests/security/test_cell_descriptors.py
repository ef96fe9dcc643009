"""What a cell does with its own descriptors stays its own.

A cell that closes its stdout and stderr ends those pipes: the agent closes its ends, and their
numbers are then free for the next descriptors it opens (a background process's pipes, the spare
runner's). The session's interpreter kept the old numbers: each later cell read, and at the
interpreter's end closed, whatever held them now. Another object's output was lost, or the agent's
loop met a closed descriptor and ended, and the sandbox with it.
"""

from __future__ import annotations

import time

from stockade import Policy, Sandbox
from stockade.runtimes.manager import RuntimeManager

TALKER = "import time\nfor i in range(600):\n    print('said', i, flush=True)\n    time.sleep(0.05)\n"


def test_a_cell_that_closes_its_output_leaves_other_pipes_alone(process_runtime: str, manager: RuntimeManager) -> None:
    with Sandbox(Policy(runtime="process", timeout_seconds=120), manager=manager) as sb:
        assert sb.run_code("x = 1", session="s", timeout=30).exit_code == 0
        closed = sb.run_code("import os\nos.close(1)\nos.close(2)\nx = 2", session="s", timeout=30)
        assert closed.exit_code == 0, closed.summary()
        talkers = [sb.spawn(["python3", "-c", TALKER]) for _ in range(2)]  # pipes on the numbers freed
        later = sb.run_code("x * 21", session="s", timeout=30)  # its state kept; its value comes as a result
        assert later.exit_code == 0 and later.stdout == "", later.summary()  # it has no stdout left
        assert [r.text for r in later.results] == ["42"], later.results
        sb._sandbox.close_interpreter("s")
        for _ in range(3):  # from the spare runner, forked after an answer: its pipes may hold the numbers
            ran = sb.run_code("print('after')", timeout=30)
            assert ran.stdout == "after\n", ran.summary()
        for talker in talkers:
            said = b""
            deadline = time.monotonic() + 30
            while b"said 3" not in said and time.monotonic() < deadline:
                said += talker.read()[0]
                time.sleep(0.05)
            assert b"said 0\nsaid 1\nsaid 2\nsaid 3" in said, said  # every line, from the start
        assert sb.exec(["echo", "alive"], timeout=30).stdout == "alive\n"
        fresh = sb.run_code("print('fresh')", session="s", timeout=30)
        assert fresh.stdout == "fresh\n" and fresh.execution_count == 1, fresh.summary()  # a new interpreter
