"""Attacks on the gvisor runtime's boundaries, and its leftovers."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import stockade
from stockade import ExecResult, Policy, Sandbox
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.process import cgroups as process_cgroups
from tests.conftest import require
from tests.helpers import processes_with_arg, shared_directory


@pytest.fixture
def gvisor(manager: RuntimeManager) -> str:
    require("gvisor")
    return "gvisor"


@pytest.fixture
def sb(gvisor: str, manager: RuntimeManager) -> Iterator[Sandbox]:
    with Sandbox(Policy(runtime="gvisor", timeout_seconds=30), manager=manager) as sandbox:
        yield sandbox


def run(manager: RuntimeManager, code: str, **policy: object) -> ExecResult:
    policy.setdefault("timeout_seconds", 30)
    return stockade.run_code(code, runtime="gvisor", manager=manager, **policy)


LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def test_unprivileged_without_capabilities(sb: Sandbox) -> None:
    status = sb.exec(["cat", "/proc/self/status"]).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "1000"
    assert fields["CapEff"].strip() == "0000000000000000"
    # gVisor's status file has no NoNewPrivs line: ask prctl(PR_GET_NO_NEW_PRIVS).
    assert sb.run_code(LIBC + "print(libc.prctl(39, 0, 0, 0, 0))").stdout.strip() == "1"


def test_host_files_are_invisible(sb: Sandbox) -> None:
    marker = f"/tmp/stockade-gv-marker-{random.randrange(10**9)}"
    with open(marker, "w") as f:
        f.write("secret")
    try:
        code = (
            f"import os\nfor p in ('/root', '/home', '/etc/shadow', '/var', '{marker}'):\n    print(os.path.exists(p))"
        )
        assert set(sb.run_code(code).stdout.split()) == {"False"}
    finally:
        os.unlink(marker)


def test_read_only_root_and_usr(sb: Sandbox) -> None:
    for path in ("/usr/x", "/etc/passwd", "/newdir"):
        r = sb.run_code(f"open({path!r}, 'w')")
        assert r.exit_code == 1 and ("Read-only" in r.stderr or "Permission denied" in r.stderr), r.stderr


def test_it_is_really_gvisor(sb: Sandbox) -> None:
    # gVisor's own kernel answers, not the host's.
    out = sb.exec(["cat", "/proc/version"]).stdout
    with open("/proc/version") as f:
        assert out != f.read()


def test_host_network_unreachable(sb: Sandbox, host_server: int) -> None:
    r = sb.run_code(
        "import socket\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {host_server}), timeout=2); print('CONNECTED')\n"
        "except OSError as e:\n    print('refused')"
    )
    assert r.stdout.strip() == "refused"
    interfaces = [line.split(":")[0].strip() for line in sb.exec(["cat", "/proc/net/dev"]).stdout.splitlines()[2:]]
    assert interfaces == ["lo"]


@pytest.mark.parametrize(
    ("syscall", "call"),
    [
        ("mount", "libc.mount(b'x', b'/tmp', b'tmpfs', 0, None)"),
        ("ptrace", "libc.ptrace(16, 1, 0, 0)"),
        ("kexec_load", "libc.syscall(246, 0, 0, 0, 0)"),
        ("bpf", "libc.syscall(321, 5, 0, 0)"),
        ("init_module", "libc.syscall(175, 0, 0, b'')"),
    ],
)
def test_dangerous_syscalls_fail_and_gvisor_reports_them(sb: Sandbox, syscall: str, call: str) -> None:
    r = sb.run_code(LIBC + f"print({call}, ctypes.get_errno())")
    rc, errno_ = r.stdout.split()
    assert rc == "-1" and errno_ in ("1", "38"), r.stdout  # EPERM, or ENOSYS where gVisor has no such call
    found = [v for v in r.security_violations if v.syscall == syscall]
    assert found and found[0].detection_layer == "GVISOR" and found[0].blocked


def test_namespace_tricks_stay_inside_gvisor(sb: Sandbox) -> None:
    r = sb.run_code(LIBC + "print(libc.unshare(0x10000000), open('/proc/self/status').read().count('CapEff'))")
    reports = [v for v in r.security_violations if v.syscall == "unshare"]
    assert reports and reports[0].detection_layer == "GVISOR"
    if not reports[0].blocked:  # allowed by gVisor's own kernel: the report must say it never reached the host
        assert "never reached the host" in reports[0].description


def test_a_namespace_made_by_clone_is_refused_as_the_process_runtime_refuses_it(sb: Sandbox) -> None:
    # Only unshare is traced: clone with CLONE_NEWUSER made a namespace (root in it) no report named.
    r = sb.run_code(
        LIBC + "import os, threading\nrc = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)\n"
        "if rc == 0:\n    os._exit(0)\nprint(rc, ctypes.get_errno())\n"
        "pid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
        "thread = threading.Thread(target=print, args=('thread',))\nthread.start()\nthread.join()"  # by clone3
    )
    assert r.stdout.split() == ["-1", "1", "7", "thread"], r.summary()  # EPERM; a plain fork and a thread work
    assert not any(v.syscall == "clone" and not v.blocked for v in r.security_violations), r.security_violations


@pytest.mark.skipif(os.geteuid() != 0, reason="rootless, runsc and the code are the caller's uid (threat-model.md)")
def test_a_read_only_share_stays_read_only_for_code_in_a_user_namespace(gvisor: str, manager: RuntimeManager) -> None:
    # gVisor lets code make a user namespace (no privilege needed) and mount a share again
    # read-write there; the gofer had bound it as it came (Linux ignores "ro" on a first bind),
    # so its writes reached the host. Now the host's kernel holds it read-only.
    with shared_directory(0o777) as share, shared_directory(0o755) as parent:
        host_file = os.path.join(share, "kept")
        with open(host_file, "w") as f:
            f.write("as it was\n")
        os.chmod(host_file, 0o666)
        single = os.path.join(parent, "single")  # a file shared alone, writable by all
        with open(single, "w") as f:
            f.write("one file\n")
        os.chmod(single, 0o666)
        script = (
            "mount -o remount,bind,rw /mnt/ro && echo remounted; mount -o remount,bind,rw /mnt/one.txt; "
            "echo written >> /mnt/ro/kept; touch /mnt/ro/planted; echo written >> /mnt/one.txt; true"
        )
        r = run(
            manager,
            f"import subprocess\nr = subprocess.run(['unshare', '-Urm', 'sh', '-c', {script!r}], capture_output=True,"
            " text=True)\nprint(r.stdout, r.stderr)",
            filesystem_access=[f"{share}:/mnt/ro", f"{single}:/mnt/one.txt"],
        )
        assert "remounted" in r.stdout, r.summary()  # gVisor's own kernel let it mount again
        assert r.stdout.count("Read-only file system") == 3, r.summary()  # the host's refused each write
        assert os.listdir(share) == ["kept"]
        with open(host_file) as f:
            assert f.read() == "as it was\n"
        with open(single) as f:
            assert f.read() == "one file\n"
        # A writable share beside it is still written.
        with shared_directory(0o777) as writable:
            w = run(manager, "open('/mnt/rw/made', 'w').write('yes')", filesystem_access=[f"{writable}:/mnt/rw:rw"])
            assert w.success and os.path.exists(os.path.join(writable, "made")), w.summary()


def test_fork_bomb_contained(gvisor: str, manager: RuntimeManager) -> None:
    r = run(
        manager,
        "import os, time\ncount = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n            time.sleep(60)\n"
        "        count += 1\n    except OSError:\n        print('limit at', count); break",
        pids_limit=16,
    )
    assert r.stdout.startswith("limit at") and int(r.stdout.split()[-1]) < 16


def test_memory_bomb(gvisor: str, manager: RuntimeManager) -> None:
    r = run(manager, "x = []\nwhile True:\n    x.append(bytearray(8 << 20))", memory_mb=128)
    assert r.termination_reason == "memory_limit" and not r.success


def test_timeout(gvisor: str, manager: RuntimeManager) -> None:
    r = run(
        manager, "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass", timeout_seconds=1
    )
    assert r.termination_reason == "timeout"


def test_disk_cap(gvisor: str, manager: RuntimeManager) -> None:
    r = run(manager, "open('/tmp/f', 'wb').write(b'x' * (20 << 20))", disk_mb=8)
    assert r.exit_code == 1 and "No space left" in r.stderr


def test_close_leaves_nothing_behind(gvisor: str, manager: RuntimeManager) -> None:
    sandbox = Sandbox(Policy(runtime="gvisor"), manager=manager)
    inner = sandbox._sandbox
    container_id, bundle, root = inner.container_id, inner.bundle, inner.root  # type: ignore[attr-defined]
    cgroups = list(inner.cgroup.dirs.values()) if inner.cgroup else []  # type: ignore[attr-defined]
    sandbox.exec(["sh", "-c", "(sleep 600 &) ; echo"])
    assert processes_with_arg(container_id)
    sandbox.close()
    deadline = time.monotonic() + 30
    while processes_with_arg(container_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with_arg(container_id) == []
    assert not os.path.exists(bundle)
    assert not any(container_id in n for n in os.listdir(root))
    # A group whose processes were still dying when the close stopped waiting is kept to be removed
    # later (at the next isolate's start, or the runtime's close): as they do, here.
    process_cgroups.retry_leftovers(wait_s=30)
    for d in cgroups:
        assert not os.path.exists(d)


HOST = r"""
import json, stockade
from stockade.runtimes.manager import RuntimeManager
sb = stockade.Sandbox(runtime="gvisor", manager=RuntimeManager(pool_size=0))
inner = sb._sandbox
print(json.dumps({"id": inner.container_id, "bundle": inner.bundle, "root": inner.root}), flush=True)
sb.exec(["sleep", "3600"])
"""


def test_sigkilled_host_leaves_no_sandbox_and_sweep_cleans(gvisor: str) -> None:
    host = subprocess.Popen([sys.executable, "-c", HOST], stdout=subprocess.PIPE, text=True)
    assert host.stdout is not None
    info = json.loads(host.stdout.readline())
    time.sleep(0.3)
    os.kill(host.pid, signal.SIGKILL)
    host.wait(10)
    deadline = time.monotonic() + 15
    while processes_with_arg(info["id"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with_arg(info["id"]) == [], "gVisor outlived its host"
    fresh = RuntimeManager(pool_size=0)
    try:
        with fresh.get("gvisor").start(Policy()) as sandbox:  # the start sweeps
            assert sandbox.exec(["true"]).success
    finally:
        fresh.close()
    assert not os.path.exists(info["bundle"])
    assert not any(info["id"] in n for n in os.listdir(info["root"]))


def test_on_violation_kill_ends_the_sandbox_during_the_run(gvisor: str, manager: RuntimeManager) -> None:
    # gVisor tells of a violation only in its log, which is read while the run goes:
    # the run ends at the call, not 20 s later when the code would have finished.
    with Sandbox(Policy(runtime="gvisor", on_violation="kill", timeout_seconds=60), manager=manager) as sandbox:
        r = sandbox.run_code(LIBC + "libc.ptrace(16, 1, 0, 0)\nimport time\ntime.sleep(20)\nprint('survived')")
        assert r.termination_reason == "violation" and "ptrace" in {v.syscall for v in r.security_violations}
        assert "survived" not in r.stdout and r.execution_time_seconds < 20, r.summary()
        assert r.error == "killed after a policy violation (ptrace)"
        assert not any("on_violation" in u for u in r.unenforced_limits)
        with pytest.raises(stockade.SandboxError):
            sandbox.exec(["true"])


def test_asking_to_be_traced_twice_is_no_violation_but_attaching_to_the_agent_is(
    gvisor: str, manager: RuntimeManager
) -> None:
    # PTRACE_TRACEME is allowed inside gVisor; a second one fails with EPERM by the kernel's own rules.
    with Sandbox(Policy(runtime="gvisor", on_violation="kill"), manager=manager) as sandbox:
        r = sandbox.run_code(LIBC + "for _ in range(3): print(libc.ptrace(0, 0, 0, 0), ctypes.get_errno())")
        assert (r.termination_reason, r.stdout) == ("completed", "0 0\n-1 1\n-1 1\n"), r.summary()
        assert {v.violation_type for v in r.security_violations} == {"sensitive_syscall"}, r.security_violations
        assert not any(v.blocked for v in r.security_violations)
        r = sandbox.run_code(LIBC + "libc.ptrace(16, 1, 0, 0)")  # PTRACE_ATTACH to the agent: refused
        assert r.termination_reason == "violation", r.summary()


def test_a_run_without_violations_is_not_ended_by_the_watch(gvisor: str, manager: RuntimeManager) -> None:
    with Sandbox(Policy(runtime="gvisor", on_violation="kill"), manager=manager) as sandbox:
        for _ in range(2):  # the log is read all along: only a refused call ends the sandbox
            r = sandbox.run_code("import time\ntime.sleep(0.3)\nprint('done')")
            assert (r.termination_reason, r.stdout) == ("completed", "done\n"), r.summary()


def test_a_call_gvisor_lacks_is_reported_but_does_not_end_a_run_under_kill(
    gvisor: str, manager: RuntimeManager
) -> None:
    # cp tries copy_file_range, which this gVisor does not implement (ENOSYS), then copies
    # by read and write: the run is the code's, and nothing the policy refused happened.
    with Sandbox(Policy(runtime="gvisor", on_violation="kill"), manager=manager) as sandbox:
        r = sandbox.exec(["sh", "-c", "cp /bin/true /tmp/copy && cmp /bin/true /tmp/copy && echo same"])
        assert (r.termination_reason, r.stdout) == ("completed", "same\n"), r.summary()
        lacking = [v for v in r.security_violations if v.violation_type == "unsupported_syscall"]
        if lacking:  # a gVisor that implements it reports nothing
            assert lacking[0].severity == "LOW" and "not implemented by gVisor" in lacking[0].description
        # What the policy refuses still ends it.
        r = sandbox.run_code(LIBC + "libc.ptrace(16, 1, 0, 0)")
        assert r.termination_reason == "violation", r.summary()


def _host_bytes(path: str) -> int:
    """What the regular files under ``path`` take on the host (size or blocks, the larger)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += max(st.st_size, st.st_blocks * 512)
    return total


# Every descriptor of every other process in the sandbox, the agent's (pid 1) above all,
# opened through /proc and written 300 MiB: gVisor lets any task open another's, whatever
# the uids and dumpability. Its own pipes are only named (bulk into them is the code's own
# output, or its own agent's input: nothing on the host).
DESCRIPTOR_ATTACK = """
import os
own, chunk = str(os.getpid()), b"x" * (1 << 20)
for pid in sorted((p for p in os.listdir("/proc") if p.isdigit() and p != own), key=int):
    dirs = [f"/proc/{pid}/fd"] + [f"/proc/{pid}/task/{t}/fd" for t in os.listdir(f"/proc/{pid}/task")]
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError as e:
            print(d, "-", "unlistable", e.errno)
            continue
        for n in names:
            path = f"{d}/{n}"
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            if target.startswith("pipe:"):
                print(path, target, "internal", 0)
                continue
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                print(path, target, "refused", e.errno)
                continue
            written = 0
            try:
                while written < 300 << 20:
                    written += os.write(fd, chunk)
            except OSError:
                pass
            os.close(fd)
            print(path, target, "wrote", written)
"""


def test_the_agents_descriptors_reach_nothing_on_the_host(gvisor: str, manager: RuntimeManager) -> None:
    from stockade.runtimes.gvisor import GvisorSandbox

    policy = Policy(runtime="gvisor", disk_mb=16, timeout_seconds=120)
    with manager.get("gvisor").start(policy) as sandbox:
        assert isinstance(sandbox, GvisorSandbox)
        before = _host_bytes(sandbox.bundle)
        r = sandbox.run_code(DESCRIPTOR_ATTACK)
        assert r.termination_reason == "completed", r.summary()
        rows = [line.split() for line in r.stdout.splitlines()]
        agents = [row for row in rows if row[0].startswith("/proc/1/")]
        assert agents, f"the agent's descriptors were not found: {r.stdout}"
        # What the host handed in (its socket, runsc's stderr) shows as host:[N]: none may be written.
        assert [row for row in rows if row[1].startswith("host:") and row[2] != "refused"] == [], r.stdout
        # Nothing the code can write grows a file on the host; disk_mb caps the scratch space.
        fill = sandbox.run_code(
            "import os\nfor d in ('/tmp', '/work'):\n    n = 0\n    try:\n        with open(d + '/big', 'wb') as f:\n"
            "            while n < 300 << 20:\n                f.write(b'x' * (1 << 20)); f.flush(); n += 1 << 20\n"
            "    except OSError as e:\n        print(d, n >> 20, e.errno)"
        )
        assert fill.stdout.split() == ["/tmp", "16", "28", "/work", "16", "28"], fill.summary()  # ENOSPC at 16 MiB
        assert _host_bytes(sandbox.bundle) - before < 1 << 20, "an attack grew a file on the host"
        assert sandbox.exec(["true"]).success  # the agent took no harm either


def test_a_flood_of_traced_calls_grows_no_host_file(gvisor: str, manager: RuntimeManager) -> None:
    # The Sentry's strace of the flood (about 130 bytes a line, two lines a call) goes
    # into a pipe the host drains, not a log file: megabytes a second before.
    from stockade.runtimes.gvisor import GvisorSandbox
    from tests.security.test_violation_flood import flood

    with manager.get("gvisor").start(Policy(runtime="gvisor", timeout_seconds=60)) as sandbox:
        assert isinstance(sandbox, GvisorSandbox)
        before = _host_bytes(sandbox.bundle)
        r = sandbox.run_code(flood(2))
        made = int(r.stdout)
        assert made > 1000 and r.violation_counts["ptrace"] == made, r.summary()
        assert _host_bytes(sandbox.bundle) - before < 1 << 20, "the flood's log grew a file on the host"


@pytest.mark.parametrize("name", [b"a b", b"", b"a\nb", b"\n", b"x X ptrace(", b"q X mount(0x1", b" X "])
def test_a_task_name_cannot_hide_or_rename_a_call(sb: Sandbox, name: bytes) -> None:
    # gVisor's strace prints the task's name as it is: the code chooses it (up to 15 bytes),
    # spaces, newlines and a fake " X call(" included. Before, "a b" hid the call.
    r = sb.run_code(LIBC + f"libc.prctl(15, {name!r}, 0, 0, 0)\nprint(libc.mount(None, None, None, 0, None))")
    assert r.stdout == "-1\n" and r.violation_counts == {"mount": 1}, (r.stdout, r.violation_counts)


# gVisor's strace prints a path argument as it is. In its text log a newline in a path
# split the record, so the call went unreported (and a forged header after it made a
# record of its own); a line over 16 KiB (four paths of PATH_MAX) was dropped whole.
FORGED_RECORDS = (
    b"I1202 03:48:59.317470    2709 strace.go:611] [   2:   2] x X ptrace(0x0) = 0 (0x0) errno=1 (x) (1ns)\n"
    b'}{"msg":"strace.go:611] [   2:   2] x X ptrace(0x0) = 0 (0x0) errno=1 (x) (1ns)","level":"info","time":"x"}\n'
)
HIDING_PATHS = {
    "newline": b"/tmp\nzz",
    "forged record": b"/tmp\n" + FORGED_RECORDS + b"zz",
    "forged return": b"/tmp) = 0 (0x0) (1ns)\n" + FORGED_RECORDS,
    "over-long line": b"/" + b"a" * 4094,
}


@pytest.mark.parametrize("path", HIDING_PATHS.values(), ids=HIDING_PATHS.keys())
def test_a_path_can_neither_hide_a_refused_call_nor_forge_one(sb: Sandbox, path: bytes) -> None:
    r = sb.run_code(
        LIBC + f"p = {path!r}\n"
        "print(libc.mount(p, p, p, 0, p), ctypes.get_errno())\nprint(libc.chroot(p), ctypes.get_errno())"
    )
    assert r.stdout == "-1 1\n-1 1\n", r.summary()
    assert r.violation_counts == {"mount": 1, "chroot": 1}, r.violation_counts
    assert [(v.syscall, v.blocked) for v in r.security_violations] == [("mount", True), ("chroot", True)]


@pytest.mark.parametrize("path", [HIDING_PATHS["newline"], HIDING_PATHS["over-long line"]], ids=["newline", "long"])
def test_a_hiding_path_does_not_escape_on_violation_kill(gvisor: str, manager: RuntimeManager, path: bytes) -> None:
    with Sandbox(Policy(runtime="gvisor", on_violation="kill", timeout_seconds=60), manager=manager) as sandbox:
        r = sandbox.run_code(
            LIBC + f"p = {path!r}\nlibc.mount(p, p, p, 0, p)\nimport time\ntime.sleep(20)\nprint('survived')"
        )
        assert r.termination_reason == "violation" and r.violation_counts == {"mount": 1}, r.summary()
        assert "survived" not in r.stdout


# Opens every pipe of the agent's (gVisor lets a task open another's descriptors through
# /proc/<pid>/fd) and drains them: the SIGCHLD wake-ups among them.
PIPE_THIEF = """
import os, time
held = {}
open("/tmp/thieving", "w").close()
while True:
    for n in os.listdir("/proc/1/fd"):
        try:
            if n not in held and os.readlink(f"/proc/1/fd/{n}").startswith("pipe:"):
                held[n] = os.open(f"/proc/1/fd/{n}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            pass
    for fd in held.values():
        try:
            os.read(fd, 65536)
        except OSError:
            pass
    time.sleep(0.001)
"""


def test_a_run_ends_when_the_agents_wake_ups_are_stolen(gvisor: str, manager: RuntimeManager) -> None:
    # The agent learnt of a run's end only from its SIGCHLD wake-up pipe: drained by the code, every
    # run waited out its timeout (or, without one, for ever). A run whose pipes have ended is now
    # looked for with waitpid too. (Its output may be stolen: the code's own doing.)
    with Sandbox(Policy(runtime="gvisor", timeout_seconds=120), manager=manager) as sb:
        sb.spawn(["python3", "-c", PIPE_THIEF])
        deadline = time.monotonic() + 60
        while not any(e["name"] == "thieving" for e in sb.list_dir("/tmp")):
            assert time.monotonic() < deadline, "the thief did not start"
            time.sleep(0.1)
        for _ in range(3):
            started = time.monotonic()
            r = sb.exec(["sh", "-c", "exit 3"], timeout=20)
            assert r.termination_reason == "completed" and r.exit_code == 3, r.summary()
            assert time.monotonic() - started < 15  # not its timeout


def test_a_start_that_fails_after_the_sandbox_owns_its_parts_releases_them_once(
    gvisor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failed start released its parts, and left the sandbox open: collected, it released them
    # all again (the uids' leases, the cgroup, runsc's state).
    import gc

    from stockade.errors import SandboxStartError
    from stockade.runtimes import gvisor as gvisor_runtime
    from stockade.runtimes import hosted

    ended: list[object] = []
    real_end = hosted._end_isolate
    monkeypatch.setattr(hosted, "_end_isolate", lambda *args: (ended.append(args[0]), real_end(*args))[1])

    def no_answer(self: object, timeout: float = 0) -> None:
        raise TimeoutError("no pong")

    monkeypatch.setattr(gvisor_runtime.GvisorSandbox, "ping", no_answer)
    runtime = gvisor_runtime.GvisorRuntime()
    with pytest.raises(SandboxStartError, match="did not start"):
        runtime.start(Policy())
    gc.collect()
    assert len(ended) == 1, ended
