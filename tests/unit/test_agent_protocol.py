"""The guest agent answers every malformed input with the right JSON-RPC error or a clean close.

The agent runs as a real process (the fake runtime starts it unconfined) and
is spoken to with raw frames.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from collections.abc import Iterator

import pytest

from stockade import Policy
from stockade.agent import wire
from stockade.runtimes.fake import FakeRuntime, FakeSandbox, _exited


@pytest.fixture
def agent() -> Iterator[FakeSandbox]:
    sandbox = FakeRuntime().start(Policy())
    yield sandbox
    sandbox.close()


def _ask(sb: FakeSandbox, raw: bytes) -> dict[str, object]:
    sb.channel.conn.sendall(raw)
    ready, _, _ = select.select([sb.channel.conn], [], [], 10)
    assert ready, "the agent did not answer"
    reply = json.loads(wire.read_frame(sb.channel.conn))
    assert isinstance(reply, dict)
    return reply


def _code(reply: dict[str, object]) -> int:
    error = reply["error"]
    assert isinstance(error, dict)
    return int(error["code"])


def test_ping(agent: FakeSandbox) -> None:
    reply = _ask(agent, wire.encode_message(wire.request("ping", {}, 1)))
    assert reply["id"] == 1 and reply["result"]["pong"] is True  # type: ignore[index]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe\xfd", wire.PARSE_ERROR),
        (b"{not json", wire.PARSE_ERROR),
        (b"[1, 2]", wire.INVALID_REQUEST),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', wire.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', wire.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "format_disk"}', wire.METHOD_NOT_FOUND),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "exec", "params": [1]}', wire.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "exec", "params": {"argv": "ls"}}', wire.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "exec", "params": {"argv": ["true"], "timeout": -1}}',
         wire.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "run_code", "params": {"code": "1", "language": "cobol"}}',
         wire.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "write_file", "params": {"path": "/tmp/x", "data": "!!"}}',
         wire.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_file", "params": {"path": "/nonexistent/x"}}',
         wire.INTERNAL_ERROR),
    ],
)  # fmt: skip
def test_errors_have_the_right_code(agent: FakeSandbox, payload: bytes, code: int) -> None:
    assert _code(_ask(agent, wire.encode_frame(payload))) == code
    # and the agent is still there afterwards
    assert "result" in _ask(agent, wire.encode_message(wire.request("ping", {}, 2)))


def test_notification_gets_no_reply(agent: FakeSandbox) -> None:
    agent.channel.conn.sendall(wire.encode_message(wire.notification("ping", {})))
    reply = _ask(agent, wire.encode_message(wire.request("ping", {}, 9)))
    assert reply["id"] == 9


def test_oversized_length_closes_cleanly(agent: FakeSandbox) -> None:
    agent.channel.conn.sendall(struct.pack("<I", wire.MAX_FRAME + 1))
    ready, _, _ = select.select([agent.channel.conn], [], [], 10)
    assert ready and agent.channel.conn.recv(1) == b""  # closed, no hang
    assert agent.proc.wait(timeout=10) == 0


def test_truncated_frame_then_close_ends_the_agent(agent: FakeSandbox) -> None:
    agent.channel.conn.sendall(struct.pack("<I", 50) + b'{"jsonrpc"')
    agent.channel.conn.shutdown(1)  # SHUT_WR
    assert agent.proc.wait(timeout=10) == 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _wait_for_children(pid: int, within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while not (kids := _children(pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return kids


def test_agent_forks_the_next_runner_ahead_unless_told_no_request_follows() -> None:
    held, one_shot = FakeRuntime().start(Policy()), FakeRuntime().start(Policy())
    try:
        one_shot.one_shot = True
        for sb in (held, one_shot):
            assert sb.exec(["true"]).success
        # A held sandbox's agent forks its next runner as soon as it has answered.
        assert len(_wait_for_children(held.proc.pid, within_s=10)) == 1
        # A one-shot run says "last": its agent forks nothing, even given the time.
        time.sleep(0.5)
        assert _children(one_shot.proc.pid) == []
        # The hint never breaks a later request: its runner is forked on demand.
        again = one_shot.run_code("print(6 * 7)")
        assert again.success and again.stdout == "42\n"
    finally:
        held.close()
        one_shot.close()


def test_closing_a_fake_sandbox_ends_what_its_runs_left_behind(tmp_path: object) -> None:
    # The fake runtime has no pid namespace to end: a process that left its run's group or session,
    # or whose parent exited, used to outlive the sandbox. The agent is now their subreaper.
    sandbox = FakeRuntime().start(Policy())
    try:
        script = (
            "import os, subprocess, sys\n"
            "pids = [subprocess.Popen(['sleep', '30'], start_new_session=True).pid,\n"
            "        subprocess.Popen(['sleep', '30']).pid]\n"
            "if os.fork() == 0:\n"  # a grandchild whose parent exits at once: an orphan
            "    child = subprocess.Popen(['sleep', '30'])\n"
            "    os.write(1, f'{child.pid}\\n'.encode())\n"
            "    os._exit(0)\n"
            "os.wait()\n"
            "print(*pids, sep='\\n')\n"
        )
        result = sandbox.exec(["python3", "-c", script])
        assert result.termination_reason == "completed", result.stderr
        left = [int(p) for p in result.stdout.split()]
        assert len(left) == 3 and all(os.path.exists(f"/proc/{p}") for p in left)
    finally:
        sandbox.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_exited(p) for p in left):
        time.sleep(0.05)
    assert [p for p in left if not _exited(p)] == []
