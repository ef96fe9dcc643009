"""``ToolHost``: calls the tools of configured MCP servers, each in the isolate its config gives it.

- **ephemeral** (seed 001's phase 2): a fresh isolate under the tool's policy for each call;
  the server is started in it, an MCP session initialised over its stdio, the tool called,
  and everything torn down.
- **persistent** (phase 3): one isolate per server, under the server's policy, its session
  kept open and shared by every call (concurrent calls are concurrent requests of one
  session); a server that died or broke its session is started again at the next call.

Either way the result is the server's ``CallToolResult`` with stockade's verdict in its
``_meta`` (``stockade``: the runtime, the violations its isolate made, what ended it). A
call that outlives the tool's ``timeout_secs`` has its isolate killed and is answered with
an error saying so. ``direct`` servers (only where the config says so) run as a plain child
process, through the SDK's own stdio client.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from mcp import ClientSession, MCPError, types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CONNECTION_CLOSED
from pydantic import ValidationError

from ..egress.redact import Redactor
from ..errors import ConfigError, StockadeError, printable
from ..policy import Policy
from ..runtimes.manager import RuntimeManager, default_manager
from ..sdk import Sandbox
from .config import IsolationConfig, ServerConfig
from .records import hidden_values
from .transport import ReadBudget, ServerOutput, process_transport

T = TypeVar("T")
log = logging.getLogger("stockade.mcp")
DEFAULT_TIMEOUT_S = 30.0


class ToolError(StockadeError):
    """A tool call that did not get an answer from its server, or got a JSON-RPC error: why, and
    what the isolate did."""

    code = "tool_error"

    def __init__(self, message: str, verdict: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict or {}


class _Session(ClientSession):
    """The SDK's client session, less its check of a tool's result against the tool's
    ``outputSchema``. Both come from the server: the check says nothing of a server that is not
    trusted, and a schema of its choosing (a ``pattern`` that backtracks without end in ``re``,
    which holds the GIL) stopped every thread of this process, a daemon's other callers
    included, for as long as the server liked. A client of the gateway or of the daemon checks
    the result against the schema it was listed, if it wants, in a process of its own."""

    async def validate_tool_result(self, name: str, result: types.CallToolResult) -> None:
        return None


async def _call_tool(
    session: ClientSession, server_id: str, tool: str, arguments: dict[str, Any]
) -> types.CallToolResult:
    """The server's result of ``tool``: an answer of another kind (an input request, an extension's
    claimed result, which this host never asks for) is a ``ToolError``, not the SDK's own error."""
    try:
        result = await session.call_tool(tool, arguments, allow_input_required=True, allow_claimed=True)
    except ValidationError as exc:  # the SDK's check of the answer's shape: the server's own doing
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        said = printable(f"{where or 'the result'}: {errors[0]['msg'] if errors else 'invalid'}"[:200])
        raise ToolError(f"{server_id}.{tool} answered with a result that is not a tool's result ({said})") from None
    if not isinstance(result, types.CallToolResult):
        kind = type(result).__name__
        raise ToolError(f"{server_id}.{tool} answered with a {kind}, not a tool's result: it was not asked for one")
    return result


@dataclass
class _Live:
    """A persistent server: its isolate and its session, kept by a task of their own (``_keep``)."""

    sandbox: Sandbox | None = None
    session: ClientSession | None = None
    output: ServerOutput = field(default_factory=ServerOutput)
    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: str | None = None
    seen: dict[str, int] = field(default_factory=dict)  # its counters at the last verdict
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return not self.done.is_set() and self.output.exit_code is None and self.output.broken is None


class ToolHost:
    def __init__(
        self,
        config: IsolationConfig,
        manager: RuntimeManager | None = None,
        admit: Callable[[], AbstractAsyncContextManager[None]] | None = None,
        budget: ReadBudget | None = None,
        on_report: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        # Told what an isolate did outside any tool call's verdict, when it did anything: a listing's
        # isolate (``request``), a kept server's since its last call as it stops. (server, what, verdict)
        self._on_report = on_report
        self.manager = manager
        # Held around each isolate's life: a daemon's slots (an ephemeral call's, a kept server's).
        self._admit = admit or contextlib.nullcontext
        self._live: dict[str, _Live] = {}
        self._starting: dict[str, anyio.Lock] = {}
        self._budgets: dict[str, ReadBudget] = {}  # by server: every process of one draws on its one
        self._redactors: dict[str, Redactor | None] = {}  # by server: its environment's values (_hidden)
        # And each on ``budget`` too: a daemon's, per caller, who could otherwise bring fresh budgets with
        # each config it sends (a server renamed is another one), all read by the daemon's process.
        self._caller_budget = budget
        self._tasks: TaskGroup | None = None  # where persistent servers' keepers run (async with ToolHost)

    async def __aenter__(self) -> ToolHost:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            tasks.cancel_scope.cancel()  # a server still starting for a caller that left ends here too
            await tasks.__aexit__(None, None, None)

    def _placed(self, policy: Policy) -> Policy:
        """``execution_mode: "isolated"`` (a policy with a trust: config.py) runs on the strongest
        runtime that works here and serves it, not on its trust's own level."""
        if policy.trust is None:
            return policy
        runtime = (self.manager or default_manager()).strongest(policy)
        return policy.replace(runtime=runtime.name, trust=None)

    def kept(self) -> list[tuple[str, str, float]]:
        """The persistent servers running now: ``(server_id, runtime, started)`` (monotonic)."""
        return [
            (server_id, live.sandbox.runtime, live.started)
            for server_id, live in self._live.items()
            if live.sandbox is not None and live.alive()
        ]

    async def aclose(self) -> None:
        for server_id in list(self._live):
            await self._stop(server_id)

    # ---- calls --------------------------------------------------------------------------

    async def call(self, server_id: str, tool: str, arguments: dict[str, Any] | None = None) -> types.CallToolResult:
        """Call ``tool`` of ``server_id`` with ``arguments``: its result, with stockade's verdict in ``_meta``."""
        server = self.config.server(server_id)
        if not self.config.exposes(server_id, tool):
            raise ConfigError(
                f"tool {tool!r} of MCP server {server_id!r} is not offered: its config lists "
                f"{', '.join(sorted(server.tools)) or 'no tools'} (expose: listed)"
            )
        timeout = self._timeout(server_id, tool)
        try:
            with _unwrapped():
                if server.lifecycle == "persistent":
                    return await self._call_persistent(server_id, server, tool, arguments or {}, timeout)
                return await self._call_ephemeral(server_id, server, tool, arguments or {}, timeout)
        except ToolError as exc:
            raise self._hidden_in(server_id, exc) from None

    def _hidden(self, server_id: str) -> Redactor | None:
        """What stands for each value of ``server_id``'s environment in what is said of it: a
        server's words (its stderr, its errors) go to the caller, logs and the audit log, and the
        values of its ``env`` are often its keys."""
        if server_id not in self._redactors:
            self._redactors[server_id] = hidden_values(self.config.server(server_id))
        return self._redactors[server_id]

    def _hidden_in(self, server_id: str, exc: ToolError) -> ToolError:
        hidden = self._hidden(server_id)
        return ToolError(hidden.text(str(exc)), exc.verdict) if hidden is not None else exc

    def _budget(self, server_id: str) -> ReadBudget:
        budget = self._budgets.get(server_id)
        if budget is None:
            budget = self._budgets[server_id] = ReadBudget(above=self._caller_budget)
        return budget

    def _timeout(self, server_id: str, tool: str | None) -> float:
        """How long ``tool`` (None: its server, started) may take: its ``timeout_secs``."""
        return self.config.options(server_id, tool).timeout_secs or DEFAULT_TIMEOUT_S

    async def list_tools(self, server_id: str) -> list[types.Tool]:
        """The tools ``server_id`` offers that its config exposes (asked of the server itself)."""
        listed = await self.request(server_id, lambda session: every_page(server_id, session.list_tools, "tools"))
        return [t for t in listed if self.config.exposes(server_id, t.name)]

    async def request(self, server_id: str, ask: Callable[[ClientSession], Awaitable[T]]) -> T:
        """Any request of ``server_id`` (its capabilities, resources, prompts) by ``ask``: in its kept
        session, or in a fresh isolate of its own under the server's policy; answered within the
        server's ``timeout_secs`` (else ``ToolError``)."""
        server = self.config.server(server_id)
        timeout = self._timeout(server_id, None)
        try:
            with _unwrapped():
                if server.lifecycle == "persistent":
                    live = await self._persistent(server_id, server)
                    assert live.session is not None
                    return await _within(timeout, server_id, ask(live.session))
                async with self._ephemeral_session(server_id, server, None) as (session, _sandbox, _output):
                    return await _within(timeout, server_id, ask(session))
        except MCPError as exc:
            raise _answered_error(server_id, exc, hidden=self._hidden(server_id)) from None
        except ToolError as exc:
            raise self._hidden_in(server_id, exc) from None

    async def _call_ephemeral(
        self, server_id: str, server: ServerConfig, tool: str, arguments: dict[str, Any], timeout: float
    ) -> types.CallToolResult:
        async with self._ephemeral_session(server_id, server, tool) as (session, sandbox, output):
            with anyio.move_on_after(timeout) as deadline:
                try:
                    result = await _call_tool(session, server_id, tool, arguments)
                except ToolError as exc:  # an answer, but no tool's result: what the isolate did said all the same
                    raise ToolError(str(exc), await _verdict(sandbox, "ephemeral")) from None
                except (anyio.ClosedResourceError, anyio.BrokenResourceError, MCPError) as exc:
                    # What the isolate did is said whichever way the call went: a server could
                    # otherwise hide its refused calls by answering an error.
                    verdict = await _verdict(sandbox, "ephemeral")
                    if output.exit_code is None and output.broken is None:
                        if isinstance(exc, MCPError):
                            raise _answered_error(f"{server_id}.{tool}", exc, verdict, output.hidden) from None
                        raise
                    raise ToolError(f"{server_id} ended during the call: {output.describe(exc)}", verdict) from None
            if deadline.cancelled_caught:
                verdict = await _end(sandbox, "timeout", "ephemeral")
                raise ToolError(f"{server_id}.{tool} timed out after {timeout:g} s; its isolate was killed", verdict)
            return _with_verdict(result, await _verdict(sandbox, "ephemeral"))

    @asynccontextmanager
    async def _ephemeral_session(
        self, server_id: str, server: ServerConfig, tool: str | None
    ) -> AsyncIterator[tuple[ClientSession, Sandbox | None, ServerOutput]]:
        policy = self.config.policy_for(server_id, tool)
        output = ServerOutput(hidden=self._hidden(server_id))
        if policy is None:  # direct: the config says so itself
            params = StdioServerParameters(command=server.command, args=list(server.args), env=server.env or None)
            async with stdio_client(params) as (read, write), _Session(read, write) as session:
                await _initialise(session, server_id, output, self._timeout(server_id, None))
                yield session, None, output
            return
        async with self._admit():
            sandbox = await anyio.to_thread.run_sync(lambda: Sandbox(self._placed(policy), manager=self.manager))
            try:
                process = await anyio.to_thread.run_sync(lambda: sandbox.spawn([server.command, *server.args]))
                async with (
                    process_transport(process, output, self._budget(server_id)) as (read, write),
                    _Session(read, write) as session,
                ):
                    await _initialise(session, server_id, output, self._timeout(server_id, None))
                    yield session, sandbox, output
            finally:
                # What it did since its last verdict (a listing's isolate: all of it), before it goes.
                if not sandbox.closed:
                    await self._report(server_id, "request" if tool is None else "end", sandbox, "ephemeral")
                # Closed even as its caller goes (a call cancelled): else the isolate lived on,
                # past its timeout and outside the slot it gives back here.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(sandbox.close)

    async def _call_persistent(
        self, server_id: str, server: ServerConfig, tool: str, arguments: dict[str, Any], timeout: float
    ) -> types.CallToolResult:
        live = await self._persistent(server_id, server)
        assert live.session is not None and live.sandbox is not None
        with anyio.move_on_after(timeout) as deadline:
            try:
                result = await _call_tool(live.session, server_id, tool, arguments)
            except ToolError as exc:  # charged to this call, not the next (which may be another client's)
                raise ToolError(str(exc), await _verdict(live.sandbox, "persistent", live.seen)) from None
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, MCPError) as exc:
                verdict = await _verdict(live.sandbox, "persistent", live.seen)  # said either way
                if live.alive() and not _closed(exc):
                    if isinstance(exc, MCPError):
                        raise _answered_error(f"{server_id}.{tool}", exc, verdict, live.output.hidden) from None
                    raise
                await self._stop(server_id, live)  # started again at the next call
                raise ToolError(f"{server_id} ended during the call: {live.output.describe(exc)}", verdict) from None
        if deadline.cancelled_caught:
            verdict = await _end(live.sandbox, "timeout", "persistent", live.seen)
            await self._stop(server_id, live)  # started again at the next call
            raise ToolError(f"{server_id}.{tool} timed out after {timeout:g} s; its isolate was killed", verdict)
        return _with_verdict(result, await _verdict(live.sandbox, "persistent", live.seen))

    async def _persistent(self, server_id: str, server: ServerConfig) -> _Live:
        if self._tasks is None:
            raise ConfigError(f"MCP server {server_id!r} is persistent: call it through `async with ToolHost(...)`")
        lock = self._starting.setdefault(server_id, anyio.Lock())
        async with lock:
            live = self._live.get(server_id)
            if live is not None and live.alive():
                return live
            if live is not None:
                log.info("MCP server %s ended (%s): starting it again", server_id, live.output.describe())
                await self._stop(server_id, live)
            policy = self.config.policy_for(server_id, None)
            if policy is None:
                raise ConfigError(f"MCP server {server_id!r}: a persistent server runs in an isolate, not direct")
            live = _Live(output=ServerOutput(hidden=self._hidden(server_id)))
            self._tasks.start_soon(self._keep, live, server_id, server, policy)
            try:
                await live.ready.wait()
            except BaseException:  # the caller went away while it started: nobody else will stop it
                live.stop.set()
                raise
            if live.session is None:
                raise ToolError(live.error or f"MCP server {server_id} did not start: {live.output.describe()}")
            self._live[server_id] = live
            return live

    async def _keep(self, live: _Live, server_id: str, server: ServerConfig, policy: Any) -> None:
        """A persistent server's life, in a task of its own: whatever ends it ends here, not in a caller."""
        try:
            async with self._admit():
                with _unwrapped():  # a ToolError from inside the transport's task group, as itself
                    await self._serve_kept(live, server_id, server, policy)
        except Exception as exc:  # noqa: BLE001 - contained: the server's callers hear of it, the host goes on
            error = str(exc) if isinstance(exc, StockadeError) else f"{type(exc).__name__}: {exc}"
            live.error = live.output.hide(error)
            log.info("MCP server %s ended: %s (%s)", server_id, live.error, live.output.describe())
        finally:
            live.ready.set()
            live.done.set()

    async def _serve_kept(self, live: _Live, server_id: str, server: ServerConfig, policy: Any) -> None:
        try:
            live.sandbox = await anyio.to_thread.run_sync(lambda: Sandbox(self._placed(policy), manager=self.manager))
            process = await anyio.to_thread.run_sync(lambda: live.sandbox.spawn([server.command, *server.args]))  # type: ignore[union-attr]
            async with (
                process_transport(process, live.output, self._budget(server_id)) as (read, write),
                _Session(read, write) as session,
            ):
                await _initialise(session, server_id, live.output, self._timeout(server_id, None))
                live.session = session
                live.ready.set()
                await live.stop.wait()
        finally:
            if live.sandbox is not None:  # closed before its slot goes back
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(live.sandbox.close)

    async def _stop(self, server_id: str, live: _Live | None = None) -> None:
        """Stop ``server_id``'s kept server (``live``: only if it is still that one)."""
        current = self._live.get(server_id)
        if current is None or (live is not None and current is not live):
            return
        del self._live[server_id]
        current.stop.set()
        if current.sandbox is not None:  # a session stuck in a dead server's read ends with its isolate
            if not current.sandbox.closed:  # one ended at a timeout said its verdict then
                await self._report(server_id, "stop", current.sandbox, "persistent", current.seen)
            await anyio.to_thread.run_sync(current.sandbox.close)
        await current.done.wait()

    async def _report(
        self, server_id: str, what: str, sandbox: Sandbox | None, isolate: str, seen: dict[str, int] | None = None
    ) -> None:
        """Tell ``on_report`` what ``sandbox`` did since its last verdict, if it did anything."""
        if self._on_report is None or sandbox is None:
            return
        with anyio.CancelScope(shield=True):  # taken even as its caller goes: else it is said nowhere
            try:
                verdict = await _verdict(sandbox, isolate, seen)
            except Exception as exc:  # noqa: BLE001 - the isolate goes all the same
                log.info("MCP server %s: what its isolate did could not be taken: %s", server_id, exc)
                return
        if verdict["violation_counts"] or verdict["egress_requests"]:
            self._on_report(server_id, what, verdict)


@contextlib.contextmanager
def _unwrapped() -> Iterator[None]:
    """An error raised inside the transport's and the session's task groups reaches the caller as
    itself, not as a group of one."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None


MAX_PAGES = 64  # of one listing: a server whose cursors never end is read no further


async def every_page(server_id: str, listing: Callable[..., Awaitable[Any]], field: str) -> list[Any]:
    """Every item of a paginated listing (``session.list_tools``, ``field`` "tools"), its pages
    followed by their ``nextCursor`` up to MAX_PAGES (only the first was read: a server that pages
    its tools offered the first hundred or so)."""
    found: list[Any] = []
    params: types.PaginatedRequestParams | None = None
    for _ in range(MAX_PAGES):
        page = await listing(params=params)
        found += getattr(page, field)
        if not page.next_cursor:
            return found
        params = types.PaginatedRequestParams(cursor=page.next_cursor)
    log.warning("MCP server %s lists its %s on more than %d pages: the rest are left out", server_id, field, MAX_PAGES)
    return found


def _closed(exc: BaseException) -> bool:
    """Whether ``exc`` says the session's connection is gone (not an error the server answered).
    The SDK says so with -32000, which servers use for errors of their own too (JSON-RPC's range of
    server errors): only its own words are the SDK's."""
    return not isinstance(exc, MCPError) or (exc.error.code == CONNECTION_CLOSED and exc.error.message == _CLOSED_SAID)


_CLOSED_SAID = "Connection closed"  # the SDK's MCPError when the session's connection ends


async def _within(timeout: float, server_id: str, answer: Awaitable[T]) -> T:
    with anyio.move_on_after(timeout):
        return await answer
    raise ToolError(f"MCP server {server_id} did not answer in {timeout:g} s (its timeout_secs)")


async def _initialise(session: ClientSession, server_id: str, output: ServerOutput, timeout: float) -> None:
    """The session's ``initialize``, within the server's timeout: a server that never answers it
    holds its isolate (and a daemon's slot) no longer than one that never answers a call. Its
    environment, built on first use, is built before (``Sandbox``), under no such bound."""
    with anyio.move_on_after(timeout) as deadline:
        try:
            await session.initialize()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, MCPError) as exc:
            raise ToolError(f"MCP server {server_id} did not start: {output.describe(exc)}") from None
    if deadline.cancelled_caught:
        raise ToolError(f"MCP server {server_id} did not answer initialize in {timeout:g} s (its timeout_secs)")


async def _verdict(sandbox: Sandbox | None, isolate: str, seen: dict[str, int] | None = None) -> dict[str, Any]:
    """What the isolate did since its last report (taken on the host: nothing need run inside), and
    the limits it hit (``seen``: a kept isolate's counters at its last report)."""
    if sandbox is None:
        return {"runtime": "direct", "isolate": "none"}
    # On this host: memory, cgroup files, a round trip to the egress worker; off the event loop all the same.
    taken = await anyio.to_thread.run_sync(sandbox._sandbox.take_report)
    report, egress = taken.report, taken.egress
    usage = await anyio.to_thread.run_sync(sandbox._sandbox.usage)
    oom_before = (seen or {}).get("oom_kills", 0)
    if seen is not None:
        seen["oom_kills"] = usage.oom_kills
    return {
        "runtime": sandbox._sandbox.runtime_name,
        "isolate": isolate,
        "security_violations": [v.to_dict() for v in report.records],
        "violation_counts": report.counts,
        "violations_dropped": report.dropped,
        "limits_hit": ["memory_mb"] if usage.oom_kills > oom_before else [],  # a process of it killed for memory
        "memory_peak_mb": usage.memory_peak_mb,
        "cpu_seconds": usage.cpu_seconds,
        "unenforced_limits": list(sandbox._sandbox.unenforced_limits),
        "egress_requests": [r.to_dict() for r in egress],
        "egress_requests_dropped": taken.egress_dropped,
    }


async def _end(
    sandbox: Sandbox | None, reason: str, isolate: str, seen: dict[str, int] | None = None
) -> dict[str, Any]:
    """End ``sandbox`` for ``reason``: its verdict, taken first (a server that hangs past its
    timeout after refused calls must not hide them), then its isolate closed."""
    if sandbox is None:
        return {"runtime": "direct", "termination_reason": reason}
    with anyio.CancelScope(shield=True):  # taken and closed even as its caller goes
        try:
            verdict = await _verdict(sandbox, isolate, seen)
        except Exception as exc:  # noqa: BLE001 - it is ended all the same
            log.info("an MCP isolate's verdict could not be taken as it was ended: %s", exc)
            verdict = {"runtime": sandbox._sandbox.runtime_name}
        await anyio.to_thread.run_sync(sandbox.close)
    return {**verdict, "termination_reason": reason}


def _with_verdict(result: types.CallToolResult, verdict: dict[str, Any]) -> types.CallToolResult:
    meta = dict(result.meta or {})
    meta["stockade"] = verdict
    return result.model_copy(update={"meta": meta})


def _answered_error(
    what: str, exc: MCPError, verdict: dict[str, Any] | None = None, hidden: Redactor | None = None
) -> ToolError:
    """A JSON-RPC error the server answered (an unknown tool, bad arguments): its words are the
    server's, untrusted, so they come escaped (no terminal control, no line of their own), its
    environment's values hidden first (a value cut in two by the bound would be half said)."""
    message = hidden.text(str(exc.message)) if hidden is not None else str(exc.message)
    return ToolError(f"{what}: the server answered error {exc.code}: {printable(message[:2000])}", verdict)
