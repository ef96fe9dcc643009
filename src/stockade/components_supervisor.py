"""A component's supervisor (``python -m stockade.components NAME``): its isolate, its relay, its restarts.

Each run builds an isolate, starts the command there through the relay
(components_relay.py: a detached process in the isolate that holds the
command's pipes), and then polls the relay's files with short agent calls
(``Pump``, components_pump.py): the output goes to the log (and stdout to an attached client),
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
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from .components import LOG_ROTATE_BYTES, MAX_BACKOFF_S, STABLE_RUN_S, ComponentStore, _start_time
from .components_pump import ACTIVE_POLL_S, IDLE_POLL_S, LOG_BURST, LOG_PER_S, SESSION_POLL_S, Job, LaunchError, Pump
from .errors import DaemonBusyError, SandboxError, SandboxStartError, StockadeError
from .ratelimit import TokenBucket
from .runtimes.publish import parse_publish

if TYPE_CHECKING:
    from .components_control import ControlServer
    from .policy import Policy
    from .runtimes.sandbox import AgentSandbox

# ---- the supervisor ------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM reached the supervisor: raised at the main thread's next safe point."""


@dataclass
class _Outcome:
    exit_code: int | None
    error: str | None  # None: it exited 0
    lasted: float = 0.0  # seconds

    @property
    def failed(self) -> bool:
        return self.error is not None


class Supervisor:
    def __init__(self, name: str, store: ComponentStore, launch: str) -> None:
        self.name = name
        self.store = store
        self.launch = launch  # the start that made this supervisor, as its record names it
        self.spec = store.spec(name)
        self.state = store.state(name)
        self.log = _Log(store.path(name, "log"))
        # Across its restarts: one started again brings no fresh burst (components_pump.py LOG_PER_S).
        self._log_budget = TokenBucket(LOG_PER_S, LOG_BURST)
        self.control: ControlServer | None = None
        self.stopping = False
        self._closing = False
        self._sandbox: AgentSandbox | None = None  # the run's isolate, for a stop to end
        self._pump: Pump | None = None
        self._stopped = threading.Event()

    def _on_stop(self, stop_r: int) -> None:
        """The stop's thread: ends the run's isolate, whatever call the main thread is in (one the
        isolate holds up, a relay's launch, ends with it), and wakes the main thread's waits."""
        with contextlib.suppress(OSError):
            os.read(stop_r, 1)
        self._stopped.set()
        pump, sandbox = self._pump, self._sandbox  # read once: the main thread clears them at the close
        if pump is not None:
            pump.wake()
        if sandbox is not None and not self._closing:
            sandbox.cancel("the component was stopped")

    def run(self) -> int:
        from .components_control import ControlServer
        from .policy import Policy
        from .runtimes.manager import RuntimeManager

        # The handler only sets a flag and writes a byte: raised from it, the stop could land in an
        # event loop's callback (an agent reply being read), which logs it and goes on, the stop lost;
        # and a lock the main thread holds there would deadlock it. The rest is the stop thread's.
        stop_r, stop_w = os.pipe()

        def on_term(*_: object) -> None:
            if not self.stopping:  # once: a second signal must not cut the clean-up short
                self.stopping = True
                os.write(stop_w, b"\0")

        threading.Thread(target=self._on_stop, args=(stop_r,), name="stop", daemon=True).start()
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        with self.store.locked(self.name):
            # Only the supervisor its record waits for runs: not when a stop came before it said who
            # it is (it could signal nobody: it left "stopped"), nor when it started so late that the
            # record reads "never started" (its start was told it failed) or a start --replace
            # made a record of its own since (whose supervisor would run beside it, out of reach).
            state = self.store.state(self.name)
            if state.launch != self.launch or state.status != "starting" or state.supervisor_pid is not None:
                return 0
            self.state = state
            state.supervisor_pid, state.supervisor_start = os.getpid(), _start_time(os.getpid())
            self.store.save(state)
        manager = None
        try:
            self.control = ControlServer(self.store.path(self.name))
            manager = RuntimeManager(pool_size=0)
            policy = Policy.build(**self.spec["policy"])
            return self._loop(policy, manager)
        except _Stop:
            # Ended by a stop: no exit of its own to tell (an earlier run's would read as this one's).
            state.status, state.error, state.published, state.exit_code = "stopped", None, {}, None
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
            if self._stopped.wait(backoff):
                raise _Stop
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _run_once(self, policy: Policy, manager: Any) -> _Outcome:
        """One isolate, one run of the command; the isolate is closed when it ends."""
        assert self.control is not None
        if self.stopping:
            raise _Stop
        began = time.monotonic()
        try:
            sandbox: AgentSandbox = manager.select(policy).start(policy)
        except (SandboxStartError, DaemonBusyError, OSError) as exc:
            if self.state.started_at is None:
                raise  # never started: no run would (a share gone, a runtime that cannot start it)
            # It ran before: a start that failed now (the host short of memory or processes for a
            # moment) is a failed run, and the restart policy applies.
            return _Outcome(None, f"its isolate could not be started: {exc}", time.monotonic() - began)
        self._sandbox = sandbox
        if self.stopping:  # came while it started: the stop's thread found no isolate to end
            self._close(sandbox)
        try:
            published = {}
            specs = self.spec.get("publish", [])
            for i, spec in enumerate(specs):
                host, host_port = sandbox.publish(spec)
                port = parse_publish(spec)[2]
                published[str(port)] = f"{host}:{host_port}"
                # A free port asked for (0:PORT) is the component's from now on: its restarts
                # keep the address its clients know (or fail to start while another holds it).
                specs[i] = f"{host}:{host_port}:{port}"
        except (StockadeError, OSError) as exc:  # the host port taken meanwhile: a failed run, restarted as any
            self._close(sandbox)
            return _Outcome(None, f"cannot publish: {exc}", time.monotonic() - began)
        except BaseException:
            self._close(sandbox)
            raise
        self.state.published = published
        pump: Pump | None = None
        ending: list[tuple[int | None, str | None]] = []
        before = None
        try:
            before = sandbox.usage(peak=False)  # in the try: a stop's cancel may have ended the isolate
            pump = self._pump = Pump(sandbox)
            main = Job(
                list(self.spec["argv"]),
                bool(self.spec.get("stdin")),
                self._main_output,
                lambda code, error: ending.append((code, error)),
                budget=self._log_budget,
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
            while not ending and not self.stopping:
                moved = pump.tick()
                if ending:
                    break
                busy = len(pump.jobs) > 1 or self.control.attached
                interval = ACTIVE_POLL_S if moved else min(interval * 2, SESSION_POLL_S if busy else IDLE_POLL_S)
                pump.wait(interval)
            exit_code, error = ending[0] if ending else (None, None)
        except SandboxError as exc:  # the isolate died (a violation, the agent gone, a stop)
            exit_code, error = None, str(exc)
        finally:
            self._closing = True  # from here to the isolate's close, a stop waits (_close raises it)
            why = "the component was stopped" if self.stopping else _run_ended(ending[0] if ending else None)
            self.control.unserve(why)
            if pump is not None:
                pump.shutdown(why)
            with contextlib.suppress(Exception):
                after = sandbox.usage(peak=False)
                if before is not None and after.oom_kills > before.oom_kills:
                    error = f"out of memory: the {policy.memory_mb} MB limit was reached"
            self._close(sandbox)
        return _Outcome(exit_code, error or _exit_error(exit_code, policy), time.monotonic() - began)

    def _close(self, sandbox: AgentSandbox) -> None:
        """Close the isolate whole. A stop that comes meanwhile is raised once it is closed: raised
        in the middle, it cut the kill short (the isolate then counts as closed, and nothing
        finishes it)."""
        self._closing = True
        try:
            sandbox.close()
        finally:
            self._closing = False
            self._sandbox = self._pump = None
        if self.stopping:
            raise _Stop

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
        self.f = _append(path)
        self.line_open = False  # the last output written ended mid-line

    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        self.f.write(data)
        self.line_open = not data.endswith(b"\n")
        if self.f.tell() > LOG_ROTATE_BYTES:
            self.f.close()
            os.replace(self.path, self.path + ".1")
            self.f = _append(self.path)

    def note(self, text: str) -> None:
        # On a line of its own, even after output that ended mid-line. The component writes this
        # file too, and can print the same words: `stockade status` is the account to trust.
        lead = "\n" if self.line_open else ""
        self.write("stderr", f"{lead}[stockade] {text}\n".encode())

    def close(self) -> None:
        self.f.close()


def _append(path: str) -> BinaryIO:
    """The log, opened to append, never through a link (the supervisor may be root)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return open(fd, "ab", buffering=0)


def main(name: str, launch: str) -> int:
    return Supervisor(name, ComponentStore(), launch).run()


def _run_ended(said: tuple[int | None, str | None] | None) -> str:
    """What an attached client is told when the command's run ends: how, where that is known."""
    if said is None:
        return "the component's run ended"
    code, error = said
    if error:
        return f"the component's run ended: {error}"
    return f"the component's run ended (exit status {code})" if code is not None else "the component's run ended"
