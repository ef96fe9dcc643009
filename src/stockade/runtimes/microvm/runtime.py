"""The ``microvm`` runtime: one QEMU ``-M microvm`` VM per sandbox, with a kernel of its own.

- acceleration: KVM where it really works (probed once with a bounded boot and
  cached: /dev/kvm opens on PVM hosts but a stock guest never boots there),
  TCG software emulation otherwise; ``STOCKADE_MICROVM_ACCEL`` forces one.
  Every result's ``runtime_used`` is ``microvm``; ``doctor`` says which accel.
- guest: the image of ``stockade image build`` (ELF vmlinux through PVH, an
  initramfs with busybox, the virtio/9p modules and the agent); the host's
  ``/usr`` read-only over 9p; the policy's shared paths as more 9p shares;
  no network device at all (``loopback`` brings the guest's ``lo`` up).
- channel: virtio-serial (``virtserialport`` on a Unix-socket chardev) to the
  agent's ``/dev/vport0p1``: the same framed JSON-RPC as every runtime.
  (vsock needs /dev/vhost-vsock, which this kind of host does not have.)
- limits: guest RAM = ``memory_mb``; QEMU itself runs in the isolate's cgroup
  (guest RAM + emulator overhead; CPU quota); ``RLIMIT_NPROC`` inside the
  guest; OOM kills inside the guest are read from the guest kernel's console,
  which, like QEMU's stderr, is a pipe the host drains, keeping bounded amounts
  (console.py), never a host file the guest could grow.
- QEMU itself: jailed (jail.py): seccomp, Landlock, its own network and IPC
  namespaces, no new privileges, no capabilities beyond shared-path access.
- teardown: closing the socket ends the agent and the guest powers off; QEMU
  is killed through a pidfd anyway; the run directory and cgroup are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from ... import environments
from ...errors import RuntimeUnavailableError, SandboxError, SandboxStartError
from ...policy import Policy, default_policy
from ...result import SecurityViolation
from ...settings import current
from ..base import Availability, IsolateUsage
from ..host_program import spawn_in_cgroup
from ..hosted import HostedSandbox, abandon_start, lease_uids, sweep_dead_hosts_dirs
from ..pool import PooledRuntime, WarmPool, pool_shapes_setting
from ..process import seccomp
from ..process.cgroups import IsolateCgroup, SweptCgroupManager
from ..process.uids import UidLease
from ..reaper import Reaper
from . import image as guest_image
from . import jail, snapshot
from .console import QemuOutput
from .qemu import MIN_GUEST_MB, qemu_command

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 120.0
KVM_PROBE_TIMEOUT_S = 25.0
QEMU_OVERHEAD_MB = 256
MICROVM_POOL_SHAPES = 2  # the default shape and one more, unless STOCKADE_POOL_SHAPES says otherwise
RUN_PREFIX = "stockade-microvm-"
_counter = iter(range(1, 1 << 62))


def microvm_shape(policy: Policy) -> tuple[Any, ...]:
    """Fixed at boot: RAM, shares, network, scratch size, and the guest's own rlimits."""
    return (policy.memory_mb, policy.filesystem_access, policy.network_policy, policy.disk_mb, policy.environment_id)


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


class MicrovmSandbox(HostedSandbox):
    runtime_name = "microvm"

    def __init__(
        self,
        policy: Policy,
        conn: socket.socket,
        proc: subprocess.Popen[bytes],
        rundir: str,
        cgroup: IsolateCgroup | None,
        accel: str,
        output: QemuOutput,
    ) -> None:
        super().__init__(policy, conn, proc, rundir, cgroup)
        self.rundir = rundir
        self.accel = accel
        self.output = output  # the console and QEMU's stderr, drained (console.py)
        self.restored = False  # resumed from a snapshot rather than booted
        self.pidfd = os.pidfd_open(proc.pid)
        self.guest_seccomp = False  # the guest's agent keeps the seccomp profile (its ping says)

    def last_words(self) -> str:
        return self.output.last_words()

    def apply_policy(self, policy: Policy) -> None:
        self.policy = policy  # the VM's shape equals the policy's (see microvm_shape)
        if self.cgroup is not None:
            self.unenforced_limits = _apply_limits(self.cgroup, policy) + self.guest_gaps()

    def guest_gaps(self) -> list[str]:
        """What the guest itself could not enforce."""
        if self.guest_seccomp:
            return []
        return [
            "seccomp inside the guest: its kernel refused the filter, so no syscall is refused or seen"
            " (set-ID bits on files in shared paths included)"
        ]

    def _agent_notice(self, method: str, params: dict[str, Any]) -> None:
        """The guest's filter refused a call (agent/guest.py ``_GuestFilter``).

        Reported by the agent inside the VM, not seen by the host: believed as
        far as it goes (a guest can hide its own calls from this report, never
        make them succeed), and bounded like every runtime's (violations.py),
        since a guest can send any number.
        """
        if method != "violation" or not self.guest_seccomp:
            return
        call = _guest_call(params)
        if call is not None:  # a record is made only while the run's report has room
            self._count_violation(seccomp.call_name(call[0])[0], True, lambda: _guest_record(*call))

    def usage(self, peak: bool = True) -> IsolateUsage:
        usage = super().usage(peak)
        # The host cgroup holds the emulator, not the guest's processes: an OOM kill
        # inside the guest shows on the guest kernel's console, which the guest's
        # unprivileged code cannot write to.
        usage.oom_kills += self.output.count_oom_kills()
        return usage

    def _release_program(self) -> None:
        self.output.close()  # QEMU has exited: nothing writes to them any more


class MicrovmRuntime(PooledRuntime[MicrovmSandbox]):
    name = "microvm"
    isolation = "microvm"

    def __init__(self, pool_size: int = 0) -> None:
        self._lock = threading.RLock()  # accel() builds a probe VM, which takes the lock again
        self._accel: str | None = None
        self._checked: MicrovmSandbox | None = None  # the VM that detect() booted, not yet used
        self._version: str | None = None  # of the QEMU build, for snapshot keys
        self._cgroups = SweptCgroupManager(lambda: sweep_dead_hosts_dirs(RUN_PREFIX))
        self._pool: WarmPool[MicrovmSandbox] | None = None
        if pool_size > 0:
            # A pooled VM holds its guest RAM: fewer shapes than the lighter runtimes keep.
            self._pool = WarmPool(
                self._build,
                microvm_shape,
                MicrovmSandbox.apply_policy,
                pool_size,
                max_shapes=pool_shapes_setting(default=MICROVM_POOL_SHAPES),
            )
        self._reaper = Reaper()

    def detect(self) -> Availability:
        if qemu_binary() is None:
            return Availability(self.name, False, self.isolation, "qemu-system-x86_64 is not installed")
        details: dict[str, Any] = {}
        try:
            # As start() does: a missing guest image is built (once), not a reason to say no.
            details["image"] = (guest_image.find_image() or guest_image.build()).directory
            details["accel"] = self.accel()
            details["qemu_confinement"] = jail.describe(self._qemu())
            sandbox = self.start(Policy())
            try:
                sandbox.ping()
            except SandboxError:
                sandbox.close()
                raise
            details["snapshot"] = "restored" if sandbox.restored else "none (stockade image build saves one)"
        except SandboxError as exc:  # a failed start, or an agent that did not answer
            return Availability(self.name, False, self.isolation, str(exc), details)
        # A boot is the only honest check, and seconds long under TCG: keep the
        # VM it produced for the next start instead of booting another.
        with self._lock:
            if self._checked is not None:
                self._checked.close()
            self._checked = sandbox
        return Availability(self.name, True, self.isolation, "", details)

    def accel(self) -> str:
        with self._lock:
            if self._accel is None:
                self._accel = _choose_accel(self)
            return self._accel

    def start(self, policy: Policy) -> MicrovmSandbox:
        with self._lock:
            checked, self._checked = self._checked, None
        if checked is not None:
            if microvm_shape(checked.policy) == microvm_shape(policy) and _answers(checked):
                checked.apply_policy(policy)
                return checked
            checked.close()
        return self._build(policy)

    def close(self) -> None:
        with self._lock:
            checked, self._checked = self._checked, None
        if checked is not None:
            checked.close()
        self.stop_pool()

    def _build(
        self, policy: Policy, accel: str | None = None, boot_timeout: float = BOOT_TIMEOUT_S, restore: bool = True
    ) -> MicrovmSandbox:
        """Start a VM for ``policy``: restored from a snapshot when one fits, booted otherwise."""
        from ..shared_paths import check_mount_sources  # same rules for shared paths

        started = time.monotonic()
        check_mount_sources(policy)
        # Its Python environment is one more read-only 9p share (QEMU's command, its jail, the guest).
        shared = environments.share(policy)
        accel = accel or self.accel()
        plan = self._plan(shared, accel)
        restored_from, state = None, -1
        if restore and snapshots_enabled():
            try:
                restored_from = snapshot.find(plan.snapshot_key)
                # QEMU reads the state from a descriptor opened here: it may not spawn a reader (jail.py).
                state = snapshot.open_state(restored_from) if restored_from is not None else -1
            except OSError:
                restored_from = None  # set aside meanwhile by a failed restore elsewhere: boot
        deadline = started + boot_timeout
        if restored_from is None:
            launched = self._launch(shared, plan, [])
        else:
            try:
                launched = self._launch(shared, plan, snapshot.incoming_args(state), state)
            except SandboxStartError:
                # It died before its agent's socket appeared: a snapshot it cannot resume, as below.
                return self._boot_instead(policy, accel, boot_timeout, plan.snapshot_key)
            finally:
                os.close(state)
        conn, unenforced, cgroup, output = launched.conn, launched.unenforced, launched.cgroup, launched.output
        try:
            sandbox = MicrovmSandbox(policy, conn, launched.proc, plan.rundir, cgroup, accel, output)
        except BaseException:  # no descriptor left for its pidfd, say: nothing may outlive the start
            conn.close()
            abandon_start(launched.proc, cgroup, plan.rundir, launched.uids)
            output.close()
            raise
        sandbox.uids = launched.uids  # it owns every part
        try:
            if restored_from is None:
                snapshot.wait_for_snapshot_point(conn, deadline)  # a restored guest is already past it
            conn.sendall(snapshot.go_line(policy.disk_mb, policy.network_policy))
            pong = sandbox.ping(timeout=max(1.0, deadline - time.monotonic()))
            sandbox.guest_seccomp = pong.get("guest_seccomp") is True
        except Exception as exc:  # noqa: BLE001 - a failed boot, with the console's last words
            how = "restore" if restored_from else "boot"
            why = f"the microVM did not {how} ({accel}): {_tail(output)} ({exc})"
            sandbox.close()
            if restored_from is not None:
                return self._boot_instead(policy, accel, boot_timeout, plan.snapshot_key)
            raise SandboxStartError(why) from None
        if cgroup is not None:  # booted: the caller's own CPU limit from now on
            unenforced = _apply_limits(cgroup, policy)
        sandbox.unenforced_limits = unenforced + sandbox.guest_gaps()
        sandbox.restored = restored_from is not None
        sandbox.cold_start_ms = (time.monotonic() - started) * 1000
        return sandbox

    def _boot_instead(self, policy: Policy, accel: str, boot_timeout: float, snapshot_key: str) -> MicrovmSandbox:
        """A restore failed: boot. A snapshot this QEMU cannot resume is of no use and is
        dropped, but only if the boot works (else the fault lies elsewhere)."""
        snapshot.set_aside(snapshot_key)
        try:
            booted = self._build(policy, accel, boot_timeout, restore=False)
        except BaseException:
            snapshot.settle(snapshot_key, booted=False)
            raise
        snapshot.settle(snapshot_key, booted=True)
        return booted

    def make_snapshot(self, boot_timeout: float = BOOT_TIMEOUT_S) -> str:
        """Boot the default policy's VM to its snapshot point and save it; return the file.

        Reuses a snapshot that is still valid for this QEMU, image and accelerator.
        """
        policy = default_policy()
        accel = self.accel()
        plan = self._plan(policy, accel)
        found = snapshot.find(plan.snapshot_key)
        if found is not None:
            shutil.rmtree(plan.rundir, ignore_errors=True)
            return found
        qmp = os.path.join(plan.rundir, "qmp.sock")
        deadline = time.monotonic() + boot_timeout
        launched = self._launch(policy, plan, ["-qmp", f"unix:{qmp},server=on,wait=off"])
        conn, output = launched.conn, launched.output
        try:
            snapshot.wait_for_snapshot_point(conn, deadline)
            snapshot.save(qmp, snapshot.path_for(plan.snapshot_key), deadline + snapshot.QMP_TIMEOUT_S)
        except SandboxStartError as exc:
            raise SandboxStartError(f"no snapshot ({accel}): {exc}; {_tail(output)}") from None
        finally:
            conn.close()
            abandon_start(launched.proc, launched.cgroup, plan.rundir, launched.uids)
            output.close()
        return snapshot.path_for(plan.snapshot_key)

    def _plan(self, policy: Policy, accel: str) -> _Plan:
        """A run directory and the QEMU command for ``policy``, with the key of the snapshot it can resume."""
        qemu = self._qemu()
        image = guest_image.find_image() or guest_image.build()
        rundir = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-{next(_counter)}-")
        try:
            agent_socket = os.path.join(rundir, "agent.sock")
            cmd = qemu_command(qemu, image, policy, accel, rundir, agent_socket)
            key = snapshot.key(cmd, rundir, self._qemu_version(qemu))
        except BaseException:
            shutil.rmtree(rundir, ignore_errors=True)  # from here on, _launch owns it
            raise
        return _Plan(rundir, agent_socket, cmd, key, image.directory, accel, (image.kernel, image.initramfs))

    def _launch(self, policy: Policy, plan: _Plan, extra_args: list[str], state_fd: int | None = None) -> _Launched:
        """QEMU in the isolate's cgroup and its jail (jail.py), as root on a host uid leased for
        it, connected to; on failure nothing is left behind. ``state_fd``, a snapshot to resume,
        is handed to QEMU."""
        manager = self._cgroups.get()
        cgroup: IsolateCgroup | None = None
        uids: list[UidLease] = []
        proc: subprocess.Popen[bytes] | None = None
        output: QemuOutput | None = None
        try:
            cgroup = manager.create() if manager.layout.version != "none" else None
            unenforced = ["memory_mb (host side), cpu_limit: no usable cgroup for QEMU on this host"]
            if cgroup is not None:
                unenforced = _apply_limits(cgroup, policy, setup=True)
            uids = lease_uids(1, cgroup)
            uid = uids[0].uid if uids else None
            if uid is not None:  # its sockets are made there, and its console FIFO opened
                os.chown(plan.rundir, uid, uid)
            output = QemuOutput(plan.rundir, owner=uid)
            err = output.stderr_w
            cgroup_files = cgroup.procs_files if cgroup else ()
            rules = jail.file_rules(policy, plan.cmd[0], plan.rundir, plan.image_dir, cgroup_files)
            # The image is the caller's cache (root's home is root's alone): QEMU, on a uid of its
            # own, opens the kernel and initramfs through descriptors opened here, which it
            # reopens as /dev/fd/N (the files themselves are readable by all).
            boot_fds: list[int] = []
            try:
                for path in plan.boot_files:
                    boot_fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                opened = dict(zip(plan.boot_files, (f"/dev/fd/{fd}" for fd in boot_fds), strict=True))
                cmd = [*jail.prefix(uid, plan.accel), *(opened.get(arg, arg) for arg in plan.cmd), *extra_args]
                proc = spawn_in_cgroup(
                    cmd, cgroup, stdin=subprocess.DEVNULL, stdout=err, stderr=err, label="stockade-microvm",
                    pass_fds=(*boot_fds, *(() if state_fd is None else (state_fd,))), landlock=rules,
                    listens_only=True,
                )  # fmt: skip
            finally:
                for fd in boot_fds:
                    os.close(fd)
            output.spawned()
            conn = _connect(plan.agent_socket, proc, time.monotonic() + 10, output)
        except BaseException:
            abandon_start(proc, cgroup, plan.rundir, uids)
            if output is not None:
                output.close()
            raise
        return _Launched(proc, cgroup, conn, unenforced, output, uids)

    def _qemu(self) -> str:
        qemu = qemu_binary()
        if qemu is None:
            raise RuntimeUnavailableError(
                "runtime microvm is not available: qemu-system-x86_64 is not installed (apt install qemu-system-x86)"
            )
        return qemu

    def _qemu_version(self, qemu: str) -> str:
        with self._lock:
            if self._version is None:
                self._version = snapshot.qemu_version(qemu)
            return self._version


@dataclass(frozen=True)
class _Plan:
    rundir: str
    agent_socket: str
    cmd: list[str]
    snapshot_key: str
    image_dir: str  # the guest's kernel and initramfs, which QEMU reads
    accel: str
    boot_files: tuple[str, ...]  # the kernel and initramfs, under image_dir


class _Launched(NamedTuple):
    """A QEMU started for a VM, and what was made for it."""

    proc: subprocess.Popen[bytes]
    cgroup: IsolateCgroup | None
    conn: socket.socket  # to the guest's agent
    unenforced: list[str]  # the limits not enforced
    output: QemuOutput  # what QEMU writes (the guest console, its stderr), drained by the host
    uids: list[UidLease]  # the host uid QEMU runs as (none: rootless)


def snapshots_enabled() -> bool:
    """``STOCKADE_MICROVM_SNAPSHOTS=0`` makes every start a boot (for measuring one, say)."""
    return current().microvm_snapshots


def _apply_limits(cgroup: IsolateCgroup, policy: Policy, setup: bool = False) -> list[str]:
    memory = max(policy.memory_mb, MIN_GUEST_MB) + QEMU_OVERHEAD_MB
    # pids: QEMU's own threads; the policy's count is RLIMIT_NPROC inside the guest.
    missing = cgroup.apply_limits(memory, 256, policy.cpu_limit, setup=setup)
    if policy.memory_mb < MIN_GUEST_MB:
        missing.append(f"memory_mb below {MIN_GUEST_MB}: the guest gets {MIN_GUEST_MB} MB (its kernel needs it)")
    return missing


def guest_violation(params: dict[str, Any]) -> SecurityViolation | None:
    """The report of the guest filter's ``violation`` notification, or None if it is malformed."""
    call = _guest_call(params)
    return None if call is None else _guest_record(*call)


def _guest_call(params: dict[str, Any]) -> tuple[int, tuple[int, ...], int | None] | None:
    """The call (number, arguments, pid) a ``violation`` notification names, or None if it is malformed."""
    nr, args, pid = params.get("nr"), params.get("args"), params.get("pid")
    if not isinstance(nr, int) or isinstance(nr, bool) or not seccomp.is_call(nr):  # i386's, x32's too
        return None
    if not isinstance(args, list) or len(args) > 6 or not all(_is_int(a) and 0 <= a < 1 << 64 for a in args):
        return None
    return nr, tuple(args), pid if _is_int(pid) else None


def _guest_record(nr: int, args: tuple[int, ...], pid: int | None) -> SecurityViolation:
    return seccomp.violation_for(nr, args, pid, " (refused inside the guest)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _connect(path: str, proc: subprocess.Popen[bytes], deadline: float, output: QemuOutput) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            # What QEMU printed is the reason (a refused option, a library its jail
            # does not let it load, a device it cannot open): pass it on.
            if proc.poll() is not None:
                raise SandboxStartError(
                    f"QEMU {_exit_words(proc.returncode)} before its agent socket appeared ({_tail(output)})"
                ) from None
            if time.monotonic() > deadline:
                raise SandboxStartError(f"QEMU made no agent socket within 10 s ({_tail(output)})") from None
            time.sleep(0.01)


def _exit_words(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _tail(output: QemuOutput) -> str:
    return output.last_words() or "no output"


def _cache_file() -> str:
    return os.path.join(os.path.dirname(guest_image.cache_root()), "microvm-accel.json")


def _choose_accel(runtime: MicrovmRuntime) -> str:
    forced = current().microvm_accel
    if forced:
        return forced
    reachable, shape = jail.kvm_access()
    if not reachable:
        return "tcg"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "tcg"  # PVM: /dev/kvm opens, but a stock guest kernel hangs at boot (HOST_NOTES)
    key = f"{os.uname().release}; {shape}"
    with contextlib.suppress(OSError, ValueError):
        with open(_cache_file()) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return str(cached["accel"])
    # /dev/kvm opens on PVM-based hosts, but a stock guest kernel never boots
    # there: only a real boot, bounded in time, says whether KVM works.
    chosen = "tcg"
    try:
        with runtime._build(default_policy(), accel="kvm", boot_timeout=KVM_PROBE_TIMEOUT_S) as probe:
            probe.ping()
            chosen = "kvm"
    except SandboxStartError:
        chosen = "tcg"
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(_cache_file()), exist_ok=True)
        with open(_cache_file(), "w") as f:
            json.dump({"key": key, "accel": chosen}, f)
    return chosen


def _answers(sandbox: MicrovmSandbox) -> bool:
    """Whether a VM kept since the availability check still answers (else a fresh one is built)."""
    try:
        return bool(sandbox.ping().get("pong"))
    except SandboxError:
        return False
