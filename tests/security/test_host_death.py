"""A SIGKILLed host leaves nothing running, and the next start sweeps what it left on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from stockade import Policy
from stockade.runtimes.manager import RuntimeManager

HOST = r"""
import json, sys, stockade
from stockade.runtimes.manager import RuntimeManager
manager = RuntimeManager(pool_size=0)
sb = stockade.Sandbox(runtime="process", manager=manager)
inner = sb._sandbox
sb.exec(["sh", "-c", "(setsid sleep 3600.75 &); echo"])
# The zygote's spare for the next isolate (its builder and the pid-namespace init
# waiting for a config) must die with the host too.
import time
runtime = manager.get("process")
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    nxt = runtime._next_cgroup
    if nxt is not None and sum(len(open(p).read().split()) for p in nxt.procs_files[:1]) >= 2:
        break
    time.sleep(0.02)
spare = nxt.procs_files if nxt is not None else []
print(json.dumps({"procs": inner.cgroup.procs_files if inner.cgroup else [], "spare": spare,
                  "dirs": list(dict.fromkeys(inner.cgroup.dirs.values())) if inner.cgroup else []}), flush=True)
sb.exec(["sleep", "3600"])  # the host is killed while this runs
"""


def _procs(files: list[str]) -> set[int]:
    found: set[int] = set()
    for path in files:
        try:
            with open(path) as f:
                found.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
    return found


def test_sigkill_of_the_host_kills_every_isolate_and_sweep_cleans_up(process_runtime: str) -> None:
    host = subprocess.Popen([sys.executable, "-c", HOST], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        info = json.loads(host.stdout.readline())
        assert not info["procs"] or _procs(info["procs"]), "the isolate should be running"
        time.sleep(0.2)
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    deadline = time.monotonic() + 10
    while _procs(info["procs"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs(info["procs"]) == set(), "processes of the isolate outlived their host"
    if info["procs"]:
        assert info["spare"], "the zygote had no spare child ready for the next isolate"
    while _procs(info["spare"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs(info["spare"]) == set(), "the zygote's spare child outlived its host"
    # The dead host's cgroups are still on disk until a new runtime sweeps them.
    fresh = RuntimeManager(pool_size=0)
    try:
        with fresh.get("process").start(Policy()) as sandbox:
            assert sandbox.exec(["true"]).success
    finally:
        fresh.close()
    for d in info["dirs"]:
        assert not os.path.exists(d), f"stale cgroup {d} was not swept"
