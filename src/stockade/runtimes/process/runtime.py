"""The ``process`` runtime: stockade's own Linux confinement.

An isolate is a process tree in fresh user, pid, mount, net, ipc, uts and
cgroup namespaces, pivot_rooted into a minimal root, with no capabilities,
no_new_privs, rlimits, cgroup limits, Landlock and a seccomp filter whose
blocked calls are answered and reported by the host (``supervisor.Supervisor``).
The sequence itself is in ``stockade/agent/confine.py``; this module is the
host half: it prepares the cgroup and the config, asks the zygote for an
isolate, checks its handshake (``handshake.py``), and owns it until ``close``.
"""

from __future__ import annotations

import base64
import os
import platform
import signal
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from ... import environments
from ...agent import linux
from ...egress import PROXY_PORT
from ...errors import PolicyError
from ...policy import ENV_ROOT, Policy, default_policy
from ..base import BASE_ENV, Availability, IsolateUsage
from ..egress import attach_egress
from ..pool import PooledRuntime, WarmPool
from ..publish import AgentRelay, AsyncTurn, Forwarder
from ..reaper import Reaper
from ..sandbox import AgentSandbox
from ..shared_paths import check_mount_sources
from . import netlink, supervisor
from .cgroups import IsolateCgroup
from .factory import IsolateFactory, dispose, outer_ids, release_uid
from .handshake import kill_pidfd, pid_of, receive_isolate
from .uids import UidLease
from .zygote import system_python

if TYPE_CHECKING:
    from ...egress.workers import EgressWorker


def isolate_shape(policy: Policy) -> tuple[Any, ...]:
    """What is fixed when an isolate is built (the rest is applied at hand-over)."""
    return (policy.network_policy, policy.filesystem_access, policy.disk_mb, policy.environment_id)


class ProcessSandbox(AgentSandbox):
    runtime_name = "process"

    def __init__(
        self,
        policy: Policy,
        conn: socket.socket,
        cold_start_ms: float,
        cgroup: IsolateCgroup | None,
        pidfd: int,
        listener: int,
        uid: UidLease | None,
    ) -> None:
        super().__init__(policy, conn, cold_start_ms)
        self.cgroup = cgroup
        self.forks_counted = cgroup is not None and cgroup.counts_refused_forks
        self.uid = uid  # the host uid this isolate runs as (None: rootless, the caller's own)
        self.pidfd = pidfd
        self.listener = listener
        self.egress_sockets: list[socket.socket] = []  # until the egress worker takes them
        self.egress_worker: EgressWorker | None = None  # started with the isolate under an allowlist
        self._released = False
        # The supervisor records a violation before it lets the blocked call return,
        # so every violation of a run is in the log by the time its reply is. It holds the
        # sandbox weakly: a sandbox its owner drops is collected (and closed), as on every runtime.
        counted = weakref.WeakMethod(self._count_violation)

        def count(*args: Any, **kwargs: Any) -> None:
            if (method := counted()) is not None:
                method(*args, **kwargs)

        supervisor.supervisor().watch(listener, count, network=policy.network_policy == "allowlist")

    def usage(self, peak: bool = True) -> IsolateUsage:
        return self.cgroup.usage(peak) if self.cgroup else IsolateUsage()

    def _forwarder(self, address: str, host_port: int, port: int, turn: AsyncTurn | None) -> Forwarder | AgentRelay:
        # As root, the host joins the isolate's network namespace through its init's pidfd
        # (publish.py). Without root (rootless, or a daemon that gave root up) it cannot join
        # one: relayed through the agent, as for gVisor.
        if os.geteuid() != 0:
            return AgentRelay(self, address, host_port, port, turn)
        return Forwarder(self.pidfd, address, host_port, port)

    def _take_egress(self) -> tuple[list[socket.socket], EgressWorker]:
        # The sockets were made by the isolate's init at setup, in its network namespace
        # (confine.egress_sockets); the worker was started with the isolate.
        taken, self.egress_sockets = self.egress_sockets, []
        worker, self.egress_worker = self.egress_worker, None
        if len(taken) != 2 or worker is None:
            for sock in taken:
                sock.close()
            if worker is not None:
                worker.close()
            raise PolicyError("this isolate was not built for network_policy 'allowlist'")
        return taken, worker

    def isolate_pid(self) -> int | None:
        return pid_of(self.pidfd) if self.pidfd >= 0 else None

    def apply_policy(self, policy: Policy) -> None:
        """Set the limits of ``policy`` on this (pooled) isolate before it runs anything."""
        self.policy = policy
        if self.cgroup is not None:
            self.unenforced_limits = self.cgroup.apply_limits(policy.memory_mb, policy.pids_limit, policy.cpu_limit)
        else:
            self.unenforced_limits = ["memory_mb, pids_limit, cpu_limit: no usable cgroup on this host"]
        attach_egress(self, policy)

    def kill(self) -> None:
        # init of the pid namespace: when it dies the kernel kills everything
        # else in it, so one signal ends the isolate (the cgroup sweep in
        # _release catches anything still in the group).
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except PermissionError:
                # A daemon that gave root up (and CAP_KILL, where cgroup.kill ends a group) may not
                # signal an isolate's uid: its group is its own to empty.
                if self.cgroup is not None:
                    self.cgroup.kill()
            except OSError:
                pass

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self.cgroup is not None:
            self.cgroup.kill()
        supervisor.supervisor().forget(self.listener)
        for sock in self.egress_sockets:
            sock.close()
        if self.egress_worker is not None:  # never handed over
            self.egress_worker.close()
            self.egress_worker = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        release_uid(self.uid, self.cgroup.remove() if self.cgroup is not None else True)


class ProcessRuntime(PooledRuntime[ProcessSandbox]):
    name = "process"
    isolation = "process"
    egress_proxy = True  # its isolates' loopback is a host network namespace the proxy can listen in

    def __init__(self, pool_size: int = 0) -> None:
        self._lock = threading.Lock()
        self._factory = IsolateFactory()
        self._bpf: bytes | None = None
        self._landlock_abi = 0
        self._pool: WarmPool[ProcessSandbox] | None = None
        if pool_size > 0:
            self._pool = WarmPool(
                lambda policy: self._build(policy, warm=True), isolate_shape, ProcessSandbox.apply_policy, pool_size
            )
        self._reaper = Reaper()

    # ---- discovery ----------------------------------------------------------------------

    def detect(self) -> Availability:
        details: dict[str, Any] = {}
        if platform.system() != "Linux":
            return Availability(self.name, False, self.isolation, "the process runtime needs Linux")
        if platform.machine() not in ("x86_64", "AMD64"):
            return Availability(
                self.name,
                False,
                self.isolation,
                f"the seccomp profile is x86_64-only; this host is {platform.machine()}",
            )
        if not os.access(python := system_python(), os.X_OK):
            return Availability(self.name, False, self.isolation, f"{python} (the guest interpreter) is missing")
        layout = self._factory.cgroups.get().layout
        details["cgroup"] = layout.version
        details["cgroup_limits"] = sorted(layout.limits)
        details["cgroup_problems"] = layout.problems
        details["landlock_abi"] = linux.landlock_abi()
        details["uid"] = os.getuid()
        return self._probe(details)

    @property
    def factory(self) -> IsolateFactory:
        return self._factory

    def adopt(self, factory: IsolateFactory) -> None:
        """Build from a factory the caller started early (the CLI overlaps its boot with imports),
        unless this runtime's own has started (a zygote of its own, root given up to the daemon's
        user): that one stays, and ``factory`` is closed."""
        with self._lock:
            if self._factory.started:
                unused = factory
            else:
                unused, self._factory = self._factory, factory
        unused.close()

    def hand_to(self, uid: int, gid: int) -> None:
        """Before the daemon drops root to ``uid`` (``IsolateFactory.hand_to``)."""
        self._factory.hand_to(uid, gid)
        self._filters()

    def can_end_groups(self) -> bool:
        """Whether its isolates' groups can be emptied with cgroup.kill (no signal to another uid needed)."""
        return self._factory.cgroups.get().layout.isolates_in_v2

    def _filters(self) -> bytes:
        """The seccomp program and the Landlock ABI, read once."""
        with self._lock:
            if self._bpf is None:
                self._bpf = netlink.program(allowlist=False)
                self._landlock_abi = linux.landlock_abi()
            return self._bpf

    # ---- isolates -----------------------------------------------------------------------

    def start(self, policy: Policy) -> ProcessSandbox:
        """A fresh isolate for ``policy``, built now (the cold path)."""
        return self._build(policy)

    def warm_up(self) -> None:
        """Start the zygote and fill the pool now, instead of on first use."""
        self._factory.zygote()
        self._filters()
        super().warm_up()

    def close(self) -> None:
        self.stop_pool()
        self._factory.close()

    def _build(self, policy: Policy, warm: bool = False) -> ProcessSandbox:
        """Build an isolate; ``warm`` (for the pool) pre-warms it, at a cost no caller waits for."""
        started = time.monotonic()
        check_mount_sources(policy)
        shared = environments.share(policy)  # its Python environment, mounted with its shared paths
        factory = self._factory
        zygote = factory.zygote()
        bpf = self._filters()
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            cgroup, uid = factory.take()  # where the zygote's spare child waits, when it made one
        except BaseException:
            host.close()
            guest.close()
            raise
        pidfd = listener = -1
        worker: EgressWorker | None = None
        try:
            config = self._config(shared, cgroup, uid, bpf)
            config["warm"] = warm
            if policy.network_policy == "allowlist":  # started first: its imports overlap the isolate's start
                from ...egress.workers import EgressWorker

                worker = EgressWorker(uid.uid if uid is not None else None)
            unenforced = ["memory_mb, pids_limit, cpu_limit: no usable cgroup on this host"]
            if cgroup is not None:
                # A pooled isolate is built with the default policy's limits; hand-over
                # rewrites them only when the caller's policy differs.
                cgroup.apply_limits(policy.memory_mb, policy.pids_limit, policy.cpu_limit, setup=True)
            zygote.spawn(config, guest.fileno())
            guest.close()
            pidfd, listener, egress = receive_isolate(host)
            if cgroup is not None:  # set up: the caller's own CPU limit from now on
                unenforced = cgroup.apply_limits(policy.memory_mb, policy.pids_limit, policy.cpu_limit)
            sandbox = ProcessSandbox(policy, host, (time.monotonic() - started) * 1000, cgroup, pidfd, listener, uid)
            sandbox.egress_sockets, sandbox.egress_worker, worker = egress, worker, None
            sandbox.unenforced_limits = unenforced
            if factory.spares:  # off the critical path: the caller is about to run something in this isolate
                self._reaper.defer(lambda: factory.prepare_next(zygote, _default_limits()))
        except BaseException:
            guest.close()
            host.close()
            if pidfd >= 0:
                kill_pidfd(pidfd)
                os.close(pidfd)
            if listener >= 0:
                os.close(listener)
            if worker is not None:
                worker.close()
            dispose(cgroup, uid)
            raise
        if warm and policy.network_policy == "allowlist":
            # The host's roots, written ahead (off the caller's path): at hand-over, a sandbox with
            # secrets adds only its CA to them (runtimes/egress.py).
            from ...egress.ca import host_roots
            from ...egress.gate import CA_BUNDLE_PATH

            try:
                sandbox.write_file(CA_BUNDLE_PATH, host_roots(), 0o644)  # appended to at hand-over
                sandbox.roots_written = True
            except BaseException:
                sandbox.close()
                raise
        if not warm:  # a pooled isolate gets its caller's egress at hand-over (apply_policy)
            try:
                attach_egress(sandbox, policy)
            except BaseException:
                sandbox.close()
                raise
        return sandbox

    def _config(self, policy: Policy, cgroup: IsolateCgroup | None, uid: UidLease | None, bpf: bytes) -> dict[str, Any]:
        outer_uid, outer_gid = outer_ids(uid)
        allowlist = policy.network_policy == "allowlist"
        return {
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "outer_uid": outer_uid,
            "outer_gid": outer_gid,
            "hostname": "stockade",
            "network": policy.network_policy,
            "proxy_port": PROXY_PORT,
            "scratch_mb": policy.disk_mb,
            # The environment's host path stays out of the isolate's mountinfo (rootfs.bind_extra).
            # A source that is a link is shared where it leads (check_mount_sources looked there): inside,
            # its absolute target would be read against the isolate's own root.
            "mounts": [
                {**m.to_dict(), "source": os.path.realpath(m.source), "hide_source": m.target == ENV_ROOT}
                for m in policy.filesystem_access
            ],
            # An allowlist isolate's filter stops its network calls too, to report direct attempts.
            "seccomp_bpf": base64.b64encode(netlink.program(allowlist=True) if allowlist else bpf).decode(),
            "landlock_abi": self._landlock_abi,
            "base_env": BASE_ENV,
            "hard_limits": {"max_open_files": 65536, "max_processes": 4096},
        }


def _default_limits() -> tuple[int, int, float]:
    """The limits most isolates run with, written when a spare's group is made."""
    limits = default_policy()
    return limits.memory_mb, limits.pids_limit, limits.cpu_limit
