"""A fault of the daemon's own, on the HTTP door: answered in the API's shape ({error, code}, 500),
as the socket door answers it, not as Starlette's plain-text page (a Ray cluster lost mid-claim was)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.daemon.observers import Observers
from stockade.server.app import create_app
from stockade.server.door import HttpDoor


def test_an_unexpected_exception_is_a_json_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> httpx.Response:
        controller = Controller(DaemonConfig(pool_size=0))

        def broken(*args: object) -> object:
            raise RuntimeError("the placement's library failed: /secret/host/path")

        controller.status = broken  # type: ignore[method-assign]
        door = HttpDoor(controller, Observers(), None, client_rps=100, agent_rps=100, health=lambda: [])
        transport = httpx.ASGITransport(app=create_app(door), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                return await http.get("/api/v1/sandbox/status")
        finally:
            await controller.shutdown(0.0)

    with caplog.at_level(logging.ERROR, logger="stockade.daemon"):
        answer = asyncio.run(scenario())
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json", answer.text
    assert answer.json() == {"error": "Internal error: RuntimeError", "code": "internal"}  # nothing of its text
    assert "the placement's library failed" in caplog.text  # the daemon's log has it


def test_every_answer_tells_caches_not_to_keep_it() -> None:
    # Authenticated JSON (status, metrics, files read) came with no Cache-Control: a cache between
    # a client and the API (or the browser's own) could keep another caller's answer.
    async def scenario() -> list[httpx.Response]:
        controller = Controller(DaemonConfig(pool_size=0))
        door = HttpDoor(controller, Observers(), None, client_rps=100, agent_rps=100, health=lambda: [])
        transport = httpx.ASGITransport(app=create_app(door), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                return [await http.get(path) for path in ("/api/v1/sandbox/status", "/metrics", "/health", "/nowhere")]
        finally:
            await controller.shutdown(0.0)

    for answer in asyncio.run(scenario()):
        assert answer.headers.get("cache-control") == "no-store", (answer.request.url, answer.headers)
        assert answer.headers["x-content-type-options"] == "nosniff"
