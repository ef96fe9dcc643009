"""The guest agent: a JSON-RPC 2.0 server that runs inside every isolate.

Stdlib-only. Every runtime starts this same agent and speaks the framed protocol
of ``wire.py`` to it. Methods: ``ping``, ``exec`` and ``run_code`` (here: their
runs collected; how their processes start is ``commands.py``), the file calls
(``files.py``), a session's cells (``sessions.py``) and background processes
(``processes.py``).

The agent is confined exactly like the code it runs, so it holds no secret and
no privilege worth stealing; the host treats everything it says as untrusted
(limits, violations and the final verdict are decided on the host side).

It is usually pid 1 of its pid namespace: it reaps every orphan, and when it
exits the kernel kills everything left in the namespace. It exits as soon as
the host's end of the connection closes.
"""

from __future__ import annotations

import _thread
import os
import select
import stat
import time

from . import files, wire
from . import runner as runners
from .commands import Commands
from .processes import Processes
from .sessions import Interpreters

# Imports cost real time inside gVisor (every file the interpreter opens goes
# through its gofer): the agent avoids typing, base64 (which pulls in re) and
# traceback (loaded only on the error path), enum (behind signal and socket),
# and parses JSON with jsoncodec.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from collections.abc import Callable
    from typing import Any
else:  # the C modules behind signal and socket: their Python wrappers import enum
    import _signal as signal
    import _socket as socket

READ_CHUNK = 65536
DEFAULT_MAX_OUTPUT = 1024 * 1024
# After the main process exits, how long to keep reading output that a
# background grandchild may still be writing into the same pipes.
DRAIN_GRACE_S = 0.05


# Python's own: ignored in the agent, so that its writes see EPIPE and EFBIG; what it starts gets
# them back at their defaults (commands.py, runner.py).
_KEPT_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


def _signals_as_fresh() -> None:
    """Every signal that whoever started the agent left ignored, back at its default: an ignored
    signal stays ignored across fork and exec, and a host started in the background (``cmd &``,
    ``nohup``) ignores SIGINT and SIGQUIT, so the code's interrupts, a cell's timeout and a
    ``kill -INT`` of its own would reach nothing. (The agent then heeds none of the signals that
    would end it: ``runner.UNHEEDED_BY_THE_AGENT``; what it starts gets them at their defaults.)"""
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP, *_KEPT_IGNORED):
            continue
        try:
            if signal.getsignal(number) == signal.SIG_IGN:
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            continue  # a number the kernel or libc keeps to itself


class Agent(Commands, Interpreters, Processes):
    def __init__(self, conn: socket.socket, base_env: dict[str, str] | None = None) -> None:
        self.conn = conn
        self.base_env = base_env or {}
        runners.set_environ(self.base_env)  # a runner starts from it: a run sets only what it adds
        self.exited: dict[int, int] = {}  # pid -> wait status, for children we reaped early
        # Runners whose status someone will ask for; every other child (orphans
        # re-parented to us as pid 1, discarded spares) is reaped and forgotten.
        self._watched: set[int] = set()
        self._spare: runners.Runner | None = None  # a python runner forked ahead of the next run_code
        self._spare_ready = False
        self._answered = False
        self._last = False  # the host said no request follows: fork nothing ahead
        self._eager_spare = False  # the host comes straight back: fork the next runner at once
        self._pending: list[bytes] = []  # frames that came while a run was in progress
        self._kernels = {}
        self._spawned = {}
        self._spawn_count = 0
        self.guest_seccomp = False  # a microVM guest's agent under its own filter (guest._GuestFilter)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signals_as_fresh()
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for number in runners.UNHEEDED_BY_THE_AGENT:  # the code's to send, not to end the agent with
            signal.signal(number, lambda *_: None)
        self.methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": self.ping,
            "exec": self.exec,
            "run_code": self.run_code,
            "write_file": files.write_file,
            "read_file": files.read_file,
            "list_dir": files.list_dir,
            "run_cell": self.run_cell,
            "close_interpreter": self.close_interpreter,
            "interrupt": lambda params: None,  # nothing runs: nothing to interrupt
            "spawn": self.spawn,
            "proc_read": self.proc_read,
            "proc_write": self.proc_write,
            "proc_wait": self.proc_wait,
            "proc_kill": self.proc_kill,
            "proc_list": self.proc_list,
            "tunnel_open": self.tunnel_open,
        }

    # ---- the loop --------------------------------------------------------------

    def serve(self) -> None:
        while True:
            # Before the first request the agent only answers: a runtime that
            # starts it on demand waits for that first answer (fork is slow
            # under gVisor). Afterwards, idle time goes into the next runner.
            if self._spare is None and self._answered and not self._last:
                self._spare_when_idle()
            if self._pending:  # read while a run was in progress
                if not self._answer(self._pending.pop(0)):
                    return
                continue
            reading, writing = self.spawned_fds()
            ready, writable, _ = select.select([self.conn.fileno(), self._wake_r, *reading], writing, [])
            self.service_spawned(ready, writable)
            if self._wake_r in ready:
                self._drain_wakeups()
                self._reap()
            if self.conn.fileno() in ready:
                try:
                    payload = wire.read_frame(self.conn)
                except (EOFError, wire.FrameError, OSError):
                    return  # host gone or speaking garbage: end the isolate
                if not self._answer(payload):
                    return

    def _answer(self, payload: bytes) -> bool:
        """Handle one frame and send its reply; False when the host is gone."""
        reply = self.handle(payload)
        if reply is not None:
            try:
                self.conn.sendall(_frame_for(reply))
            except OSError:
                return False
            self._answered = True
        return True

    def handle(self, payload: bytes) -> dict[str, Any] | None:
        msg_id = None
        message: Any = None
        try:
            message = wire.decode_payload(payload)
            if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
                raise wire.RPCError(wire.INVALID_REQUEST, "Invalid Request")
            msg_id = message.get("id")
            method = message.get("method")
            if not isinstance(method, str) or not isinstance(msg_id, (int, str, type(None))):
                raise wire.RPCError(wire.INVALID_REQUEST, "Invalid Request")
            params = message.get("params", {})
            if not isinstance(params, dict):
                raise wire.RPCError(wire.INVALID_PARAMS, "params must be an object")
            handler = self.methods.get(method)
            if handler is None:
                raise wire.RPCError(wire.METHOD_NOT_FOUND, f"Method not found: {method}")
            if params.get("last") is True:
                self._last = True  # a later request still works: its runner is forked on demand
            result = handler(params)
        except wire.RPCError as exc:
            error = exc
        except OSError as exc:
            error = wire.RPCError(wire.INTERNAL_ERROR, str(exc), {"errno": exc.errno})
        except Exception as exc:  # noqa: BLE001 - any bug must become an error reply, not a dead agent
            error = wire.RPCError(wire.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        else:
            return wire.response(msg_id, result) if "id" in message else None
        if isinstance(message, dict) and "method" in message and "id" not in message:
            return None  # a notification gets no reply, not even an error
        return wire.error_response(msg_id, error)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._watched:
                self.exited[pid] = status

    # ---- methods ---------------------------------------------------------------

    def ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "pid": os.getpid(), "uid": os.getuid(), "guest_seccomp": self.guest_seccomp}

    def exec(self, params: dict[str, Any]) -> dict[str, Any]:
        argv = params.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise wire.RPCError(wire.INVALID_PARAMS, "argv must be a non-empty list of strings")
        return self._run(params, lambda: self._spawn_exec(argv, params))

    def run_code(self, params: dict[str, Any]) -> dict[str, Any]:
        language = params.get("language", "python")
        code = params.get("code")
        if not isinstance(code, str):
            raise wire.RPCError(wire.INVALID_PARAMS, "code must be a string")
        if language == "python":
            return self._run(params, lambda: self._spawn_python(code, params))
        if language == "bash":
            return self._run(params, lambda: self._spawn_exec(["/bin/bash", "-c", code], params))
        raise wire.RPCError(wire.INVALID_PARAMS, f"unsupported language: {language!r} (python, bash)")

    def _run(self, params: dict[str, Any], spawn: Callable[[], tuple[int, int, int, int | None]]) -> dict[str, Any]:
        timeout = params.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise wire.RPCError(wire.INVALID_PARAMS, "timeout must be a positive number")
        max_output = params.get("max_output_bytes", DEFAULT_MAX_OUTPUT)
        if not isinstance(max_output, int) or max_output < 0:
            raise wire.RPCError(wire.INVALID_PARAMS, "max_output_bytes must be a non-negative integer")
        stdin = files.b64_param(params, "stdin") if params.get("stdin") else b""
        started = time.monotonic()
        pid, out_r, err_r, in_w = spawn()
        collect = params.get("collect", True) is not False
        run = runners.Run(pid, out_r, err_r, max_output, bool(params.get("stream")) or not collect, collect)
        if in_w is not None:
            # Fed as the command reads it, from the loop below: a command that
            # never reads its input must not stall the agent, and none is lost.
            os.set_blocking(in_w, False)
            run.stdin_fd, run.stdin_left = in_w, memoryview(stdin)
            run.feed_stdin()
        deadline = started + timeout if timeout else None
        self._collect(run, deadline)
        status = run.status if run.status is not None else 0
        return {
            "exit_code": os.waitstatus_to_exitcode(status),
            "stdout": wire.b64encode(b"".join(run.buffers["stdout"])),
            "stderr": wire.b64encode(b"".join(run.buffers["stderr"])),
            "timed_out": run.timed_out,
            "output_truncated": run.output_truncated,
            "scratch_full": runners.scratch_full(),
            "duration": time.monotonic() - started,
        }

    def _collect(self, run: runners.Run, deadline: float | None) -> None:
        drain_until: float | None = None
        watch_conn = True
        while run.fds or run.status is None:
            now = time.monotonic()
            if run.status is None and run.pid in self.exited:
                run.status = self.exited.pop(run.pid)
                self._watched.discard(run.pid)
                drain_until = now + DRAIN_GRACE_S
                if not run.fds:
                    break
            if run.status is not None and drain_until is not None and now >= drain_until:
                break
            if deadline is not None and now >= deadline and run.status is None:
                run.timed_out = True
                runners.kill_group(run.pid)
                deadline = None
            waits = [t for t in (deadline, drain_until) if t is not None]
            if run.status is None and not run.fds:
                self._reap()
                if run.pid in self.exited:
                    continue
                waits.append(now + runners.REAP_POLL_S)
            wait = max(0.0, min(waits) - now) if waits else None
            watched = [self.conn.fileno()] if watch_conn else []
            feeding = [run.stdin_fd] if run.stdin_fd is not None else []
            reading, writing = self.spawned_fds()
            ready, writable, _ = select.select(
                [*watched, self._wake_r, *run.fds, *reading], [*feeding, *writing], [], wait
            )
            self.service_spawned(ready, writable)
            if run.stdin_fd is not None and run.stdin_fd in writable:
                run.feed_stdin()
            if self.conn.fileno() in ready:
                watch_conn = self.frame_during_run(run.pid, group=True)
            if self._wake_r in ready:
                self._drain_wakeups()
                self._reap()
            for fd in [f for f in ready if f in run.fds]:
                self._read_output(run, fd)
        for fd in list(run.fds):
            os.close(fd)
        run.fds.clear()
        run.close_stdin()

    def frame_during_run(self, pid: int, group: bool) -> bool:
        """The host sent a frame while ``pid`` runs: an interrupt is passed on to it at once (SIGINT,
        to its process group when ``group``); anything else waits its turn, and the host is no longer
        watched until then (False). A host that is gone ends the isolate."""
        if not _peek_alive(self.conn):
            runners.kill_group(pid)
            os._exit(0)  # the host is gone: the whole isolate ends with us
        try:
            payload = wire.read_frame(self.conn)
        except (EOFError, wire.FrameError, OSError):
            runners.kill_group(pid)
            os._exit(0)
        if not _is_interrupt(payload):
            self._pending.append(payload)  # a pipelined request
            return False
        try:
            os.kill(-pid if group else pid, signal.SIGINT)
        except OSError:
            pass  # it has just ended
        return True

    def _read_output(self, run: runners.Run, fd: int) -> None:
        name = run.fds[fd]
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return  # an interpreter's pipes, drained once its cell is done
        except OSError:
            chunk = b""
        if not chunk:
            os.close(fd)
            del run.fds[fd]
            return
        if not run.collect:
            note = wire.notification("output", {"stream": name, "data": wire.b64encode(chunk)})
            wire.send_message(self.conn, note)
            return
        room = run.max_output - run.total
        if len(chunk) > room:
            chunk = chunk[: max(room, 0)]
            if not run.output_truncated:
                run.output_truncated = True
                runners.kill_group(run.pid)
        run.total += len(chunk)
        if chunk:
            run.buffers[name].append(chunk)
            if run.stream:
                note = wire.notification("output", {"stream": name, "data": wire.b64encode(chunk)})
                wire.send_message(self.conn, note)


def _is_interrupt(payload: bytes) -> bool:
    try:
        message = wire.decode_payload(payload)
    except wire.RPCError:
        return False
    return isinstance(message, dict) and message.get("method") == "interrupt" and "id" not in message


class FdConn:
    """The slice of a socket's interface the agent uses, over descriptors that are not a socket:
    a microVM's virtio-serial port (one character device), or a container's standard input
    and output (two pipes, as a Kubernetes pod's are).

    Frames may come from two threads (in a guest, the agent's and the guest filter's
    violation reports), so each is written whole under a lock.
    """

    def __init__(self, read_fd: int, write_fd: int | None = None) -> None:
        self.fd = read_fd
        self.write_fd = read_fd if write_fd is None else write_fd
        self._writing = _thread.allocate_lock()  # not threading: the agent keeps its imports few

    def fileno(self) -> int:
        return self.fd

    def recv(self, n: int, flags: int = 0) -> bytes:
        return os.read(self.fd, n)

    def sendall(self, data: bytes) -> None:
        with self._writing:
            wire.write_all(self.write_fd, data)

    def alive(self) -> bool:
        # A virtio-serial port whose host side went away, or a pipe whose writer closed, polls as hung up.
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


class _PatientConn:
    """A socket whose blocking calls may still fail with EAGAIN: wait for it and retry.

    gVisor hands the agent the host socket as its stdin, and (runsc 2022 on the
    ptrace platform) a read or write on it can say EAGAIN when the host is slow
    to send the rest of a frame or to read one: taken as an error, that ended
    the agent mid-frame. Nothing else changes.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, n: int, flags: int = 0) -> bytes:
        while True:
            try:
                return self.sock.recv(n, flags)
            except BlockingIOError:
                if flags & socket.MSG_DONTWAIT:
                    raise
                select.select([self.sock], [], [], 1.0)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)


def _peek_alive(conn: socket.socket) -> bool:
    alive = getattr(conn, "alive", None)
    if alive is not None:
        return bool(alive())
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True
    except OSError:
        return False


def _frame_for(reply: dict[str, Any]) -> bytes:
    """``reply`` framed, or an error in its place when it does not fit one frame (a huge listing)."""
    try:
        return wire.encode_message(reply)
    except wire.FrameError as exc:
        error = wire.RPCError(wire.INTERNAL_ERROR, f"the reply is too large: {exc}")
        return wire.encode_message(wire.error_response(reply.get("id"), error))


_KEEP: list[int] = []


def freeze_heap() -> None:
    """Put everything loaded so far out of the cyclic collector's reach, before runners are forked.

    A runner shares the agent's pages copy-on-write. A collection in it
    writes into the header of every object it walks, so each page holding
    one is copied: under the microVM's emulated CPU that made every module
    the agent imports cost run_code about 20 ms (measured: importing
    contextlib alone). The zygote does the same for the builders it forks.
    """
    import gc

    gc.freeze()


def main() -> runners.Program:
    """Serve on the socket in STOCKADE_AGENT_FD: a descriptor number, or ``stdio`` (fds 0 and 1).

    Runtimes that start the agent as a program (``runner.bootstrap``) use this:
    the fake runtime passes a descriptor; gVisor gets the host's socket as the
    container's standard input and output. A microVM guest's agent starts in
    guest.py. Returns only in a runner that became a Python program.
    """
    where = os.environ.pop("STOCKADE_AGENT_FD", "3")
    piped = where == "stdio" and not stat.S_ISSOCK(os.fstat(0).st_mode)
    if where == "stdio":
        # Non-inheritable copies, whatever their numbers: a runner the agent forks closes them.
        fd = os.dup(0)
        # gVisor imports stdin and stdout as two files over the one host socket and
        # shuts the socket down when the stdout file goes: keep a reference to it
        # for the agent's whole life (non-inheritable, so nothing else holds one).
        # A container's stdio are two pipes instead (a Kubernetes pod's, reached by attach).
        _KEEP.append(os.dup(1))
        null = os.open("/dev/null", os.O_RDWR)
        # Children must not inherit the host connection. And nothing of the host may stay
        # on the agent's descriptors: code in gVisor opens them through /proc/1/fd, whatever
        # its uid or the agent's dumpability, so stderr (runsc's, on the host) goes too.
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
    else:
        fd = int(where)
    warm = os.environ.pop("STOCKADE_AGENT_WARM", "") == "1"
    conn: Any
    if piped:
        conn = FdConn(fd, _KEEP[-1])
    else:
        conn = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        if where == "stdio":
            conn = _PatientConn(conn)
    freeze_heap()
    agent = Agent(conn, dict(os.environ))
    return serve_until_done(agent, warm)


def serve_until_done(agent: Agent, warm: bool = False) -> runners.Program:
    """Serve until the host goes (then exit), or return the program a runner became."""
    try:
        if warm:
            agent.prepare_spare(warm=True)
        agent.serve()
    except runners.Become as become:
        return become.program
    os._exit(0)  # pid 1 of its namespace: the kernel ends everything left in it
