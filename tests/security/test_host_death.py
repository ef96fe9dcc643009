"""A SIGKILLed host leaves nothing running and nothing on disk: its zygote ends the
isolates and removes their cgroups; if the zygote is killed too, the next start sweeps them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

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
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    nxt = runtime.factory.spare()[0]
    if nxt is not None and sum(len(open(p).read().split()) for p in nxt.procs_files[:1]) >= 2:
        break
    time.sleep(0.02)
spare = nxt.procs_files if nxt is not None else []
print(json.dumps({"procs": inner.cgroup.procs_files if inner.cgroup else [], "spare": spare,
                  "dirs": list(dict.fromkeys(inner.cgroup.dirs.values())) if inner.cgroup else [],
                  "spare_dirs": list(dict.fromkeys(nxt.dirs.values())) if nxt is not None else [],
                  "zygote": runtime.factory.zygote().proc.pid}), flush=True)
sb.exec(["sleep", "3600"])  # the host is killed while this runs
"""


def _procs(files: list[str]) -> set[int]:
    found: set[int] = set()
    for path in files:
        try:
            with open(path) as f:
                found.update(int(x) for x in f.read().split())
        except OSError:  # removed, or being removed (ENODEV)
            continue
    return found


def _kill_host(kill_zygote_first: bool) -> dict[str, Any]:
    """Start a host with a running isolate and a spare, SIGKILL it (and its zygote
    first, if asked), check that no process of either isolate is left; what it printed."""
    host = subprocess.Popen([sys.executable, "-c", HOST], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        info: dict[str, Any] = json.loads(host.stdout.readline())
        assert not info["procs"] or _procs(info["procs"]), "the isolate should be running"
        time.sleep(0.2)
        if kill_zygote_first:
            os.kill(info["zygote"], signal.SIGKILL)
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    deadline = time.monotonic() + 30  # by PDEATHSIG, and the zygote's own
    while _procs(info["procs"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs(info["procs"]) == set(), "processes of the isolate outlived their host"
    if info["procs"]:
        assert info["spare"], "the zygote had no spare child ready for the next isolate"
    deadline = time.monotonic() + 30
    while _procs(info["spare"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs(info["spare"]) == set(), "the zygote's spare child outlived its host"
    return info


def test_sigkill_of_the_host_kills_every_isolate_and_its_zygote_removes_their_cgroups(process_runtime: str) -> None:
    info = _kill_host(kill_zygote_first=False)
    dirs = info["dirs"] + info["spare_dirs"]
    assert info["dirs"], "the isolate had no cgroup to check"
    deadline = time.monotonic() + 30  # the zygote's own bound (zygote.clean_up) is 20 s
    while [d for d in dirs if os.path.exists(d)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [d for d in dirs if os.path.exists(d)] == [], "the dead host's cgroups were left on disk"


def test_when_the_zygote_dies_with_its_host_the_next_start_sweeps(process_runtime: str) -> None:
    info = _kill_host(kill_zygote_first=True)
    assert info["dirs"], "the isolate had no cgroup to check"
    assert any(os.path.exists(d) for d in info["dirs"]), "nothing was left for the sweep to remove"
    fresh = RuntimeManager(pool_size=0)
    try:
        with fresh.get("process").start(Policy()) as sandbox:
            assert sandbox.exec(["true"]).success
    finally:
        fresh.close()
    for d in info["dirs"] + info["spare_dirs"]:
        assert not os.path.exists(d), f"stale cgroup {d} was not swept"


HOSTED = r"""
import json, subprocess, time
from stockade.runtimes.host_program import spawn_in_cgroup
from stockade.runtimes.process.cgroups import SweptCgroupManager
cgroup = SweptCgroupManager().get().create()
# A stand-in for a QEMU (or a Sentry) its guest took over: it ignores its host, and has a child.
proc = spawn_in_cgroup(["sh", "-c", "sleep 3600.5 & exec sleep 3600.25"], cgroup, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, label="stand-in")
deadline = time.monotonic() + 10
while len(open(cgroup.procs_files[0]).read().split()) < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
print(json.dumps({"procs": cgroup.procs_files, "dirs": list(dict.fromkeys(cgroup.dirs.values()))}), flush=True)
time.sleep(3600)
"""


def test_a_hosted_program_that_ignores_its_host_dies_with_it(process_runtime: str) -> None:
    # runsc and QEMU end when their agent's channel closes, which a guest that took its kernel
    # (or QEMU) over need not heed: their keeper kills them, and all of their cgroup, instead.
    host = subprocess.Popen([sys.executable, "-c", HOSTED], stdout=subprocess.PIPE, text=True)
    info: dict[str, Any] = {"procs": [], "dirs": []}
    try:
        assert host.stdout is not None
        info = json.loads(host.stdout.readline())
        assert len(_procs(info["procs"])) == 2, "the stand-in and its child should be running"
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (_procs(info["procs"]) or any(map(os.path.exists, info["dirs"]))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _procs(info["procs"]) == set(), "a hosted program outlived its host"
        assert [d for d in info["dirs"] if os.path.exists(d)] == [], "its cgroup was left on disk"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        for pid in _procs(info["procs"]):
            os.kill(pid, signal.SIGKILL)
