"""Background processes of a held sandbox through the daemon's HTTP API (and ``status``)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from stockade.client import Client
from tests.daemon_harness import Daemon, start_daemon

ECHO = "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\n"


@pytest.fixture
def http(process_runtime: str) -> Iterator[tuple[Daemon, httpx.Client]]:
    daemon = start_daemon(http="127.0.0.1:0")
    assert daemon.http_url is not None
    with httpx.Client(base_url=daemon.http_url, timeout=60) as client:
        yield daemon, client
    assert daemon.stop() == 0, daemon.logs()


def test_spawn_write_read_wait_kill_and_status(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, client = http
    sandbox = client.post("/api/v1/sandboxes", json={}).json()["sandbox_id"]
    base = f"/api/v1/sandboxes/{sandbox}/processes"
    started = client.post(base, json={"command": ["python3", "-c", ECHO]})
    assert started.status_code == 201, started.text
    echo = started.json()
    assert echo["running"] is True and echo["pid"] > 0 and echo["argv"][0] == "python3"
    handle = echo["handle"]
    assert client.post(f"{base}/{handle}/stdin", content=b"hello\n").status_code == 200
    # Another call on the sandbox while the process runs:
    ran = client.post(f"/api/v1/sandboxes/{sandbox}/exec", json={"command": ["echo", "meanwhile"]}).json()
    assert ran["stdout"] == "meanwhile\n"
    with Client(daemon.socket_path) as rpc:
        status = rpc.status()
    held = [s for s in status["active_sandboxes"] if s["sandbox_id"] == sandbox]
    assert held and [p["handle"] for p in held[0]["processes"]] == [handle], status
    assert client.post(f"{base}/{handle}/stdin", params={"eof": "true"}, content=b"bye\n").status_code == 200
    ended = client.post(f"{base}/{handle}/wait", params={"timeout": 30}).json()
    assert ended["running"] is False and ended["exit_code"] == 0
    output = client.get(f"{base}/{handle}/output").json()
    assert base64.b64decode(output["stdout"]) == b"got hello\ngot bye\n" and output["dropped"] == {
        "stdout": 0,
        "stderr": 0,
    }
    assert base64.b64decode(client.get(f"{base}/{handle}/output").json()["stdout"]) == b""  # read once
    sleeper = client.post(base, json={"command": ["sleep", "300"]}).json()
    killed = client.post(f"{base}/{sleeper['handle']}/kill", params={"signal": "SIGKILL"})
    assert killed.status_code == 200
    assert client.post(f"{base}/{sleeper['handle']}/wait", params={"timeout": 30}).json()["exit_code"] == -9
    every = client.get(base).json()["processes"]
    assert {p["handle"] for p in every} == {handle, sleeper["handle"]}
    assert client.get(f"{base}/p999/output").status_code == 404
    assert client.post(f"{base}/{handle}/kill", params={"signal": "SIGSEGV"}).status_code == 422
    assert client.post(f"{base}/{handle}/wait", params={"timeout": 601}).status_code == 422
    assert client.post(base, json={"command": []}).status_code == 422
    assert client.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 200
