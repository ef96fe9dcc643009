"""Attacks on the jail QEMU runs in (runtimes/microvm/jail.py), as a guest that took QEMU over would try them.

No guest escape is at hand to test with, so each attack is made by a program
started through the same jail: QEMU itself (driven over QMP to spawn a
program, as a compromised QEMU would) and a Python stand-in for the rest
(reach the host's network, change uid, write a file it does not own). Each
attack is first shown to work outside the jail, so that a test cannot pass
because the attack was broken.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from stockade import Policy
from stockade.errors import SandboxStartError
from stockade.runtimes.host_program import spawn_in_cgroup
from stockade.runtimes.microvm import jail
from tests.helpers import write_executable

# Every jailed program here is bounded in time and memory, like any attack test.
_GUARD_S = 30


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=_GUARD_S, check=False, **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def qemu_uid() -> Iterator[int | None]:
    """As root, the host uid leased for one QEMU (as the runtime leases one); rootless, None."""
    from stockade.runtimes.hosted import lease_uids, release_uids

    leases = lease_uids(1, None)
    yield leases[0].uid if leases else None
    release_uids(leases, True)


def _for_qemu(path: str, uid: int | None) -> str:
    """``path`` made QEMU's own, as the runtime makes its run directory."""
    if uid is not None:
        os.chown(path, uid, uid)
    return path


@pytest.fixture
def scratch() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="stockade-jail-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt install qemu-system-x86)")
    return qemu


class _Qemu:
    """A guest-less QEMU driven over QMP on its stdio: jailed as the microvm runtime
    jails it (same prefix, Landlock rules for a run directory, seccomp), or not."""

    def __init__(self, confined: bool, rundir: str, uid: int | None = None) -> None:
        argv = [_qemu(), "-M", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"]

        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
        if confined:
            rules = jail.file_rules(Policy(), argv[0], rundir, rundir, ())
            if jail.seccomp_supported(argv[0]):
                argv += ["-sandbox", jail.SECCOMP]
            argv[:0] = jail.prefix(uid, "tcg")
            self.proc = spawn_in_cgroup(
                argv, None, **pipes, label="stockade-microvm", landlock=rules, listens_only=True
            )
        else:
            self.proc = subprocess.Popen(argv, **pipes, start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.stdout.readline()  # the greeting
        self.ask({"execute": "qmp_capabilities"})

    def ask(self, message: dict[str, object]) -> dict[str, object]:
        """Send one command; its answer (events skipped), or {} if QEMU is gone."""
        try:
            self.stdin.write(json.dumps(message).encode() + b"\n")
            self.stdin.flush()
            while line := self.stdout.readline():
                answer: dict[str, object] = json.loads(line)
                if "return" in answer or "error" in answer:
                    return answer
        except (BrokenPipeError, OSError):
            pass
        return {}

    def end(self) -> int:
        if self.proc.poll() is None:
            self.ask({"execute": "quit"})
        try:
            return self.proc.wait(timeout=_GUARD_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_a_jailed_qemu_that_is_told_to_spawn_a_program_is_killed(scratch: str, qemu_uid: int | None) -> None:
    if not jail.seccomp_supported(_qemu()):
        pytest.skip("this QEMU was built without seccomp: -sandbox is refused")
    marker = os.path.join(scratch, "spawned")

    def attack(confined: bool) -> int:
        qemu = _Qemu(confined, scratch, qemu_uid)
        # QMP's migrate to exec: is a documented way to make QEMU run a program:
        # a stand-in for the shell code a guest that took QEMU over would run.
        qemu.ask({"execute": "migrate", "arguments": {"uri": f"exec:touch {marker}"}})
        deadline = time.monotonic() + 10
        while not os.path.exists(marker) and qemu.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return qemu.end()

    assert attack(confined=False) == 0
    assert os.path.exists(marker), "the attack itself does not work: the test would prove nothing"
    os.unlink(marker)
    assert attack(confined=True) == -31  # SIGSYS: seccomp killed it at the fork
    assert not os.path.exists(marker)


def test_a_jailed_qemu_cannot_open_host_files_outside_its_allow_list(scratch: str, qemu_uid: int | None) -> None:
    if not jail.LANDLOCK_ABI:
        pytest.skip("this kernel has no Landlock")
    secret = os.path.join(scratch, "secret")
    with open(secret, "w") as f:
        f.write("the host's")
    os.chmod(secret, 0o644)  # readable by every uid, QEMU's too: only Landlock keeps it out
    rundir = _for_qemu(tempfile.mkdtemp(prefix="stockade-jail-run-"), qemu_uid)
    try:
        # blockdev-add opens a file for the VM's disk: what a QEMU taken over could do to any path.
        disk = {"driver": "file", "node-name": "d", "filename": secret, "read-only": True}
        open_it = {"execute": "blockdev-add", "arguments": disk}
        free = _Qemu(False, rundir)
        assert "return" in free.ask(open_it), "the attack itself does not work: the test would prove nothing"
        free.end()
        jailed = _Qemu(True, rundir, qemu_uid)
        answer = jailed.ask(open_it)
        assert "error" in answer and "Permission denied" in str(answer["error"]), answer
        # ... while its own run directory stays open to it, as the runtime needs.
        inside = os.path.join(rundir, "disk")
        with open(inside, "w") as f:
            f.write("x")
        _for_qemu(inside, qemu_uid)
        own = {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "e", "filename": inside}}
        assert "return" in jailed.ask(own)
        assert jailed.end() == 0
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def host_service(scratch: str) -> Iterator[str]:
    """A Unix socket any uid may connect to (as the system bus's, /dev/log's, or a rootless
    user's own session bus is to its QEMU), listening in ``scratch``."""
    path = os.path.join(scratch, "service.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(8)
    yield path
    server.close()


def test_a_jailed_qemu_connects_to_no_unix_socket_on_the_host(
    scratch: str, host_service: str, qemu_uid: int | None
) -> None:
    # Landlock does not govern connect() to a path's socket, nor does a network namespace hold
    # it: a QEMU taken over reached any host service's socket others may open (rootless: the
    # user's session bus, and through it systemd --user).
    rundir = _for_qemu(tempfile.mkdtemp(prefix="stockade-jail-run-"), qemu_uid)
    try:
        to_service = {"execute": "chardev-add", "arguments": {"id": "c", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": host_service}}, "server": False}}}}  # fmt: skip
        free = _Qemu(False, rundir)
        assert "return" in free.ask(to_service), "the attack itself does not work: the test would prove nothing"
        free.end()
        jailed = _Qemu(True, rundir, qemu_uid)
        answer = jailed.ask(to_service)
        assert "error" in answer and "Permission denied" in str(answer["error"]), answer
        # ... while it still listens in its run directory, as the runtime's sockets do.
        own = {"execute": "chardev-add", "arguments": {"id": "s", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": os.path.join(rundir, "own.sock")}}, "server": True,
            "wait": False}}}}  # fmt: skip
        assert "return" in jailed.ask(own), "a jailed QEMU must still listen in its run directory"
        assert jailed.end() == 0
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _jailed(argv: list[str], rundir: str, uid: int | None) -> tuple[subprocess.Popen[bytes], bytes, bytes]:
    """A stand-in for a QEMU taken over: ``argv`` run as the runtime starts QEMU (its prefix, the
    Landlock rules of ``rundir``, the host filter of a program that only listens), to its end."""
    rules = jail.file_rules(Policy(), _qemu(), rundir, rundir, ())
    proc = spawn_in_cgroup(
        [*jail.prefix(uid, "tcg"), *argv], None, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, label="stockade-microvm", landlock=rules, listens_only=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=_GUARD_S)
    return proc, out, err


RUNDIR_PROBE = r"""
import json, os, socket, sys
rundir, out = sys.argv[1], {}
for name, make in (("file", lambda p: open(p, "w").close()), ("directory", os.mkdir),
                   ("link", lambda p: os.symlink("x", p)), ("fifo", os.mkfifo)):
    try:
        make(os.path.join(rundir, name)); out[name] = "made"
    except OSError as e:
        out[name] = e.errno
sock = socket.socket(socket.AF_UNIX)
sock.bind(os.path.join(rundir, "own.sock")); sock.listen(1)
out["socket"] = "listening"
os.unlink(os.path.join(rundir, "own.sock"))
with open(os.path.join(rundir, "console"), "w") as f:  # the FIFO the host made, as QEMU opens its -serial file:
    f.write("console")
out["console"] = "written"
print(json.dumps(out))
"""


def test_a_jailed_qemu_makes_no_file_in_its_run_directory(scratch: str, qemu_uid: int | None) -> None:
    # Its run directory allowed everything: taken over, it filled the host's disk there, past
    # every limit of the VM's. Its sockets and the console FIFO the host made are all it needs.
    if not jail.LANDLOCK_ABI:
        pytest.skip("this kernel has no Landlock")
    rundir = _for_qemu(tempfile.mkdtemp(prefix="stockade-jail-run-"), qemu_uid)
    try:
        os.mkfifo(os.path.join(rundir, "console"), 0o600)
        _for_qemu(os.path.join(rundir, "console"), qemu_uid)
        reader = os.open(os.path.join(rundir, "console"), os.O_RDONLY | os.O_NONBLOCK)
        try:
            proc, out, err = _jailed(["/usr/bin/python3", "-I", "-S", "-c", RUNDIR_PROBE, rundir], rundir, qemu_uid)
            assert os.read(reader, 64) == b"console"
        finally:
            os.close(reader)
        assert proc.returncode == 0, err
        refused = errno.EACCES
        assert json.loads(out) == {
            "file": refused, "directory": refused, "link": refused, "fifo": refused,
            "socket": "listening", "console": "written",
        }  # fmt: skip
        assert sorted(os.listdir(rundir)) == ["console"]
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


DATAGRAM_PROBE = r"""
import json, socket, sys
out = {}
for name, make in (("socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)),
                   ("socketpair", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0]),
                   # The kernel makes a unix SOCK_RAW socket a datagram one.
                   ("raw", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_RAW | socket.SOCK_CLOEXEC)),
                   ("raw pair", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_RAW)[0])):
    try:
        make().sendto(b"from the jail", sys.argv[1]); out[name] = "sent"
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"""


def test_a_jailed_qemu_sends_no_datagram_to_a_unix_socket_on_the_host(scratch: str, qemu_uid: int | None) -> None:
    # A datagram needs no connect(): sendto() names the path (/dev/log, journald's socket).
    path = os.path.join(scratch, "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
        log.bind(path)
        os.chmod(path, 0o777)
        argv = ["/usr/bin/python3", "-I", "-S", "-c", DATAGRAM_PROBE, path]
        free = json.loads(_run(argv).stdout)
        assert set(free.values()) == {"sent"}, f"the attack itself does not work: {free}"
        rundir = _for_qemu(tempfile.mkdtemp(prefix="stockade-jail-run-"), qemu_uid)
        try:
            proc, out, err = _jailed(argv, rundir, qemu_uid)
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        assert proc.returncode == 0, err
        assert json.loads(out) == {"socket": errno.EACCES, "socketpair": errno.EACCES, "raw": errno.EACCES,
                                   "raw pair": errno.EACCES}  # fmt: skip
        log.setblocking(False)
        got = [log.recv(64) for _ in range(4)]
        assert got == [b"from the jail"] * 4  # the free probe's four, and nothing of the jailed one's
        with pytest.raises(BlockingIOError):
            log.recv(64)


PROBE = r"""
import json, os, socket, sys
out = {}
host, port, foreign = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    socket.create_connection((host, port), timeout=3).close(); out["connect"] = "connected"
except OSError as e:
    out["connect"] = e.errno
try:
    with open(foreign, "a") as f:
        f.write("owned"); out["write"] = "written"
except OSError as e:
    out["write"] = e.errno
try:
    os.setuid(4321); out["setuid"] = "changed"
except OSError as e:
    out["setuid"] = e.errno
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
out["caps"] = int(status["CapEff"], 16)
out["uid"] = int(status["Uid"].split()[0])
out["uid_map"] = open("/proc/self/uid_map").read().split()
out["no_new_privs"] = status["NoNewPrivs"].strip()
print(json.dumps(out))
"""


def _probe(prefix: list[str], port: int, foreign: str) -> dict[str, object]:
    r = _run([*prefix, sys.executable, "-I", "-S", "-c", PROBE, "127.0.0.1", str(port), foreign])
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout)
    return result


@pytest.fixture
def listener() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def test_the_jail_keeps_the_host_network_uid_changes_and_others_files_out_of_reach(
    scratch: str, listener: int, qemu_uid: int | None
) -> None:
    if not jail.namespaces():
        pytest.skip("this host lets no process have a network namespace of its own (unshare fails)")
    foreign = os.path.join(scratch, "not-qemus")
    with open(foreign, "w") as f:
        f.write("")
    os.chmod(foreign, 0o644)
    if os.geteuid() == 0:
        os.chown(foreign, 4242, 4242)  # another user's file: only a capability lets uid 0 write it

    free = _probe([], listener, foreign)
    assert free["connect"] == "connected"
    if os.geteuid() == 0:
        assert free["setuid"] == "changed" and free["write"] == "written"

    jailed = _probe(jail.prefix(qemu_uid, "tcg"), listener, foreign)
    assert jailed["connect"] != "connected"  # its own network namespace: the host's loopback is not there
    assert jailed["setuid"] != "changed"
    assert jailed["no_new_privs"] == "1"
    assert jailed["caps"] == 0
    if qemu_uid is not None:
        # The leased uid, seen inside as the guest's 1000 (9p's files are the guest's own), and no other.
        assert jailed["uid_map"] == ["1000", str(qemu_uid), "1"] if jail.guest_uid_map() else jailed["uid"] == qemu_uid
        assert jailed["write"] != "written"
        with open(foreign) as f:
            assert f.read() == "owned"  # only the unjailed probe's write


@pytest.mark.skipif(os.getuid() != 0, reason="rootless, QEMU runs as its caller: no uid to lease")
def test_as_root_qemu_is_never_started_without_a_uid_of_its_own() -> None:
    with pytest.raises(SandboxStartError, match="leased uid"):
        jail.prefix(None, "tcg")


def test_qemu_installed_outside_usr_may_read_its_own_prefix_only() -> None:
    def readable(qemu: str) -> set[str]:
        return {path for path, _rights in jail.file_rules(Policy(), qemu, "/run/x", "/img", ()) if path != "/run/x"}

    assert "/opt/qemu" in readable("/opt/qemu/bin/qemu-system-x86_64")
    assert "/" not in readable("/qemu-system-x86_64") and "/qemu-system-x86_64" in readable("/qemu-system-x86_64")
    assert "/" not in readable("/usr/bin/qemu-system-x86_64")


def test_libraries_from_outside_the_usual_places_are_readable_and_nothing_else(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A QEMU whose libraries live in a tree of their own (a Nix store, an RPATH
    # elsewhere) needs those directories, and only those, on top of the usual ones.
    store = os.path.join(str(tmp_path), "store", "glib", "lib")
    os.makedirs(store)
    qemu = write_executable(os.path.join(str(tmp_path), "prefix", "bin", "qemu-system-x86_64"), "stand-in")
    fake_ldd = write_executable(
        os.path.join(str(tmp_path), "bin", "ldd"),
        "#!/bin/sh\ncat <<EOF\n"
        "\tlinux-vdso.so.1 (0x00007ffc1a3f2000)\n"
        f"\tlibglib-2.0.so.0 => {store}/libglib-2.0.so.0 (0x00007f0a1c000000)\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0a1be00000)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f0a1c200000)\n"
        "EOF\n",
    )
    monkeypatch.setenv("PATH", f"{os.path.dirname(fake_ldd)}:{os.environ['PATH']}")
    assert jail.library_dirs(qemu) == (store,)
    assert (store, jail._READ) in jail.file_rules(Policy(), qemu, "/run/x", "/img", ())
    # A QEMU from the distribution needs nothing beyond the usual places.
    monkeypatch.undo()
    real = shutil.which("qemu-system-x86_64")
    if real is not None:
        assert jail.library_dirs(real) == ()
