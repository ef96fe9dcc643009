"""When a client tries a call again, and when it must not; file calls' OS errors as stdlib classes.

A thread plays the daemon on a real Unix socket: it reads each request line,
counts it, and answers as the test says, or hangs up. A request the client
sends again is one more line it reads, so the counts say exactly what went
out. (The same against a real daemon, killed and restarted:
tests/integration/test_client_restart.py.)
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade import ExecResult
from stockade.client import AnswerLostError, AsyncClient, Client, Retry, call_with_retry
from stockade.errors import (
    AgentError,
    DaemonBusyError,
    DaemonUnavailableError,
    NotFoundError,
    PathNotFoundError,
    SandboxOSError,
)
from tests.daemon_harness import TOKEN
from tests.unix_server import UnixServer

HANG_UP = None  # an answer that is no answer: the connection is closed once the request is read
Script = Callable[[dict[str, Any]], dict[str, Any] | None]
FAST = Retry(attempts=3, backoff_s=0.01)


class FakeDaemon:
    """A Unix socket that reads request lines and answers each as ``script`` says, one
    connection at a time; ``requests`` is every request read, ``connections`` how many
    were accepted. ``one_answer_each``: each connection is closed after its first answer
    (a daemon that restarts between calls)."""

    def __init__(self, path: str, script: Script, one_answer_each: bool = False) -> None:
        self.path = path
        self.script = script
        self.one_answer_each = one_answer_each
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.closed = threading.Semaphore(0)  # released as each connection is closed
        self.server = UnixServer(path, self._answer)

    @property
    def connections(self) -> int:
        return self.server.connections

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                request = json.loads(line)
                with self.lock:
                    self.requests.append(request)
                    answer = self.script(request)
                if answer is HANG_UP:
                    break
                conn.sendall(json.dumps({**answer, "id": request["id"]}).encode() + b"\n")
                if self.one_answer_each:
                    break
        self.closed.release()

    def methods(self) -> list[str]:
        return [r["method"] for r in self.requests]

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake(tmp_path: os.PathLike[str]) -> Iterator[Callable[..., FakeDaemon]]:
    """One connection at a time is how the clients talk; each is served in a thread of its own."""
    made: list[FakeDaemon] = []

    def make(script: Script, one_answer_each: bool = False) -> FakeDaemon:
        made.append(FakeDaemon(os.path.join(str(tmp_path), f"d{len(made)}.sock"), script, one_answer_each))
        return made[-1]

    yield make
    for daemon in made:
        daemon.close()


def pong(request: dict[str, Any]) -> dict[str, Any]:
    return {"result": "pong", "error": None}


def ran(request: dict[str, Any]) -> dict[str, Any]:
    result = ExecResult(success=True, exit_code=0, stdout="ran\n", termination_reason="completed",
                        runtime_used="process", policy_digest="0" * 16)  # fmt: skip
    return {"result": result.to_dict(), "error": None}


def refused(code: str, times: int, then: Script) -> Script:
    """Refuse with ``code`` the first ``times`` requests, then answer as ``then``."""
    seen = [0]

    def script(request: dict[str, Any]) -> dict[str, Any] | None:
        seen[0] += 1
        return {"result": None, "error": f"refused ({code})", "error_code": code} if seen[0] <= times else then(request)

    return script


# ---- the schedule -------------------------------------------------------------------------------


def test_the_backoff_doubles_up_to_its_cap() -> None:
    assert Retry().delays() == (1.0, 2.0)  # three attempts, as the seed's call_with_retry
    assert Retry(attempts=5).delays() == (1.0, 2.0, 4.0, 8.0)
    assert Retry(attempts=7, backoff_s=0.5, max_backoff_s=3).delays() == (0.5, 1.0, 2.0, 3.0, 3.0, 3.0)
    assert Retry(attempts=4, backoff_s=0).delays() == (0.0, 0.0, 0.0)
    assert Retry(attempts=1).delays() == ()
    assert Retry(attempts=100, max_backoff_s=30).delays()[-1] == 30.0


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 1.5}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"attempts": 101}, "attempts"),
        ({"backoff_s": -1}, "backoff_s"),
        ({"backoff_s": math.nan}, "backoff_s"),
        ({"max_backoff_s": math.inf}, "max_backoff_s"),
        ({"backoff_s": "1"}, "backoff_s"),
    ],
)
def test_a_bad_retry_is_refused_naming_its_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=f"Retry.{named} must be"):
        Retry(**fields)


def test_retry_none_is_one_attempt_and_anything_else_is_refused() -> None:
    assert Client("/nonexistent.sock", retry=None).retry == Retry(attempts=1)
    assert Client("/nonexistent.sock").retry == Retry()
    with pytest.raises(TypeError, match="retry must be a Retry"):
        Client("/nonexistent.sock", retry=3)  # type: ignore[arg-type]


# ---- what is sent again -------------------------------------------------------------------------


def test_a_safe_request_cut_off_before_its_answer_is_sent_again_each_time_signed_afresh(
    fake: Callable[..., FakeDaemon],
) -> None:
    daemon = fake(lambda r: HANG_UP)
    client = Client(daemon.path, auth_token=TOKEN, timeout=10, retry=FAST)
    with pytest.raises(DaemonUnavailableError, match=r"gave up after 3 attempts") as caught:
        client.ping()
    assert not isinstance(caught.value, AnswerLostError)
    assert daemon.path in str(caught.value)
    assert daemon.methods() == ["ping"] * 3
    # A nonce the daemon saw is refused as a replay: each attempt is signed anew.
    assert len({r["nonce"] for r in daemon.requests}) == 3


@pytest.mark.parametrize("method", ["execute", "sandbox.exec", "sandbox.write_file", "sandbox.create"])
def test_an_unsafe_request_cut_off_before_its_answer_is_not_sent_again(
    fake: Callable[..., FakeDaemon], method: str
) -> None:
    daemon = fake(lambda r: HANG_UP)
    client = Client(daemon.path, timeout=10, retry=FAST)
    calls: dict[str, Callable[[], object]] = {
        "execute": lambda: client.execute(["touch", "/work/once"]),
        "sandbox.exec": lambda: client.sandbox_exec("sb-1", ["touch", "/work/once"]),
        "sandbox.write_file": lambda: client.sandbox_write_file("sb-1", "/work/f", "x"),
        "sandbox.create": lambda: client.create_sandbox(keep=True),
    }
    with pytest.raises(AnswerLostError) as caught:
        calls[method]()
    message = str(caught.value)
    assert f"lost the connection to the stockade daemon at {daemon.path}" in message
    assert f"after the {method} request went out, before its answer: it may have run" in message
    assert ("Retry(resend_unsafe=True)" in message) == (method != "sandbox.create")
    assert daemon.methods() == [method]  # once, and only once


@pytest.mark.parametrize("method", ["sandbox.create", "sandbox.publish", "sandbox.spawn", "sandbox.process_write"])
def test_what_a_second_request_would_make_twice_is_never_sent_again(
    fake: Callable[..., FakeDaemon], method: str
) -> None:
    # resend_unsafe is the caller's word that its runs may run twice: not a second sandbox held
    # until its idle timeout, a second forward, a second process, stdin written twice.
    daemon = fake(lambda r: HANG_UP)
    client = Client(daemon.path, timeout=10, retry=Retry(attempts=3, backoff_s=0.01, resend_unsafe=True))
    params: dict[str, dict[str, Any]] = {
        "sandbox.create": {"keep": True},
        "sandbox.publish": {"sandbox_id": "sb-1", "port": 8000},
        "sandbox.spawn": {"sandbox_id": "sb-1", "command": ["sleep", "9"]},
        "sandbox.process_write": {"sandbox_id": "sb-1", "process_id": 2, "data": "cm0gLXJmIC93b3JrCg=="},
    }
    with pytest.raises(AnswerLostError, match=r"it may have run, so it was not sent again$"):
        client.call(method, params[method])
    assert daemon.methods() == [method]


def test_an_unsafe_request_is_sent_again_when_the_caller_allows_it(fake: Callable[..., FakeDaemon]) -> None:
    seen = [0]

    def second_time_lucky(request: dict[str, Any]) -> dict[str, Any] | None:
        seen[0] += 1
        return HANG_UP if seen[0] == 1 else ran(request)

    daemon = fake(second_time_lucky)
    client = Client(daemon.path, timeout=10, retry=Retry(attempts=3, backoff_s=0.01, resend_unsafe=True))
    assert client.execute(["true"]).stdout == "ran\n"
    assert daemon.methods() == ["execute", "execute"]


def test_a_request_the_daemon_refused_unrun_while_stopping_is_sent_again(fake: Callable[..., FakeDaemon]) -> None:
    # "unavailable" (shutting down) is answered before anything runs: even an execute goes again.
    daemon = fake(refused("unavailable", 2, ran))
    client = Client(daemon.path, timeout=10, retry=FAST)
    assert client.execute(["true"]).stdout == "ran\n"
    assert daemon.methods() == ["execute"] * 3
    stopping = fake(refused("unavailable", 9, ran))
    with pytest.raises(DaemonUnavailableError, match=r"refused \(unavailable\) \(gave up after 3 attempts"):
        Client(stopping.path, timeout=10, retry=FAST).ping()


def test_busy_is_tried_again_only_when_asked(fake: Callable[..., FakeDaemon]) -> None:
    daemon = fake(refused("busy", 99, ran))
    with pytest.raises(DaemonBusyError, match=r"^refused \(busy\)$"):
        Client(daemon.path, timeout=10, retry=FAST).execute(["true"])
    assert daemon.methods() == ["execute"]
    patient = Retry(attempts=3, backoff_s=0.01, retry_busy=True)
    with pytest.raises(DaemonBusyError, match=r"refused \(busy\) \(gave up after 3 attempts"):
        Client(daemon.path, timeout=10, retry=patient).execute(["true"])
    assert daemon.methods() == ["execute"] * 4
    recovering = fake(refused("busy", 1, ran))
    assert Client(recovering.path, timeout=10, retry=patient).execute(["true"]).success


def test_other_errors_are_never_tried_again(fake: Callable[..., FakeDaemon]) -> None:
    daemon = fake(refused("rate_limit", 99, pong))
    with pytest.raises(Exception, match="rate_limit"):
        Client(daemon.path, timeout=10, retry=FAST).ping()
    assert daemon.methods() == ["ping"]


def test_a_connection_the_daemon_hung_up_since_its_last_answer_is_replaced(fake: Callable[..., FakeDaemon]) -> None:
    # As after a restart between two calls: even with no retries, the next call goes on a new
    # connection, and an execute too (nothing of it went out on the dead one).
    daemon = fake(lambda r: ran(r) if r["method"] == "execute" else pong(r), one_answer_each=True)
    client = Client(daemon.path, timeout=10, retry=None)
    assert client.ping() == "pong"
    assert daemon.closed.acquire(timeout=10)  # hung up before the next call, as a daemon that restarted
    assert client.execute(["true"]).stdout == "ran\n"
    assert daemon.closed.acquire(timeout=10)
    assert client.ping() == "pong"
    assert daemon.methods() == ["ping", "execute", "ping"] and daemon.connections == 3


def test_a_dead_socket_is_given_up_on_naming_it_and_the_attempts(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "none.sock")
    for call in (lambda c: c.ping(), lambda c: c.execute(["true"])):
        with pytest.raises(DaemonUnavailableError) as caught:
            call(Client(path, retry=FAST))
        assert str(caught.value).startswith(f"cannot reach the stockade daemon at {path}: No such file or directory")
        assert "(gave up after 3 attempts over " in str(caught.value)
    with pytest.raises(DaemonUnavailableError) as once:
        Client(path, retry=None).ping()
    assert str(once.value) == f"cannot reach the stockade daemon at {path}: No such file or directory"


def test_call_with_retry_is_the_only_loop_and_does_not_resend_what_may_have_run(
    fake: Callable[..., FakeDaemon],
) -> None:
    daemon = fake(lambda r: HANG_UP)
    client = Client(daemon.path, timeout=10)  # its own retries: three attempts, 1 s apart
    with pytest.raises(DaemonUnavailableError):
        call_with_retry(client.ping, max_retries=2, backoff=0.01)
    assert daemon.methods() == ["ping"] * 2  # not 2 x 3
    with pytest.raises(AnswerLostError):
        call_with_retry(lambda: client.execute(["true"]), max_retries=3, backoff=0.01)
    assert daemon.methods() == ["ping"] * 2 + ["execute"]


# ---- the same for AsyncClient -------------------------------------------------------------------


def test_async_safe_resent_unsafe_not_stale_replaced(fake: Callable[..., FakeDaemon], tmp_path: str) -> None:
    hangs_up = fake(lambda r: HANG_UP)
    restarts = fake(lambda r: ran(r) if r["method"] == "execute" else pong(r), one_answer_each=True)
    dead = os.path.join(str(tmp_path), "none.sock")

    async def scenario() -> None:
        async with AsyncClient(hangs_up.path, timeout=10, retry=FAST) as client:
            with pytest.raises(DaemonUnavailableError, match="gave up after 3 attempts"):
                await client.ping()
            with pytest.raises(AnswerLostError, match="after the execute request went out"):
                await client.execute(["true"])
        async with AsyncClient(restarts.path, timeout=10, retry=None) as client:
            assert await client.ping() == "pong"
            assert await asyncio.to_thread(restarts.closed.acquire, timeout=10)
            assert (await client.execute(["true"])).stdout == "ran\n"
            assert await asyncio.to_thread(restarts.closed.acquire, timeout=10)
            assert await client.ping() == "pong"
        async with AsyncClient(dead, retry=FAST) as client:
            with pytest.raises(DaemonUnavailableError, match=rf"^cannot reach .* at {dead}: .*gave up after 3"):
                await client.ping()

    asyncio.run(scenario())
    assert hangs_up.methods() == ["ping"] * 3 + ["execute"]
    assert restarts.methods() == ["ping", "execute", "ping"] and restarts.connections == 3


def test_an_async_client_goes_on_under_a_later_event_loop(fake: Callable[..., FakeDaemon]) -> None:
    # One asyncio.run after another (a script's steps, a test's loop each): the first loop's
    # connection cannot serve the next one. Before, every later call failed ("Event loop is
    # closed", "attached to a different loop") but one in three, and no connection was replaced.
    daemon = fake(pong)
    client = AsyncClient(daemon.path, timeout=10, retry=None)
    for _ in range(4):
        assert asyncio.run(client.ping()) == "pong"
    # The fake serves one connection at a time: each was ended for the daemon when left.
    assert daemon.connections == 4
    asyncio.run(client.aclose())


# ---- a file call's OS error is its stdlib class -------------------------------------------------


def _os_error(code: str, number: int | None) -> Script:
    answer: dict[str, Any] = {"result": None, "error": f"[Errno {number}] refused: '/work/x'", "error_code": code}
    return lambda r: {**answer, "errno": number} if number is not None else answer


@pytest.mark.parametrize(
    ("code", "number", "stdlib"),
    [
        ("path_not_found", errno.ENOENT, FileNotFoundError),
        ("agent", errno.EISDIR, IsADirectoryError),
        ("agent", errno.ENOTDIR, NotADirectoryError),
        ("agent", errno.EACCES, PermissionError),
        ("agent", errno.EPERM, PermissionError),
        ("agent", errno.EEXIST, FileExistsError),
        ("agent", errno.ENOSPC, OSError),
    ],
)
def test_a_file_calls_os_error_is_its_stdlib_class(
    fake: Callable[..., FakeDaemon], code: str, number: int, stdlib: type[OSError]
) -> None:
    client = Client(fake(_os_error(code, number)).path, timeout=10)
    for call in (
        lambda: client.sandbox_read_file("sb-1", "/work/x"),
        lambda: client.sandbox_write_file("sb-1", "/work/x", "data"),
        lambda: client.sandbox_list_dir("sb-1", "/work/x"),
    ):
        with pytest.raises(stdlib) as caught:
            call()
        error = caught.value
        assert isinstance(error, SandboxOSError) and isinstance(error, AgentError)  # the stockade tree, intact
        assert (error.errno, error.filename, error.strerror) == (number, "/work/x", os.strerror(number))
        assert str(error) == f"[Errno {number}] refused: '/work/x'"  # the daemon's words, as sent
    if code == "path_not_found":
        with pytest.raises(NotFoundError):
            client.sandbox_read_file("sb-1", "/work/x")


def test_an_agent_error_without_an_errno_is_no_os_error(fake: Callable[..., FakeDaemon]) -> None:
    client = Client(fake(_os_error("agent", None)).path, timeout=10)
    with pytest.raises(AgentError) as caught:
        client.sandbox_read_file("sb-1", "/work/x")
    assert not isinstance(caught.value, OSError)


def test_async_file_errors_are_stdlib_classes_too(fake: Callable[..., FakeDaemon]) -> None:
    missing = fake(_os_error("path_not_found", errno.ENOENT))
    directory = fake(_os_error("agent", errno.EISDIR))

    async def scenario() -> None:
        async with AsyncClient(missing.path, timeout=10) as client:
            with pytest.raises(FileNotFoundError) as caught:
                await client.sandbox_read_file("sb-1", "/work/x")
            assert isinstance(caught.value, PathNotFoundError) and caught.value.filename == "/work/x"
        async with AsyncClient(directory.path, timeout=10) as client:
            with pytest.raises(IsADirectoryError):
                await client.sandbox_write_file("sb-1", "/work/x", b"data")

    asyncio.run(scenario())


# ---- who may answer as the daemon -----------------------------------------------------------------

IMPOSTOR = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1])
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
sock.listen()  # the kernel keeps who listened: nobody
print("ready", flush=True)
sock.settimeout(60)
for _ in range(3):
    conn, _ = sock.accept()
    conn.settimeout(10)
    print(len(conn.recv(65536)), flush=True)  # what the client sent it: nothing, its connection closed
    conn.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a listener of another user's is made by root")
def test_a_listener_that_runs_as_no_daemons_user_is_sent_nothing(tmp_path: os.PathLike[str]) -> None:
    """A daemon that is down leaves its socket's name to whoever can write its directory; before,
    a listener put there got every request (code, files, signed requests), its answers taken as the
    daemon's. Now each client asks who listens, and sends nothing to a process of another user's."""
    import subprocess
    import sys

    path = os.path.join(str(tmp_path), "d.sock")
    listener = subprocess.Popen([sys.executable, "-c", IMPOSTOR, path], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
        said = r"refused to talk to the process listening on .*d\.sock \(pid \d+\) runs as uid 65534"
        with pytest.raises(DaemonUnavailableError, match=said):
            Client(path, timeout=10, retry=FAST).execute(code="print('secret')")

        async def through_async() -> None:
            with pytest.raises(DaemonUnavailableError, match=said):
                await AsyncClient(path, timeout=10, retry=FAST).execute(code="print('secret')")

        asyncio.run(through_async())
        stockade = os.path.join(os.path.dirname(sys.executable), "stockade")
        cli = subprocess.run([stockade, "run", "--", "echo", "secret"], env={**os.environ, "STOCKADE_SOCKET": path},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert cli.returncode == 125 and "runs as uid 65534" in cli.stderr and "secret" not in cli.stdout, cli
        out, _ = listener.communicate(timeout=60)
        assert out.split() == ["0", "0", "0"]  # three connections, not a byte on any
    finally:
        listener.kill()
        listener.wait()


def test_an_async_client_waits_for_room_in_a_full_backlog(tmp_path: os.PathLike[str]) -> None:
    """The event loop's connect takes a full backlog's EAGAIN for a connection under way, and hands
    back a socket that is not connected: the call then failed at once, its listener called an
    impostor (uid -1). Now the connect waits for room (up to the client's timeout), as Client's does;
    past it, nothing was sent, so even an execute may be tried again."""
    import threading

    from tests.helpers import full_backlog, make_room_and_read

    path = os.path.join(str(tmp_path), "d.sock")
    with full_backlog(path) as (listener, held):
        got: list[bytes] = []

        async def calls() -> None:
            with pytest.raises(DaemonUnavailableError, match=r"cannot reach .*: Resource temporarily unavailable") as e:
                await AsyncClient(path, timeout=0.3, retry=None).execute(["true"], timeout=60)
            assert not isinstance(e.value, AnswerLostError)  # never sent
            threading.Timer(0.5, lambda: got.append(make_room_and_read(listener, held))).start()
            with pytest.raises(DaemonUnavailableError, match="lost the connection"):
                await AsyncClient(path, timeout=30, retry=None).ping()  # (the listener reads it, then closes)

        asyncio.run(calls())
    assert json.loads(got[0])["method"] == "ping"
