"""A component's supervisor (``python -m stockade.components NAME``): its isolate, its relay, its restarts.

Each run builds an isolate, starts the command there through the relay
(components_relay.py: a detached process in the isolate that holds the
command's pipes), and then polls the relay's files with short agent calls
(``Pump``): the output goes to the log (and stdout to an attached client),
``stockade exec`` commands are started and served the same way, next to it,
and standard input from ``stockade attach`` is written to the relay. The agent
is never held by a long call, so none of these waits for another.

When the command ends the isolate is closed and the restart policy applies:
``always``, or ``on-failure`` (an exit status other than 0, a signal, a limit, a
dead isolate), with a backoff of 1, 2, 4 ... 30 s and at most ``max_restarts``
in a row (a run that lasted ``STABLE_RUN_S`` resets both).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import components_relay
from .components import LOG_ROTATE_BYTES, MAX_BACKOFF_S, STABLE_RUN_S, ComponentStore, _start_time
from .errors import AgentError, SandboxError, SandboxOSError, StockadeError
from .runtimes.publish import parse_publish

if TYPE_CHECKING:
    from .components_control import ControlServer
    from .policy import Policy
    from .runtimes.sandbox import AgentSandbox

RELAY_DIR = ".stockade-component"  # in the isolate's scratch directory
MAX_INPUT_FILES = 8  # stdin files the relay has not taken yet
INPUT_FILE_CAP = 1024 * 1024
MAX_QUEUED_INPUT = 4 * 1024 * 1024  # stdin from a client not yet written to the isolate
OUTPUT_FILE_MAX = 2 * components_relay.FILE_CAP  # a larger output file is not the relay's
# How often the relay's files are looked at: soon after something moved, then less
# often; while `exec` or `attach` clients wait, never less often than SESSION_POLL_S.
ACTIVE_POLL_S, SESSION_POLL_S, IDLE_POLL_S = 0.02, 0.05, 0.5
LIVENESS_S = 5.0  # how often a quiet relay is checked for being alive


class LaunchError(StockadeError):
    """The command could not be started in the isolate: ``permanent`` when no run would start it
    (no such program), not when its relay died before it said (something in the isolate killed it)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


class Job:
    """One command run by a relay: the component's main command, or one ``stockade exec``.

    ``feed``, ``close_stdin`` and ``signal`` may be called from any thread; the
    pump (the supervisor's main thread) does the rest.
    """

    def __init__(
        self,
        argv: list[str],
        keep_stdin: bool,
        on_output: Callable[[str, bytes], None],
        on_end: Callable[[int | None, str | None], None],
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.argv = argv
        self.keep_stdin = keep_stdin
        self.on_output = on_output
        self.on_end = on_end
        self.paused = paused
        self.jid = ""
        self.relay_pid: int | None = None  # in the isolate's pid namespace
        self.next_out = 1
        self.next_in = 1
        self.next_signal = 1
        self.ending: tuple[int | None, str | None] | None = None
        self.ended = False
        self._lock = threading.Condition()
        self._input: deque[bytes | None] = deque()  # None: the end of its stdin
        self._queued = 0  # bytes in _input
        self._signals: deque[int] = deque()

    def feed(self, data: bytes) -> None:
        """Queue ``data`` for its stdin; waits while MAX_QUEUED_INPUT bytes are queued (the client's backpressure)."""
        with self._lock:
            self._lock.wait_for(lambda: self._queued < MAX_QUEUED_INPUT or self.ended, timeout=None)
            self._input.append(data)
            self._queued += len(data)

    def close_stdin(self) -> None:
        with self._lock:
            self._input.append(None)

    def signal(self, signum: int) -> None:
        with self._lock:
            self._signals.append(signum)

    def take_input(self, files: int) -> list[bytes | None]:
        """Up to ``files`` stdin files' worth of what was fed (chunks joined up to INPUT_FILE_CAP)."""
        taken: list[bytes | None] = []
        with self._lock:
            while self._input and len(taken) < files:
                item = self._input.popleft()
                self._queued -= len(item or b"")
                if item is None or not taken or taken[-1] is None or len(taken[-1]) + len(item) > INPUT_FILE_CAP:
                    taken.append(item)
                else:
                    taken[-1] += item
            self._lock.notify_all()
        return taken

    def take_signals(self) -> list[int]:
        with self._lock:
            signals, self._signals = list(self._signals), deque()
        return signals

    def finish(self, exit_code: int | None, error: str | None) -> None:
        with self._lock:
            first, self.ended = not self.ended, True
            self._lock.notify_all()  # a client waiting to feed it: no more room will come
        if first:
            self.on_end(exit_code, error)


class Pump:
    """The relays of one isolate, driven from the supervisor's main thread (``tick``)."""

    def __init__(self, sandbox: AgentSandbox) -> None:
        self.sandbox = sandbox
        self.directory = posixpath.join(sandbox.scratch_dir, RELAY_DIR)
        self.jobs: dict[str, Job] = {}
        self._relay = components_relay.source()
        self._seq = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new: list[Job] = []
        self._after_tick: list[Callable[[], None]] = []
        self._closed: str | None = None
        self._quiet_since = time.monotonic()

    # ---- any thread ----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Start ``job`` in the next tick (its end is reported to it if the run ends first)."""
        with self._lock:
            closed = self._closed
            if closed is None:
                self._new.append(job)
        if closed is not None:
            job.finish(None, closed)
        self.wake()

    def after_tick(self, call: Callable[[], None]) -> None:
        """Call ``call`` at the end of the next tick, once the output there is by then has been read."""
        with self._lock:
            closed = self._closed is not None
            if not closed:
                self._after_tick.append(call)
        if closed:
            call()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    # ---- the main thread -----------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def start(self, job: Job) -> None:
        """Start ``job``'s command in the isolate, through a new relay; LaunchError if it cannot run."""
        from .runtimes.base import UNBOUNDED

        self._seq += 1
        jid = f"j{self._seq}"
        code = f"{self._relay}\nlaunch({self.directory!r}, {jid!r}, {list(job.argv)!r}, {bool(job.keep_stdin)!r})\n"
        said: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

        def collect(stream: str, data: bytes) -> None:
            if len(said[stream]) < 65536:
                said[stream] += data

        # No deadline: the relay inherits the call's limits, and a timeout's CPU backstop is one of them.
        result = self.sandbox.run_code(code, "python", timeout=UNBOUNDED, on_output=collect)
        report: Any = None
        with contextlib.suppress(ValueError, IndexError):
            report = json.loads(said["stdout"].decode(errors="replace").strip().splitlines()[-1])
        if not isinstance(report, dict) or result.termination_reason != "completed":
            why = result.error or said["stderr"].decode(errors="replace").strip()[-500:] or "no report"
            raise LaunchError(f"the relay did not start in the isolate: {why}", permanent=False)
        if isinstance(report.get("error"), str):
            raise LaunchError(report["error"])
        if isinstance(report.get("lost"), str):
            raise LaunchError(_tampered(report["lost"]), permanent=False)
        relay = report.get("relay")
        job.jid, job.relay_pid = jid, relay if isinstance(relay, int) else None
        self.jobs[jid] = job

    def tick(self) -> bool:
        """Start submitted jobs, pass on input and signals, read output; True if anything moved."""
        with self._lock:
            new, self._new = self._new, []
            after, self._after_tick = self._after_tick, []
        for job in new:
            try:
                self.start(job)
            except (LaunchError, AgentError) as exc:  # the agent answered: the isolate lives on
                job.finish(None, str(exc))
        moved = bool(new)
        if self.jobs:
            try:
                entries = {str(e.get("name")): e for e in self.sandbox.list_dir(self.directory)}
            except SandboxOSError as exc:  # the agent answered: the isolate lives, its relays' files do not
                entries = {}
                for job in self.jobs.values():
                    job.ending = (None, _tampered(exc))
            for jid, job in list(self.jobs.items()):
                try:
                    moved = self._send_input(job, entries) or moved
                    moved = self._read_output(job, entries) or moved
                except SandboxOSError as exc:
                    job.ending = job.ending or (None, _tampered(exc))
                if job.ending is not None:
                    del self.jobs[jid]
                    job.finish(*job.ending)
            self._check_alive(moved)
        for call in after:
            call()
        return moved

    def shutdown(self, why: str) -> None:
        """The run is over: every job not ended yet, and every one submitted, ends with ``why``."""
        with self._lock:
            self._closed = why
            new, self._new = self._new, []
            after, self._after_tick = self._after_tick, []
        for job in [*new, *self.jobs.values()]:
            job.finish(None, why)
        self.jobs.clear()
        for call in after:
            call()

    def _send_input(self, job: Job, entries: dict[str, Any]) -> bool:
        waiting = sum(1 for name in entries if name.startswith(f"{job.jid}.i."))
        moved = False
        for item in job.take_input(max(0, MAX_INPUT_FILES - waiting)):
            suffix = "eof" if item is None else str(len(item))
            self.sandbox.write_file(f"{self.directory}/{job.jid}.i.{job.next_in}.{suffix}", item or b"", 0o600)
            job.next_in += 1
            moved = True
        for signum in job.take_signals():
            self.sandbox.write_file(f"{self.directory}/{job.jid}.k.{job.next_signal}.{signum}", b"", 0o600)
            job.next_signal += 1
            moved = True
        return moved

    def _read_output(self, job: Job, entries: dict[str, Any]) -> bool:
        if job.paused():
            return False  # its client reads slowly: the relay stops reading the command's pipes
        n = job.next_out
        while job.ending is None and f"{job.jid}.o.{n}" in entries:
            data = self.sandbox.read_file(f"{self.directory}/{job.jid}.o.{n}", max_bytes=OUTPUT_FILE_MAX)
            try:
                for tag, payload in _records(data):
                    if tag == b"o":
                        job.on_output("stdout", payload)
                    elif tag == b"e":
                        job.on_output("stderr", payload)
                    elif tag == b"x":
                        code = json.loads(payload).get("exit_code")
                        job.ending = (code if isinstance(code, int) else None, None)
            except (ValueError, AttributeError):
                job.ending = (None, _tampered("its output file is garbled"))
            n += 1
        if n == job.next_out:
            return False
        self.sandbox.write_file(f"{self.directory}/{job.jid}.a.{n - 1}", b"", 0o600)
        job.next_out = n
        return True

    def _check_alive(self, moved: bool) -> None:
        """A quiet relay is checked now and then: something in the isolate may have killed it."""
        now = time.monotonic()
        if moved:
            self._quiet_since = now
            return
        if now - self._quiet_since < LIVENESS_S:
            return
        self._quiet_since = now
        pids = {jid: job.relay_pid for jid, job in self.jobs.items() if job.relay_pid is not None}
        probe = (
            "import json, os\nfound = {}\n"
            f"for jid, pid in {pids!r}.items():\n"
            "    try:\n        os.kill(pid, 0)\n        found[jid] = True\n"
            "    except ProcessLookupError:\n        found[jid] = False\n"
            "    except OSError:\n        found[jid] = True\n"
            "print(json.dumps(found))\n"
        )
        try:
            result = self.sandbox.run_code(probe, "python", timeout=10)
        except AgentError:
            return  # it answered, but could not run the probe (its pids limit?): next time
        try:
            alive = json.loads(result.stdout)
        except ValueError:
            return
        if not isinstance(alive, dict):
            return
        for jid in pids:
            job = self.jobs[jid]
            if alive.get(jid) is False and job.ending is None and f"{jid}.o.{job.next_out}" not in self._names():
                job.ending = (None, _tampered("its relay process is gone"))

    def _names(self) -> set[str]:
        return {str(e.get("name")) for e in self.sandbox.list_dir(self.directory)}


def _tampered(why: object) -> str:
    """Something in the isolate got in the way of the relay: it runs as the command does, and can."""
    return f"lost touch with the command's relay in the isolate: {why}"


def _records(data: bytes) -> list[tuple[bytes, bytes]]:
    """An output file's records: (tag, data); ValueError if it is not the relay's format."""
    records = []
    at = 0
    while at < len(data):
        if at + 5 > len(data):
            raise ValueError("a cut record")
        tag, (size,) = data[at : at + 1], struct.unpack(">I", data[at + 1 : at + 5])
        if tag not in (b"o", b"e", b"x") or at + 5 + size > len(data):
            raise ValueError("not a record")
        records.append((tag, data[at + 5 : at + 5 + size]))
        at += 5 + size
    return records


# ---- the supervisor ------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM reached the supervisor."""


@dataclass
class _Outcome:
    exit_code: int | None
    error: str | None  # None: it exited 0
    lasted: float = 0.0  # seconds

    @property
    def failed(self) -> bool:
        return self.error is not None


class Supervisor:
    def __init__(self, name: str, store: ComponentStore) -> None:
        self.name = name
        self.store = store
        self.spec = store.spec(name)
        self.state = store.state(name)
        self.log = _Log(store.path(name, "log"))
        self.control: ControlServer | None = None
        self.stopping = False

    def run(self) -> int:
        from .components_control import ControlServer
        from .policy import Policy
        from .runtimes.manager import RuntimeManager

        state = self.state
        state.supervisor_pid, state.supervisor_start = os.getpid(), _start_time(os.getpid())
        self.store.save(state)

        def on_term(*_: object) -> None:
            if not self.stopping:  # once: a second signal must not cut the clean-up short
                self.stopping = True
                raise _Stop

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        manager = None
        try:
            self.control = ControlServer(self.store.path(self.name))
            manager = RuntimeManager(pool_size=0)
            policy = Policy.build(**self.spec["policy"])
            return self._loop(policy, manager)
        except _Stop:
            state.status, state.error, state.published = "stopped", None, {}
            self.store.save(state)
            return 0
        except LaunchError as exc:
            state.status, state.error = "failed", str(exc)
            self.store.save(state)
            return 1
        except Exception as exc:  # noqa: BLE001 - recorded for `stockade status`, the supervisor has no terminal
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            self.store.save(state)
            return 1
        finally:
            self.stopping = True
            if self.control is not None:
                self.control.close()
            if manager is not None:
                manager.close()
            self.log.close()

    def _loop(self, policy: Policy, manager: Any) -> int:
        state, spec = self.state, self.spec
        restart_policy = spec["restart"]
        max_restarts = spec.get("max_restarts")
        backoff, streak = 1.0, 0
        while True:
            outcome = self._run_once(policy, manager)
            state.exit_code = outcome.exit_code
            state.error = outcome.error
            if outcome.lasted > STABLE_RUN_S:
                backoff, streak = 1.0, 0  # it ran for a while: a new failure is not a crash loop
            restart = restart_policy == "always" or (restart_policy == "on-failure" and outcome.failed)
            if not restart:
                state.status = "failed" if outcome.failed else "stopped"
                state.published = {}
                self.store.save(state)
                return 0
            if max_restarts is not None and streak >= max_restarts:
                last = outcome.error or f"exited with {outcome.exit_code}"
                state.status = "failed"
                state.error = f"{last}; gave up after {streak} restarts in a row (--max-restarts {max_restarts})"
                self.log.note(f"not restarting: {state.error}")
                self.store.save(state)
                return 0
            streak += 1
            state.restarts += 1
            state.status = "starting"
            self.store.save(state)
            self.log.note(f"restarting in {backoff:g} s (restart policy {restart_policy})")
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _run_once(self, policy: Policy, manager: Any) -> _Outcome:
        """One isolate, one run of the command; the isolate is closed when it ends."""
        assert self.control is not None
        began = time.monotonic()
        sandbox: AgentSandbox = manager.select(policy).start(policy)
        try:
            published = {}
            for spec in self.spec.get("publish", []):
                host, host_port = sandbox.publish(spec)
                published[str(parse_publish(spec)[2])] = f"{host}:{host_port}"
        except StockadeError as exc:  # e.g. the host port was taken meanwhile: a failed run, restarted as any
            sandbox.close()
            return _Outcome(None, f"cannot publish: {exc}", time.monotonic() - began)
        except BaseException:
            sandbox.close()
            raise
        self.state.published = published
        pump: Pump | None = None
        ending: list[tuple[int | None, str | None]] = []
        before = sandbox.usage(peak=False)
        try:
            pump = Pump(sandbox)
            main = Job(
                list(self.spec["argv"]),
                bool(self.spec.get("stdin")),
                self._main_output,
                lambda code, error: ending.append((code, error)),
            )
            try:
                pump.start(main)
            except LaunchError as exc:
                if exc.permanent:
                    raise  # not restarted: no run would start it
                ending.append((None, str(exc)))
            else:
                state = self.state
                state.status, state.started_at = "running", time.time()
                state.runtime, state.policy_digest, state.error = sandbox.runtime_name, policy.digest, None
                self.store.save(state)
                self.control.serve(pump, main)
            interval = ACTIVE_POLL_S
            while not ending:
                moved = pump.tick()
                if ending:
                    break
                busy = len(pump.jobs) > 1 or self.control.attached
                interval = ACTIVE_POLL_S if moved else min(interval * 2, SESSION_POLL_S if busy else IDLE_POLL_S)
                pump.wait(interval)
            exit_code, error = ending[0]
        except SandboxError as exc:  # the isolate died (a violation, the agent gone)
            exit_code, error = None, str(exc)
        finally:
            why = "the component's run ended" if not self.stopping else "the component was stopped"
            self.control.unserve(why)
            if pump is not None:
                pump.shutdown(why)
            with contextlib.suppress(Exception):
                after = sandbox.usage(peak=False)
                if after.oom_kills > before.oom_kills:
                    error = f"out of memory: the {policy.memory_mb} MB limit was reached"
            sandbox.close()
        return _Outcome(exit_code, error or _exit_error(exit_code, policy), time.monotonic() - began)

    def _main_output(self, stream: str, data: bytes) -> None:
        self.log.write(stream, data)
        if stream == "stdout" and self.control is not None:
            self.control.to_attached(data)


def _exit_error(exit_code: int | None, policy: Policy) -> str | None:
    """What an exit status says went wrong (None for 0)."""
    if exit_code == 0:
        return None
    if exit_code is None:
        return "it ended with no exit status"
    if exit_code > 0:
        return f"exited with {exit_code}"
    signum = -exit_code
    if policy.cpu_time_seconds is not None and signum in (signal.SIGXCPU, signal.SIGKILL):
        return f"killed by signal {signum}: probably the CPU time limit (cpu_time_seconds={policy.cpu_time_seconds})"
    try:
        return f"killed by {signal.Signals(signum).name}"
    except ValueError:
        return f"killed by signal {signum}"


class _Log:
    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "ab", buffering=0)

    def write(self, stream: str, data: bytes) -> None:
        self.f.write(data)
        if self.f.tell() > LOG_ROTATE_BYTES:
            self.f.close()
            os.replace(self.path, self.path + ".1")
            self.f = open(self.path, "ab", buffering=0)

    def note(self, text: str) -> None:
        self.write("stderr", f"[stockade] {text}\n".encode())

    def close(self) -> None:
        self.f.close()


def main(name: str) -> int:
    return Supervisor(name, ComponentStore()).run()
