"""The per-isolate uid range and its leases (runtimes/process/uids.py)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import time
from pathlib import Path

import pytest

from stockade.errors import ConfigError, SandboxStartError
from stockade.runtimes.process.uids import DEFAULT_RANGE, UidAllocator, UidRange, processes_of


@pytest.mark.parametrize("raw", ["", "  "])
def test_the_default_range_when_unset(raw: str) -> None:
    r = UidRange.from_env({"STOCKADE_SANDBOX_UIDS": raw})
    assert f"{r.first}-{r.last}" == DEFAULT_RANGE


@pytest.mark.parametrize("raw", ["5000", "a-b", "9000-8000", "0-100", "10-20000", "5000-4294967295", "-1-5"])
def test_a_malformed_range_is_refused_by_name(raw: str) -> None:
    with pytest.raises(ConfigError, match="STOCKADE_SANDBOX_UIDS"):
        UidRange.from_env({"STOCKADE_SANDBOX_UIDS": raw})


def test_a_range_holding_a_host_account_is_refused() -> None:
    account = pwd.getpwnam("nobody")
    with pytest.raises(ConfigError, match="nobody"):
        UidRange(account.pw_uid - 1, account.pw_uid + 1).check_unused()


def test_a_range_overlapping_subordinate_ids_is_refused(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("alice:100000:65536\n")
    UidRange(200000, 300000).check_unused(str(tmp_path))
    with pytest.raises(ConfigError, match="alice's subordinate ids 100000-165535"):
        UidRange(165535, 170000).check_unused(str(tmp_path))


def _allocator(tmp_path: Path, first: int, last: int) -> UidAllocator:
    return UidAllocator(UidRange(first, last), lock_dir=str(tmp_path / "locks"))


def test_leases_are_distinct_until_released(tmp_path: Path) -> None:
    # Two allocators stand for two stockade processes on one host (root's: the even places of the range).
    one, two = _allocator(tmp_path, 1879048192, 1879048195), _allocator(tmp_path, 1879048192, 1879048195)
    a, b = one.lease(), two.lease()
    assert {a.uid, b.uid} == {1879048192, 1879048194}
    with pytest.raises(SandboxStartError, match=r"every uid .* is in use"):
        one.lease()
    a.release()
    a.release()  # idempotent
    again = two.lease()
    assert again.uid == a.uid
    assert sorted(os.listdir(tmp_path / "locks")) == sorted([str(b.uid), str(again.uid)])
    b.release()
    again.release()
    assert os.listdir(tmp_path / "locks") == []


def test_a_uid_whose_dead_holder_left_a_running_isolate_is_skipped(tmp_path: Path) -> None:
    allocator = _allocator(tmp_path, 1879048192, 1879048192)
    lease = allocator.lease()
    procs = tmp_path / "cgroup.procs"
    procs.write_text("4242\n")
    lease.record([str(procs)])
    # The holder dies without releasing: the kernel drops its lock, the file stays.
    os.close(lease._fd)
    lease._fd = -1
    with pytest.raises(SandboxStartError):
        allocator.lease()
    procs.write_text("")  # the zygote finished its clean-up: the group is empty
    assert allocator.lease().uid == 1879048192
    procs.unlink()  # or gone altogether
    assert _allocator(tmp_path, 1879048192, 1879048194).lease().uid == 1879048194  # 1879048192 is held


def test_a_range_holding_a_host_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # An isolate's gid is its uid's number: a host group there would be the isolate's.
    monkeypatch.setattr(grp, "getgrall", lambda: [grp.struct_group(("builders", "x", 1879048300, []))])
    with pytest.raises(ConfigError, match="gid 1879048300 of the host group 'builders'"):
        UidRange(1879048192, 1879113727).check_unused()


def test_a_lock_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o777)
    locks.chmod(0o777)
    with pytest.raises(ConfigError, match="mode 0700"):
        _allocator(tmp_path, 1879048192, 1879048193).lease()


def test_files_of_dead_holders_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    procs = tmp_path / "cgroup.procs"
    procs.write_text("4242\n")
    (locks / "1879048200").write_text("")  # a holder SIGKILLed after its isolate was gone
    (locks / "1879048201").write_text(json.dumps([str(procs)]))  # one whose isolate still has a process
    held = _allocator(tmp_path, 1879048202, 1879048202).lease()  # a live holder elsewhere
    _allocator(tmp_path, 1879048192, 1879048192).lease()  # the first lease sweeps
    assert sorted(os.listdir(locks)) == ["1879048192", "1879048201", "1879048202"]
    held.release()


def test_a_lease_whose_cgroup_lingers_keeps_its_uid_out_of_reach(tmp_path: Path) -> None:
    allocator = _allocator(tmp_path, 1879048192, 1879048192)
    lease = allocator.lease()
    procs = tmp_path / "cgroup.procs"
    procs.write_text("4242\n")
    lease.record([str(procs)])
    lease.release(keep_record=True)  # the group could not be removed: a process still dies in it
    with pytest.raises(SandboxStartError):
        allocator.lease()
    procs.write_text("")
    assert allocator.lease().uid == 1879048192


@pytest.mark.skipif(os.getuid() != 0, reason="rootless, nothing runs as a leased uid")
def test_without_a_cgroup_a_uid_is_given_back_only_once_nothing_runs_as_it() -> None:
    # A host with no usable cgroup: a gVisor Sentry or gofer that outlived runsc would
    # still run as its leased uid; the isolate's end kills it before the uid goes back.
    import subprocess

    from stockade.runtimes.hosted import _end_isolate, lease_uids

    (lease,) = lease_uids(1, None)
    uid = lease.uid
    left = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "sleep", "60"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30  # setpriv has changed uid once sleep runs
        while not processes_of({uid}) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes_of({uid}) == [left.pid]
        _end_isolate(None, None, [lease])  # no program, no cgroup
        assert left.wait(timeout=10) == -9
        assert not os.path.exists(lease._path)
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


@pytest.mark.skipif(os.getuid() != 0, reason="rootless, nothing can run as a uid of the range")
def test_a_kept_lease_of_no_cgroup_stays_out_of_reach_while_its_uid_runs(tmp_path: Path) -> None:
    # Without a cgroup, a lease kept because its uid's processes would not die names no
    # group: the uid itself is what must be free before it is handed out again. (A uid
    # beyond the default range: no isolate of a test beside this one holds it.)
    import subprocess

    allocator = _allocator(tmp_path, 1879200001, 1879200001)
    lease = allocator.lease([])
    left = subprocess.Popen(["setpriv", "--reuid=1879200001", "--regid=1879200001", "--clear-groups", "--",
                             "sleep", "60"], start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not processes_of({1879200001}) and time.monotonic() < deadline:
            time.sleep(0.01)
        lease.release(keep_record=True)
        with pytest.raises(SandboxStartError):
            allocator.lease([])
    finally:
        left.kill()
        left.wait()
    assert allocator.lease([]).uid == 1879200001


def test_root_and_a_daemon_that_gave_root_up_never_lease_one_uid(tmp_path: Path) -> None:
    """Such a daemon leases from a directory of its own user's, which root's processes do not read
    (nor it theirs): before, both took from the whole range, and two live isolates could get one uid
    (its per-user quotas, files in shared paths). Now root's processes take the even places of the
    range, the daemon the odd."""
    root = _allocator(tmp_path, 1879048192, 1879048195)
    daemon = _allocator(tmp_path, 1879048192, 1879048195)
    daemon.hand_to(os.getuid(), os.getgid())  # (this user stands for the daemon's here)
    roots, daemons = [root.lease(), root.lease()], [daemon.lease(), daemon.lease()]
    assert sorted(lease.uid for lease in roots) == [1879048192, 1879048194]
    assert sorted(lease.uid for lease in daemons) == [1879048193, 1879048195]
    with pytest.raises(SandboxStartError, match="every uid at the odd places of STOCKADE_SANDBOX_UIDS"):
        daemon.lease()
    with pytest.raises(SandboxStartError, match="every uid at the even places of STOCKADE_SANDBOX_UIDS"):
        root.lease()
    for lease in roots + daemons:
        lease.release()
    lonely = _allocator(tmp_path, 1879048192, 1879048192)
    lonely.hand_to(os.getuid(), os.getgid())
    with pytest.raises(SandboxStartError, match="holds no uid for a daemon that gave root up"):
        lonely.lease()
