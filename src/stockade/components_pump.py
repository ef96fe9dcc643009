"""The relays of one component's isolate, polled with short agent calls (``Pump``).

The command runs under a relay (components_relay.py: a detached process in
the isolate that holds its pipes and writes its output to files). ``Pump``
reads those files, feeds standard input to them and starts ``stockade exec``
commands beside the main one (each a ``Job``), from the supervisor's main
thread. Everything the relay writes is read as hostile: it runs as the
command does, so the command can tamper with it, and a file that breaks the
relay's format ends the run as tampered with rather than being trusted.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import components_relay
from .errors import AgentError, SandboxError, SandboxOSError, StockadeError
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from .runtimes.sandbox import AgentSandbox

RELAY_DIR = ".stockade-component"  # in the isolate's scratch directory
MAX_INPUT_FILES = 8  # stdin files the relay has not taken yet
INPUT_FILE_CAP = 1024 * 1024
MAX_QUEUED_INPUT = 4 * 1024 * 1024  # stdin from a client not yet written to the isolate
FEED_CHECK_S = 0.5  # how often a client waiting for room in its command's stdin is checked for being gone
OUTPUT_FILE_MAX = 2 * components_relay.FILE_CAP  # a larger output file is not the relay's
# Output files a relay may have written that the host has not read: its window, and the last ones
# of its end, written whatever the window (a file for each pipe's rest, one for its exit record).
MAX_UNREAD_FILES = components_relay.MAX_UNACKED + 3
OUTPUT_PIECE = 256 * 1024  # output passed to a client at once: base64 in a JSON line, under its MAX_LINE
EXIT_RECORD_MAX = 1024  # the relay's exit record, {"exit_code": N}: anything longer is not its
# How often the relay's files are looked at: soon after something moved, then less
# often; while `exec` or `attach` clients wait, never less often than SESSION_POLL_S.
ACTIVE_POLL_S, SESSION_POLL_S, IDLE_POLL_S = 0.02, 0.05, 0.5
# A component's output read into its log, a second sustained and at once (``Job.budget``): reading
# it (the agent's calls, the log's writes) is this host's work, outside the isolate's cgroup (a
# command writing without end held a fifth of a host core; each MiB a second costs ~1% of one). Past
# it, no file is read until it has refilled, and the relay's window holds the command back: nothing
# is lost.
LOG_PER_S, LOG_BURST = 4 << 20, 64 << 20
LIVENESS_S = 5.0  # how often a quiet relay is checked for being alive
LAUNCH_REPORT_S = 30.0  # a relay that has not said it started by then was held up by the command
# First in the relay's code and its probe's: the interpreter's own library only on the import path.
# The command shares their uid and cwd: a ./subprocess.py or a PYTHONPATH of its would be imported.
STDLIB_ONLY = (
    "import sys\n"
    "sys.path[:] = [p for p in sys.path if p.startswith((sys.base_prefix + '/', sys.base_exec_prefix + '/'))]\n"
)
# Entries in the exchange directory: each job's relay keeps a few dozen at most. The command can
# make its own there, and each poll lists them all on the host: thousands more are its, not a relay's.
MAX_EXCHANGE_ENTRIES, ENTRIES_PER_JOB = 4096, 64


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
        budget: TokenBucket | None = None,
    ) -> None:
        self.argv = argv
        self.keep_stdin = keep_stdin
        self.on_output = on_output
        self.on_end = on_end
        self.paused = paused
        self.budget = budget  # what reading its output may cost this host (the main command's: its log)
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

    def feed(self, data: bytes, gone: Callable[[], bool] = lambda: False) -> bool:
        """Queue ``data`` for its stdin; waits while MAX_QUEUED_INPUT bytes are queued (the client's
        backpressure). False, nothing queued, when ``gone`` says its client left meanwhile: a command
        that never reads its stdin would otherwise keep the client's thread here for good."""
        with self._lock:
            while self._queued >= MAX_QUEUED_INPUT and not self.ended:
                if gone():
                    return False
                self._lock.wait(FEED_CHECK_S)
            self._input.append(data)
            self._queued += len(data)
            return True

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
        launch = f"launch({self.directory!r}, {jid!r}, {list(job.argv)!r}, {bool(job.keep_stdin)!r})"
        code = f"{STDLIB_ONLY}exec(compile({self._relay!r}, 'components_relay', 'exec'))\n{launch}\n"
        said: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

        def collect(stream: str, data: bytes) -> None:
            if len(said[stream]) < 65536:
                said[stream] += data

        # No deadline on the call: the relay inherits its limits, and a timeout's CPU backstop is one
        # of them. The command can stop the relay (SIGSTOP, same uid) before it reports, though: then
        # the isolate is ended from here, and the run with it, rather than the supervisor waiting for
        # ever. Run by the agent's own interpreter (`run_code`: no PATH to follow, no argument size
        # limit), with no module of the command's on its path (STDLIB_ONLY).
        why = f"the relay of job {jid} did not report within {LAUNCH_REPORT_S:g} s: something in the isolate held it"
        fired = threading.Event()

        def end_it() -> None:
            fired.set()
            self.sandbox.cancel(why)

        held_up = threading.Timer(LAUNCH_REPORT_S, end_it)
        held_up.daemon = True
        held_up.start()
        try:
            result = self.sandbox.run_code(code, "python", timeout=UNBOUNDED, on_output=collect)
        except SandboxError:
            if fired.is_set():  # the call saw the isolate end (or its run killed, below): said the same way
                raise LaunchError(why, permanent=False) from None
            raise
        finally:
            held_up.cancel()
        if fired.is_set():
            raise LaunchError(why, permanent=False)
        report: Any = None
        # The isolate's words (its command runs as the relay does, and can print for it): read as such.
        with contextlib.suppress(ValueError, IndexError, RecursionError):
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
            lost: object = None
            try:
                listed = self.sandbox.list_dir(self.directory)
            except SandboxOSError as exc:  # the agent answered: the isolate lives, its relays' files do not
                listed, lost = [], exc
            most = MAX_EXCHANGE_ENTRIES + ENTRIES_PER_JOB * len(self.jobs)
            if len(listed) > most:
                listed, lost = [], f"{len(listed)} entries in its directory, over {most}"
            entries = {str(e.get("name")): e for e in listed}
            if lost is not None:
                for job in self.jobs.values():
                    job.ending = (None, _tampered(lost))
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
        n = job.next_out
        # At most the relay's window of unread files, and none while its client reads slowly (the
        # relay then stops reading the command's pipes): the command can write files of its own
        # there too (a sparse one costs it 4 KiB for 2 MiB read here, outside its cgroup).
        while job.ending is None and f"{job.jid}.o.{n}" in entries and not job.paused():
            if n - job.next_out >= MAX_UNREAD_FILES:
                job.ending = (None, _tampered(f"more than {MAX_UNREAD_FILES} output files await reading"))
                break
            if job.budget is not None and job.budget.spend(0.0) <= 0:
                break  # read once it has refilled: the relay's window holds the command back meanwhile
            data = self.sandbox.read_file(f"{self.directory}/{job.jid}.o.{n}", max_bytes=OUTPUT_FILE_MAX)
            if job.budget is not None:
                job.budget.spend(len(data))
            try:
                for tag, payload in _records(data):
                    if tag in (b"o", b"e"):
                        # In pieces a client's line holds (a record is the command's to size: one it
                        # wrote itself may fill the file).
                        for at in range(0, len(payload), OUTPUT_PIECE):
                            job.on_output("stdout" if tag == b"o" else "stderr", payload[at : at + OUTPUT_PIECE])
                    elif tag == b"x":
                        if len(payload) > EXIT_RECORD_MAX:
                            raise ValueError("an exit record is a short object")
                        code = json.loads(payload).get("exit_code")
                        # Popen's returncode: 0-255, or -N for a signal. Another is no exit of the
                        # command's (a client would exit with 256, which its shell reads as 0).
                        if type(code) is not int or not -64 <= code <= 255:
                            raise ValueError("not an exit status")
                        job.ending = (code, None)
            except (ValueError, AttributeError, RecursionError):
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
            f"{STDLIB_ONLY}import json, os\nfound = {{}}\n"
            f"for jid, pid in {pids!r}.items():\n"
            "    try:\n        os.kill(pid, 0)\n        found[jid] = True\n"
            "    except ProcessLookupError:\n        found[jid] = False\n"
            "    except OSError:\n        found[jid] = True\n"
            "print(json.dumps(found))\n"
        )
        try:
            result = self.sandbox.run_code(probe, "python", timeout=10)
        except AgentError:
            return  # it answered, but could not run the probe (its pids limit?, its runner stopped?): next time
        finally:
            self._quiet_since = time.monotonic()  # a probe held up (to its timeout) is not followed by another at once
        try:
            alive = json.loads(result.stdout[:65536])
        except (ValueError, RecursionError):  # the isolate's words, as the launch report's
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
    if not data:
        # The relay writes a file only to hold a record: an empty one is the command's (or one it
        # is still writing), and read as none it would skip a number the relay's own file then takes.
        raise ValueError("an empty output file")
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
