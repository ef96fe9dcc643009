"""Calls waiting for a held sandbox's turn, and a kept sandbox whose caller never learned its id.

Found by an attacker's review: a held sandbox runs one call at a time, and the calls behind it
waited without bound, each holding its request: 16 socket connections each sending one 16 MB
``write_file`` (over the 7 MiB a call takes, checked only once its turn came) added ~500 MB to
the daemon, and an HTTP client's calls kept waiting after it hung up. And a ``sandbox.create``
with ``keep`` whose client hung up before the answer left a sandbox nobody knew the id of,
holding its caller's slot until it idled out.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator

import pytest

from stockade.client import Client
from stockade.daemon.held_calls import MAX_WAITING_BYTES
from stockade.limits import MAX_CALL_BYTES
from tests.daemon_harness import Daemon, start_daemon


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon()
    yield d
    assert d.stop() == 0, d.logs()


def _line(method: str, params: dict[str, object], msg_id: int = 1) -> bytes:
    return (json.dumps({"method": method, "params": params, "id": msg_id}) + "\n").encode()


def _write(sandbox_id: str, data: str) -> bytes:
    return _line("sandbox.write_file", {"sandbox_id": sandbox_id, "path": "/tmp/x", "data": data})


def _answer(conn: socket.socket) -> dict[str, object]:
    said = b""
    while not said.endswith(b"\n"):
        chunk = conn.recv(1 << 20)
        assert chunk, f"the connection ended before its answer: {said[:200]!r}"
        said += chunk
    answer: dict[str, object] = json.loads(said)
    return answer


def test_calls_waiting_for_a_held_sandbox_are_bounded_and_an_oversized_one_never_waits(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client, client.sandbox(keep=True, timeout_seconds=120) as sb:
        busy = socket.socket(socket.AF_UNIX)
        busy.connect(daemon.socket_path)
        busy.sendall(_line("sandbox.exec", {"sandbox_id": sb.sandbox_id, "command": ["sleep", "60"], "timeout": 90}))
        deadline = time.monotonic() + 30
        while not any(s["idle_seconds"] == 0 for s in client.status()["active_sandboxes"]):  # in a call
            assert time.monotonic() < deadline, client.status()
            time.sleep(0.05)
        waiting: list[socket.socket] = []
        try:
            # Over what a call takes: refused at once, not after the sleep's 60 s.
            oversized = socket.socket(socket.AF_UNIX)
            waiting.append(oversized)
            oversized.connect(daemon.socket_path)
            oversized.settimeout(30)
            data = base64.b64encode(bytes(MAX_CALL_BYTES + 1)).decode()
            oversized.sendall(_write(sb.sandbox_id, data))
            refused = _answer(oversized)
            assert refused["error"] is not None and "too large" in str(refused["error"]), refused
            # The same as a spawn's first input: refused before it waits too.
            spawn = socket.socket(socket.AF_UNIX)
            waiting.append(spawn)
            spawn.connect(daemon.socket_path)
            spawn.settimeout(30)
            spawn.sendall(_line("sandbox.spawn", {"sandbox_id": sb.sandbox_id, "command": ["cat"], "stdin_b64": data}))
            refused = _answer(spawn)
            assert refused["error"] is not None and "too large" in str(refused["error"]), refused
            # Up to the limit: these wait their turn, holding their data; one past it is refused "busy".
            data = base64.b64encode(bytes(MAX_CALL_BYTES)).decode()
            holding = 0
            while holding + 2 * MAX_CALL_BYTES <= MAX_WAITING_BYTES:
                conn = socket.socket(socket.AF_UNIX)
                waiting.append(conn)
                conn.connect(daemon.socket_path)
                conn.sendall(_write(sb.sandbox_id, data))
                holding += MAX_CALL_BYTES + len(data)
            deadline = time.monotonic() + 60
            while True:  # the last ones' lines may still be read: asked again until one is refused
                extra = socket.socket(socket.AF_UNIX)
                waiting.append(extra)
                extra.connect(daemon.socket_path)
                extra.settimeout(30)
                extra.sendall(_write(sb.sandbox_id, data))
                extra.settimeout(2)
                try:
                    said = _answer(extra)
                except TimeoutError:
                    assert time.monotonic() < deadline, "no call was refused for the calls waiting"
                    continue
                break
            assert said["error"] is not None and "already wait for their sandboxes' turn" in str(said["error"]), said
        finally:
            for conn in waiting:
                conn.close()
            busy.close()


def test_a_kept_sandbox_whose_caller_hung_up_before_its_answer_is_closed(process_runtime: str) -> None:
    # One slot, taken: the create waits for it, its client hangs up meanwhile, and it is made once
    # the slot is free, for no one.
    daemon = start_daemon(env={"STOCKADE_MAX_SANDBOXES": "1"})
    try:
        with Client(daemon.socket_path) as client:
            first = client.sandbox(keep=True)
            first.__enter__()
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(daemon.socket_path)
            conn.sendall(_line("sandbox.create", {"keep": True, "policy": {}}))
            deadline = time.monotonic() + 30
            while not client.status()["waiting"]:
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.05)
            conn.close()
            first.__exit__(None, None, None)  # the slot is free: the create goes on, for no one
            deadline = time.monotonic() + 60
            while True:
                held = [s for s in client.status()["active_sandboxes"] if s["kind"] == "held"]
                if not held:
                    break
                assert time.monotonic() < deadline, held
                time.sleep(0.1)
            with client.sandbox(keep=True) as kept:  # one whose caller stays is kept
                assert kept.exec(["echo", "ok"]).stdout == "ok\n"
    finally:
        assert daemon.stop() == 0, daemon.logs()
