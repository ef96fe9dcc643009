"""Long-lived components (seed 004's lifecycle): start, status, logs, stop.

``stockade start --name web -- python3 -m http.server`` keeps a command running
in its own isolate. Each component lives in ``<state dir>/components/<name>/``:

- ``spec.json``   what to run: argv, Policy fields, restart policy;
- ``state.json``  status (``starting``, ``running``, ``stopped``, ``failed``),
                  the supervisor's pid and start time, restarts, last exit code;
- ``log``         everything the command wrote (rotated to ``log.1`` past 10 MiB).

A detached supervisor process (``python -m stockade.components NAME``) owns the
isolate: it starts it, streams its output to the log, applies the restart
policy, and on SIGTERM closes the isolate and records ``stopped``. If the
supervisor itself is killed, the isolate dies with it (its agent exits when the
supervisor's socket closes) and ``status`` reports ``failed``. The state
directory survives the CLI, so any later ``stockade`` command sees the same
components.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import PolicyError, StockadeError

Status = Literal["starting", "running", "stopped", "failed"]
RestartPolicy = Literal["no", "on-failure", "always"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
LOG_ROTATE_BYTES = 10 * 1024 * 1024
SUPERVISOR_START_S = 30.0
STABLE_RUN_S = 60.0
SUPERVISOR_GONE = "its supervisor is gone (killed or crashed); the isolate died with it"
MAX_BACKOFF_S = 30.0


def state_dir() -> str:
    configured = os.environ.get("STOCKADE_STATE_DIR")
    if configured:
        return configured
    if os.getuid() == 0:
        return "/var/lib/stockade"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "stockade")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise PolicyError(f"component name {name!r}: use 1-63 of a-z, 0-9, '.', '_', '-' (starting with a-z or 0-9)")
    return name


@dataclass
class ComponentState:
    name: str
    status: Status
    supervisor_pid: int | None = None
    supervisor_start: str | None = None  # /proc start time: a reused pid is not our supervisor
    started_at: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    error: str | None = None
    runtime: str | None = None
    policy_digest: str | None = None
    updated_at: float = field(default_factory=time.time)


class ComponentStore:
    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.join(root or state_dir(), "components")

    def path(self, name: str, *parts: str) -> str:
        return os.path.join(self.root, check_name(name), *parts)

    def names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if _NAME.match(n))
        except FileNotFoundError:
            return []

    def create(self, name: str, argv: list[str], policy: dict[str, Any], restart: RestartPolicy) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        directory = self.path(name)
        if os.path.exists(directory):
            current = self.state(name)
            if current.status in ("starting", "running"):
                raise StockadeError(f"component {name!r} is already {current.status}; stop it first")
            for leftover in ("state.json", "spec.json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, leftover))
        else:
            os.mkdir(directory, 0o700)
        _write_json(self.path(name, "spec.json"), {"argv": argv, "policy": policy, "restart": restart})
        self.save(ComponentState(name, "starting"))

    def spec(self, name: str) -> dict[str, Any]:
        with open(self.path(name, "spec.json")) as f:
            spec: dict[str, Any] = json.load(f)
        return spec

    def save(self, state: ComponentState) -> None:
        state.updated_at = time.time()
        _write_json(self.path(state.name, "state.json"), asdict(state))

    def state(self, name: str) -> ComponentState:
        """The recorded state, corrected when its supervisor died without saying so."""
        try:
            with open(self.path(name, "state.json")) as f:
                state = ComponentState(**json.load(f))
        except FileNotFoundError:
            raise StockadeError(f"no component named {name!r}") from None
        if state.status in ("starting", "running"):
            if state.supervisor_pid is None:
                if time.time() - state.updated_at > SUPERVISOR_START_S:
                    state.status, state.error = "failed", "its supervisor never started"
            elif not _same_process(state.supervisor_pid, state.supervisor_start):
                state.status = "failed"
                state.error = state.error or SUPERVISOR_GONE
        return state

    def remove(self, name: str) -> None:
        directory = self.path(name)
        for entry in os.listdir(directory):
            os.unlink(os.path.join(directory, entry))
        os.rmdir(directory)


def start(name: str, argv: list[str], policy: dict[str, Any], restart: RestartPolicy, store: ComponentStore) -> None:
    """Record the component and launch its detached supervisor; returns once it has started (or failed)."""
    if not argv:
        raise PolicyError("start: no command given (stockade start --name NAME -- CMD ARGS...)")
    from .policy import Policy

    Policy.build(**policy)  # refuse a bad policy now, not in the background
    store.create(name, argv, policy, restart)
    env = {**os.environ, "STOCKADE_STATE_DIR": os.path.dirname(store.root)}
    subprocess.Popen(
        [sys.executable, "-m", "stockade.components", name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives the CLI; not in its terminal's process group
        env=env,
        close_fds=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = store.state(name)
        # Its first isolate is up (it may already have ended and be restarting), or it ended for good.
        if state.started_at is not None or state.status in ("stopped", "failed"):
            return
        time.sleep(0.05)
    raise StockadeError(f"component {name!r} did not start within 120 s")


def stop(name: str, store: ComponentStore, timeout: float = 15.0) -> ComponentState:
    """Stop the component: SIGTERM to its supervisor (which closes the isolate), SIGKILL after ``timeout``."""
    state = store.state(name)
    pid, started = state.supervisor_pid, state.supervisor_start
    if state.status in ("starting", "running") and pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _same_process(pid, started):
            time.sleep(0.05)
        if _same_process(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # its isolate dies with it
    state = store.state(name)
    if state.status in ("starting", "running") or state.error == SUPERVISOR_GONE:
        state.status, state.error = "stopped", None  # we ended it: a stop, not a failure
        store.save(state)
    return state


def read_log(name: str, store: ComponentStore, tail_bytes: int | None = None) -> bytes:
    if not os.path.isdir(store.path(name)):
        raise StockadeError(f"no component named {name!r}")
    chunks = []
    for part in ("log.1", "log"):
        with contextlib.suppress(FileNotFoundError), open(store.path(name, part), "rb") as f:
            chunks.append(f.read())
    data = b"".join(chunks)
    return data[-tail_bytes:] if tail_bytes else data


# ---- the supervisor ----------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM reached the supervisor."""


def supervise(name: str, store: ComponentStore) -> int:
    from .policy import Policy
    from .result import ExecResult
    from .runtimes.base import UNBOUNDED, AgentSandbox
    from .runtimes.manager import RuntimeManager
    from .sdk import one_shot

    spec = store.spec(name)
    state = store.state(name)
    state.supervisor_pid, state.supervisor_start = os.getpid(), _start_time(os.getpid())
    store.save(state)

    def on_term(*_: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log = _Log(store.path(name, "log"))
    manager = RuntimeManager(pool_size=0)
    backoff = 1.0
    try:
        policy = Policy.build(**spec["policy"])

        def run(sandbox: AgentSandbox) -> ExecResult:
            state.status, state.started_at = "running", time.time()
            state.runtime, state.policy_digest, state.error = sandbox.runtime_name, policy.digest, None
            store.save(state)
            return sandbox.exec(spec["argv"], timeout=UNBOUNDED, on_output=log.write)

        while True:
            result = one_shot(policy, run, manager)  # the SDK's one-shot path, with no deadline
            state.exit_code = result.exit_code
            if time.time() - (state.started_at or 0) > STABLE_RUN_S:
                backoff = 1.0  # it ran for a while: a new failure is not a crash loop
            failed = result.termination_reason != "completed" or result.exit_code != 0
            if failed:
                state.error = result.error or f"exited with {result.exit_code}"
            restart = spec["restart"] == "always" or (spec["restart"] == "on-failure" and failed)
            if not restart:
                state.status = "failed" if failed else "stopped"
                store.save(state)
                return 0
            state.restarts += 1
            state.status = "starting"
            store.save(state)
            log.note(f"restarting in {backoff:g} s (restart policy {spec['restart']})")
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
    except _Stop:
        state.status, state.error = "stopped", None
        store.save(state)
        return 0
    except Exception as exc:  # noqa: BLE001 - recorded for `stockade status`, the supervisor has no terminal
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        store.save(state)
        return 1
    finally:
        with contextlib.suppress(_Stop):
            manager.close()
        log.close()


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


def _write_json(path: str, value: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)  # readers never see half a file


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _same_process(pid: int | None, start_time: str | None) -> bool:
    return pid is not None and start_time is not None and _start_time(pid) == start_time


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1], ComponentStore()))
