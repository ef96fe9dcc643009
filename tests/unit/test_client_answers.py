"""The client reads what a daemon answers, and refuses what is not an answer.

A thread plays the daemon on a real Unix socket and answers each request line
with one scripted line; the client must return the result, or raise a
``StockadeError`` that says what was wrong, and never hand a malformed answer
back as a result.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade import ExecResult
from stockade.client import AsyncClient, Client, RemoteSandbox
from stockade.errors import (
    AgentError,
    AuthenticationError,
    DaemonUnavailableError,
    PolicyError,
    SandboxError,
    StockadeError,
)
from stockade.limits import MAX_CALL_BYTES

Answer = Callable[[dict[str, object]], bytes]  # the request -> the line sent back; b"": hang up


@pytest.fixture
def scripted(tmp_path: os.PathLike[str]) -> Iterator[Callable[[Answer], Client]]:
    servers: list[tuple[socket.socket, threading.Thread]] = []
    clients: list[Client] = []

    def make(answer: Answer) -> Client:
        path = os.path.join(str(tmp_path), f"d{len(servers)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn, conn.makefile("rb") as lines:
                    for line in lines:
                        reply = answer(json.loads(line))
                        if not reply:
                            break
                        conn.sendall(reply)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        servers.append((listener, thread))
        clients.append(Client(path, timeout=5))
        return clients[-1]

    yield make
    for client in clients:
        client.close()
    for listener, thread in servers:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def _line(answer: dict[str, object]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def _exec_result() -> dict[str, object]:
    result = ExecResult(
        success=True, exit_code=0, stdout="hi\n", termination_reason="completed", runtime_used="process",
        policy_digest="0" * 16,
    )  # fmt: skip
    return result.to_dict()


def test_a_well_formed_answer_is_the_result(scripted: Callable[[Answer], Client]) -> None:
    client = scripted(lambda r: _line({"result": _exec_result(), "error": None, "id": r["id"]}))
    result = client.execute(["echo", "hi"])
    assert isinstance(result, ExecResult) and result.stdout == "hi\n" and result.success


def test_fields_a_newer_daemon_adds_are_ignored(scripted: Callable[[Answer], Client]) -> None:
    """A client older than its daemon still reads its results: unknown fields are skipped, anywhere."""
    newer = _exec_result()
    newer["gpu_seconds"] = 1.5
    newer["resource_usage"] = {**newer["resource_usage"], "io_bytes": 10}  # type: ignore[dict-item]
    newer["security_violations"] = [{"violation_type": "syscall", "syscall": "ptrace", "rule": "deny-ptrace"}]
    client = scripted(lambda r: _line({"result": newer, "error": None, "id": r["id"], "trace_id": "t-1"}))
    result = client.execute(["echo", "hi"])
    assert result.stdout == "hi\n" and result.success
    assert [v.syscall for v in result.security_violations] == ["ptrace"]
    assert "gpu_seconds" not in result.to_dict()


BROKEN: dict[str, Answer] = {
    "not JSON": lambda r: b"{half an answer\n",
    "not an object": lambda r: b"[1, 2, 3]\n",
    "result of the wrong shape": lambda r: _line({"result": {"exit_code": "zero"}, "id": r["id"]}),
    "no result and no error": lambda r: _line({"result": None, "error": None, "id": r["id"]}),
    "another request's answer": lambda r: _line({"result": _exec_result(), "id": 999}),
    "another request's error": lambda r: _line(
        {"result": None, "error": "no sandbox", "error_code": "not_found", "id": 9}
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_answer_is_an_error_and_the_connection_is_not_reused(
    scripted: Callable[[Answer], Client], name: str
) -> None:
    answers = [BROKEN[name]]
    client = scripted(
        lambda r: answers.pop()(r) if answers else _line({"result": "pong", "error": None, "id": r["id"]})
    )
    with pytest.raises(StockadeError) as info:
        client.execute(["true"])
    assert not isinstance(info.value, DaemonUnavailableError)
    assert "daemon" in str(info.value), str(info.value)
    assert client.ping() == "pong"  # a fresh connection: nothing of the broken answer is read as this one's


@pytest.mark.parametrize(
    ("code", "error"),
    [("auth", AuthenticationError), ("sandbox", SandboxError), ("policy", PolicyError), ("agent", AgentError)],
)
def test_an_error_answer_maps_to_its_class(
    scripted: Callable[[Answer], Client], code: str, error: type[StockadeError]
) -> None:
    refused = {"result": None, "error": "Authentication failed", "error_code": code}
    client = scripted(lambda r: _line({**refused, "id": r["id"]}))
    with pytest.raises(error, match="Authentication failed"):
        client.execute(code="pass")


def test_a_refusal_of_the_connection_itself_carries_no_id_and_is_taken(scripted: Callable[[Answer], Client]) -> None:
    refused = {"result": None, "error": "Request too large: over 16 bytes", "error_code": "invalid_request", "id": None}
    client = scripted(lambda r: _line(refused))
    with pytest.raises(StockadeError, match="Request too large"):
        client.execute(code="pass")


def test_a_daemon_that_hangs_up_is_unavailable(scripted: Callable[[Answer], Client]) -> None:
    client = scripted(lambda r: b"")
    with pytest.raises(DaemonUnavailableError):
        client.execute(code="pass")


def test_an_answer_that_never_comes_is_a_timeout_that_names_its_bound(
    scripted: Callable[[Answer], Client],
) -> None:
    # The client's socket is blocking with the kernel's bound on each wait
    # (SO_RCVTIMEO): the bound must still end a wait for an answer that never comes.
    release = threading.Event()

    def never_answer(request: dict[str, object]) -> bytes:
        release.wait(30)
        return b""  # then hang up

    client = scripted(never_answer)
    try:
        with pytest.raises(DaemonUnavailableError, match=r"did not answer ping within 0\.3 s"):
            client.call("ping", timeout=0.3)
    finally:
        release.set()


def test_a_refusal_sent_before_the_hang_up_is_what_the_caller_gets(tmp_path: os.PathLike[str]) -> None:
    # A daemon that will not serve a connection answers once and closes it unread.
    # When that close wins the race with the request, the send fails (broken
    # pipe); the reason, already on the socket, must still reach the caller.
    from stockade.client import DaemonBusyError

    path = os.path.join(str(tmp_path), "refusing.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    client = Client(path, timeout=5)
    try:
        client._connect()  # connected before the daemon refuses, as the race goes
        conn, _ = listener.accept()
        refusal = {"result": None, "error": "Too many connections: uid 0 has 3 open", "error_code": "busy", "id": None}
        conn.sendall(json.dumps(refusal).encode() + b"\n")
        conn.close()  # closed unread: the client's send now fails
        with pytest.raises(DaemonBusyError, match="Too many connections"):
            client.ping()
        # A hang-up with nothing said stays a lost connection.
        client._connect()
        conn, _ = listener.accept()
        conn.close()
        with pytest.raises(DaemonUnavailableError):
            client.ping()
    finally:
        client.close()
        listener.close()


def test_a_held_sandbox_call_sends_its_keywords_and_refuses_a_misspelt_one(
    scripted: Callable[[Answer], Client],
) -> None:
    sent: list[dict[str, object]] = []

    def record(request: dict[str, object]) -> bytes:
        sent.append(request)
        return _line({"result": _exec_result(), "error": None, "id": request["id"]})

    client = scripted(record)
    handle = RemoteSandbox(client, "sb-1")
    handle.exec(["cat"], stdin=b"\x00\xff", env={"A": "b"}, cwd="/work", timeout=3)
    handle.run_code("print(1)", stdin="text")
    assert sent[0]["method"] == "sandbox.exec"
    assert sent[0]["params"] == {
        "sandbox_id": "sb-1", "command": ["cat"], "cwd": "/work", "stdin_b64": "AP8=", "env": {"A": "b"}, "timeout": 3,
    }  # fmt: skip
    assert sent[1]["params"] == {"sandbox_id": "sb-1", "code": "print(1)", "stdin": "text"}
    with pytest.raises(
        TypeError, match=r"^exec\(\) got an unexpected keyword argument 'stdn' \(did you mean 'stdin'\?\)"
    ):
        client.sandbox_exec("sb-1", ["true"], stdn="x")  # type: ignore[call-arg]
    with pytest.raises(
        TypeError, match=r"exec\(\) got an unexpected keyword argument 'timout' \(did you mean 'timeout'"
    ):
        handle.exec(["true"], timout=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="cwd"):
        client.sandbox_run_code("sb-1", "pass", cwd="/work")  # type: ignore[call-arg]
    assert len(sent) == 2  # nothing was sent for either


def test_write_file_over_7_mib_is_refused_before_it_is_sent(scripted: Callable[[Answer], Client]) -> None:
    sent: list[dict[str, Any]] = []

    def record(request: dict[str, Any]) -> bytes:
        sent.append(request)
        return _line({"result": {"path": "/work/f", "size": 0}, "error": None, "id": request["id"]})

    client = scripted(record)
    handle = RemoteSandbox(client, "sb-1")
    handle.write_file("/work/f", b"x" * MAX_CALL_BYTES)  # exactly 7 MiB: sent whole
    assert len(base64.b64decode(sent[0]["params"]["data"])) == MAX_CALL_BYTES
    for call in (
        lambda: handle.write_file("/work/f", b"x" * (MAX_CALL_BYTES + 1)),
        lambda: client.sandbox_write_file("sb-1", "/work/f", "x" * (MAX_CALL_BYTES + 1)),
    ):
        with pytest.raises(
            SandboxError, match=f"too large: {MAX_CALL_BYTES + 1} bytes, and a call takes at most {MAX_CALL_BYTES}"
        ):
            call()
    assert len(sent) == 1  # nothing was sent for either


def test_stdin_and_code_over_7_mib_are_refused_before_they_are_sent(scripted: Callable[[Answer], Client]) -> None:
    sent: list[dict[str, Any]] = []

    def record(request: dict[str, Any]) -> bytes:
        sent.append(request)
        return _line({"result": _exec_result(), "error": None, "id": request["id"]})

    client = scripted(record)
    handle = RemoteSandbox(client, "sb-1")
    seven, over = b"x" * MAX_CALL_BYTES, b"x" * (MAX_CALL_BYTES + 1)
    client.execute(["cat"], stdin=seven)  # exactly 7 MiB: sent whole
    handle.run_code("#" * MAX_CALL_BYTES, stdin=seven.decode())
    assert len(base64.b64decode(sent[0]["params"]["stdin_b64"])) == MAX_CALL_BYTES
    assert len(sent[1]["params"]["code"]) == len(sent[1]["params"]["stdin"]) == MAX_CALL_BYTES

    async def awaited(call: str) -> None:
        async with AsyncClient(client.socket_path, timeout=5) as aclient:
            if call == "execute":
                await aclient.execute(code="#" * (MAX_CALL_BYTES + 1))
            else:
                await aclient.sandbox_exec("sb-1", ["cat"], stdin=over)

    for field, call in (
        ("stdin", lambda: client.execute(["cat"], stdin=over)),
        ("code", lambda: client.execute(code="#" * (MAX_CALL_BYTES + 1))),
        ("stdin", lambda: handle.exec(["cat"], stdin=over.decode())),
        ("code", lambda: handle.run_code("#" * (MAX_CALL_BYTES + 1))),
        ("stdin", lambda: client.sandbox_run_code("sb-1", "pass", stdin=over)),
        ("code", lambda: asyncio.run(awaited("execute"))),
        ("stdin", lambda: asyncio.run(awaited("sandbox_exec"))),
    ):
        with pytest.raises(
            SandboxError, match=f"{field} is too large: {MAX_CALL_BYTES + 1} bytes, and a call takes at most"
        ):
            call()
    assert len(sent) == 2  # nothing was sent for any of them


def test_a_string_for_argv_is_refused_with_what_to_pass_instead() -> None:
    import stockade
    from stockade.client import Client

    with pytest.raises(TypeError, match=r"pass \['ls', '-l'\]"):
        Client("/nonexistent.sock").execute("ls -l")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a string"):
        stockade.run("ls -l")  # type: ignore[arg-type]
