"""`make demo`: untrusted sample code under the default runtime, and what happened.

One well-behaved program, then programs that try to escape: read host files,
reach the network, call dangerous syscalls, exhaust processes and memory.
Everything below is decided by the kernel and reported by the host side.
"""

from __future__ import annotations

import textwrap

import stockade

WELL_BEHAVED = """
import hashlib, json, platform
data = [n * n for n in range(10)]
print(json.dumps({"squares": data, "sha256": hashlib.sha256(bytes(data)).hexdigest()[:16],
                  "python": platform.python_version()}))
"""

READ_HOST = """
import os
for path in ("/etc/shadow", "/root", "/home", "/sys/fs/cgroup", "/dev/kvm", "/tmp"):
    try:
        what = os.listdir(path) if os.path.isdir(path) else open(path).read(40)
        print(f"{path:16} visible: {what!r:.50}")
    except OSError as exc:
        print(f"{path:16} {exc.strerror}")
"""

NETWORK = """
import socket
for host, port in (("127.0.0.1", 22), ("127.0.0.1", 80), ("::1", 22)):
    try:
        socket.create_connection((host, port), timeout=2)
        print(f"{host}:{port} CONNECTED")
    except OSError as exc:
        print(f"{host}:{port} {exc.strerror}")
"""

SYSCALLS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name, call in (("ptrace(PTRACE_ATTACH, 1)", lambda: libc.ptrace(16, 1, 0, 0)),
                   ("mount(tmpfs, /tmp)", lambda: libc.mount(b"x", b"/tmp", b"tmpfs", 0, None)),
                   ("unshare(CLONE_NEWUSER)", lambda: libc.unshare(0x10000000)),
                   ("bpf(BPF_PROG_LOAD)", lambda: libc.syscall(321, 5, 0, 0))):
    rc = call()
    print(f"{name:26} -> {rc} ({os.strerror(ctypes.get_errno())})")
"""

FORK_BOMB = """
import os, time
children = 0
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
    except OSError:
        break
print(f"forked {children} processes before the kernel said no")
"""

MEMORY_BOMB = """
blocks = []
while True:
    blocks.append(bytearray(16 * 1024 * 1024))
"""


def show(title: str, result: stockade.ExecResult) -> None:
    print(f"== {title}")
    for line in (result.stdout + result.stderr).strip().splitlines()[-8:]:
        print("   " + line)
    blocked = sorted({v.syscall or v.violation_type for v in result.security_violations})
    print(
        f"   -> {result.termination_reason}, exit {result.exit_code}, {result.execution_time_seconds * 1000:.0f} ms",
        end="",
    )
    if blocked:
        print(f", blocked by the host: {', '.join(blocked)}", end="")
    if result.limits_reached:
        print(f", limits reached: {', '.join(result.limits_reached)}", end="")
    print()


def main() -> None:
    print(
        textwrap.dedent("""
        stockade demo: each program runs in a fresh isolate of the default runtime
        (process: namespaces, pivot_root, seccomp, cgroups, Landlock).
    """).strip()
    )
    print()
    show("a well-behaved program", stockade.run_code(WELL_BEHAVED))
    show("reading host files", stockade.run_code(READ_HOST))
    show("opening network connections", stockade.run_code(NETWORK))
    show("dangerous syscalls", stockade.run_code(SYSCALLS))
    show("a fork bomb (pids_limit=32)", stockade.run_code(FORK_BOMB, pids_limit=32, timeout_seconds=10))
    show("a memory bomb (memory_mb=64)", stockade.run_code(MEMORY_BOMB, memory_mb=64, timeout_seconds=10))
    show("an endless loop (timeout_seconds=1)", stockade.run_code("while True: pass", timeout_seconds=1))
    result = stockade.run(["sh", "-c", "yes stockade"], max_output_bytes=4096)
    show("a flood of output (max_output_bytes=4096)", result)


if __name__ == "__main__":
    main()
