"""The cgroup v2 code path, on a directory tree shaped like cgroupfs.

This host is hybrid (v1 controllers), so the v2 controllers cannot run in
its own process; these tests pin down the v2 file names and formats stockade
writes and parses (memory.max, memory.swap.max, pids.max, cpu.max,
memory.events, cpu.stat, memory.peak, cgroup.kill, cgroup.subtree_control).
The real v1/hybrid path is exercised by every security test, and the real v2
path by tests/integration/test_pure_cgroup_v2.py, in a guest kernel booted
with cgroup v2 alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.errors import ConfigError
from stockade.runtimes.process import cgroup_layout, cgroups


def _read(path: Path) -> str:
    return path.read_text().strip()


def test_v2_limits_usage_and_kill(tmp_path: Path) -> None:
    layout = cgroup_layout.CgroupLayout("v2", v2_parent=str(tmp_path), v2_limits=True)
    group = cgroups.IsolateCgroup(layout, "stockade-1-1")
    d = tmp_path / "stockade-1-1"
    assert group.procs_files == [str(d / "cgroup.procs")]
    assert group.apply_limits(256, 64, 0.5) == []
    assert _read(d / "memory.max") == str(256 << 20)
    assert _read(d / "memory.swap.max") == "0"
    assert _read(d / "pids.max") == "64"
    assert _read(d / "cpu.max") == "50000 100000"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n")
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "memory.peak").write_text(str(3 << 20) + "\n")
    usage = group.usage()
    assert (usage.oom_kills, usage.cpu_seconds, usage.memory_peak_mb) == (2, 1.5, 3.0)
    group.kill()
    assert _read(d / "cgroup.kill") == "1"
    group.close_files()


def test_setup_runs_on_at_least_a_core_and_the_callers_cpu_limit_follows(tmp_path: Path) -> None:
    # A caller's cpu_limit of 0.01 written before setup made a gVisor start take ~45 s and a
    # process start miss its 10 s handshake on a loaded machine: setup is the runtime's own work.
    layout = cgroup_layout.CgroupLayout("v2", v2_parent=str(tmp_path), v2_limits=True)
    group = cgroups.IsolateCgroup(layout, "stockade-1-2")
    d = tmp_path / "stockade-1-2"
    group.apply_limits(256, 64, 0.01, setup=True)
    assert _read(d / "cpu.max") == f"{int(cgroups.SETUP_CPU * 100_000)} 100000"
    assert _read(d / "memory.max") == str(256 << 20)  # memory and pids are the caller's from the start
    group.apply_limits(256, 64, 0.01)
    assert _read(d / "cpu.max") == "1000 100000"
    group.apply_limits(256, 64, 1.5, setup=True)  # more than the floor: the caller's
    assert _read(d / "cpu.max") == "150000 100000"
    group.close_files()


def test_the_baseline_read_opens_the_peak_counter_for_the_run(tmp_path: Path) -> None:
    """The pool's baseline read (``peak=False``) opens every counter the run's read
    needs: the run reads through the open file and opens none (here: the file's
    name is gone by then, and its counter is still read)."""
    layout = cgroup_layout.CgroupLayout("v2", v2_parent=str(tmp_path), v2_limits=True)
    group = cgroups.IsolateCgroup(layout, "stockade-1-2")
    d = tmp_path / "stockade-1-2"
    group.apply_limits(256, 64, 0.5)
    (d / "memory.events").write_text("oom_kill 0\n")
    (d / "cpu.stat").write_text("usage_usec 1000\n")
    (d / "memory.peak").write_text(str(5 << 20) + "\n")
    assert group.usage(peak=False).memory_peak_mb is None
    # The baseline reset the counter to the usage now (Linux 6.12: any write, for this descriptor).
    assert (d / "memory.peak").read_text().startswith("0\n")
    (d / "memory.peak").write_text(str(5 << 20) + "\n")  # the run's own peak, as the kernel keeps it
    (d / "memory.peak").rename(d / "memory.peak.gone")
    assert group.usage().memory_peak_mb == 5.0
    group.close_files()


def test_v2_parent_prefers_own_group_when_it_can_delegate(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    own = tmp_path / "service"
    own.mkdir()
    (own / "cgroup.subtree_control").write_text("")
    problems: list[str] = []
    parent, limits = cgroup_layout._v2_parent(str(tmp_path), "/service", None, problems)
    assert (parent, limits, problems) == (str(own), True, [])
    assert set(_read(own / "cgroup.subtree_control").split()) == {"+cpu", "+memory", "+pids"}


def test_hybrid_v2_is_for_kill_only(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("")  # v1 holds every controller
    parent, limits = cgroup_layout._v2_parent(str(tmp_path), "/", None, [])
    assert parent == str(tmp_path) and limits is False


def test_hybrid_groups_skip_the_v2_tree(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    layout = cgroup_layout.CgroupLayout(
        "hybrid", v1_parents={"memory": str(tmp_path / "memory")}, v2_parent=str(tmp_path)
    )
    group = cgroups.IsolateCgroup(layout, "stockade-1-2")
    assert list(group.dirs) == ["memory"]  # one group to join fewer: the pidfd kill covers the rest


def test_chosen_parent_gets_controllers_passed_down_the_whole_chain(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for group in ("", "guard", "guard/isolates"):
        (tmp_path / group).mkdir(exist_ok=True)
        (tmp_path / group / "cgroup.subtree_control").write_text("")
    problems: list[str] = []
    parent, limits = cgroup_layout._v2_parent(str(tmp_path), "/elsewhere", "/guard/isolates", problems)
    assert (parent, limits, problems) == (str(tmp_path / "guard" / "isolates"), True, [])
    for group in ("", "guard", "guard/isolates"):
        assert set(_read(tmp_path / group / "cgroup.subtree_control").split()) == {"+cpu", "+memory", "+pids"}


def test_chosen_parent_that_cannot_delegate_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    problems: list[str] = []
    # No cgroup.subtree_control in the made group: this is not a cgroupfs, as when delegation is missing.
    parent, limits = cgroup_layout._v2_parent(str(tmp_path), "/", "/made", problems)
    assert (parent, limits) == (None, False)
    assert problems and str(tmp_path / "made") in problems[0]


@pytest.mark.parametrize("value", ["stockade", "/a/../b", "/a/./b", "../x"])
def test_malformed_cgroup_parent_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("STOCKADE_CGROUP_PARENT", value)
    with pytest.raises(ConfigError, match="STOCKADE_CGROUP_PARENT"):
        cgroup_layout.detect_layout()


def test_cgroup_parent_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_CGROUP_PARENT", "//stockade//jobs/")
    assert cgroup_layout.cgroup_parent_setting() == "/stockade/jobs"
    monkeypatch.setenv("STOCKADE_CGROUP_PARENT", "")
    assert cgroup_layout.cgroup_parent_setting() is None
