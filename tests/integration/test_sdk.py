"""The SDK's one-shot calls: a fresh isolate each time, from the warm pool, nothing carried over."""

from __future__ import annotations

import glob
import os
import random
import select
import subprocess
import sys
import tempfile
import time

import pytest

import stockade
from stockade import Policy, Sandbox
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require


@pytest.fixture
def pooled(process_runtime: str) -> RuntimeManager:
    return RuntimeManager(pool_size=2)


def test_one_shots_share_nothing(pooled: RuntimeManager) -> None:
    token = str(random.randrange(10**9))
    try:
        first = stockade.run_code(
            f"import os, subprocess\nopen('/tmp/left', 'w').write('{token}')\n"
            "subprocess.Popen(['sleep', '30'])\nimport builtins; builtins.LEFT = 1\nprint(os.getpid())",
            manager=pooled,
        )
        assert first.success
        second = stockade.run_code(
            "import os, builtins\nprint(os.path.exists('/tmp/left'), hasattr(builtins, 'LEFT'),"
            " sorted(p for p in os.listdir('/proc') if p.isdigit()))",
            manager=pooled,
        )
        exists, leftover_attr, *_ = second.stdout.split()
        assert exists == "False" and leftover_attr == "False"
        assert "sleep" not in stockade.run(["ps", "-e"], manager=pooled).stdout
    finally:
        pooled.close()


def test_pool_serves_warm_isolates_and_stays_bounded(pooled: RuntimeManager) -> None:
    try:
        runtime = pooled.get("process")
        stockade.warm_up(manager=pooled)
        assert runtime.wait_ready(20)  # type: ignore[attr-defined]
        results = [stockade.run_code("print('x')", manager=pooled) for _ in range(5)]
        assert all(r.stdout == "x\n" for r in results)
        assert len({r.execution_id for r in results}) == 5
        runtime.wait_idle()  # type: ignore[attr-defined]
        runtime.wait_ready(20)  # type: ignore[attr-defined]
        assert len(runtime._pool.ready()) == 2  # type: ignore[attr-defined]
    finally:
        pooled.close()


def test_a_warm_isolate_gets_the_callers_memory_limit_at_hand_over(pooled: RuntimeManager) -> None:
    try:
        runtime = pooled.get("process")
        stockade.warm_up(manager=pooled)
        assert runtime.wait_ready(20)  # type: ignore[attr-defined]
        # Built with the default policy's 512 MB; the caller's 32 MB is written when it is handed over.
        r = stockade.run_code("x = bytearray(100 << 20)", manager=pooled, memory_mb=32)
        unenforced = [u for u in r.unenforced_limits if "memory_mb" in u]
        if unenforced:
            pytest.skip(f"this host cannot enforce memory_mb: {'; '.join(unenforced)}")
        assert r.termination_reason == "memory_limit", r.summary()
    finally:
        pooled.close()


def test_policy_shapes_outside_the_pool_get_a_cold_isolate(pooled: RuntimeManager) -> None:
    try:
        r = stockade.run(["cat", "/proc/net/dev"], manager=pooled, network_policy="loopback")
        assert r.success
        assert r.cold_start_time_ms > 0
    finally:
        pooled.close()


def test_a_shape_asked_for_twice_joins_the_pool(pooled: RuntimeManager) -> None:
    loopback = Policy(network_policy="loopback", timeout_seconds=5)
    try:
        runtime = pooled.get("process")
        pool = runtime._pool  # type: ignore[attr-defined]
        for _ in range(2):  # the first miss is only counted: one-off shapes cost nothing
            assert stockade.run(["true"], loopback, manager=pooled).success
        assert pool.shapes()[-1] == pool._shape(loopback)
        runtime.wait_idle()  # type: ignore[attr-defined]
        assert runtime.wait_ready(20)  # type: ignore[attr-defined]
        ready = pool.ready(loopback)
        assert len(ready) == 2
        sandbox = runtime.acquire(loopback.replace(memory_mb=64))  # type: ignore[attr-defined]
        try:
            assert sandbox in ready  # served warm, with the caller's own limits applied
            assert sandbox.policy.memory_mb == 64
            r = sandbox.run_code(
                "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
                "socket.create_connection(s.getsockname(), timeout=5); print('loopback up')"
            )
            assert r.stdout == "loopback up\n", r.stderr
        finally:
            runtime.dispose(sandbox)  # type: ignore[attr-defined]
    finally:
        pooled.close()


def test_the_pool_keeps_at_most_its_number_of_shapes(process_runtime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_POOL_SHAPES", "2")
    mgr = RuntimeManager(pool_size=1)
    try:
        pool = mgr.get("process")._pool  # type: ignore[attr-defined]
        loopback, bigger_disk = Policy(network_policy="loopback"), Policy(disk_mb=32)
        for policy in (loopback, loopback, bigger_disk, bigger_disk):
            assert stockade.run(["true"], policy, manager=mgr).success
        # The default shape always stays; the newer shape pushed the older one out.
        assert pool.shapes() == [pool.default_shape, pool._shape(bigger_disk)]
    finally:
        mgr.close()


def test_a_malformed_pool_shapes_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade.runtimes.pool import pool_shapes_setting

    for bad in ("many", "0"):
        monkeypatch.setenv("STOCKADE_POOL_SHAPES", bad)
        with pytest.raises(stockade.ConfigError, match="STOCKADE_POOL_SHAPES"):
            pool_shapes_setting()


def test_policy_object_and_fields_mix(pooled: RuntimeManager) -> None:
    try:
        base = Policy(timeout_seconds=5, environment={"X": "1"})
        r = stockade.run(["sh", "-c", "echo $X"], base, manager=pooled, memory_mb=64)
        assert r.stdout == "1\n"
        assert r.policy_digest == base.replace(memory_mb=64).digest
    finally:
        pooled.close()


def test_runtime_selection_never_downgrades(process_runtime: str) -> None:
    pooled = RuntimeManager(pool_size=0)  # no background boots of gVisor sandboxes or microVMs
    try:
        for isolation in ("gvisor", "microvm"):
            if pooled.cached_availability(isolation).available:
                assert stockade.run(["true"], manager=pooled, isolation=isolation).runtime_used == isolation
            else:
                with pytest.raises(stockade.RuntimeUnavailableError, match=isolation):
                    stockade.run(["true"], manager=pooled, isolation=isolation)
        assert stockade.run(["true"], manager=pooled, isolation="process").runtime_used == "process"
    finally:
        pooled.close()


def test_close_tears_the_pool_down(process_runtime: str) -> None:
    mgr = RuntimeManager(pool_size=2)
    runtime = mgr.get("process")
    stockade.warm_up(manager=mgr)
    runtime.wait_ready(20)  # type: ignore[attr-defined]
    pool = runtime._pool.ready()  # type: ignore[attr-defined]
    mgr.close()
    deadline = time.monotonic() + 5
    while any(sb.cgroup and sb.cgroup.pids() for sb in pool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(sb.closed for sb in pool)


FORGETFUL = """
import sys
from stockade import Policy, Sandbox
from stockade.runtimes.manager import RuntimeManager
manager = RuntimeManager(pool_size=1)  # never closed
sandbox = Sandbox(Policy(runtime=sys.argv[1]), manager=manager)  # never closed either
assert sandbox.exec(["true"]).success
print("ran")
"""


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_a_process_that_forgets_its_sandbox_and_pool_leaves_nothing_when_it_exits(runtime: str) -> None:
    # Its isolates (the sandbox, and the pool's, which a filler thread builds) end with it.
    require(runtime)
    child = subprocess.Popen([sys.executable, "-c", FORGETFUL, runtime], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and out == b"ran\n", err.decode(errors="replace")
    mine = f"stockade-{child.pid}-*"
    groups = [g for depth in ("*", "*/*", "*/*/*", "*/*/*/*") for g in glob.glob(f"/sys/fs/cgroup/{depth}/{mine}")]
    assert groups == []
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"stockade-gvisor-{child.pid}-*")) == []


FORKING = """
import os, sys
from stockade import Policy, Sandbox
from stockade.runtimes.manager import RuntimeManager
manager = RuntimeManager(pool_size=0)
sandbox = Sandbox(Policy(runtime=sys.argv[1]), manager=manager)
child = os.fork()
if child == 0:
    sys.exit(0)  # a forked child that ends normally: its exit hooks run
os.waitpid(child, 0)
print(sandbox.exec(["echo", "alive"]).stdout, end="")
sandbox.close()
manager.close()
"""


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_a_forked_child_that_exits_leaves_its_parents_sandbox_alone(runtime: str) -> None:
    # Its exit collects its copy of the parent's handle: that must not close the parent's sandbox.
    require(runtime)
    parent = subprocess.run([sys.executable, "-c", FORKING, runtime], capture_output=True, timeout=120, check=False)
    assert parent.returncode == 0 and parent.stdout == b"alive\n", parent.stderr.decode(errors="replace")


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_a_sandbox_its_owner_drops_is_collected_and_closed(runtime: str, manager: RuntimeManager) -> None:
    # Nothing of stockade's may keep a dropped sandbox alive (the seccomp supervisor held one
    # through its violation callback): a long-running agent server would leak isolates.
    import gc
    import weakref

    require(runtime)
    sb = stockade.Sandbox(runtime=runtime, manager=manager)
    assert sb.exec(["true"]).success
    inner = sb._sandbox
    pid = inner.isolate_pid()
    # Held by pidfd: a number freed may be a later process's by the time it is looked up.
    pidfd = os.pidfd_open(pid) if pid is not None else None
    dropped = weakref.ref(inner)
    del sb, inner
    gc.collect()
    assert dropped() is None
    if pidfd is not None:
        try:
            ended, _, _ = select.select([pidfd], [], [], 30)
            assert ended, "its isolate did not end with it"
        finally:
            os.close(pidfd)


def test_what_no_program_path_or_environment_can_hold_is_refused_by_name_before_it_is_sent(
    process_runtime: str,
) -> None:
    # In-process, each reached the agent and came back as "AgentError: ValueError: embedded null
    # byte" (a daemon answered each by name): a NUL in an argument, a path, an environment entry;
    # a mode out of a permission's range read "mode must be an integer permission".
    from stockade.errors import InvalidRequestError

    with Sandbox() as sb:
        cases = [
            (lambda: sb.exec(["echo", "a\0"]), r"argv\[1\] holds a NUL byte"),
            (lambda: sb.exec(["true"], cwd="/\0"), "cwd holds a NUL byte"),
            (lambda: sb.exec(["true"], env={"A": "\0"}), "'A' has a NUL byte in its value"),
            (lambda: sb.exec(["true"], env={"A=B": "1"}), "'A=B' has an invalid name"),
            (lambda: sb.write_file("/work/a\0b", b"x"), "path holds a NUL byte"),
            (lambda: sb.read_file("/a\0"), "path holds a NUL byte"),
            (lambda: sb.write_file("/work/m", b"x", mode=0o77777), "is no file permission"),
            (lambda: sb.write_file("/work/m", b"x", mode=0o4755), "set-user-ID or set-group-ID"),
        ]
        for call, said in cases:
            with pytest.raises(InvalidRequestError, match=said):
                call()
        assert sb.exec(["echo", "still here"]).stdout == "still here\n"


def test_arguments_of_the_wrong_kind_are_refused_by_name_before_anything_runs(process_runtime: str) -> None:
    # Each failed later and elsewhere: 'str' object has no attribute 'select'; unsupported operand
    # type(s) for +: 'float' and 'str'; 'int' object is not callable (after an isolate was taken);
    # an interpreter named 5 at its first cell; a text stdin with a lone surrogate, a bare
    # UnicodeEncodeError (the daemon's client sent its UTF-8 form).
    from stockade.errors import InvalidRequestError

    with pytest.raises(TypeError, match="manager must be a RuntimeManager, not str"):
        Sandbox(manager="x")  # type: ignore[arg-type]
    with Sandbox() as sb:
        with pytest.raises(InvalidRequestError, match="session must be a name of 1 to 64 printable characters"):
            sb.interpreter(5)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="session must be a name"):
            sb.interpreter("")
        with pytest.raises(TypeError, match="on_output must be a callable"):
            sb.exec(["true"], on_output=5)  # type: ignore[arg-type]
        sleeper = sb.spawn(["sleep", "5"])
        with pytest.raises(TypeError, match="timeout must be a number of seconds, not str"):
            sleeper.wait("1")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="give seconds, 0 or more"):
            sleeper.wait(-1)
        assert sleeper.wait(0) is None  # asked once, without waiting
        sleeper.kill()
        assert sb.exec(["cat"], stdin="\ud800").stdout_bytes == "\ud800".encode("utf-8", "surrogatepass")
