"""Background processes of a held sandbox through the daemon's HTTP API (and ``status``)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import pytest

from stockade.client import AsyncClient, Client
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


def test_a_client_spawns_and_drives_a_background_process(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, _ = http
    with Client(daemon.socket_path) as client, client.sandbox() as sb:
        echo = sb.spawn(["python3", "-c", ECHO])
        echo.write("one\n")
        assert sb.exec(["echo", "meanwhile"]).stdout == "meanwhile\n"
        echo.write("two\n", eof=True)
        assert echo.wait(30) == 0
        assert echo.read() == (b"got one\ngot two\n", b"")
        sleeper = sb.spawn(["sleep", "300"])
        assert sleeper.wait(0) is None  # asked, and still running
        sleeper.kill("SIGKILL")
        assert sleeper.wait(30) == -9
        chunks: list[bytes] = []
        assert sb.spawn(["sh", "-c", "echo a; echo b; exit 5"]).follow(lambda s, d: chunks.append(d)) == 5
        assert b"".join(chunks) == b"a\nb\n"
        assert {p["handle"] for p in sb.processes()} >= {echo.handle, sleeper.handle}


def test_the_async_client_spawns_too(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, _ = http

    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client, client.sandbox() as sb:
            proc = await sb.spawn(["sh", "-c", "read line; echo got $line"])
            await proc.write("hi\n", eof=True)
            assert await proc.wait(30) == 0
            assert await proc.read() == (b"got hi\n", b"")

    asyncio.run(scenario())
