"""Files a root daemon writes for runsc's gofer and QEMU, which run on leased uids.

A daemon under systemd's ``UMask=0077`` would otherwise write a gVisor root and a
guest image that only root may read; a copied link in the bundle must never lead
a mount point out of it; and QEMU never gets root's group for /dev/kvm.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

import pytest

from stockade.policy import Policy
from stockade.runtimes import gvisor_bundle
from stockade.runtimes.hosted import readable_by_all
from stockade.runtimes.microvm import jail


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: str) -> dict[str, int]:
    found = {}
    for top, _dirs, files in os.walk(root):
        for path in [top, *(os.path.join(top, f) for f in files)]:
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode):
                found[os.path.relpath(path, root)] = st.st_mode
    return found


def test_a_gvisor_root_written_under_umask_0077_is_readable_by_every_uid(
    tmp_path: os.PathLike[str], strict_umask: None
) -> None:
    share = os.path.join(str(tmp_path), "share")
    os.mkdir(share)
    bundle = os.path.join(str(tmp_path), "bundle")
    os.mkdir(bundle)
    policy = Policy(filesystem_access=[f"{share}:/data/in:ro"])
    gvisor_bundle.write_bundle(bundle, policy, warm=False)
    modes = _modes(os.path.join(bundle, "rootfs"))
    assert "etc/passwd" in modes and "data/in" in modes
    for path, mode in modes.items():
        wanted = 0o755 if stat.S_ISDIR(mode) else 0o644
        assert stat.S_IMODE(mode) == wanted, f"{path} is {stat.S_IMODE(mode):o}"


def test_readable_by_all_keeps_execute_bits_and_drops_write_and_setid(
    tmp_path: os.PathLike[str], strict_umask: None
) -> None:
    root = os.path.join(str(tmp_path), "tree")
    os.makedirs(os.path.join(root, "sub"))
    for name, mode in (("plain", 0o600), ("tool", 0o700), ("setuid", 0o4777), ("sub/deep", 0o666)):
        path = os.path.join(root, name)
        with open(path, "w") as f:
            f.write("x")
        os.chmod(path, mode)
    outside = os.path.join(str(tmp_path), "outside")
    with open(outside, "w") as f:
        f.write("x")
    os.chmod(outside, 0o600)
    os.symlink(outside, os.path.join(root, "link"))
    readable_by_all(root)
    modes = {path: stat.S_IMODE(mode) for path, mode in _modes(root).items()}
    assert modes == {".": 0o755, "sub": 0o755, "plain": 0o644, "tool": 0o755, "setuid": 0o755, "sub/deep": 0o644}
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o600  # a link is not followed


def test_a_mount_point_under_a_copied_absolute_link_is_not_made_on_the_host(tmp_path: os.PathLike[str]) -> None:
    rootfs = os.path.join(str(tmp_path), "rootfs")
    host_dir = os.path.join(str(tmp_path), "host-lib")
    os.makedirs(rootfs)
    os.mkdir(host_dir)
    os.symlink(host_dir, os.path.join(rootfs, "lib"))  # as /lib -> /usr/lib would be copied
    gvisor_bundle._mount_point(rootfs, "/lib/planted/dir", directory=True)
    gvisor_bundle._mount_point(rootfs, "/lib/planted-file", directory=False)
    assert os.listdir(host_dir) == []
    gvisor_bundle._mount_point(rootfs, "/data/x", directory=True)
    assert os.path.isdir(os.path.join(rootfs, "data", "x"))


def _kvm(mode: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFCHR | mode, 0, 0, 1, 0, gid, 0, 0, 0, 0))


def test_qemu_gets_dev_kvms_group_but_never_gid_0() -> None:
    assert jail.kvm_group(_kvm(0o660, 108)) == 108  # udev's root:kvm
    assert jail.kvm_group(_kvm(0o660, 0)) is None  # root:root: root's group is never QEMU's
    assert jail.kvm_group(_kvm(0o666, 108)) is None  # open to all: no group needed
    assert jail.kvm_group(_kvm(0o600, 108)) is None
    assert jail.kvm_group(None) is None


def test_as_root_kvm_counts_as_reachable_only_through_what_a_leased_uid_may_open() -> None:
    assert jail.kvm_reachable(_kvm(0o660, 108), 0)[0]
    assert jail.kvm_reachable(_kvm(0o666, 0), 0)[0]
    assert not jail.kvm_reachable(_kvm(0o660, 0), 0)[0]  # root may open it; QEMU's uid may not
    assert not jail.kvm_reachable(_kvm(0o600, 0), 0)[0]
    assert not jail.kvm_reachable(None, 0)[0]
    # The accelerator's cached probe is keyed on what decides it.
    assert jail.kvm_reachable(_kvm(0o660, 108), 0)[1] != jail.kvm_reachable(_kvm(0o666, 108), 0)[1]


def test_an_agent_others_may_not_read_is_named(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade.runtimes import gvisor
    from stockade.runtimes.hosted import closed_to_others

    top = tempfile.mkdtemp(prefix="stockade-agent-place-")  # pytest's own directory is root's alone
    request.addfinalizer(lambda: shutil.rmtree(top))
    os.chmod(top, 0o755)
    home = os.path.join(top, "home")
    agent = os.path.join(home, "site", "agent")
    os.makedirs(agent)
    with open(os.path.join(agent, "server.py"), "w") as f:
        f.write("")
    readable_by_all(home)
    assert closed_to_others(agent) is None
    os.chmod(os.path.join(agent, "server.py"), 0o600)
    assert closed_to_others(agent) == os.path.join(agent, "server.py")
    os.chmod(home, 0o700)  # as /root is
    assert closed_to_others(agent) == home
    if os.geteuid() == 0:  # as root, runsc's gofer runs on a leased uid: gVisor says why it cannot
        monkeypatch.setattr(gvisor, "AGENT_PARENT", os.path.dirname(agent))
        monkeypatch.setattr(gvisor, "runsc_binary", lambda: "/usr/bin/runsc")
        found = gvisor.GvisorRuntime().detect()
        assert not found.available and f"{home} is not readable by other users" in found.reason
