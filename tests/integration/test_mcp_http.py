"""The MCP doors on streamable HTTP: loopback only, a bearer token on every request, one sandbox
per MCP session for `stockade mcp serve`; the gateway the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.conftest import require
from tests.integration.test_mcp import HOSTILE_DIR

STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")
TOKEN = "t0ken-for-the-mcp-door-3f9a1c"


@contextmanager
def door(tmp_path: Any, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``stockade mcp ARGS --http 127.0.0.1:0`` (``env`` added to its environment); its URL while it runs."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [STOCKADE, "mcp", *args, "--http", "127.0.0.1:0", "--token-file", str(token_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "STOCKADE_POOL_SIZE": "0", "STOCKADE_CONFIG_DIR": str(tmp_path), **(env or {})},
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the door ended before it listened"
            if "MCP on http://" in line:
                url = line.split("MCP on ", 1)[1].strip()
        assert url is not None
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def session_calls(url: str, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
    async with client, streamable_http_client(url, http_client=client) as (read, write), \
            ClientSession(read, write) as session:  # fmt: skip
        await session.initialize()
        return [await session.call_tool(name, args) for name, args in calls]


def test_serve_over_http_needs_the_token_and_gives_each_session_its_own_sandbox(tmp_path: Any) -> None:
    require("process")
    with door(tmp_path, "serve", "--memory", "128") as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            refused = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=headers)
            assert refused.status_code == 401
        rebinding = httpx.post(url, json={}, headers={"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"})
        assert rebinding.status_code in (403, 421), rebinding.text  # the SDK's DNS-rebinding guard

        async def two_sessions() -> None:
            first = await session_calls(url, ("write_file", {"path": "/work/mine", "content": "one"}),
                                        ("read_file", {"path": "/work/mine"}))  # fmt: skip
            assert first[1].content[0].text == "one"
            second = await session_calls(url, ("exec", {"command": ["ls", "/work"]}))
            assert "mine" not in second[0].content[0].text  # another session: another sandbox

        anyio.run(two_sessions)


def test_serve_keeps_a_sandbox_to_one_session_the_sdk_checked_and_ends_it_with_the_session(tmp_path: Any) -> None:
    # (1) On the stateless wire (2026-07-28) the SDK checks no Mcp-Session-Id: every such client
    # shared the sandbox keyed "", and one that named another session's id was served in its sandbox.
    # (2) A session's first calls, made at once, each made a sandbox; the session kept the last.
    # (3) A session its client ended kept its sandbox, and its slot, until the idle timeout.
    require("process")
    env = {"STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_TIMEOUT": "60"}  # the ended session's sandbox closing
    with door(tmp_path, "serve", "--memory", "128", env=env) as url:
        modern = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json, text/event-stream",
                  "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "list_dir"}  # fmt: skip
        meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}  # fmt: skip
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "list_dir", "arguments": {"path": "/work"}, "_meta": meta}}  # fmt: skip
        for version in ("2026-07-28", ""):  # an empty one reaches the SDK's stateless entry too
            refused = httpx.post(url, json=call, headers={**modern, "MCP-Protocol-Version": version}, timeout=60)
            assert refused.status_code == 400 and "has no sessions" in refused.text, refused.text

        async def parallel_first_calls() -> None:
            client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
            async with client, streamable_http_client(url, http_client=client) as (read, write), \
                    ClientSession(read, write) as session:  # fmt: skip
                await session.initialize()
                async with anyio.create_task_group() as calls:
                    for name in ("a", "b", "c"):
                        calls.start_soon(session.call_tool, "write_file", {"path": f"/work/{name}", "content": name})
                listed = await session.call_tool("exec", {"command": ["ls", "/work"]})
                assert listed.content[0].text.split()[:4] == ["a", "b", "c", "[completed,"], listed.content[0].text
            # The client ended its session on the way out (DELETE): its sandbox, and the one slot, are free.

        anyio.run(parallel_first_calls)
        (fresh,) = anyio.run(session_calls, url, ("exec", {"command": ["ls", "/work"]}))
        assert not fresh.is_error and fresh.content[0].text.split()[:1] == ["[completed,"], fresh.content[0].text


def test_a_request_naming_two_sessions_is_refused(tmp_path: Any) -> None:
    # The SDK reads a header's first value, the door read its last: a DELETE naming one's own
    # session, then another's, ended the first and closed the second one's sandbox.
    require("process")
    auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json, text/event-stream"}

    def session(url: str) -> dict[str, str]:
        params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}
        hello = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
        opened = httpx.post(url, json=hello, headers=auth, timeout=60)
        headers = {**auth, "Mcp-Session-Id": opened.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-06-18"}
        httpx.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers, timeout=60)
        return headers

    def call(url: str, headers: dict[str, str], name: str, arguments: dict[str, Any]) -> str:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
        return httpx.post(url, json=body, headers=headers, timeout=120).text

    with door(tmp_path, "serve", "--memory", "128") as url:
        victim = session(url)
        assert "wrote" in call(url, victim, "write_file", {"path": "/work/secret", "content": "victim-data"})
        mine = session(url)
        both = [*auth.items(), ("Mcp-Session-Id", mine["Mcp-Session-Id"]),
                ("Mcp-Session-Id", victim["Mcp-Session-Id"]), ("MCP-Protocol-Version", "2025-06-18")]  # fmt: skip
        refused = httpx.delete(url, headers=both, timeout=60)
        assert refused.status_code == 400 and "one session" in refused.text, refused.text
        assert "victim-data" in call(url, victim, "read_file", {"path": "/work/secret"})


def test_the_gateway_over_http(tmp_path: Any) -> None:
    require("process")
    server = {"command": "python3", "args": ["/mcp/hostile.py"], "expose": "all",
              "mounts": [{"host_path": HOSTILE_DIR, "guest_path": "/mcp"}]}  # fmt: skip
    (tmp_path / "isolation_config.json").write_text(json.dumps({"mcp_servers": {"bad": server}}))
    with door(tmp_path, "gateway", "--audit-log", "off") as url:
        (echoed,) = anyio.run(session_calls, url, ("echo", {"over": "http"}))
        assert json.loads(echoed.content[0].text) == {"over": "http"}


def test_a_door_beyond_loopback_or_without_a_token_is_refused(tmp_path: Any) -> None:
    for args, said in (
        (["serve", "--http", "0.0.0.0:8003", "--token-file", "/dev/null"], "loopback only"),
        (["serve", "--http", "127.0.0.1:0"], "--http needs --token-file"),
        (["gateway", "--token-file", "/dev/null"], "--token-file is for --http"),
    ):
        done = subprocess.run([STOCKADE, "mcp", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 125 and said in done.stderr, done.stderr
