"""The wall around runsc and QEMU themselves (runtimes/host_program.py): should the Sentry or the
guest's kernel fall, the host programs that write a share's files as the isolate's leased uid
still cannot leave a set-user-ID or set-group-ID file there, and a share whose directory has the
set-group-ID bit still takes new directories.

No Sentry or guest-kernel escape is at hand, so each attack is made by what stands in for one:
a program started exactly as runsc and QEMU are, and a gVisor container whose inner filter is
taken away, so that its code's chmod reaches the Sentry and its gofer. Each attack is first
shown to work without the wall, so that a test cannot pass because the attack was broken.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from stockade.runtimes import gvisor_bundle, host_program
from stockade.runtimes.process import seccomp
from tests.helpers import run_sharing, shared_directory

_GUARD_S = 30
ALLOW_ALL = seccomp._insn(0x06, seccomp.RET_ALLOW)  # ret ALLOW: a filter that refuses nothing

# What a program taken over would try: each line "name outcome".
ATTACKS = textwrap.dedent("""
    import ctypes, errno, mmap, os, stat, sys
    libc = ctypes.CDLL(None, use_errno=True)
    d = sys.argv[1]
    def attempt(name, call):
        try:
            call()
            print(name, "allowed")
        except OSError as exc:
            print(name, errno.errorcode[exc.errno])
    def raw(nr, *args):
        if libc.syscall(nr, *args) < 0:
            raise OSError(ctypes.get_errno(), "")
    f = os.path.join(d, "f")
    open(f, "w").close()
    fd = os.open(f, os.O_RDONLY)
    attempt("chmod", lambda: os.chmod(f, 0o4755))
    attempt("chmod-g", lambda: os.chmod(f, 0o2755))
    attempt("fchmod", lambda: os.fchmod(fd, 0o4755))
    attempt("fchmodat", lambda: os.chmod("f", 0o6755, dir_fd=os.open(d, os.O_RDONLY)))
    attempt("open", lambda: os.close(os.open(os.path.join(d, "o"), os.O_CREAT | os.O_WRONLY, 0o4755)))
    attempt("mknod", lambda: os.mknod(os.path.join(d, "n"), stat.S_IFREG | 0o2755))
    how = ctypes.create_string_buffer(bytes(24))  # openat2: its mode in memory
    attempt("openat2", lambda: raw(437, -100, f.encode(), how, 24))
    attempt("io_uring_setup", lambda: raw(425, 1, ctypes.create_string_buffer(120)))  # its OPENAT runs past seccomp
    # i386's chmod (15) through int 0x80, of no path: EFAULT where the call runs at all. In a
    # child: a kernel without i386 emulation answers int 0x80 with SIGSEGV.
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(bytes([0x53, 0x31, 0xDB, 0x31, 0xC9, 0x31, 0xD2, 0xB8, 15, 0, 0, 0, 0xCD, 0x80, 0x5B, 0xC3]))
        int80 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        print("i386-chmod", errno.errorcode[-int80()], flush=True)
        os._exit(0)
    if os.waitpid(child, 0)[1] != 0:
        print("i386-chmod no-i386-emulation")
    import socket
    for family, kind in (("vsock", 40), ("packet", 17), ("alg", 38), ("unix", 1), ("netlink", 16), ("inet", 2)):
        attempt(f"socket-{family}", lambda: socket.socket(kind, socket.SOCK_DGRAM if kind != 38 else 5).close())
    attempt("socketpair-inet", lambda: [s.close() for s in socket.socketpair(socket.AF_INET)])
    attempt("plain-open", lambda: os.close(os.open(os.path.join(d, "p"), os.O_CREAT | os.O_WRONLY, 0o644)))
    attempt("plain-chmod", lambda: os.chmod(os.path.join(d, "p"), 0o755))
""")


def _attack(walled: bool, directory: str) -> dict[str, str]:
    argv = [sys.executable, "-I", "-S", "-c", ATTACKS, directory]
    if walled:
        proc = host_program.spawn_in_cgroup(
            argv, None, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, label="attack"
        )
    else:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    return dict(line.split(" ", 1) for line in out.decode().splitlines())


def _set_id_files(directory: str) -> list[str]:
    return [
        n for n in os.listdir(directory) if os.stat(os.path.join(directory, n)).st_mode & (stat.S_ISUID | stat.S_ISGID)
    ]


def test_a_program_started_as_runsc_and_qemu_are_cannot_set_a_set_id_bit() -> None:
    free_dir, walled_dir = tempfile.mkdtemp(prefix="stockade-free-"), tempfile.mkdtemp(prefix="stockade-walled-")
    try:
        free = _attack(False, free_dir)
        set_id = ("chmod", "chmod-g", "fchmod", "fchmodat", "open", "mknod")
        assert [free[name] for name in set_id] == ["allowed"] * 6, free
        assert sorted(_set_id_files(free_dir)) == ["f", "n", "o"], "the attack itself does not work"
        assert free["i386-chmod"] in ("EFAULT", "no-i386-emulation") and free["openat2"] != "ENOSYS", free

        walled = _attack(True, walled_dir)
        # A file made with a set-ID mode is refused; a change of mode to one is skipped (the
        # mkdir of QEMU's 9p in a set-group-ID directory chmods with the bit the kernel added).
        assert [walled[name] for name in set_id] == ["allowed"] * 4 + ["EPERM"] * 2, walled
        assert _set_id_files(walled_dir) == [] and sorted(os.listdir(walled_dir)) == ["f", "p"]
        assert (walled["openat2"], walled["io_uring_setup"]) == ("ENOSYS", "ENOSYS"), walled
        if free["i386-chmod"] == "EFAULT":
            assert walled["i386-chmod"] == "ENOSYS", walled
        # Taken over, neither opens a socket family beyond unix, inet, inet6 and netlink: AF_VSOCK
        # (no namespace holds it) reaches the host's vsock ports and the hypervisor.
        assert free["socket-vsock"] != "EAFNOSUPPORT" and free["socket-packet"] == "allowed", free
        for family in ("vsock", "packet", "alg"):
            assert walled[f"socket-{family}"] == "EAFNOSUPPORT", walled
        assert walled["socketpair-inet"] == "EAFNOSUPPORT", walled
        assert [walled[f"socket-{f}"] for f in ("unix", "netlink", "inet")] == ["allowed"] * 3, walled
        assert (walled["plain-chmod"], walled["plain-open"]) == ("allowed", "allowed"), walled  # nothing else
        assert stat.S_IMODE(os.stat(os.path.join(walled_dir, "p")).st_mode) == 0o755
    finally:
        shutil.rmtree(free_dir)
        shutil.rmtree(walled_dir)


PLANT = (
    "import os\n"
    "open('/data/f', 'w').close()\n"
    "try:\n    os.chmod('/data/f', 0o4755)\nexcept OSError as exc:\n    print('refused', exc.errno)\n"
)


@pytest.mark.parametrize("outer_wall", [False, True])
def test_a_gvisor_container_whose_inner_filter_is_gone_still_plants_no_set_id_file(
    outer_wall: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The code's chmod, let through the container's own filter, reaches the Sentry, which has its
    # gofer (or itself, with directfs) set the mode on the host: what a taken-over Sentry does.
    from tests.conftest import require

    require("gvisor")
    no_filter = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": []}
    monkeypatch.setattr(gvisor_bundle, "OCI_FILTER", no_filter)
    if not outer_wall:
        monkeypatch.setattr(seccomp, "host_program", lambda listens_only=False: ALLOW_ALL)
    with shared_directory(0o777) as share:
        r = run_sharing(["python3", "-c", PLANT], "gvisor", share)
        assert r.exit_code == 0 and os.path.exists(os.path.join(share, "f")), r.summary()
        if outer_wall:
            assert _set_id_files(share) == [], oct(os.stat(os.path.join(share, "f")).st_mode)
        else:
            assert _set_id_files(share) == ["f"], "the attack itself does not work: the test would prove nothing"


@pytest.mark.parametrize("runtime", ["process", "microvm"])
def test_a_set_group_id_shared_directory_still_takes_new_directories(runtime: str) -> None:
    # Group-shared project trees carry the bit: a directory made in one inherits it from the kernel
    # (as on the host), and QEMU's 9p then chmods it with that bit, which the host filter skips.
    from tests.conftest import require

    require(runtime)
    with shared_directory(0o2777) as share:
        r = run_sharing(["sh", "-c", "mkdir /data/sub && touch /data/sub/f && echo made"], runtime, share)
        assert r.exit_code == 0 and r.stdout == "made\n", r.summary()
        sub = os.path.join(share, "sub")
        assert os.stat(sub).st_mode & stat.S_ISGID  # inherited, as any directory made there on the host
        assert not os.stat(os.path.join(sub, "f")).st_mode & (stat.S_ISUID | stat.S_ISGID)
