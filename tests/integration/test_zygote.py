"""The zygote's spare children: not forked again and again when they keep dying before use."""

from __future__ import annotations

import os
import select
import socket
import tempfile
import time
from pathlib import Path

import pytest

from stockade import Policy
from stockade.agent.zygote import DEAD_SPARES_TO_STOP
from stockade.runtimes.process import cgroups
from stockade.runtimes.process.cgroup_layout import CgroupLayout
from stockade.runtimes.process.factory import IsolateFactory
from stockade.runtimes.process.runtime import ProcessRuntime
from stockade.runtimes.process.zygote import Zygote


def _next_pid(fifo: int, timeout: float) -> int | None:
    """The pid the next child of the zygote writes to its "cgroup.procs", or None."""
    ready, _, _ = select.select([fifo], [], [], timeout)
    return int(os.read(fifo, 64)) if ready else None


def _wait_gone(pid: int, timeout: float = 30) -> None:
    """Until ``pid`` has exited (gone, or a zombie its parent has not reaped yet): its descriptors closed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return
        except (FileNotFoundError, ProcessLookupError):  # reaped before or while it was read
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not exit within {timeout:g} s")


def test_spares_that_keep_dying_are_no_longer_forked(process_runtime: str) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: the spare must fail at its uid change, which only root attempts")
    # Every child of the zygote first writes its pid to "cgroup.procs" (here a FIFO
    # this test reads), then fails to take the uid -5: the spare dies before use,
    # and the build asked for instead reports the error.
    where = tempfile.mkdtemp(prefix="stockade-zygote-test-")
    path = os.path.join(where, "cgroup.procs")
    os.mkfifo(path)
    fifo = os.open(path, os.O_RDWR)  # never EOF, writers never block
    zygote = Zygote(sandbox_uids=None)  # its checks would refuse these requests before forking anything
    try:
        config = {"cgroup_procs": [path], "outer_uid": -5, "outer_gid": -5}
        for _ in range(DEAD_SPARES_TO_STOP):
            zygote.prepare([path], -5, -5)
            spare = _next_pid(fifo, 10)
            assert spare is not None  # a spare was forked (and dies)
            _wait_gone(spare)  # dead before the request comes: it is counted as one that died before use
            host, guest = socket.socketpair()
            zygote.spawn(config, guest.fileno())
            guest.close()
            host.settimeout(10)
            assert host.recv(1) == b"E"  # the build asked for ran, and said why it failed
            host.close()
            assert _next_pid(fifo, 10) is not None
        zygote.prepare([path], -5, -5)
        assert _next_pid(fifo, 0.5) is None, "the zygote forked yet another spare"
    finally:
        zygote.close()
        os.close(fifo)
        os.unlink(path)
        os.rmdir(where)


def _own_groups(layout: CgroupLayout) -> set[str]:
    parents = [*layout.v1_parents.values(), *([layout.v2_parent] if layout.v2_parent else [])]
    mine = f"stockade-{os.getpid()}-"
    return {os.path.join(p, n) for p in parents if os.path.isdir(p) for n in os.listdir(p) if n.startswith(mine)}


def _procs_in(group: cgroups.IsolateCgroup) -> int:
    with open(group.procs_files[0]) as f:
        return len(f.read().split())


def test_an_early_factory_serves_its_one_isolate_from_its_spare_and_makes_no_other(process_runtime: str) -> None:
    # The CLI's: the zygote started before the runtime's modules are imported, the spare asked for at once.
    factory = IsolateFactory.early(Zygote(wait=False, sandbox_uids=None))
    runtime = ProcessRuntime(pool_size=0)
    runtime.adopt(factory)
    try:
        spare = factory.spare()
        if spare[0] is None:
            pytest.skip("no cgroup to find the spare child in (this host lets this uid make none)")
        deadline = time.monotonic() + 30
        while _procs_in(spare[0]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the zygote boots, then forks the spare and its init into the group
        assert _procs_in(spare[0]) >= 2, "the zygote forked no spare into the group it was asked to"
        dirs = set(spare[0].dirs.values())
        with runtime.start(Policy()) as sandbox:
            assert (sandbox.cgroup, sandbox.uid) == spare  # the group and uid its spare child waited in
            assert sandbox.exec(["true"]).exit_code == 0
        runtime.wait_idle()
        assert factory.spare() == (None, None), "a spare was made for a next isolate that never comes"
    finally:
        runtime.close()
    assert not [d for d in dirs if os.path.isdir(d)], "the isolate's groups outlived it"


@pytest.mark.parametrize("closed_after", ["create", "prepare"])
def test_a_spare_whose_factory_closes_while_it_is_made_leaves_nothing(
    process_runtime: str, monkeypatch: pytest.MonkeyPatch, closed_after: str
) -> None:
    # The next isolate's cgroup is made on the reaper thread after each start. If the runtime
    # closes meanwhile (before the zygote is asked for the spare, or after), neither that group
    # nor its uid may land in the emptied slot, or stay.
    factory = IsolateFactory()
    zygote, manager = factory.zygote(), factory.cgroups.get()
    if manager.layout.version == "none":
        pytest.skip("no cgroup on this host: the group this is about is never made")
    made: list[cgroups.IsolateCgroup] = []

    def create() -> cgroups.IsolateCgroup:
        made.append(cgroups.CgroupManager.create(manager))
        if closed_after == "create":
            factory.close()
        return made[-1]

    def prepare(*args: object) -> None:
        Zygote.prepare(zygote, *args)  # type: ignore[arg-type]
        if closed_after == "prepare":
            factory.close()

    monkeypatch.setattr(manager, "create", create)
    monkeypatch.setattr(zygote, "prepare", prepare)
    factory.prepare_next(zygote)
    assert factory.spare() == (None, None)
    assert made and not [d for d in made[0].dirs.values() if os.path.isdir(d)]


def test_starts_that_overlap_keep_the_spare_already_made(process_runtime: str) -> None:
    # Two starts at once (a pool's build and a caller's) each ask for the next spare. The
    # second ask must keep the first's: replacing it kills the zygote's child in it, which a
    # daemon that gave root up cannot do, so its reaper (every one-shot's teardown) waited
    # seconds on the cgroup's removal.
    factory = IsolateFactory()
    runtime = ProcessRuntime(pool_size=0)
    runtime.adopt(factory)
    try:
        runtime.start(Policy()).close()
        runtime.wait_idle()
        zygote, manager = factory.zygote(), factory.cgroups.get()
        spare = factory.spare()
        assert spare != (None, None), "no spare was prepared after the start"
        before = _own_groups(manager.layout)
        factory.prepare_next(zygote)  # the overlapping start's ask
        assert factory.spare() == spare
        assert _own_groups(manager.layout) == before  # no group made and thrown away
        with runtime.start(Policy()) as sandbox:  # and the spare kept serves the next start
            assert sandbox.exec(["true"]).exit_code == 0
    finally:
        runtime.close()


def test_groups_a_remove_had_to_leave_are_retried(tmp_path: Path) -> None:
    parent, child, busy = tmp_path / "g", tmp_path / "g" / "child", tmp_path / "busy"
    child.mkdir(parents=True)
    busy.mkdir()
    (busy / "still-here").write_text("")
    cgroups._LEFTOVERS.update({str(parent), str(child), str(busy)})
    try:
        assert cgroups.retry_leftovers() == 1  # the child first, then its parent; the busy one stays
        assert not parent.exists() and busy.exists()
    finally:
        cgroups._LEFTOVERS.clear()


def test_a_root_zygote_refuses_an_isolate_as_root_or_a_pid_written_outside_a_cgroup(process_runtime: str) -> None:
    """What a daemon taken over (once it runs as its own user) might ask of the root zygote."""
    if os.getuid() != 0:
        pytest.skip("needs root: a rootless zygote has no more power than its caller")
    where = tempfile.mkdtemp(prefix="stockade-zygote-test-")
    target = os.path.join(where, "cgroup.procs")
    with open(target, "w") as f:
        f.write("untouched")
    zygote = Zygote()
    try:
        for config in (
            {"cgroup_procs": [], "outer_uid": 0, "outer_gid": 0},  # root outside
            {"cgroup_procs": [], "outer_uid": None, "outer_gid": None},  # no uid change at all
            {"cgroup_procs": [], "outer_uid": 65534, "outer_gid": 65534},  # another account
            {"cgroup_procs": [target], "outer_uid": 1879048192, "outer_gid": 1879048192},  # a file not a cgroup's
        ):
            host, guest = socket.socketpair()
            zygote.spawn(config, guest.fileno())
            guest.close()
            host.settimeout(10)
            assert host.recv(1) == b"E", config  # refused, and said why
            host.close()
        with open(target) as f:
            assert f.read() == "untouched"
    finally:
        zygote.close()
        os.unlink(target)
        os.rmdir(where)


def test_a_zygote_serving_a_daemon_that_gave_root_up_refuses_roots_uids(process_runtime: str) -> None:
    """Root's processes lease the even places of the range, such a daemon the odd (uids.py), neither
    seeing the other's leases: its zygote holds a daemon taken over to its own half."""
    if os.getuid() != 0:
        pytest.skip("needs root: a rootless zygote has no more power than its caller")
    zygote = Zygote(odd_uids_only=True)
    try:
        host, guest = socket.socketpair()
        zygote.spawn({"cgroup_procs": [], "outer_uid": 1879048192, "outer_gid": 1879048192}, guest.fileno())
        guest.close()
        host.settimeout(10)
        assert host.recv(1) == b"E"  # an even place: root's
        said = host.recv(65536)
        assert b"is root's to lease (an even place of" in said, said
        host.close()
    finally:
        zygote.close()


def test_a_zygote_serving_given_groups_writes_through_no_link_and_nowhere_else(process_runtime: str) -> None:
    """A daemon that gave root up owns its groups: a link it puts there, or a path it makes up, reaches nothing."""
    if os.getuid() != 0:
        pytest.skip("needs root: a rootless zygote has no more power than its caller")
    parent = tempfile.mkdtemp(prefix="stockade-zygote-groups-")
    victim = os.path.join(tempfile.mkdtemp(prefix="stockade-zygote-victim-"), "precious")
    with open(victim, "w") as f:
        f.write("untouched")
    os.mkdir(os.path.join(parent, "linked"))
    os.symlink(victim, os.path.join(parent, "linked", "cgroup.procs"))
    zygote = Zygote(cgroup_parents=[parent])
    uid = 1879048192
    try:
        for procs in (
            os.path.join(parent, "linked", "cgroup.procs"),  # a link where the list should be
            f"/proc/self/root{parent}/x/cgroup.procs",  # a path through /proc that leads there
            os.path.join(parent, "..", os.path.basename(parent), "x", "cgroup.procs"),
            os.path.join(os.path.dirname(victim), "cgroup.procs"),  # outside the groups served
        ):
            host, guest = socket.socketpair()
            zygote.spawn({"cgroup_procs": [procs], "outer_uid": uid, "outer_gid": uid}, guest.fileno())
            guest.close()
            host.settimeout(10)
            assert host.recv(1) == b"E", procs
            host.close()
        with open(victim) as f:
            assert f.read() == "untouched"
    finally:
        zygote.close()
        os.unlink(os.path.join(parent, "linked", "cgroup.procs"))
        os.rmdir(os.path.join(parent, "linked"))
        os.rmdir(parent)
        os.unlink(victim)
        os.rmdir(os.path.dirname(victim))


def test_a_runtime_whose_factory_has_started_keeps_it(process_runtime: str) -> None:
    # A factory handed over late (after this runtime's own zygote started, or root was given up)
    # must not replace it: the one given up to the daemon's user holds isolates to its uids.
    runtime = ProcessRuntime(pool_size=0)
    try:
        own = runtime.factory
        own.zygote()
        late = IsolateFactory(Zygote(wait=False, sandbox_uids=None))
        runtime.adopt(late)
        assert runtime.factory is own and not late.started  # closed, its zygote gone
    finally:
        runtime.close()
