"""A daemon's callers cannot choose the ``fake`` runtime (isolation ``none``): it confines nothing,
so on a root daemon any caller (every local user, through a token-less loopback HTTP API) would run
commands as root. Refused at every door unless the daemon's owner allows it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from stockade.client import Client
from stockade.errors import PolicyError
from tests.daemon_harness import Daemon, start_daemon


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon(http="127.0.0.1:0")
    yield d
    assert d.stop() == 0, d.logs()


def test_no_door_serves_the_fake_runtime(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client:
        for fields in ({"runtime": "fake"}, {"isolation": "none"}):
            with pytest.raises(PolicyError, match="STOCKADE_ALLOW_UNISOLATED"):
                client.execute(["id", "-u"], **fields)
            with pytest.raises(PolicyError, match="unconfined"):
                client.sandbox(**fields).__enter__()
        assert client.status()["active_sandboxes"] == []
    assert daemon.http_url is not None
    with httpx.Client(base_url=daemon.http_url, timeout=60) as http:
        for policy in ({"runtime": "fake"}, {"isolation": "none"}):
            created = http.post("/api/v1/sandboxes", json={"policy": policy})
            assert created.status_code == 422 and "unconfined" in created.json()["error"], created.text
        ran = http.post("/api/v1/sandbox/execute", json={"agent_id": "a", "command": ["id"], "runtime": "fake"})
        assert ran.status_code == 422, ran.text  # the seed's runtimes name no fake
        # Nor is it offered: a caller reading the runtimes sees only what it may ask for.
        names = {r["name"] for r in http.get("/api/v1/runtimes", timeout=300).json()}
        assert "fake" not in names and "process" in names


def test_its_owner_may_allow_it(process_runtime: str) -> None:
    d = start_daemon(env={"STOCKADE_ALLOW_UNISOLATED": "1"})
    try:
        with Client(d.socket_path) as client:
            result = client.execute(["id", "-u"], runtime="fake")
            assert (result.runtime_used, result.stdout) == ("fake", "0\n")  # the daemon's own uid: why it is off
    finally:
        assert d.stop() == 0, d.logs()
