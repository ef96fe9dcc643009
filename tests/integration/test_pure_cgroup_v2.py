"""The cgroup v2 path on a pure cgroup v2 host, for real: a guest kernel booted for it.

This machine is hybrid (the controllers sit on v1), so stockade's v2 code would
otherwise run only against a tree of plain files (tests/unit/test_cgroups_v2.py).
Here the microVM runtime's guest kernel (Debian's, from ``stockade image build``)
boots under QEMU with cgroup2 mounted as its only hierarchy and the memory, pids
and cpu controllers enabled at the root: the layout of Ubuntu 24.04 and other
systemd hosts. This checkout and its ``.venv`` are shared into the guest read-only
over 9p, and pytest runs there, as root, the tests that depend on the host's
cgroups: every limit at its minimum, default and maximum, pooled and on demand,
refused limits leaving nothing behind (tests/integration/test_limits.py), and the
fork bomb, memory bomb, CPU cap and teardown attacks (tests/security). The guest's
session guard (conftest.py) is its v2 guard, so a group left behind fails there.

Every one of them must pass there, none skipped: a guest that could not run the
process runtime, or a layout stockade did not take as v2, fails this test.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from stockade.runtimes.microvm import image as guest_image
from stockade.runtimes.microvm.qemu import TCG_CACHE_MB, share_args, tsc_khz
from stockade.runtimes.microvm.runtime import qemu_binary
from tests.conftest import require

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUEST_MB = 1024
GUEST_DEADLINE_S = 600  # ~2.5 min on an idle 2-core host under TCG
# The tests whose outcome depends on the host's cgroups (runtime: process; the guest runs no gVisor or VM).
INNER_TESTS = [
    "tests/integration/test_limits.py",
    "tests/security/test_attacks.py::test_fork_bomb_is_contained",
    "tests/security/test_attacks.py::test_memory_bomb_gives_memory_limit",
    "tests/security/test_attacks.py::test_cpu_limit_is_applied",
    "tests/security/test_attacks.py::test_daemonised_grandchildren_die_with_a_one_shot",
    "tests/security/test_attacks.py::test_close_leaves_nothing_behind",
    "-k",
    "not gvisor and not microvm",
]
MIN_INNER_TESTS = 45  # what INNER_TESTS selects today

# Stage one runs from the initramfs, whose root pivot_root refuses (every isolate pivots):
# it loads the 9p modules and moves to a tmpfs root holding the shares, then stage two.
STAGE_ONE = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in __MODULES__; do insmod /modules/$m.ko || { echo "v2 guest: insmod $m failed"; poweroff -f; }; done
R=/newroot
mkdir -p $R && mount -t tmpfs -o mode=0755 root $R
mkdir -p $R/bin $R/usr $R/etc $R/out $R/tmp $R/proc $R/sys $R/dev
busybox cp /bin/busybox /stage-two $R/bin/
for a in sh mount mkdir cat poweroff hostname date; do ln -s busybox $R/bin/$a; done
ln -s usr/lib $R/lib
ln -s usr/lib64 $R/lib64
o=trans=virtio,version=9p2000.L,msize=262144
for share in "usr /usr ro" "etc /etc ro" "out /out rw"; do
  set -- $share
  mount -t 9p -o $o,$3 $1 $R$2 || { echo "v2 guest: no share $1"; poweroff -f; }
done
umount /proc /sys
mount --move /dev $R/dev
exec busybox switch_root $R /bin/stage-two
"""
STAGE_TWO = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=1777 tmp /tmp
# The checkout at its host path (its .venv names it), after /tmp: it may be under /tmp.
mkdir -p __REPO__
o=trans=virtio,version=9p2000.L,msize=262144,ro
mount -t 9p -o $o repo __REPO__ || { echo "v2 guest: no share repo"; poweroff -f; }
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
hostname v2-guest
date -s @__NOW__ > /dev/null
export PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
cd __REPO__
cat /sys/fs/cgroup/cgroup.subtree_control > /out/controllers
.venv/bin/python -m pytest -p no:cacheprovider -q -rs --junitxml=/out/junit.xml __TESTS__ > /out/pytest.log 2>&1
echo $? > /out/rc
poweroff -f
"""


def _require_guest() -> None:
    require("microvm")  # QEMU and a built guest image
    try:
        with open(os.path.join(REPO, ".venv", "pyvenv.cfg")) as f:
            home = dict(line.split(" = ", 1) for line in f.read().splitlines() if " = " in line).get("home", "")
    except OSError:
        pytest.skip(f"no .venv at {REPO}: the guest runs the checkout's own environment")
    if not (home + "/").startswith("/usr/"):
        pytest.skip(f"the .venv's interpreter is in {home}: the guest sees only the host's /usr")
    if REPO.startswith(("/usr/", "/etc/")):
        pytest.skip(f"the checkout is under {REPO.split('/')[1]}, which the guest shares read-only from the host")


def _initrd(image: guest_image.GuestImage, into: str) -> str:
    """The guest image's initramfs, with this test's two init stages appended: the kernel
    unpacks concatenated archives in order, so the later ``/init`` is the one that runs."""
    now = str(int(time.time()))  # the guest has no clock of its own
    one = STAGE_ONE.replace("__MODULES__", " ".join(guest_image.MODULES))
    two = STAGE_TWO.replace("__REPO__", shlex.quote(REPO)).replace("__NOW__", now)
    two = two.replace("__TESTS__", shlex.join(INNER_TESTS))
    path = os.path.join(into, "initrd")
    with open(path, "wb") as out:
        with open(image.initramfs, "rb") as f:
            shutil.copyfileobj(f, out)
        for ino, (name, data) in enumerate((("init", one), ("stage-two", two)), start=1 << 20):
            guest_image.cpio_entry(out, ino, name, stat.S_IFREG | 0o755, data.encode())
        guest_image.cpio_entry(out, 0, "TRAILER!!!", 0, b"")
    return path


@pytest.fixture
def guest_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="stockade-v2-guest-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(GUEST_DEADLINE_S + 60)
def test_limits_and_cgroup_attacks_hold_on_a_pure_v2_host(guest_dir: str) -> None:
    _require_guest()
    image, qemu = guest_image.find_image(), qemu_binary()
    assert image is not None and qemu is not None
    out = os.path.join(guest_dir, "out")
    os.mkdir(out)
    console = os.path.join(guest_dir, "console")
    khz = tsc_khz()
    cmdline = "console=ttyS0 quiet panic=-1" + (f" tsc_early_khz={khz}" if khz else "")
    cmd = [
        qemu, "-M", "microvm,x-option-roms=off,pit=off,pic=off,rtc=off",
        "-accel", f"tcg,tb-size={TCG_CACHE_MB}", "-cpu", "max", "-m", str(GUEST_MB), "-smp", "2",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", image.kernel, "-initrd", _initrd(image, guest_dir), "-serial", f"file:{console}",
        *share_args("usr", "/usr"), *share_args("etc", "/etc"), *share_args("repo", REPO),
        *share_args("out", out, writable=True),
        "-append", cmdline,
    ]  # fmt: skip
    vm = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        vm.wait(timeout=GUEST_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if vm.poll() is None:
            os.killpg(vm.pid, signal.SIGKILL)
            vm.wait()

    def report() -> str:
        parts = []
        for name in ("controllers", "pytest.log", "../console"):
            try:
                with open(os.path.join(out, name), errors="replace") as f:
                    parts.append(f"--- {name}\n{f.read()[-6000:]}")
            except OSError as exc:
                parts.append(f"--- {name}: {exc.strerror}")
        return "\n".join(parts)

    assert os.path.exists(os.path.join(out, "rc")), f"the guest did not finish in {GUEST_DEADLINE_S} s\n{report()}"
    with open(os.path.join(out, "controllers")) as f:
        assert set(f.read().split()) == {"cpu", "memory", "pids"}, report()
    assert os.path.exists(os.path.join(out, "junit.xml")), f"the guest's pytest wrote no report\n{report()}"
    suite = ET.parse(os.path.join(out, "junit.xml")).getroot().find("testsuite")
    assert suite is not None, report()
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, f"{counts}\n{report()}"
    assert counts["tests"] >= MIN_INNER_TESTS, f"{counts}\n{report()}"
    with open(os.path.join(out, "rc")) as f:
        assert f.read().strip() == "0", report()
