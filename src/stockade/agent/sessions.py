"""The agent's side of stateful interpreters: ``run_cell`` and ``close_interpreter`` (kernel.py).

A session is a name the host gives; its interpreter starts with the first
cell and keeps its namespace until it is closed, restarted, or dies (a
memory or output limit ends it, as it would end any run: its state is then
lost, and the next cell starts a fresh one, ``new_session: true``).

A cell's timeout interrupts it (SIGINT: a KeyboardInterrupt in the cell, the
namespace kept); an interpreter that does not stop within INTERRUPT_GRACE_S
is killed. The host can interrupt a cell early with an ``interrupt``
notification (server.py ``frame_during_run``).
"""

from __future__ import annotations

import os
import select
import time

from . import display, jsoncodec, kernel, runner, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from typing import Any
else:
    import _signal as signal

# How long an interrupted cell has to stop before its interpreter is killed.
INTERRUPT_GRACE_S = 2.0
# While an interrupted cell still runs, the SIGINT is sent again this often until the kill: one that
# lands just before a sleep (or another blocking call) begins is heeded only when that call returns,
# as CPython checks for signals when a call is interrupted, not before it starts (and two sent
# before it looks are one to its handler).
INTERRUPT_AGAIN_S = 0.5
# How long a closed interpreter has to run its atexit handlers before it is killed.
CLOSE_GRACE_S = 1.0
MAX_SESSIONS = 16
MAX_SESSION_NAME = 64


class Interpreters:
    """Agent methods for interpreters; mixed into ``server.Agent``, whose loop state they share."""

    conn: socket.socket
    exited: dict[int, int]
    _watched: set[int]
    _wake_r: int
    _kernels: dict[str, kernel.Kernel]  # session name -> its interpreter

    if TYPE_CHECKING:  # the Agent's, which this mixes into

        def _job_context(self, params: dict[str, Any]) -> dict[str, Any]: ...
        def _forget_host(self) -> None: ...
        def frame_during_run(self, pid: int, group: bool) -> bool: ...
        def _drain_wakeups(self) -> None: ...
        def _reap(self) -> None: ...
        def _read_output(self, run: runner.Run, fd: int) -> None: ...
        def spawned_fds(self) -> tuple[list[int], list[int]]: ...
        def service_spawned(self, readable: list[int], writable: list[int]) -> None: ...

    def run_cell(self, params: dict[str, Any]) -> dict[str, Any]:
        session = _session_param(params)
        code = params.get("code")
        if not isinstance(code, str):
            raise wire.RPCError(wire.INVALID_PARAMS, "code must be a string")
        timeout = params.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise wire.RPCError(wire.INVALID_PARAMS, "timeout must be a positive number")
        max_output = params.get("max_output_bytes", 1 << 20)
        if not isinstance(max_output, int) or max_output < 0:
            raise wire.RPCError(wire.INVALID_PARAMS, "max_output_bytes must be a non-negative integer")
        started = time.monotonic()
        interpreter, new = self._interpreter(session, params)
        stream = params.get("stream") is True
        run = runner.Run(interpreter.pid, interpreter.out_r, interpreter.err_r, max_output, stream, True)
        cell_frame = kernel.cell_frame(interpreter, code)
        reply, timed_out = self._collect_cell(run, interpreter, cell_frame, started + timeout if timeout else None)
        cell = _answer_to(reply, interpreter.nonce)
        refused = run.status is None and cell is None
        if run.status is not None or cell is None:
            if refused:  # no answer to this cell from the interpreter: it ends
                runner.kill_group(interpreter.pid)
                run.status = self._wait_for(interpreter.pid)
            cell = None
            self._forget(session, still_open=set(run.fds))
            exit_code = os.waitstatus_to_exitcode(run.status or 0)
        else:
            interpreter.outputs_left(set(run.fds))
            exit_code = _cell_exit_code(cell.get("exception"))
        stdout = wire.b64encode(b"".join(run.buffers["stdout"]))
        stderr = wire.b64encode(b"".join(run.buffers["stderr"]))
        return {
            "exit_code": exit_code,
            "stdout": stdout,
            "stderr": stderr,
            "timed_out": timed_out,
            "output_truncated": run.output_truncated,
            "scratch_full": runner.scratch_full(),
            "duration": time.monotonic() - started,
            "cell": _within_frame(cell, wire.MAX_FRAME - len(stdout) - len(stderr) - _ANSWER_ROOM),
            "answer_refused": refused,  # the agent killed it, for an answer not the interpreter's
            "new_session": new,
        }

    def close_interpreter(self, params: dict[str, Any]) -> dict[str, Any]:
        """End a session's interpreter as a program ends (atexit runs); the next cell starts a fresh one."""
        session = _session_param(params)
        interpreter = self._kernels.pop(session, None)
        if interpreter is None:
            return {"closed": False}
        os.close(interpreter.cmd_w)  # EOF: the interpreter ends itself
        if self._wait_for(interpreter.pid, CLOSE_GRACE_S) is None:
            runner.kill_group(interpreter.pid)
            self._wait_for(interpreter.pid)
        for fd in (*interpreter.output_fds(), interpreter.reply_r):
            os.close(fd)
        return {"closed": True}

    # ---- the interpreter of a session ----------------------------------------------------

    def _interpreter(self, session: str, params: dict[str, Any]) -> tuple[kernel.Kernel, bool]:
        interpreter = self._kernels.get(session)
        if interpreter is not None:
            return interpreter, False
        if len(self._kernels) >= MAX_SESSIONS:
            raise wire.RPCError(wire.INVALID_PARAMS, f"at most {MAX_SESSIONS} interpreters per sandbox: close one")
        context = self._job_context(params)
        # No CPU-time rlimit: it would count every cell of the session against the first
        # cell's limit. A cell is bounded by its timeout (an interrupt), the cgroup's cpu_limit.
        limits = {k: v for k, v in context["limits"].items() if k not in ("cpu_seconds", "cpu_soft_seconds")}
        try:
            interpreter = kernel.start(context["env"], context["cwd"], limits, self._forget_host)
        except OSError as exc:
            why = os.strerror(exc.errno or 0)
            raise wire.RPCError(wire.INTERNAL_ERROR, f"cannot start an interpreter: {why}") from None
        self._watched.add(interpreter.pid)
        self._kernels[session] = interpreter
        return interpreter, True

    def _collect_cell(
        self, run: runner.Run, interpreter: kernel.Kernel, cell_frame: bytes, deadline: float | None
    ) -> tuple[bytes | None, bool]:
        """Hand the interpreter its cell, read the cell's output and reply; (the reply, whether the cell
        was interrupted at its timeout). Nothing here waits on the interpreter but the loop's select:
        the cell can stop its interpreter, close its reply pipe, or both, and is timed out all the same."""
        sending = memoryview(cell_frame)
        reply_open = True
        reply = bytearray()
        expected: int | None = None
        timed_out = False
        kill_at: float | None = None
        again_at: float | None = None
        watch_conn = True
        while True:
            if run.status is None and interpreter.pid in self.exited:
                run.status = self.exited.pop(interpreter.pid)
                self._watched.discard(interpreter.pid)
            if run.status is not None or (expected is not None and len(reply) >= expected):
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out, deadline = True, None
                kill_at, again_at = now + INTERRUPT_GRACE_S, now + INTERRUPT_AGAIN_S
                interpreter.interrupted = True
                _signal(interpreter.pid, signal.SIGINT)
            if again_at is not None and now >= again_at:
                again_at = now + INTERRUPT_AGAIN_S
                _signal(interpreter.pid, signal.SIGINT)
            if kill_at is not None and now >= kill_at:
                runner.kill_group(interpreter.pid)  # it did not stop at the interrupt: its state goes
                kill_at = again_at = None
            waits = [t for t in (deadline, again_at, kill_at) if t is not None]
            if not (run.fds or reply_open):  # its end is looked for, not only waited for (runner.REAP_POLL_S)
                self._reap()
                if interpreter.pid in self.exited:
                    continue
                waits.append(now + runner.REAP_POLL_S)
            wait = max(0.0, min(waits) - now) if waits else None
            watched = [self.conn.fileno()] if watch_conn else []
            replies = [interpreter.reply_r] if reply_open else []
            cells = [interpreter.cmd_w] if sending else []
            reading, writing = self.spawned_fds()
            ready, writable, _ = select.select(
                [*watched, self._wake_r, *replies, *run.fds, *reading], [*cells, *writing], [], wait
            )
            self.service_spawned(ready, writable)
            if interpreter.cmd_w in writable:
                try:
                    sending = sending[os.write(interpreter.cmd_w, sending) :]
                except BlockingIOError:
                    pass
                except OSError:
                    sending = sending[:0]  # it is gone: its end is collected here, as any run's
            if self.conn.fileno() in ready:
                watch_conn = self.frame_during_run(interpreter.pid, group=False)
                if watch_conn:  # watched on: it was an interrupt, which the cell has as long to heed as a timeout's
                    interpreter.interrupted = True
                    if kill_at is None:
                        kill_at = time.monotonic() + INTERRUPT_GRACE_S
                        again_at = time.monotonic() + INTERRUPT_AGAIN_S
            if self._wake_r in ready:
                self._drain_wakeups()
                self._reap()
            if interpreter.reply_r in ready:
                try:
                    chunk = os.read(interpreter.reply_r, 1 << 20)
                except BlockingIOError:
                    chunk = None
                if chunk == b"":
                    reply_open = False  # it is ending (or the cell closed the pipe): its end comes by SIGCHLD
                elif chunk:
                    reply += chunk
                    if expected is None and len(reply) >= wire.HEADER_SIZE:
                        expected = _reply_size(bytes(reply[: wire.HEADER_SIZE]))
                    if expected is None or expected > display.REPLY_MAX + wire.HEADER_SIZE:
                        runner.kill_group(interpreter.pid)  # not an answer the interpreter sends
            for fd in [f for f in ready if f in run.fds]:
                self._read_output(run, fd)
        for fd in list(run.fds):  # what the cell wrote before its reply
            while fd in run.fds and _readable(fd):
                self._read_output(run, fd)
        if expected is None or len(reply) < expected:
            return None, timed_out
        return bytes(reply[wire.HEADER_SIZE : expected]), timed_out

    def _wait_for(self, pid: int, within: float | None = None) -> int | None:
        """The wait status of a child of ours (reaped here or already), waiting up to ``within`` (None: no limit)."""
        until = None if within is None else time.monotonic() + within
        while True:
            if pid in self.exited:
                self._watched.discard(pid)
                return self.exited.pop(pid)
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 0
            if done:
                self._watched.discard(pid)
                return status
            if until is not None and time.monotonic() >= until:
                return None
            time.sleep(0.005)

    def _forget(self, session: str, still_open: set[int]) -> None:
        """A dead interpreter's descriptors: those of its output that reached EOF were closed already."""
        interpreter = self._kernels.pop(session, None)
        if interpreter is not None:
            for fd in (interpreter.cmd_w, interpreter.reply_r, *still_open):
                os.close(fd)


def _session_param(params: dict[str, Any]) -> str:
    session = params.get("session")
    if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_NAME or not session.isprintable():
        raise wire.RPCError(
            wire.INVALID_PARAMS, f"session must be a name of 1 to {MAX_SESSION_NAME} printable characters"
        )
    return session


def _answer_to(reply: bytes | None, nonce: str) -> dict[str, Any] | None:
    """The interpreter's answer to the cell it was sent ``nonce`` with, or None. The cell can write
    to the reply pipe too: an answer it wrote for an earlier cell's nonce, or none, would put every
    later cell's answer one behind (a cell's loop past its timeout read as the next one's); one
    nested past the decoder's depth raised; one of more values than a display result may hold
    would cost the host its decoding many times over."""
    if reply is None:
        return None
    try:
        cell = jsoncodec.loads(reply)
    except (ValueError, RecursionError):
        return None
    if not isinstance(cell, dict) or cell.pop("nonce", None) != nonce or not display.reply_within(cell):
        return None
    return cell


# Bytes of a run_cell answer besides its output and its cell (the JSON-RPC envelope, the other fields).
_ANSWER_ROOM = 4096
# Bytes of JSON a cell's exception keeps when its answer is cut to fit; past them its text is cut.
_EXCEPTION_ROOM = 64 << 10


def _within_frame(cell: dict[str, Any] | None, room: int) -> dict[str, Any] | None:
    """``cell`` with as many of its results as fit ``room`` bytes: with a cell's output (up to the
    policy's 7 MiB, 4/3 of it as base64) its 6 MiB of results could pass an answer's frame, and
    the whole cell's answer was then an error."""
    if cell is None or len(jsoncodec.dumps(cell)) <= room:
        return cell
    outputs = cell.get("outputs")
    exception = cell.get("exception")
    if isinstance(exception, dict) and len(jsoncodec.dumps(exception)) > _EXCEPTION_ROOM:
        # Its text (64 Ki characters each, up to 12 bytes a character as JSON writes them): its start
        # and its traceback's end, where the cell's own frame and the exception are.
        cut = {"name": slice(0, 1024), "value": slice(0, 1024), "traceback": slice(-4096, None)}
        exception = {k: v[cut[k]] if k in cut and isinstance(v, str) else v for k, v in exception.items()}
    why = f"with the cell's output, an answer is limited to {wire.MAX_FRAME} bytes"
    return display.within({**cell, "exception": exception}, outputs if isinstance(outputs, list) else [], room, 0, why)


def _reply_size(header: bytes) -> int | None:
    try:
        return wire.HEADER_SIZE + wire.frame_length(header)
    except wire.FrameError:
        return None


def _readable(fd: int) -> bool:
    ready, _, _ = select.select([fd], [], [], 0)
    return bool(ready)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # it has just ended


def _cell_exit_code(exception: object) -> int:
    """A cell's exit code: 0, 1 for an exception, a ``SystemExit``'s own as a script's would be
    (the kernel's ``exit_code``, taken out of what the host is sent)."""
    if not isinstance(exception, dict):
        return 0
    code = exception.pop("exit_code", 1)
    # An exit status, 0-255, as the kernel makes it: the reply is the cells' to write, and a negative
    # code is a signal's death, which the host would take for a limit's kill (cpu_limit, SIGXFSZ).
    return code if isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255 else 1
