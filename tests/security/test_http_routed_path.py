"""The HTTP door decides what is open on the path the router runs, not on ``request.url``.

A Starlette before 1.0.1 rebuilt ``request.url`` from the Host header (CVE-2026-48710): with
``Host: x/health?`` the door saw ``/health`` (open, no token) while the router ran the path asked
for, so every route's reads and deletes needed no token. The test gives ``request.url`` that old
shape, whatever Starlette is installed, and asks with no token.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.datastructures import URL
from starlette.requests import Request

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.daemon.observers import Observers
from stockade.server.app import create_app
from stockade.server.door import HttpDoor


def _url_from_the_host_header(self: Request) -> URL:
    host = dict(self.scope["headers"]).get(b"host", b"").decode("latin-1")
    return URL(f"{self.scope['scheme']}://{host}{self.scope['path']}")


@pytest.mark.parametrize("host", ["x/health?", "x/static/dashboard.js#", "127.0.0.1/?"])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/v1/dashboard"), ("GET", "/api/v1/sandbox/status"), ("GET", "/metrics"),
     ("DELETE", "/api/v1/sandboxes/abc"), ("GET", "/api/v1/sandboxes/abc/files?path=/etc/passwd")],
)  # fmt: skip
def test_a_host_header_naming_an_open_path_opens_nothing(
    monkeypatch: pytest.MonkeyPatch, host: str, method: str, path: str
) -> None:
    monkeypatch.setattr(Request, "url", property(_url_from_the_host_header))

    async def scenario() -> httpx.Response:
        controller = Controller(DaemonConfig(pool_size=0))
        door = HttpDoor(
            controller, Observers(), "s3cret-token", client_rps=100, agent_rps=100, health=lambda: [],
            host_names=frozenset({"x", "127.0.0.1"}),
        )  # fmt: skip
        transport = httpx.ASGITransport(app=create_app(door), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                return await http.request(method, path, headers={"host": host})
        finally:
            await controller.shutdown(0.0)

    answer = asyncio.run(scenario())
    assert answer.status_code == 401, (answer.status_code, answer.text)
    assert answer.json()["code"] == "auth", answer.text
