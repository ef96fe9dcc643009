"""A daemon's answer, as the clients read it, is bounded in time and size whatever the daemon does.

The socket may be anyone's (``STOCKADE_SOCKET`` names it): a thread plays a
daemon that trickles (output lines for another request, or an answer a byte
at a time), that sends a line without end, or an exit status no process has.
Each client must end the call by itself, within its wait, and say why.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from stockade.cli_daemon import LINE_LIMIT
from stockade.client import AsyncClient, Client
from stockade.client.answers import LINE_LIMIT as CLIENT_LINE_LIMIT
from stockade.errors import DaemonUnavailableError
from tests.helpers import returned_within
from tests.unix_server import UnixServer

Behaviour = Callable[[socket.socket, int], None]


def output_lines(conn: socket.socket, msg_id: int) -> None:
    """Output for a request that is not the caller's, every 0.2 s, then a byte of an answer at a time."""
    for _ in range(5):
        conn.sendall(json.dumps({"id": msg_id + 1000, "output": {"stream": "stdout", "data": ""}}).encode() + b"\n")
        time.sleep(0.2)
    conn.sendall(b'{"id":')
    while True:
        conn.sendall(b" ")
        time.sleep(0.2)


def endless_line(conn: socket.socket, msg_id: int) -> None:
    chunk = b"a" * (1 << 20)
    while True:
        conn.sendall(chunk)


def exit_256(conn: socket.socket, msg_id: int) -> None:
    result = {"termination_reason": "completed", "exit_code": 256, "stdout": "", "stderr": ""}
    conn.sendall(json.dumps({"id": msg_id, "result": result, "error": None}).encode() + b"\n")


def bad_chunk(conn: socket.socket, msg_id: int) -> None:
    conn.sendall(json.dumps({"id": msg_id, "output": {"stream": "stdout", "data": "abc"}}).encode() + b"\n")
    exit_256(conn, msg_id)


def deep(conn: socket.socket, msg_id: int) -> None:
    conn.sendall(b"[" * 100_000 + b"\n")


ESCAPES = "\x1b]0;PWNED\x07\x1b[2J"  # a window's title set, the screen cleared


def escapes_said(conn: socket.socket, msg_id: int) -> None:
    conn.sendall(json.dumps({"id": msg_id, "result": ESCAPES, "error": None}).encode() + b"\n")


def escapes_in_a_report(conn: socket.socket, msg_id: int) -> None:
    report = {"ok": False, "message": ESCAPES, "secrets": [{"name": ESCAPES, "source": ESCAPES, "hosts": [ESCAPES]}]}
    conn.sendall(json.dumps({"id": msg_id, "result": report, "error": None}).encode() + b"\n")


class Daemon:
    """Each connection: its request line read, then ``behaviour`` until the client goes."""

    def __init__(self, path: str, behaviour: Behaviour) -> None:
        self.path, self.behaviour = path, behaviour
        self.server = UnixServer(path, self._answer)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\n" not in data:
                piece = conn.recv(1 << 16)
                if not piece:
                    return
                data += piece
            try:
                self.behaviour(conn, int(json.loads(data.split(b"\n")[0])["id"]))
            except OSError:
                pass  # the client went away: as it should

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def daemon(tmp_path: os.PathLike[str]) -> Iterator[Callable[[Behaviour], Daemon]]:
    made: list[Daemon] = []

    def make(behaviour: Behaviour) -> Daemon:
        made.append(Daemon(os.path.join(str(tmp_path), f"d{len(made)}.sock"), behaviour))
        return made[-1]

    yield make
    for each in made:
        each.close()


def _ended(call: Callable[[], object], within_s: float = 60.0) -> BaseException | None:
    """What ``call`` raised (None: it returned), or a failure if it was still waiting after ``within_s``."""
    outcome = returned_within(within_s, call)
    return outcome if isinstance(outcome, BaseException) else None


def test_the_sync_clients_wait_is_for_the_answer_not_for_each_read(daemon: Callable[[Behaviour], Daemon]) -> None:
    """Its bound was the kernel's, per receive: each line of output, each byte, began it again."""
    fake = daemon(output_lines)
    with Client(fake.path, timeout=1.5, retry=None) as client:
        raised = _ended(lambda: client.call("status"))
    assert isinstance(raised, DaemonUnavailableError) and "did not answer status within 1.5 s" in str(raised)


def test_the_sync_clients_wait_bounds_sending_a_long_request_too(tmp_path: os.PathLike[str]) -> None:
    """Each send was bounded alone: a daemon reading 16 KiB every 0.2 s held a 3 MB request past its wait."""
    done = threading.Event()

    def read_slowly(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.5)
            while not done.is_set():
                try:
                    if not conn.recv(16 << 10):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return
                time.sleep(0.2)

    slow = UnixServer(os.path.join(str(tmp_path), "slow.sock"), read_slowly)
    try:
        with Client(slow.path, timeout=1.5, retry=None) as client:
            raised = _ended(lambda: client.call("ping", {"padding": "a" * 3_000_000}))
        assert isinstance(raised, DaemonUnavailableError) and "within 1.5 s" in str(raised), raised
    finally:
        done.set()
        slow.close()


def test_the_async_client_too(daemon: Callable[[Behaviour], Daemon]) -> None:
    fake = daemon(output_lines)

    async def go() -> None:
        async with AsyncClient(fake.path, timeout=1.5, retry=None) as client:
            await client.call("status")

    raised = _ended(lambda: asyncio.run(go()))
    assert isinstance(raised, DaemonUnavailableError) and "within 1.5 s" in str(raised)


def _run(socket_path: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STOCKADE_SOCKET": socket_path}
    argv = [sys.executable, "-m", "stockade.cli", "run", *flags, "--", "true"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_stockade_run_ends_its_wait_for_a_trickling_daemon(daemon: Callable[[Behaviour], Daemon]) -> None:
    # The wait is the run's timeout and the client's 30 s: a daemon sending a byte every 0.2 s held it forever.
    done = _run(daemon(output_lines).path, "--timeout", "1")
    assert done.returncode == 125
    assert "stockade: the stockade daemon did not answer within 31 s" in done.stderr, done.stderr


def test_stockade_run_refuses_a_line_without_end_and_an_exit_status_no_process_has(
    daemon: Callable[[Behaviour], Daemon],
) -> None:
    assert LINE_LIMIT == CLIENT_LINE_LIMIT
    done = _run(daemon(endless_line).path)
    assert done.returncode == 125
    assert f"the daemon sent an invalid response: a line longer than {LINE_LIMIT} bytes" in done.stderr, done.stderr
    # Exit status 256 was exit status 0 here.
    done = _run(daemon(exit_256).path)
    assert done.returncode == 125 and "an exit code out of range" in done.stderr, done.stderr


@pytest.mark.parametrize("timeout", ["nan", "inf", "1e300"])
def test_a_timeout_that_is_no_number_of_seconds_is_refused_naming_the_flag(
    timeout: str, daemon: Callable[[Behaviour], Daemon]
) -> None:
    # It reached the socket's settimeout first: a traceback and exit status 1, the command's own.
    done = _run(daemon(exit_256).path, "--timeout", timeout)
    assert done.returncode == 125 and "--timeout (timeout_seconds)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_stockade_run_says_an_answer_it_cannot_read_is_invalid_not_a_traceback(
    daemon: Callable[[Behaviour], Daemon],
) -> None:
    # An output chunk that is not base64, an answer nested past the parser's depth: a traceback and
    # exit status 1, which is the command's own.
    for behaviour, said in ((bad_chunk, "an output chunk that is not base64"), (deep, "invalid response")):
        done = _run(daemon(behaviour).path)
        assert done.returncode == 125 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("command", "behaviour"),
    [(["daemon", "ping"], escapes_said), (["daemon", "selftest"], escapes_in_a_report),
     (["secrets", "ls"], escapes_in_a_report)],
)  # fmt: skip
def test_a_daemons_words_reach_the_terminal_as_text_not_as_escape_sequences(
    command: list[str], behaviour: Behaviour, daemon: Callable[[Behaviour], Daemon]
) -> None:
    env = {**os.environ, "STOCKADE_SOCKET": daemon(behaviour).path}
    done = subprocess.run([sys.executable, "-m", "stockade.cli", *command], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr, done
    assert "PWNED" in done.stdout + done.stderr, done


def test_stockade_secrets_ls_says_a_listing_of_the_wrong_shape_is_invalid(
    daemon: Callable[[Behaviour], Daemon],
) -> None:
    listings = [ESCAPES, {"secrets": [{"name": "K", "hosts": 5}]}, {"secrets": [{"name": "K", "hosts": "abc"}]}]
    for listing in listings:  # a string where the listing goes; hosts that are no list of names
        env = {**os.environ, "STOCKADE_SOCKET": daemon(answering(listing)).path}
        done = subprocess.run([sys.executable, "-m", "stockade.cli", "secrets", "ls"], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode != 0 and "invalid response" in done.stderr and "Traceback" not in done.stderr, done


def answering(result: object, output: object = None) -> Behaviour:
    """A daemon that answers every request with ``result`` (after one ``output`` line, if given)."""

    def behaviour(conn: socket.socket, msg_id: int) -> None:
        if output is not None:
            conn.sendall(json.dumps({"id": msg_id, "output": output}).encode() + b"\n")
        conn.sendall(json.dumps({"id": msg_id, "result": result, "error": None}).encode() + b"\n")

    return behaviour


@pytest.mark.parametrize(
    ("result", "call", "said"),
    [
        ({"data": "abc"}, lambda c: c.sandbox_read_file("s", "/f"), "data is not base64"),
        ({}, lambda c: c.create_sandbox(), r"no sandbox_id \(str\)"),
        ({"address": "127.0.0.1", "host_port": "notint", "port": 8000}, lambda c: c.sandbox_publish("s", 8000),
         r"no host_port \(int\)"),
        ({"entries": 5}, lambda c: c.sandbox_list_dir("s", "/"), r"no entries \(list\)"),
        ({"closed": "yes"}, lambda c: c.close_interpreter("s", "main"), r"no closed \(bool\)"),
        ([[]] * 2_000_001, lambda c: c.status(), "more than 2000000 JSON values"),
    ],
)  # fmt: skip
def test_an_answer_of_the_wrong_shape_is_a_stockade_error_naming_it(
    result: object, call: Callable[[Client], object], said: str, daemon: Callable[[Behaviour], Daemon]
) -> None:
    # It raised binascii.Error, KeyError or ValueError from the client, or was handed on as it came;
    # a line of 20 million empty lists took the client 2 GB.
    from stockade.errors import StockadeError

    with Client(daemon(answering(result)).path, timeout=30, retry=None) as client:
        with pytest.raises(StockadeError, match=said):
            call(client)


def test_an_output_chunk_that_is_not_base64_is_a_stockade_error(daemon: Callable[[Behaviour], Daemon]) -> None:
    from stockade.errors import StockadeError

    fake = daemon(answering({"exit_code": 0}, output={"stream": "stdout", "data": "abc"}))
    with Client(fake.path, timeout=30, retry=None) as client:
        with pytest.raises(StockadeError, match="an output chunk that is not base64"):
            client.execute(["true"], on_output=lambda stream, data: None)
