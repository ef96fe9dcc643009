"""Runners: forked copies of the agent that each run one command or one Python program.

Stdlib-only, like the rest of the agent. A runner is forked ahead of the
request that uses it (its stdio already on pipes, its pages already copied),
waits for its job on a pipe, then either execs a command or becomes the
user's Python program.

Becoming the program is done so that the program cannot tell it was not
started as ``python3 - < program``:

- the runner unwinds the agent's whole stack (``Become``, a BaseException no
  agent code catches) back to the isolate's ``-c`` bootstrap (``bootstrap``),
  which runs the program at its top level: ``traceback.print_stack()``,
  ``inspect.stack()`` and warnings see the program's frames, not the agent's;
- the program's file is ``<stdin>``, its ``__main__`` a fresh module, its
  ``sys.argv`` ``["-"]``, and nothing of the agent is left in ``sys.modules``,
  ``sys.path`` or ``sys.orig_argv``;
- it ends as the interpreter ends a program (``Program.end``): the traceback of
  an uncaught exception (the program's frames only), non-daemon threads joined,
  ``atexit`` handlers run, the program's objects finalised (files it left
  open are flushed and closed), standard streams flushed, then exit. The
  interpreter's own teardown of every module is skipped (``os._exit``): it
  would touch, and so copy, every page the runner shares with the agent.
"""

from __future__ import annotations

# Imported in the agent, once: a runner's first import of it, after the fork, took a run ~0.15 ms
# of copied pages (the import machinery's, written to for the first time in that process).
import atexit
import builtins
import errno
import gc
import io
import os
import resource
import select
import sys
import time
import types

from . import jsoncodec, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any
else:  # the C module behind signal: its Python wrapper imports enum (slow under gVisor)
    import _signal as signal

# What a program is called in its tracebacks, as ``python3 -`` calls a program read from stdin.
PROGRAM_FILE = "<stdin>"

RLIMITS = {
    "max_file_size_bytes": resource.RLIMIT_FSIZE,
    "max_open_files": resource.RLIMIT_NOFILE,
    "max_processes": resource.RLIMIT_NPROC,
    "cpu_seconds": resource.RLIMIT_CPU,
    "address_space_bytes": resource.RLIMIT_AS,
}


# A run (a command, a cell's interpreter) whose pipes have all ended is looked for with waitpid
# this often too, not only when SIGCHLD comes through the wake-up pipe: under gVisor the code can
# open the agent's descriptors through /proc/1/fd and drain that pipe (docs/runtime-gvisor.md).
REAP_POLL_S = 0.25

# Signals the code could end or stop its agent with (``kill -INT 1``, ``pkill python3``): a pid 1
# ignores those it has no handler for, but gVisor's kernel does not, and Python has one for SIGINT.
# The agent heeds none of them (server.py); a child gets them back at their defaults here (an exec
# resets a handler by itself). Every signal whose default ends or stops a process, save SIGKILL and
# SIGSTOP (no process can catch them) and the faults (a real one would repeat under a handler).
UNHEEDED_BY_THE_AGENT = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGXCPU,
    signal.SIGABRT,
    signal.SIGTRAP,
    getattr(signal, "SIGSTKFLT", 16),  # Python 3.11 names it; a guest's python3 may be older
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)


def bootstrap(setup: str, entry: str) -> str:
    """The ``-c`` program of an isolate's agent.

    ``setup`` puts the agent's package on the path and imports ``entry``'s
    module; ``entry`` (e.g. ``server.main()``) serves until the isolate ends,
    and returns only in a runner that became a Python program, which this
    bootstrap then runs at the top of the stack.
    """
    return (
        f"{setup}\n"
        f"program = {entry}\n"
        "try:\n"
        "    exec(program.code, program.namespace)\n"
        "except BaseException as exc:\n"
        "    program.end(exc)\n"
        "program.end(None)\n"
    )


# The isolate's scratch space, which the policy's disk_mb sizes (a tmpfs in each runtime).
SCRATCH = ("/work", "/tmp")


def scratch_full() -> bool:
    """Whether a scratch directory has no room left as a run ends: it reached disk_mb (the host
    says so in the result, where a command's own "No space left on device" may go unread)."""
    for path in SCRATCH:
        try:
            if os.statvfs(path).f_bavail == 0:
                return True
        except OSError:
            continue
    return False


class Runner:
    """A forked agent waiting for one job on ``job_w``, its stdio already on pipes.

    ``report_r`` carries one byte ``w`` once the runner is ready, then reaches
    EOF when the job starts; on a failed exec or chdir it carries
    ``{"errno", "what"}`` first.
    """

    def __init__(self, pid: int, out_r: int, err_r: int, in_w: int, job_w: int, report_r: int) -> None:
        self.pid, self.out_r, self.err_r, self.in_w = pid, out_r, err_r, in_w
        self.job_w, self.report_r = job_w, report_r


class Run:
    """Book-keeping of one running command: its pid, pipes and collected output."""

    def __init__(self, pid: int, out_fd: int, err_fd: int, max_output: int, stream: bool, collect: bool) -> None:
        self.pid = pid
        self.collect = collect  # False: stream only (long-lived components), no buffer, no output cap
        self.fds = {fd: name for fd, name in ((out_fd, "stdout"), (err_fd, "stderr")) if fd >= 0}  # -1: closed
        self.buffers: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.total = 0
        self.max_output = max_output
        self.stream = stream
        self.status: int | None = None
        self.output_truncated = False
        self.timed_out = False
        self.stdin_fd: int | None = None  # the command's stdin, while input is left to give it
        self.stdin_left = memoryview(b"")

    def feed_stdin(self) -> None:
        """Write what the pipe takes now; close it once all is written or nobody reads."""
        if self.stdin_fd is None:
            return
        try:
            while self.stdin_left:
                self.stdin_left = self.stdin_left[os.write(self.stdin_fd, self.stdin_left) :]
        except BlockingIOError:
            return  # the pipe is full: select says when it has room again
        except OSError:
            pass  # EPIPE: the command closed its input; the rest is not wanted
        self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None


class Become(BaseException):
    """Raised in a runner whose job is a Python program; caught only by the agent's entry points."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program


class Program:
    """The user's Python program, as the bootstrap runs it: ``exec(code, namespace)``, then ``end``."""

    def __init__(self, code: types.CodeType, namespace: dict[str, Any]) -> None:
        self.code = code
        self.namespace = namespace
        self.streams = (sys.stdout, sys.stderr)  # ours, flushed at the end even if the program replaced them

    def end(self, exc: BaseException | None) -> None:
        """End as the interpreter ends a program; never returns."""
        status = 0
        try:
            if exc is not None:
                status = _report(exc)
            threading = sys.modules.get("threading")
            if threading is not None:
                # What the interpreter does first at exit: threading's own exit hooks (which
                # stop concurrent.futures' workers), then a join of every non-daemon thread.
                threading._shutdown()  # type: ignore[attr-defined]
            atexit._run_exitfuncs()  # the interpreter's own call; exceptions are printed, not raised
            self._flush()
            _clear_module(self.namespace)
            gc.collect()  # what the program left in reference cycles: open files among them
            self._flush()
            if isinstance(exc, KeyboardInterrupt):
                # As the interpreter does: die of SIGINT, so that the caller sees the interrupt.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001, S110 - nothing may keep the runner from exiting
            pass
        finally:
            os._exit(status)

    def _flush(self) -> None:
        for stream in (sys.stdout, sys.stderr, *self.streams):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:  # noqa: BLE001, S112 - a closed or broken stream: nothing more to write
                continue


def _report(exc: BaseException) -> int:
    """The exit status for an exception that ended the program, reported as the interpreter does."""
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None  # the bootstrap's frame: not the program's
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)
    return 1


def _clear_module(namespace: dict[str, Any]) -> None:
    """Drop a module's globals as the interpreter's finalisation does: ``_private`` names first."""
    sys.modules.pop("__main__", None)
    names = [name for name in namespace if name != "__builtins__"]
    for name in [n for n in names if n.startswith("_") and not n.startswith("__")] + names:
        namespace[name] = None


def ready(runner: Runner, within: float) -> bool:
    """Wait (at most ``within`` s) for the runner's one-byte "ready" (sent once its warm-up is done)."""
    try:
        return _waited(runner.report_r, False, time.monotonic() + within) and os.read(runner.report_r, 1) == b"w"
    except OSError:
        return False


def fork(warm: bool, forget: Callable[[], None]) -> Runner:
    """Fork a runner. ``forget`` runs first in the child: the agent's objects that own descriptors
    give them up, so that none of their finalisers can close a descriptor the program reuses."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    job_r, job_w = os.pipe2(os.O_CLOEXEC)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:  # the pids limit: the caller tries again later, and these must not pile up
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w, job_r, job_w, report_r, report_w):
            os.close(fd)
        raise
    if pid == 0:
        _main(in_r, out_w, err_w, job_r, report_w, warm, forget)
    for fd in (out_w, err_w, in_r, job_r, report_w):
        os.close(fd)
    return Runner(pid, out_r, err_r, in_w, job_w, report_r)


def _main(in_r: int, out_w: int, err_w: int, job_r: int, report_w: int, warm: bool, forget: Callable[[], None]) -> None:
    """The runner's life: exec a command (never returns) or raise ``Become`` with a program."""
    try:
        forget()
        settle_child(in_r, out_w, err_w, job_r, report_w)  # 4 closes by itself on a successful exec
        # Before the job, while nobody waits: the agent's objects out of the collector's reach (the
        # program's end collects what the program made; a walk of the agent's objects would copy
        # every page they share with it), and the agent's modules out of sys.modules.
        gc.freeze()
        _forget_agent_modules()
        if warm:
            warm_up()  # take the copy-on-write faults now, not while a caller waits
        os.write(4, b"w")
        raw = read_all(3)
        os.close(3)
        if not raw:
            os._exit(0)  # a discarded spare
        job = jsoncodec.loads(raw)
    except BaseException:  # noqa: BLE001
        os._exit(126)
    where = "limits"
    try:
        apply_rlimits(job["limits"])
        where = "cwd"
        os.chdir(job["cwd"])
        set_environ(job["env"])
        if job["kind"] == "exec":
            where = "exec"
            # As a fresh process would have them (Python ignores these two).
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            os.execvpe(job["argv"][0], job["argv"], job["env"])  # noqa: S606 - no shell, by design
    except OSError as exc:
        report = {"errno": exc.errno or 0, "what": where, "where": job.get("cwd")}
        os.write(4, jsoncodec.dumps(report).encode())
        os._exit(127)
    except BaseException:  # noqa: BLE001
        os._exit(126)
    os.close(4)
    raise Become(_program(job["code"], bool(job.get("stream"))))


def _program(source: str, stream: bool) -> Program:
    """Make this process look like ``python3 -`` about to run ``source``; a syntax error ends it here."""
    if stream:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # streamed output comes line by line
    main = become_main()
    try:
        # dont_inherit: the agent's own ``from __future__`` imports are not the program's.
        code = compile(source, PROGRAM_FILE, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte in the source
        sys.excepthook(type(exc), exc.with_traceback(None), None)
        Program(compile("", PROGRAM_FILE, "exec"), main.__dict__).end(SystemExit(1))
    return Program(code, main.__dict__)


def become_main() -> types.ModuleType:
    """A fresh ``__main__``, and nothing of the agent in reach: its modules, its path, its argv."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    _forget_agent_modules()
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = ["", *extra, *(p for p in sys.path if p != _AGENT_HOME)]
    sys.argv = ["-"]
    sys.orig_argv = [sys.executable, "-"]
    return main


_AGENT_HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _forget_agent_modules() -> None:
    """The agent's modules out of ``sys.modules``: ``import agent`` fails, as it would outside (the
    code already running keeps the modules it holds)."""
    for name in [n for n in sys.modules if n == "agent" or n.startswith("agent.")]:
        del sys.modules[name]


def set_environ(env: dict[str, str]) -> None:
    """``os.environ`` (and the C environment) made ``env``, changing only what differs: the
    runner's is the agent's, most often the same (each change copies pages the agent shares)."""
    for name in [n for n in os.environ if n not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def settle_child(stdin: int, stdout: int, stderr: int, fd3: int, fd4: int) -> None:
    """In a child the agent just forked (a runner, an interpreter): stdio on the given
    descriptors and Python's ``sys.std*`` over them, 3 and 4 its own (not inherited by what it
    starts), every other descriptor closed (the host connection among them), a process group
    of its own, and the agent's signal handling undone."""
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.dup2(fd3, 3, inheritable=False)
    os.dup2(fd4, 4, inheritable=False)
    os.closerange(5, 1 << 16)
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for number in UNHEEDED_BY_THE_AGENT:
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
    install_stdio()


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_report(fd: int, within: float) -> bytes | None:
    """What a runner reports before its exec (nothing if it execs), or None if it has not in ``within`` s."""
    until = time.monotonic() + within
    chunks: list[bytes] = []
    while _waited(fd, False, until):
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    return None


def send_job(runner: Runner, job: bytes, within: float) -> bool:
    """Hand a ready runner its job (its ``job_w`` closed after); False if not taken in ``within`` s."""
    fd, runner.job_w = runner.job_w, -1
    until = time.monotonic() + within
    try:
        os.set_blocking(fd, False)
        view = memoryview(job)
        while view:
            if not _waited(fd, True, until):
                return False
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # writable, but not for this much (gVisor's pipes): wait again
                continue
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _waited(fd: int, writing: bool, until: float) -> bool:
    """Wait until ``fd`` is readable (writable), or ``until`` (monotonic): False then.

    Every wait of the agent's on a process it started is bounded: the code runs as the same uid,
    and can stop that process (SIGSTOP) before it reads or writes; the agent, single-threaded,
    would answer nothing more, file calls included.
    """
    left = max(0.0, until - time.monotonic())
    readable, writable, _ = select.select([] if writing else [fd], [fd] if writing else [], [], left)
    return bool(readable or writable)


def install_stdio() -> None:
    """Fresh sys.stdin/stdout/stderr on fds 0-2, as a new ``python3`` would have them on pipes."""
    # surrogateescape, as python3 in a UTF-8 locale: a name of undecodable bytes (os.listdir of
    # b"caf\xe9") prints as those bytes instead of raising UnicodeEncodeError.
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="surrogateescape")
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="surrogateescape", write_through=False
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )


def warm_up() -> None:
    """Exercise the paths a request takes, so that a forked process copies its pages ahead of time.

    After fork every page is shared copy-on-write; the first write to each
    one (a reference count is enough) faults and copies it. On virtualised
    hosts a fault costs microseconds, and a cold request path touches hundreds
    of pages: doing it while idle moves milliseconds off the critical path.
    """
    sample = {"code": "pass", "env": {"K": "v"}, "cwd": "/", "limits": {"max_open_files": 1}}
    payload = jsoncodec.dumps(wire.request("run_code", sample, 1)).encode()
    jsoncodec.loads(payload)
    wire.b64decode(wire.b64encode(payload))
    exec(compile("pass", PROGRAM_FILE, "exec", dont_inherit=True), {"__name__": "__warm__"})  # noqa: S102
    types.ModuleType("__warm__")
    wire.encode_message(wire.response(1, {"exit_code": 0, "stdout": "", "duration": 0.0}))


def apply_rlimits(limits: dict[str, Any]) -> None:
    """The run's rlimits, hard (never raised: a lower limit already there stays).

    ``cpu_soft_seconds`` lowers RLIMIT_CPU's soft limit below its hard one, so
    that the process gets SIGXCPU there, before SIGKILL at the hard limit.
    """
    core = resource.getrlimit(resource.RLIMIT_CORE)
    if core != (1, 1):  # (1, 1): the process runtime's, for good (confine.py); 1 here too where it may be
        resource.setrlimit(resource.RLIMIT_CORE, (1, 1) if core[1] != 0 else (0, 0))
    for key, which in RLIMITS.items():
        value = limits.get(key)
        if isinstance(value, int) and value >= 0:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))
    soft = limits.get("cpu_soft_seconds")
    if isinstance(soft, int) and soft > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def kill_group(pid: int) -> None:
    for target in (-pid, pid):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
