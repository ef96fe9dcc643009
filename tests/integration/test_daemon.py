"""The daemon end to end: a real `stockade serve` on a temporary socket, real clients."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.client import Client, DaemonBusyError, NotFoundError, call_with_retry
from stockade.errors import DaemonUnavailableError, InvalidRequestError, PolicyError, SandboxError, StockadeError
from stockade.limits import MAX_CALL_BYTES
from stockade.result import ExecResult
from stockade.rpc.connection import LINES_UNDER_WAY_PER_UID
from stockade.runtimes.gvisor import BUNDLE_PREFIX
from stockade.runtimes.microvm.runtime import RUN_PREFIX
from tests.daemon_harness import Daemon, execute_in_background, raw_exchange, running_execution, start_daemon
from tests.helpers import processes_with_arg


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon()
    yield d
    assert d.stop() == 0, d.logs()


def test_seed_health_check_verbatim(daemon: Daemon) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (make deps installs it)")
    # The seed's line, but for socat's -t: by default it gives the answer 0.5 s after its input's
    # end, and a daemon on a loaded host may take longer (the daemon closes once it has answered).
    out = subprocess.run(
        f'echo \'{{"method": "ping", "params": {{}}, "id": 1}}\' | socat -t 60 - UNIX-CONNECT:{daemon.socket_path}',
        shell=True,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.stdout == '{"result": "pong", "error": null, "id": 1}\n'


def test_selftest_runs_a_real_confined_sandbox(daemon: Daemon) -> None:
    result = Client(daemon.socket_path).selftest()
    assert result["ok"] is True and result["verified"] is True
    assert result["runtime"] == "process" and len(result["policy_digest"]) == 64
    assert result["message"].startswith("Self-test passed")


def test_execute_command_and_code(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        r = c.execute(["sh", "-c", "cat; echo $X"], policy={"environment": {"X": "1"}}, stdin="in\n")
        assert r.stdout == "in\n1\n" and r.runtime_used == "process"
        r = c.execute(code="import ctypes; ctypes.CDLL(None).ptrace(16, 1, 0, 0)")
        assert [v.syscall for v in r.security_violations] == ["ptrace"]
        with pytest.raises(PolicyError, match="memory_mb"):
            c.execute(["true"], policy={"memory_mb": 10**6})


def test_the_client_takes_timeout_and_policy_fields_as_the_sdk_does(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        slow = c.execute(["sleep", "30"], timeout=1)  # the one-shot's timeout_seconds, as stockade.run's
        assert slow.termination_reason == "timeout" and slow.error == "timed out after 1 s"
        assert c.execute(code="print(1)", memory_mb=64, network_policy="none").stdout == "1\n"
        with pytest.raises(TypeError, match=r"Client.execute\(\) got .* 'memroy' \(did you mean 'memory_mb'\?\)"):
            c.execute(code="1", memroy=64)
        with c.sandbox(timeout=7, memory_mb=128) as sb:
            with pytest.raises(PolicyError, match="timeout_seconds=7"):
                sb.exec(["true"], timeout=8)
            assert sb.exec(["true"], timeout=7).success


def test_sandbox_lifecycle_and_ownership(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        sid = c.create_sandbox({"memory_mb": 128})
        c.sandbox_write_file(sid, "/work/f.txt", b"kept")
        assert c.sandbox_exec(sid, ["cat", "/work/f.txt"]).stdout == "kept"
        assert c.sandbox_run_code(sid, "print(open('/work/f.txt').read())").stdout == "kept\n"
        assert c.sandbox_read_file(sid, "/work/f.txt") == b"kept"
        assert [s["sandbox_id"] for s in c.status()["active_sandboxes"]] == [sid]
        c.close_sandbox(sid)
        with pytest.raises(NotFoundError):
            c.sandbox_exec(sid, ["true"])
        assert c.status()["total_count"] == 0


def test_a_sandbox_handle_takes_every_call_and_closes_on_exit(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        with c.sandbox({"memory_mb": 128}, idle_timeout=60) as sb:
            sb.write_file("/work/f.txt", "kept")
            assert sb.read_file("/work/f.txt") == b"kept"
            (entry,) = [e for e in sb.list_dir("/work") if e["name"] == "f.txt"]
            assert entry["size"] == 4 and entry["type"] == "file", entry
            made = sb.exec(["sh", "-c", "mkdir /work/d && ln -s f.txt /work/l && mkfifo /work/p"])
            assert made.success, made.summary()
            kinds = {e["name"]: e["type"] for e in sb.list_dir("/work")}
            assert kinds == {"f.txt": "file", "d": "dir", "l": "symlink", "p": "other"}  # a FIFO is no file
            assert sb.exec(["wc", "-c"], stdin=b"\x00\xffx").stdout.strip() == "3"  # bytes in, unchanged
            r = sb.exec(["sh", "-c", "echo $X; pwd"], env={"X": "y"}, cwd="/work")
            assert r.stdout == "y\n/work\n", r.summary()
            chunks: list[tuple[str, bytes]] = []
            r = sb.run_code(
                "import sys; print(sys.stdin.read()[::-1])", stdin="abc", on_output=lambda s, d: chunks.append((s, d))
            )
            assert r.stdout == "cba\n" and b"".join(d for s, d in chunks if s == "stdout") == b"cba\n"
            assert sb.exec(["sleep", "5"], timeout=0.5).termination_reason == "timeout"
            (entry,) = c.status()["active_sandboxes"]
            assert entry["sandbox_id"] == sb.sandbox_id
        assert sb.closed and c.status()["total_count"] == 0
        sb.close()  # again: nothing to do
        # A handle whose sandbox the daemon closed already (here: idle) closes without an error.
        gone = c.sandbox(idle_timeout=0.5)
        deadline = time.monotonic() + 10
        while c.status()["total_count"] and time.monotonic() < deadline:
            time.sleep(0.05)
        gone.close()
        assert gone.closed and c.status()["total_count"] == 0


def test_write_file_takes_7_mib_and_the_daemon_refuses_a_byte_more(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c, c.sandbox() as sb:
        sb.write_file("/work/seven", b"7" * MAX_CALL_BYTES)
        assert len(sb.read_file("/work/seven")) == MAX_CALL_BYTES == 7 * 1024 * 1024
        # The client refuses it before sending; sent anyway (a client of another make),
        # the daemon refuses it too, and the sandbox stays usable.
        data = base64.b64encode(b"7" * (MAX_CALL_BYTES + 1)).decode()
        with pytest.raises(StockadeError, match=f"too large: {MAX_CALL_BYTES + 1} bytes.* {MAX_CALL_BYTES} "):
            c.call("sandbox.write_file", {"sandbox_id": sb.sandbox_id, "path": "/work/more", "data": data})
        assert "more" not in [e["name"] for e in sb.list_dir("/work")]
        assert sb.exec(["wc", "-c", "/work/seven"]).stdout.split()[0] == str(MAX_CALL_BYTES)


def test_stdin_and_code_take_7_mib_and_the_daemon_refuses_a_byte_more(daemon: Daemon) -> None:
    over = MAX_CALL_BYTES + 1
    big = base64.b64encode(b"7" * over).decode()

    def refused(field: str) -> str:
        return f"{field} is too large: {over} bytes, and a call takes at most {MAX_CALL_BYTES} "

    with Client(daemon.socket_path) as c, c.sandbox() as sb:
        assert c.execute(["wc", "-c"], stdin=b"7" * MAX_CALL_BYTES).stdout.strip() == str(MAX_CALL_BYTES)
        head = "print('seven')\n#"
        assert sb.run_code(head + "7" * (MAX_CALL_BYTES - len(head))).stdout == "seven\n"
        # The client refuses a byte more before sending it ...
        for call in (
            lambda: c.execute(["wc", "-c"], stdin=b"7" * over),
            lambda: sb.exec(["wc", "-c"], stdin="7" * over),
        ):
            with pytest.raises(SandboxError, match=refused("stdin")):
                call()
        with pytest.raises(SandboxError, match=refused("code")):
            sb.run_code("#" * over)
        # ... and, sent anyway (a client of another make), so does the daemon: a one-shot
        # before it takes a slot, a held sandbox before its agent sees it.
        for method, params, field in (
            ("execute", {"command": ["wc", "-c"], "stdin_b64": big}, "stdin"),
            ("execute", {"code": "#" * over}, "code"),
            ("sandbox.exec", {"sandbox_id": sb.sandbox_id, "command": ["wc", "-c"], "stdin": "7" * over}, "stdin"),
            ("sandbox.run_code", {"sandbox_id": sb.sandbox_id, "code": "#" * over}, "code"),
        ):
            with pytest.raises(SandboxError, match=refused(field)):
                c.call(method, params)
        assert sb.exec(["echo", "still here"]).stdout == "still here\n"
        assert [s["sandbox_id"] for s in c.status()["active_sandboxes"]] == [sb.sandbox_id]


def test_a_running_execute_is_cancelled_from_another_connection(daemon: Daemon) -> None:
    marker = "4245.875"
    runner, results = execute_in_background(daemon.socket_path, ["sh", "-c", f"sleep {marker}"])
    execution_id = running_execution(daemon.socket_path, ready=lambda: bool(processes_with_arg(marker)))
    with Client(daemon.socket_path) as c:
        c.cancel_execution(execution_id)
        runner.join(30)
        (r,) = results
        assert r.termination_reason == "killed" and not r.success, r.summary()
        assert r.error == f"cancelled by uid {os.getuid()} (execute.cancel)"
        assert r.execution_id == execution_id
        # Killed, though not necessarily reaped by the time the answer is read.
        deadline = time.monotonic() + 10
        while processes_with_arg(marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes_with_arg(marker) == []
        with pytest.raises(NotFoundError, match="no running execution"):
            c.cancel_execution(r.execution_id)  # over: nothing to cancel
        with pytest.raises(InvalidRequestError, match="execution_id: Input should be a valid string"):
            c.call("execute.cancel", {"execution_id": 7})
        assert c.status()["total_count"] == 0


def test_an_execute_cancelled_while_its_isolate_starts_is_answered_cancelled(process_runtime: str) -> None:
    import asyncio

    from stockade.daemon.config import DaemonConfig
    from stockade.daemon.controller import Controller
    from stockade.errors import RunCancelledError
    from stockade.protocol.models import CancelRequest, ExecuteRequest, unix_caller

    async def scenario() -> None:
        controller = Controller(DaemonConfig(pool_size=0))  # no warm isolate: each run starts one in a thread
        told: list[tuple[str, str | None]] = []

        class Listener:  # the audit log's and the metrics' view: the run is told, as ended by its caller
            def execution(self, caller: object, agent_id: object, result: Any, held: bool, first: bool) -> None:
                told.append((result.termination_reason, result.error))

        controller.listeners.append(Listener())  # type: ignore[arg-type]
        try:
            task = asyncio.create_task(controller.execute(ExecuteRequest(command=["true"]), unix_caller(0)))
            for _ in range(1000):  # a few loop turns: the run is counted in before its isolate starts
                if controller.running or task.done():
                    break
                await asyncio.sleep(0)
            (running,) = controller.running.values()
            assert running.sandbox is None, "the isolate was expected to be still starting"
            controller.cancel(CancelRequest(execution_id=running.execution_id), unix_caller(0))
            with pytest.raises(RunCancelledError, match=r"cancelled by uid 0 \(execute.cancel\) before it started"):
                await task
            assert controller.running == {}
            for _ in range(200):
                if told:
                    break
                await asyncio.sleep(0.05)
            assert told == [("killed", "cancelled by uid 0 (execute.cancel) before it started")], told
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("method", "params", "named"),
    [
        ("sandbox.run_code", {"code": "pass", "timeout": "\u0000"}, "timeout: Input should be a valid number"),
        ("sandbox.exec", {"command": ["true"], "timeout": -1}, "timeout: Input should be greater than 0"),
        ("sandbox.exec", {"command": ["true"], "timeout": True}, "timeout: Input should be a valid number"),
        ("sandbox.exec", {"command": ["true"], "cwd": 5}, "cwd: Input should be a valid string"),
        ("sandbox.run_code", {"code": "pass", "language": ["python"]}, "language: Input should be 'python' or 'bash'"),
        ("execute", {"code": "pass", "language": 3}, "language: Input should be 'python' or 'bash'"),
    ],
)
def test_a_badly_typed_run_argument_is_named(
    daemon: Daemon, method: str, params: dict[str, object], named: str
) -> None:
    # Found by the fuzzer: a string timeout reached the run and came back as an internal error.
    with Client(daemon.socket_path) as c:
        sid = c.create_sandbox()
        with pytest.raises(StockadeError, match=named) as caught:
            c.call(method, {"sandbox_id": sid, **params})
        assert "Internal error" not in str(caught.value)
        assert c.sandbox_exec(sid, ["echo", "still fine"]).stdout == "still fine\n"


def test_closing_a_held_sandbox_ends_its_call_in_progress_at_once(daemon: Daemon) -> None:
    marker = "4246.125"
    with Client(daemon.socket_path) as owner:
        sid = owner.create_sandbox(keep=True)
        results: list[ExecResult] = []
        caller = threading.Thread(
            target=lambda: results.append(Client(daemon.socket_path).sandbox_exec(sid, ["sleep", marker]))
        )
        caller.start()
        deadline = time.monotonic() + 10
        while not processes_with_arg(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert processes_with_arg(marker), "the call never started"
        owner.close_sandbox(sid)
        caller.join(10)  # the call's own timeout is 30 s: it must not be waited out
        assert not caller.is_alive(), "the call went on after its sandbox was closed"
        (r,) = results
        assert r.termination_reason == "killed", r.summary()
        assert r.error == f"the sandbox was closed by uid {os.getuid()} (sandbox.close) during this call"
        deadline = time.monotonic() + 30  # killed, though not necessarily reaped when the answer is read
        while processes_with_arg(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with_arg(marker) == [] and owner.status()["total_count"] == 0


def test_a_call_on_a_connection_owned_sandbox_is_let_finish_when_its_client_goes(daemon: Daemon) -> None:
    # The sandbox closes with its connection, but not under the call still running in it.
    marker, gate = "4246.375", "4246.625"  # the call ends itself once the test ends its `sleep gate`
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(daemon.socket_path)
        s.sendall(b'{"method": "sandbox.create", "params": {}, "id": 1}\n')
        sid = json.loads(s.makefile("rb").readline())["result"]["sandbox_id"]
        command = ["sh", "-c", f"sleep {marker} & sleep {gate}; kill %1"]
        request = {"method": "sandbox.exec", "params": {"sandbox_id": sid, "command": command}, "id": 2}
        s.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + 10
        while not processes_with_arg(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert processes_with_arg(marker), "the call never started"
    # The client is gone; its call runs on (the sandbox is already being closed), then all of it goes.
    with Client(daemon.socket_path) as watcher:
        deadline = time.monotonic() + 30
        while True:  # the daemon sees the connection's end when it can
            (entry,) = watcher.status()["active_sandboxes"]  # still holding its slot, and saying why
            if entry["closing"] is True or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert entry["sandbox_id"] == sid and entry["closing"] is True
    assert processes_with_arg(marker), "the call was cut short when its client went"
    for pid in processes_with_arg(gate):  # the call's end, now: its shell kills its own sleep, then exits
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[:2] == [b"sleep", gate.encode()]:
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while processes_with_arg(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with_arg(marker) == [], "the sandbox outlived its connection and its call"
    with Client(daemon.socket_path) as watcher:
        with pytest.raises(NotFoundError):
            watcher.sandbox_exec(sid, ["true"])
        # Its slot is free once its close is done (the processes went first).
        deadline = time.monotonic() + 30
        while watcher.status()["total_count"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.status()["total_count"] == 0
    # Let finish, it is logged once, as it ended (not as a hang-up too); the watcher's probe is its own line.
    calls = [line for line in daemon.logs().splitlines() if " sandbox.exec " in line and " not_found " not in line]
    assert len(calls) == 1 and " sandbox.exec ok " in calls[0], daemon.logs()


def test_runtimes_asked_for_at_once_are_checked_once(daemon: Daemon) -> None:
    # Each check starts a real sandbox of every runtime (a VM boot for microVM), outside
    # the slots: clients asking over and over must not make the daemon start them over and over.
    answers: list[list[dict[str, object]]] = []
    askers = [threading.Thread(target=lambda: answers.append(Client(daemon.socket_path).runtimes())) for _ in range(5)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(120)
    answers.append(Client(daemon.socket_path).runtimes())
    assert len(answers) == 6 and all(a == answers[0] for a in answers)
    assert any(r["name"] == "process" and r["available"] for r in answers[0])
    deadline = time.monotonic() + 5  # log lines trail their answers by a few ms
    while "checked the runtimes" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.logs().count("checked the runtimes") == 1, daemon.logs()


def test_status_and_result_carry_the_same_execution_id(daemon: Daemon) -> None:
    """A run seen in ``status`` can be matched with its result and the daemon's log line."""
    runner, results = execute_in_background(daemon.socket_path, code="import time; time.sleep(1.5)")
    execution_id = running_execution(daemon.socket_path)
    runner.join(30)
    (result,) = results
    assert isinstance(result, ExecResult) and result.success
    assert result.execution_id == execution_id
    logged = f"execute ok execution={result.execution_id} "
    deadline = time.monotonic() + 5  # the line is logged once the answer is out, so it may trail it
    while logged not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert logged in daemon.logs()


def test_connection_owned_sandboxes_close_with_the_connection(daemon: Daemon) -> None:
    owner = Client(daemon.socket_path)
    owner.create_sandbox()
    kept = owner.create_sandbox(keep=True)
    owner.close()
    watcher = Client(daemon.socket_path)
    deadline = time.monotonic() + 5
    while watcher.status()["total_count"] != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [s["sandbox_id"] for s in watcher.status()["active_sandboxes"]] == [kept]
    watcher.close_sandbox(kept)


def test_an_idle_held_sandbox_is_closed_and_a_late_call_says_why(process_runtime: str) -> None:
    # One slot, no queue: a forgotten kept sandbox would hold the daemon's only
    # slot for good; closed for idleness, it frees it, and leaves nothing running.
    d = start_daemon(
        {"STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_LIMIT": "0", "STOCKADE_SANDBOX_IDLE_TIMEOUT": "60"}
    )
    marker = "4244.625"
    try:
        with Client(d.socket_path) as c:
            # 3 s: each step below comes well within it after the last, on a loaded host too.
            sid = c.create_sandbox(keep=True, idle_timeout=3.0)
            (entry,) = c.status()["active_sandboxes"]
            assert entry["sandbox_id"] == sid and entry["idle_timeout"] == 3.0
            # A call that outlasts the timeout is not cut short: idleness counts between calls.
            r = c.sandbox_exec(sid, ["sh", "-c", f"sleep {marker} & sleep 4; echo done"])
            assert r.stdout == "done\n", r.summary()
            assert processes_with_arg(marker), "the sandbox's background process should run while it is held"
            assert c.sandbox_exec(sid, ["true"]).success  # the clock starts again after each call
            with pytest.raises(DaemonBusyError):
                c.execute(["true"])  # the held sandbox has the only slot
            deadline = time.monotonic() + 30
            while c.status()["total_count"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.status()["total_count"] == 0, "the idle sandbox was not closed"
            with pytest.raises(
                NotFoundError,
                match=r"closed after 3 s without a call or a connection to a published port \(idle_timeout\)",
            ):
                c.sandbox_exec(sid, ["true"])
            assert processes_with_arg(marker) == [], "the closed sandbox's process ran on"
            assert c.execute(["true"]).success  # its slot is free again
        assert f"closing sandbox {sid}" in d.logs()
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("value", [0, -1, "soon", True, float("nan"), 601])
def test_a_bad_idle_timeout_is_refused_before_anything_starts(daemon: Daemon, value: object) -> None:
    with Client(daemon.socket_path) as c:
        with pytest.raises(StockadeError, match="idle_timeout"):
            c.call("sandbox.create", {"idle_timeout": value})
        assert c.status()["total_count"] == 0


def test_malformed_and_oversized_input_keep_the_connection(process_runtime: str) -> None:
    d = start_daemon({"STOCKADE_MAX_REQUEST_BYTES": "4096"})
    try:
        ping = b'{"method": "ping", "params": {}, "id": 9}\n'
        replies = raw_exchange(
            d.socket_path,
            b"{not json\n",
            b"[1, 2]\n",
            b'{"method": "nope", "id": 3}\n',
            b'{"method": "ping", "params": [], "id": 4}\n',
            b'{"method": "execute", "params": {"command": "ls"}, "id": 5}\n',
            b"x" * 20000 + b"\n",
            ping,
        )
        errors = [json.loads(r)["error"] for r in replies[:-1]]
        assert errors[0] == "Invalid JSON"
        assert errors[1].startswith("Invalid request")
        assert errors[2] == "Method not found: nope"
        assert errors[3].startswith("Invalid request")
        assert "command" in errors[4]
        assert errors[5].startswith("Request too large")
        assert json.loads(replies[-1]) == {"result": "pong", "error": None, "id": 9}
        # An oversized last line that ends the connection without its newline is answered too.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(d.socket_path)
            s.sendall(b"y" * 20000)
            s.shutdown(socket.SHUT_WR)
            tail = s.makefile("rb").read().splitlines()
        assert [json.loads(x)["error"] for x in tail] == ["Request too large: over 4096 bytes"]
    finally:
        assert d.stop() == 0


def test_pipelined_requests_are_answered_in_order(daemon: Daemon) -> None:
    # Sent in one write: each waits for the one before it, whether that one is
    # answered at once (ping), by the agent's callback (a warm execute) or by a task.
    lines = [
        {"method": "ping", "params": {}, "id": 1},
        {"method": "execute", "params": {"command": ["sh", "-c", "sleep 0.2; echo two"]}, "id": 2},
        {"method": "status", "params": {}, "id": 3},
        {"method": "runtimes", "params": {}, "id": 4},
        {"method": "execute", "params": {"code": "print(5)"}, "id": 5},
        {"method": "ping", "params": {}, "id": 6},
    ]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(daemon.socket_path)
        s.sendall(b"".join(json.dumps(x).encode() + b"\n" for x in lines) + b"{broken\n")
        s.shutdown(socket.SHUT_WR)  # the answers still come, then the daemon closes
        answers = [json.loads(x) for x in s.makefile("rb").read().splitlines()]
    assert [a["id"] for a in answers] == [1, 2, 3, 4, 5, 6, None]
    assert answers[1]["result"]["stdout"] == "two\n" and answers[4]["result"]["stdout"] == "5\n"
    assert answers[2]["result"]["total_count"] == 0, "status was answered before the execute ahead of it ended"
    assert answers[6]["error"] == "Invalid JSON"


def test_a_read_of_many_pipelined_requests_is_answered_whole_in_order(daemon: Daemon) -> None:
    # One read of tiny requests is split into frames only as far as the connection's queue has room
    # (it was all at once: 87,000 objects a read); the rest wait in the framer, reading paused,
    # behind a run that takes its time, and all are answered, the last one's even after the
    # end of file (rate-limited ones too: every line gets its answer).
    count = 3000
    lines = [{"method": "execute", "params": {"command": ["sh", "-c", "sleep 0.3"]}, "id": 0}]
    lines += [{"method": "ping", "params": {}, "id": n} for n in range(1, count + 1)]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(daemon.socket_path)
        s.sendall(b"".join(json.dumps(x).encode() + b"\n" for x in lines)[:-1])  # the last without its newline
        s.shutdown(socket.SHUT_WR)
        answers = [json.loads(x) for x in s.makefile("rb").read().splitlines()]
    assert [a["id"] for a in answers[:1]] == [0] and answers[0]["result"]["exit_code"] == 0
    answered = [a["id"] for a in answers[1:]]
    assert len(answered) == count, len(answered)
    assert [n for n in answered if n is not None] == sorted(n for n in answered if n is not None)
    assert answers[-1]["id"] in (count, None)  # the last line, or its rate limit's refusal


def test_a_client_that_hangs_up_mid_run_ends_its_run(daemon: Daemon) -> None:
    # Its answer can go nowhere: the isolate is killed and its slot freed at
    # once, not when the command would have ended. A policy of a shape the pool
    # has never seen starts cold (awaited in a task); the default one is served
    # warm, once the pool has refilled (answered by the agent's callback).
    watcher = Client(daemon.socket_path)
    for attempt, policy in (("cold", {"disk_mb": 77}), ("warm", {})):
        marker = f"stockade-hangup-{attempt}-{os.getpid()}"
        argv = ["sh", "-c", f"sleep 60; echo {marker}"]
        request = {"method": "execute", "params": {"command": argv, "policy": policy}, "id": 1}
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(daemon.socket_path)
            s.sendall(json.dumps(request).encode() + b"\n")
            deadline = time.monotonic() + 10
            while not processes_with_arg(marker) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert processes_with_arg(marker), "the execution never started"
        deadline = time.monotonic() + 10
        while (processes_with_arg(marker) or watcher.status()["total_count"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with_arg(marker) == [], f"the {attempt} run outlived the client that asked for it"
        assert watcher.status()["active_sandboxes"] == []
        assert watcher.execute(["echo", "next"]).stdout == "next\n"
        time.sleep(1.0)  # the pool refills

    # Each has its log line, as an answered request has: it had no answer to be logged with.
    def hung_up() -> list[str]:
        return [line for line in daemon.logs().splitlines() if " execute hung_up " in line]

    deadline = time.monotonic() + 10  # a log line is written after the request's end, not before
    while len(hung_up()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(hung_up()) == 2, daemon.logs()


def test_a_client_that_does_not_read_its_answers_is_paused(process_runtime: str) -> None:
    # Answers a client leaves unread are not buffered without end: once they back
    # up, the daemon stops reading that connection (its sends then block), and
    # other clients are served all the while. Read late, every answer is there, in order.
    d = start_daemon({"STOCKADE_MAX_REQUESTS": "1000000000"})
    try:
        line = b'{"method": "ping", "params": {}, "id": 7}\n'
        batch = line * 1000
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.socket_path)
            s.setblocking(False)
            sent, stalled_since, stalled = 0, 0.0, False
            deadline = time.monotonic() + 30
            while not stalled and time.monotonic() < deadline:
                try:
                    sent += s.send(batch)
                    stalled_since = 0.0
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    stalled = time.monotonic() - stalled_since > 1.0  # the daemon has stopped reading
                    time.sleep(0.01)
            assert stalled, f"the daemon kept reading a client that reads nothing ({sent} bytes sent)"
            assert Client(d.socket_path).ping() == "pong"
            s.setblocking(True)
            s.settimeout(30)
            s.shutdown(socket.SHUT_WR)
            answers = s.makefile("rb").read().splitlines()
        whole = sent - sent % len(line)
        assert len(answers) == whole // len(line) + (1 if sent % len(line) else 0)
        assert set(answers[: whole // len(line)]) == {b'{"result": "pong", "error": null, "id": 7}'}
    finally:
        assert d.stop() == 0


def test_large_pipelined_requests_are_not_parked_in_memory(process_runtime: str) -> None:
    # While one request runs, the requests piped in behind it wait in the daemon:
    # up to about a MiB of them, not 64 lines of the line limit (here 4 MiB each).
    # A short shutdown grace: the daemon reads no more of this connection, so never sees it close,
    # and the first request runs on until the stop ends it.
    d = start_daemon(
        {"STOCKADE_MAX_REQUEST_BYTES": str(4 << 20), "STOCKADE_MAX_REQUESTS": "1000000", "STOCKADE_SHUTDOWN_GRACE": "1"}
    )
    try:
        busy = {"method": "execute", "params": {"command": ["sleep", "30"]}, "id": 1}
        big = b'{"method": "ping", "params": {"pad": "' + b"x" * (3 << 20) + b'"}, "id": 2}\n'
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.socket_path)
            s.sendall(json.dumps(busy).encode() + b"\n")
            running_execution(d.socket_path, timeout=30)  # what comes next waits behind it
            s.setblocking(False)
            sent, stalled_since, stalled = 0, 0.0, False
            deadline = time.monotonic() + 20  # well within the 30 s the first request runs
            while not stalled and sent < 96 << 20 and time.monotonic() < deadline:
                try:
                    sent += s.send(big[sent % len(big) :])
                    stalled_since = 0.0
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    stalled = time.monotonic() - stalled_since > 0.5
                    time.sleep(0.01)
        assert stalled, f"the daemon read {sent >> 20} MiB of requests queued behind a running one"
        assert sent < 24 << 20
    finally:
        assert d.stop() == 0


def _send_until_stalled(s: socket.socket, data: bytes) -> int:
    """How much of ``data`` goes in before the daemon stops taking it for half a second (all: len)."""
    s.setblocking(False)
    sent, stalled_since = 0, 0.0
    while sent < len(data):
        try:
            sent += s.send(data[sent:])
            stalled_since = 0.0
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
    s.settimeout(60)
    return sent


def test_requests_partway_are_read_on_a_few_connections_of_a_uid_at_once(process_runtime: str) -> None:
    # A request is held until its end: without a bound one uid's 64 connections could have the
    # daemon hold 64 of the line limit. Four are read at once; another waits until one of them is
    # done or gone, and a request that comes whole is answered meanwhile.
    d = start_daemon({"STOCKADE_MAX_REQUEST_BYTES": str(4 << 20), "STOCKADE_MAX_REQUESTS": "1000000"})
    start, end = b'{"method": "ping", "params": {}, "id": 1' + b" " * (3 << 20), b"}\n"
    conns: list[socket.socket] = []

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(d.socket_path)
        conns.append(s)
        return s

    def pong(s: socket.socket) -> None:
        answer = json.loads(s.makefile("rb").readline())
        assert answer["result"] == "pong", answer

    try:
        reading = [connect() for _ in range(LINES_UNDER_WAY_PER_UID)]
        for s in reading:  # more than a socket's buffer: the daemon has read (and holds) most of it
            s.sendall(start)
        first, second = connect(), connect()
        sent = {first: _send_until_stalled(first, start), second: _send_until_stalled(second, start)}
        assert max(sent.values()) < 1 << 20, sent  # one read each, then they wait their turn
        whole = connect()
        whole.sendall(b'{"method": "ping", "params": {}, "id": 1}\n')
        pong(whole)
        reading[0].sendall(end)  # one done: its place goes to the one that waited longest
        pong(reading[0])
        sent[second] += _send_until_stalled(second, start[sent[second] :])
        assert sent[second] < 1 << 20, sent
        first.sendall(start[sent[first] :] + end)
        pong(first)
        second.sendall(start[sent[second] :] + end)
        pong(second)
        connect().sendall(start)  # four under way again, with reading[1:]
        third = connect()
        sent[third] = _send_until_stalled(third, start)
        assert sent[third] < 1 << 20, sent
        reading[1].close()  # gone partway: its place is free
        third.sendall(start[sent[third] :] + end)
        pong(third)
    finally:
        for s in conns:
            s.close()
        assert d.stop() == 0


def test_connections_per_uid_are_bounded(process_runtime: str) -> None:
    # Each connection holds one of the daemon's file descriptors: a client that
    # opens them without end is refused past the bound, and served again once
    # it closes some.
    d = start_daemon({"STOCKADE_MAX_CONNECTIONS": "3"})
    ping = b'{"method": "ping", "params": {}, "id": 1}\n'
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(d.socket_path)
            s.sendall(ping)
            assert json.loads(s.recv(4096))["result"] == "pong"
            held.append(s)
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(10)
            extra.connect(d.socket_path)
            refusal = extra.makefile("rb").read().splitlines()
        assert len(refusal) == 1 and json.loads(refusal[0])["error"].startswith("Too many connections: uid")
        assert json.loads(refusal[0])["error_code"] == "busy"
        with pytest.raises(DaemonBusyError, match="Too many connections"):
            Client(d.socket_path).ping()
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert Client(d.socket_path).ping() == "pong"
                break
            except DaemonBusyError:
                assert time.monotonic() < deadline, "a closed connection was never counted out"
                time.sleep(0.05)
    finally:
        for s in held:
            s.close()
        assert d.stop() == 0


def test_concurrency_cap_says_busy(process_runtime: str) -> None:
    d = start_daemon({"STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_LIMIT": "0"})
    try:
        with Client(d.socket_path) as holder, Client(d.socket_path) as other:
            sid = holder.create_sandbox()
            with pytest.raises(DaemonBusyError, match="busy"):
                other.execute(["true"])
            holder.close_sandbox(sid)
            assert other.execute(["true"]).success
    finally:
        assert d.stop() == 0


def test_queue_waits_for_a_slot(process_runtime: str) -> None:
    d = start_daemon({"STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_LIMIT": "4"})
    try:
        results: list[bool] = []

        def one() -> None:
            with Client(d.socket_path) as c:
                results.append(c.execute(["sleep", "0.3"]).success)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True, True, True]
    finally:
        assert d.stop() == 0


def test_a_create_waiting_in_line_ends_with_its_caller(process_runtime: str) -> None:
    # Its place in line was kept: once a slot came free, an isolate was built for a client that was
    # gone, recorded as made, and closed again (a create and an end in the audit log for each).
    d = start_daemon({"STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_LIMIT": "4", "STOCKADE_QUEUE_TIMEOUT": "300"})
    try:
        with Client(d.socket_path) as holder:
            sid = holder.create_sandbox()
            for i in range(3):
                with socket.socket(socket.AF_UNIX) as gone:
                    gone.connect(d.socket_path)
                    gone.sendall(b'{"method": "sandbox.create", "params": {}, "id": %d}\n' % i)
                    deadline = time.monotonic() + 30
                    while holder.status()["waiting"] < 1:  # in line, then hung up
                        assert time.monotonic() < deadline, "the create never waited"
                        time.sleep(0.02)
            deadline = time.monotonic() + 30
            while holder.status()["waiting"]:
                assert time.monotonic() < deadline, "a create whose caller went kept its place in line"
                time.sleep(0.05)
            holder.close_sandbox(sid)
    finally:
        assert d.stop() == 0
    with open(d.audit_log) as f:
        creates = [r for r in map(json.loads, f) if r.get("event") == "sandbox.create"]
    assert len(creates) == 1, creates


def test_a_held_sandbox_whose_isolate_ended_is_closed_at_once_and_says_why(process_runtime: str) -> None:
    # It kept its slot, its cgroups and its "running" processes until its idle timeout (10 minutes),
    # every call answered that it had ended: an owner at its share was refused meanwhile.
    d = start_daemon({"STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_LIMIT": "0"})
    try:
        with Client(d.socket_path) as c:
            sid = c.create_sandbox({"on_violation": "kill"})
            ptrace = "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0)"
            killed = c.sandbox_exec(sid, ["python3", "-c", ptrace])
            assert killed.termination_reason == "violation", killed.summary()
            deadline = time.monotonic() + 30
            while c.status()["total_count"]:
                assert time.monotonic() < deadline, "the ended sandbox kept its slot"
                time.sleep(0.05)
            ended = rf"^sandbox '{sid}' has ended: the isolate was killed after a policy violation"
            with pytest.raises(NotFoundError, match=ended):
                c.sandbox_exec(sid, ["true"])
            other = c.create_sandbox()  # its slot is free for the next
            assert c.sandbox_exec(other, ["true"]).success
    finally:
        assert d.stop() == 0
    with open(d.audit_log) as f:
        ends = [r for r in map(json.loads, f) if r.get("event") == "sandbox.end"]
    assert [(r["sandbox_id"], r["ended"]) for r in ends][:1] == [(sid, "lost")], ends


def test_a_call_waiting_its_turn_on_a_sandbox_whose_isolate_ends_is_told_why(process_runtime: str) -> None:
    d = start_daemon({"STOCKADE_SHUTDOWN_GRACE": "1"})
    try:
        with Client(d.socket_path) as first, Client(d.socket_path) as second:
            sid = first.create_sandbox({"on_violation": "kill"}, keep=True)
            ptrace = "import ctypes, time; time.sleep(1); ctypes.CDLL(None).ptrace(0, 0, 0, 0)"
            killed: list[ExecResult] = []
            running = threading.Thread(target=lambda: killed.append(first.sandbox_exec(sid, ["python3", "-c", ptrace])))
            running.start()
            time.sleep(0.3)  # the first call holds the sandbox's turn: this one waits for it
            with pytest.raises(NotFoundError, match=rf"^sandbox '{sid}' has ended: the isolate was killed after a"):
                second.sandbox_exec(sid, ["true"])
            running.join(60)
            assert killed and killed[0].termination_reason == "violation"
            # A stop is no loss: a sandbox whose call the stop ended is recorded as the stop's.
            busy = first.create_sandbox(keep=True)
            stopped: list[ExecResult] = []
            slow = threading.Thread(target=lambda: stopped.append(first.sandbox_exec(busy, ["sleep", "30"])))
            slow.start()
            time.sleep(0.5)
            assert d.stop() == 0  # past its grace (1 s), the call is ended
            slow.join(60)
            assert stopped and stopped[0].termination_reason == "killed", stopped
    finally:
        d.stop()
    with open(d.audit_log) as f:
        ends = {r["sandbox_id"]: r["ended"] for r in map(json.loads, f) if r.get("event") == "sandbox.end"}
    assert ends == {sid: "lost", busy: "daemon stopped"}, ends


def test_a_request_still_waiting_when_the_daemon_stops_is_answered_so(process_runtime: str) -> None:
    # Its connection was closed under it: the client read an end of file, not why.
    d = start_daemon({"STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_LIMIT": "4", "STOCKADE_QUEUE_TIMEOUT": "300",
                      "STOCKADE_SHUTDOWN_GRACE": "1"})  # fmt: skip
    try:
        with Client(d.socket_path) as holder, socket.socket(socket.AF_UNIX) as waiting:
            holder.create_sandbox()
            waiting.settimeout(60)
            waiting.connect(d.socket_path)
            waiting.sendall(b'{"method": "sandbox.create", "params": {}, "id": 7}\n')
            deadline = time.monotonic() + 30
            while holder.status()["waiting"] < 1:
                assert time.monotonic() < deadline, "the create never waited"
                time.sleep(0.02)
            assert d.stop() == 0
            answer = json.loads(waiting.makefile("rb").readline())
            assert (answer["id"], answer["error_code"]) == (7, "unavailable"), answer
            assert answer["error"] == "Shutting down: the daemon stopped before this request was done"
    finally:
        d.stop()


def test_socket_permissions_and_stale_socket(process_runtime: str, tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "d.sock")
    import socket as socketlib

    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(path)  # a socket file nobody listens on: what a killed daemon leaves
    stale.close()
    d = start_daemon({"STOCKADE_SOCKET_PERMS": "0640"}, socket_path=path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        # An audit log of its own: on the first's, it would be refused for that before the socket.
        own_audit = {"STOCKADE_AUDIT_LOG": os.path.join(str(tmp_path), "second-audit.log")}
        second = start_daemon(own_audit, socket_path=path, wait=False)
        assert second.proc.wait(timeout=30) == 125
        assert "already listening" in second.logs()
        assert Client(path).ping() == "pong"  # the live daemon kept its socket
    finally:
        assert d.stop() == 0
    assert not os.path.exists(path)  # removed on a clean stop


@pytest.mark.parametrize("value", ["0999", "rw-r--r--", "01777"])
def test_malformed_socket_perms_refused_at_start(process_runtime: str, value: str) -> None:
    d = start_daemon({"STOCKADE_SOCKET_PERMS": value}, wait=False)
    assert d.proc.wait(timeout=30) == 125
    assert "STOCKADE_SOCKET_PERMS" in d.logs()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STOCKADE_POOL_SHAPES", "0"),
        ("STOCKADE_POOL_SIZE", "lots"),
        ("STOCKADE_CGROUP_PARENT", "../escape"),
        ("STOCKADE_MAX_CONNECTIONS", "0"),
        ("STOCKADE_SANDBOX_IDLE_TIMEOUT", "soon"),
        ("STOCKADE_QUEUE_TIMEOUT", "nan"),
    ],
)
def test_malformed_runtime_settings_refused_at_start(process_runtime: str, name: str, value: str) -> None:
    d = start_daemon({name: value}, wait=False)
    assert d.proc.wait(timeout=30) == 125
    assert name in d.logs()


def test_sigterm_lets_running_work_finish(process_runtime: str) -> None:
    d = start_daemon()
    results: list[str] = []

    def long_run() -> None:
        results.append(Client(d.socket_path).execute(["sh", "-c", "sleep 1; echo done"]).stdout)

    t = threading.Thread(target=long_run)
    t.start()
    running_execution(d.socket_path, timeout=30)  # admitted and running when the signal comes
    assert d.stop(signal.SIGTERM) == 0
    t.join(30)
    assert results == ["done\n"]
    assert not os.path.exists(d.socket_path)


def test_sigterm_past_the_grace_ends_a_warm_execute_and_leaves_nothing(process_runtime: str) -> None:
    """A warm execute is answered from the loop's callbacks; a shutdown that will
    not wait for it must still end its isolate and tear it down."""
    d = start_daemon({"STOCKADE_SHUTDOWN_GRACE": "0.3"})
    marker = f"stockade-grace-{os.getpid()}"
    t, errors = _execute_in_background(Client(d.socket_path), ["sh", "-c", f"sleep 60; echo {marker}"], marker)
    pid = d.proc.pid
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0, d.logs()
    assert time.monotonic() - started < 45  # not the run's 60 s: it was ended, not waited for
    t.join(30)
    # Past the grace the run is ended and its client answered (killed: "the daemon stopped
    # during this run"), not left to find its connection gone.
    assert errors == []
    deadline = time.monotonic() + 30  # the zygote's own clean-up may take up to 20 s
    while (processes_with_arg(marker) or _cgroups_of(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with_arg(marker) == [] and _cgroups_of(pid) == []
    assert "Traceback" not in d.logs()


def _execute_in_background(
    client: Client, argv: list[str], marker: str
) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``argv`` through ``client`` in a thread, once a process whose command line
    holds ``marker`` runs; the thread, and the list its exception lands in."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.execute(argv)
        except BaseException as exc:  # the outcome under test
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not processes_with_arg(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert processes_with_arg(marker), "the execution never started"
    return t, errors


def _cgroups_of(pid: int) -> list[str]:
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(root, x) for x in dirs if x.startswith(f"stockade-{pid}-")]
        if root.count("/") > 8:
            dirs[:] = []
    return found


def test_sigkill_during_execution_then_restart_and_retry(process_runtime: str) -> None:
    d = start_daemon()
    client = Client(d.socket_path, timeout=10)
    marker = "4242.125"
    t, errors = _execute_in_background(client, ["sleep", marker], marker)
    old_pid = d.proc.pid
    d.stop(signal.SIGKILL)
    t.join(30)
    assert errors and isinstance(errors[0], DaemonUnavailableError)
    deadline = time.monotonic() + 10
    while processes_with_arg(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with_arg(marker) == [], "the sandbox outlived its daemon"

    # What a dead daemon's gVisor and microVM sandboxes leave in /tmp goes as the next one starts.
    left = [os.path.join(tempfile.gettempdir(), f"{prefix}{old_pid}-7") for prefix in (BUNDLE_PREFIX, RUN_PREFIX)]
    for path in left:
        os.makedirs(os.path.join(path, "rootfs"))
    restarted = start_daemon(socket_path=d.socket_path)  # replaces the stale socket
    try:
        result = call_with_retry(lambda: client.execute(["echo", "back"]), max_retries=3, backoff=0.2)
        assert result.stdout == "back\n"
        deadline = time.monotonic() + 30  # the sweep runs as the daemon reaches its runtimes: maybe after the call
        while (_cgroups_of(old_pid) or any(os.path.exists(p) for p in left)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cgroups_of(old_pid) == [], "the restarted daemon did not sweep the dead one's cgroups"
        assert [p for p in left if os.path.exists(p)] == [], "nor the dead one's gVisor and microVM directories"
    finally:
        assert restarted.stop() == 0


def test_call_with_retry_gives_up_on_a_dead_socket(tmp_path: os.PathLike[str]) -> None:
    client = Client(os.path.join(str(tmp_path), "none.sock"))
    calls = []

    def attempt() -> str:
        calls.append(1)
        return client.ping()

    started = time.monotonic()
    with pytest.raises(DaemonUnavailableError, match="cannot reach"):
        call_with_retry(attempt, max_retries=3, backoff=0.05)
    assert len(calls) == 3 and time.monotonic() - started >= 0.15  # 0.05 + 0.1 of backoff


def test_cli_runs_through_the_daemon(daemon: Daemon) -> None:
    env = {**os.environ, "STOCKADE_SOCKET": daemon.socket_path}
    out = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "run", "--", "sh", "-c", "echo hi; exit 4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout) == (4, "hi\n")
    # The daemon logs a call just after its answer: the CLI may have exited before the line is written.
    deadline = time.monotonic() + 30
    while f"uid={os.getuid()} execute ok" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"uid={os.getuid()} execute ok" in daemon.logs(), daemon.logs()
    missing = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "run", "--socket", daemon.socket_path + ".nope", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 125 and "cannot reach" in missing.stderr


def _stockade(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_daemon_command_answers_for_operators_and_health_checks(daemon: Daemon) -> None:
    env = {**os.environ, "STOCKADE_SOCKET": daemon.socket_path}
    ping = _stockade("daemon", "ping", env=env)
    assert ping.returncode == 0 and ping.stdout.startswith(f"pong from {daemon.socket_path} in "), ping
    selftest = _stockade("daemon", "selftest", "--socket", daemon.socket_path)
    report = json.loads(selftest.stdout)
    assert selftest.returncode == 0 and report["ok"] is True and report["runtime"] == "process"
    status = _stockade("daemon", "status", env=env)
    assert status.returncode == 0 and isinstance(json.loads(status.stdout), dict)
    runtimes = json.loads(_stockade("daemon", "runtimes", env=env).stdout)
    assert {"name": "process", "available": True}.items() <= next(r for r in runtimes if r["name"] == "process").items()
    # An operator ends a runaway run, and is told when there is nothing to end.
    marker = "4247.375"
    runner, results = execute_in_background(daemon.socket_path, ["sh", "-c", f"sleep {marker}"])
    execution_id = running_execution(daemon.socket_path, ready=lambda: bool(processes_with_arg(marker)))
    cancel = _stockade("daemon", "cancel", execution_id, env=env)
    assert cancel.returncode == 0, cancel
    runner.join(30)
    assert [r.termination_reason for r in results] == ["killed"]
    missing = _stockade("daemon", "close", "sb-nope", env=env)
    assert missing.returncode == 125 and "no sandbox 'sb-nope'" in missing.stderr
    no_id = _stockade("daemon", "cancel", env=env)
    assert no_id.returncode == 125 and "needs the id" in no_id.stderr
    # No daemon there: a health check that fails, and says why.
    gone = _stockade("daemon", "ping", "--socket", daemon.socket_path + ".nope")
    assert gone.returncode == 125 and "cannot reach the stockade daemon" in gone.stderr and gone.stdout == ""


def test_token_new(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "token")
    out = subprocess.run([sys.executable, "-m", "stockade.cli", "token", "new", "--file", path], capture_output=True)
    assert out.returncode == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        token = f.read().strip()
    assert len(token) == 64 and int(token, 16) >= 0


def test_streamed_output_arrives_before_the_answer(daemon: Daemon) -> None:
    import socket as socketlib

    request = {"method": "execute", "params": {"command": ["sh", "-c", "echo one; echo two >&2"], "stream": True},
               "id": 42}  # fmt: skip
    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(daemon.socket_path)
        s.sendall(json.dumps(request).encode() + b"\n")
        f = s.makefile("rb")
        lines = []
        while True:
            message = json.loads(f.readline())
            lines.append(message)
            if "result" in message:
                break
    chunks = [m["output"] for m in lines[:-1]]
    assert chunks and all(m["id"] == 42 for m in lines)
    streamed = {c["stream"]: base64.b64decode(c["data"]) for c in chunks}
    assert streamed == {"stdout": b"one\n", "stderr": b"two\n"}
    assert lines[-1]["result"]["stdout"] == "one\n"


def test_client_streaming(daemon: Daemon) -> None:
    seen: list[tuple[str, bytes]] = []
    with Client(daemon.socket_path) as c:
        r = c.execute(["sh", "-c", "echo a; echo b"], on_output=lambda s, d: seen.append((s, d)))
        assert b"".join(d for s, d in seen if s == "stdout") == b"a\nb\n" and r.stdout == "a\nb\n"
        sid = c.create_sandbox()
        seen.clear()
        r = c.call(
            "sandbox.run_code", {"sandbox_id": sid, "code": "print('held')"}, on_output=lambda s, d: seen.append((s, d))
        )
        assert seen == [("stdout", b"held\n")] and r["stdout"] == "held\n"
        c.close_sandbox(sid)


def test_a_client_callback_that_raises_does_not_shift_later_answers(daemon: Daemon) -> None:
    def breaks(stream: str, data: bytes) -> None:
        raise LookupError("the caller's own bug")

    with Client(daemon.socket_path) as c:
        with pytest.raises(LookupError):
            c.execute(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.05; done"], on_output=breaks)
        # The rest of that run's output and its answer were read and dropped:
        # this call gets its own answer.
        assert c.execute(["echo", "mine"]).stdout == "mine\n"
        assert c.ping() == "pong"


def test_an_answered_execute_is_killed_at_once_and_torn_down_by_shutdown(
    process_runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The teardown after an answer is put off (so it does not compete with the
    # client reading it), but the kill is not: a background process the command
    # left must be gone while its teardown still waits, and a shutdown in that
    # window must tear it down rather than leave its cgroups behind.
    import asyncio

    from stockade.daemon import oneshot as oneshot_module
    from stockade.daemon.config import DaemonConfig
    from stockade.daemon.controller import Controller
    from stockade.protocol.models import ExecuteRequest, unix_caller

    monkeypatch.setattr(oneshot_module, "TEARDOWN_DELAY_S", 3600.0)
    marker = "4243.375"

    async def scenario() -> None:
        controller = Controller(DaemonConfig(pool_size=1))
        try:
            request = ExecuteRequest(command=["sh", "-c", f"sleep {marker} & echo started"])
            result = await controller.execute(request, unix_caller(0))
            assert result.stdout == "started\n", result.summary()
            deadline = time.monotonic() + 5
            while processes_with_arg(marker) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert processes_with_arg(marker) == [], "the answered isolate's process ran on"
            assert len(controller._teardowns) == 1, "the teardown was expected to be still waiting"
            (waiting,) = controller._teardowns
            cgroup = getattr(waiting, "cgroup", None)
            dirs.extend(cgroup.dirs.values() if cgroup is not None else [])
        finally:
            await controller.shutdown(0.0)
        assert controller._teardowns == {}

    dirs: list[str] = []
    asyncio.run(scenario())
    assert dirs, "the isolate had no cgroup to check"
    assert [d for d in dirs if os.path.exists(d)] == [], "a shutdown left the waiting teardown's cgroups behind"


def _memory_kb(pid: int) -> dict[str, int]:
    """The process's resident set now (VmRSS) and at its peak (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_a_violation_flood_leaves_the_daemons_memory_bounded(runtime: str) -> None:
    # Before reports were bounded, a 6 s flood took the daemon from 37 to 607 MB
    # and it kept 444 MB afterwards.
    from stockade.result import MAX_VIOLATION_RECORDS
    from tests.conftest import require
    from tests.security.test_violation_flood import flood

    require(runtime)
    daemon = start_daemon()
    pid = daemon.proc.pid
    with Client(daemon.socket_path, timeout=30) as c:
        c.execute(code=flood(0.5), policy={"runtime": runtime})  # every path of a flood taken once
        before = _memory_kb(pid)["VmRSS"]
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM starts again from VmRSS: it shows this flood's peak
        r = c.execute(code=flood(4), policy={"runtime": runtime, "timeout_seconds": 60})
        after = _memory_kb(pid)
    made = int(r.stdout)
    # Past its report's bound, a flood is only counted. (gVisor's is slowed by the host's read of the
    # Sentry's log, 256 KiB/s: about a thousand traced calls a second.)
    least = (10 if runtime == "process" else 2) * MAX_VIOLATION_RECORDS
    assert made > least and r.violation_counts["ptrace"] == made, r.summary()
    grew = {key: (value - before) // 1024 for key, value in after.items()}
    assert grew["VmHWM"] < 50 and grew["VmRSS"] < 50, f"the daemon grew by {grew} MB during/after {made} violations"
    assert daemon.stop() == 0, daemon.logs()


def test_the_client_takes_a_policy_object_as_well_as_a_dict(daemon: Daemon) -> None:
    from stockade.policy import Policy

    policy = Policy(memory_mb=128, environment={"WHO": "policy-object"})
    with Client(daemon.socket_path) as c:
        result = c.execute(["sh", "-c", "echo $WHO"], policy=policy)
        assert result.stdout == "policy-object\n" and result.policy_digest == policy.digest
        with c.sandbox(policy) as sb:
            assert sb.exec(["sh", "-c", "echo $WHO"]).stdout == "policy-object\n"
        with pytest.raises(PolicyError, match="memory_mb"):
            c.execute(["true"], policy={"memory_mb": 1})  # refused before it is sent


def test_the_sockets_group_is_a_setting(process_runtime: str, tmp_path: Path) -> None:
    """Under supervisord (user=root, no group of its own) the socket was root's group: a client in
    the daemon's group, as the docs say to make one, could not connect."""
    import grp

    gid = grp.getgrnam("nogroup").gr_gid
    daemon = start_daemon(env={"STOCKADE_SOCKET_GROUP": "nogroup", "STOCKADE_SOCKET_PERMS": "0660"})
    try:
        st = os.stat(daemon.socket_path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660)
    finally:
        assert daemon.stop() == 0, daemon.logs()
    socket_path = str(tmp_path / "s.sock")
    env = {**os.environ, "STOCKADE_SOCKET_GROUP": "no-such-group-here", "STOCKADE_SOCKET": socket_path,
           "STOCKADE_POOL_SIZE": "0", "STOCKADE_AUDIT_LOG": "off"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "stockade.cli", "serve"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 125 and "STOCKADE_SOCKET_GROUP='no-such-group-here': no such group" in done.stderr
    assert not os.path.exists(socket_path)
