"""Snapshots of a booted microVM, restored instead of booting a kernel.

Where the guest's init stops and says ``S`` (docs/runtime-microvm.md), the
kernel has booted and loaded its modules, but nothing of the host is mounted
yet and no program has drawn random bytes: the host's ``/usr`` goes over 9p,
and QEMU refuses to migrate (and so to snapshot) a VM with a 9p export
mounted. A snapshot taken there (QMP ``migrate`` to a file) is
restored with ``-incoming``; the guest resumes inside init's read of the go
line, which gives every restore its own random seed (the agent then has the
kernel reseed from it), the wall-clock time, the scratch size and the network.

A snapshot is only valid for the exact QEMU command it was taken with (RAM,
devices, kernel, initramfs, accelerator) and the same QEMU build: its file
name is a hash of all of that. Snapshots are made for the default policy's
RAM and no shared paths, the shape most starts have; other shapes boot.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
from typing import Any

from ...errors import SandboxStartError
from ..process.cgroups import pid_alive
from . import image as guest_image

QMP_TIMEOUT_S = 60.0
SNAPSHOT_POINT = b"S"


def key(command: list[str], rundir: str, qemu_version: str) -> str:
    """The snapshot a QEMU command line can restore: same command (run-directory
    paths aside, they are host-side only) and the same QEMU build."""
    template = [arg.replace(rundir, "<run>") for arg in command[1:]]
    h = hashlib.sha256(json.dumps([qemu_version, template]).encode())
    return h.hexdigest()[:20]


def path_for(snapshot_key: str) -> str:
    return os.path.join(guest_image.snapshots_directory(), f"{snapshot_key}.vmstate")


# A snapshot set aside this long ago was never settled: the process that set it
# aside died before the boot that was to judge it ended (that boot takes seconds).
SUSPECT_ABANDONED_S = 600.0


def find(snapshot_key: str, now: float | None = None) -> str | None:
    path = path_for(snapshot_key)
    if not os.path.exists(path):
        _reclaim_abandoned(path, time.time() if now is None else now)
    return path if os.path.isfile(path) and os.path.getsize(path) > 0 else None


def _reclaim_abandoned(path: str, now: float) -> None:
    """Put back a snapshot whose judge died, so it is tried again (and judged) instead
    of every start booting cold until the next image build."""
    suspect = path + ".suspect"
    try:
        set_aside_at = os.stat(suspect).st_ctime  # the rename that set it aside
    except FileNotFoundError:
        return
    if now - set_aside_at > SUSPECT_ABANDONED_S:
        with contextlib.suppress(FileNotFoundError):
            os.replace(suspect, path)


def discard(snapshot_key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path_for(snapshot_key))


def set_aside(snapshot_key: str) -> None:
    """A restore failed: take the snapshot out of use until a boot says whose fault it was."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(path_for(snapshot_key), path_for(snapshot_key) + ".suspect")


def settle(snapshot_key: str, booted: bool) -> None:
    """After the boot that followed a failed restore: a boot that worked means the
    snapshot was at fault (drop it); one that failed too means it was not (put it back)."""
    suspect = path_for(snapshot_key) + ".suspect"
    with contextlib.suppress(FileNotFoundError):
        if booted:
            os.unlink(suspect)
        else:
            os.replace(suspect, path_for(snapshot_key))


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def open_state(path: str) -> int:
    """The snapshot at ``path``, opened for a restoring QEMU to read (the caller closes it)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def incoming_args(state_fd: int) -> list[str]:
    """Resume from ``state_fd``, inherited: QEMU runs under seccomp that forbids spawning a reader."""
    return ["-incoming", f"fd:{state_fd}"]


def go_line(disk_mb: int, network: str) -> bytes:
    """What init waits for, after a boot or a restore: seed, time, scratch MB, network."""
    return f"{os.urandom(32).hex()} {int(time.time())} {int(disk_mb)} {network}\n".encode()


def wait_for_snapshot_point(conn: socket.socket, deadline: float) -> None:
    """Read init's ``S`` (the first byte the guest sends), or raise."""
    conn.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        first = conn.recv(1)
    except TimeoutError:
        raise SandboxStartError("the guest did not reach its init in time") from None
    finally:
        conn.settimeout(None)
    if first != SNAPSHOT_POINT:
        raise SandboxStartError(f"the guest's init sent {first!r} instead of its start signal")


def save(qmp_path: str, target: str, deadline: float) -> None:
    """Write the VM's state to ``target`` (atomically), through QMP; QEMU is paused after."""
    tmp = f"{target}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    try:
        # Written to a descriptor handed over QMP: QEMU's seccomp forbids it to spawn a writer.
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with _Qmp(qmp_path, deadline) as qmp:
            try:
                qmp.execute("getfd", {"fdname": "snapshot"}, fd=out)
            finally:
                os.close(out)
            # Migrated while running (the guest idles in a read, so it converges at
            # once; QEMU pauses it for the last pass): the state then records a
            # running VM, and a restore resumes by itself, with no QMP of its own.
            qmp.execute("migrate", {"uri": "fd:snapshot"})
            while True:
                status = qmp.execute("query-migrate").get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise SandboxStartError(f"QEMU could not save the VM: migration {status}")
                if time.monotonic() > deadline:
                    raise SandboxStartError("QEMU did not finish saving the VM in time")
                time.sleep(0.02)
        os.chmod(tmp, 0o600)  # a guest's memory, even a pristine one
        os.replace(tmp, target)
        # Snapshots are made for one shape and this host's accelerator: any other is
        # of an older QEMU build or command line, which can never restore it. A save a
        # killed host left half-written (tens of MB) goes too.
        for name in os.listdir(os.path.dirname(target)):
            other = os.path.join(os.path.dirname(target), name)
            if (name.endswith(".vmstate") and other != target) or _abandoned(name):
                with contextlib.suppress(OSError):
                    os.unlink(other)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _abandoned(name: str) -> bool:
    """Whether ``name`` is a save's temporary file (``KEY.vmstate.PID.tmp``) whose process is gone."""
    parts = name.split(".")
    if len(parts) < 4 or parts[-1] != "tmp" or parts[-3] != "vmstate" or not parts[-2].isdigit():
        return False
    return not pid_alive(int(parts[-2]))


class _Qmp:
    """Just enough of the QEMU Machine Protocol: greeting, capabilities, commands."""

    def __init__(self, path: str, deadline: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        self.buffer = b""
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise SandboxStartError("QEMU's QMP socket did not appear") from None
                time.sleep(0.01)
        self._message()  # the greeting
        self.execute("qmp_capabilities")

    def __enter__(self) -> _Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, fd: int | None = None) -> dict[str, Any]:
        """Run ``command``; ``fd`` goes along with it (SCM_RIGHTS), as ``getfd`` expects."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        if fd is None:
            self.sock.sendall(data)
        else:
            sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            if sent != len(data):
                self.sock.sendall(data[sent:])
        while True:
            message = self._message()
            if "error" in message:
                raise SandboxStartError(f"QMP {command}: {message['error'].get('desc', message['error'])}")
            if "return" in message:
                result = message["return"]
                return result if isinstance(result, dict) else {}
            # an asynchronous event (STOP, MIGRATION, ...): not the answer

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SandboxStartError("QEMU closed its QMP socket")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        message = json.loads(line)
        return message if isinstance(message, dict) else {}
