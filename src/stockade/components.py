"""Long-lived components (seed 004's lifecycle): start, status, logs, stop, rm.

``stockade start --name web -- python3 -m http.server`` keeps a command running
in its own isolate. Each component lives in ``<state dir>/components/<name>/``:

- ``spec.json``    what to run: argv, Policy fields, restart policy and limit, ``stdin``;
- ``state.json``   status (``starting``, ``running``, ``stopped``, ``failed``),
                   the supervisor's pid and start time, restarts, last exit code, why;
- ``log``          everything the command wrote (rotated to ``log.1`` past 10 MiB);
- ``control.sock`` the supervisor's socket for ``exec`` and ``attach`` (components_control.py).

A detached supervisor process (``python -m stockade.components NAME``,
components_supervisor.py) owns the isolate: it starts it, runs the command
there, streams its output to the log, serves ``exec`` and ``attach``, applies
the restart policy, and on SIGTERM closes the isolate and records ``stopped``.
If the supervisor itself is killed, the isolate dies with it (its agent exits
when the supervisor's socket closes) and ``status`` reports ``failed``. The
state directory survives the CLI, so any later ``stockade`` command sees the
same components.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Literal

from .errors import PolicyError, StockadeError
from .owned_paths import check_owned

STATE_WHAT = "components' state (STOCKADE_STATE_DIR)"  # as an owned_paths refusal names it
Status = Literal["starting", "running", "stopped", "failed"]
RestartPolicy = Literal["no", "on-failure", "always"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
LOG_ROTATE_BYTES = 10 * 1024 * 1024
SUPERVISOR_START_S = 30.0
STABLE_RUN_S = 60.0
SUPERVISOR_GONE = "its supervisor is gone (killed or crashed); the isolate died with it"
MAX_BACKOFF_S = 30.0


def state_dir() -> str:
    from .settings import current

    return current().state_dir


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
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
    published: dict[str, str] = field(default_factory=dict)  # port inside -> host address:port
    launch: str | None = None  # the start that made this record: only its supervisor runs
    updated_at: float = field(default_factory=time.time)


class NoComponent(StockadeError):
    """No component of that name (or it was removed while this waited for its lock)."""


class ComponentStore:
    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.join(root or state_dir(), "components")
        # Its files say what to run and which pid to signal, as this user, maybe root: no other
        # user may change them, nor swap a directory on the way (STOCKADE_STATE_DIR's parent).
        check_owned(self.root, STATE_WHAT)

    def path(self, name: str, *parts: str) -> str:
        return os.path.join(self.root, check_name(name), *parts)

    def names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if _NAME.fullmatch(n))
        except FileNotFoundError:
            return []

    def create(
        self,
        name: str,
        argv: list[str],
        policy: dict[str, Any],
        restart: RestartPolicy,
        max_restarts: int | None = None,
        stdin: bool = False,
        publish: list[str] | None = None,
        replace: bool = False,
    ) -> str:
        """Record a new component ``name``; the word its supervisor is started with (``launch``).
        One of that name that has ended is kept, its spec and its last exit, unless ``replace``: a
        name is not taken over by accident (as Docker's)."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        check_owned(self.root, STATE_WHAT)  # what was made just now too
        _check_own(self.root)
        directory = self.path(name)
        # Checked and written under the lock: two starts of one name at once would otherwise both
        # find it free, and the second's supervisor would run unrecorded, out of `stop`'s reach.
        with self._made_and_locked(name):
            try:
                current: ComponentState | None = self.state(name)
            except StockadeError:
                current = None  # a directory left without its state (or just made): nothing of it to keep
            if current is not None and current.status in ("starting", "running"):
                raise StockadeError(f"component {name!r} is already {current.status}; stop it first")
            if current is not None and not replace:
                raise StockadeError(
                    f"component {name!r} exists ({current.status}): remove it first (stockade rm {name}), "
                    "or start it with --replace"
                )
            for leftover in ("state.json", "spec.json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, leftover))
            spec = {
                "argv": argv, "policy": policy, "restart": restart, "max_restarts": max_restarts, "stdin": stdin,
                "publish": publish or [],
            }  # fmt: skip
            _write_json(self.path(name, "spec.json"), spec)
            launch = uuid.uuid4().hex
            self.save(ComponentState(name, "starting", launch=launch))
            return launch

    @contextlib.contextmanager
    def _made_and_locked(self, name: str) -> Iterator[None]:
        """The component's directory, made if it is not there, and its lock."""
        for _ in range(3):
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path(name), 0o700)
            try:
                _check_own(self.path(name))  # one another user made there would be theirs to rewrite
            except FileNotFoundError:
                continue  # removed (`rm`) just now: made anew
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(self.locked(name))
                except NoComponent:
                    continue  # removed (`rm`) while this waited for its lock: made anew
                yield
                return
        raise StockadeError(f"component {name!r} was removed while it was being started; try again")

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """The component's lock, held while its state is read and changed by more than one process
        at once (``stop``, ``remove`` and its supervisor's start: none acts on a state another just left)."""
        path = self.path(name, "lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                raise NoComponent(f"no component named {name!r}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A `remove` that held it took the file away with its directory: the lock got now
                # is of no file anyone else will find, so take the one there now (or say it is gone).
                held = os.fstat(fd)
                try:
                    there = os.lstat(path)
                except FileNotFoundError:
                    there = None
                if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                    yield
                    return
            finally:
                os.close(fd)

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
            raise NoComponent(f"no component named {name!r}") from None
        if state.status in ("starting", "running"):
            if state.supervisor_pid is None:
                if time.time() - state.updated_at > SUPERVISOR_START_S:
                    state.status, state.error = "failed", "its supervisor never started"
            elif not _same_process(state.supervisor_pid, state.supervisor_start):
                state.status = "failed"
                state.error = state.error or SUPERVISOR_GONE
        return state

    def remove(self, name: str) -> None:
        """Delete the component's directory (its lock held): moved out of its name first, so that a
        start waiting for the lock finds no directory there (and makes one), never half of this."""
        gone = os.path.join(self.root, f".removed.{check_name(name)}.{os.getpid()}.{time.monotonic_ns()}")
        os.rename(self.path(name), gone)
        shutil.rmtree(gone)


def start(
    name: str,
    argv: list[str],
    policy: dict[str, Any],
    restart: RestartPolicy,
    store: ComponentStore,
    max_restarts: int | None = None,
    stdin: bool = False,
    publish: list[str] | None = None,
    replace: bool = False,
) -> None:
    """Record the component and launch its detached supervisor; returns once it has started (or failed).
    ``replace``: one of that name that has ended is replaced (``ComponentStore.create``).

    ``publish``: ``PORT`` (the same port on the host's loopback), ``HOST_PORT:PORT`` or
    ``ADDRESS:HOST_PORT:PORT``, kept across restarts (docs/processes-and-ports.md)."""
    if not argv:
        raise PolicyError("start: no command given (stockade start --name NAME -- CMD ARGS...)")
    if max_restarts is not None and max_restarts < 0:
        raise PolicyError(f"--max-restarts {max_restarts}: give 0 or more")
    from .policy import Policy

    checked = Policy.build(**policy)  # refuse a bad policy now, not in the background
    fixed = [component_publish(spec) for spec in publish or []]
    if fixed and checked.network_policy != "loopback":
        raise PolicyError("--publish needs --network loopback: the isolate has no loopback otherwise")
    _check_distinct(fixed)
    launch = store.create(name, argv, policy, restart, max_restarts, stdin, fixed, replace)
    from .settings import worker_environment

    # Its own environment, less the daemon's tokens and a session key: it needs none of them.
    env = worker_environment({"STOCKADE_STATE_DIR": os.path.dirname(store.root)})
    # -P: -m would import from the working directory first (one a sandbox may have written). The
    # directory itself stays the caller's: relative settings mean what they meant to the caller.
    subprocess.Popen(
        [sys.executable, "-P", "-m", "stockade.components", name, launch],
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
        # Its first isolate is up (it may already have ended and be restarting), or it ended for
        # good, or its first run failed before its command ran (a port taken) and it is restarting:
        # the caller is told that now, not after 120 s.
        if state.started_at is not None or state.status in ("stopped", "failed") or state.restarts or state.error:
            return
        time.sleep(0.05)
    raise StockadeError(f"component {name!r} did not start within 120 s")


def _check_distinct(fixed: list[str]) -> None:
    """One host port for one published port: a second would fail every run of the component."""
    seen: dict[str, str] = {}
    for spec in fixed:
        address, host_port, port = spec.rsplit(":", 2)
        if host_port == "0":
            continue
        if (twice := seen.get(f"{address}:{host_port}")) is not None:
            raise PolicyError(
                f"--publish: host port {address}:{host_port} is given twice (for ports {twice} and {port})"
            )
        seen[f"{address}:{host_port}"] = port


def stop(name: str, store: ComponentStore, timeout: float = 15.0) -> ComponentState:
    """Stop the component: SIGTERM to its supervisor (which closes the isolate), SIGKILL after ``timeout``."""
    with store.locked(name):
        state = store.state(name)
        pid, started = state.supervisor_pid, state.supervisor_start
        running = state.status in ("starting", "running")
        if running and pid is None:
            # Its supervisor has not said who it is yet: it reads this under the same lock, and ends.
            state.status, state.error, state.exit_code = "stopped", None, None
            store.save(state)
            return state
    if running and pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _same_process(pid, started):
            time.sleep(0.05)
        if _same_process(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # its isolate dies with it
    state = store.state(name)
    if running and (state.status in ("starting", "running") or state.error == SUPERVISOR_GONE):
        # We ended it (a supervisor we killed reads as gone): a stop, not a failure. One that had
        # ended before keeps its account of why.
        state.status, state.error, state.exit_code = "stopped", None, None
        store.save(state)
    return state


def remove(name: str, store: ComponentStore, force: bool = False) -> ComponentState:
    """Delete the component: its state, spec and logs. A running one only with ``force`` (stopped first).
    Checked and deleted under its lock: a start of the name at the same moment is either kept whole
    or removed whole, never left running with its record gone."""
    for _ in range(3):
        with store.locked(name):
            state = store.state(name)
            if state.status not in ("starting", "running"):
                store.remove(name)
                return state
        if not force:
            raise StockadeError(f"component {name!r} is {state.status}: stop it first, or rm --force")
        stop(name, store)
    raise StockadeError(f"component {name!r} was started again while it was being removed; try again")


def read_log(name: str, store: ComponentStore, tail_bytes: int | None = None) -> bytes:
    if not os.path.isdir(store.path(name)):
        raise StockadeError(f"no component named {name!r}")
    chunks = []
    for part in ("log.1", "log"):
        with contextlib.suppress(FileNotFoundError), open(store.path(name, part), "rb") as f:
            chunks.append(f.read())
    return _tail(b"".join(chunks), tail_bytes)


def _tail(data: bytes, tail_bytes: int | None) -> bytes:
    """Its last ``tail_bytes`` (None: all of it; 0: none, for ``logs -f`` of new output only)."""
    if tail_bytes is None:
        return data
    return data[-tail_bytes:] if tail_bytes > 0 else b""


def follow_log(
    name: str,
    store: ComponentStore,
    write: Callable[[bytes], None],
    tail_bytes: int | None = None,
    poll_s: float = 0.2,
) -> None:
    """``logs -f``: what the log holds (its last ``tail_bytes``), then what is appended to it, across
    rotations, until the component is neither starting nor running (or is removed)."""
    path = store.path(name, "log")
    if not os.path.isdir(store.path(name)):
        raise StockadeError(f"no component named {name!r}")
    f = _open_log(path)
    try:
        # Rotated past the old log already: what it held is in log.1, and the rest is in the new one.
        held = b""
        with contextlib.suppress(FileNotFoundError), open(store.path(name, "log.1"), "rb") as old:
            held = old.read()
        held += f.read() if f is not None else b""
        write(_tail(held, tail_bytes))
        ending = False
        while True:
            chunk = f.read(65536) if f is not None else b""
            if chunk:
                write(chunk)
                continue
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (f is None or now.st_ino != os.fstat(f.fileno()).st_ino):
                if f is not None:
                    # Read to its end: the writer had moved on. Once (log.1 is the file read), the
                    # rest is in the new log; more than once (a reader slower than the writer), log.1
                    # is a later file, and what came between them is gone.
                    finished = os.fstat(f.fileno()).st_ino
                    f.close()
                    later = _open_log(store.path(name, "log.1"))
                    f = _open_log(path)  # the newest, opened after log.1: not a file log.1 has become since
                    if later is None:
                        continue
                    with later:
                        after = os.fstat(later.fileno()).st_ino
                        try:  # rotated again between the two opens: the file that was log then is gone
                            still = os.stat(store.path(name, "log.1")).st_ino == after
                        except FileNotFoundError:
                            still = False
                        if after != finished or not still:
                            write(b"\n[stockade] logs -f: output may be missing here: the log rotated more than "
                                  b"once while this was read\n")  # fmt: skip
                        if after != finished:  # a file after the one read: what it holds comes next
                            write(later.read())
                    continue
                f = _open_log(path)
                continue
            if ending or not os.path.isdir(store.path(name)):
                return
            try:
                ending = store.state(name).status not in ("starting", "running")
            except StockadeError:
                ending = True  # removed
            if not ending:
                time.sleep(poll_s)
            # else: one more look for what it wrote last, then stop
    finally:
        if f is not None:
            f.close()


def _open_log(path: str) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _write_json(path: str, value: object) -> None:
    # A fresh name of its own for each write (two writers at once, a link planted there: neither is
    # a file this one opens), renamed over the file: readers never see half of it.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    try:
        with open(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_own(directory: str) -> None:
    """``directory`` is a directory of this user's that no one else may write: its files are
    trusted (what to run, which pid to signal), written and appended to as this user, maybe root."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StockadeError(
            f"{directory} is not a directory of this user's that only it may write (uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}): components keep their state only where no one else can "
            "change it (STOCKADE_STATE_DIR)"
        )


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _same_process(pid: int | None, start_time: str | None) -> bool:
    return pid is not None and start_time is not None and _start_time(pid) == start_time


def component_publish(spec: str) -> str:
    """A component's ``--publish`` with its host side fixed: ``PORT`` is the same port on the host
    (a component's address should not change when it restarts), ``0:PORT`` any free one."""
    from .runtimes.publish import parse_publish

    address, host_port, port = parse_publish(spec)
    if spec.strip().isdigit():
        host_port = port
    return f"{address}:{host_port}:{port}"


if __name__ == "__main__":
    from stockade.components_supervisor import main

    if len(sys.argv) != 3:  # (a start of an older stockade, waiting: its record is not this one's)
        sys.exit("usage: python -m stockade.components NAME LAUNCH (started by `stockade start`)")
    sys.exit(main(sys.argv[1], sys.argv[2]))
