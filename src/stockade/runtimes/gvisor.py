"""The ``gvisor`` runtime: the guest agent under gVisor's ``runsc``.

Each sandbox is one OCI container run by ``runsc run`` from a bundle stockade
writes (gvisor_bundle.py): a read-only root holding only mount points, symlinks and a synthesized
``/etc``; ``/usr`` and the agent's code bound read-only; size-capped tmpfs for
``/tmp`` and ``/work``; the policy's shared paths. The host's end of a
socketpair is the container's standard input and output, so the same framed
JSON-RPC reaches the same agent as in every runtime.

- network: gVisor's own netstack with no interface but a private loopback
  (``none`` and ``loopback`` are both private; nothing leaves the sandbox);
- limits: the whole sandbox (Sentry and gofer) runs in the isolate's cgroup
  (``--ignore-cgroups``: stockade makes and fills it), rlimits via OCI;
- platform: of those this runsc offers (systrap, ptrace, kvm), the fastest
  that works here on a small probe (a sandbox that runs eight processes),
  probed once per runsc version and kernel and cached;
  ``STOCKADE_GVISOR_PLATFORM`` overrides;
- violations: gVisor's strace of the dangerous syscalls and its "Unsupported
  syscall" reports, read from the Sentry's debug log as it is written:
  ``detection_layer="GVISOR"``;
- what runsc writes (that log, its stderr) goes into pipes the host drains
  (drain.py), never into host files a flood could grow; the agent, the
  container's init, keeps no descriptor of them (code can open another
  process's descriptors through /proc here, whatever its uid or dumpability);
- teardown: close the socket (the agent, the container's init, exits), kill
  the Sentry through a pidfd, ``runsc delete --force`` if anything is left,
  remove the bundle, the state and the cgroup. A killed runsc's leftovers
  (state dirs, ``runsc-*`` cgroups) are swept at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

from .. import environments
from ..errors import PolicyError, RuntimeUnavailableError, SandboxStartError, printable
from ..policy import Policy, default_policy
from ..settings import current
from .base import Availability
from .drain import Tail, drain, weak
from .gvisor_bundle import HostIds, write_bundle
from .gvisor_log import SentryLog
from .gvisor_state import made_state_root, runsc_binary, runsc_delete, state_root, sweep_state
from .host_program import spawn_in_cgroup
from .hosted import HostedSandbox, abandon_start, closed_to_others, lease_uids, sweep_dead_hosts_dirs
from .pool import PooledRuntime, WarmPool
from .process.cgroups import IsolateCgroup, SweptCgroupManager
from .process.uids import UidLease
from .process.zygote import AGENT_PARENT, system_python
from .reaper import Reaper

BUNDLE_PREFIX = "stockade-gvisor-"  # + "<host pid>-": the sweep removes a dead host's bundles
GVISOR_TASKS = 256  # host tasks gVisor itself needs (Sentry, gofer, platform stubs)
# The Sentry and the gofer are charged to the sandbox's cgroup with the code: with
# less, a sandbox does not start, or its agent's interpreter is OOM-killed.
GVISOR_MIN_MB = 64
START_TIMEOUT_S = 60.0
PLATFORM_PROBE_TIMEOUT_S = 20.0
SENTRY_LOG = "sentry.log"  # a FIFO in the bundle: the Sentry's debug log, drained by the host
# Bytes a second of it the host reads and parses, a second's worth at once (a start writes ~13 KB;
# a traced call, ~250 bytes): past it the Sentry waits to write, and the code's next traced call
# with it. A flood cost the host's one drain thread a third of the CPU the flood took.
SENTRY_LOG_PER_S = 256 << 10
STDERR_KEPT = 4096  # bytes of runsc's stderr the host keeps (the last ones)
LAST_WORDS = 600  # of which an error quotes this many
# Syscalls gVisor traces for us: a call to one of these is reported, blocked or not.
TRACED = (
    "ptrace,process_vm_readv,process_vm_writev,mount,umount2,pivot_root,chroot,setns,unshare,kexec_load,"
    "kexec_file_load,reboot,init_module,finit_module,delete_module,bpf,perf_event_open,keyctl,add_key,request_key,"
    "userfaultfd,open_by_handle_at,name_to_handle_at,iopl,ioperm,acct,settimeofday,clock_settime,adjtimex,swapon,"
    "swapoff,syslog,quotactl,io_uring_setup"
)
_counter = iter(range(1, 1 << 62))


def gvisor_shape(policy: Policy) -> tuple[Any, ...]:
    """What is fixed when the container is created (its rlimits come from the OCI config)."""
    return (
        policy.network_policy,
        policy.filesystem_access,
        policy.disk_mb,
        policy.max_open_files,
        policy.pids_limit,
        policy.max_file_size_bytes,
        policy.environment_id,
    )


def _check_utf8_paths(policy: Policy) -> None:
    """runsc reads its bundle's paths as UTF-8 text: a shared path named in other bytes (kept by
    os.fsdecode as lone surrogates, which the process runtime and a microVM take) would come to it
    changed, and its sandbox fail to start with no word of why."""
    for m in policy.filesystem_access:
        for what, path in (("source", m.source), ("target", m.target)):
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                raise PolicyError(
                    f"filesystem_access {what} {printable(path)!r}: gVisor takes only paths that are UTF-8 "
                    "text (runsc reads them so): rename it, or use the process or microvm runtime"
                ) from None


class GvisorSandbox(HostedSandbox):
    runtime_name = "gvisor"
    wait_s = 5.0

    def __init__(
        self,
        policy: Policy,
        conn: socket.socket,
        proc: subprocess.Popen[bytes],
        container_id: str,
        bundle: str,
        root: str,
        cgroup: IsolateCgroup | None,
        log_fd: int,
        err_fd: int,
    ) -> None:
        super().__init__(policy, conn, proc, bundle, cgroup)
        self.container_id = container_id
        self.bundle = bundle
        self.root = root
        # The read ends of the Sentry's log (a FIFO) and of runsc's stderr (a pipe): the
        # sandbox owns them, the drain reads them (each line of the log as it comes, so a
        # refused call under on_violation=kill ends the sandbox then, not after the run).
        self.log_fd, self.err_fd = log_fd, err_fd
        self._sentry_log = SentryLog()
        self._stderr = Tail(STDERR_KEPT)
        drain().watch(err_fd, self._stderr.feed)
        drain().watch(log_fd, weak(self._read_log), per_s=SENTRY_LOG_PER_S)

    def last_words(self) -> str:
        if self.err_fd >= 0:
            drain().flush(self.err_fd)
        return printable(self._stderr.text()[-LAST_WORDS:].strip())  # it may quote what the guest did

    def attach_sentry(self) -> None:
        """Open a pidfd on the Sentry (the sandbox process) once it has started."""
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(self.bundle, "pid")) as f:
                self.pidfd = os.pidfd_open(int(f.read().strip()))

    def apply_policy(self, policy: Policy) -> None:
        self.policy = policy
        if self.cgroup is not None:
            self.unenforced_limits = _apply_limits(self.cgroup, policy)

    def _collect_violations(self) -> None:
        # The Sentry writes a traced call's line before the call returns to the code:
        # whatever a run did is in the FIFO, if not read already, once its answer is in.
        if self.log_fd >= 0:
            drain().flush(self.log_fd)

    def _read_log(self, chunk: bytes) -> None:
        for seen in self._sentry_log.feed(chunk):
            self._count_violation(seen.name, seen.blocked, seen.build, seen.by_policy)

    def _forget_logs(self) -> None:
        for fd in (self.log_fd, self.err_fd):
            if fd >= 0:
                drain().forget(fd)
        self.log_fd = self.err_fd = -1

    def _release_program(self) -> None:
        runsc_delete(self.root, self.container_id)
        self._forget_logs()


class GvisorRuntime(PooledRuntime[GvisorSandbox]):
    name = "gvisor"
    isolation = "gvisor"

    def __init__(self, pool_size: int = 0) -> None:
        self._lock = threading.Lock()
        self._platform: str | None = None
        self._root = state_root()
        self._cgroups = SweptCgroupManager(self._sweep_own)
        self._pool: WarmPool[GvisorSandbox] | None = None
        if pool_size > 0:
            self._pool = WarmPool(
                lambda policy: self._build(policy, warm=True), gvisor_shape, GvisorSandbox.apply_policy, pool_size
            )
        self._reaper = Reaper()

    # ---- discovery ----------------------------------------------------------------------

    def detect(self) -> Availability:
        runsc = runsc_binary()
        if runsc is None:
            return Availability(self.name, False, self.isolation, "runsc is not installed (apt install runsc)")
        if not os.access(python := system_python(), os.X_OK):
            return Availability(self.name, False, self.isolation, f"{python} (the guest interpreter) is missing")
        agent = os.path.join(AGENT_PARENT, "agent")
        if os.geteuid() == 0 and (closed := closed_to_others(agent)) is not None:
            return Availability(self.name, False, self.isolation, (
                f"{closed} is not readable by other users, and runsc's gofer reads the guest agent "
                f"({agent}) as an unprivileged uid: install stockade where all may read it (/opt/stockade)"
            ))  # fmt: skip
        try:
            platform = self.platform()
        except SandboxStartError as exc:
            return Availability(self.name, False, self.isolation, str(exc))
        version = _runsc_version(runsc)
        details = {"runsc": runsc, "platform": platform, "version": version}
        if statx_broken(version):
            details["known_issue"] = STATX_ISSUE
        return self._probe(details)

    def platform(self) -> str:
        """The fastest gVisor platform that works here, probed once per kernel and runsc version."""
        with self._lock:
            if self._platform is None:
                self._platform = _choose_platform(self._root)
            return self._platform

    def _sweep_own(self) -> None:
        """runsc's state and bundles left by a host that died (its cgroups go with the others)."""
        sweep_state(self._root)
        sweep_dead_hosts_dirs(BUNDLE_PREFIX)

    # ---- sandboxes ----------------------------------------------------------------------

    def start(self, policy: Policy) -> GvisorSandbox:
        return self._build(policy)

    def close(self) -> None:
        self.stop_pool()

    def _build(self, policy: Policy, warm: bool = False) -> GvisorSandbox:
        from .shared_paths import check_mount_sources  # same rules for shared paths

        started = time.monotonic()
        check_mount_sources(policy)
        _check_utf8_paths(policy)
        shared = environments.share(policy)  # its Python environment: one more read-only bind
        runsc = runsc_binary()
        if runsc is None:
            raise RuntimeUnavailableError("runtime gvisor is not available: runsc is not installed (apt install runsc)")
        platform = self.platform()
        manager = self._cgroups.get()
        container_id = f"stockade-{os.getpid()}-{next(_counter)}"
        bundle = tempfile.mkdtemp(prefix=f"{BUNDLE_PREFIX}{os.getpid()}-")
        os.chmod(bundle, 0o711)  # noqa: S103 - traversable, not listable: runsc's gofer reads the rootfs
        cgroup: IsolateCgroup | None = None
        host, guest = socket.socketpair()
        proc: subprocess.Popen[bytes] | None = None
        sandbox: GvisorSandbox | None = None
        log_fd = err_fd = -1
        uids: list[UidLease] = []
        try:
            cgroup = manager.create() if manager.layout.version != "none" else None
            uids = lease_uids(2, cgroup)
            read_only = write_bundle(bundle, shared, warm, HostIds(uids[0].uid, uids[1].uid) if uids else None)
            unenforced = ["memory_mb, pids_limit, cpu_limit: no usable cgroup on this host"]
            if cgroup is not None:
                _apply_limits(cgroup, policy, setup=True)
            made_state_root(self._root)
            # Only the Sentry logs (--debug-command=boot), into a FIFO the host drains, opened
            # here first so that runsc's open of it does not wait for a reader.
            log_path = os.path.join(bundle, SENTRY_LOG)
            os.mkfifo(log_path, 0o600)
            log_fd = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            cmd = [
                runsc, f"--root={self._root}", f"--platform={platform}", "--network=none", "--ignore-cgroups",
                f"--debug-log={log_path}", "--debug-command=boot", "--debug-log-format=json",
                "--strace", f"--strace-syscalls={TRACED}", "--oci-seccomp",
                "run", "--bundle", bundle, "--pid-file", f"{bundle}/pid", container_id,
            ]  # fmt: skip
            # A shell puts itself in the isolate's cgroup, then becomes runsc: every
            # process runsc starts (Sentry, gofer) is born inside the limits. Its stderr,
            # which is also the container's, is a pipe: the agent puts /dev/null there for
            # itself, and what runsc says goes to the drain, of which the host keeps a tail.
            err_fd, err_w = os.pipe2(os.O_CLOEXEC)
            try:
                proc = spawn_in_cgroup(
                    cmd,
                    cgroup,
                    stdin=guest.fileno(),
                    stdout=guest.fileno(),
                    stderr=err_w,
                    label="stockade-gvisor",
                    read_only=read_only,
                )
            finally:
                os.close(err_w)
            guest.close()
            sandbox = GvisorSandbox(policy, host, proc, container_id, bundle, self._root, cgroup, log_fd, err_fd)
            sandbox.uids = uids
            log_fd = err_fd = -1  # the sandbox's now
            try:
                sandbox.ping(timeout=START_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure here is a failed start, with runsc's words
                words = sandbox.last_words() or "runsc said nothing"
                raise SandboxStartError(f"gVisor sandbox did not start: {words} ({exc})") from None
            sandbox.attach_sentry()
            if cgroup is not None:  # booted: the caller's own CPU limit from now on
                unenforced = _apply_limits(cgroup, policy)
            sandbox.unenforced_limits = unenforced
            sandbox.cold_start_ms = (time.monotonic() - started) * 1000
            return sandbox
        except BaseException:
            guest.close()
            if sandbox is not None:
                # It owns every part; closed, it is not released again when collected. runsc first,
                # as abandon_start does (its Sentry may not be watched yet: no wait for it to end).
                if proc is not None:
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):  # the start's own error is the one to raise
                    sandbox.close()
                raise
            host.close()
            # runsc's sandbox and gofer go first (as _release does): without a cgroup, the
            # uids are given back once nothing runs as them, and runsc made those processes.
            runsc_delete(self._root, container_id)
            abandon_start(proc, cgroup, bundle, uids)
            for fd in (log_fd, err_fd):
                if fd >= 0:
                    os.close(fd)
            raise


def _apply_limits(cgroup: IsolateCgroup, policy: Policy, setup: bool = False) -> list[str]:
    # The group holds gVisor itself (the Sentry's and gofer's host threads) and,
    # under the ptrace platform, several host tasks per sandboxed process: its
    # count is a generous backstop; RLIMIT_NPROC inside gVisor is the exact limit, which code in a
    # user namespace of gVisor's escapes (docs/runtime-gvisor.md): then this ends the sandbox.
    memory = max(policy.memory_mb, GVISOR_MIN_MB)
    missing = cgroup.apply_limits(memory, policy.pids_limit * 4 + GVISOR_TASKS, policy.cpu_limit, setup=setup)
    if policy.memory_mb < GVISOR_MIN_MB:
        missing.append(f"memory_mb below {GVISOR_MIN_MB}: the sandbox gets {GVISOR_MIN_MB} MB (gVisor itself counts)")
    return missing


def _runsc_version(runsc: str) -> str:
    try:
        out = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
        return out.splitlines()[0].removeprefix("runsc version ").strip() if out else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# Debian 12's own runsc (2022-12-19) answers statx() with EINVAL when the flags
# include AT_NO_AUTOMOUNT, which coreutils always passes; the 2024-07 build in
# bookworm-backports does not (docs/runtime-gvisor.md).
STATX_BROKEN_UNTIL = 20221219
STATX_ISSUE = "ls and stat fail inside (statx with AT_NO_AUTOMOUNT: EINVAL); runsc >= 2024-07 fixes it"


def build_date(version: str) -> int | None:
    """The date a runsc build was cut, as YYYYMMDD, from its version ("0.0~20240729.0",
    "release-20240729.0"); None when the version names none."""
    match = re.search(r"(?<!\d)(20\d{6})(?!\d)", version)
    return int(match.group(1)) if match else None


def statx_broken(version: str) -> bool:
    """Whether this runsc build fails statx with AT_NO_AUTOMOUNT, so that ls and stat fail inside."""
    built = build_date(version)
    return built is not None and built <= STATX_BROKEN_UNTIL


def _platform_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stockade", "gvisor-platform.json")


def _choose_platform(root: str) -> str:
    forced = current().gvisor_platform
    if forced:
        return forced
    runsc = runsc_binary()
    if runsc is None:
        raise SandboxStartError("runsc is not installed (apt install runsc)")
    key = f"{_runsc_version(runsc)} {os.uname().release}"
    cache = _platform_cache()
    with contextlib.suppress(OSError, ValueError):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return str(cached["platform"])
    candidates = [
        p
        for p in known_platforms(runsc)
        if p != "kvm" or (os.access("/dev/kvm", os.R_OK | os.W_OK) and not os.path.isdir("/sys/module/kvm_pvm"))
    ]  # kvm: none here, or PVM's, on which guests hang (HOST_NOTES): not worth a probe
    timings = {p: ms for p in candidates if (ms := _probe_platform(runsc, root, p)) is not None}
    chosen = min(timings, key=timings.__getitem__) if timings else "ptrace"
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "w") as f:
            json.dump({"key": key, "platform": chosen, "probe_ms": timings}, f)
    return chosen


# runsc has no command that lists its platforms; its -platform flag's help names
# them: "specifies which platform to use: systrap (default), ptrace, kvm."
_PLATFORM_HELP = re.compile(r"-platform string\s+specifies which platform to use: ([^.\n]*)")
_PLATFORMS = ("systrap", "ptrace", "kvm")


def known_platforms(runsc: str) -> list[str]:
    """The platforms this runsc build offers (of those stockade knows), from ``runsc flags``."""
    try:
        out = subprocess.run([runsc, "flags"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ["ptrace"]
    return platforms_from_flags(out.stdout + out.stderr)


def platforms_from_flags(text: str) -> list[str]:
    match = _PLATFORM_HELP.search(text)
    named = re.findall(r"[a-z]+", match.group(1)) if match else []
    return [p for p in _PLATFORMS if p in named] or ["ptrace"]


# What a platform is timed on: a sandbox started and eight processes run in it,
# the shape of a typical run. Which platform wins depends on the host: on a VM
# like this one ptrace starts processes about twice as fast as systrap, which
# in turn runs syscall-heavy loops about twice as fast (docs/runtime-gvisor.md).
_PROBE_ARGV = ["/usr/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8; do /usr/bin/true; done"]


def _probe_platform(runsc: str, root: str, platform: str) -> float | None:
    """Milliseconds ``platform`` takes for the probe's sandbox (best of two), or None if it
    fails there. KVM can hang on some hosts: each try is bounded by a timeout."""
    # Named as a sandbox's are, by this process's pid: a host killed mid-probe leaves nothing the sweep misses.
    bundle = tempfile.mkdtemp(prefix=f"{BUNDLE_PREFIX}{os.getpid()}-probe-")
    container_id = f"stockade-probe-{os.getpid()}-{platform}"
    try:
        write_bundle(bundle, default_policy(), warm=False)
        with open(os.path.join(bundle, "config.json")) as f:
            config = json.load(f)
        config["process"]["args"] = _PROBE_ARGV
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(config, f)
        made_state_root(root)
        best: float | None = None
        for _ in range(2):
            started = time.monotonic()
            proc = subprocess.Popen(
                [runsc, f"--root={root}", f"--platform={platform}", "--network=none", "--ignore-cgroups",
                 "run", "--bundle", bundle, container_id],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                status = proc.wait(timeout=PLATFORM_PROBE_TIMEOUT_S)
                elapsed = (time.monotonic() - started) * 1000
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None
            finally:
                runsc_delete(root, container_id)  # not timed: the same for every platform
            if status != 0:
                return None
            best = elapsed if best is None else min(best, elapsed)
        return best
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
