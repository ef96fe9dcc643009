"""The ``process`` runtime: stockade's own Linux confinement.

An isolate is a process tree in fresh user, pid, mount, net, ipc, uts and
cgroup namespaces, pivot_rooted into a minimal root, with no capabilities,
no_new_privs, rlimits, cgroup limits, Landlock and a seccomp filter whose
blocked calls are answered and reported by the host (``seccomp.Supervisor``).
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
import stat
import threading
import time
from typing import TYPE_CHECKING, Any

from ... import environments
from ...agent import linux
from ...egress import PROXY_PORT
from ...environments import ENV_ROOT
from ...errors import PolicyError, SandboxStartError, StockadeError
from ...policy import Policy, default_policy
from ..base import BASE_ENV, Availability, IsolateUsage
from ..egress import attach_egress
from ..pool import PooledRuntime, WarmPool
from ..publish import AgentRelay, Forwarder
from ..reaper import Reaper
from ..sandbox import AgentSandbox
from . import netcalls, seccomp
from .cgroups import CgroupManager, IsolateCgroup, SweptCgroupManager, retry_leftovers
from .handshake import kill_pidfd, pid_of, receive_isolate
from .uids import UidAllocator, UidLease, UidRange
from .zygote import Zygote, system_python

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
        self.uid = uid  # the host uid this isolate runs as (None: rootless, the caller's own)
        self.pidfd = pidfd
        self.listener = listener
        self.egress_sockets: list[socket.socket] = []  # until the egress worker takes them
        self.egress_worker: EgressWorker | None = None  # started with the isolate under an allowlist
        self._released = False
        # The supervisor records a violation before it lets the blocked call return,
        # so every violation of a run is in the log by the time its reply is.
        seccomp.supervisor().watch(listener, self._count_violation, network=policy.network_policy == "allowlist")

    def usage(self, peak: bool = True) -> IsolateUsage:
        return self.cgroup.usage(peak) if self.cgroup else IsolateUsage()

    def _forwarder(self, address: str, host_port: int, port: int) -> Forwarder | AgentRelay:
        # As root, the host joins the isolate's network namespace through its init's pidfd
        # (publish.py). Without root (rootless, or a daemon that gave root up) it cannot join
        # one: relayed through the agent, as for gVisor.
        if os.geteuid() != 0:
            return AgentRelay(self, address, host_port, port)
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
        seccomp.supervisor().forget(self.listener)
        for sock in self.egress_sockets:
            sock.close()
        if self.egress_worker is not None:  # never handed over
            self.egress_worker.close()
            self.egress_worker = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        _release_uid(self.uid, self.cgroup.remove() if self.cgroup is not None else True)


class ProcessRuntime(PooledRuntime[ProcessSandbox]):
    name = "process"
    isolation = "process"
    egress_proxy = True  # its isolates' loopback is a host network namespace the proxy can listen in

    def __init__(self, pool_size: int = 0) -> None:
        self._zygote: Zygote | None = None
        self._lock = threading.Lock()
        self._cgroups = SweptCgroupManager()
        self._bpf: bytes | None = None
        self._landlock_abi = 0
        self._next_cgroup: IsolateCgroup | None = None  # where the zygote's spare child waits
        self._next_uid: UidLease | None = None  # and the uid it runs as
        self._uids: UidAllocator | None = None  # as root: one host uid per live isolate
        self._dropped = False  # the daemon gave up root (hand_to): never a zygote of its own user
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
        layout = self._cgroups.get().layout
        details["cgroup"] = layout.version
        details["cgroup_limits"] = sorted(layout.limits)
        details["cgroup_problems"] = layout.problems
        details["landlock_abi"] = linux.landlock_abi()
        details["uid"] = os.getuid()
        return self._probe(details)

    def adopt_zygote(self, zygote: Zygote) -> None:
        """Use a zygote the caller started early (the CLI overlaps its boot with imports)."""
        with self._lock:
            if self._zygote is None:
                self._zygote = zygote
                return
        zygote.close()

    def hand_to(self, uid: int, gid: int) -> None:
        """Before the daemon drops root to ``uid``: cgroups of its own (delegated), uid leases of its
        own, and the zygote started now, as root, holding every request to the sandbox uids and to
        those groups (agent/confine.py ``check_request``)."""
        manager = self._cgroups.get()
        manager.hand_to(uid, gid)
        with self._lock:
            if self._zygote is not None:
                self._zygote.close()  # one started before knew no groups to hold requests to
            self._zygote = Zygote(cgroup_parents=manager.parents())
        self._zygote_handle()
        if self._uids is None:
            self._uids = UidAllocator(UidRange.from_env())
        self._uids.hand_to(uid, gid)
        self._dropped = True

    def can_end_groups(self) -> bool:
        """Whether its isolates' groups can be emptied with cgroup.kill (no signal to another uid needed)."""
        return self._cgroups.get().layout.v2_parent is not None

    def _zygote_handle(self) -> Zygote:
        with self._lock:
            if self._zygote is None or not self._zygote.alive:
                if self._dropped:
                    # Another zygote would be this user's, and so would its isolates: never that.
                    raise SandboxStartError(
                        "the zygote is gone, and without root no other can start: restart the daemon"
                    )
                if self._zygote is not None:
                    self._zygote.close()
                self._zygote = Zygote()
            if self._bpf is None:
                self._bpf = seccomp.default_program()
                self._landlock_abi = linux.landlock_abi()
            return self._zygote

    # ---- isolates -----------------------------------------------------------------------

    def start(self, policy: Policy) -> ProcessSandbox:
        """A fresh isolate for ``policy``, built now (the cold path)."""
        return self._build(policy)

    def warm_up(self) -> None:
        """Start the zygote and fill the pool now, instead of on first use."""
        self._zygote_handle()
        super().warm_up()

    def close(self) -> None:
        self.stop_pool()
        with self._lock:
            if self._zygote is not None:
                self._zygote.close()  # its spare child dies with it (PDEATHSIG)
                self._zygote = None
            nxt, self._next_cgroup = self._next_cgroup, None
            nxt_uid, self._next_uid = self._next_uid, None
        _dispose(nxt, nxt_uid)
        retry_leftovers()

    def _build(self, policy: Policy, warm: bool = False) -> ProcessSandbox:
        """Build an isolate; ``warm`` (for the pool) pre-warms it, at a cost no caller waits for."""
        started = time.monotonic()
        check_mount_sources(policy)
        shared = environments.share(policy)  # its Python environment, mounted with its shared paths
        zygote = self._zygote_handle()
        assert self._bpf is not None
        manager = self._cgroups.get()
        with self._lock:
            # The zygote's spare child is in this cgroup, as this uid.
            cgroup, self._next_cgroup = self._next_cgroup, None
            uid, self._next_uid = self._next_uid, None
        try:
            if cgroup is None and manager.layout.version != "none":
                cgroup = manager.create()
            if uid is None:
                uid = self._lease_uid(cgroup)
        except OSError as exc:
            if cgroup is not None:
                cgroup.remove()
            raise SandboxStartError(f"cannot create the isolate's cgroup: {exc}") from None
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = self._config(shared, cgroup, uid)
        config["warm"] = warm
        pidfd = listener = -1
        worker: EgressWorker | None = None
        try:
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
            # Off the critical path: the caller is about to run something in this isolate.
            self._reaper.defer(lambda: self._prepare_next(zygote, manager))
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
            _dispose(cgroup, uid)
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

    def _prepare_next(self, zygote: Zygote, manager: CgroupManager) -> None:
        """Make the next isolate's cgroup and uid now and have the zygote fork a child ahead into them."""
        with self._lock:
            if self._zygote is zygote and (self._next_cgroup is not None or self._next_uid is not None):
                # Starts that overlapped: the spare another one made is still there, and serves
                # the next start as well. Replacing it would mean killing the zygote's child in
                # it, which runs as its isolate's uid: a daemon that gave root up cannot, and its
                # reaper (the one-shots' teardowns) would wait out the cgroup's removal.
                return
        nxt: IsolateCgroup | None = None
        uid: UidLease | None = None
        try:
            if manager.layout.version != "none":
                nxt = manager.create()
                limits = default_policy()
                nxt.apply_limits(limits.memory_mb, limits.pids_limit, limits.cpu_limit)  # the usual case, written now
            uid = self._lease_uid(nxt)
        except (OSError, StockadeError):
            if nxt is not None:
                nxt.remove()
            return  # the next start makes its own (and reports what fails)
        with self._lock:
            current = self._zygote is zygote
            if current:
                stale, self._next_cgroup = self._next_cgroup, nxt
                stale_uid, self._next_uid = self._next_uid, uid
            else:
                # Closed (or replaced) meanwhile: close() has already emptied the
                # slot, and a group put there now would never be removed.
                stale, stale_uid = nxt, uid
        _dispose(stale, stale_uid)
        if not current:
            return
        try:
            zygote.prepare(nxt.procs_files if nxt is not None else [], *_outer_ids(uid))
        except SandboxStartError:
            return

    def _lease_uid(self, cgroup: IsolateCgroup | None) -> UidLease | None:
        """As root (or once root handed this to the daemon's user), a host uid of the isolate's own;
        rootless: None, the caller's uid."""
        if os.getuid() != 0 and not self._dropped:
            return None
        if self._uids is None:
            self._uids = UidAllocator(UidRange.from_env())
        lease = self._uids.lease()
        try:
            lease.record(cgroup.procs_files if cgroup is not None else [])
        except OSError as exc:
            lease.release()
            where = self._uids.lock_dir
            raise SandboxStartError(f"cannot record the lease of uid {lease.uid} in {where}: {exc}") from None
        return lease

    def _config(self, policy: Policy, cgroup: IsolateCgroup | None, uid: UidLease | None) -> dict[str, Any]:
        outer_uid, outer_gid = _outer_ids(uid)
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
            "mounts": [{**m.to_dict(), "hide_source": m.target == ENV_ROOT} for m in policy.filesystem_access],
            # An allowlist isolate's filter stops its network calls too, to report direct attempts.
            "seccomp_bpf": base64.b64encode(netcalls.program() if allowlist else self._bpf or b"").decode(),
            "landlock_abi": self._landlock_abi,
            "base_env": BASE_ENV,
            "hard_limits": {"max_open_files": 65536, "max_processes": 4096},
        }


def _dispose(cgroup: IsolateCgroup | None, uid: UidLease | None) -> None:
    """End what an isolate (or the spare made for one) had: its processes, its cgroup, its uid."""
    removed = True
    if cgroup is not None:
        cgroup.kill()
        removed = cgroup.remove()
    _release_uid(uid, removed)


def _release_uid(uid: UidLease | None, cgroup_gone: bool) -> None:
    # A group that outlived its wait still names the isolate's last processes in
    # the lease: the uid is not handed out again until they are gone.
    if uid is not None:
        uid.release(keep_record=not cgroup_gone)


def _outer_ids(uid: UidLease | None) -> tuple[int | None, int | None]:
    """The uid/gid an isolate runs as outside its user namespace: as root, its leased
    uid (the gid is the same number); rootless, None (the caller's own ids)."""
    return (uid.uid, uid.uid) if uid is not None else (None, None)


def check_mount_sources(policy: Policy) -> None:
    """Shared paths are opened with the sandbox's uid, a different one for each
    isolate (as root): they must be open to others. Say so before building anything."""
    for i, mount in enumerate(policy.filesystem_access):
        where = f"filesystem_access[{i}]: {mount.source}"
        if not os.path.exists(mount.source):
            raise PolicyError(f"{where} does not exist on this host")
        if os.getuid() != 0:
            continue
        path = ""
        for part in mount.source.strip("/").split("/"):
            path += "/" + part
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
                raise PolicyError(f"{where} is not accessible to the sandbox's uid: {path} is not searchable by others")
        st = os.stat(mount.source)
        need = stat.S_IROTH | (stat.S_IWOTH if mount.writable and stat.S_ISDIR(st.st_mode) else 0)
        if st.st_mode & need != need:
            raise PolicyError(
                f"{where} is not accessible to the sandbox's uid "
                f"(needs to be {'readable and writable' if need & stat.S_IWOTH else 'readable'} by others)"
            )
