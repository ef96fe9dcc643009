"""`stockade mcp gateway`, driven as an MCP client drives a server: the official SDK's client.

Three servers behind one gateway: `mcp-server-time` from PyPI (ephemeral, one tool listed), and
the suite's hostile server twice (persistent and ephemeral, every tool exposed, so their names
collide), plus one that cannot start. Each misbehaviour costs only its own tool's call.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcp.types import ResourceLink

from stockade.audit import verify
from tests.conftest import require
from tests.integration.test_mcp import HOSTILE_DIR, TIME

STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")


def test_the_gateway_offers_every_servers_tools_and_contains_each(tmp_path: Any) -> None:
    require("process")
    hostile = {"command": "python3", "args": ["/mcp/hostile.py"], "expose": "all", "timeout_secs": 60,
               "mounts": [{"host_path": HOSTILE_DIR, "guest_path": "/mcp"}]}  # fmt: skip
    config = {
        "mcp_servers": {
            "time": {**TIME, "tools": {"get_current_time": {}}},
            "bad": {**hostile, "lifecycle": "persistent"},
            "worse": {**hostile, "tools": {"sleep": {"timeout_secs": 2}}},
            "slow": {**hostile, "tools": {"sleep": {"timeout_secs": 600}}},
            "broken": {"command": "no-such-server"},
            # It never says what it offers: the gateway serves the others all the same.
            "stalled": {**hostile, "args": ["/mcp/hostile.py", "--stall", "tools/list"], "timeout_secs": 3},
            # Two offer one URI (by neither here: a read could not say whose), one its own.
            "docs": {**hostile, "args": ["/mcp/hostile.py", "--resource", "file:///shared/doc"], "tools": {}},
            "evil": {**hostile, "args": ["/mcp/hostile.py", "--resource", "file:///shared/doc"], "tools": {}},
            "notes": {**hostile, "args": ["/mcp/hostile.py", "--resource", "file:///notes"], "tools": {}},
            # Names of another server's, and one outside MCP's: never shown as that server's, left out.
            "namer": {**hostile, "args": ["/mcp/hostile.py", "--names", "time.convert_time,bad\x1bname"]},
            # A tool its config does not expose takes no name: time's get_current_time stays bare. What
            # its listing's isolate did (a refused call) is in the log though no tool call reports it.
            "quiet": {
                **hostile,
                "args": ["/mcp/hostile.py", "--names", "get_current_time", "--ptrace-on-list"],
                "expose": "listed",
                "tools": {"refuse": {}},
            },
        }
    }
    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps(config))
    audit = tmp_path / "audit.log"
    params = StdioServerParameters(
        command=STOCKADE, args=["mcp", "gateway", "--config", str(path), "--audit-log", str(audit)],
        env={**os.environ, "STOCKADE_POOL_SIZE": "0"},
    )  # fmt: skip

    async def drive() -> None:
        with anyio.fail_after(600):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                tools = {t.name: t for t in (await session.list_tools()).tools}
                names = set(tools)
                assert "get_current_time" in names and "convert_time" not in names  # listed only
                assert {"bad.echo", "worse.echo", "bad.snoop", "worse.sleep"} <= names  # collisions named
                assert not [n for n in names if n.startswith(("broken", "stalled"))]
                assert "namer.time.convert_time" in names and "time.convert_time" not in names
                assert not [n for n in names if n.endswith("name")]  # the one named "bad\\x1bname"
                assert not [n for n in names if "hidden_enum" in n]  # escaped, its enum would be another's
                # Dressed as time's: the title clients show first says whose it is; no terminal controls in
                # what it says of itself; no icon the client would fetch from where the server chose.
                dressed = tools["namer.time.convert_time"]
                assert dressed.title == "namer: time.get_current_time"
                assert dressed.annotations is not None and dressed.annotations.title == "namer: time.get_current_time"
                assert dressed.description == "the time \\x1b]0;PWNED\\x07\\x1b[31mred\\x0d\nstockade: forged line"
                assert [str(i.src) for i in dressed.icons or []] == ["data:image/png;base64,iVBORw0KGgo="]
                described = dressed.input_schema["properties"]["q"]["description"]
                assert described == "the query \\U000e0049"  # in the schema too: no hidden text
                resources = (await session.list_resources()).resources
                assert [str(r.uri) for r in resources] == ["file:///notes"]
                assert resources[0].title == "notes: github: Issues" and "\x1b" not in (resources[0].description or "")
                assert resources[0].mime_type is None  # "text/x\x1b[8m" is no media type
                assert [str(i.src) for i in resources[0].icons or []] == ["data:image/png;base64,iVBORw0KGgo="]
                notes = await session.read_resource("file:///notes")
                assert notes.contents[0].text == "file:///notes from --resource file:///notes"
                now = await session.call_tool("get_current_time", {"timezone": "Asia/Tokyo"})
                assert not now.is_error and json.loads(now.content[0].text)["timezone"] == "Asia/Tokyo"
                assert now.meta["stockade"]["runtime"] == "process"
                flooded = await session.call_tool("bad.flood", {})
                assert flooded.is_error and "bad ended during the call" in flooded.content[0].text
                echoed = await session.call_tool("bad.echo", {"after": "the flood"})
                assert json.loads(echoed.content[0].text) == {"after": "the flood"}
                slept = await session.call_tool("worse.sleep", {})
                assert slept.is_error and "timed out after 2 s" in slept.content[0].text
                # Given up by the client (notifications/cancelled): its isolate ends with it, recorded.
                with pytest.raises(MCPError, match="timed out"):
                    await session.call_tool("slow.sleep", {}, read_timeout_seconds=1)
                snooped = await session.call_tool("worse.snoop", {"secret-looking": "x" * 10})
                assert snooped.meta["stockade"]["violation_counts"].get("socket") == 1
                refused = await session.call_tool("quiet.refuse", {})
                said = refused.content[0].text
                assert refused.is_error and "quiet.refuse: the server answered error -32000: \\x1b]0;PWNED" in said
                assert "\x1b" not in said and "\nstockade: forged line" not in said, said
                linked = (await session.call_tool("bad.link", {})).content[0]
                assert isinstance(linked, ResourceLink) and linked.title == "bad: time: clock"
                assert [str(i.src) for i in linked.icons or []] == ["data:image/png;base64,iVBORw0KGgo="]
                missing = await session.call_tool("nope", {})
                assert missing.is_error and "no tool 'nope'" in missing.content[0].text

    anyio.run(drive)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    calls = [r for r in records if r["event"] == "mcp.call"]
    assert [(r["server"], r["tool"], r["outcome"]) for r in calls] == [
        ("time", "get_current_time", "ok"), ("bad", "flood", "error"), ("bad", "echo", "ok"),
        ("worse", "sleep", "error"), ("slow", "sleep", "cancelled"), ("worse", "snoop", "ok"),
        ("quiet", "refuse", "error"), ("bad", "link", "ok"),
    ]  # fmt: skip
    snoop = calls[-3]
    assert snoop["argument_bytes"] > 10 and "x" * 10 not in json.dumps(snoop), snoop
    assert snoop["violations"] == {"socket": 1, "ptrace": 1}
    reports = [(r["server"], r["what"], r["violations"]) for r in records if r["event"] == "mcp.report"]
    assert reports and all(said == ("quiet", "request", {"ptrace": 1}) for said in reports), reports
    assert verify([str(audit)]).ok


def test_the_gateway_runs_at_most_its_isolates_at_once(tmp_path: Any) -> None:
    """As a daemon's slots: a kept server holds the only one here, so another server's isolate waits
    STOCKADE_QUEUE_TIMEOUT for it, and the call is then refused by name, not run past the cap. (The
    survey at the start asks each server in turn in the one slot, however long each takes.)"""
    require("process")
    hostile = {"command": "python3", "args": ["/mcp/hostile.py"], "expose": "all", "timeout_secs": 60,
               "mounts": [{"host_path": HOSTILE_DIR, "guest_path": "/mcp"}]}  # fmt: skip
    config = {"mcp_servers": {"kept": {**hostile, "lifecycle": "persistent"}, "other": hostile}}
    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps(config))
    params = StdioServerParameters(
        command=STOCKADE, args=["mcp", "gateway", "--config", str(path), "--audit-log", "off"],
        env={**os.environ, "STOCKADE_POOL_SIZE": "0", "STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_TIMEOUT": "2"},
    )  # fmt: skip

    async def drive() -> None:
        with anyio.fail_after(300):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()  # each server surveyed in turn, in the one slot
                kept = await session.call_tool("kept.echo", {"a": 1})  # its isolate now holds the slot
                assert not kept.is_error and json.loads(kept.content[0].text) == {"a": 1}
                other = await session.call_tool("other.echo", {"b": 2})
                said = other.content[0].text
                assert other.is_error and "the gateway runs 1 isolates already (STOCKADE_MAX_SANDBOXES)" in said
                again = await session.call_tool("kept.count", {})  # the kept one goes on
                assert not again.is_error and json.loads(again.content[0].text) == 2

    anyio.run(drive)
