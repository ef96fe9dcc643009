"""A client that hangs up once its code has made its escape attempts does not take them out of the
audit log: the run is recorded with every call the host refused it (a live daemon, the process
runtime, its seccomp supervisor)."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.daemon_harness import start_daemon

# 50 unshare(CLONE_NEWUSER) calls, each refused and seen by the host; then the code waits.
CODE = (
    "import ctypes, time\nlibc = ctypes.CDLL(None)\n"
    "[libc.syscall(272, 0x10000000) for _ in range(50)]\n"
    "print('attempts done', flush=True)\ntime.sleep(30)\n"
)


def _records(path: str, agent_id: str) -> list[dict[str, object]]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("agent_id") == agent_id]


def test_a_streamed_run_whose_client_hung_up_is_audited_with_its_refused_calls() -> None:
    daemon = start_daemon(http="127.0.0.1:0")
    try:
        host, port = daemon.http_url.removeprefix("http://").split(":")
        body = json.dumps({"agent_id": "mallory", "command": ["python3", "-c", CODE], "runtime": "process"}).encode()
        with socket.create_connection((host, int(port)), timeout=60) as client:
            client.sendall(
                b"POST /api/v1/sandbox/execute?stream=true HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            got = b""
            while b"attempts done" not in got:
                chunk = client.recv(65536)
                assert chunk, got
                got += chunk
        # Gone: its run is ended, and recorded with what the host refused it.
        deadline = time.monotonic() + 30
        while not any(r["event"] == "execution" for r in _records(daemon.audit_log, "mallory")):
            assert time.monotonic() < deadline, "the run was never recorded"
            time.sleep(0.1)
        records = _records(daemon.audit_log, "mallory")
        (execution,) = [r for r in records if r["event"] == "execution"]
        assert execution["outcome"] == "killed" and execution["violations"] == 50, execution
        assert any(r["event"] == "violation" and r.get("syscall") == "unshare" for r in records), records
        metrics = httpx.get(daemon.http_url + "/metrics", timeout=30).text
        assert 'stockade_escape_attempts_total{pattern="container_runtime"} 50.0' in metrics
    finally:
        daemon.stop()
