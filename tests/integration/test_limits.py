"""Every cgroup-backed limit of the Policy, on this host's own cgroups, for real.

memory_mb, pids_limit and cpu_limit at their minimum, default and maximum, on
an isolate from the warm pool (built with the default policy's limits, so the
hand-over raises some and lowers others) and on one built on demand (a fresh
group, or the zygote's spare, whose group already holds the default limits).
Whatever layout the host has (v1, hybrid, v2), the test reads it back from the
isolate's own group. A limit the host refuses is a ``SandboxStartError``
naming it, and leaves no group and no process behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import time
from collections.abc import Iterator

import pytest

import stockade
from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.errors import SandboxStartError
from stockade.policy import MIN_CPU, Policy
from stockade.protocol.models import ExecuteRequest, unix_caller
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.process import cgroup_layout, cgroups
from stockade.runtimes.process.runtime import ProcessRuntime, ProcessSandbox
from tests.conftest import require
from tests.helpers import cgroup_limit_cases

DEFAULT = Policy()
CASES = cgroup_limit_cases()


@pytest.fixture
def pooled(process_runtime: str) -> Iterator[ProcessRuntime]:
    runtime = ProcessRuntime(pool_size=2)  # the default pool size
    runtime.warm_up()
    yield runtime
    runtime.close()


@pytest.fixture
def on_demand(process_runtime: str) -> Iterator[ProcessRuntime]:
    runtime = ProcessRuntime(pool_size=0)
    yield runtime
    runtime.close()


def _require_cgroup_limits() -> None:
    layout = cgroup_layout.detect_layout()
    if layout.limits != {"memory", "pids", "cpu"}:
        pytest.skip(f"this host gives stockade no cgroup limits ({layout.version}): {layout.problems}")


def _read(group: str, name: str) -> str:
    with open(os.path.join(group, name)) as f:
        return f.read().strip()


def _seen(group: cgroups.IsolateCgroup) -> tuple[int, int, int]:
    """memory (bytes), pids and cpu quota (us per 100 ms), as the host holds them."""
    if group.layout.v2_limits:
        v2 = group.dirs["v2"]
        quota, period = _read(v2, "cpu.max").split()
        assert period == "100000"
        if os.path.exists(os.path.join(v2, "memory.swap.max")):
            assert _read(v2, "memory.swap.max") == "0"
        return int(_read(v2, "memory.max")), int(_read(v2, "pids.max")), int(quota)
    memory = group.dirs["memory"]
    limit = int(_read(memory, "memory.limit_in_bytes"))
    if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
        assert int(_read(memory, "memory.memsw.limit_in_bytes")) == limit  # no swap
    assert _read(group.dirs["cpu"], "cpu.cfs_period_us") == "100000"
    return limit, int(_read(group.dirs["pids"], "pids.max")), int(_read(group.dirs["cpu"], "cpu.cfs_quota_us"))


def _expected(policy: Policy) -> tuple[int, int, int]:
    return policy.memory_mb << 20, policy.pids_limit, max(1000, int(policy.cpu_limit * 100_000))


def _check_runs(sandbox: ProcessSandbox, policy: Policy) -> None:
    assert sandbox.unenforced_limits == []
    assert sandbox.cgroup is not None
    assert _seen(sandbox.cgroup) == _expected(policy)
    result = sandbox.exec(["/usr/bin/true"])
    assert (result.termination_reason, result.exit_code) == ("completed", 0)


@pytest.mark.parametrize(("name", "value"), CASES)
def test_a_pooled_isolate_takes_the_limit_at_hand_over(pooled: ProcessRuntime, name: str, value: float) -> None:
    _require_cgroup_limits()
    policy = DEFAULT.replace(**{name: value})
    assert pooled.wait_ready(30)
    sandbox = pooled.take_warm(policy)
    assert sandbox is not None
    try:
        _check_runs(sandbox, policy)
    finally:
        pooled.dispose(sandbox)


@pytest.mark.parametrize(("name", "value"), CASES)
def test_an_isolate_built_on_demand_takes_the_limit(on_demand: ProcessRuntime, name: str, value: float) -> None:
    _require_cgroup_limits()
    policy = DEFAULT.replace(**{name: value})
    # The first isolate gets a fresh group; the second the spare's, written ahead with the default limits.
    for _ in range(2):
        sandbox = on_demand.start(policy)
        try:
            _check_runs(sandbox, policy)
        finally:
            on_demand.dispose(sandbox)
        on_demand.wait_idle()


def _quota_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every CPU quota written from now on: (the group's directory, us per 100 ms)."""
    written: list[tuple[str, int]] = []
    real_write = cgroups._write

    def write(path: str, value: str) -> None:
        real_write(path, value)
        name = os.path.basename(path)
        if name in ("cpu.max", "cpu.cfs_quota_us"):
            written.append((os.path.dirname(path), int(value.split(maxsplit=1)[0])))

    monkeypatch.setattr(cgroups, "_write", write)
    return written


@pytest.mark.parametrize("runtime_name", ["process", "gvisor", "microvm"])
def test_setup_gets_a_core_and_the_caller_its_cpu_limit(monkeypatch: pytest.MonkeyPatch, runtime_name: str) -> None:
    # The runtime's own setup (namespaces, runsc's boot, QEMU's) under a caller's cpu_limit
    # of 0.01 took ~45 s on gVisor and missed the process runtime's 10 s handshake. (Nothing
    # is run at that limit here: an emulated guest at 1% of a core is slow by design.)
    _require_cgroup_limits()
    require(runtime_name)
    written = _quota_writes(monkeypatch)
    manager = RuntimeManager(pool_size=0)
    try:
        runtime = manager.get(runtime_name)
        sandbox = runtime.start(DEFAULT.replace(cpu_limit=MIN_CPU, runtime=runtime_name))
        try:
            assert sandbox.cgroup is not None
            groups = set(sandbox.cgroup.dirs.values())
            assert "cpu_limit" not in " ".join(sandbox.unenforced_limits)
        finally:
            runtime.dispose(sandbox)
    finally:
        manager.close()
    quotas = [quota for where, quota in written if where in groups]
    assert quotas, "no CPU quota was written for the isolate's group"
    assert quotas[0] == int(cgroups.SETUP_CPU * 100_000)
    assert quotas[-1] == max(1000, int(MIN_CPU * 100_000))  # before start() returned: before any command


@pytest.mark.parametrize("pool_size", [2, 0], ids=["pooled", "on_demand"])
@pytest.mark.parametrize(("name", "value"), CASES)
def test_one_shot_runs_at_the_limit(process_runtime: str, pool_size: int, name: str, value: float) -> None:
    # The issue's own call: stockade.run(["/usr/bin/true"], memory_mb=1024) failed with
    # a bare OSError on most pooled isolates, whose groups held the default limits.
    _require_cgroup_limits()
    manager = RuntimeManager(pool_size=pool_size)
    try:
        if pool_size:
            stockade.warm_up(manager=manager)
            assert manager.get("process").wait_ready(30)  # type: ignore[attr-defined]
        # The limit taken is what is checked, not how fast a run is under it: at 1% of a core, in the
        # emulated guest of the pure cgroup v2 run on a loaded host, `true` once took past 30 s.
        policy = DEFAULT.replace(**{name: value}, timeout_seconds=55)  # (two within pytest's 120 s)
        for _ in range(2):
            result = stockade.run(["/usr/bin/true"], policy, manager=manager)
            assert (result.termination_reason, result.exit_code, result.unenforced_limits) == ("completed", 0, [])
    finally:
        manager.close()


REFUSED = 77  # the pids_limit the stand-in kernel below refuses


@pytest.fixture
def refusing_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's cgroupfs, except that it refuses pids.max = 77, as a kernel refuses a
    limit (a parent's tighter quota, memory it cannot reclaim): every other write is real."""
    real_write = cgroups._write

    def write(path: str, value: str) -> None:
        if os.path.basename(path) == "pids.max" and value == str(REFUSED):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", write)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _record_groups(monkeypatch: pytest.MonkeyPatch, runtime: ProcessRuntime) -> list[cgroups.IsolateCgroup]:
    """Every group the runtime makes from now on (the runtime's own manager only: another
    runtime of this session may be making groups meanwhile)."""
    made: list[cgroups.IsolateCgroup] = []
    manager = runtime.factory.cgroups.get()
    real_create = cgroups.CgroupManager.create

    def create(self: cgroups.CgroupManager) -> cgroups.IsolateCgroup:
        group = real_create(self)
        if self is manager:
            made.append(group)
        return group

    monkeypatch.setattr(cgroups.CgroupManager, "create", create)
    return made


@pytest.mark.usefixtures("refusing_kernel")
def test_a_limit_refused_at_hand_over_leaves_nothing(process_runtime: str) -> None:
    _require_cgroup_limits()
    manager = RuntimeManager(pool_size=2)
    try:
        runtime = manager.get("process")
        assert isinstance(runtime, ProcessRuntime) and runtime._pool is not None
        stockade.warm_up(manager=manager)
        assert runtime.wait_ready(30)
        victim = runtime._pool.ready()[-1]  # the one the next take hands over
        assert victim.cgroup is not None
        groups, pids = list(victim.cgroup.dirs.values()), victim.cgroup.pids()
        assert groups and pids
        # Held by pidfd, not by number: a number freed by the isolate's end may be a later process's.
        held = {pid: os.pidfd_open(pid) for pid in pids if _running(pid)}
        try:
            with pytest.raises(SandboxStartError, match=f"pids_limit={REFUSED}.*pids.max"):
                stockade.run(["/usr/bin/true"], manager=manager, pids_limit=REFUSED)
            assert [g for g in groups if os.path.exists(g)] == []
            deadline, left = time.monotonic() + 10, dict(held)
            while left and time.monotonic() < deadline:  # a pidfd is readable once its process has ended
                ended, _, _ = select.select(list(left.values()), [], [], max(0.0, deadline - time.monotonic()))
                left = {pid: fd for pid, fd in left.items() if fd not in ended}
            assert sorted(left) == []
        finally:
            for fd in held.values():
                os.close(fd)
        assert victim not in runtime._pool.ready()
    finally:
        manager.close()


@pytest.mark.usefixtures("refusing_kernel")
def test_a_limit_refused_on_demand_leaves_nothing(on_demand: ProcessRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_cgroup_limits()
    made = _record_groups(monkeypatch, on_demand)
    with pytest.raises(SandboxStartError, match=f"pids_limit={REFUSED}.*pids.max"):
        on_demand.start(Policy(pids_limit=REFUSED))  # in a fresh group
    assert len(made) == 1 and not any(os.path.exists(d) for d in made[0].dirs.values())
    # Once an isolate has been served, the next is built in the group of the zygote's
    # spare, written ahead with the default limits, the spare process waiting in it.
    served = on_demand.start(DEFAULT)
    on_demand.dispose(served)
    on_demand.wait_idle()
    spare = made[-1]
    assert all(os.path.exists(d) for d in spare.dirs.values())
    spare_pids = spare.pids()
    with pytest.raises(SandboxStartError, match=f"pids_limit={REFUSED}.*pids.max"):
        on_demand.start(Policy(pids_limit=REFUSED))
    assert made[-1] is spare  # no other group was made for it
    assert [d for group in made for d in group.dirs.values() if os.path.exists(d)] == []
    assert [p for p in spare_pids if _running(p)] == []


@pytest.mark.usefixtures("refusing_kernel")
def test_a_limit_refused_at_hand_over_gives_the_daemon_its_slot_back(process_runtime: str) -> None:
    # The daemon's fast path takes a slot, then the warm isolate: a refused
    # hand-over is answered with the error, and the slot is free again.
    _require_cgroup_limits()

    async def scenario() -> None:
        controller = Controller(DaemonConfig(max_sandboxes=1, pool_size=2))
        try:
            runtime = controller.manager.get("process")
            runtime.warm_up()  # type: ignore[attr-defined]
            assert await asyncio.to_thread(runtime.wait_ready, 30)  # type: ignore[attr-defined]
            job = ExecuteRequest.model_validate({"command": ["/usr/bin/true"], "policy": {"pids_limit": REFUSED}})
            answers: list[object] = []
            with pytest.raises(SandboxStartError, match=f"pids_limit={REFUSED}"):
                controller.execute_now(job, unix_caller(os.getuid()), answers.append)
            assert controller.slots.free == 1 and controller.slots.held == {}
            assert answers == []
        finally:
            await controller.shutdown(5)

    asyncio.run(scenario())
