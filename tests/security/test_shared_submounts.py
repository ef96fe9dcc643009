"""A shared path is mounted with the mounts below it: each of them is confined as the share is
(read-only unless the share is writable, nosuid, nodev), and a share holding a mount of a
filesystem that hands over the host (a chroot's proc or dev) is refused as /proc and /dev are."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from typing import Any
from unittest import mock

import pytest

from stockade.agent import linux, rootfs
from tests.helpers import shared_directory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.helpers from there
pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the test mounts filesystems on the host: root only")


def _options(mountinfo: str, point: str) -> set[str]:
    """The per-mount options of ``point`` in a mountinfo table (``linux.mountinfo_path`` form)."""
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if linux.mountinfo_path(fields[4]) == point:
            return set(fields[5].split(","))
    raise AssertionError(f"{point} is not mounted:\n{mountinfo}")


def in_a_mount_namespace_of_its_own(code: str, *args: str) -> dict[str, Any]:
    """``code`` run by a Python in a private mount namespace of its own (``unshare -m``), given
    ``mount(kind, where, options="", source=None)`` and ``refusal(source)`` (check_mount_sources'
    words, or None): what it mounts for the test goes with it, whatever becomes of the test. The
    JSON object it prints last."""
    prelude = (
        "import json, os, subprocess, sys\n"
        "import stockade\n"
        "from stockade.runtimes.shared_paths import check_mount_sources\n"
        "def mount(kind, where, options='', source=None):\n"
        "    os.makedirs(where, exist_ok=True)\n"
        "    opts = ['--bind'] if kind == 'bind' else ['-t', kind] + (['-o', options] if options else [])\n"
        "    subprocess.run(['mount', *opts, source or kind, where], check=True)\n"
        "def refusal(source):\n"
        "    try:\n"
        "        check_mount_sources(stockade.Policy(filesystem_access=[source + ':/data']))\n"
        "    except stockade.PolicyError as exc:\n"
        "        return str(exc)\n"
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", prelude + code, *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return said


@pytest.mark.parametrize("access", ["ro", "rw"])
def test_a_mount_below_a_share_is_confined_as_the_share(process_runtime: str, access: str) -> None:
    with shared_directory(0o777) as share:
        said = in_a_mount_namespace_of_its_own(
            "from tests.helpers import run_sharing\n"
            "share, access = sys.argv[1:]\n"
            "mount('tmpfs', share + '/sub', 'mode=1777')\n"
            "r = run_sharing(['sh', '-c', 'cat /proc/self/mountinfo; echo planted > /data/sub/x && echo wrote'],"
            " 'process', share, access)\n"
            "print(json.dumps({'stdout': r.stdout, 'planted': os.path.exists(share + '/sub/x')}))",
            share, access,
        )  # fmt: skip
    options = _options(said["stdout"], "/data/sub")
    assert {"nosuid", "nodev"} <= options, options
    if access == "ro":
        assert "ro" in options and "wrote" not in said["stdout"] and not said["planted"]
    else:
        assert "rw" in options and "wrote" in said["stdout"] and said["planted"]


@pytest.mark.parametrize("kind", ["proc", "devpts", "sysfs"])
def test_a_share_showing_a_mount_of_the_hosts_own_is_refused(kind: str) -> None:
    with shared_directory(0o755) as share:
        said = in_a_mount_namespace_of_its_own(
            "share, kind = sys.argv[1:]\n"
            "mount(kind, f'{share}/chroot/{kind}')\n"
            "os.mkdir(share + '/plain', 0o755)\n"
            "within = {'proc': 'sys', 'devpts': 'ptmx', 'sysfs': 'kernel'}[kind]\n"
            "print(json.dumps({name: refusal(share + path) for name, path in (('chroot', '/chroot'), ('share', ''),"
            " ('within', f'/chroot/{kind}/{within}'), ('plain', '/plain'))}))",
            share, kind,
        )  # fmt: skip
    assert f"shows a {kind} mount at {share}/chroot/{kind}" in said["chroot"]
    assert f"shows a {kind} mount" in said["share"] and f"shows a {kind} mount" in said["within"]
    assert said["plain"] is None  # nothing mounted below it


def test_a_share_showing_a_bind_of_a_path_no_share_may_name_is_refused() -> None:
    # A bind of /run (or of /) below a directory showed the host's /run in the sandbox, sockets and all.
    with shared_directory(0o755) as share:
        said = in_a_mount_namespace_of_its_own(
            "share = sys.argv[1]\n"
            "mount('tmpfs', '/run')\n"  # this namespace's own /run: what is made in it stays here
            "os.makedirs('/run/user/1000')\n"
            "mount('bind', share + '/u/user', source='/run/user/1000')\n"
            "said = {'/u': refusal(share + '/u')}\n"  # (before /r: a bind of /run shows it elsewhere too)
            "mount('bind', share + '/r/run', source='/run')\n"
            "mount('bind', share + '/h/hostroot', source='/')\n"
            "mount('bind', '/run/host', source='/')\n"  # a toolbox's view of its host, beside /
            "mount('bind', share + '/d/docs', source='/usr/share')\n"
            "print(json.dumps({**said, **{p: refusal(share + p) for p in ('/r', '/h', '/d')}}))",
            share,
        )  # fmt: skip
    assert f"shows {share}/r/run, which is /run: it may not be shared" in said["/r"]
    assert "which is /run/user/1000:" in said["/u"]
    assert "which is /:" in said["/h"]  # mounted at / and at /run/host: both paths no share may name
    assert said["/d"] is None  # /usr/share, a path a share may name (and /run/host/usr/share too)


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
