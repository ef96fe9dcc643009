"""The microvm runtime: the conformance checks and its boundaries, on as few boots as possible.

Under TCG (this kind of host) a boot costs several seconds, so one VM is shared
by the module's checks and only three more are booted. The full conformance
suite in test_conformance.py runs on the faster runtimes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

import stockade
from stockade import Policy
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.microvm import jail
from stockade.runtimes.microvm.runtime import MicrovmSandbox
from tests.conftest import require
from tests.helpers import write_executable


@pytest.fixture(scope="module")
def vm_manager() -> Iterator[RuntimeManager]:
    require("microvm")
    mgr = RuntimeManager(pool_size=0)
    yield mgr
    mgr.close()


@pytest.fixture(scope="module")
def vm(vm_manager: RuntimeManager) -> Iterator[MicrovmSandbox]:
    sandbox = vm_manager.get("microvm").start(Policy(max_output_bytes=4000, timeout_seconds=60))
    assert isinstance(sandbox, MicrovmSandbox)
    yield sandbox
    rundir, pid = sandbox.rundir, sandbox.proc.pid
    sandbox.close()
    assert not os.path.exists(rundir)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_exec_and_exit_codes(vm: MicrovmSandbox) -> None:
    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code, r.runtime_used) == ("out\n", "err\n", 7, "microvm")


def test_large_stdin_crosses_the_serial_port_whole(vm: MicrovmSandbox) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    r = vm.exec(["sha256sum"], stdin=data)
    assert r.success and r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_run_code_and_files_persist(vm: MicrovmSandbox) -> None:
    vm.write_file("/work/data.txt", b"kept across calls")
    r = vm.run_code("print(open('/work/data.txt').read().upper())")
    assert r.stdout == "KEPT ACROSS CALLS\n"
    assert vm.read_file("/work/data.txt") == b"kept across calls"


def test_own_kernel_and_nothing_of_the_host(vm: MicrovmSandbox) -> None:
    r = vm.run_code(
        "import os\nprint(os.uname().release)\n"
        "def ls(p):\n    try:\n        return os.listdir(p)\n    except OSError:\n        return []\n"
        "print([p for p in ('/home', '/etc/shadow', '/var', '/boot') if os.path.exists(p)] + ls('/root'))\n"
        "st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "print(os.getuid(), st['CapEff'].strip())"
    )
    release, visible, ids = r.stdout.splitlines()
    assert release != os.uname().release  # a guest kernel, not the host's
    assert visible == "[]"
    assert ids == "1000 0000000000000000"


GUEST_VIEW = r"""
import errno, json, os
def attempt(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno
def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(l.split(":\t", 1) for l in f.read().splitlines() if ":\t" in l)
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()
def fill(path):  # one MiB past half the scratch cap, without writing it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return attempt(lambda: os.posix_fallocate(fd, 0, (int(os.environ["DISK_MB"]) // 2 + 1) << 20))
    finally:
        os.close(fd)
scratch = {p: os.statvfs(p) for p in ("/tmp", "/work", "/dev/shm") if os.path.isdir(p)}
print(json.dumps({
    "dev": sorted(os.listdir("/dev")),
    "root": sorted(os.listdir("/")),
    "sys": os.path.exists("/sys"),
    "processes": {p: [open(f"/proc/{p}/comm").read().strip(), cmdline(p)] for p in pids},
    "me": [os.getpid(), os.getppid()],
    "agent": {k: status(1)[k].strip() for k in ("Uid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp")},
    "mounts": sorted(l.split()[4] for l in open("/proc/self/mountinfo")),
    "kernel_cmdline": open("/proc/cmdline").read(),
    "passwd": open("/etc/passwd").read(),
    "hostname": os.uname().nodename,
    "root_writes": [attempt(lambda: open("/new", "w")), attempt(lambda: os.mkdir("/etc/new")),
                    attempt(lambda: os.symlink("/", "/usr/new"))],
    "scratch_writes": [attempt(lambda: (open(f"{p}/new", "w").close(), os.unlink(f"{p}/new"))) for p in scratch],
    "scratch_mb": sorted({v.f_blocks * v.f_frsize >> 20 for v in scratch.values()}),
    "one_scratch": len({os.stat(p).st_dev for p in scratch}) == 1,
    "past_the_cap": [fill("/work/big"), fill("/tmp/big")],
}))
os.unlink("/work/big")
os.unlink("/tmp/big")
"""


def test_the_code_sees_an_isolate_not_the_whole_guest(vm: MicrovmSandbox) -> None:
    """Inside the guest, code runs confined as a process isolate is on the host
    (agent/guest.py): none of the guest's devices, kernel threads, /sys or
    initramfs; the agent is pid 1 of the code's own pid namespace."""
    import json

    r = vm.run_code(GUEST_VIEW, env={"DISK_MB": str(vm.policy.disk_mb)})
    assert r.exit_code == 0, r.summary()
    seen = json.loads(r.stdout)
    assert seen["dev"] == ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    # No mem, kmsg, port, hpet, snapshot, userfaultfd, ttyS*, tty*, console, vport*; no /init,
    # /modules, /opt (the agent's code) or /sys; the links a merged-/usr host has.
    assert set(seen["root"]) - {"lib32", "libx32"} == {"bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp",
                                                       "usr", "work"}  # fmt: skip
    assert not seen["sys"]
    # Only the isolate's own processes: the agent (pid 1), this runner, perhaps the next runner.
    processes = {int(pid): what for pid, what in seen["processes"].items()}
    me, parent = seen["me"]
    assert parent == 1 and me in processes and len(processes) <= 3, processes
    assert all(comm == "python3" and "from agent import guest" in cmd for comm, cmd in processes.values()), processes
    assert seen["agent"] == {"Uid": "1000\t1000\t1000\t1000", "CapEff": "0" * 16, "CapPrm": "0" * 16,
                             "CapBnd": "0" * 16, "NoNewPrivs": "1", "Seccomp": "2"}  # fmt: skip
    devices = ["/dev/" + name for name in ("full", "null", "random", "urandom", "zero")]
    assert seen["mounts"] == sorted(["/", "/usr", "/proc", "/proc/cmdline", "/dev", *devices, "/dev/shm", "/tmp",
                                     "/work"])  # fmt: skip
    assert seen["kernel_cmdline"] == ""  # the guest's (its init's flags, the host's vsock ports): none of the code's
    assert seen["passwd"] == (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        "sandbox:x:1000:1000:sandbox:/work:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )  # synthesized (agent/confine.py), as in a process isolate
    assert seen["hostname"] == "stockade"
    assert seen["root_writes"] == [30, 30, 30]  # EROFS: the root, /etc and /usr are read-only
    # /tmp, /work and /dev/shm: writable, one tmpfs of disk_mb, which caps them together.
    assert seen["scratch_writes"] == [0, 0, 0]
    assert seen["scratch_mb"] == [vm.policy.disk_mb] and seen["one_scratch"]
    assert seen["past_the_cap"] == [0, 28]  # over half of it in /work leaves /tmp less than half: ENOSPC
    assert vm.ping()["pid"] == 1


def test_no_network_device(vm: MicrovmSandbox) -> None:
    lines = vm.exec(["cat", "/proc/net/dev"]).stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in lines] == ["lo"]
    r = vm.run_code(
        "import socket\ntry:\n    socket.create_connection(('10.0.2.2', 80), timeout=2)\n"
        "except OSError as e:\n    print('unreachable')"
    )
    assert r.stdout.strip() == "unreachable"


def test_qemu_itself_runs_confined(vm: MicrovmSandbox) -> None:
    """The second wall (runtimes/microvm/jail.py): what a guest that took QEMU over would hold."""
    from stockade.runtimes.microvm.runtime import qemu_binary

    pid = vm.proc.pid
    status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    assert open(f"/proc/{pid}/cmdline").read().split("\0")[0].endswith("qemu-system-x86_64")
    assert status["NoNewPrivs"].strip() == "1"
    # Its own -sandbox filter where it has one, and stockade's (host_program.py) on top.
    assert status["Seccomp"].strip() == "2"
    assert int(status["Seccomp_filters"]) == 1 + _own_filters(qemu_binary() or "")
    if os.geteuid() == 0:  # a uid of its own (the one leased for the VM), without a single capability
        from stockade.runtimes.process.uids import UidRange

        uids = UidRange.from_env()
        assert [uid.uid for uid in vm.uids] == [int(status["Uid"].split()[0])]
        assert all(uids.first <= int(uid) <= uids.last for uid in status["Uid"].split() + status["Gid"].split())
        # No group, but /dev/kvm's own where KVM is its accelerator (udev's root:kvm 0660), never root's.
        kvm = jail.kvm_group(jail._kvm_stat()) if vm.accel == "kvm" else None
        assert status["Groups"].split() == ([] if kvm is None else [str(kvm)])
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapAmb"], 16) == 0
        if jail.guest_uid_map():  # the guest's uid 1000 in its namespace, and nothing else mapped
            mapped = open(f"/proc/{pid}/uid_map").read().split()
            assert mapped == ["1000", status["Uid"].split()[0], "1"]
    if jail.namespaces():
        for kind in ("net", "ipc"):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")


def _own_filters(qemu: str) -> int:
    """How many seccomp filters a QEMU started plainly gives itself (its -sandbox's)."""
    if not jail.seccomp_supported(qemu):
        return 0
    argv = [qemu, "-M", "none", "-nodefaults", "-display", "none", "-sandbox", jail.SECCOMP, "-qmp", "stdio"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline()  # the greeting: -sandbox is in place
        status = open(f"/proc/{proc.pid}/status").read()
        return int(status.split("Seccomp_filters:")[1].split()[0])
    finally:
        proc.kill()
        proc.wait()


def test_the_seccomp_profile_holds_inside_the_guest_and_is_reported(vm: MicrovmSandbox) -> None:
    """The process runtime's profile, kept by the guest's agent: refused, reported, run goes on."""
    assert vm.guest_seccomp and not any("seccomp" in gap for gap in vm.unenforced_limits)
    r = vm.run_code(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
        "print(libc.ioctl(0, 0x5412, ctypes.c_char_p(b'x')), ctypes.get_errno())\n"  # TIOCSTI
        "print('still running')"
    )
    assert r.stdout.splitlines() == ["-1 1", "-1 1", "still running"], r.summary()  # EPERM, twice
    assert [v.syscall for v in r.security_violations] == ["unshare", "ioctl"]
    for v in r.security_violations:
        assert v.detection_layer == "SECCOMP" and v.blocked and "inside the guest" in v.description
    # Reports belong to the run that caused them.
    assert vm.exec(["true"]).security_violations == []


def test_off_list_sockets_and_unknown_syscalls_are_refused_inside_the_guest(vm: MicrovmSandbox) -> None:
    """The profile's socket lists and its refusal of numbers it does not know hold in the guest too."""
    r = vm.run_code(
        "import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def vsock():\n    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
        "    s.bind((socket.VMADDR_CID_ANY, 5252)); s.listen(1)\n"
        "for make in (vsock, lambda: socket.socket(socket.AF_INET, 10, 0x300),\n"  # SOCK_PACKET
        "             lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0),\n"
        "             lambda: socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)):\n"
        "    try:\n        make(); print('OPEN')\n    except OSError as e:\n        print(e.errno)\n"
        "for nr in (467, 470, 1000):\n    print(libc.syscall(nr, -100, b'/tmp', 1, None, 0), ctypes.get_errno())\n"
        "socket.socket().close(); print(sorted({a[4][0] for a in socket.getaddrinfo('localhost', 80)}))"
    )
    # EPERM for the sockets and open_tree_attr; ENOSYS, as from an older kernel, for the unknown numbers.
    assert r.stdout.splitlines() == ["1"] * 4 + ["-1 1", "-1 38", "-1 38", "['127.0.0.1']"], r.summary()
    syscalls = ["socket"] * 4 + ["open_tree_attr", "syscall_470", "syscall_1000"]
    assert [v.syscall for v in r.security_violations] == syscalls
    for word, v in zip(["AF_VSOCK", "SOCK_PACKET", "AF_PACKET", "AF_ALG"], r.security_violations, strict=False):
        assert word in v.description and "inside the guest" in v.description, v.description


def test_calls_through_other_abis_are_refused_and_reported_inside_the_guest(vm: MicrovmSandbox) -> None:
    """i386's int 0x80 and x32's numbers: refused with ENOSYS and reported by their ABI, as on the host."""
    from tests.security.test_attacks import OTHER_ABIS_CODE, check_other_abis_refused_and_reported

    check_other_abis_refused_and_reported(vm.run_code(OTHER_ABIS_CODE), "inside the guest")


def test_the_guest_filters_listener_reaches_no_command(vm: MicrovmSandbox) -> None:
    # With it, code could answer its own blocked calls and let them run.
    code = (
        "import os\nprint(sorted(os.listdir('/proc/self/fd')))\n"
        "try:\n    print(os.listdir(f'/proc/{os.getppid()}/fd'))\nexcept OSError as e:\n    print('denied', e.errno)"
    )
    r = vm.run_code(code)
    own, agent = r.stdout.splitlines()
    assert own == "['0', '1', '2', '3']"  # stdio, and the directory being listed
    assert agent == "denied 13", r.summary()  # the agent is not dumpable


def test_usr_is_read_only(vm: MicrovmSandbox) -> None:
    r = vm.run_code("open('/usr/evil', 'w')")
    assert r.exit_code == 1 and ("Read-only" in r.stderr or "Permission denied" in r.stderr)


def test_timeout_and_output_limit(vm: MicrovmSandbox) -> None:
    r = vm.run_code("import time; time.sleep(60)", timeout=2)
    assert r.termination_reason == "timeout"
    r = vm.exec(["sh", "-c", "yes stockade"])
    assert r.termination_reason == "output_limit" and len(r.stdout) <= 4000
    assert vm.exec(["true"]).success  # still usable


def _run_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"stockade-microvm-{os.getpid()}-")}


def test_one_shot_memory_bomb_and_teardown(vm_manager: RuntimeManager, vm: MicrovmSandbox) -> None:
    runtime = vm_manager.get("microvm")
    # Other VMs of this process may be alive (an earlier test's warm pool): only the one-shot's dir counts.
    before = _run_dirs()
    assert os.path.basename(vm.rundir) in before
    r = stockade.run_code("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", runtime="microvm",
                          manager=vm_manager, memory_mb=128, timeout_seconds=60)  # fmt: skip
    assert r.termination_reason == "memory_limit" and r.runtime_used == "microvm"
    runtime.wait_idle()  # type: ignore[attr-defined]
    assert _run_dirs() - before == set(), "the one-shot VM left its run directory behind"


def _host_bytes(directory: str) -> int:
    """What the files under ``directory`` hold on the host's disk."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def test_a_flooded_console_grows_no_host_file_and_is_read_bounded(vm: MicrovmSandbox) -> None:
    """The guest kernel's console (a line for every OOM kill, for as long as the VM lives) reaches
    the host through a pipe it drains. Before, QEMU appended it to a file in the run directory
    that grew without bound, and the host read that whole file at every run, twice.

    Only the guest's root can write the console, so the flood is written where QEMU writes it.
    """
    import tracemalloc

    from stockade.runtimes.microvm.console import CONSOLE, LAST_WORDS, OUTPUT_PER_S

    noise = b"[ 4242.000001] stockade: a line of the guest kernel's, of no interest to anyone\r\n"
    quarter = noise * ((OUTPUT_PER_S // 4) // len(noise))  # read at OUTPUT_PER_S: the writer waits past it
    oom = b"[ 4242.000002] Out of memory: Killed process 4242 (python3) total-vm:1024kB, anon-rss:512kB\r\n"
    files, ooms = _host_bytes(vm.rundir), vm.usage(peak=False).oom_kills
    tracemalloc.start()
    try:
        with open(os.path.join(vm.rundir, CONSOLE), "ab", buffering=0) as console:
            for i in range(16):  # four seconds of the rate's worth
                console.write(quarter)
                if i % 4 == 0:
                    console.write(oom)
            console.write(b"the last words\r\n")
        counted = vm.usage(peak=False).oom_kills - ooms
        words = vm.last_words()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _host_bytes(vm.rundir) - files < 1 << 20, "4 MiB of console grew a file on the host"
    assert peak < 8 << 20, f"the host held {peak} bytes of the console at once"
    assert counted == 4  # every OOM report, each once, however much came around it
    assert words.endswith("the last words") and len(words) <= 2 * LAST_WORDS + 32, words
    assert vm.exec(["true"]).success


def test_oom_kills_in_a_held_vm_are_told_run_by_run(vm_manager: RuntimeManager) -> None:
    # The count of OOM kills is read from the console as it comes: each run is judged by its own.
    bomb = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))"
    with vm_manager.get("microvm").start(Policy(memory_mb=128, timeout_seconds=60)) as sandbox:
        for _ in range(2):
            r = sandbox.run_code(bomb)
            assert r.termination_reason == "memory_limit", r.summary()
        r = sandbox.run_code("print('fine')")
        assert r.termination_reason == "completed" and r.stdout == "fine\n", r.summary()


def test_a_violation_ends_the_vm_when_the_policy_says_kill(vm_manager: RuntimeManager) -> None:
    code = "import ctypes, time\nctypes.CDLL(None).unshare(0x10000000)\ntime.sleep(20)\nprint('survived')"
    r = stockade.run_code(code, runtime="microvm", manager=vm_manager, on_violation="kill", timeout_seconds=60)
    assert r.termination_reason == "violation" and r.error == "killed after a policy violation (unshare)"
    assert "survived" not in r.stdout and r.execution_time_seconds < 20


def test_shared_path_and_loopback(vm_manager: RuntimeManager) -> None:
    # A source with a comma (QEMU's option separator) and a target with a space, a comma and a
    # colon (the kernel command line's and stockade.mounts='s separators): each arrives whole.
    share = tempfile.mkdtemp(prefix="stockade-vmshare,readonly=off-")
    out = tempfile.mkdtemp(prefix="stockade-vmshare-rw-")
    try:
        os.chmod(share, 0o755)
        os.chmod(out, 0o777)
        with open(os.path.join(share, "in.txt"), "w") as f:
            f.write("from the host")
        os.chmod(os.path.join(share, "in.txt"), 0o644)
        code = (
            "import socket\nprint(open('/data, x:y/in.txt').read())\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "socket.create_connection(s.getsockname(), timeout=5); print('loopback ok')\n"
            "try:\n    open('/data, x:y/x', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)\n"
            "open('/work/out/result.txt', 'w').write('from the guest')\n"
            "try:\n    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).bind((socket.VMADDR_CID_ANY, 5252))\n"
            "except OSError as e:\n    print('vsock', e.errno)"
        )
        started = time.monotonic()
        # The writable share's target lies inside the scratch space: mounted over it, in the code's namespace.
        r = stockade.run_code(code, runtime="microvm", manager=vm_manager, network_policy="loopback",
                              filesystem_access=[{"source": share, "target": "/data, x:y"}, f"{out}:/work/out:rw"],
                              timeout_seconds=60)  # fmt: skip
        assert r.stdout.splitlines() == ["from the host", "loopback ok", "read-only 30", "vsock 1"], r.summary()
        assert [v.syscall for v in r.security_violations] == ["socket"]  # AF_VSOCK, whatever the network policy
        with open(os.path.join(out, "result.txt")) as f:
            assert f.read() == "from the guest"
        assert time.monotonic() - started < 120
    finally:
        shutil.rmtree(share)
        shutil.rmtree(out)


def test_commands_inherit_only_their_stdio(vm: MicrovmSandbox) -> None:
    assert vm.exec(["sh", "-c", "ls /proc/self/fd"]).stdout.split() == ["0", "1", "2", "3"]


def test_common_tools_work(vm: MicrovmSandbox) -> None:
    r = vm.exec(["sh", "-c", "cd /tmp && printf 'b\\na\\n' > f && sort f && cp f g && ls && stat -c %s g"])
    assert r.stdout.split() == ["a", "b", "f", "g", "4"], (r.stdout, r.stderr)


def test_restores_from_a_snapshot_each_with_its_own_randomness_and_clock(vm_manager: RuntimeManager) -> None:
    runtime = vm_manager.get("microvm")
    runtime.make_snapshot()  # type: ignore[attr-defined]  # made by `stockade image build`, or now
    probe = [
        "sh", "-c",
        "cat /proc/sys/kernel/random/boot_id; python3 -c 'import os; print(os.urandom(16).hex())'; date +%s;"
        " df -m /tmp | tail -1; cat /proc/net/dev | grep -c 'lo:'; ip -4 -o addr show dev lo | grep -c 'inet 127'",
    ]  # fmt: skip
    seen = []
    for policy in (Policy(), Policy(disk_mb=16, network_policy="loopback")):
        sandbox = runtime.start(policy)
        try:
            assert isinstance(sandbox, MicrovmSandbox) and sandbox.restored
            r = sandbox.exec(probe)
            boot_id, rand, clock, df, _lo, lo_up = r.stdout.splitlines()
            assert abs(int(clock) - time.time()) < 30, "the restored guest's clock was not set from the host"
            assert df.split()[1] == str(policy.disk_mb)  # the go line's scratch size, not the snapshot's
            assert lo_up == ("1" if policy.network_policy == "loopback" else "0")
            # The agent started from the initramfs' copies; code gets the host's whole stdlib.
            code = "import json, sys, decimal\nprint(json.dumps([sys.prefix, str(decimal.Decimal(1) / 8)]))"
            r = sandbox.run_code(code)
            assert r.stdout == '["/usr", "0.125"]\n', (r.stdout, r.stderr)
            # Code runs in a runner forked from the agent, which started before the
            # snapshot: its random module must be seeded afresh all the same.
            drawn = sandbox.run_code("import random\nprint(random.getrandbits(64))").stdout
            seen.append((boot_id, rand, drawn))
        finally:
            sandbox.close()
    assert seen[0][0] != seen[1][0], "two restores share a boot id"
    assert seen[0][1] != seen[1][1], "two restores share the kernel's random state"
    assert seen[0][2] != seen[1][2], "code in two restores draws the same random numbers"


def _unusable_snapshot(runtime: Any, policy: Policy) -> str:
    """Put a snapshot no QEMU can resume where ``policy``'s VM looks for one; its key."""
    from stockade.runtimes.microvm import snapshot
    from stockade.runtimes.microvm.image import find_image
    from stockade.runtimes.microvm.qemu import qemu_command
    from stockade.runtimes.microvm.runtime import qemu_binary

    image, qemu = find_image(), qemu_binary()
    assert image is not None and qemu is not None
    rundir = tempfile.mkdtemp()
    try:
        cmd = qemu_command(qemu, image, policy, runtime.accel(), rundir, os.path.join(rundir, "agent.sock"))
        key = snapshot.key(cmd, rundir, snapshot.qemu_version(qemu))
    finally:
        os.rmdir(rundir)
    os.makedirs(os.path.dirname(snapshot.path_for(key)), exist_ok=True)
    with open(snapshot.path_for(key), "wb") as f:
        f.write(b"not a QEMU migration stream")
    return key


def test_a_snapshot_qemu_cannot_resume_is_dropped_and_the_vm_boots(vm_manager: RuntimeManager) -> None:
    from stockade.runtimes.microvm import snapshot

    runtime = vm_manager.get("microvm")
    policy = Policy(memory_mb=192)  # a shape of its own, so the shared snapshot is not touched
    key = _unusable_snapshot(runtime, policy)
    # When the boot that follows fails too, the fault was not the snapshot's: it is kept.
    with pytest.raises(stockade.SandboxStartError):
        runtime._build(policy, boot_timeout=1.0)  # type: ignore[attr-defined]
    assert snapshot.find(key) is not None
    with runtime.start(policy) as sandbox:
        assert isinstance(sandbox, MicrovmSandbox) and not sandbox.restored
        assert sandbox.exec(["echo", "booted"]).stdout == "booted\n"
    assert snapshot.find(key) is None
    assert not os.path.exists(snapshot.path_for(key) + ".suspect")


def test_a_restoring_qemu_that_dies_before_its_socket_appears_boots_instead(
    vm_manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU may give up on a bad stream before or after it makes its agent socket:
    either way the VM boots (a restore that died early once escaped the fallback)."""
    from stockade.runtimes.microvm import snapshot

    runtime = vm_manager.get("microvm")
    policy = Policy(memory_mb=176)  # a shape of its own
    key = _unusable_snapshot(runtime, policy)
    launch = runtime._launch  # type: ignore[attr-defined]

    def dies_when_restoring(policy: Policy, plan: Any, extra: list[str], *rest: Any) -> Any:
        if extra:  # -incoming: this launch restores
            shutil.rmtree(plan.rundir, ignore_errors=True)  # as a failed launch leaves it: gone
            raise stockade.SandboxStartError("QEMU exited before its agent socket appeared")
        return launch(policy, plan, extra, *rest)

    monkeypatch.setattr(runtime, "_launch", dies_when_restoring)
    with runtime.start(policy) as sandbox:
        assert isinstance(sandbox, MicrovmSandbox) and not sandbox.restored
        assert sandbox.exec(["echo", "booted"]).stdout == "booted\n"
    assert snapshot.find(key) is None


def test_a_qemu_that_will_not_start_is_reported_with_what_it_said(
    vm_manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # A QEMU that refuses to run (an option it lacks, a library its jail keeps from
    # it) must be named with its own words, not as a bare "exited".
    from stockade.runtimes.microvm import runtime as microvm_runtime

    # Where QEMU's own uid (as root, one leased for the VM) may run it: pytest's directory is root's alone.
    place = tempfile.mkdtemp(prefix="stockade-fake-qemu-")
    os.chmod(place, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(place, ignore_errors=True))
    fake = write_executable(
        os.path.join(place, "bin", "qemu-system-x86_64"),
        '#!/bin/sh\n[ "$1" = --version ] && { echo "QEMU emulator version 7.2.99"; exit 0; }\n'
        'echo "qemu-system-x86_64: this is a stand-in that cannot boot anything" >&2\nexit 3\n',
    )
    monkeypatch.setattr(microvm_runtime, "qemu_binary", lambda: fake)
    monkeypatch.setenv("STOCKADE_MICROVM_ACCEL", "tcg")
    runtime = microvm_runtime.MicrovmRuntime(pool_size=0)
    try:
        with pytest.raises(stockade.SandboxStartError) as caught:
            runtime.start(Policy())
    finally:
        runtime.close()
    message = str(caught.value)
    assert "QEMU exited with status 3 before its agent socket appeared" in message, message
    assert "this is a stand-in that cannot boot anything" in message, message


def test_a_start_that_fails_after_qemu_runs_leaves_no_qemu_cgroup_uid_or_rundir(
    vm_manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no descriptor left for the sandbox's pidfd (EMFILE), QEMU is already running,
    # in its cgroup, on its leased uid: none of it may outlive the failed start.
    import errno

    from stockade.runtimes.microvm import runtime as microvm_runtime

    runtime = vm_manager.get("microvm")
    launched: list[Any] = []
    launch = runtime._launch  # type: ignore[attr-defined]

    def recorded(*args: Any) -> Any:
        launched.append((args[1].rundir, result := launch(*args)))
        return result

    class NoDescriptorLeft(microvm_runtime.MicrovmSandbox):
        def __init__(self, *args: Any) -> None:  # as when its pidfd_open finds no descriptor free
            raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(runtime, "_launch", recorded)
    monkeypatch.setattr(microvm_runtime, "MicrovmSandbox", NoDescriptorLeft)
    with pytest.raises(OSError, match="Too many open files"):
        runtime.start(Policy(memory_mb=192))
    monkeypatch.undo()
    ((rundir, one),) = launched
    assert one.proc.poll() is not None and not os.path.exists(rundir)
    assert one.cgroup is None or not any(os.path.exists(os.path.dirname(p)) for p in one.cgroup.procs_files)
    from stockade.runtimes.process.uids import LOCK_DIR

    assert not any(os.path.exists(os.path.join(LOCK_DIR, str(u.uid))) for u in one.uids)
