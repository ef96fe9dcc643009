"""Build one isolate of the process runtime, then become its agent.

Runs in a child freshly forked from the zygote (stdlib only, single-threaded).
The whole confinement sequence reads top to bottom (after nsjail's
``containProc``): cgroup -> drop to the sandbox uid -> namespaces -> (fork
into the pid namespace) -> the new root -> **exec a fresh interpreter** ->
the policy's mounts and pivot's end -> hostname and network -> rlimits ->
capabilities -> no_new_privs -> Landlock -> seccomp -> agent.

Why the exec: a forked child holds a copy of everything its parent ever held
(the zygote's environment block on its stack, freed heap) and shares its
address-space layout and stack canary with every other isolate. The exec
leaves the isolate's agent, and every runner it forks, a memory of its own:
nothing of the zygote, a fresh ASLR layout, a fresh canary. The agent's
code is copied into the new root (``/.stockade``) so that nothing inside
names the host's install path. The zygote's spare does all of this ahead of
time (``prepare_root`` and the exec need no policy), so only an isolate built
without a spare pays for the interpreter's start.

Messages to the host on the agent socket before the agent speaks JSON-RPC:
  b"P" + u32 pid   the isolate's init, as the host's pid namespace sees it
  b"R" + fds       ready (agent up, first runner forked and warm); the fds
                   (SCM_RIGHTS) are the seccomp listener, then (network_policy
                   allowlist) the egress proxy's TCP listener and UDP socket
  b"E" + frame     setup failed; the frame holds {"error": message}
"""

from __future__ import annotations

import array
import binascii
import os
import resource
import struct
import sys

from . import jsoncodec, linux, runner, server, wire
from .rootfs import (
    INNER_GID,
    INNER_UID,
    bind,
    bind_extra,
    hide_kernel_cmdline,
    make_dev,
    make_etc,
    make_scratch,
    seed_cache,
    write_bytes,
    write_etc_extras,
    write_text,
)

# The fresh interpreter of every isolate imports this module: it takes the C
# module behind socket (whose Python wrapper imports enum and selectors, a
# third of what the exec'd interpreter would import), as server.py does.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any
else:
    import _socket as socket

# Where the agent's code lives inside an isolate (a copy: see prepare_root).
AGENT_HOME = "/.stockade"
# The fresh interpreter's program: neutral words only, /proc/1/cmdline shows them.
_BOOT = runner.bootstrap(f"import sys; sys.path.insert(0, {AGENT_HOME!r}); from agent import confine", "confine.main()")

_READ_EXEC = linux.LL_READ_FILE | linux.LL_READ_DIR | linux.LL_EXECUTE
_OLD_ROOT = "/.oldroot"


def start_isolate(raw: bytes, conn: socket.socket, agent_files: dict[str, bytes]) -> None:
    """Build an isolate from its config ``raw`` without a spare. Never returns: ends with exec or ``os._exit``."""
    try:
        config = decode_config(raw)
        check_request(config)
        join_cgroups(config["cgroup_procs"])
        enter_namespaces(config.get("outer_uid"), config.get("outer_gid"))
        sync_r, sync_w = os.pipe()
        pid = os.fork()
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, never raised past fork
        _report_failure(conn, "namespaces", exc)
        os._exit(1)
    if pid:
        # Still outside the new pid namespace: tell the host who init is, then leave.
        conn.sendall(b"P" + struct.pack("<I", pid))
        os.close(sync_w)
        os._exit(0)
    os.close(sync_w)
    os.read(sync_r, 1)  # wait until the "P" message is out, so it precedes ours
    os.close(sync_r)
    try:
        prepare_root(agent_files)
        # The fresh interpreter takes its config and agent socket as a spare's does.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _send_fds(ours, raw, conn.fileno())
        ours.close()
        exec_agent(theirs.fileno(), announce=False)
    except BaseException as exc:  # noqa: BLE001
        _report_failure(conn, "root", exc)
        os._exit(1)


def enter_namespaces(outer_uid: int | None, outer_gid: int | None) -> None:
    """Drop to the sandbox uid and unshare every namespace; the caller forks next.

    Nothing here depends on the policy, so the zygote may do it ahead of time
    for the next isolate (see ``zygote._fork_spare``).
    """
    _drop_to_sandbox_user(outer_uid, outer_gid)
    _unshare_namespaces()


def prepare_root(agent_files: dict[str, bytes]) -> None:
    """As pid 1 of the new pid namespace, before the config: the parts of the new
    root that no policy changes, with the agent's code copied in. The host's
    root stays reachable at /.oldroot until ``_finish_root``."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    # The new root is a small tmpfs; only this namespace sees it on /tmp.
    linux.mount("tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=4m,mode=0755")
    os.mkdir("/tmp" + _OLD_ROOT)
    linux.pivot_root("/tmp", "/tmp" + _OLD_ROOT)
    os.chdir("/")
    old = _OLD_ROOT

    for name in ("usr", "proc", "dev", "tmp", "work", "etc"):
        os.mkdir("/" + name, 0o755)
    bind(old + "/usr", "/usr", writable=False)
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        host = f"{old}/{name}"
        if os.path.islink(host):
            os.symlink(os.readlink(host), "/" + name)
        elif os.path.isdir(host):
            os.mkdir("/" + name, 0o755)
            bind(host, "/" + name, writable=False)

    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    make_dev(old)
    hide_kernel_cmdline()
    write_etc_extras(old)
    for path, data in agent_files.items():
        full = f"{AGENT_HOME}/{path}"
        os.makedirs(os.path.dirname(full), mode=0o755, exist_ok=True)
        write_bytes(full, data)


def exec_agent(fd: int, announce: bool) -> None:
    """Replace this forked copy of the zygote by a fresh interpreter running ``main``.

    Its only descriptor is ``fd``, on which the config and the agent socket
    arrive (``announce``: say "ready" there first, for the spare that waits on
    it); its environment is empty. Every capability of the isolate's user
    namespace is kept across the exec (ambient), since the policy's mounts are
    still to come; ``_confine_as_init`` drops them all.
    """
    linux.keep_capabilities_across_exec()
    # Nothing else crosses: a descriptor the zygote received without CLOEXEC
    # (SCM_RIGHTS sets none) would reach every command the agent starts.
    os.closerange(3, fd)
    os.closerange(fd + 1, 0x7FFFFFFF)  # every descriptor number there can be (close_range)
    os.set_inheritable(fd, True)
    argv = [sys.executable, "-I", "-c", _BOOT, str(fd), "1" if announce else "0"]
    os.execve(sys.executable, argv, {})  # noqa: S606 - our own interpreter, no shell


def main() -> runner.Program:
    """The fresh interpreter of an isolate: wait for the config, then confine and serve.

    Returns only in a runner that became a Python program (``runner.bootstrap``)."""
    try:
        # A fresh exec is dumpable again; nothing of the sandbox's uid may attach to it.
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        channel = socket.socket(fileno=int(sys.argv[1]))
        if sys.argv[2] == "1":
            channel.sendall(b"ready")
        raw, fds = _recv_fds(channel, CONFIG_MAX)
        channel.close()
        if not raw or len(fds) != 1:
            os._exit(0)  # a discarded spare (EOF)
        conn = socket.socket(fileno=fds[0])
    except BaseException:  # noqa: BLE001
        os._exit(1)
    try:
        config = decode_config(raw)
    except BaseException as exc:  # noqa: BLE001
        _report_failure(conn, "config", exc)
        os._exit(1)
    return become_init(config, conn)


def become_init(config: dict[str, Any], conn: socket.socket) -> runner.Program:
    """As pid 1 of the new pid namespace: confine, then serve as the agent (see ``main``)."""
    try:
        handed = _confine_as_init(config, conn)
        server.freeze_heap()  # what confinement loaded, too
        agent = server.Agent(conn, config.get("base_env") or {})
        if config.get("warm", True):
            # Fork and warm the first runner before saying ready, so that a pooled
            # isolate is idle, not busy, when its first request arrives. An isolate
            # built on demand answers first (commands need no runner: posix_spawn).
            agent.prepare_spare(warm=True)
        _send_fds(conn, b"R", *handed)
        for fd in handed:
            os.close(fd)
    except runner.Become as become:  # in the runner forked above, once its job came
        return become.program
    except BaseException as exc:  # noqa: BLE001
        _report_failure(conn, "confinement", exc)
        os._exit(1)
    return server.serve_until_done(agent)


def _confine_as_init(config: dict[str, Any], conn: socket.socket) -> list[int]:
    """Everything after the exec; returns the descriptors for the host: the seccomp listener,
    and under network_policy allowlist the egress proxy's sockets (``egress_sockets``)."""
    _finish_root(config)
    linux.sethostname(config.get("hostname", "stockade"))
    handed: list[int] = []
    if config.get("network") in ("loopback", "allowlist"):
        bring_up_loopback()
    if config.get("network") == "allowlist":
        handed = egress_sockets(int(config.get("proxy_port") or 3128))
    os.chdir("/work")
    _set_hard_rlimits(config.get("hard_limits") or {})
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.drop_all_capabilities()
    abi = int(config.get("landlock_abi") or 0)
    if abi:
        _apply_landlock(abi, config)
    # Not dumpable: code in the isolate (same uid) cannot open /proc/1/mem or fds.
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    listener = linux.seccomp_install_listener(binascii.a2b_base64(config["seccomp_bpf"]))
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.set_inheritable(conn.fileno(), False)
    return [listener, *handed]


def egress_sockets(proxy_port: int) -> list[int]:
    """The egress proxy's TCP listener (127.0.0.1:``proxy_port``) and its name service's UDP
    socket (127.0.0.1:53), made here, in the isolate's network namespace, while init may still
    bind a low port; handed to the host, which serves them, and closed here once sent."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", proxy_port))
        tcp.listen(64)
        udp.bind(("127.0.0.1", 53))
    except BaseException:
        tcp.close()
        udp.close()
        raise
    return [tcp.detach(), udp.detach()]


# ---- the steps, in order --------------------------------------------------------


# What a root zygote holds every request to, set from its command line by its parent (a root
# daemon, before the daemon gives root up; ``check_request``): the host uids an isolate may run
# as, and the cgroups (the daemon's delegated ones, opened here at the start, in this mount
# namespace) under which it may write a pid. A daemon taken over must not get an isolate run as
# root or as an account, nor have root write anywhere but into its own groups' process lists.
SANDBOX_UIDS: tuple[int, int] | None = None
ODD_UIDS_ONLY = False  # a daemon that gives root up: the odd places of the range (root's the even)
CGROUP_PARENTS: dict[str, int] = {}  # a parent's path -> a descriptor of it
_CGROUP_ROOT = "/sys/fs/cgroup/"
_PROCS = ("cgroup.procs", "tasks")


def hold_to(uids: str | None, cgroup_parents: list[str]) -> None:
    """At the zygote's start: the uid range (``first-last``) and the cgroup parents it serves."""
    global SANDBOX_UIDS, ODD_UIDS_ONLY
    if uids:
        span, _, half = uids.partition(":")
        first, _, last = span.partition("-")
        SANDBOX_UIDS, ODD_UIDS_ONLY = (int(first), int(last)), half == "odd"
    for parent in cgroup_parents:
        CGROUP_PARENTS[parent] = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def check_request(request: dict[str, Any]) -> None:
    """Refuse (ValueError) what the zygote's root must not do for its caller."""
    if os.getuid() != 0 or SANDBOX_UIDS is None:
        return  # rootless: the zygote has no more power than its caller
    first, last = SANDBOX_UIDS
    uid, gid = request.get("outer_uid"), request.get("outer_gid")
    if not isinstance(uid, int) or not first <= uid <= last or gid not in (None, uid):
        raise ValueError(f"outer uid {uid!r} (gid {gid!r}) is not one of the sandbox uids {first}-{last}")
    if ODD_UIDS_ONLY and (uid - first) % 2 != 1:
        raise ValueError(f"outer uid {uid} is root's to lease (an even place of {first}-{last}), not this daemon's")
    for path in request.get("cgroup_procs") or []:
        if CGROUP_PARENTS:
            _beneath(path)
            continue
        real = os.path.realpath(path)
        if not real.startswith(_CGROUP_ROOT) or os.path.basename(real) not in _PROCS:
            raise ValueError(f"{path!r} is not a cgroup's process list")


def _beneath(path: str) -> tuple[int, str]:
    """``path`` as (a served parent's descriptor, ``NAME/cgroup.procs`` below it), or ValueError."""
    group, leaf = os.path.split(path)
    parent, name = os.path.split(group)
    if not isinstance(path, str) or parent not in CGROUP_PARENTS or leaf not in _PROCS:
        raise ValueError(f"{path!r} is not the process list of a group under the daemon's own")
    if not name or name in (".", "..") or any(c in name for c in "/\0"):
        raise ValueError(f"{path!r} does not name one group")
    return CGROUP_PARENTS[parent], f"{name}/{leaf}"


def join_cgroups(procs_files: list[str]) -> None:
    pid = str(os.getpid()).encode()
    for path in procs_files:
        if not CGROUP_PARENTS:
            write_bytes(path, pid)
            continue
        # Under the parents opened at the start, on their mount, through no link: whatever the
        # caller made of its groups (or of its own mount namespace), root writes only there.
        dirfd, below = _beneath(path)
        fd = linux.open_beneath(dirfd, below, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def _drop_to_sandbox_user(uid: int | None, gid: int | None) -> None:
    """As root, become the unprivileged sandbox uid before making the user namespace.

    Inside, the code runs as uid 1000; outside, that uid is ``uid`` (never root),
    so anything that escaped the namespaces would be an unprivileged user.
    """
    if os.getuid() != 0 or uid is None or uid == 0:
        return
    os.setgroups([])
    os.setresgid(gid or uid, gid or uid, gid or uid)
    os.setresuid(uid, uid, uid)
    # setuid cleared "dumpable", which would leave /proc/self/uid_map owned by root.
    linux.prctl(linux.PR_SET_DUMPABLE, 1)


def _unshare_namespaces() -> None:
    outer_uid, outer_gid = os.getuid(), os.getgid()
    linux.unshare(
        linux.CLONE_NEWUSER
        | linux.CLONE_NEWNS
        | linux.CLONE_NEWPID
        | linux.CLONE_NEWNET
        | linux.CLONE_NEWIPC
        | linux.CLONE_NEWUTS
        | linux.CLONE_NEWCGROUP
    )
    write_text("/proc/self/setgroups", "deny")
    write_text("/proc/self/uid_map", f"{INNER_UID} {outer_uid} 1")
    write_text("/proc/self/gid_map", f"{INNER_GID} {outer_gid} 1")
    # The maps are written: not dumpable again, so that no other process of the
    # sandbox uid on the host can attach to this one before it is confined.
    linux.prctl(linux.PR_SET_DUMPABLE, 0)


def _finish_root(config: dict[str, Any]) -> None:
    """The policy's part of the new root; then the host's root goes and / turns read-only."""
    old = _OLD_ROOT
    make_scratch(int(config.get("scratch_mb") or 64))
    make_etc(old, config)
    for mount in config.get("mounts") or []:
        bind_extra(old, mount)
    seed_cache()
    linux.umount2(old, linux.MNT_DETACH)
    os.rmdir(old)
    linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)


def bring_up_loopback() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    import fcntl

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the C module's socket: no context manager
    try:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, ifreq))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
    finally:
        s.close()


def _set_hard_rlimits(limits: dict[str, int]) -> None:
    # RLIMIT_CORE 1, not 0: a core_pattern pipe helper (systemd-coredump, apport) is run as root for
    # a crash whatever the limit, but 1 (the kernel's mark for the helper's own crash) makes it give
    # the core up. No file is written at 1 either (less than a page). The filter keeps it there.
    resource.setrlimit(resource.RLIMIT_CORE, (1, 1))
    # No real-time scheduling (SCHED_FIFO runs past the CPU quota where the host has no RT group
    # scheduling) and no raised priority, whatever limits the host started stockade with.
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
    for key, which in (
        ("max_open_files", resource.RLIMIT_NOFILE),
        ("max_processes", resource.RLIMIT_NPROC),
        ("max_file_size_bytes", resource.RLIMIT_FSIZE),
    ):
        value = limits.get(key)
        if isinstance(value, int) and value > 0:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)  # a limit can only ever be lowered here
            resource.setrlimit(which, (value, value))


def _apply_landlock(abi: int, config: dict[str, Any]) -> None:
    everything = linux.landlock_fs_rights(abi)
    dev_rights = linux.LL_READ_FILE | linux.LL_WRITE_FILE | linux.LL_READ_DIR
    if abi >= 5:
        dev_rights |= linux.LL_IOCTL_DEV
    rules = [
        ("/", _READ_EXEC),
        ("/proc", linux.LL_READ_FILE | linux.LL_READ_DIR | linux.LL_WRITE_FILE),
        ("/dev", dev_rights),
        ("/tmp", everything),
        ("/work", everything),
        ("/dev/shm", everything),
    ]
    for mount in config.get("mounts") or []:
        if mount.get("writable"):
            rules.append((mount["target"], everything))
    deny_tcp = config.get("network", "none") == "none"
    linux.landlock_restrict(abi, rules, deny_tcp=deny_tcp, scope=True)


# ---- helpers -------------------------------------------------------------------


def _report_failure(conn: socket.socket, stage: str, exc: BaseException) -> None:
    import traceback

    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    try:
        conn.sendall(b"E" + wire.encode_message({"error": f"{stage}: {detail}"}))
    except OSError:
        pass
    print(f"stockade isolate setup failed in {stage}: {detail}", file=sys.stderr)


CONFIG_MAX = 1 << 20


def _send_fds(sock: socket.socket, data: bytes, *fds: int) -> None:
    """``socket.send_fds(sock, [data], fds)``."""
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def _recv_fds(sock: socket.socket, bufsize: int) -> tuple[bytes, list[int]]:
    """``socket.recv_fds(sock, bufsize, 1)``: the message and the descriptors it carried."""
    item = array.array("i").itemsize
    data, ancdata, _flags, _addr = sock.recvmsg(bufsize, socket.CMSG_LEN(item))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % item)])
    return data, list(fds)


def decode_config(raw: bytes) -> dict[str, Any]:
    config = jsoncodec.loads(raw)
    if not isinstance(config, dict):
        raise ValueError("isolate config must be a JSON object")
    return config
