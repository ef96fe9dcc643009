"""Attacks on every boundary of the process runtime.

Each test tries to cross a boundary the way hostile code would, and checks
both that it failed and, where the policy says so, that the host reported it.
The session runs inside an outer memory/pids guard (tests/conftest.py), and
every run here is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import socket
import stat
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

import stockade
from stockade import ExecResult, Policy, Sandbox
from stockade.agent.wire import MAX_DATA_BYTES
from stockade.limits import MAX_CALL_BYTES
from stockade.policy import MAX_OUTPUT_BYTES
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.process import cgroups
from tests.conftest import require
from tests.helpers import processes_with_arg, run_sharing, shared_directory


@pytest.fixture
def sb(process_runtime: str, manager: RuntimeManager) -> Iterator[Sandbox]:
    with Sandbox(Policy(runtime="process", timeout_seconds=20), manager=manager) as sandbox:
        yield sandbox


def run(manager: RuntimeManager, code: str, **policy: object) -> ExecResult:
    policy.setdefault("timeout_seconds", 20)
    return stockade.run_code(code, runtime="process", manager=manager, **policy)


def blocked(result: ExecResult) -> set[str]:
    return {v.syscall for v in result.security_violations if v.detection_layer == "SECCOMP" and v.syscall}


LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
MMAP = (  # libc's mmap, its address as a number
    "libc.mmap.restype = ctypes.c_void_p\n"
    "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
)


@pytest.mark.parametrize("runtime", ["process", "microvm"])
def test_numa_policy_calls_are_refused_without_a_violation(runtime: str, manager: RuntimeManager) -> None:
    # numpy and OpenBLAS try mbind/set_mempolicy on import: under on_violation="kill" they must run.
    from tests.conftest import require

    require(runtime)
    code = LIBC + (
        "for nr in (237, 238):  # mbind, set_mempolicy\n"
        "    print(libc.syscall(nr, 0, 0, 0, 0, 0, 0), ctypes.get_errno())\n"
        "print(libc.syscall(256, 0, 0, 0, 0))  # migrate_pages: other processes' pages, still reported"
    )
    r = stockade.run_code(code, runtime=runtime, manager=manager, timeout_seconds=120)
    assert r.stdout.splitlines()[:2] == ["-1 1", "-1 1"], r.summary() + r.stderr
    assert blocked(r) == {"migrate_pages"}
    quiet = stockade.run_code(LIBC + "print(libc.syscall(237, 0, 0, 0, 0, 0, 0))", runtime=runtime,
                              manager=manager, on_violation="kill", timeout_seconds=120)  # fmt: skip
    assert quiet.termination_reason == "completed" and quiet.stdout == "-1\n" and not quiet.security_violations


# ---- privileges ---------------------------------------------------------------------


def test_no_capabilities_no_new_privs_seccomp(sb: Sandbox) -> None:
    status = sb.exec(["cat", "/proc/self/status"]).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[cap].strip() == "0000000000000000", cap
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"


def test_unprivileged_inside_and_outside(sb: Sandbox) -> None:
    out = sb.exec(["sh", "-c", "id -u; cat /proc/self/uid_map"]).stdout.split()
    assert out[0] == "1000"
    inner, outer, count = out[1:4]
    assert inner == "1000" and count == "1"
    assert outer != "0", "the sandbox uid must never be host root"


def test_setuid_root_is_impossible(sb: Sandbox) -> None:
    r = sb.run_code("import os\ntry:\n    os.setuid(0)\n    print('ROOT')\nexcept OSError as e:\n    print(e.errno)")
    assert r.stdout.strip() in ("1", "22")  # EPERM, or EINVAL: uid 0 does not even exist in the namespace


# ---- filesystem ---------------------------------------------------------------------


def test_host_files_are_invisible(sb: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> None:
    marker = f"/tmp/stockade-marker-{random.randrange(10**9)}"
    with open(marker, "w") as f:
        f.write("host secret")
    try:
        code = (
            "import os\n"
            f"for p in ('/root', '/home', '/etc/shadow', '/etc/ssh', '/var', '/boot', '/srv', '{marker}'):\n"
            "    print(p, os.path.exists(p))"
        )
        lines = sb.run_code(code).stdout.splitlines()
        assert lines and all(line.endswith("False") for line in lines), lines
    finally:
        os.unlink(marker)


def test_no_sys_no_cgroupfs_no_dangerous_devices(sb: Sandbox) -> None:
    r = sb.exec(["sh", "-c", "ls -d /sys /sys/fs/cgroup /dev/kvm /dev/vsock /dev/mem /dev/sda 2>&1"])
    assert r.stdout.count("No such file") == 6, r.stdout
    devices = set(sb.exec(["ls", "/dev"]).stdout.split())
    assert devices == {"fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"}


def test_etc_is_synthesized(sb: Sandbox) -> None:
    allowed = {"alternatives", "fonts", "group", "hostname", "hosts", "ld.so.cache", "localtime", "mime.types",
               "nsswitch.conf", "passwd", "resolv.conf", "ssl"}  # fmt: skip
    listed = set(sb.exec(["ls", "/etc"]).stdout.split())
    assert listed <= allowed and {"passwd", "group", "hosts", "resolv.conf"} <= listed
    assert "sandbox:x:1000" in sb.read_file("/etc/passwd").decode()


@pytest.mark.parametrize("path", ["/usr/bin/evil", "/etc/passwd", "/newdir/x", "/bin/x", "/proc/sys/kernel/hostname"])
def test_read_only_everywhere_but_scratch(sb: Sandbox, path: str) -> None:
    r = sb.run_code(f"open({path!r}, 'w').write('x')")
    assert r.exit_code == 1
    assert any(e in r.stderr for e in ("Read-only file system", "Permission denied", "No such file")), r.stderr


def test_scratch_is_writable_and_size_capped(process_runtime: str, manager: RuntimeManager) -> None:
    r = run(
        manager,
        "import os\nwith open('/tmp/fill', 'wb') as f:\n"
        "    try:\n        for _ in range(64):\n            f.write(b'x' * (1 << 20)); f.flush()\n"
        "    except OSError as e:\n        print('stopped', e.errno, os.path.getsize('/tmp/fill') >> 20)",
        disk_mb=8,
    )
    words = r.stdout.split()
    assert words[:2] == ["stopped", "28"], r.stdout + r.stderr  # ENOSPC
    assert int(words[2]) <= 8


def test_work_and_tmp_share_the_disk_cap(process_runtime: str, manager: RuntimeManager) -> None:
    r = run(
        manager,
        "open('/work/a', 'wb').write(b'x' * (6 << 20))\nopen('/tmp/b', 'wb').write(b'x' * (6 << 20))",
        disk_mb=8,
    )
    assert r.exit_code == 1 and "No space left" in r.stderr


def test_file_size_limit(process_runtime: str, manager: RuntimeManager) -> None:
    r = run(
        manager,
        "import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "try:\n    open('/tmp/big', 'wb').write(b'x' * (3 << 20))\nexcept OSError as e:\n    print(e.errno)",
        max_file_size_bytes=1 << 20,
    )
    assert r.stdout.strip() == "27"  # EFBIG


def test_readonly_mount_and_rw_mount(process_runtime: str, manager: RuntimeManager) -> None:
    base = tempfile.mkdtemp(prefix="stockade-share-")
    try:
        os.chmod(base, 0o777)
        with open(os.path.join(base, "in.txt"), "w") as f:
            f.write("from host")
        os.chmod(os.path.join(base, "in.txt"), 0o644)
        r = run(
            manager, "print(open('/data/in.txt').read())\nopen('/data/x', 'w')", filesystem_access=[f"{base}:/data"]
        )
        assert "from host" in r.stdout and "Read-only file system" in r.stderr
        r = run(manager, "open('/data/out.txt', 'w').write('from sandbox')", filesystem_access=[f"{base}:/data:rw"])
        assert r.success, r.stderr
        with open(os.path.join(base, "out.txt")) as f:
            assert f.read() == "from sandbox"
    finally:
        shutil.rmtree(base)


def test_unreachable_mount_source_is_a_clear_error(process_runtime: str, manager: RuntimeManager) -> None:
    with pytest.raises((stockade.PolicyError, stockade.SandboxStartError), match="filesystem_access"):
        run(manager, "pass", filesystem_access=["/nonexistent/stockade/path:/data"])
    if os.getuid() == 0:
        private = tempfile.mkdtemp(prefix="stockade-private-")  # 0700: not for the sandbox uid
        try:
            with pytest.raises(stockade.PolicyError, match="not accessible"):
                run(manager, "pass", filesystem_access=[f"{private}:/data"])
        finally:
            os.rmdir(private)


def test_a_mount_source_that_links_to_a_forbidden_path_is_refused(
    process_runtime: str, manager: RuntimeManager
) -> None:
    # Named by a path of the caller's own, a link into /proc (the host's mount table), /sys,
    # /dev or /run passes the name's check: where it leads is checked too. (In a directory open
    # to others: below a closed one, nothing of it is said, where it leads neither.)
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="stockade-links-")
    try:
        os.chmod(where, 0o755)
        for target in ("/proc/self/mounts", "/sys/kernel", "/dev/null", "/run"):
            link = os.path.join(where, "innocent")
            os.symlink(target, link)
            try:
                with pytest.raises(stockade.PolicyError, match=f"innocent leads to {os.path.realpath(link)}, which"):
                    run(manager, "pass", filesystem_access=[f"{link}:/data"])
            finally:
                os.unlink(link)
    finally:
        shutil.rmtree(where)


@pytest.mark.skipif(os.getuid() != 0, reason="only a root host opens shared paths with another uid than its caller's")
@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_mount_source_that_links_below_a_private_directory_is_refused(runtime: str, manager: RuntimeManager) -> None:
    # gVisor's gofer and QEMU open a share as root: a link of the caller's own to a directory
    # under a 0700 one must not be their way past it (the link's own path is searchable).
    from tests.conftest import require

    require(runtime)
    top = tempfile.mkdtemp(prefix="stockade-links-")
    try:
        os.chmod(top, 0o755)
        private = os.path.join(top, "private")
        os.makedirs(os.path.join(private, "pub"))
        os.chmod(private, 0o700)
        os.chmod(os.path.join(private, "pub"), 0o755)
        link = os.path.join(top, "link")
        os.symlink(os.path.join(private, "pub"), link)
        with pytest.raises(stockade.PolicyError, match=f"{private} is not searchable by others"):
            stockade.run(["true"], runtime=runtime, manager=manager, filesystem_access=[f"{link}:/data"])
        # A link to a directory open to others is shared where it leads (inside, its absolute
        # target would otherwise be read against the isolate's own root).
        opened = os.path.join(top, "open")
        os.mkdir(opened, 0o755)
        with open(os.path.join(opened, "f"), "w") as f:
            f.write("shared\n")
        os.chmod(os.path.join(opened, "f"), 0o644)
        os.symlink(opened, os.path.join(top, "open-link"))
        shared = f"{os.path.join(top, 'open-link')}:/data"
        r = stockade.run(["cat", "/data/f"], runtime=runtime, manager=manager, filesystem_access=[shared])
        assert r.stdout == "shared\n", r.summary() + r.stderr
    finally:
        shutil.rmtree(top)


@pytest.mark.skipif(os.getuid() != 0, reason="only a root host opens shared paths with another uid than its caller's")
@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_share_a_sandbox_could_swap_for_a_link_is_refused(runtime: str, manager: RuntimeManager) -> None:
    # runsc and QEMU open a share's source as root after stockade checked it: a sandbox writing a
    # directory on the way (another share) could swap the next step for a link to a private tree.
    from tests.conftest import require
    from tests.helpers import shared_directory

    require(runtime)
    with shared_directory(0o777) as outer:
        inner = os.path.join(outer, "inner")
        os.mkdir(inner, 0o755)
        with pytest.raises(stockade.PolicyError, match=f"lies below {outer}, which others may write \\(mode 0777"):
            stockade.run(["true"], runtime=runtime, manager=manager, filesystem_access=[f"{inner}:/data"])
        made = stockade.run(["mkdir", "-m", "755", "/data/made"], runtime="process", manager=manager,
                            filesystem_access=[f"{outer}:/data:rw"])  # fmt: skip
        assert made.success, made.summary()
        os.chmod(outer, 0o1777)  # sticky, as /tmp: no other user's entry can be renamed there
        with pytest.raises(stockade.PolicyError, match=r"made is an entry of uid \d+, a sandbox's"):
            stockade.run(["true"], runtime=runtime, manager=manager, filesystem_access=[f"{outer}/made:/data"])
        os.symlink(inner, os.path.join(outer, "link"))
        os.lchown(os.path.join(outer, "link"), os.stat(os.path.join(outer, "made")).st_uid, -1)
        with pytest.raises(stockade.PolicyError, match=r"link is a link of uid \d+, a sandbox's"):
            stockade.run(["true"], runtime=runtime, manager=manager, filesystem_access=[f"{outer}/link:/data"])
        r = stockade.run(["ls", "/data"], runtime=runtime, manager=manager, filesystem_access=[f"{inner}:/data"])
        assert r.success, r.summary() + r.stderr  # below a sticky directory, a root-owned one is shared


@pytest.mark.skipif(os.getuid() != 0, reason="rootless, an isolate runs as its caller's own uid (threat-model.md)")
@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_shared_directory_is_reached_as_the_isolates_own_host_uid(runtime: str) -> None:
    # Inside, the code is uid 1000. On the host it must be a uid of its own: not the host's uid 1000
    # (a real account's, whose private files a share may hold), not root, and not a uid that owns
    # what it leaves behind once the isolate is gone (a setuid program in a writable share).
    from stockade.runtimes.process.uids import LOCK_DIR, UidRange, processes_of
    from tests.conftest import require

    require(runtime)
    share = tempfile.mkdtemp(prefix="stockade-owners-")
    try:
        os.chmod(share, 0o777)
        for name, owner in (("of-1000", 1000), ("of-root", 0)):
            path = os.path.join(share, name)
            with open(path, "w") as f:
                f.write(f"private to {owner}\n")
            os.chown(path, owner, owner)
            os.chmod(path, 0o600)
        script = (
            "cat /data/of-1000 /data/of-root; id -u; echo mine > /data/written; "
            "cp /bin/true /data/setuid && chmod 4755 /data/setuid; ls -ln /data/of-1000"
        )

        def record(uid: int) -> str:
            try:
                with open(os.path.join(LOCK_DIR, str(uid))) as f:
                    return f.read()  # the isolate's cgroups, which each of its leases names
            except OSError:
                return ""

        own = RuntimeManager(pool_size=0)
        try:
            with Sandbox(Policy(runtime=runtime, filesystem_access=[f"{share}:/data:rw"]), manager=own) as held:
                r = held.exec(["sh", "-c", script])
                code = os.stat(os.path.join(share, "written")).st_uid
                # Its leases, and no other isolate's (a spare, another test's pool refilling meanwhile).
                leased = {int(name) for name in os.listdir(LOCK_DIR) if record(int(name)) == record(code)}
                running_as = {uid: processes_of({uid}) for uid in leased}
        finally:
            own.close()
        assert "private to" not in r.stdout, r.stdout
        assert r.stderr.count("Permission denied") >= 2, r.stderr
        assert r.stdout.splitlines()[0] == "1000"  # what the code is told it is, as in every runtime
        assert " 1000 " not in r.stdout, "a host uid 1000's file showed as the code's own"
        uids = UidRange.from_env()
        owners = {name: os.stat(os.path.join(share, name)).st_uid for name in ("written", "setuid")}
        assert all(uids.first <= uid <= uids.last for uid in owners.values()), owners
        assert owners["written"] == owners["setuid"] == code
        assert code in leased, (code, leased)
        if runtime == "gvisor":
            # Two leases: the code's (known only as an owner of files) and the one runsc's
            # Sentry and gofer run as; what the code writes is never the latter's.
            (runsc,) = leased - {code}
            assert running_as[runsc] and not running_as[code], running_as
        else:
            assert leased == {code} and running_as[code], running_as  # its processes, or QEMU
        deadline = time.monotonic() + 30
        while (set(os.listdir(LOCK_DIR)) & {str(u) for u in leased}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(os.listdir(LOCK_DIR)) & {str(u) for u in leased}, "its uids were not given back"
    finally:
        shutil.rmtree(share)


PLANT_SET_ID = textwrap.dedent("""
    import ctypes, os, stat
    libc = ctypes.CDLL(None, use_errno=True)
    def attempt(name, call):
        try:
            call()
            print(name, "allowed")
        except OSError as exc:
            print(name, "refused", exc.errno)
    open("/data/f", "w").close()
    fd = os.open("/data/f", os.O_RDONLY)
    attempt("chmod", lambda: os.chmod("/data/f", 0o4755))
    attempt("chmod-g", lambda: os.chmod("/data/f", 0o2755))
    attempt("fchmod", lambda: os.fchmod(fd, 0o4755))
    attempt("fchmodat", lambda: os.chmod("f", 0o6755, dir_fd=os.open("/data", os.O_RDONLY)))
    attempt("open", lambda: os.close(os.open("/data/o", os.O_CREAT | os.O_WRONLY, 0o4755)))
    attempt("mknod", lambda: os.mknod("/data/n", stat.S_IFREG | 0o4755))
    # openat2 (437) carries its mode in memory a filter cannot read: refused whole
    how = ctypes.create_string_buffer(bytes(24))
    attempt("openat2", lambda: (libc.syscall(437, -100, b"/data/f", how, 24) >= 0)
            or (_ for _ in ()).throw(OSError(ctypes.get_errno(), "openat2")))
    print("plain", oct(os.stat("/data/f").st_mode & 0o7777))
    os.chmod("/data/f", 0o755)  # without a set-ID bit: allowed
    print("plain", oct(os.stat("/data/f").st_mode & 0o7777))
""")


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_no_set_id_file_can_be_planted_in_a_shared_directory(runtime: str) -> None:
    # A set-user-ID program left in a writable share would run, for any host user who may
    # run it, as the isolate's leased uid, which a later isolate may hold (as root) or as
    # the caller (rootless). Every way to set the bit is refused, and reported where the
    # runtime watches its calls.
    from tests.conftest import require

    require(runtime)
    with shared_directory(0o777) as share:
        r = run_sharing(["python3", "-c", PLANT_SET_ID], runtime, share)
        said = dict(line.split(" ", 1) for line in r.stdout.splitlines() if not line.startswith("plain"))
        wanted = {name: "refused 1" for name in said if name != "openat2"} | {"openat2": "refused 38"}
        if runtime == "gvisor" and said.get("openat2") == "refused 1":
            wanted["openat2"] = "refused 1"  # a runsc before errnoRet answers every OCI rule with EPERM
        assert said == wanted, r.stdout + r.stderr
        assert len(said) == 7 and r.stdout.count("plain") == 2 and r.stdout.endswith("plain 0o755\n"), r.stdout
        for name in os.listdir(share):
            mode = os.stat(os.path.join(share, name)).st_mode
            assert not mode & (stat.S_ISUID | stat.S_ISGID), (name, oct(mode))
        if runtime != "gvisor":  # gVisor refuses them in its kernel without a record of it
            assert {"chmod", "fchmod", "fchmodat", "openat", "mknodat"} <= set(r.violation_counts), r.violation_counts


CONNECT_SHARED_SOCKETS = (
    "import socket\n"
    "for name in ('private', 'open'):\n"
    "    c = socket.socket(socket.AF_UNIX)\n"
    "    try:\n"
    "        c.connect('/data/' + name)\n"
    "        print(name, 'connected')\n"
    "    except OSError as exc:\n"
    "        print(name, exc.errno)\n"
)


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_shared_unix_socket_is_reached_only_when_others_may_write_it(runtime: str) -> None:
    # A host service's socket in a shared tree (read-only even): connect() needs write permission
    # on it, and the code's host uid is a leased one, no account's. Under gVisor and in a microVM
    # no host socket is passed through at all. Under process, one that others may write is
    # reached: the open defect docs/threat-model.md names (no Landlock right covers connect).
    from tests.conftest import require

    require(runtime)
    if runtime == "process" and os.geteuid() != 0:
        pytest.skip("rootless, a process isolate runs as the caller, whose own sockets it may reach")
    with shared_directory(0o755) as share, contextlib.ExitStack() as listeners:
        for name, mode in (("private", 0o755), ("open", 0o777)):
            listener = listeners.enter_context(socket.socket(socket.AF_UNIX))
            listener.bind(os.path.join(share, name))
            listener.listen(1)
            os.chmod(os.path.join(share, name), mode)
        r = run_sharing(["python3", "-c", CONNECT_SHARED_SOCKETS], runtime, share, access="ro")
        said = dict(line.split(" ", 1) for line in r.stdout.splitlines())
        assert said["private"] == str(errno.EACCES), r.summary()
        if runtime != "process":
            assert said["open"] == str(errno.ECONNREFUSED), r.summary()


def test_a_set_id_mode_asked_of_write_file_is_refused_as_the_callers_mistake(sb: Sandbox) -> None:
    # Refused by the agent, by name, before the filter would see it: not a violation of the code's.
    from stockade.protocol.models import WriteFile

    with pytest.raises(Exception, match="may be set-user-ID or set-group-ID"):
        sb.write_file("/work/tool", b"#!/bin/sh\n", mode=0o4755)
    with pytest.raises(ValueError, match="may be set-user-ID or set-group-ID"):
        WriteFile(sandbox_id="x", path="/work/tool", data="", mode=0o2755)
    r = sb.exec(["sh", "-c", "ls /work/tool 2>&1 || echo absent"])
    assert "absent" in r.stdout and not r.security_violations, r.summary()
    sb.write_file("/work/tool", b"#!/bin/sh\n", mode=0o755)


@pytest.mark.skipif(os.getuid() != 0, reason="rootless, runsc and QEMU run as their caller: nothing is leased")
@pytest.mark.parametrize("runtime", ["gvisor", "microvm"])
def test_a_daemon_under_umask_0077_still_starts_isolates_on_leased_uids(
    runtime: str, request: pytest.FixtureRequest
) -> None:
    # systemd's unit runs the daemon with UMask=0077: what it writes for runsc's gofer and for
    # QEMU (a gVisor root, a guest image written before the fix) must still be theirs to read.
    from stockade.runtimes.microvm import image
    from tests.conftest import require

    require(runtime)
    if runtime == "microvm":  # a copy of the image, written root's alone, is repaired when loaded
        found = image.find_image()
        assert found is not None  # require() built it
        copy = os.path.join(tempfile.mkdtemp(prefix="stockade-image-copy-"), "image")
        request.addfinalizer(lambda: shutil.rmtree(os.path.dirname(copy)))
        shutil.copytree(found.directory, copy)
        for path in (copy, *(os.path.join(copy, name) for name in os.listdir(copy))):
            os.chmod(path, 0o700 if os.path.isdir(path) else 0o600)
        loaded = image._load(copy)
        assert loaded is not None
        assert all(os.stat(p).st_mode & 0o777 == 0o644 for p in (loaded.kernel, loaded.initramfs))
    old = os.umask(0o077)  # images are built by `make test` before this: none is written under it
    own = RuntimeManager(pool_size=0)
    try:
        r = stockade.run(["uname", "-n"], runtime=runtime, manager=own)
    finally:
        own.close()
        os.umask(old)
    assert r.exit_code == 0 and r.stdout.strip() == "stockade", r.summary() + r.stderr


# ---- network ------------------------------------------------------------------------


def test_no_network_by_default(sb: Sandbox, host_server: int) -> None:
    r = sb.run_code(
        "import socket\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {host_server}), timeout=2); print('CONNECTED')\n"
        "except OSError as e:\n    print('refused', e.errno)"
    )
    assert r.stdout.startswith("refused")
    links = sb.exec(["cat", "/proc/net/dev"]).stdout
    assert [line.split(":")[0].strip() for line in links.splitlines()[2:]] == ["lo"]
    assert sb.exec(["cat", "/sys/class/net/lo/operstate"]).exit_code != 0  # no /sys at all


def test_loopback_policy_is_private(process_runtime: str, manager: RuntimeManager, host_server: int) -> None:
    code = (
        "import socket, threading\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "port = srv.getsockname()[1]\n"
        "threading.Thread(target=lambda: srv.accept()[0].sendall(b'inner'), daemon=True).start()\n"
        "print(socket.create_connection(('127.0.0.1', port), timeout=2).recv(5).decode())\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {host_server}), timeout=2); print('HOST')\n"
        "except OSError:\n    print('host unreachable')"
    )
    r = run(manager, code, network_policy="loopback")
    assert r.stdout.split() == ["inner", "host", "unreachable"], r.stdout + r.stderr


def test_raw_and_packet_sockets_blocked_and_reported(sb: Sandbox) -> None:
    r = sb.run_code(
        "import socket\n"
        "for fam, typ, proto in ((socket.AF_INET, socket.SOCK_RAW, 1), (socket.AF_PACKET, socket.SOCK_RAW, 0)):\n"
        "    try:\n        socket.socket(fam, typ, proto); print('OPEN')\n"
        "    except OSError as e:\n        print(e.errno)"
    )
    assert r.stdout.split() == ["1", "1"]
    assert [v.syscall for v in r.security_violations] == ["socket", "socket"]


# Each: a socket of a family or kind outside the profile's lists, and a word of the rule that refuses it.
OFF_LIST_SOCKETS = {
    "AF_VSOCK": "s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
    "s.bind((socket.VMADDR_CID_ANY, 5252)); s.listen(1)",  # the host's vsock space, not the sandbox's
    "SOCK_PACKET": "socket.socket(socket.AF_INET, 10, 0x300)",  # SOCK_PACKET, ETH_P_ALL: a packet socket
    "AF_PACKET": "socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)",
    "AF_ALG": "socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)",
    "NETLINK_ROUTE": "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)",  # generic netlink
    "SCTP": "socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)",
    "only unix sockets": "socket.socketpair(socket.AF_INET)",
}


def off_list_sockets_code() -> str:
    attempts = "".join(
        f"try:\n{textwrap.indent(code, '    ')}\n    print('OPEN')\nexcept OSError as e:\n    print(e.errno)\n"
        for code in OFF_LIST_SOCKETS.values()
    )
    return "import socket\n" + attempts


@pytest.mark.parametrize("network", ["none", "loopback"])
def test_socket_families_outside_the_list_are_refused_and_reported(
    process_runtime: str, manager: RuntimeManager, network: str
) -> None:
    r = run(manager, off_list_sockets_code(), network_policy=network)
    assert r.stdout.split() == ["1"] * len(OFF_LIST_SOCKETS), r.summary()  # EPERM, before any bind or listen
    assert [v.syscall for v in r.security_violations] == ["socket"] * (len(OFF_LIST_SOCKETS) - 1) + ["socketpair"]
    for word, v in zip(OFF_LIST_SOCKETS, r.security_violations, strict=True):
        assert v.blocked and v.detection_layer == "SECCOMP" and word in v.description, (word, v.description)


@pytest.mark.parametrize("network", ["none", "loopback"])
def test_the_sockets_ordinary_code_uses_still_work(process_runtime: str, manager: RuntimeManager, network: str) -> None:
    r = run(
        manager,
        "import socket\n"
        "print(sorted({a[4][0] for a in socket.getaddrinfo('localhost', 80)}))\n"
        "print(len(socket.getaddrinfo('localhost', 80, flags=socket.AI_ADDRCONFIG)) > 0)\n"  # netlink route
        "print([name for _, name in socket.if_nameindex()])\n"  # netlink route too
        "a, b = socket.socketpair(); a.sendall(b'pair'); print(b.recv(4).decode())\n"
        "for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):\n"
        "    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):\n"
        "        socket.socket(family, kind | socket.SOCK_NONBLOCK).close()\n"
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP).close()\n"
        "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP).close()\n"
        "u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); u.bind('/tmp/u')\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'unix', '/tmp/u'); print(u.recv(4).decode())",
        network_policy=network,
    )
    assert r.stdout.splitlines() == ["['127.0.0.1']", "True", "['lo']", "pair", "unix"], r.summary()
    assert r.security_violations == []


# Route sockets raised to the largest receive buffer, each asked for a dump it never reads: the queues
# are the kernel's memory, charged to no cgroup (a 64 MB isolate held 1.6 GiB of the host's). Then
# threads asking at once, held off the CPU by a small quota: none may find room another took.
NETLINK_FLOOD = """
import socket, struct, threading
held, refused = [], None
for i in range(64):
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    except OSError as e:
        refused = e.errno
        break
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 30)
    s.send(struct.pack("=LHHLL", 32, 18, 0x301, 1, 0) + bytes(16))  # RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP
    held.append(s)
print(len(held), refused)
for s in held:
    s.close()
raced = []
def one():
    try:
        raced.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    except OSError:
        pass
threads = [threading.Thread(target=one) for _ in range(100)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(raced))
for s in raced:
    s.close()
print([name for _, name in socket.if_nameindex()])  # and once they are closed, room again
"""


@pytest.mark.parametrize("network", ["none", "loopback"])
def test_netlink_sockets_whose_queues_no_cgroup_counts_are_held_to_a_few(
    process_runtime: str, manager: RuntimeManager, network: str
) -> None:
    from stockade.runtimes.process.netlink import MAX_OPEN

    r = run(manager, NETLINK_FLOOD, network_policy=network, memory_mb=64, cpu_limit=0.1)
    lines = r.stdout.splitlines()
    assert lines == [f"{MAX_OPEN} 38", str(MAX_OPEN), "['lo']"], r.summary()  # ENOSYS past them
    assert r.security_violations == []  # glibc's getaddrinfo opens one: no report for ordinary code


def test_a_loop_of_netlink_sockets_pays_for_the_hosts_work_on_each(
    process_runtime: str, manager: RuntimeManager
) -> None:
    """Each route socket is answered by the host's one supervisor thread after reading the isolate's
    /proc files (~50-90 us, a refusal's ~10 us), which no cgroup of the isolate's pays for. Before,
    each cost one notification of the budget, so a loop of them took a fifth of a host core or
    more; now each costs ``COST``, and the loop is held to the budget's burst and rate over it."""
    from stockade.runtimes.process.netlink import COST
    from stockade.runtimes.process.supervisor import NOTIFY_BURST, NOTIFY_PER_S

    seconds = 3.0
    code = (
        f"import socket, time\nend = time.monotonic() + {seconds}\nmade = 0\n"
        "while time.monotonic() < end:\n"
        "    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()\n"
        "    made += 1\n"
        "print(made)"
    )
    r = run(manager, code, timeout_seconds=60)
    made = int(r.stdout)
    # Its burst, then its rate, for the loop's time (and a second's slack for a slow host).
    assert 0 < made <= (NOTIFY_BURST + NOTIFY_PER_S * (seconds + 1)) / COST, made
    assert r.security_violations == []


# A thread let make a route socket whose state reads "running" may still be in its socket call (held
# off the CPU), so it is counted until it is seen in another call; one that went on spinning with
# its socket made was counted twice for good, and an isolate of 7 such processes had no room left.
NETLINK_SPINNERS = """
import os, select, socket, time
r, w = os.pipe()
children = []
for _ in range(7):
    pid = os.fork()
    if pid == 0:
        # A socket asked for while another's may still be in the making (runnable, not yet on a CPU
        # for long: a loaded host) can be refused for a moment (ENOSYS): asked again, as a lookup is.
        until = time.monotonic() + 20
        while True:
            try:
                s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
                break
            except OSError:
                if time.monotonic() > until:
                    os._exit(1)
                time.sleep(0.05)
        os.write(w, b"x")
        until = time.monotonic() + 25
        while time.monotonic() < until:
            pass
        os._exit(0)
    children.append(pid)
got, until = 0, time.monotonic() + 22
while got < 7 and select.select([r], [], [], max(0, until - time.monotonic()))[0]:
    got += len(os.read(r, 7))
time.sleep(2)  # each spinner on a CPU for far more than its socket call took
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    print("room" if got == 7 else f"only {got} of the 7 made theirs")
except OSError as e:
    print("refused", e.errno)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"""


def test_processes_spinning_with_their_netlink_socket_leave_the_room_they_do_not_use(
    process_runtime: str, manager: RuntimeManager
) -> None:
    r = run(manager, NETLINK_SPINNERS, timeout_seconds=60, pids_limit=32)
    assert r.stdout == "room\n", r.summary()  # the 8th socket: MAX_OPEN is 8


# ---- syscalls -------------------------------------------------------------------------


SYSCALL_ATTACKS = {
    "ptrace": "libc.ptrace(16, 1, 0, 0)",
    "mount": "libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)",
    "umount2": "libc.umount2(b'/proc', 2)",
    "unshare": "libc.unshare(0x10000000)",
    "setns": "libc.setns(os.open('/proc/self/ns/net', os.O_RDONLY), 0)",
    "chroot": "libc.chroot(b'/tmp')",
    "pivot_root": "libc.syscall(155, b'/tmp', b'/tmp')",
    "bpf": "libc.syscall(321, 5, 0, 0)",
    "perf_event_open": "libc.syscall(298, 0, 0, -1, -1, 0)",
    "keyctl": "libc.syscall(250, 0, 0, 0, 0, 0)",
    "userfaultfd": "libc.syscall(323, 0)",
    "io_uring_setup": "libc.syscall(425, 1, 0)",
    "kexec_load": "libc.syscall(246, 0, 0, 0, 0)",
    "reboot": "libc.syscall(169, 0xfee1dead, 672274793, 0x1234567, 0)",
    "init_module": "libc.syscall(175, 0, 0, b'')",
    "process_vm_readv": "libc.syscall(310, 1, 0, 0, 0, 0, 0)",
    "open_by_handle_at": "libc.syscall(304, 0, 0, 0)",
    "syslog": "libc.syscall(103, 3, 0, 0)",
    "clone": "libc.syscall(56, 0x20000000 | 17, 0, 0, 0, 0)",
    "ioctl": "libc.ioctl(0, 0x5412, ctypes.c_char_p(b'x'))",
    "open_tree_attr": "libc.syscall(467, -100, b'/tmp', 1, None, 0)",  # open_tree with attributes (6.15)
    "modify_ldt": "libc.syscall(154, 0, None, 0)",  # read the LDT: 0 bytes, allowed by the kernel
    "memfd_secret": "libc.syscall(447, 0)",  # memory out of the kernel's direct map
    # A filter of the code's own takes from the host's one BPF JIT budget (net.core.bpf_jit_limit).
    "seccomp": "libc.syscall(317, 0x100000001, 0, 0)",  # SET_MODE_FILTER: the kernel reads op's low 32 bits
    "prctl": "libc.prctl(22, 2, 0, 0, 0)",  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    "prlimit64": "libc.syscall(302, 1, 7, 0, 0)",  # the agent's RLIMIT_NOFILE, even read
    # The agent's scheduling: SCHED_IDLE, a CPU of its own, nice 19, the idle I/O class (3 << 13).
    "sched_setscheduler": "libc.syscall(144, 1, 5, (ctypes.c_int * 1)(0))",
    "sched_setparam": "libc.syscall(142, 1, (ctypes.c_int * 1)(0))",
    "sched_setattr": "libc.syscall(314, 1, (ctypes.c_uint * 14)(56, 5), 0)",
    "sched_setaffinity": "libc.syscall(203, 1, 8, (ctypes.c_ulong * 1)(1))",
    "setpriority": "libc.setpriority(0, 1, 19)",
    "ioprio_set": "libc.syscall(251, 1, 1, 3 << 13)",
    # SO_ATTACH_FILTER: a classic BPF program, JIT-compiled into the same budget as a seccomp filter.
    "setsockopt": "libc.setsockopt(os.open('/dev/null', 0), 1, 26, None, 0)",
}


@pytest.mark.parametrize("syscall", sorted(SYSCALL_ATTACKS))
def test_dangerous_syscall_blocked_and_reported_by_host(sb: Sandbox, syscall: str) -> None:
    r = sb.run_code(LIBC + f"rc = {SYSCALL_ATTACKS[syscall]}\nprint(rc, ctypes.get_errno())")
    rc, err = r.stdout.split()
    assert rc == "-1" and err == "1", f"{syscall} returned {rc} errno {err}"  # EPERM
    assert syscall in blocked(r)
    v = next(v for v in r.security_violations if v.syscall == syscall)
    assert v.blocked and v.detection_layer == "SECCOMP" and v.description


def test_the_kernel_command_line_is_not_shown(sb: Sandbox) -> None:
    # The host's (boot parameters, a cloud's seed URL): empty, as gVisor shows a kernel's own.
    r = sb.run_code("print(repr(open('/proc/cmdline').read()), open('/proc/self/cmdline').read() != '')")
    assert r.stdout == "'' True\n", r.summary()


def test_the_agents_scheduling_is_out_of_reach_but_the_codes_own_is_not(sb: Sandbox) -> None:
    """Lowered by the code, the agent (pid 1) would answer late or never: SCHED_IDLE, nice 19 or
    the idle I/O class for it, or for every process of the isolate's uid (the agent's too), are
    refused and reported above and here; the code's own processes take what it asks for, and
    nothing is reported of that."""
    r = sb.run_code(
        LIBC + "import os\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "os.setpriority(os.PRIO_PROCESS, 0, 19)\n"
        "print(os.sched_getscheduler(0) == os.SCHED_IDLE, len(os.sched_getaffinity(0)), os.getpriority(0, 0))\n"
        "print(libc.syscall(251, 1, 0, 3 << 13))\n"  # IOPRIO_WHO_PROCESS, itself: the idle class
        "for who in ('os.setpriority(os.PRIO_USER, 0, 19)', 'libc.syscall(251, 3, 0, 3 << 13)',"
        " 'libc.syscall(251, 2, 1, 3 << 13)', 'os.setpriority(os.PRIO_PGRP, 1, 19)'):\n"
        "    try:\n"
        "        print(eval(who), ctypes.get_errno())\n"
        "    except OSError as e:\n"
        "        print(-1, e.errno)\n"
        "print(os.getpriority(os.PRIO_PROCESS, 1))"
    )
    assert r.stdout.splitlines() == ["True 1 19", "0", "-1 1", "-1 1", "-1 1", "-1 1", "0"], r.summary()
    assert r.violation_counts == {"setpriority": 2, "ioprio_set": 2}, r.summary()


def test_the_core_limit_stays_where_a_crash_runs_no_host_helper(sb: Sandbox) -> None:
    """A core_pattern pipe (systemd-coredump, apport) runs a helper as root, outside the isolate's
    cgroups and fed its memory, for every crash at RLIMIT_CORE 0; at 1 the kernel gives the core up.
    Setting it is answered as done and does nothing, unreported (`ulimit -c 0` wants no core, and
    gets none), its new value's pointer anywhere (a low word of 0 too); reading it is allowed."""
    r = sb.run_code(
        LIBC + "import resource, subprocess\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE) == resource.prlimit(0, resource.RLIMIT_CORE) == (1, 1))\n"
        "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
        "print(libc.syscall(160, 4, (ctypes.c_ulong * 2)(0, 0)))\n"  # setrlimit itself
         + MMAP + "at = libc.mmap(0x200000000000, 4096, 3, 0x100022, -1, 0)\n"  # MAP_FIXED_NOREPLACE, zeroed
        "print(at == 0x200000000000, libc.syscall(302, 0, 4, ctypes.c_void_p(at), None))\n"
        "sh = ['sh', '-c', 'ulimit -c 0 && grep core /proc/self/limits']\n"
        "done = subprocess.run(sh, capture_output=True, text=True)\n"
        "print(done.returncode, done.stdout.split()[4:6])\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE))"
    )
    assert r.stdout.splitlines() == ["True", "0", "True 0", "0 ['1', '1']", "(1, 1)"], r.summary()
    assert r.security_violations == []


def test_no_real_time_or_raised_priority_whatever_the_host_started_it_with(process_runtime: str) -> None:
    # A host that gave stockade's service RLIMIT_RTPRIO (or RLIMIT_NICE): SCHED_FIFO code runs past
    # its CPU quota where the kernel has no real-time group scheduling.
    import resource

    before = [resource.getrlimit(r) for r in (resource.RLIMIT_RTPRIO, resource.RLIMIT_NICE)]
    try:
        resource.setrlimit(resource.RLIMIT_RTPRIO, (50, 50))  # the zygote the manager starts inherits them
        resource.setrlimit(resource.RLIMIT_NICE, (30, 30))
    except ValueError:
        resource.setrlimit(resource.RLIMIT_RTPRIO, before[0])
        pytest.skip("this host's root lacks CAP_SYS_RESOURCE: no limit can be raised to start an isolate under")
    own = RuntimeManager(pool_size=0)
    try:
        r = run(
            own,
            "import os, resource\n"
            "print(resource.getrlimit(resource.RLIMIT_RTPRIO), resource.getrlimit(resource.RLIMIT_NICE))\n"
            "try:\n    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10)); print('real-time')\n"
            "except PermissionError:\n    print('refused')",
        )
    finally:
        resource.setrlimit(resource.RLIMIT_RTPRIO, before[0])
        resource.setrlimit(resource.RLIMIT_NICE, before[1])
        own.close()
    assert r.stdout.splitlines() == ["(0, 0) (0, 0)", "refused"], r.summary()


def test_huge_pages_are_answered_as_on_a_host_without_them(sb: Sandbox) -> None:
    """hugetlb pages are charged to no memory cgroup: on a host with a pool, they held 3x an
    isolate's memory limit. The filter answers ENOMEM, as a host with no pool does, unreported (a
    database tries them, then falls back). Each call is one the kernel itself would refuse
    otherwise (a length of 0, no name): ENOMEM can only be the filter's."""
    r = sb.run_code(
        LIBC + MMAP + "for flags in (0x40022, 0x22):\n"  # MAP_PRIVATE | MAP_ANONYMOUS, with MAP_HUGETLB and without
        "    libc.mmap(None, 0, 3, flags, -1, 0); print(ctypes.get_errno())\n"
        "for flags in (4, 0):\n"  # memfd_create with MFD_HUGETLB and without, no name: EFAULT
        "    libc.syscall(319, None, flags); print(ctypes.get_errno())\n"
        "for flags in (0o4000 | 0o1000, 0o1000):\n"  # shmget IPC_CREAT, with SHM_HUGETLB and without, size 0
        "    libc.syscall(29, 0, 0, flags | 0o600); print(ctypes.get_errno())"
    )
    assert r.stdout.split() == ["12", "22", "12", "14", "12", "22"], r.summary()
    assert r.security_violations == []


def test_host_wide_kernel_budgets_are_out_of_reach(sb: Sandbox) -> None:
    """Kernel budgets one count for the whole host (no uid, namespace or cgroup share) are not the
    code's to spend: a kernel AIO context (fs.aio-max-nr: one isolate held all of it) is ENOSYS,
    as from a kernel without AIO; what stays allowed of seccomp and the limits, still works."""
    r = sb.run_code(
        LIBC + "ctx = ctypes.c_ulong(0)\n"
        "print(libc.syscall(206, 128, ctypes.byref(ctx)), ctypes.get_errno())\n"  # io_setup
        "print(libc.syscall(317, 2, 0, ctypes.byref(ctypes.c_uint(0x7FFF0000))))\n"  # GET_ACTION_AVAIL: ALLOW
        "import resource; print(resource.prlimit(0, resource.RLIMIT_NOFILE) == resource.getrlimit(7))\n"
        "print(libc.prctl(38, 1, 0, 0, 0))"  # PR_SET_NO_NEW_PRIVS
    )
    assert r.stdout.splitlines() == ["-1 38", "0", "True", "0"], r.summary()
    assert r.security_violations == []


# Loopback TCP connections whose receivers never read: bytes queued in socket buffers, up to 384 MiB.
SOCKET_BUFFERS = """
import socket, time
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(512); addr = ls.getsockname()
keep, total, chunk, started = [], 0, b"x" * 262144, time.monotonic()
while total < 384 << 20 and len(keep) < 100 and time.monotonic() - started < 20:
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 20)
    c.connect(addr); s, _ = ls.accept(); c.setblocking(False)
    stalls = 0
    while total < 384 << 20 and stalls < 3:
        try:
            total += c.send(chunk); stalls = 0
        except BlockingIOError:
            stalls += 1; time.sleep(0.01)
    keep.append((c, s))
print(total >> 20)
"""


def test_socket_buffers_are_the_isolates_memory(process_runtime: str, manager: RuntimeManager) -> None:
    """Buffers of sockets nobody reads count against memory_mb: uncharged (cgroup v1 counts them only
    once its group says so), one isolate's unread loopback connections held the host's whole
    tcp_mem, and every socket on the host, in every isolate, was cut to its minimum buffer."""
    r = run(manager, SOCKET_BUFFERS, network_policy="loopback", memory_mb=128, timeout_seconds=60)
    queued = int(r.stdout.split()[-1]) if r.stdout.strip() else 0
    # Held near its 128 MB (or the isolate ended by its memory limit): never the 384 MiB it asked for.
    assert queued < 200 or r.termination_reason == "memory_limit", r.summary()


def test_syscalls_the_profile_does_not_know_are_refused_and_reported(sb: Sandbox) -> None:
    # 337: in x86_64's hole, where the kernel put uretprobe (335) and uprobe (336); 470: past 6.18's newest.
    r = sb.run_code(
        LIBC + "for nr in (337, 470, 1000):\n    print(libc.syscall(nr, 0, 0, 0, 0, 0), ctypes.get_errno())\n"
        "print('still running')"
    )
    assert r.stdout.splitlines() == ["-1 38"] * 3 + ["still running"], r.summary()  # ENOSYS: libc falls back
    assert [v.syscall for v in r.security_violations] == ["syscall_337", "syscall_470", "syscall_1000"]
    for v in r.security_violations:
        assert v.blocked and v.detection_layer == "SECCOMP" and v.severity == "MEDIUM"
        assert "does not name" in v.description


# i386's mount (21; x86_64's 21 is access) through int 0x80, from an executable page:
# push rbx; xor ebx, ebx; xor ecx, ecx; xor edx, edx; mov eax, 21; int 0x80; pop rbx; ret.
OTHER_ABIS_CODE = (
    LIBC + "import mmap\n"
    "page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "page.write(bytes([0x53, 0x31, 0xDB, 0x31, 0xC9, 0x31, 0xD2, 0xB8, 21, 0, 0, 0, 0xCD, 0x80, 0x5B, 0xC3]))\n"
    "int80 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))\n"
    "print(int80())\n"
    "print(libc.syscall(0x40000000 | 165, None, None, None, 0, None), ctypes.get_errno())\n"  # x32's mount
    "print('still running')"
)


def check_other_abis_refused_and_reported(r: ExecResult, where: str = "") -> None:
    """Both calls failed with ENOSYS, as on a kernel without those ABIs, and each was reported by its ABI."""
    assert r.stdout.splitlines() == ["-38", "-1 38", "still running"], r.summary()
    assert [v.syscall for v in r.security_violations] == ["i386_syscall_21", "x32_syscall_165"], r.summary()
    i386, x32 = r.security_violations
    assert "int 0x80" in i386.description and "x32" in x32.description
    for v in r.security_violations:
        assert v.blocked and v.detection_layer == "SECCOMP" and v.severity == "HIGH", v
        assert "another ABI" in v.description and where in v.description, v.description


def test_calls_through_other_abis_are_refused_and_reported(sb: Sandbox) -> None:
    # The rules name x86_64's numbers. Before, int 0x80 killed the process with SIGSYS
    # and an x32 call failed with ENOSYS, and neither was reported.
    check_other_abis_refused_and_reported(sb.run_code(OTHER_ABIS_CODE))


def test_common_programs_start_without_a_violation(sb: Sandbox) -> None:
    """What the filter refuses by number must not be something libc, Python or coreutils use."""
    r = sb.exec(
        ["sh", "-c", "ls -la / >/dev/null && stat /usr >/dev/null && id -u && date +%Y >/dev/null && "
         "python3 -c 'import asyncio, ssl, sqlite3, multiprocessing, subprocess, uuid; "
         "print(subprocess.run([\"true\"]).returncode, asyncio.run(asyncio.sleep(0, \"ok\")))'"]
    )  # fmt: skip
    assert r.stdout.split() == ["1000", "0", "ok"], r.summary()
    assert r.security_violations == []


def test_plain_fork_and_threads_still_work(sb: Sandbox) -> None:
    r = sb.run_code(
        "import os, threading\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "pid = os.fork()\nif pid == 0:\n    os._exit(5)\nprint(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"
    )
    assert r.stdout.split() == ["thread", "5"] and not r.security_violations


def test_on_violation_kill_ends_the_run(process_runtime: str, manager: RuntimeManager) -> None:
    r = run(
        manager, LIBC + "libc.ptrace(16, 1, 0, 0)\nimport time; time.sleep(10)\nprint('survived')", on_violation="kill"
    )
    assert r.termination_reason == "violation" and "survived" not in r.stdout
    assert blocked(r) == {"ptrace"}
    assert r.error == "killed after a policy violation (ptrace)"  # the kill was ours: it says which call


# ---- processes and the agent --------------------------------------------------------


def test_own_pid_namespace(sb: Sandbox) -> None:
    pids = sb.exec(["sh", "-c", "ls /proc | grep -E '^[0-9]+$'"]).stdout.split()
    assert "1" in pids and len(pids) <= 6  # the agent, its spare runner, sh, ls, grep


def test_agent_cannot_be_killed_or_read(sb: Sandbox) -> None:
    r = sb.run_code(
        "import os, signal\n"
        "os.kill(1, signal.SIGKILL)\n"
        "for p in ('/proc/1/mem', '/proc/1/environ'):\n"
        "    try:\n        open(p, 'rb').read(1); print('READ', p)\n"
        "    except OSError as e:\n        print(e.errno)\n"
        "try:\n    print(os.listdir('/proc/1/fd'))\nexcept OSError as e:\n    print(e.errno)"
    )
    assert "READ" not in r.stdout and r.stdout.split() == ["13", "13", "13"], r.stdout + r.stderr
    assert sb.exec(["true"]).success  # the agent survived SIGKILL from inside


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_the_agent_heeds_no_signal_the_code_sends_it(runtime: str, manager: RuntimeManager) -> None:
    # `kill -INT 1`, `pkill python3`: Python's SIGINT handler ended the agent (pid 1 takes the signals
    # it handles), and gVisor's kernel gives its pid 1 no such shelter for the others.
    require(runtime)
    with Sandbox(Policy(runtime=runtime, timeout_seconds=120), manager=manager) as box:
        # Those that end a process, and those that stop one (TSTP TTIN TTOU), by number: 34 and 64 are
        # SIGRTMIN and SIGRTMAX (sh has no names for them).
        names = "INT TERM HUP QUIT USR1 USR2 ALRM VTALRM PROF IO PWR XCPU ABRT TRAP 16 TSTP TTIN TTOU 34 50 64"
        r = box.exec(["sh", "-c", f"for s in {names}; do kill -$s 1; done; kill -TERM -1; echo sent"])
        assert "sent" in r.stdout or r.exit_code is not None
        assert box.exec(["echo", "alive"], timeout=20).stdout == "alive\n"  # the agent is still there, not stopped
        # What it starts still has them at their defaults: SIGINT is a KeyboardInterrupt, SIGTERM ends it.
        code = "import os, signal\ntry:\n    os.kill(os.getpid(), 2)\nexcept KeyboardInterrupt:\n    print(2)\n"
        assert box.run_code(code).stdout == "2\n"
        ended = box.exec(["sh", "-c", "kill -TERM $$; echo survived"])
        assert ended.exit_code == -15 and "survived" not in ended.stdout, ended
        ended = box.exec(["sh", "-c", "kill -PWR $$; echo survived"])
        assert ended.exit_code == -30 and "survived" not in ended.stdout, ended


def test_no_inherited_descriptors(sb: Sandbox) -> None:
    r = sb.run_code("import os; print(sorted(os.listdir('/proc/self/fd')))")
    assert r.stdout.strip() == "['0', '1', '2', '3']"  # 3 is the listdir handle itself
    r = sb.exec(["sh", "-c", "ls /proc/self/fd"])
    assert r.stdout.split() == ["0", "1", "2", "3"]


def test_host_environment_does_not_leak(process_runtime: str, manager: RuntimeManager) -> None:
    os.environ["STOCKADE_TEST_SECRET"] = "hunter2"
    try:
        r = run(manager, "import os; print(sorted(os.environ))")
    finally:
        del os.environ["STOCKADE_TEST_SECRET"]
    assert "STOCKADE_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    assert eval(r.stdout) == ["HOME", "LANG", "PATH", "TMPDIR"]


def test_hostname_is_private(sb: Sandbox) -> None:
    assert sb.exec(["hostname"]).stdout.strip() == "stockade"


# ---- resources ------------------------------------------------------------------------


def test_fork_bomb_is_contained(process_runtime: str, manager: RuntimeManager) -> None:
    r = run(
        manager,
        "import os, time\ncount = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n            time.sleep(60)\n"
        "        count += 1\n    except OSError:\n        print('limit at', count); break",
        pids_limit=16,
        timeout_seconds=20,
    )
    assert r.stdout.startswith("limit at")
    assert int(r.stdout.split()[-1]) < 16


def test_memory_bomb_gives_memory_limit(process_runtime: str, manager: RuntimeManager) -> None:
    r = run(manager, "x = []\nwhile True:\n    x.append(bytearray(8 << 20))", memory_mb=64, timeout_seconds=20)
    if "memory_mb" in " ".join(r.unenforced_limits):
        pytest.skip(f"no memory cgroup here: {r.unenforced_limits}")
    assert r.termination_reason == "memory_limit" and not r.success
    assert r.resource_usage.memory_peak_mb is not None and r.resource_usage.memory_peak_mb <= 64.5


def test_timeout_even_when_sigterm_is_ignored(process_runtime: str, manager: RuntimeManager) -> None:
    started = time.monotonic()
    r = run(
        manager, "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass", timeout_seconds=1
    )
    assert r.termination_reason == "timeout"
    assert time.monotonic() - started < 30  # killed at its timeout, not left to run on


def test_output_flood_is_cut(process_runtime: str, manager: RuntimeManager) -> None:
    r = stockade.run(
        ["sh", "-c", "cat /dev/zero | tr '\\0' x"], runtime="process", manager=manager, max_output_bytes=5000
    )
    assert r.termination_reason == "output_limit"
    assert len(r.stdout) == 5000 and set(r.stdout) == {"x"}


def test_the_largest_output_cap_is_honoured(process_runtime: str, manager: RuntimeManager) -> None:
    # At the policy's maximum the agent's reply (base64) must still fit one
    # protocol frame: the run ends with output_limit, not a broken connection.
    flood = "head -c 9000000 /dev/zero | tr '\\0' o; head -c 9000000 /dev/zero | tr '\\0' e >&2"
    r = stockade.run(["sh", "-c", flood], runtime="process", manager=manager, max_output_bytes=MAX_OUTPUT_BYTES)
    assert r.termination_reason == "output_limit", r.summary()
    assert len(r.stdout) + len(r.stderr) == MAX_OUTPUT_BYTES


def test_input_beyond_a_frame_is_refused_before_it_is_sent(sb: Sandbox) -> None:
    too_big = b"x" * (MAX_DATA_BYTES + 1024 * 1024)
    for call in (lambda: sb.exec(["wc", "-c"], stdin=too_big), lambda: sb.write_file("/work/big", too_big)):
        with pytest.raises(stockade.SandboxError, match="too large"):
            call()
    assert sb.exec(["wc", "-c"], stdin=b"x" * MAX_DATA_BYTES).stdout.strip() == str(MAX_DATA_BYTES)


def test_write_file_takes_7_mib_and_not_a_byte_more(sb: Sandbox) -> None:
    # docs/sdk.md: a write_file over 7 MiB is refused. 7 MiB + 1 still fits a frame, so
    # only a check of its own refuses it.
    sb.write_file("/work/seven", b"7" * MAX_CALL_BYTES)
    assert len(sb.read_file("/work/seven")) == MAX_CALL_BYTES == 7 * 1024 * 1024
    with pytest.raises(stockade.SandboxError, match=f"too large: {MAX_CALL_BYTES + 1} bytes.* {MAX_CALL_BYTES} "):
        sb.write_file("/work/more", b"7" * (MAX_CALL_BYTES + 1))
    assert not any(e["name"] == "more" for e in sb.list_dir("/work"))  # refused before anything was sent


def test_stdin_and_code_take_7_mib_and_not_a_byte_more(sb: Sandbox, manager: RuntimeManager) -> None:
    # docs/sdk.md: stdin and code share write_file's 7 MiB. Before, 7 MiB + 1 went through,
    # up to the 10 MiB frame.
    assert sb.exec(["wc", "-c"], stdin=b"7" * MAX_CALL_BYTES).stdout.strip() == str(MAX_CALL_BYTES)
    head = "print('seven')\n#"
    assert sb.run_code(head + "7" * (MAX_CALL_BYTES - len(head))).stdout == "seven\n"  # 7 MiB of code, to the byte

    def refused(field: str, size: int) -> str:
        return f"{field} is too large: {size} bytes, and a call takes at most {MAX_CALL_BYTES} "

    over, text_over = b"7" * (MAX_CALL_BYTES + 1), "7" * (MAX_CALL_BYTES + 1)
    for call in (
        lambda: sb.exec(["wc", "-c"], stdin=over),
        lambda: sb.exec(["wc", "-c"], stdin=text_over),
        lambda: sb.run_code("print(1)", stdin=over),
        lambda: stockade.run(["wc", "-c"], stdin=over, runtime="process", manager=manager),
    ):
        with pytest.raises(stockade.SandboxError, match=refused("stdin", MAX_CALL_BYTES + 1)):
            call()
    # Code is counted in bytes, as sent: half as many two-byte characters plus one are over.
    wide = "\u00e9" * (MAX_CALL_BYTES // 2 + 1)
    for code, size in ((text_over, MAX_CALL_BYTES + 1), (wide, MAX_CALL_BYTES + 2)):
        with pytest.raises(stockade.SandboxError, match=refused("code", size)):
            sb.run_code(code)
        with pytest.raises(stockade.SandboxError, match=refused("code", size)):
            stockade.run_code(code, runtime="process", manager=manager)

    async def held_async() -> None:
        async with stockade.AsyncSandbox(Policy(runtime="process"), manager=manager) as asb:
            with pytest.raises(stockade.SandboxError, match=refused("code", MAX_CALL_BYTES + 1)):
                await asb.run_code(text_over)
            with pytest.raises(stockade.SandboxError, match=refused("stdin", MAX_CALL_BYTES + 1)):
                await asb.exec(["wc", "-c"], stdin=over)
            assert (await asb.exec(["true"])).success

    asyncio.run(held_async())
    r = sb.exec(["true"])
    assert r.success and r.termination_reason == "completed", r.summary()  # refused before anything was sent


def test_cpu_limit_is_applied(process_runtime: str, manager: RuntimeManager) -> None:
    r = run(
        manager,
        "import threading, time\nend = time.monotonic() + 1.0\n"
        "def spin():\n    while time.monotonic() < end: pass\n"
        "ts = [threading.Thread(target=spin) for _ in range(2)]\n[t.start() for t in ts]; [t.join() for t in ts]",
        cpu_limit=0.2,
        timeout_seconds=20,
    )
    if "cpu_limit" in " ".join(r.unenforced_limits):
        pytest.skip(f"no cpu cgroup here: {r.unenforced_limits}")
    assert r.resource_usage.cpu_seconds is not None
    # two spinning threads for 1 s of wall time, at most 0.2 cores: far below 2 cpu seconds
    assert r.resource_usage.cpu_seconds < 0.6, r.resource_usage


# ---- leftovers ----------------------------------------------------------------------


def test_daemonised_grandchildren_die_with_a_one_shot(process_runtime: str, manager: RuntimeManager) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.5"
    r = stockade.run(["sh", "-c", f"(setsid sleep {marker} &) ; echo started"], runtime="process", manager=manager)
    assert r.stdout == "started\n"
    manager.get("process").wait_idle()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while processes_with_arg(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with_arg(marker) == []


def test_close_leaves_nothing_behind(process_runtime: str, manager: RuntimeManager) -> None:
    with open("/proc/self/mountinfo") as f:
        mounts_before = f.read()
    sandbox = Sandbox(Policy(runtime="process"), manager=manager)
    inner = sandbox._sandbox
    cgroup_dirs = list(inner.cgroup.dirs.values()) if inner.cgroup else []  # type: ignore[attr-defined]
    marker = f"{random.randrange(10**6, 10**7)}.25"
    sandbox.exec(["sh", "-c", f"(sleep {marker} &); echo"])
    assert processes_with_arg(marker)
    sandbox.close()
    deadline = time.monotonic() + 30  # killed by the close; on a loaded host the dying may take a while
    while processes_with_arg(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with_arg(marker) == []
    # A group whose processes were still dying when the close stopped waiting is kept to be removed
    # later (at the next isolate's start, or the runtime's close): as they do, here.
    cgroups.retry_leftovers(wait_s=30)
    for d in cgroup_dirs:
        assert not os.path.exists(d), d
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts_before


def test_killing_everything_inside_leaves_the_sandbox_usable(sb: Sandbox) -> None:
    # kill -9 -1 reaches every process of the uid in the namespace: the spare runner too.
    sb.exec(["sh", "-c", "kill -9 -1"])
    r = sb.run_code("print('still here')")
    assert r.stdout == "still here\n"
    assert sb.exec(["echo", "and here"]).stdout == "and here\n"


def test_a_fifo_or_device_in_place_of_a_file_does_not_hang_the_agent(sb: Sandbox) -> None:
    # The code plants a FIFO (with nobody at its other end) and a symlink to a
    # device where the host will read and write files: a plain open would block
    # the agent until the host gave up on the sandbox.
    assert sb.exec(["sh", "-c", "mkfifo /work/pipe && ln -s /dev/zero /work/zero"]).success
    started = time.monotonic()
    for call in (lambda: sb.read_file("/work/pipe"), lambda: sb.write_file("/work/pipe", "x"),
                 lambda: sb.read_file("/work/zero"), lambda: sb.write_file("/work/zero", "x")):  # fmt: skip
        with pytest.raises(stockade.AgentError):
            call()
    assert time.monotonic() - started < 20  # refused at once, not after the host's 30 s for each
    sb.write_file("/work/ok.txt", "fine")
    assert sb.read_file("/work/ok.txt") == b"fine"


def test_concurrent_sandboxes_get_only_their_own_violations(process_runtime: str, manager: RuntimeManager) -> None:
    # One supervisor thread answers every isolate's seccomp notifications: no cross-talk.
    calls = {"ptrace": "libc.ptrace(16, 1, 0, 0)", "mount": "libc.mount(b'x', b'/tmp', b'tmpfs', 0, None)",
             "bpf": "libc.syscall(321, 5, 0, 0)", "syslog": "libc.syscall(103, 3, 0, 0)"}  # fmt: skip
    results: dict[str, ExecResult] = {}

    def one(name: str) -> None:
        results[name] = run(
            manager, LIBC + "import time\nfor _ in range(5):\n    " + calls[name] + "\n    time.sleep(0.01)"
        )

    threads = [threading.Thread(target=one, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name, r in results.items():
        assert [v.syscall for v in r.security_violations] == [name] * 5, (name, r.security_violations)
