"""Every real server nobody here wrote, through every way in, ephemeral and persistent.

`mcp-server-time` and `mcp-server-fetch` (PyPI) and the reference `server-everything` (npm, run
with the host's `node`), each called through `stockade mcp call-tool` (persistent: through a
daemon, which keeps the server) and through the gateway driven by the SDK's client.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import require
from tests.daemon_harness import Daemon, start_daemon
from tests.egress_harness import Upstreams, serve_upstreams
from tests.integration.test_mcp import FETCH_PACKAGE, STOCKADE, TIME
from tests.integration.test_mcp_npm import EVERYTHING, npm_dir  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def up() -> Iterator[Upstreams]:
    yield from serve_upstreams()


@pytest.fixture
def daemon(up: Upstreams) -> Iterator[Daemon]:
    require("process")
    # The callers' store (a session's own, once a test asked for one), and a daemon that builds a
    # server's packages itself: its test then needs no build of an earlier test's.
    passed = {k: v for k, v in os.environ.items() if k.startswith(("STOCKADE_EGRESS", "STOCKADE_ENV_STORE"))}
    started = start_daemon(env={**passed, "STOCKADE_BUILD_PACKAGES": "1"})
    try:
        yield started
    finally:
        started.stop()
        started.cleanup()


def servers(lifecycle: str, up: Upstreams, npm: str) -> dict[str, Any]:
    allowed = f"api.stockade.test:{up.http.port}"
    return {
        "time": {**TIME, "lifecycle": lifecycle, "expose": "all"},
        "fetch": {"command": "mcp-server-fetch", "args": ["--ignore-robots-txt", "--allow-private-ips"],
                  "packages": [FETCH_PACKAGE], "allowed_hosts": [allowed], "allowed_cidrs": ["127.0.0.0/8"],
                  "lifecycle": lifecycle, "expose": "all", "timeout_secs": 120},
        "everything": {"command": "node", "args": [EVERYTHING, "stdio"], "lifecycle": lifecycle, "expose": "all",
                       "timeout_secs": 60, "mounts": [{"host_path": npm, "guest_path": "/srv/npm"}]},
    }  # fmt: skip


def calls(up: Upstreams) -> list[tuple[str, str, dict[str, Any], str]]:
    """(server, tool, arguments, what the answer's text holds)."""
    return [
        ("time", "get_current_time", {"timezone": "Asia/Tokyo"}, '"timezone": "Asia/Tokyo"'),
        ("fetch", "fetch", {"url": f"http://api.stockade.test:{up.http.port}/matrix", "raw": True}, '"/matrix"'),
        ("everything", "get-sum", {"a": 20, "b": 22}, "The sum of 20 and 22 is 42."),
    ]


@pytest.mark.parametrize("lifecycle", ["ephemeral", "persistent"])
def test_call_tool(lifecycle: str, up: Upstreams, npm_dir: str, daemon: Daemon, tmp_path: Any) -> None:  # noqa: F811
    """Ephemeral in the calling process; persistent through a daemon, which keeps each server."""
    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps({"mcp_servers": servers(lifecycle, up, npm_dir)}))
    through = ["--socket", daemon.socket_path, "--require-daemon"] if lifecycle == "persistent" else []
    for server, tool, arguments, expected in calls(up):
        for _ in range(2 if lifecycle == "persistent" else 1):  # the second call: the kept server
            done = subprocess.run(
                [STOCKADE, "mcp", "call-tool", "--config", str(path), "--json", *through, server, tool,
                 json.dumps(arguments)],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, (server, done.stderr)
            result = json.loads(done.stdout)
            assert expected in result["content"][0]["text"], (server, result)
            assert result["_meta"]["stockade"]["isolate"] == lifecycle


@pytest.mark.parametrize("lifecycle", ["ephemeral", "persistent"])
def test_gateway(lifecycle: str, up: Upstreams, npm_dir: str, tmp_path: Any) -> None:  # noqa: F811
    require("process")
    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps({"mcp_servers": servers(lifecycle, up, npm_dir)}))
    params = StdioServerParameters(command=STOCKADE, args=["mcp", "gateway", "--config", str(path),
                                                           "--audit-log", "off"], env=dict(os.environ))  # fmt: skip

    async def drive() -> None:
        with anyio.fail_after(600):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                names = {t.name for t in (await session.list_tools()).tools}
                for server, tool, arguments, expected in calls(up):
                    assert tool in names, names
                    result = await session.call_tool(tool, arguments)
                    assert not result.is_error and expected in result.content[0].text, (server, result)
                    assert result.meta["stockade"]["isolate"] == lifecycle

    anyio.run(drive)
