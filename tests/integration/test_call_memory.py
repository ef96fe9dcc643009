"""An ended agent call holds nothing once its caller has its answer.

A call and its bound reader were a reference cycle, freed only when Python's
collector next swept its oldest generation: a component's supervisor listing
an exchange directory of 30,000 names twenty times held 330 MB of replies
(the isolate's to choose) outside any cgroup.
"""

from __future__ import annotations

import gc

from stockade import Sandbox
from stockade.runtimes.loop_call import LoopCall
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require


def test_ended_calls_leave_no_cycle_behind(manager: RuntimeManager) -> None:
    require("process")
    with Sandbox(runtime="process", manager=manager) as sb:
        sb.write_file("/tmp/f", b"x" * (1 << 20))
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept, to be looked at
        try:
            for _ in range(3):  # each kind of call: a run, a cell, file reads, writes and listings
                sb.exec(["echo", "hi"])
                sb.run_code("print(1)")
                sb.read_file("/tmp/f")
                sb.write_file("/tmp/g", b"y" * 1000)
                sb.list_dir("/tmp")
            gc.collect()
            calls = [o for o in gc.garbage if isinstance(o, LoopCall)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert calls == [], f"{len(calls)} ended calls were only freed by the collector"
