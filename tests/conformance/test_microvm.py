"""The microvm runtime: the conformance checks and its boundaries, on as few boots as possible.

Under TCG (this kind of host) a boot costs several seconds, so one VM is shared
by the module's checks and only three more are booted. The full conformance
suite in test_conformance.py runs on the faster runtimes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

import stockade
from stockade import Policy
from stockade.runtimes.manager import RuntimeManager
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
    from stockade.runtimes.microvm import jail
    from stockade.runtimes.microvm.runtime import qemu_binary

    pid = vm.proc.pid
    status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    assert open(f"/proc/{pid}/cmdline").read().split("\0")[0].endswith("qemu-system-x86_64")
    assert status["NoNewPrivs"].strip() == "1"
    if jail.seccomp_supported(qemu_binary() or ""):
        assert status["Seccomp"].strip() == "2"
    if os.geteuid() == 0:  # no shared path: uid 0 without a single capability
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    if jail.namespaces():
        for kind in ("net", "ipc"):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")


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


def test_one_shot_memory_bomb_and_teardown(vm_manager: RuntimeManager, vm: MicrovmSandbox) -> None:
    runtime = vm_manager.get("microvm")
    r = stockade.run_code("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", runtime="microvm",
                          manager=vm_manager, memory_mb=128, timeout_seconds=60)  # fmt: skip
    assert r.termination_reason == "memory_limit" and r.runtime_used == "microvm"
    runtime.wait_idle()  # type: ignore[attr-defined]
    mine = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"stockade-microvm-{os.getpid()}-")]
    assert mine == [os.path.basename(vm.rundir)], "the one-shot VM left its run directory behind"


def test_a_violation_ends_the_vm_when_the_policy_says_kill(vm_manager: RuntimeManager) -> None:
    code = "import ctypes, time\nctypes.CDLL(None).unshare(0x10000000)\ntime.sleep(20)\nprint('survived')"
    r = stockade.run_code(code, runtime="microvm", manager=vm_manager, on_violation="kill", timeout_seconds=60)
    assert r.termination_reason == "violation" and r.error == "killed after a policy violation (unshare)"
    assert "survived" not in r.stdout and r.execution_time_seconds < 20


def test_shared_path_and_loopback(vm_manager: RuntimeManager) -> None:
    share = tempfile.mkdtemp(prefix="stockade-vmshare-")
    try:
        os.chmod(share, 0o755)
        with open(os.path.join(share, "in.txt"), "w") as f:
            f.write("from the host")
        os.chmod(os.path.join(share, "in.txt"), 0o644)
        code = (
            "import socket\nprint(open('/data/in.txt').read())\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "socket.create_connection(s.getsockname(), timeout=5); print('loopback ok')\n"
            "try:\n    open('/data/x', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)\n"
            "try:\n    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).bind((socket.VMADDR_CID_ANY, 5252))\n"
            "except OSError as e:\n    print('vsock', e.errno)"
        )
        started = time.monotonic()
        r = stockade.run_code(code, runtime="microvm", manager=vm_manager, network_policy="loopback",
                              filesystem_access=[f"{share}:/data"], timeout_seconds=60)  # fmt: skip
        assert r.stdout.splitlines() == ["from the host", "loopback ok", "read-only 30", "vsock 1"], r.summary()
        assert [v.syscall for v in r.security_violations] == ["socket"]  # AF_VSOCK, whatever the network policy
        assert time.monotonic() - started < 120
    finally:
        shutil.rmtree(share)


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
        " df -m /tmp | tail -1; cat /proc/net/dev | grep -c 'lo:'; ifconfig lo | grep -c 'inet addr'",
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


def test_a_snapshot_qemu_cannot_resume_is_dropped_and_the_vm_boots(vm_manager: RuntimeManager) -> None:
    from stockade.runtimes.microvm import snapshot
    from stockade.runtimes.microvm.image import find_image
    from stockade.runtimes.microvm.runtime import _qemu_command, qemu_binary

    runtime = vm_manager.get("microvm")
    policy = Policy(memory_mb=192)  # a shape of its own, so the shared snapshot is not touched
    image, qemu = find_image(), qemu_binary()
    assert image is not None and qemu is not None
    rundir = tempfile.mkdtemp()
    try:
        cmd = _qemu_command(qemu, image, policy, runtime.accel(), rundir, os.path.join(rundir, "agent.sock"))  # type: ignore[attr-defined]
        key = snapshot.key(cmd, rundir, snapshot.qemu_version(qemu))
    finally:
        os.rmdir(rundir)
    os.makedirs(os.path.dirname(snapshot.path_for(key)), exist_ok=True)
    with open(snapshot.path_for(key), "wb") as f:
        f.write(b"not a QEMU migration stream")
    # When the boot that follows fails too, the fault was not the snapshot's: it is kept.
    with pytest.raises(stockade.SandboxStartError):
        runtime._build(policy, boot_timeout=1.0)  # type: ignore[attr-defined]
    assert snapshot.find(key) is not None
    with runtime.start(policy) as sandbox:
        assert isinstance(sandbox, MicrovmSandbox) and not sandbox.restored
        assert sandbox.exec(["echo", "booted"]).stdout == "booted\n"
    assert snapshot.find(key) is None
    assert not os.path.exists(snapshot.path_for(key) + ".suspect")


def test_a_qemu_that_will_not_start_is_reported_with_what_it_said(
    vm_manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    # A QEMU that refuses to run (an option it lacks, a library its jail keeps from
    # it) must be named with its own words, not as a bare "exited".
    from stockade.runtimes.microvm import runtime as microvm_runtime

    fake = write_executable(
        os.path.join(str(tmp_path), "bin", "qemu-system-x86_64"),
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
