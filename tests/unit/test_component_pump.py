"""What reading a component's output may cost this host (components_pump.py)."""

from __future__ import annotations

import struct
from typing import Any

from stockade.components_pump import LOG_BURST, LOG_PER_S, Job, Pump
from stockade.ratelimit import TokenBucket

MIB = 1 << 20


class Relayed:
    """An isolate as the pump sees it: eight output files of its relay's, 1 MiB of stdout each."""

    scratch_dir = "/work"

    def __init__(self) -> None:
        self.read: list[str] = []

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        self.read.append(path.rsplit("/", 1)[1])
        return b"o" + struct.pack(">I", MIB) + b"x" * MIB

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        pass


def test_a_components_log_is_read_within_its_budget_and_the_rest_waits() -> None:
    # A command writing without end kept its supervisor (root, outside the isolate's cgroup) reading
    # as fast as the relay wrote: a fifth of a host core. Past its budget, the rest stays unread (the
    # relay's window then holds the command back) until the budget has refilled; nothing is lost.
    assert (LOG_PER_S, LOG_BURST) == (4 * MIB, 64 * MIB)
    sandbox, got = Relayed(), []
    pump = Pump(sandbox)  # type: ignore[arg-type]
    budget = TokenBucket(rate=1.0, burst=2.5 * MIB)  # (it refills at a byte a second here)
    job = Job(["yes"], False, lambda stream, data: got.append(len(data)), lambda code, error: None, budget=budget)
    job.jid = "j1"
    entries: dict[str, Any] = {f"j1.o.{n}": {} for n in range(1, 9)}
    assert pump._read_output(job, entries)
    assert sandbox.read == ["j1.o.1", "j1.o.2", "j1.o.3"] and sum(got) == 3 * MIB  # then it was spent
    assert not pump._read_output(job, entries) and job.next_out == 4  # and the rest waits
    budget.tokens = 1.0  # refilled
    assert pump._read_output(job, entries) and sandbox.read[3:] == ["j1.o.4"]
    # An `exec`'s output goes to the client that ran it, unbudgeted.
    unpaced = Job(["cat"], False, lambda stream, data: None, lambda code, error: None)
    unpaced.jid = "j2"
    assert pump._read_output(unpaced, {f"j2.o.{n}": {} for n in range(1, 9)}) and unpaced.next_out == 9
