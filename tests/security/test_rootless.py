"""Rootless mode: stockade run by an ordinary user still confines, and says what it cannot enforce.

CI runs as root, so the test switches to uid 65534 in a child process that
imports stockade from a world-readable copy of the package and its
dependencies (the checkout itself may sit in a private home directory).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import stockade
from stockade.result import validate

NOBODY = 65534
PACKAGES = ["stockade", "pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection",
            "h11", "dns", "pydantic_settings", "dotenv", "msgpack", "cbor2", "cryptography", "cffi",
            "_cffi_backend"]  # fmt: skip

CHILD = r"""
import json, os, stockade
from stockade.runtimes.manager import RuntimeManager
m = RuntimeManager(pool_size=0)
r = stockade.run(["sh", "-c", "id -u; grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status; ls /root 2>&1"],
                 runtime="process", manager=m)
v = stockade.run_code("import ctypes; ctypes.CDLL(None).unshare(0x10000000)", runtime="process", manager=m)
from stockade.runtimes.process.cgroup_layout import detect_layout
# The egress proxy, rootless: its sockets come from the isolate's own setup, no setns needed.
e = stockade.run_code(
    "import socket, urllib.request\n"
    "try:\n    urllib.request.urlopen('http://not-allowed.example/', timeout=10)\n"
    "except Exception as exc:\n    print(exc)\n"
    "try:\n    socket.getaddrinfo('not-allowed.example', 80)\nexcept OSError as exc:\n    print('no name')\n",
    runtime="process", manager=m, network_policy="allowlist", allowed_hosts=["example.com"])
print(json.dumps({"uid": os.getuid(), "result": r.to_dict(), "limits": sorted(detect_layout().limits),
                  "violations": [x.syscall for x in v.security_violations], "egress": e.to_dict()}))
m.close()
"""


@pytest.fixture(scope="module")
def portable_site() -> Iterator[str]:
    site = tempfile.mkdtemp(prefix="stockade-rootless-")
    os.chmod(site, 0o755)
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        origin = Path(module.__file__ or "")
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, Path(site) / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, site)
    for root, dirs, files in os.walk(site):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    yield site
    shutil.rmtree(site)


def test_rootless_run_is_confined_and_honest(process_runtime: str, portable_site: str) -> None:
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root; this session already runs rootless")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": portable_site, "HOME": "/nonexistent", "XDG_RUNTIME_DIR": "/tmp"}
    out = subprocess.run(
        ["/usr/bin/python3", "-c", CHILD],
        env=env,
        cwd="/",
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["uid"] == NOBODY
    result = validate(stockade.ExecResult, report["result"])
    lines = result.stdout.splitlines()
    assert lines[0] == "1000"
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines and "Seccomp:\t2" in lines
    assert "No such file or directory" in lines[-1]
    assert report["violations"] == ["unshare"]
    egress = validate(stockade.ExecResult, report["egress"])
    assert egress.stdout == "HTTP Error 403: Forbidden\nno name\n", egress.stderr
    assert {(r.host, r.scheme, r.allowed) for r in egress.egress_requests} == {
        ("not-allowed.example", "http", False),
        ("not-allowed.example", "dns", False),
    }
    # Where no cgroup is delegated to this user, the run must say so, not drop limits silently.
    memory_unenforced = any("memory_mb" in item for item in result.unenforced_limits)
    assert memory_unenforced == ("memory" not in report["limits"]), (report["limits"], result.unenforced_limits)


QEMU_CHILD = r"""
import json, os, subprocess, sys, tempfile, time
from stockade import Policy
from stockade.runtimes.host_program import spawn_in_cgroup
from stockade.runtimes.microvm import jail

work = tempfile.mkdtemp()
secret = os.path.join(work, "secret")
with open(secret, "w") as f:
    f.write("mine")
os.chmod(secret, 0o600)  # this user's own file: only Landlock keeps QEMU from it
marker = os.path.join(work, "spawned")
rundir = tempfile.mkdtemp()

def qemu(confined, *messages):
    argv = [sys.argv[1], "-M", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
    if confined:
        argv[:0] = jail.prefix(None, "tcg")
        argv += ["-sandbox", jail.SECCOMP]
        rules = jail.file_rules(Policy(), sys.argv[1], rundir, rundir, ())
        proc = spawn_in_cgroup(argv, None, **pipes, label="stockade-microvm", landlock=rules, listens_only=True)
    else:
        proc = subprocess.Popen(argv, **pipes)
    answers = []
    try:
        proc.stdout.readline()
        for m in ({"execute": "qmp_capabilities"}, *messages):
            proc.stdin.write(json.dumps(m).encode() + b"\n")
            proc.stdin.flush()
            answers.append(json.loads(proc.stdout.readline() or "{}"))
        time.sleep(0.5)
        if proc.poll() is None:
            proc.stdin.write(b'{"execute": "quit"}\n')
            proc.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass
    return answers, proc.wait(timeout=30)

disk = {"execute": "blockdev-add",
        "arguments": {"driver": "file", "node-name": "d", "filename": secret, "read-only": True}}
spawn = {"execute": "migrate", "arguments": {"uri": "exec:touch " + marker}}
out = {"uid": os.getuid(), "namespaces": bool(jail.namespaces())}
out["free_disk"] = qemu(False, disk)[0][-1]
out["jailed_disk"] = qemu(True, disk)[0][-1]
out["jailed_spawn_rc"] = qemu(True, spawn)[1]
out["spawned"] = os.path.exists(marker)
import shutil
shutil.rmtree(work)
shutil.rmtree(rundir)
print(json.dumps(out))
"""


def test_rootless_qemu_jail_still_holds(portable_site: str) -> None:
    """Unprivileged, QEMU's namespaces come from a user namespace and Landlock from a
    thread with no_new_privs of its own: the jail's attacks fail there too."""
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root; this session already runs rootless")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt install qemu-system-x86)")
    from stockade.runtimes.microvm import jail

    if not jail.seccomp_supported(qemu) or not jail.LANDLOCK_ABI:
        pytest.skip("this QEMU has no seccomp or this kernel no Landlock")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": portable_site, "HOME": "/nonexistent", "TMPDIR": "/tmp"}
    out = subprocess.run(
        ["/usr/bin/python3", "-c", QEMU_CHILD, qemu],
        env=env, cwd="/", user=NOBODY, group=NOBODY, extra_groups=[],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["uid"] == NOBODY
    assert "return" in report["free_disk"], "the attack itself does not work: the test would prove nothing"
    assert "Permission denied" in str(report["jailed_disk"]), report
    assert report["jailed_spawn_rc"] == -31 and not report["spawned"], report


# As the daemon's own user, with its token: a run through it, and its memory and environment read.
DAEMON_PEER = r"""
import json, sys
from stockade.client import Client
out = {"stdout": Client(sys.argv[1]).execute(code="print(6 * 7)").stdout}
for what in ("environ", "mem"):
    try:
        with open(f"/proc/{sys.argv[2]}/{what}", "rb") as f:
            out[what] = "read: " + repr(f.read(64))
    except OSError as exc:
        out[what] = exc.strerror
print(json.dumps(out))
"""


def test_a_rootless_daemons_memory_is_closed_to_its_own_uid(process_runtime: str, portable_site: str) -> None:
    # Without root, its egress workers run as its uid: one taken over through the proxy could read
    # the daemon's environment (its token) and memory (every sandbox's secrets) through /proc.
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root; this session already runs rootless")
    where = tempfile.mkdtemp(prefix="stockade-rootless-daemon-")
    os.chown(where, NOBODY, NOBODY)
    sock = os.path.join(where, "d.sock")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": portable_site, "HOME": "/nonexistent", "XDG_RUNTIME_DIR": "/tmp",
           "STOCKADE_SOCKET": sock, "STOCKADE_AUDIT_LOG": os.path.join(where, "audit.log"),
           "STOCKADE_POOL_SIZE": "0", "STOCKADE_AUTH_TOKEN": "canary-token-7a41"}  # fmt: skip
    daemon = subprocess.Popen(
        ["/usr/bin/python3", "-m", "stockade.cli", "serve"], env=env, cwd="/", user=NOBODY, group=NOBODY,
        extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert daemon.poll() is None, daemon.stderr.read().decode() if daemon.stderr else ""
            assert time.monotonic() < deadline, "the rootless daemon did not start"
            time.sleep(0.05)
        out = subprocess.run(
            ["/usr/bin/python3", "-c", DAEMON_PEER, sock, str(daemon.pid)],
            env=env, cwd="/", user=NOBODY, group=NOBODY, extra_groups=[],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen == {"stdout": "42\n", "environ": "Permission denied", "mem": "Permission denied"}, seen
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(where)


# An environment built and removed by an ordinary user: its directories are read-only once built.
ENV_CHILD = r"""
import json
from stockade import environments
built = environments.build(["stockade-rootless-probe"], name="rootless")
listed = [e.id for e in environments.listing()]
print(json.dumps({"built": built, "listed": listed, "removed": environments.remove("rootless"),
                  "after": [e.id for e in environments.listing()]}))
"""


def test_a_rootless_user_builds_and_removes_an_environment(portable_site: str, tmp_path: Path) -> None:
    # A built tree's directories are 0555 before it is moved into the store, and moving a directory
    # to another takes writing to itself (its ".."): only root got past it, so every rootless build
    # and removal failed with EACCES.
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root; this session already runs rootless")
    from tests.integration.test_environments import _wheel

    where = tempfile.mkdtemp(prefix="stockade-rootless-env-")
    try:
        os.chmod(where, 0o755)
        links = Path(where) / "links"
        links.mkdir(mode=0o755)
        _wheel(links, "stockade-rootless-probe")
        for wheel in links.iterdir():
            wheel.chmod(0o644)
        store = Path(where) / "store"
        store.mkdir()
        os.chown(store, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": portable_site, "HOME": "/nonexistent", "TMPDIR": "/tmp",
               "STOCKADE_ENV_STORE": str(store), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links),
               "PIP_NO_CACHE_DIR": "1"}  # fmt: skip
        out = subprocess.run(
            ["/usr/bin/python3", "-c", ENV_CHILD], env=env, cwd="/", user=NOBODY, group=NOBODY, extra_groups=[],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout)
        assert report["listed"] == [report["built"]] and report["after"] == [], report
        assert report["removed"] == f"removed rootless and its environment {report['built'][:12]}", report
    finally:
        subprocess.run(["rm", "-rf", "--", where], check=False, timeout=120)
