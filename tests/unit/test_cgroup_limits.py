"""Writing a policy's limits to an isolate's cgroup, on v1, hybrid and v2 layouts.

The groups are directory trees shaped like cgroupfs, with the kernel's rules
that matter here played by ``FakeKernel``: a group's files exist from the
start (writing makes none), and v1 refuses any write that would leave
``memory.limit_in_bytes`` above ``memory.memsw.limit_in_bytes``. Every limit is
written at its minimum, default and maximum, to a fresh group (unlimited) and
to one that already holds the default policy's limits (a pooled isolate, the
zygote's spare). The real v1/hybrid host path is tested in
``tests/integration/test_limits.py``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from stockade.errors import SandboxStartError, StockadeError
from stockade.policy import MAX_MEMORY_MB, Policy
from stockade.runtimes.process import cgroup_layout, cgroups
from tests.helpers import cgroup_limit_cases

UNLIMITED_V1 = "9223372036854771712"
DEFAULT = Policy()
CASES = cgroup_limit_cases()


class FakeKernel:
    """``cgroups._write`` with cgroupfs's answers: EACCES for a file the group does not
    have, EINVAL for a v1 memory limit above memory+swap, and whatever ``refuse`` says."""

    def __init__(self) -> None:
        self.refuse: dict[str, int] = {}  # file name -> errno
        self.writes: list[tuple[str, str]] = []

    def write(self, path: str, value: str) -> None:
        name = os.path.basename(path)
        if not os.path.exists(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        if name in self.refuse:
            code = self.refuse[name]
            raise OSError(code, os.strerror(code), path)
        group = os.path.dirname(path)
        if name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            memsw_file = os.path.join(group, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw_file):
                memory = int(value if name == "memory.limit_in_bytes" else _read(group, "memory.limit_in_bytes"))
                memsw = int(value if name != "memory.limit_in_bytes" else _read(group, "memory.memsw.limit_in_bytes"))
                if memory > memsw:
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        with open(path, "w") as f:
            f.write(value)
        self.writes.append((name, value))


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(cgroups, "_write", fake.write)
    return fake


def _read(group: str | Path, name: str) -> str:
    return Path(group, name).read_text().strip()


def _populate(group: str, files: dict[str, str]) -> None:
    for name, value in files.items():
        Path(group, name).write_text(value + "\n")


def _v1_group(tmp_path: Path, swap_accounting: bool = True, hybrid: bool = False) -> cgroups.IsolateCgroup:
    parents = {c: str(tmp_path / c) for c in cgroup_layout.V1_CONTROLLERS}
    for parent in parents.values():
        os.mkdir(parent)
    v2 = None
    if hybrid:
        v2 = str(tmp_path / "unified")
        os.mkdir(v2)
    layout = cgroup_layout.CgroupLayout("hybrid" if hybrid else "v1", v1_parents=parents, v2_parent=v2)
    group = cgroups.IsolateCgroup(layout, "stockade-1-1")
    memory = {"memory.limit_in_bytes": UNLIMITED_V1}
    if swap_accounting:
        memory["memory.memsw.limit_in_bytes"] = UNLIMITED_V1
    _populate(group.dirs["memory"], memory)
    _populate(group.dirs["pids"], {"pids.max": "max"})
    _populate(group.dirs["cpu"], {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"})
    return group


def _v2_group(tmp_path: Path, swap_controller: bool = True) -> cgroups.IsolateCgroup:
    layout = cgroup_layout.CgroupLayout("v2", v2_parent=str(tmp_path), v2_limits=True)
    group = cgroups.IsolateCgroup(layout, "stockade-1-1")
    files = {"memory.max": "max", "pids.max": "max", "cpu.max": "max 100000"}
    if swap_controller:
        files["memory.swap.max"] = "max"
    _populate(group.dirs["v2"], files)
    return group


def _apply(group: cgroups.IsolateCgroup, policy: Policy) -> list[str]:
    return group.apply_limits(policy.memory_mb, policy.pids_limit, policy.cpu_limit)


def _v1_seen(group: cgroups.IsolateCgroup) -> tuple[int, int, int, int]:
    """memory, memory+swap, pids and cpu quota, as the group holds them."""
    memory = group.dirs["memory"]
    return (
        int(_read(memory, "memory.limit_in_bytes")),
        int(_read(memory, "memory.memsw.limit_in_bytes")),
        int(_read(group.dirs["pids"], "pids.max")),
        int(_read(group.dirs["cpu"], "cpu.cfs_quota_us")),
    )


def _expected(policy: Policy) -> tuple[int, int, int, int]:
    mem = policy.memory_mb << 20
    return mem, mem, policy.pids_limit, max(1000, int(policy.cpu_limit * 100_000))


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
@pytest.mark.parametrize("hybrid", [False, True], ids=["v1", "hybrid"])
@pytest.mark.parametrize(("name", "value"), CASES)
def test_v1_limit_at_min_default_and_max(
    kernel: FakeKernel, tmp_path: Path, name: str, value: float, pooled: bool, hybrid: bool
) -> None:
    group = _v1_group(tmp_path, hybrid=hybrid)
    if pooled:
        assert _apply(group, DEFAULT) == []
    policy = DEFAULT.replace(**{name: value})
    assert _apply(group, policy) == []
    assert _v1_seen(group) == _expected(policy)
    if hybrid:
        assert os.listdir(tmp_path / "unified") == []  # the v2 tree is only for cgroup.kill


def test_v1_memory_goes_up_and_down_in_an_order_the_kernel_takes(kernel: FakeKernel, tmp_path: Path) -> None:
    group = _v1_group(tmp_path)
    for memory_mb in (16, MAX_MEMORY_MB, 16, DEFAULT.memory_mb, MAX_MEMORY_MB, DEFAULT.memory_mb):
        kernel.writes.clear()
        assert _apply(group, DEFAULT.replace(memory_mb=memory_mb)) == []
        assert _v1_seen(group)[:2] == (memory_mb << 20, memory_mb << 20)
    # The last step lowered: memory first, then memory+swap.
    memory_writes = [name for name, _ in kernel.writes if name.startswith("memory.")]
    assert memory_writes == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_v1_without_swap_accounting_writes_the_memory_limit_alone(kernel: FakeKernel, tmp_path: Path) -> None:
    group = _v1_group(tmp_path, swap_accounting=False)
    for memory_mb in (DEFAULT.memory_mb, MAX_MEMORY_MB, 16):
        assert _apply(group, DEFAULT.replace(memory_mb=memory_mb)) == []
        assert int(_read(group.dirs["memory"], "memory.limit_in_bytes")) == memory_mb << 20
    assert not os.path.exists(os.path.join(group.dirs["memory"], "memory.memsw.limit_in_bytes"))


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
@pytest.mark.parametrize(("name", "value"), CASES)
def test_v2_limit_at_min_default_and_max(
    kernel: FakeKernel, tmp_path: Path, name: str, value: float, pooled: bool
) -> None:
    group = _v2_group(tmp_path)
    if pooled:
        assert _apply(group, DEFAULT) == []
    policy = DEFAULT.replace(**{name: value})
    assert _apply(group, policy) == []
    mem, _, pids, quota = _expected(policy)
    v2 = group.dirs["v2"]
    assert (_read(v2, "memory.max"), _read(v2, "memory.swap.max")) == (str(mem), "0")
    assert (_read(v2, "pids.max"), _read(v2, "cpu.max")) == (str(pids), f"{quota} 100000")


def test_v2_without_the_swap_controller_skips_swap(kernel: FakeKernel, tmp_path: Path) -> None:
    group = _v2_group(tmp_path, swap_controller=False)
    assert _apply(group, DEFAULT.replace(memory_mb=MAX_MEMORY_MB)) == []
    assert _read(group.dirs["v2"], "memory.max") == str(MAX_MEMORY_MB << 20)
    assert not os.path.exists(os.path.join(group.dirs["v2"], "memory.swap.max"))


@pytest.mark.parametrize(
    ("layout", "refused", "name", "value"),
    [
        ("v1", "memory.memsw.limit_in_bytes", "memory_mb", 1024),
        ("v1", "memory.limit_in_bytes", "memory_mb", 16),
        ("v1", "pids.max", "pids_limit", 64),
        ("v1", "cpu.cfs_quota_us", "cpu_limit", 1.5),
        ("v2", "memory.max", "memory_mb", 1024),
        ("v2", "memory.swap.max", "memory_mb", 1024),
        ("v2", "pids.max", "pids_limit", 64),
        ("v2", "cpu.max", "cpu_limit", 1.5),
    ],
)
def test_a_refused_limit_is_a_start_error_naming_it(
    kernel: FakeKernel, tmp_path: Path, layout: str, refused: str, name: str, value: float
) -> None:
    group = _v1_group(tmp_path) if layout == "v1" else _v2_group(tmp_path)
    assert _apply(group, DEFAULT) == []
    kernel.refuse[refused] = errno.EBUSY if name == "memory_mb" else errno.EINVAL
    with pytest.raises(SandboxStartError) as caught:
        _apply(group, DEFAULT.replace(**{name: value}))
    assert isinstance(caught.value, StockadeError)
    message = str(caught.value)
    assert f"{name}={value}" in message and refused in message
    # Half-written limits are not taken for applied ones: the same policy is written again.
    kernel.refuse.clear()
    kernel.writes.clear()
    assert _apply(group, DEFAULT.replace(**{name: value})) == []
    assert refused in [written for written, _ in kernel.writes]


def test_a_group_that_cannot_be_made_leaves_none_of_its_siblings(tmp_path: Path) -> None:
    parents = {"memory": str(tmp_path / "memory"), "pids": str(tmp_path / "pids")}
    os.mkdir(parents["memory"])  # the pids parent is missing: its group cannot be made
    layout = cgroup_layout.CgroupLayout("v1", v1_parents=parents)
    with pytest.raises(FileNotFoundError):
        cgroups.IsolateCgroup(layout, "stockade-1-1")
    assert os.listdir(parents["memory"]) == []


def test_a_group_left_by_a_remove_is_waited_for_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``retry_leftovers(wait_s)``: what a closing factory does with a group whose last processes
    were still dying when its isolate closed. A directory that is not empty yet stands in for it."""
    import threading
    import time

    group = tmp_path / "stockade-1-1"
    group.mkdir()
    (group / "dying").write_text("")
    monkeypatch.setattr(cgroups, "_LEFTOVERS", {str(group)})
    assert cgroups.retry_leftovers() == 1  # no wait: tried once, still there
    threading.Timer(0.2, (group / "dying").unlink).start()
    started = time.monotonic()
    assert cgroups.retry_leftovers(wait_s=30) == 0
    assert not group.exists() and time.monotonic() - started < 20
    assert cgroups.retry_leftovers(wait_s=30) == 0  # nothing left: returns at once


@pytest.mark.parametrize("offered", [True, False])
def test_a_v1_memory_controller_without_socket_buffer_charging_is_a_layout_problem(
    offered: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = tmp_path / "memory" / "stockade"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(UNLIMITED_V1)
    if offered:
        (group / "memory.kmem.tcp.limit_in_bytes").write_text(UNLIMITED_V1)
    monkeypatch.setattr(cgroup_layout, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(cgroup_layout, "_own_cgroups", lambda: {"memory": "/stockade"})
    monkeypatch.setattr(cgroup_layout, "_cgroup2_mount", lambda: None)
    monkeypatch.setattr(cgroup_layout, "cgroup_parent_setting", lambda: None)
    layout = cgroup_layout.detect_layout()
    assert layout.v1_parents == {"memory": str(group)}
    said = [p for p in layout.problems if "memory.kmem.tcp.limit_in_bytes" in p]
    if offered:
        assert said == []
    else:
        assert len(said) == 1 and "tcp_mem" in said[0]
