"""Shared fixtures: runtimes built step by step, an outer guard for attack tests.

Every test that needs a host capability skips with the reason the runtime's
own ``detect()`` gives, never silently.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest

from stockade.runtimes.base import Availability
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.process.cgroup_layout import _own_cgroups, detect_layout
from stockade.runtimes.process.cgroups import pid_alive

GUARD_MEMORY = 6 * 1024**3
GUARD_PIDS = 4096


def _own_v1_dir(controller: str) -> str | None:
    path = _own_cgroups().get(controller)
    if path is None:
        return None
    base = f"/sys/fs/cgroup/{controller}{path}"
    return base if os.path.isdir(base) else None


def _pure_v2() -> bool:
    try:
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            return {"memory", "pids"} <= set(f.read().split())
    except OSError:
        return False


def _v2_guard(pid: int) -> Iterator[None]:
    """The guard on a pure cgroup v2 host: limits on a group with two children.

    v2 lets only leaf groups hold processes, so the session runs in
    ``guard/pytest`` and isolates are made in ``guard/isolates`` (through
    STOCKADE_CGROUP_PARENT, which daemons started by tests inherit): both sit
    under the guard's memory.max and pids.max.
    """
    mount = "/sys/fs/cgroup"
    own = _own_cgroups()[""]
    rel = f"/stockade-test-guard-{pid}"
    guard = mount + rel
    os.mkdir(guard)
    try:
        with open(os.path.join(mount, "cgroup.subtree_control"), "w") as f:
            f.write("+memory +pids +cpu")
        with open(os.path.join(guard, "memory.max"), "w") as f:
            f.write(str(GUARD_MEMORY))
        with open(os.path.join(guard, "pids.max"), "w") as f:
            f.write(str(GUARD_PIDS))
        os.mkdir(os.path.join(guard, "pytest"))
        with open(os.path.join(guard, "pytest", "cgroup.procs"), "w") as f:
            f.write(str(pid))
        os.environ["STOCKADE_CGROUP_PARENT"] = rel + "/isolates"
        yield
    finally:
        os.environ.pop("STOCKADE_CGROUP_PARENT", None)
        for home in (mount + own.rstrip("/"), mount):  # own may be outside what this namespace sees
            try:
                with open(home + "/cgroup.procs", "w") as f:
                    f.write(str(pid))
                break
            except OSError:
                continue
        _remove_leftovers(os.path.join(guard, "isolates"))
        for leaf in ("isolates", "pytest", ""):
            try:
                os.rmdir(os.path.join(guard, leaf) if leaf else guard)
            except OSError:
                pass


_GUARD_NAME = re.compile(r"stockade-test-guard-(\d+)$")


def _sweep_dead_guards(parent: str) -> None:
    """Remove the guards of sessions that were killed (a timeout, SIGKILL) before they
    could remove their own: those named after a pid that is gone, innermost groups
    first. A group that still holds a process stays (rmdir refuses it)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        match = _GUARD_NAME.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        groups = [path for path, _, _ in os.walk(os.path.join(parent, name))]
        for group in sorted(groups, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(group)


def _remove_leftovers(where: str) -> None:
    """Isolate groups still under the guard when the session ends: each is a leak
    stockade should not have, so say so (on stderr, not as a failure of the last
    test), then remove it so the guard itself goes too."""
    from stockade.runtimes.process import cgroups

    cgroups.retry_leftovers()
    try:
        names = [n for n in os.listdir(where) if n.startswith("stockade-")]
    except OSError:
        return
    for name in names:
        sys.stderr.write(f"\nstockade tests: cgroup {os.path.join(where, name)} was left behind\n")
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(where, name))


@pytest.fixture(scope="session", autouse=True)
def outer_guard() -> Iterator[None]:
    """Put the whole test session in a memory+pids cgroup of its own.

    Isolates are created below the session's own cgroups, so even if a limit
    of stockade were broken, a fork or memory bomb stops at this guard instead
    of taking the machine down.
    """
    if os.getuid() == 0 and _pure_v2() and not os.environ.get("STOCKADE_CGROUP_PARENT"):
        _sweep_dead_guards("/sys/fs/cgroup")
        yield from _v2_guard(os.getpid())
        return
    made: list[tuple[str, str]] = []
    if os.getuid() == 0:
        for controller, knob, value in (
            ("memory", "memory.limit_in_bytes", GUARD_MEMORY),
            ("pids", "pids.max", GUARD_PIDS),
        ):
            base = _own_v1_dir(controller)
            if base is None:
                continue
            _sweep_dead_guards(base)
            guard = os.path.join(base, f"stockade-test-guard-{os.getpid()}")
            try:
                os.makedirs(guard, exist_ok=True)
                with open(os.path.join(guard, knob), "w") as f:
                    f.write(str(value))
                with open(os.path.join(guard, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                made.append((base, guard))
            except OSError:
                continue
    yield
    for base, guard in made:
        _remove_leftovers(guard)
        try:
            with open(os.path.join(base, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            os.rmdir(guard)
        except OSError:
            pass


@pytest.fixture(autouse=True)
def _cleanup_daemons() -> Iterator[None]:
    """Daemons a test started are killed and their files removed, whatever the test did."""
    from tests import daemon_harness

    yield
    while daemon_harness.STARTED:
        daemon_harness.STARTED.pop().cleanup()


@pytest.fixture(scope="session")
def manager() -> Iterator[RuntimeManager]:
    mgr = RuntimeManager(pool_size=1)
    yield mgr
    mgr.close()


_availability: dict[str, Availability] = {}


def availability(name: str) -> Availability:
    if name not in _availability:
        probe = RuntimeManager(pool_size=0)
        try:
            _availability[name] = probe.availability(name)
        finally:
            probe.close()
    return _availability[name]


def require(name: str) -> None:
    avail = availability(name)
    if not avail.available:
        pytest.skip(f"runtime {name} is not available on this host: {avail.reason}")


@pytest.fixture
def process_runtime(manager: RuntimeManager) -> str:
    require("process")
    return "process"


def cgroup_layout_version() -> str:
    return detect_layout().version


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP server on the host's loopback that nothing in a sandbox may reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join()
    srv.close()
    assert hits == [], "a sandbox reached the host's loopback server"


@pytest.fixture(scope="session")
def store() -> Iterator[str]:
    """A Python environment store of the session's own (``STOCKADE_ENV_STORE``), removed at its end."""
    from stockade import environment_build

    path = tempfile.mkdtemp(prefix="stockade-envs-")
    os.chmod(path, 0o755)  # every sandbox uid reads it (as root, each isolate has a uid of its own)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STOCKADE_ENV_STORE", path)
        yield path
    environment_build.remove_tree(path)


@pytest.fixture(scope="session")
def ds(store: str) -> str:
    """An environment with pandas and matplotlib (from the host's package index), built once a session."""
    from stockade import environments

    return environments.build(["pandas", "matplotlib"], name="ds")
