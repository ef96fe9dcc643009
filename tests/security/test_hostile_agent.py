"""A guest agent that lies or speaks garbage: the host stays in charge.

The agent runs inside the isolate, so a guest that escaped its confinement
inside the isolate (or a guest kernel bug under gVisor or in a microVM) can
answer anything. Here a thread plays such an agent on the host end's peer
socket, answering each request with one crafted reply. The host must never
crash, hang past its deadline, or take a malformed verdict as a result: the run
ends with an error that names the cause, the isolate is treated as dead, and
later calls refuse clearly.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade import ExecResult, Policy
from stockade.agent import wire
from stockade.errors import AgentError, AgentProtocolError, SandboxError
from stockade.runtimes.sandbox import AgentSandbox

Reply = Callable[[int], bytes]  # request id -> the raw bytes the hostile agent sends back
CLOSE = b"<close>"  # at the end of a reply: the hostile agent then closes its end


class HostileSandbox(AgentSandbox):
    runtime_name = "hostile"

    def __init__(self, conn: socket.socket) -> None:
        super().__init__(Policy(timeout_seconds=2), conn, 0.0)
        self.killed = False

    def kill(self) -> None:
        self.killed = True

    def _release(self) -> None:
        pass


def _frame(obj: object) -> bytes:
    return wire.encode_message(obj) if not isinstance(obj, bytes) else struct.pack("<I", len(obj)) + obj


def _result(msg_id: int, result: object) -> bytes:
    return _frame({"jsonrpc": "2.0", "id": msg_id, "result": result})


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileSandbox]]:
    made: list[tuple[HostileSandbox, socket.socket, threading.Thread]] = []

    def make(reply: Reply, on_request: Callable[[dict[str, Any]], None] | None = None) -> HostileSandbox:
        host, guest = socket.socketpair()

        def agent() -> None:
            with guest:
                while True:
                    try:
                        request = json.loads(wire.read_frame(guest))
                        if on_request is not None:
                            on_request(request)
                        raw = reply(request["id"])
                        guest.sendall(raw.removesuffix(CLOSE))
                        if raw.endswith(CLOSE):
                            return
                    except (EOFError, OSError, wire.FrameError):
                        return

        thread = threading.Thread(target=agent, daemon=True)
        thread.start()
        sandbox = HostileSandbox(host)
        made.append((sandbox, guest, thread))
        return sandbox

    yield make
    for sandbox, guest, thread in made:
        sandbox.close()
        guest.close()
        thread.join(5)


@pytest.fixture(params=["blocking", "event loop"])
def run_exec(request: pytest.FixtureRequest) -> Callable[..., ExecResult]:
    """``exec`` as the SDK calls it (blocking) and as the daemon does (awaited on its event loop)."""
    if request.param == "blocking":
        return lambda sb, argv, **kw: sb.exec(argv, **kw)
    return lambda sb, argv, **kw: asyncio.run(sb.aexec(argv, **kw))


GARBAGE: dict[str, Reply] = {
    "result not an object": lambda i: _result(i, 5),
    "stdout not base64": lambda i: _result(i, {"exit_code": 0, "stdout": "%%% not base64 %%%", "stderr": ""}),
    "reply for another id": lambda i: _result(i + 7, {"exit_code": 0}),
    "not JSON": lambda i: _frame(b"{this is not json"),
    "not an object": lambda i: _frame(b"[1, 2, 3]"),
    "frame over the cap": lambda i: struct.pack("<I", wire.MAX_FRAME + 1),
    "closed mid-frame": lambda i: struct.pack("<I", 1000) + b"{" + CLOSE,
    "closed instead of answering": lambda i: CLOSE,
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_ends_the_run_with_an_error_and_the_isolate(
    hostile: Callable[[Reply], HostileSandbox], run_exec: Callable[..., ExecResult], name: str
) -> None:
    sb = hostile(GARBAGE[name])
    result = run_exec(sb, ["true"])
    assert isinstance(result, ExecResult)
    assert not result.success and result.termination_reason == "error", result.summary()
    assert result.error and "isolate" in result.error, result.error
    assert result.error.endswith("; the sandbox has ended: its files, processes and interpreters are gone")
    assert sb.killed, "a garbling agent's isolate must be killed"
    # The next call says what took the sandbox down, not a guess among three causes.
    with pytest.raises(SandboxError, match=r"the isolate ended during a run \(error: .*isolate.*\); start a new"):
        sb.exec(["true"])


def test_a_lying_verdict_is_not_taken_at_its_word(hostile: Callable[[Reply], HostileSandbox]) -> None:
    # Types the host does not expect are read as "not said", never trusted or coerced.
    sb = hostile(lambda i: _result(i, {"exit_code": "0", "timed_out": "yes", "output_truncated": 1,
                                       "stdout": 5, "stderr": None}))  # fmt: skip
    result = sb.exec(["true"])
    assert result.exit_code is None and not result.success
    assert result.stdout == "" and result.termination_reason == "completed"


def test_output_beyond_the_policy_is_cut_by_the_host(
    hostile: Callable[[Reply], HostileSandbox], run_exec: Callable[..., ExecResult]
) -> None:
    flood = base64.b64encode(b"x" * 3_000_000).decode()
    sb = hostile(lambda i: _result(i, {"exit_code": 0, "stdout": flood, "stderr": flood}))
    result = run_exec(sb, ["true"])
    assert len(result.stdout) + len(result.stderr) <= sb.policy.max_output_bytes
    assert result.termination_reason == "output_limit"


@pytest.mark.parametrize("reply", [lambda i: b"", lambda i: struct.pack("<I", 1000) + b"{"], ids=["silent", "stalled"])
def test_an_agent_that_never_answers_is_timed_out(
    hostile: Callable[[Reply], HostileSandbox], run_exec: Callable[..., ExecResult], reply: Reply
) -> None:
    sb = hostile(reply)  # reads the request, then says nothing or stops mid-frame
    result = run_exec(sb, ["true"], timeout=0.5)
    assert result.termination_reason == "timeout" and sb.killed


def test_a_request_larger_than_the_socket_buffer_reaches_the_agent_whole(
    hostile: Callable[[Reply], HostileSandbox], run_exec: Callable[..., ExecResult]
) -> None:
    # Megabytes of stdin do not fit the socket's buffer: the host must wait for
    # room (on the event loop: for the socket to be writable), never send part.
    stdin = bytes(range(256)) * 20_000
    seen: list[bytes] = []

    def echo_stdin(msg_id: int) -> bytes:
        return _result(msg_id, {"exit_code": 0, "stdout": base64.b64encode(b"%d" % len(seen[-1])).decode()})

    sb = hostile(echo_stdin, on_request=lambda request: seen.append(base64.b64decode(request["params"]["stdin"])))
    result = run_exec(sb, ["cat"], stdin=stdin)
    assert result.success and result.stdout == str(len(stdin)), result.summary()
    assert seen == [stdin]


def test_a_file_call_to_a_silent_agent_is_a_sandbox_error(hostile: Callable[[Reply], HostileSandbox]) -> None:
    sb = hostile(lambda i: b"")
    with pytest.raises(SandboxError, match="stopped answering"):
        sb.ping(timeout=0.3)
    assert sb.killed


def test_an_error_class_is_chosen_by_the_host(hostile: Callable[[Reply], HostileSandbox]) -> None:
    error = {"code": 12345, "message": "SystemExit: __import__('os').system('reboot')", "data": {"class": "SystemExit"}}
    sb = hostile(lambda i: _frame({"jsonrpc": "2.0", "id": i, "error": error}))
    with pytest.raises(AgentError) as info:
        sb.read_file("/etc/hostname")
    assert type(info.value) is AgentError and info.value.code == 12345


def test_an_agents_error_message_is_quoted_escaped(hostile: Callable[[Reply], HostileSandbox]) -> None:
    # Its words reached the daemon's log raw (a published port's relay logs them): a forged line, an erased one.
    forged = "nothing listens\n2026-12-06 10:00:00,000 stockade INFO gave up root\n\x1b[2K\x1b[1Arotate the key"
    sb = hostile(lambda i: _frame({"jsonrpc": "2.0", "id": i, "error": {"code": -32000, "message": forged}}))
    with pytest.raises(AgentError) as info:
        sb.read_file("/etc/hostname")
    said = str(info.value)
    assert "\x1b" not in said and "\\x1b[2K" in said
    assert all(line.startswith("    ") for line in said.splitlines()[1:]), said


@pytest.mark.parametrize(
    ("call", "reply"),
    [
        (lambda sb: sb.read_file("/x"), lambda i: _result(i, {"data": 5})),
        (lambda sb: sb.list_dir("/"), lambda i: _result(i, {"entries": "no"})),
        (lambda sb: sb.list_dir("/"), lambda i: _result(i, {"entries": [{"name": ["a"], "type": "file", "size": 1}]})),
        (lambda sb: sb.list_dir("/"), lambda i: _result(i, {"entries": [{"name": "a", "type": "x", "size": 1}]})),
        (lambda sb: sb.list_dir("/"), lambda i: _result(i, {"entries": [{"name": "a", "type": "dir"}]})),
        (lambda sb: sb.read_file("/x"), lambda i: _frame(b"[" * 100_000 + b"]" * 100_000)),
        (lambda sb: sb.read_file("/x"), lambda i: _frame(b"garbage")),
    ],
)
def test_file_calls_refuse_garbage_and_end_the_isolate(
    hostile: Callable[[Reply], HostileSandbox], call: Callable[[AgentSandbox], object], reply: Reply
) -> None:
    sb = hostile(reply)
    with pytest.raises(AgentProtocolError):
        call(sb)
    assert sb.killed
    with pytest.raises(SandboxError, match="has ended"):
        sb.read_file("/x")


def test_a_file_that_keeps_growing_cannot_keep_the_host_reading(hostile: Callable[[Reply], HostileSandbox]) -> None:
    # Each piece says "more follows" and a larger size: the host stops at the size first reported.
    pieces = iter(range(1, 1_000_000))
    sb = hostile(lambda i: _result(i, {"data": base64.b64encode(b"x" * 1000).decode(), "truncated": True,
                                       "size": 3000 * next(pieces)}))  # fmt: skip
    assert sb.read_file("/work/grows") == b"x" * 3000


def test_a_piece_larger_than_asked_for_is_garbage(hostile: Callable[[Reply], HostileSandbox]) -> None:
    sb = hostile(lambda i: _result(i, {"data": base64.b64encode(b"x" * 100).decode(), "size": 100}))
    with pytest.raises(AgentProtocolError, match="at most 10"):
        sb.read_file("/x", max_bytes=10)
    assert sb.killed


def test_the_runtimes_own_last_words_are_in_the_error(hostile: Callable[[Reply], HostileSandbox]) -> None:
    sb = hostile(lambda i: CLOSE)
    sb.last_words = lambda: "sentry panic: out of cheese"  # type: ignore[method-assign]
    result = sb.exec(["true"])
    assert result.termination_reason == "error"
    assert result.error and "hostile said: sentry panic: out of cheese" in result.error


def _violation_note(nr: int = 272) -> bytes:  # 272: unshare
    return _frame({"jsonrpc": "2.0", "method": "violation", "params": {"nr": nr, "args": [0x10000000], "pid": 7}})


def test_an_agent_cannot_report_violations_where_the_host_watches_itself(
    hostile: Callable[[Reply], HostileSandbox], run_exec: Callable[..., ExecResult]
) -> None:
    # The process runtime and gVisor see violations on the host: an agent's own
    # reports (a microVM guest's channel) would let code inside frame or end a run.
    sb = hostile(lambda i: _violation_note() + _result(i, {"exit_code": 0, "stdout": "", "stderr": ""}))
    sb.policy = Policy(timeout_seconds=2, on_violation="kill")
    result = run_exec(sb, ["true"])
    assert result.success and result.security_violations == [], result.summary()
    assert not sb.killed


FLOODER = r"""
import socket, struct, sys
guest = socket.socket(fileno=int(sys.argv[1]))
(length,) = struct.unpack("<I", guest.recv(4, socket.MSG_WAITALL))
guest.recv(length, socket.MSG_WAITALL)  # the request; then notifications, as fast as the host takes them
note = b'{"jsonrpc": "2.0", "method": "x", "params": {}}'
burst = (struct.pack("<I", len(note)) + note) * 20000
while True:
    guest.sendall(burst)
"""


@pytest.mark.parametrize("kind", ["blocking", "event loop"])
def test_an_agent_flooding_notifications_cannot_hold_the_loop_past_the_deadline(kind: str) -> None:
    # Frames written as fast as the host reads them kept the loop in one reader callback: the
    # call's timer never ran (nor did anything else on a daemon's loop) until the agent stopped.
    host, guest = socket.socketpair()
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, str(guest.fileno())], pass_fds=[guest.fileno()])
    guest.close()
    sb = HostileSandbox(host)
    guard = threading.Timer(60, flooder.kill)  # a host that never takes the loop back still ends this test
    guard.start()
    try:
        ticks: list[float] = []

        async def with_heartbeat() -> ExecResult:
            async def beat() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.1)

            beating = asyncio.create_task(beat())
            try:
                return await sb.aexec(["true"], timeout=0.5)
            finally:
                beating.cancel()

        t0 = time.monotonic()
        result = sb.exec(["true"], timeout=0.5) if kind == "blocking" else asyncio.run(with_heartbeat())
        took = time.monotonic() - t0
        assert result.termination_reason == "timeout" and sb.killed, result.summary()
        # Timed out near its deadline (generous on a loaded host), not whenever the flood ended.
        assert took < 15, took
        if kind == "event loop":
            gaps = [b - a for a, b in itertools.pairwise(ticks)]
            assert len(ticks) >= 3 and max(gaps) < 5, gaps  # the loop's other work went on meanwhile
    finally:
        guard.cancel()
        flooder.kill()
        flooder.wait()
        sb.close()


def _output_note(data: bytes) -> bytes:
    return _frame({"jsonrpc": "2.0", "method": "output", "params": {"stream": "stdout", "data": wire.b64encode(data)}})


def test_streamed_output_past_the_policys_cap_ends_the_isolate(
    hostile: Callable[[Reply], HostileSandbox], run_exec: Callable[..., ExecResult]
) -> None:
    # The honest agent cuts its stream at max_output_bytes; one that does not was let stream on,
    # each chunk handed to the caller (a daemon's client that reads nothing buffered GBs of it).
    chunk = b"x" * 60000
    sb = hostile(lambda i: _output_note(chunk) * 40 + _result(i, {"exit_code": 0, "stdout": "", "stderr": ""}))
    got: list[bytes] = []
    result = run_exec(sb, ["true"], on_output=lambda stream, data: got.append(data))
    assert result.termination_reason == "error" and sb.killed, result.summary()
    assert result.error and "streamed more output than the run's max_output_bytes" in result.error, result.error
    assert sum(map(len, got)) <= sb.policy.max_output_bytes  # what reached the caller: within the cap


def test_a_notification_larger_than_the_agents_ends_the_isolate(
    hostile: Callable[[Reply], HostileSandbox], run_exec: Callable[..., ExecResult]
) -> None:
    # Each costs the host ~30 times its size to decode: the agent's are under 100 KiB.
    note = _frame(b'{"jsonrpc": "2.0", "method": "violation", "params": {"x": [' + b"[0]," * 200000 + b"[0]]}}")
    sb = hostile(lambda i: note * 20 + _result(i, {"exit_code": 0, "stdout": "", "stderr": ""}))
    result = run_exec(sb, ["true"])
    assert result.termination_reason == "error" and sb.killed, result.summary()
    assert result.error and "a notification of 800" in result.error, result.error


def test_the_runtimes_last_words_are_quoted_without_terminal_control(tmp_path: Path) -> None:
    from stockade.runtimes.microvm.console import CONSOLE, QemuOutput

    # A microVM guest's root writes the console, which errors quote: it steers no terminal.
    output = QemuOutput(str(tmp_path))
    try:
        writer = os.open(tmp_path / CONSOLE, os.O_WRONLY | os.O_NONBLOCK)  # as QEMU opens it
        os.write(writer, b"\x1b]0;pwned\x07\x1b[2J\r\nstockade: ERROR forged line\r\n")
        os.close(writer)
        said = output.last_words()
    finally:
        output.spawned()
        output.close()
    assert "\x1b" not in said and "\x07" not in said and "\r" not in said, repr(said)
    assert "\\x1b]0;pwned\\x07" in said and "\n    stockade: ERROR forged line" in said, repr(said)


PROCESS_ANSWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "spawn: a pid that is text": ("spawn", {"handle": "p1", "pid": "x"}),
    "spawn: a pid that is a list": ("spawn", {"handle": "p1", "pid": [1]}),
    "read: dropped not a dict": ("read", {"dropped": [], "stdout": "", "stderr": ""}),
    "read: stdout not base64": ("read", {"dropped": {}, "stdout": "%%%", "stderr": ""}),
    "read: stdout of 5000 digits": ("read", {"dropped": {}, "stdout": "1" * 4999, "stderr": ""}),
    "read: a dropped count that is text": ("read", {"dropped": {"stdout": "9"}, "stdout": "", "stderr": ""}),
    "list: not processes": ("list", {"processes": [1, "x", None]}),
}


@pytest.mark.parametrize("name", sorted(PROCESS_ANSWERS))
def test_a_garbled_answer_about_a_background_process_ends_the_isolate(
    hostile: Callable[..., HostileSandbox], name: str
) -> None:
    # Read as given, each raised ValueError, TypeError or AttributeError in the caller's hands (a
    # daemon's "internal error", with a traceback in its log), and the isolate lived on.
    call, bad = PROCESS_ANSWERS[name]
    summary = {"handle": "p1", "pid": 42, "argv": ["sleep", "9"], "running": True, "exit_code": None}

    said = [""]  # the method of the request being answered

    def answer(request: dict[str, Any]) -> None:
        said[0] = request["method"]

    def reply(i: int) -> bytes:
        method = said[0]
        if method == "spawn":
            return _result(i, bad if call == "spawn" else {"handle": "p1", "pid": 42})
        if method == "proc_read":
            return _result(i, {**summary, **bad})
        return _result(i, bad if call == "list" else summary)

    sb = hostile(reply, answer)
    with pytest.raises(AgentProtocolError, match=r"the agent.s answer to (spawn|proc_read|proc_list) .*isolate"):
        process = sb.spawn(["sleep", "9"])
        if call == "read":
            process.read()
        sb.processes()
    assert sb.killed
