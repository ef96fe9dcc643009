"""Background processes with handles: ``spawn``, then ``proc_read``/``proc_write``/``proc_wait``/``proc_kill``.

A spawned process runs beside whatever the agent does next; the agent keeps
reading its output (into a buffer of at most OUTPUT_BUFFER bytes per stream;
what the host does not collect in time is counted and dropped, never allowed
to block the process or grow the agent) and feeding its stdin from what the
host wrote, in every loop it waits in (``fds``/``service``).

Each process has its own process group (``proc_kill`` signals the group) and
runs under the run's rlimits. At most MAX_SPAWNED live at once.

A *tunnel* (``tunnel_open``) is the same for a TCP connection the agent makes
to a port on the isolate's own loopback: its "stdout" is what the port sends,
its "stdin" what the host writes, and it "ends" when the port closes its side.
The host relays a published port through it where it cannot join the
isolate's network namespace itself (gVisor, a microVM: runtimes/publish.py).
Nothing of a tunnel's stream is dropped: past OUTPUT_BUFFER unread bytes the
agent stops reading the socket until the host catches up.
"""

from __future__ import annotations

import os
import time

from . import wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any
else:  # the C module: socket.py imports enum (slow under gVisor)
    import _socket as socket

OUTPUT_BUFFER = 1 << 20  # per stream and process, until the host reads it
STDIN_BUFFER = 4 << 20  # written by the host, not yet taken by the process
MAX_SPAWNED = 64
MAX_ENDED = 64  # ended processes whose exit status is kept for their handles
MAX_TUNNELS = 64  # connections to the isolate's ports, counted apart from its processes
MAX_WAIT_S = 600.0
_SIGNALS = {"SIGTERM": 15, "SIGKILL": 9, "SIGINT": 2, "SIGHUP": 1, "SIGUSR1": 10, "SIGUSR2": 12}


class Spawned:
    """One background process: its pipes, what it wrote that the host has not read, its end."""

    def __init__(self, handle: str, pid: int, argv: list[str], out_r: int, err_r: int | None, in_w: int) -> None:
        self.handle, self.pid, self.argv = handle, pid, argv
        self.fds = {out_r: "stdout"} if err_r is None else {out_r: "stdout", err_r: "stderr"}
        self.output: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.dropped = {"stdout": 0, "stderr": 0}
        self.stdin_fd: int | None = in_w
        self.stdin_left = bytearray()
        self.close_stdin_when_done = False
        self.status: int | None = None
        self.started = time.monotonic()
        self.end_told = False  # the host has been told that it ended (then it may be forgotten)
        self.tunnel = False  # a TCP connection inside, not a process (tunnel_open)
        self.closed_by_host = False  # a tunnel the host closed (proc_kill): then it is forgotten

    def summary(self) -> dict[str, Any]:
        """What the host is told of it (its end, once, marks it as seen)."""
        self.end_told = self.end_told or self.status is not None
        return {
            "handle": self.handle,
            "pid": self.pid,
            "argv": self.argv,
            "running": self.status is None,
            "exit_code": None if self.status is None else os.waitstatus_to_exitcode(self.status),
        }


class Processes:
    """Agent methods for background processes; mixed into ``server.Agent``."""

    exited: dict[int, int]
    _watched: set[int]
    _spawned: dict[str, Spawned]
    _spawn_count: int

    if TYPE_CHECKING:  # the Agent's, which this mixes into

        def _spawn_exec(self, argv: list[str], params: dict[str, Any]) -> tuple[int, int, int, int | None]: ...
        def _reap(self) -> None: ...

    # ---- methods ---------------------------------------------------------------------------

    def spawn(self, params: dict[str, Any]) -> dict[str, Any]:
        argv = params.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise wire.RPCError(wire.INVALID_PARAMS, "argv must be a non-empty list of strings")
        self._forget_ended()
        if self._unsettled() >= MAX_SPAWNED:
            self._let_go_of_held_pipes()
        if self._unsettled() >= MAX_SPAWNED:
            raise wire.RPCError(
                wire.INVALID_PARAMS, f"at most {MAX_SPAWNED} background processes: wait for or kill one"
            )
        # Its output is read as it comes (proc_read, follow): Python programs flush as they go.
        pid, out_r, err_r, in_w = self._spawn_exec(argv, {**params, "stream": True})
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        if in_w is not None:
            os.set_blocking(in_w, False)
        self._spawn_count += 1
        handle = f"p{self._spawn_count}"  # not the pid: pids are reused
        proc = Spawned(handle, pid, argv, out_r, err_r, in_w if in_w is not None else -1)
        self._spawned[handle] = proc
        stdin = params.get("stdin")
        if isinstance(stdin, str) and stdin:
            try:
                proc.stdin_left += wire.b64decode(stdin)
            except ValueError:
                pass  # checked by the host; a bad one is no input
            _feed(proc)
        return {"handle": handle, "pid": pid}

    def proc_read(self, params: dict[str, Any]) -> dict[str, Any]:
        """What the process wrote since the last read (taken: each byte is read once), and whether it ended."""
        proc = self._process(params)
        self._drain(proc)
        answer = {
            **proc.summary(),
            "stdout": wire.b64encode(bytes(proc.output["stdout"])),
            "stderr": wire.b64encode(bytes(proc.output["stderr"])),
            "dropped": dict(proc.dropped),
        }
        for stream in ("stdout", "stderr"):
            proc.output[stream].clear()
            proc.dropped[stream] = 0
        return answer

    def proc_write(self, params: dict[str, Any]) -> dict[str, Any]:
        proc = self._process(params)
        data = params.get("data", "")
        try:
            raw = wire.b64decode(data) if isinstance(data, str) else None
        except ValueError:
            raw = None
        if raw is None:
            raise wire.RPCError(wire.INVALID_PARAMS, "data must be base64")
        if proc.stdin_fd is None or proc.stdin_fd < 0:
            raise wire.RPCError(wire.INVALID_PARAMS, f"the standard input of {proc.handle} is closed")
        if len(proc.stdin_left) + len(raw) > STDIN_BUFFER:
            raise wire.RPCError(wire.INVALID_PARAMS, f"{proc.handle} has not read its input: {STDIN_BUFFER} bytes wait")
        proc.stdin_left += raw
        if params.get("eof") is True:
            proc.close_stdin_when_done = True
        _feed(proc)
        return {"handle": proc.handle, "queued": len(proc.stdin_left)}

    def proc_wait(self, params: dict[str, Any]) -> dict[str, Any]:
        """Wait (at most ``timeout`` s) for the process to end; its summary either way."""
        proc = self._process(params)
        timeout = params.get("timeout", 0)
        if not isinstance(timeout, (int, float)) or not 0 <= timeout <= MAX_WAIT_S:
            raise wire.RPCError(wire.INVALID_PARAMS, f"timeout must be 0 to {MAX_WAIT_S:g} seconds")
        until = time.monotonic() + timeout
        while True:
            self._reap_spawned()
            if proc.status is not None or time.monotonic() >= until:
                return proc.summary()
            self.wait_a_little(min(0.05, max(0.0, until - time.monotonic())))

    def tunnel_open(self, params: dict[str, Any]) -> dict[str, Any]:
        """Connect to ``port`` on this isolate's loopback; a handle for proc_read/proc_write/proc_kill."""
        port = params.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise wire.RPCError(wire.INVALID_PARAMS, "port must be 1-65535")
        self._forget_ended()
        if sum(p.tunnel for p in self._spawned.values()) >= MAX_TUNNELS:
            raise wire.RPCError(wire.INVALID_PARAMS, f"at most {MAX_TUNNELS} connections to published ports at once")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Short: the agent serves one call at a time, and a port on loopback answers at once
            # or never (a server that does not accept): nobody else may wait long behind it.
            sock.settimeout(0.5)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            read_fd = sock.detach()  # raw descriptors from here: closed by this module, never by a finaliser
            write_fd = os.dup(read_fd)
        except OSError as exc:
            sock.close()
            why = os.strerror(exc.errno) if exc.errno else "it does not accept"
            raise wire.RPCError(wire.INVALID_PARAMS, f"nothing answers on port {port} inside: {why}") from None
        self._spawn_count += 1
        handle = f"p{self._spawn_count}"
        proc = Spawned(handle, 0, ["tcp", f"127.0.0.1:{port}"], read_fd, None, write_fd)  # one stream
        proc.tunnel = True
        self._spawned[handle] = proc
        return {"handle": handle, "pid": 0}

    def proc_kill(self, params: dict[str, Any]) -> dict[str, Any]:
        proc = self._process(params)
        name = params.get("signal", "SIGTERM")
        if name not in _SIGNALS:
            raise wire.RPCError(wire.INVALID_PARAMS, f"signal must be one of {', '.join(_SIGNALS)}")
        if proc.tunnel:
            _close_tunnel(proc)  # a connection has no process to signal: it is closed
        elif proc.status is None:
            for target in (-proc.pid, proc.pid):
                try:
                    os.kill(target, _SIGNALS[name])
                except OSError:
                    pass
        return proc.summary()

    def proc_list(self, params: dict[str, Any]) -> dict[str, Any]:
        self._reap_spawned()
        # Tunnels are a published port's plumbing, not the caller's processes (nor counted as them).
        return {"processes": [p.summary() for p in self._spawned.values() if not p.tunnel]}

    # ---- the loops' share ------------------------------------------------------------------

    def spawned_fds(self) -> tuple[list[int], list[int]]:
        """The descriptors to watch for spawned processes: (to read, to write). A tunnel whose
        reader is behind is not read until it catches up (its stream must stay whole)."""
        reading = [
            fd
            for p in self._spawned.values()
            if not (p.tunnel and len(p.output["stdout"]) >= OUTPUT_BUFFER)
            for fd in p.fds
        ]
        writing = [
            p.stdin_fd for p in self._spawned.values() if p.stdin_left and p.stdin_fd is not None and p.stdin_fd >= 0
        ]
        return reading, writing

    def service_spawned(self, readable: list[int], writable: list[int]) -> None:
        for proc in self._spawned.values():
            for fd in [f for f in proc.fds if f in readable]:
                _read(proc, fd)
            if proc.stdin_fd in writable:
                _feed(proc)

    def wait_a_little(self, seconds: float) -> None:
        import select

        reading, writing = self.spawned_fds()
        ready, writable, _ = select.select(reading, writing, [], seconds)
        self.service_spawned(ready, writable)

    # ---- inside ----------------------------------------------------------------------------

    def _process(self, params: dict[str, Any]) -> Spawned:
        handle = params.get("handle")
        proc = self._spawned.get(handle) if isinstance(handle, str) else None
        if proc is None:
            raise wire.RPCError(wire.INVALID_PARAMS, f"no background process {handle!r}")
        self._reap_spawned()
        return proc

    def _reap_spawned(self) -> None:
        self._reap()  # what SIGCHLD said while this call had the agent (its wake-up pipe waits unread)
        for proc in self._spawned.values():
            if proc.tunnel:
                if proc.status is None and not proc.fds:
                    proc.status = 0  # the port closed its side
            elif proc.status is None and proc.pid in self.exited:
                proc.status = self.exited.pop(proc.pid)
                self._watched.discard(proc.pid)
                self._drain(proc)

    def _drain(self, proc: Spawned) -> None:
        for fd in list(proc.fds):
            while fd in proc.fds and not (proc.tunnel and len(proc.output["stdout"]) >= OUTPUT_BUFFER):
                if not _read(proc, fd):
                    break

    def _unsettled(self) -> int:
        return sum(not p.tunnel and not _settled(p) for p in self._spawned.values())

    def _let_go_of_held_pipes(self) -> None:
        """At the cap: processes that ended (the host was told so, and has read what they wrote) but
        whose pipes something they started holds open (``setsid daemon &``) let go of those pipes,
        oldest first, rather than keep their slots for good; what that descendant writes there from
        now on is dropped."""
        for proc in list(self._spawned.values()):
            if self._unsettled() < MAX_SPAWNED:
                return
            read = not any(proc.output.values())
            if not proc.tunnel and proc.status is not None and proc.end_told and proc.fds and read:
                for fd in proc.fds:
                    os.close(fd)
                proc.fds.clear()
                self._forget_ended()

    def _forget_ended(self) -> None:
        """Settle ended processes whose output was all read: their stdin closed, their exit status
        kept (poll, read, kill and the list still answer, as Popen's returncode does) for the
        newest MAX_ENDED; older ones go, handles with them."""
        self._reap_spawned()
        settled = []
        for handle, proc in list(self._spawned.items()):
            if proc.tunnel:
                if proc.closed_by_host:
                    del self._spawned[handle]  # a tunnel is the host's until it closes it
                continue
            if _settled(proc):
                if proc.stdin_fd is not None and proc.stdin_fd >= 0:
                    os.close(proc.stdin_fd)
                proc.stdin_fd = None
                settled.append(handle)
        for handle in settled[: max(0, len(settled) - MAX_ENDED)]:  # oldest first: spawn order
            del self._spawned[handle]


def _settled(proc: Spawned) -> bool:
    """Ended, the host told so, its pipes closed and all its output read: it holds nothing more."""
    return proc.status is not None and proc.end_told and not proc.fds and not any(proc.output.values())


def _read(proc: Spawned, fd: int) -> bool:
    """Read what the pipe holds now; False when it is empty or closed (then closed here)."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return False
    except OSError:
        chunk = b""
    if not chunk:
        os.close(fd)
        del proc.fds[fd]
        return False
    stream = proc.fds[fd]
    buffer = proc.output[stream]
    buffer += chunk
    if len(buffer) > OUTPUT_BUFFER and not proc.tunnel:
        extra = len(buffer) - OUTPUT_BUFFER
        del buffer[:extra]  # the oldest goes: a process nobody reads must not grow the agent
        proc.dropped[stream] += extra
    return True


def _feed(proc: Spawned) -> None:
    fd = proc.stdin_fd
    if fd is None or fd < 0:
        return
    try:
        while proc.stdin_left:
            del proc.stdin_left[: os.write(fd, proc.stdin_left)]
    except BlockingIOError:
        return
    except OSError:
        proc.stdin_left.clear()  # it closed its input
    if not proc.stdin_left and proc.close_stdin_when_done:
        if proc.tunnel:
            _shutdown_write(fd)  # the other descriptor still reads: the port must see the end
        os.close(fd)
        proc.stdin_fd = None


def _shutdown_write(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


def _close_tunnel(proc: Spawned) -> None:
    proc.closed_by_host = True
    for stream in ("stdout", "stderr"):
        proc.output[stream].clear()  # nobody reads a closed tunnel
    for fd in list(proc.fds):
        os.close(fd)
    proc.fds.clear()
    if proc.stdin_fd is not None and proc.stdin_fd >= 0:
        os.close(proc.stdin_fd)
    proc.stdin_fd = None
    proc.stdin_left.clear()
    if proc.status is None:
        proc.status = 0
