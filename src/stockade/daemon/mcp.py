"""``mcp.call_tool``: MCP tool calls made by the daemon, so that persistent servers outlive their callers.

``stockade mcp call-tool`` is one process a call: a persistent server kept by it would end with it.
Through a daemon, the server is kept there instead, in one isolate reused by every later call
with the same config from the same owner, and started again if it dies (docs/mcp.md). The config
travels in the request (the caller's file, read by the caller) and is checked here as it would be
there; the daemon keeps one ``ToolHost`` per (owner, config), each in a task of its own, until it
stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from ..errors import ConfigError
from ..protocol.models import ActiveSandbox, Answer, Caller, Request, items_at_most
from .controller import Controller
from .observers import Observers

if TYPE_CHECKING:
    from ..mcp.transport import ReadBudget

MAX_HOSTS_PER_OWNER = 16  # configs kept at once for one owner; its least recently used idle one goes first


class McpCall(Request):
    config: Annotated[dict[str, Any], items_at_most(16)] = Field(
        description="the isolation config (isolation_config.json's contents)"
    )
    server: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class McpResult(Answer):
    result: dict[str, Any]  # the MCP CallToolResult, as JSON (with _meta.stockade)


# A caller's budget for reading all of its MCP servers, in servers' worth (mcp/transport.py's rates):
# a few busy ones at once, and no more however many configs it sends.
CALLER_SERVERS = 4


@dataclass
class _Kept:
    host: Any  # ToolHost, entered by ``task``
    task: asyncio.Task[None]
    caller: Caller
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0  # in flight: never ended under them


@dataclass
class _Hosts:
    kept: dict[tuple[str, str], _Kept] = field(default_factory=dict)  # the most recently used last
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # What reading each caller's servers may cost the daemon (mcp/transport.py), each server drawing on
    # its own and on its caller's, whatever configs it sends; kept for the daemon's life (it refills).
    budgets: dict[str, ReadBudget] = field(default_factory=dict)


_hosts: weakref.WeakKeyDictionary[Controller, _Hosts] = weakref.WeakKeyDictionary()


def active(controller: Controller) -> list[ActiveSandbox]:
    """The isolates of the MCP servers this daemon keeps, for ``status``: each holds a slot."""
    hosts = _hosts.get(controller)
    if hosts is None:
        return []
    now = time.monotonic()
    return [
        ActiveSandbox(
            kind="mcp",
            runtime=runtime,
            owner=kept.caller.owner,
            owner_uid=kept.caller.uid,
            uptime_seconds=round(now - started, 3),
            mcp_server=server_id,
        )
        for kept in list(hosts.kept.values())
        for server_id, runtime, started in kept.host.kept()
    ]


async def call_tool(controller: Controller, request: McpCall, caller: Caller) -> McpResult:
    try:
        from ..mcp.config import IsolationConfig
        from ..mcp.records import call_record
        from ..mcp.tools import ToolError
    except ImportError as exc:
        raise ConfigError(f"this daemon has no MCP SDK: pip install 'stockade[mcp]' where it runs ({exc})") from None
    config = IsolationConfig.parse(request.config, "the request's config")
    config.server(request.server)
    if config.policy_for(request.server, request.tool) is None:
        # The config comes from the caller: "direct" here would run its command on the daemon's host,
        # as the daemon's user, outside any isolate.
        raise ConfigError(
            f"mcp_servers.{request.server}: execution_mode 'direct' runs no isolate, and a daemon runs none of "
            "its callers' commands outside one: call it in-process (without --socket) or give it a runtime"
        )
    kept = await _host(controller, config, caller)
    kept.calls += 1
    size = len(json.dumps(request.arguments))
    try:
        result = await kept.host.call(request.server, request.tool, request.arguments)
    except ToolError as exc:
        record = call_record(request.server, request.tool, size, "error", exc.verdict, str(exc))
        _observe(controller, caller, "mcp.call", record, exc.verdict)
        raise ConfigError(str(exc)) from None
    except Exception as exc:
        _observe(controller, caller, "mcp.call", call_record(request.server, request.tool, size, "error", {}, str(exc)))
        raise
    except BaseException:  # its caller went away: the call was ended (an ephemeral server's isolate with it)
        record = call_record(request.server, request.tool, size, "cancelled", {}, "its caller went away")
        _observe(controller, caller, "mcp.call", record)
        raise
    finally:
        kept.calls -= 1
    verdict = (result.meta or {}).get("stockade", {})
    outcome = "tool_error" if result.is_error else "ok"
    _observe(controller, caller, "mcp.call", call_record(request.server, request.tool, size, outcome, verdict), verdict)
    return McpResult(result=result.model_dump(mode="json", by_alias=True, exclude_none=True))


@contextlib.asynccontextmanager
async def _slot(controller: Controller, caller: Caller) -> AsyncIterator[None]:
    """One of the daemon's slots for an MCP isolate's life, as for a held sandbox's (max_sandboxes)."""
    await controller._take_slot(caller)
    try:
        yield
    finally:
        controller.slots.release(caller.owner)


def _observe(
    controller: Controller, caller: Caller, event: str, record: dict[str, Any], verdict: dict[str, Any] | None = None
) -> None:
    """An MCP call's (or an isolate's report's) audit record, and its violations counted."""
    for listener in controller.listeners:
        if isinstance(listener, Observers):  # the audit log's and the metrics' keeper
            listener.mcp_event(caller, event, record, verdict or {})


async def _host(controller: Controller, config: Any, caller: Caller) -> _Kept:
    from ..mcp.records import report_record
    from ..mcp.tools import ToolHost
    from ..mcp.transport import ReadBudget

    hosts = _hosts.setdefault(controller, _Hosts())
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    key = (caller.owner, digest)
    async with hosts.locks.setdefault(key, asyncio.Lock()):  # one host per key, however many ask at once
        kept = hosts.kept.pop(key, None)
        if kept is None or kept.task.done():
            budget = hosts.budgets.setdefault(caller.owner, ReadBudget(scale=CALLER_SERVERS))
            host = ToolHost(
                config, controller.manager, admit=lambda: _slot(controller, caller), budget=budget,
                on_report=lambda server, what, verdict: _observe(
                    controller, caller, "mcp.report", report_record(server, what, verdict), verdict
                ),
            )  # fmt: skip
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            stop = asyncio.Event()

            async def keep() -> None:
                try:
                    async with host:
                        ready.set_result(None)
                        await stop.wait()
                except BaseException as exc:
                    if not ready.done():
                        ready.set_exception(exc)
                    raise

            kept = _Kept(host, asyncio.create_task(keep(), name="stockade-mcp-host"), caller, stop)
            try:
                await ready
            except BaseException:  # it did not start, or its caller went away meanwhile: nothing kept
                await _end(kept)
                raise
        hosts.kept[key] = kept
    mine = [k for k in hosts.kept if k[0] == caller.owner]
    for old in mine[: max(0, len(mine) - MAX_HOSTS_PER_OWNER)]:
        idle = hosts.kept.get(old)
        if idle is not None and idle.calls == 0:  # idle: a call under way is never cut
            del hosts.kept[old]
            hosts.locks.pop(old, None)
            await _end(idle)
    return kept


async def _end(kept: _Kept) -> None:
    kept.stop.set()
    await asyncio.gather(kept.task, return_exceptions=True)


async def close_all(controller: Controller) -> None:
    """At the daemon's stop: every kept server, with its isolate."""
    hosts = _hosts.pop(controller, None)
    for kept in hosts.kept.values() if hosts is not None else ():
        await _end(kept)
