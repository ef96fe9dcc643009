"""The agent of a microVM guest: it waits for the host's go line, then confines itself as a process isolate.

The VM is the main boundary, but the guest kernel's attack surface is the
first step out of it: so code in the guest gets no more of that kernel than a
process isolate gets of the host's (as Kata Containers runs its workloads
inside its VMs). The image's init starts this module as root, early, from the
initramfs (runtimes/microvm/image.py), with the virtio-serial port open on
fd 3. The sequence reads top to bottom in ``main`` (after nsjail's
``containProc``, like ``confine.py``):

wait for the go line -> reseed the kernel's generator -> pid namespace (fork:
the agent becomes its pid 1; the process init started waits outside) ->
mount, ipc, uts, net and cgroup namespaces -> off the initramfs, onto a new root (tmpfs,
``pivot_root``; the old root detached) -> hostname -> uid 1000, no
capabilities, no_new_privs -> the guest's seccomp filter -> serve.

The new root holds what a process isolate's holds (rootfs.py makes the
parts): ``/usr`` (the host's, over 9p) read-only, the ``/bin`` and ``/lib*``
links of a merged-/usr host, a fresh ``/proc`` of the new pid namespace, the
minimal ``/dev``, one scratch tmpfs of the go line's size for ``/tmp``,
``/work`` and ``/dev/shm``, the synthesized ``/etc``, the policy's shared
paths (9p, mounted here, in the agent's own mount namespace); no ``/sys``, no
``/init``, nothing of the initramfs. The root is read-only.

No user namespace: inside the guest the agent is root of a kernel that serves
this one sandbox, so there is no outside uid for a mapping to hide, and code
already runs as uid 1000 with every capability set empty (the bounding set
too) and no_new_privs, so a namespace owned by another user would hold
nothing for it either. And the seccomp profile refuses to make one.

Everything this module imports is loaded before the snapshot point, from the
initramfs: a VM restored from the snapshot reads none of it over 9p.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import time

from . import confine, linux, rootfs, runner, server, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

# init opens the virtio-serial port as fd 3 and keeps it open: the guest driver
# drops whatever arrived unread when a port is closed.
PORT_FD = 3
HOSTNAME = "stockade"
# A directory of the initramfs: first where the initramfs itself is bound, then
# where the new root is built (see _leave_the_initramfs).
_STAGE = "/mnt"
_OLD_ROOT = "/.oldroot"
_NOBODY = 65534
_P9_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
_RUN_ENV = ("PATH", "HOME", "TMPDIR", "LANG")  # init's exports (runtimes/microvm/image.py)


def main() -> runner.Program:
    """The whole life of the guest's agent; returns only in a runner that became a Python program."""
    answers = os.environ.pop("STOCKADE_GUEST_SECCOMP_ANSWERS", "")
    program_path = os.environ.pop("STOCKADE_GUEST_SECCOMP", "")
    # Read and loaded before the go line, from the initramfs (see the module's docstring).
    program = _read_program(program_path) if program_path else None
    scratch_mb, network = _wait_for_go()
    os.set_inheritable(PORT_FD, False)
    try:
        _reseed_kernel_rng()  # the first thing after a restore (snapshot.py)
        shares = _shares(_read_text("/proc/cmdline"))
        _enter_pid_namespace()
        # As a process isolate's: its own network (only lo, up for "loopback") and cgroup view too.
        linux.unshare(
            linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWNET | linux.CLONE_NEWCGROUP
        )
        _make_root(scratch_mb, shares)
        linux.sethostname(HOSTNAME)
        if network == "loopback":
            confine.bring_up_loopback()
        os.chdir("/work")
        _drop_privileges(rootfs.INNER_UID, rootfs.INNER_GID)
        _quiet_stdio()
    except BaseException as exc:  # noqa: BLE001 - any failure ends the VM, with the reason on its console
        print(f"stockade: guest confinement failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    conn: Any = server.FdConn(PORT_FD)  # the slice of a socket the agent uses
    guarded = program is not None and _guard_guest(conn, program, answers)
    server.freeze_heap()
    # What init exported for it (the host's BASE_ENV), not what its shell and the kernel added (PWD,
    # SHLVL, TERM): a run sees the same environment on every runtime.
    agent = server.Agent(conn, {k: os.environ[k] for k in _RUN_ENV if k in os.environ})
    agent.guest_seccomp = guarded
    return server.serve_until_done(agent)  # pid 1: when it exits, the kernel ends the namespace


def _wait_for_go() -> tuple[int, str]:
    """Say the agent is loaded, then wait for init's ``go <scratch MB> <network>`` on stdin.

    init started this interpreter from the initramfs' copies; it then reads
    the host's go line (the snapshot point lies in that read), mounts the
    host's /usr and writes "go" with the go line's scratch size.
    """
    os.close(os.open("/.agent-ready", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 64)
        if not chunk:
            os._exit(1)  # init's setup failed before the guest was ready
        line += chunk
    os.unlink("/.agent-ready")
    word, size, network = [*line.decode().split(), "", "", ""][:3]
    if word != "go" or not size.isdigit():
        print(f"stockade: init said {line!r} instead of go", file=sys.stderr, flush=True)
        os._exit(1)
    return int(size), network


def _shares(cmdline: str) -> list[tuple[str, str, bool]]:
    """The policy's shared paths, from ``stockade.mounts=TAG:HEX(TARGET):ro|rw,...`` (runtimes/microvm/qemu.py)."""
    out = []
    for arg in cmdline.split():
        if arg.startswith("stockade.mounts="):
            for item in arg[len("stockade.mounts=") :].split(","):
                tag, target, mode = item.split(":")
                out.append((tag, bytes.fromhex(target).decode("utf-8", "surrogateescape"), mode == "rw"))
    return out


def _enter_pid_namespace() -> None:
    """Fork into a new pid namespace; return in the child, its pid 1.

    The parent, the process init started, stays outside and waits: init's
    script powers the VM off once it ends, and the confined agent's end ends
    it. Nothing inside can see it (the new /proc shows the new namespace
    only), and it holds no descriptor of the port and no privilege.
    """
    linux.unshare(linux.CLONE_NEWPID)
    child = os.fork()
    if child == 0:
        return
    _wait_outside(child)


def _wait_outside(child: int) -> NoReturn:
    code = 1
    try:
        os.close(PORT_FD)
        # The guest's OOM killer should take a runaway program, not the process whose exit powers the VM off.
        _write("/proc/self/oom_score_adj", "-1000")
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)  # from root: every capability goes too
        _, status = os.waitpid(child, 0)
        code = max(os.waitstatus_to_exitcode(status), 1) if status else 0
    finally:
        os._exit(code)


def _make_root(scratch_mb: int, shares: list[tuple[str, str, bool]]) -> None:
    """The code's root, as a process isolate's is made (rootfs.py), over the initramfs."""
    _leave_the_initramfs()
    old = _OLD_ROOT
    for name in ("usr", "proc", "dev", "tmp", "work", "etc"):
        os.mkdir("/" + name, 0o755)
    rootfs.bind(old + "/usr", "/usr", writable=False)
    # The guest's /usr is the host's, which is merged (image.py copies only from /usr).
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        if os.path.isdir(f"{old}/usr/{name}"):
            os.symlink(f"usr/{name}", "/" + name)
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    rootfs.make_dev(old)
    rootfs.hide_kernel_cmdline()
    # Made by the guest's root, not (as in a process isolate) by uid 1000 of a user namespace.
    rootfs.make_scratch(scratch_mb, owner=(rootfs.INNER_UID, rootfs.INNER_GID))
    rootfs.make_etc(old, {"hostname": HOSTNAME})
    rootfs.write_etc_extras(old)  # the initramfs carries the host's copies (image.py)
    for tag, target, writable in shares:
        _mount_share(tag, target, writable)
    rootfs.seed_cache(owner=(rootfs.INNER_UID, rootfs.INNER_GID))
    linux.umount2(old, linux.MNT_DETACH)
    os.rmdir(old)
    linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)


def _leave_the_initramfs() -> None:
    """``pivot_root`` onto a fresh tmpfs, the old root (the initramfs) at /.oldroot.

    pivot_root refuses to move the initramfs' own mount (it has no parent),
    so the agent first stands on a bind of it, moved over it, as switch_root
    does. The new root then sits where a process isolate's sits on any host:
    over the namespace's first mount, which no process in it can reach.
    """
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("/", _STAGE, None, linux.MS_BIND | linux.MS_REC)
    os.chdir(_STAGE)
    linux.mount(".", "/", None, linux.MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    linux.mount("tmpfs", _STAGE, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=4m,mode=0755")
    os.mkdir(_STAGE + _OLD_ROOT)
    linux.pivot_root(_STAGE, _STAGE + _OLD_ROOT)
    os.chdir("/")


def _mount_share(tag: str, target: str, writable: bool) -> None:
    """A shared path: QEMU's 9p export ``tag``, mounted at ``target`` in this namespace only."""
    os.makedirs(target, mode=0o755, exist_ok=True)
    flags = linux.MS_NOSUID | linux.MS_NODEV | (0 if writable else linux.MS_RDONLY)
    # A Python environment never changes once built (the host's environments.py): cached like /usr.
    options = _P9_OPTIONS + (",cache=loose" if target == rootfs.ENV_ROOT and not writable else "")
    linux.mount(tag, target, "9p", flags, options)


def _drop_privileges(uid: int, gid: int) -> None:
    """uid 1000, every capability set empty, no_new_privs, not dumpable."""
    linux.drop_bounding_set()  # while CAP_SETPCAP is still held
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.drop_all_capabilities()  # ambient, effective, permitted, inheritable (setresuid emptied most)
    # Code runs as the same uid: it may open neither /proc/1/mem nor the agent's descriptors.
    linux.prctl(linux.PR_SET_DUMPABLE, 0)


def _quiet_stdio() -> None:
    """Nothing of the old root on the agent's descriptors: fds 0-2 on the new root's /dev/null.

    Before, 1 and 2 were the guest's console, which the host reads for the
    kernel's OOM reports: neither the agent nor anything it starts writes there.
    """
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _read_text(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# ---- the channel to the host, and the guest's own seccomp filter ----------------


class _GuestFilter:
    """In a microVM guest: the process runtime's seccomp profile, kept by the agent itself.

    The guest kernel is the VM's boundary, and its attack surface is also the
    first step out of the VM; so code in the guest runs under the same filter
    as in a process isolate. There the host answers each blocked call; here
    nothing of the guest reaches the host kernel, so a thread of the agent
    does: it sends the host a ``violation`` notification (the syscall, its
    arguments, the caller's pid), and only then fails the call with EPERM
    (with the errno ``answers`` names for the numbers the profile does not
    know), so the report always comes before the run's answer. The host
    turns it into a ``SecurityViolation`` with the profile's own rule and reason.

    The filter binds the agent and everything it starts from then on; its
    listener is closed in every child the agent forks (a runner that kept it
    could answer its own blocked calls), and the agent is not dumpable, so
    code running as the same uid cannot take it through /proc or ptrace.
    """

    def __init__(self, conn: Any, program: bytes, answers: str = "") -> None:
        self.conn = conn
        self._linux = linux
        self._unknown_errno, self._unknown = _parse_answers(answers)
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)  # an unprivileged filter needs it
        self.listener = linux.seccomp_install_listener(program)
        os.register_at_fork(after_in_child=self._close_in_child)
        threading.Thread(target=self._answer_forever, name="stockade-guest-seccomp", daemon=True).start()

    def _close_in_child(self) -> None:
        # Once per process: the hook runs again at every later fork of this child (a runner's
        # program forking), when the number may name one of the program's own descriptors.
        if self.listener < 0:
            return
        try:
            os.close(self.listener)
        except OSError:
            pass
        self.listener = -1

    def _answer_forever(self) -> None:
        while True:
            notif = self._linux.seccomp_notif_recv(self.listener)
            if notif is None:
                time.sleep(0.001)  # its caller died before it could be read; never a busy loop
                continue
            notif_id, pid, nr, args = notif
            note = wire.notification("violation", {"nr": nr, "args": list(args), "pid": pid})
            try:
                self.conn.sendall(wire.encode_message(note))
            except OSError:
                pass  # the host is gone: the call is still refused
            unknown = any(lo <= nr <= hi for lo, hi in self._unknown)
            self._linux.seccomp_notif_deny(self.listener, notif_id, self._unknown_errno if unknown else errno.EPERM)


def _parse_answers(text: str) -> tuple[int, list[tuple[int, int]]]:
    """``38:337-423,470-1073741823`` (``seccomp.guest_answers``): an errno, and the syscall numbers it answers."""
    if not text:
        return errno.EPERM, []
    err, _, ranges = text.partition(":")
    bounds = [r.split("-") for r in ranges.split(",") if r]
    return int(err), [(int(lo), int(hi)) for lo, hi in bounds]


def _read_program(path: str) -> bytes | None:
    """The guest filter's program; None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _guard_guest(conn: Any, program: bytes, answers: str) -> bool:
    """Put the agent under the seccomp ``program``; False if this guest kernel cannot."""
    try:
        _GuestFilter(conn, program, answers)
    except OSError:
        return False
    return True


def _reseed_kernel_rng() -> None:
    """Make the kernel rekey its generator from the input pool (where init put the host's seed).

    A microVM restored from a snapshot resumes with the generator state of the
    moment the snapshot was taken; without this, every restored VM would hand
    out the same "random" bytes until the kernel's next scheduled reseed.
    """
    try:
        fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError:
        pass  # not root (not a microVM guest): nothing to do
    finally:
        os.close(fd)
