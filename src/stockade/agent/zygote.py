"""The process runtime's zygote: an interpreter that has paid start-up once.

The host starts it as ``/usr/bin/python3 -I -S`` with an empty environment and a
SOCK_SEQPACKET control socket whose fd number is its argument. Each message is
an isolate config (JSON) with one descriptor attached: the isolate's end of its
agent socket. The zygote forks; the child builds the isolate
(``confine.start_isolate``), which execs a fresh interpreter once its new root
is ready (see confine.py for why). A message without a descriptor,
``{"op": "prepare", ...}``, asks for the next child ahead of time (``_Spare``):
the policy-independent steps (cgroups, sandbox uid, namespaces, the fork into
the pid namespace, the new root, the exec and the interpreter's start) are
then done before the isolate is asked for.

The zygote is single-threaded (fork-safe), a child subreaper (it reaps every
isolate init), and ends with its host (PDEATHSIG and EOF on the control socket).
A host that dies without closing its isolates (SIGKILL, a crash) leaves their
cgroups behind; the zygote then kills every isolate it built and removes the
cgroups they were put in, so nothing waits for the next start's sweep.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib.util
import marshal
import os
import select
import signal
import socket
import struct
import sys
import time

from . import confine, linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CONFIG_MAX = confine.CONFIG_MAX
# The modules an isolate's fresh interpreter imports (copied into each isolate).
AGENT_MODULES = (
    "__init__",
    "commands",
    "confine",
    "display",
    "files",
    "jsoncodec",
    "kernel",
    "linux",
    "processes",
    "rootfs",
    "runner",
    "server",
    "sessions",
    "wire",
)


def main(ctl_fd: int, sandbox_uids: str | None = None, cgroup_parents: str | None = None) -> None:
    """Serve isolate requests on ``ctl_fd``. From a root parent: ``sandbox_uids`` (``first-last``), the
    only uids its isolates may run as, and ``cgroup_parents`` (one path a line), the only groups it
    writes pids under (``confine.check_request``)."""
    confine.hold_to(sandbox_uids, cgroup_parents.split("\n") if cgroup_parents else [])
    ctl = socket.socket(fileno=ctl_fd)
    host = os.getppid()
    # SIGTERM, not SIGKILL: the zygote cleans up after a dead host. It is also
    # sent when the host *thread* that started the zygote ends, so the zygote
    # checks that its parent really changed before it acts.
    signal.signal(signal.SIGTERM, lambda *_: None)  # wakes the select below
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != host or host == 1:
        os._exit(0)  # the host died before PDEATHSIG was armed
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    built = _Built()
    agent_files = _agent_files()
    # Everything imported so far is shared with the builders until they exec:
    # keep the collector from touching (and so copying) those pages after fork.
    gc.freeze()
    spare: _Spare | None = None
    dead_spares = 0
    ctl.sendall(b"ready")
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap()
            if os.getppid() != host:
                built.clean_up()
                return
        if ctl.fileno() in ready:
            try:
                raw, fds, _flags, _addr = socket.recv_fds(ctl, CONFIG_MAX, 1)
            except OSError:
                raw, fds = b"", []
            if not raw:
                if _host_gone(host, wait_s=5.0):
                    built.clean_up()  # the host died; a host that closes us cleans up itself
                return
            if not fds and raw == CLOSE:
                # The host closes us on purpose, its isolates closed: the groups it was handed as
                # root (a daemon that gave root up cannot remove them) go with us.
                if spare is not None:
                    spare.discard()
                _remove_parents()
                return
            if not fds:
                # {"op": "prepare", "cgroup_procs": [...]}: fork the next child ahead of time,
                # unless spares keep dying before use (e.g. no user namespaces for this uid).
                if spare is not None:
                    spare.discard()
                request = _prepare_request(raw)
                if request is not None:
                    built.note(request["cgroup_procs"])
                usable = request is not None and dead_spares < DEAD_SPARES_TO_STOP
                spare = _fork_spare(ctl, (wake_r, wake_w), request, agent_files) if usable and request else None
                continue
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            # A child forked ahead of time, already in the isolate's cgroups, takes the
            # request; otherwise fork now.
            if spare is None or not spare.take(raw, fds[0]):
                if spare is not None and spare.died:
                    dead_spares += 1
                built.note_config(raw)
                _spawn(ctl, raw, fds[0], (wake_r, wake_w), agent_files)
            else:
                dead_spares = 0
            os.close(fds[0])
            if spare is not None:
                spare.discard()
                spare = None


CLOSE = b'{"op": "close"}'  # what a host that closes the zygote on purpose sends last


def _remove_parents() -> None:
    """rmdir the groups the zygote was held to (``confine.hold_to``): a daemon's delegated groups,
    empty once its isolates are gone (one that is not stays for the next start's sweep)."""
    for path in confine.CGROUP_PARENTS:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _agent_files() -> dict[str, bytes]:
    """The agent's modules as an isolate gets them: source, and bytecode whose code names
    their path inside (``confine.AGENT_HOME``), so that tracebacks and ``__file__`` never
    show the host's install path. The bytecode is kept beside the host's own
    (``_isolate_bytecode``): compiling the modules at every boot took longer than the
    rest of the zygote's start."""
    here = os.path.dirname(os.path.abspath(__file__))
    tag = sys.implementation.cache_tag
    files: dict[str, bytes] = {}
    for name in AGENT_MODULES:
        with open(os.path.join(here, name + ".py"), "rb") as f:
            source = f.read()
        files[f"agent/{name}.py"] = source
        cached = os.path.join(here, "__pycache__", f"{name}.isolate.{tag}.pyc")
        inner = f"{confine.AGENT_HOME}/agent/{name}.py"
        files[f"agent/__pycache__/{name}.{tag}.pyc"] = _isolate_bytecode(source, inner, cached)
    return files


# A hash-based pyc that is not checked against its source (PEP 552): the isolate's copy is
# read-only and always matches, so its interpreter takes it as it is.
_UNCHECKED_HASH_PYC = (1).to_bytes(4, "little")


def _isolate_bytecode(source: bytes, inner_path: str, cached: str) -> bytes:
    """``source`` compiled as the file ``inner_path``, as a pyc's bytes; ``cached`` keeps them.

    The cache sits in the agent's own ``__pycache__``, which the interpreter running this
    already trusts with the same modules' bytecode: whoever can write there can change
    what the zygote itself runs. A cached copy is used only when its header holds this
    source's hash and its code names ``inner_path``; otherwise it is compiled again and
    written back when the directory lets us (atomically: a rename), else only used.
    """
    header = importlib.util.MAGIC_NUMBER + _UNCHECKED_HASH_PYC + importlib.util.source_hash(source)
    try:
        with open(cached, "rb") as f:
            data = f.read()
        # marshal trusts its input: so does the import of this very module's bytecode, from the same place.
        if data.startswith(header) and marshal.loads(data[len(header) :]).co_filename == inner_path:  # noqa: S302
            return data
    except (OSError, ValueError, EOFError, TypeError, AttributeError):
        pass  # absent, unreadable or not bytecode: made again below
    data = header + marshal.dumps(compile(source, inner_path, "exec", dont_inherit=True))
    partial = f"{cached}.{os.getpid()}"
    try:
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), "wb") as f:
            f.write(data)
        os.replace(partial, cached)
    except OSError:  # a read-only install: compiled at each start, as before there was a cache
        with contextlib.suppress(OSError):
            os.unlink(partial)
    return data


def _host_gone(host: int, wait_s: float) -> bool:
    """After the host's end of our socket closed: did the host die, or close it on purpose?

    A dying process closes its files before its children get a new parent, so
    at the end of file the parent may still read as the host for a moment: it
    is watched for a while. A host that closes the zygote on purpose kills it
    right after, so the wait costs nothing then.
    """
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.getppid() != host:
            return True
        time.sleep(0.005)
    return False


class _Built:
    """The cgroups of the isolates this zygote built, for the clean-up after a dead host."""

    def __init__(self) -> None:
        self.dirs: dict[str, None] = {}  # in the order first seen

    def note(self, procs_files: list[str]) -> None:
        # Groups the host has removed (isolates it closed) are forgotten here, so
        # the record stays as small as the set of live isolates.
        for gone in [d for d in self.dirs if not os.path.isdir(d)]:
            del self.dirs[gone]
        for path in procs_files:
            if isinstance(path, str):
                self.dirs[os.path.dirname(path)] = None

    def note_config(self, raw: bytes) -> None:
        try:
            config = confine.decode_config(raw)
            confine.check_request(config)  # what it refuses is never built, so never cleaned up
            procs = config.get("cgroup_procs") or []
        except ValueError:
            return
        if isinstance(procs, list):
            self.note(procs)

    def clean_up(self, deadline_s: float = 20.0) -> None:
        """Kill every isolate built here (each pid-namespace init takes its namespace
        with it), wait until they are gone, then remove their cgroups.

        The zygote has nothing else left to do, so it waits long: on a loaded
        host the last exits can take seconds, and a group given up on here
        stays until the next start sweeps it."""
        me = os.getpid()
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            children = _children_of(me)
            if not children:
                break
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _reap()
            time.sleep(0.01)
        for path in sorted(self.dirs, key=len, reverse=True):  # a nested group before its parent
            while True:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break  # left for the next start's sweep
                    time.sleep(0.01)  # its last processes are still exiting
                else:
                    break


def _children_of(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (from /proc: the zygote keeps no list of them)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(name))
    return found


class _Spare:
    """A child of the zygote forked ahead for the next isolate: in its cgroups,
    already the sandbox uid, in fresh namespaces, with a pid-namespace init
    waiting for the isolate's config (an unspecialised process, as Android's
    zygote keeps them). Mounts, rlimits, Landlock, seccomp and the agent are
    still done when the config comes, since they depend on the policy."""

    def __init__(self, pid: int, sock: socket.socket, request: dict[str, Any]) -> None:
        self.pid, self.sock, self.request = pid, sock, request
        self.died = False  # it was gone when a config came for it

    def take(self, raw: bytes, agent_fd: int) -> bool:
        try:
            config = confine.decode_config(raw)
        except ValueError:
            return False
        if any(config.get(key) != self.request.get(key) for key in SPARE_KEYS):
            return False  # asked for another isolate's cgroups or uid: build the usual way
        try:
            socket.send_fds(self.sock, [raw], [agent_fd])
        except OSError:
            self.died = True
            return False  # it died: build the usual way
        self.sock.close()
        self.pid = 0
        return True

    def discard(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # its init sees EOF and exits
        self.sock.close()


SPARE_KEYS = ("cgroup_procs", "outer_uid", "outer_gid")
DEAD_SPARES_TO_STOP = 3  # spares that died before use, in a row: stop forking them


def _prepare_request(raw: bytes) -> dict[str, Any] | None:
    try:
        request = confine.decode_config(raw)
    except ValueError:
        return None
    if request.get("op") != "prepare":
        return None
    procs = request.get("cgroup_procs") or []
    uid, gid = request.get("outer_uid"), request.get("outer_gid")
    if not all(isinstance(p, str) for p in procs) or not all(x is None or isinstance(x, int) for x in (uid, gid)):
        return None
    checked = {"cgroup_procs": procs, "outer_uid": uid, "outer_gid": gid}
    try:
        confine.check_request(checked)
    except ValueError:
        return None  # no spare: the request itself, when it comes, is refused and reported
    return checked


def _fork_spare(
    ctl: socket.socket, wake_fds: tuple[int, int], request: dict[str, Any], agent_files: dict[str, bytes]
) -> _Spare | None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if pid == 0:
        ours.close()
        _spare_main(ctl, wake_fds, theirs, request, zygote, agent_files)
    theirs.close()
    return _Spare(pid, ours, request)


def _spare_main(
    ctl: socket.socket,
    wake_fds: tuple[int, int],
    theirs: socket.socket,
    request: dict[str, Any],
    zygote: int,
    agent_files: dict[str, bytes],
) -> None:
    """The spare, outside the new pid namespace: never returns."""
    try:
        _become_builder(ctl, wake_fds)
        confine.join_cgroups(request["cgroup_procs"])
        confine.enter_namespaces(request["outer_uid"], request["outer_gid"])
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        if os.getppid() != zygote:
            os._exit(0)  # the zygote died before PDEATHSIG was armed
        to_init, from_spare = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        init = os.fork()
    except BaseException:  # noqa: BLE001 - the zygote builds the usual way (and reports) when a spare is gone
        os._exit(1)
    if init == 0:
        # pid 1 of the new pid namespace: the new root, then a fresh interpreter
        # that says "ready" and waits for the isolate's config and agent socket.
        try:
            theirs.close()
            to_init.close()
            confine.prepare_root(agent_files)
            confine.exec_agent(from_spare.fileno(), announce=True)
        finally:
            os._exit(1)  # only reached when the exec failed: the spare sees it as never ready
    from_spare.close()
    try:
        # A spare whose init failed exits without reading a config: if none was
        # sent yet, the zygote finds it gone and builds the next isolate the usual
        # way; a config already waiting for it is lost with it (that start fails,
        # and the host says the isolate died during setup).
        if to_init.recv(16) != b"ready":
            os._exit(1)
        raw, fds, _flags, _addr = socket.recv_fds(theirs, CONFIG_MAX, 1)
        if not raw or len(fds) != 1:
            os._exit(0)
        # Tell the host who init is, before init can say anything on the same socket.
        os.write(fds[0], b"P" + struct.pack("<I", init))
        socket.send_fds(to_init, [raw], [fds[0]])
    except BaseException:  # noqa: BLE001
        os._exit(1)
    os._exit(0)


def _spawn(
    ctl: socket.socket, raw: bytes, agent_fd: int, wake_fds: tuple[int, int], agent_files: dict[str, bytes]
) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            _become_builder(ctl, wake_fds)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        confine.start_isolate(raw, socket.socket(fileno=agent_fd), agent_files)


def _become_builder(ctl: socket.socket, wake_fds: tuple[int, int]) -> None:
    """In a freshly forked child: drop what belongs to the zygote."""
    ctl.close()
    for fd in wake_fds:
        os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the zygote's own handler is not the isolate's
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:4])
