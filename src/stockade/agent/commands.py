"""Starting a run's processes: an ``exec`` by posix_spawn or a runner, ``run_code`` in a forked
interpreter, and the runner forked ahead of the next request (``Agent``'s mixin)."""

from __future__ import annotations

import errno
import os
import resource
import select
import time

from . import jsoncodec, wire
from . import runner as runners

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from typing import Any
else:  # the C modules behind signal and socket: their Python wrappers import enum
    import _signal as signal
    import _socket as socket

# After an answer, how long a held sandbox's agent leaves the host to read it
# before it forks the next runner (see Commands._spare_when_idle).
SPARE_DELAY_S = 0.005
# How long the agent waits on a runner it forked, for its "ready", for it to take its job and for
# its exec together (a run's own timeout, if sooner): the code can stop a runner (SIGSTOP, same
# uid) at any of them. Past it the runner is killed and the call answered with an error, well
# before the host's limit on a call's answer (30 s) would end the isolate.
RUNNER_WAIT_S = 10.0
RUNNER_WAIT_MIN_S = 1.0  # within the host's grace past a run's timeout (HOST_TIMEOUT_GRACE_S, 2 s)


class Commands:
    """How the agent starts what a run runs; mixed into ``server.Agent``, whose state it shares."""

    conn: socket.socket
    base_env: dict[str, str]
    exited: dict[int, int]
    _watched: set[int]
    _spare: runners.Runner | None
    _spare_ready: bool  # its "ready" read (a request came first: read when it is dispatched)
    _eager_spare: bool
    _pending: list[bytes]  # requests read while a run was in progress (server.py)

    def _spawn_exec(self, argv: list[str], params: dict[str, Any]) -> tuple[int, int, int, int | None]:
        context = self._job_context(params)
        if _spawnable(context["limits"]):
            return self._posix_spawn(argv, context)
        until = _runner_until(params)
        runner = self._dispatch({"kind": "exec", "argv": argv, **context}, until)
        failure = runners.read_report(runner.report_r, until - time.monotonic())
        if failure is None:
            self._discard(runner)
            raise wire.RPCError(wire.INTERNAL_ERROR, _held_up("did not start the command"))
        os.close(runner.report_r)
        if failure:
            self._watched.discard(runner.pid)
            self.exited.pop(runner.pid, None)
            for fd in (runner.out_r, runner.err_r, runner.in_w):
                os.close(fd)
            report = jsoncodec.loads(failure)
            raise _spawn_failure(argv[0], context["cwd"], str(report.get("what")), int(report["errno"]))
        return runner.pid, runner.out_r, runner.err_r, runner.in_w

    def _posix_spawn(self, argv: list[str], context: dict[str, Any]) -> tuple[int, int, int, int | None]:
        """exec through posix_spawn: a vfork, no copy of this interpreter, no runner.

        posix_spawn cannot set the child's rlimits, so the agent takes the
        policy's limits itself, as hard limits: every exec of a sandbox runs
        under the same policy, and the agent is as untrusted as its children.

        The one wait of the agent's without an end of its own: the vfork returns once the child
        has exec'd, and the code, same uid, can stop the child first (it must win a race of
        microseconds). posix_spawn holds the GIL: no thread of the agent's could end the wait.
        The host's bound on the call ends the sandbox then (docs/protocol.md).
        """
        _limit_self(context["limits"])
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        home = os.getcwd()
        step = "cwd"
        try:
            os.chdir(context["cwd"])
            step = "exec"
            pid = os.posix_spawn(
                _on_path(argv[0], context["env"]),
                argv,
                context["env"],
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, in_r, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setpgroup=0,
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD),
            )
        except OSError as exc:
            for fd in (out_r, err_r, in_w):
                os.close(fd)
            raise _spawn_failure(argv[0], context["cwd"], step, exc.errno or 0) from None
        finally:
            for fd in (out_w, err_w, in_r):
                os.close(fd)
            os.chdir(home)
        self._watched.add(pid)
        return pid, out_r, err_r, in_w

    def _spawn_python(self, code: str, params: dict[str, Any]) -> tuple[int, int, int, int | None]:
        """Run ``code`` in a forked copy of this already-started interpreter (no exec, no start-up)."""
        runner = self._dispatch({"kind": "python", "code": code, **self._job_context(params)}, _runner_until(params))
        os.close(runner.report_r)
        return runner.pid, runner.out_r, runner.err_r, runner.in_w

    def _job_context(self, params: dict[str, Any]) -> dict[str, Any]:
        env = self._env(params)
        stream = params.get("stream") is True or params.get("collect") is False
        if stream:
            # Output that is watched as it comes should come as it is written: Python
            # programs started by the command flush as they go, unless told otherwise.
            env.setdefault("PYTHONUNBUFFERED", "1")
        return {
            "env": env,
            "cwd": params.get("cwd") or self.base_env.get("HOME", "/"),
            "limits": params.get("limits", {}),
            "stream": stream,
        }

    def _dispatch(self, job: dict[str, Any], until: float) -> runners.Runner:
        """Hand ``job`` to the runner forked ahead of time (or to a new one).

        Both ``exec`` and ``run_code`` go through a runner: a forked copy of the
        agent with its stdio already on pipes and its pages already copied, so
        a request costs a pipe write instead of a fork. The runner drops every
        descriptor but 0-2 before running anything, so the code cannot reach
        the host connection.
        """
        payload = jsoncodec.dumps(job).encode()
        runner, self._spare = self._spare, None
        if runner is not None:
            self._watched.add(runner.pid)
            # Half the time for it: a stopped spare leaves the other half to one forked now.
            half = time.monotonic() + (until - time.monotonic()) / 2
            if not (
                (self._spare_ready or runners.ready(runner, half - time.monotonic()))
                and runners.send_job(runner, payload, half - time.monotonic())
            ):
                self._discard(runner)
                runner = None
        if runner is None:
            runner = runners.fork(False, self._forget_host)
            self._watched.add(runner.pid)
            if not runners.ready(runner, until - time.monotonic()) or not runners.send_job(
                runner, payload, until - time.monotonic()
            ):
                self._discard(runner)
                raise wire.RPCError(wire.INTERNAL_ERROR, _held_up("died, or did not take its job"))
        return runner

    def prepare_spare(self, warm: bool = True) -> None:
        """Fork the next runner now, while nobody waits for it.

        ``warm=False`` skips the warm-ups: right for an isolate built on demand,
        whose first request is already on its way. A request that comes before
        the runner is ready is not kept waiting: the runner's "ready" is then
        read when the request needs it.
        """
        if self._spare is None:
            try:
                self._spare = runners.fork(warm, self._forget_host)
                self._spare_ready = False
            except OSError:
                self._spare = None  # e.g. pids limit reached: fork on demand instead
        if warm and not self._request_pending():
            runners.warm_up()  # the fork made our own pages copy-on-write again
        if self._spare is None or self._spare_ready or self._pending:
            return
        readable, _, _ = select.select([self._spare.report_r, self.conn.fileno()], [], [], RUNNER_WAIT_S)
        if self._spare.report_r in readable:
            self._spare_ready = runners.ready(self._spare, 0)
        if not (self._spare_ready or self.conn.fileno() in readable):
            self._discard(self._spare)  # dead, or stopped by the code: the next request forks its own
            self._spare = None

    def _forget_host(self) -> None:
        """In a new runner: the connection's socket object gives up its descriptor (closed there anyway)."""
        sock = getattr(self.conn, "sock", self.conn)
        if isinstance(sock, socket.socket):
            sock.detach()

    def _discard(self, runner: runners.Runner) -> None:
        self._watched.discard(runner.pid)
        self.exited.pop(runner.pid, None)
        runners.kill_group(runner.pid)
        for fd in (runner.out_r, runner.err_r, runner.in_w, runner.report_r, runner.job_w):
            if fd < 0:
                continue  # given up already (send_job)
            try:
                os.close(fd)
            except OSError:
                pass

    def _spare_when_idle(self) -> None:
        """Fork the next runner, unless a request comes first.

        Right after an answer the host is reading it (and its client waking to
        read the host's): a fork then, and the runner's warm-up, take the CPUs
        they need, which on a small host made a held sandbox's answer arrive
        0.5-0.9 ms later. So the spare waits SPARE_DELAY_S for the host to be
        done, unless the host has been coming straight back with its next
        request, when a runner ready at once is worth more than a quiet moment.
        """
        if self._request_pending(0 if self._eager_spare else SPARE_DELAY_S):
            self._eager_spare = True  # it came back at once: served with a runner forked on demand
            return
        self.prepare_spare()
        self._eager_spare = self._request_pending()  # it came back while the runner was forked

    def _request_pending(self, wait_s: float = 0) -> bool:
        if self._pending:  # read while a run was in progress: waiting already
            return True
        ready, _, _ = select.select([self.conn.fileno()], [], [], wait_s)
        return bool(ready)

    def _env(self, params: dict[str, Any]) -> dict[str, str]:
        env = dict(self.base_env)
        extra = params.get("env") or {}
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise wire.RPCError(wire.INVALID_PARAMS, "env must map strings to strings")
        env.update(extra)
        return env


# The agent needs a few descriptors of its own (connection, wake-up pipe, a
# runner, three pipes per command): below this, commands go through a runner,
# which can give the command alone the policy's lower limit.
AGENT_FDS = 64


def _spawnable(limits: dict[str, Any]) -> bool:
    """Whether posix_spawn can run a command under ``limits``: the agent takes them on itself
    (``_limit_self``), which it cannot do for CPU time or address space (they would end the agent)."""
    if any(key in limits for key in ("cpu_soft_seconds", "address_space_bytes")):
        return False
    files = limits.get("max_open_files")
    return not isinstance(files, int) or files >= AGENT_FDS


def _limit_self(limits: dict[str, Any]) -> None:
    """Lower this process's hard limits to the policy's (never raise them; raising is impossible)."""
    for key in ("max_file_size_bytes", "max_open_files", "max_processes"):
        value = limits.get(key)
        which = runners.RLIMITS[key]
        if isinstance(value, int) and value >= 0:
            soft, hard = resource.getrlimit(which)
            if hard == resource.RLIM_INFINITY or value < hard or soft != hard:
                value = value if hard == resource.RLIM_INFINITY else min(value, hard)
                resource.setrlimit(which, (value, value))


def _on_path(program: str, env: dict[str, str]) -> str:
    """``program`` found as exec would find it with ``env``'s PATH (posix_spawnp would search the
    agent's own, which lacks an environment's ``bin``); OSError ENOENT when it is nowhere."""
    if "/" in program:
        return program
    for directory in env.get("PATH", os.defpath).split(":"):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def _spawn_failure(program: str, cwd: str, step: str, err: int) -> wire.RPCError:
    """The error for a command that could not start: its working directory, or the program itself."""
    data = {"errno": err, "what": step}
    if step == "exec":
        return wire.RPCError(wire.INVALID_PARAMS, f"cannot execute {program!r}: {os.strerror(err)}", data)
    if step == "limits":
        return wire.RPCError(wire.INTERNAL_ERROR, f"cannot apply the policy's limits: {os.strerror(err)}", data)
    return wire.RPCError(wire.INVALID_PARAMS, f"cannot use {cwd!r} as the working directory: {os.strerror(err)}", data)


def _runner_until(params: dict[str, Any]) -> float:
    """When the runner of a call must have started its job: RUNNER_WAIT_S, or the run's timeout if
    sooner, but never under RUNNER_WAIT_MIN_S (a shorter timeout is the run's: it times out as a run)."""
    timeout = params.get("timeout")
    if isinstance(timeout, (int, float)) and 0 < timeout < RUNNER_WAIT_S:
        return time.monotonic() + max(timeout, RUNNER_WAIT_MIN_S)
    return time.monotonic() + RUNNER_WAIT_S


def _held_up(what: str) -> str:
    return (
        f"the runner forked for this call {what} in time (the run's timeout, at most {RUNNER_WAIT_S:g} s): "
        "something in the sandbox may have stopped or killed it (it runs as the code does), or the "
        "sandbox's limits left it no room"
    )
