"""A shared path is mounted with the mounts below it: each of them is confined as the share is
(read-only unless the share is writable, nosuid, nodev), and a share holding a mount of a
filesystem that hands over the host (a chroot's proc or dev) is refused as /proc and /dev are."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from unittest import mock

import pytest

import stockade
from stockade.agent import linux, rootfs
from stockade.runtimes.shared_paths import check_mount_sources
from tests.helpers import run_sharing, shared_directory

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the test mounts filesystems on the host: root only")


@contextlib.contextmanager
def mounted(kind: str, where: str, options: str = "") -> Iterator[None]:
    """A ``kind`` filesystem mounted at ``where`` on the host for the test, unmounted after."""
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", kind, *(["-o", options] if options else []), kind, where], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", where], check=True)


def _options(mountinfo: str, point: str) -> set[str]:
    """The per-mount options of ``point`` in a mountinfo table (``linux.mountinfo_path`` form)."""
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if linux.mountinfo_path(fields[4]) == point:
            return set(fields[5].split(","))
    raise AssertionError(f"{point} is not mounted:\n{mountinfo}")


@pytest.mark.parametrize("access", ["ro", "rw"])
def test_a_mount_below_a_share_is_confined_as_the_share(process_runtime: str, access: str) -> None:
    with shared_directory(0o777) as share:
        sub = os.path.join(share, "sub")
        with mounted("tmpfs", sub, "mode=1777"):
            r = run_sharing(
                ["sh", "-c", "cat /proc/self/mountinfo; echo planted > /data/sub/x && echo wrote"], "process", share,
                access,
            )  # fmt: skip
            options = _options(r.stdout, "/data/sub")
            assert {"nosuid", "nodev"} <= options, options
            if access == "ro":
                assert "ro" in options and "wrote" not in r.stdout
                assert not os.path.exists(os.path.join(sub, "x"))
            else:
                assert "rw" in options and "wrote" in r.stdout


@pytest.mark.parametrize("kind", ["proc", "devpts", "sysfs"])
def test_a_share_holding_a_mount_of_the_hosts_own_is_refused(kind: str) -> None:
    with shared_directory(0o755) as share, mounted(kind, os.path.join(share, "chroot", kind)):
        with pytest.raises(stockade.PolicyError, match=f"holds a {kind} mount at {share}/chroot/{kind}"):
            check_mount_sources(stockade.Policy(filesystem_access=[f"{share}/chroot:/data"]))
        with pytest.raises(stockade.PolicyError, match=f"holds a {kind} mount"):
            check_mount_sources(stockade.Policy(filesystem_access=[f"{share}:/data"]))
        os.mkdir(os.path.join(share, "plain"), 0o755)
        check_mount_sources(stockade.Policy(filesystem_access=[f"{share}/plain:/data"]))  # nothing mounted below it


def _bind_in_a_mount_namespace_of_its_own(share: str, target: str, writable: bool, without_setattr: bool) -> str:
    """rootfs.bind(share, target) in a child in a private mount namespace: the child's mountinfo."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read)
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.mount("tmpfs", os.path.join(share, "sub"), "tmpfs", 0)
            os.makedirs(target, exist_ok=True)
            missing = OSError(errno.ENOSYS, "mount_setattr: Function not implemented")
            with (
                mock.patch.object(linux, "mount_setattr_recursive", side_effect=missing)
                if without_setattr
                else (contextlib.nullcontext())
            ):
                rootfs.bind(share, target, writable)
            with open("/proc/self/mountinfo", "rb") as f:
                os.write(write, f.read())
            status = 0
        except BaseException:
            import traceback

            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        table = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, table
    return table


@pytest.mark.parametrize("without_setattr", [False, True], ids=["mount_setattr", "remount-each (Linux < 5.12)"])
def test_bind_confines_every_mount_below_its_source(without_setattr: bool, tmp_path: object) -> None:
    share, target = os.path.join(str(tmp_path), "share"), os.path.join(str(tmp_path), "target dir")
    os.makedirs(os.path.join(share, "sub"))
    table = _bind_in_a_mount_namespace_of_its_own(share, target, False, without_setattr)
    for point in (target, f"{target}/sub"):
        assert {"ro", "nosuid", "nodev"} <= _options(table, point), point
    table = _bind_in_a_mount_namespace_of_its_own(share, target, True, without_setattr)
    assert {"rw", "nosuid", "nodev"} <= _options(table, f"{target}/sub")
