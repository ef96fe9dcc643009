"""Nothing the host holds is in an isolate's memory, on any runtime.

Code in an isolate can read every byte of its own address space without a
single syscall that a filter could see (the environment block on its stack,
heap a parent left behind before fork). So the test plants canaries where the
host keeps secrets — the caller's environment, the daemon's HMAC token, the
caller's own memory — and then scans, from inside, every readable mapping of
every process the isolate can see. A control canary handed to the code on
purpose (its environment) must be found, or the scan proves nothing.

The canaries are never written into the code: it looks for a prefix and
reports what follows, and the host compares. Also checked: each process
isolate has its own address-space layout and stack canary, and nothing inside
shows the host's install path of stockade.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator

import pytest

import stockade
from stockade.client import Client
from stockade.runtimes.hosted import HostedSandbox
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require
from tests.daemon_harness import start_daemon

PREFIX = "STKCANARY" + "-"  # written in two parts, so this file's own text never matches a secret

# Scans every readable mapping of every process it sees and prints what follows
# each PREFIX. Its own memory is read through a pipe (libc write() from the
# mapping: a page that cannot be read is EFAULT, not a crash), since a runner is
# not dumpable and /proc/self/mem is refused; the others' through /proc/<pid>/mem.
SCANNER = r"""
import ctypes, fcntl, json, os, re
prefix = ("STKCANARY" + "-").encode()
pattern = re.compile(re.escape(prefix) + rb"([0-9a-f]{32})")
libc = ctypes.CDLL(None, use_errno=True)
libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
libc.write.restype = ctypes.c_ssize_t
pipe_r, pipe_w = os.pipe()
chunk = fcntl.fcntl(pipe_w, 1031, 1 << 20)  # F_SETPIPE_SZ
found, scanned, refused = set(), 0, []

def own(start, end):
    parts, at = [], start
    while at < end:
        n = libc.write(pipe_w, at, min(chunk, end - at))
        if n <= 0:
            break
        data = b""
        while len(data) < n:
            data += os.read(pipe_r, n - len(data))
        parts.append(data)
        at += n
    return b"".join(parts)

def other(mem, start, end):
    try:
        return os.pread(mem, end - start, start)
    except OSError:
        return b""

for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    mine = int(pid) == os.getpid()
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = None if mine else os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as exc:
        refused.append([pid, exc.errno])
        continue
    for line in maps:
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if "r" not in fields[1] or end - start > 1 << 28 or "[vvar" in line:
            continue
        data = own(start, end) if mine else other(mem, start, end)
        scanned += len(data)
        found.update(m.decode() for m in pattern.findall(data))
    if mem is not None:
        os.close(mem)
print(json.dumps({"found": sorted(found), "scanned": scanned, "refused": refused}))
"""

# Held by the caller for the whole module: a secret in the host process's memory.
CALLER_SECRET = (PREFIX + secrets.token_hex(16)).encode()


def _canary() -> tuple[str, str]:
    """A planted value and the 32 hex digits the scanner reports for it."""
    tail = secrets.token_hex(16)
    return PREFIX + tail, tail


def _scan(result: stockade.ExecResult) -> dict[str, object]:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.error)
    report = json.loads(result.stdout)
    assert report["scanned"] > 0
    return report


@pytest.fixture
def host_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret in the caller's environment, planted before any runtime starts."""
    value, tail = _canary()
    monkeypatch.setenv("STOCKADE_TEST_HOST_SECRET", value)
    return tail


@pytest.fixture
def fresh_manager(host_secret: str) -> Iterator[RuntimeManager]:
    manager = RuntimeManager(pool_size=1)  # started after the secret was planted
    yield manager
    manager.close()


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_no_host_secret_in_any_readable_memory(runtime: str, host_secret: str, fresh_manager: RuntimeManager) -> None:
    require(runtime)
    control, control_tail = _canary()
    caller_tail = CALLER_SECRET.decode()[len(PREFIX) :]
    # Twice: the first may be built on demand, the second comes from the pool
    # (the process runtime's zygote spare, or a pooled isolate).
    for _ in range(2):
        result = stockade.run_code(
            SCANNER, manager=fresh_manager, runtime=runtime, environment={"CONTROL": control}, timeout_seconds=120
        )
        report = _scan(result)
        found = set(report["found"])  # type: ignore[arg-type]
        assert control_tail in found, f"the scan did not find its own control canary: {report}"
        assert host_secret not in found, "the caller's environment is readable inside the isolate"
        assert caller_tail not in found, "the caller's memory is readable inside the isolate"


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_no_daemon_token_in_an_isolate_it_starts(runtime: str) -> None:
    require(runtime)
    token, token_tail = _canary()
    daemon = start_daemon({"STOCKADE_AUTH_TOKEN": token})
    control, control_tail = _canary()
    policy = {"runtime": runtime, "environment": {"CONTROL": control}, "timeout_seconds": 120}
    with Client(daemon.socket_path, auth_token=token, timeout=180) as client:
        for _ in range(2):  # built on demand, then from the daemon's pool
            result = client.execute(code=SCANNER, policy=policy)
            found = set(_scan(result)["found"])  # type: ignore[arg-type]
            assert control_tail in found
            assert token_tail not in found, "the daemon's token is readable inside its isolate"


LAYOUT = r"""
import ctypes, json
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
stack = next(l.split("-")[0] for l in open("/proc/self/maps") if "[stack]" in l)
at_random = libc.getauxval(25)  # AT_RANDOM: the 16 bytes the stack canary is taken from
print(json.dumps({"libc": ctypes.cast(libc.printf, ctypes.c_void_p).value, "stack": stack,
                  "random": ctypes.string_at(at_random, 16).hex()}))
"""


def test_each_process_isolate_has_its_own_layout_and_canary(process_runtime: str) -> None:
    seen = [json.loads(stockade.run_code(LAYOUT).stdout) for _ in range(4)]
    for key in ("libc", "stack", "random"):
        values = [s[key] for s in seen]
        assert len(set(values)) == len(values), f"isolates share their {key}: {values}"


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_the_host_install_path_is_not_visible_inside(runtime: str) -> None:
    require(runtime)
    install = os.path.dirname(os.path.dirname(os.path.abspath(stockade.__file__)))
    code = (
        "import sys, os\n"
        "print(open('/proc/1/cmdline').read())\n"
        "print(open('/proc/self/mountinfo').read())\n"
        "print(sys.path)\n"
        "print([getattr(m, '__file__', '') for m in list(sys.modules.values())])\n"
        "raise RuntimeError('where am I')\n"
    )
    result = stockade.run_code(code, runtime=runtime, timeout_seconds=120)
    assert "RuntimeError: where am I" in result.stderr
    seen = result.stdout + result.stderr
    assert install not in seen
    assert "site-packages/stockade" not in seen and "/src/stockade" not in seen
    assert 'File "<stdin>", line 6' in result.stderr
    assert "agent/server.py" not in result.stderr  # the agent's own frames are not the code's


@pytest.mark.parametrize("runtime", ["gvisor", "microvm"])
def test_the_programs_that_hold_an_isolate_start_without_the_callers_environment(
    runtime: str, host_secret: str, fresh_manager: RuntimeManager
) -> None:
    """runsc and QEMU hold the isolate's memory: a program that escaped into
    them must not find the caller's secrets there either."""
    require(runtime)
    sandbox = fresh_manager.get(runtime).start(stockade.Policy())
    try:
        assert isinstance(sandbox, HostedSandbox)
        with open(f"/proc/{sandbox.proc.pid}/environ", "rb") as f:
            environ = f.read()
        assert b"PATH=" in environ
        assert host_secret.encode() not in environ
    finally:
        sandbox.close()
