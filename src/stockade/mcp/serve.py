"""``stockade mcp serve``: stockade itself as an MCP server, for agents that speak MCP.

Tools ``run_code``, ``exec``, ``write_file``, ``read_file``, ``list_dir`` act on one sandbox
held for the MCP session (made at its first call, under the policy the command's flags give,
closed when the session ends), through the same transport-free controller as the daemon's
other doors (daemon/controller.py): the same request models, limits and error codes. A run's
result is its text (stdout, then stderr, then how it ended) and, as structured content, the
``ExecResult`` without its raw bytes; a run that did not succeed is an MCP error result.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import anyio
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from pydantic import ValidationError

from ..daemon.config import DaemonConfig
from ..daemon.controller import Controller
from ..errors import SandboxLostError, StockadeError
from ..policy import Policy
from ..protocol.models import (
    Caller,
    ListDir,
    ReadFile,
    SandboxCreate,
    SandboxExec,
    SandboxRef,
    SandboxRunCode,
    WriteFile,
    request_error,
)
from ..result import ExecResult
from .http import SESSION_IDLE_S, serve_http

log = logging.getLogger("stockade.mcp")
MAX_READ_BYTES = 1 << 20  # what read_file returns at most unless asked for less

_PATH = {"type": "string", "description": "a path inside the sandbox (relative: under /work)"}
# fmt: off
TOOLS = [
    types.Tool(
        name="run_code",
        description="Run code in the sandbox (python, or bash). Files and processes persist between calls; with "
        "session, Python runs as a cell of a stateful interpreter (variables and imports kept).",
        input_schema={"type": "object", "required": ["code"], "additionalProperties": False, "properties": {
            "code": {"type": "string"}, "language": {"type": "string", "enum": ["python", "bash"]},
            "session": {"type": "string", "description": "a stateful interpreter's name"},
            "timeout": {"type": "number", "description": "seconds (the policy's limit still holds)"}}},
    ),
    types.Tool(
        name="exec",
        description="Run a command (argv, no shell) in the sandbox.",
        input_schema={"type": "object", "required": ["command"], "additionalProperties": False, "properties": {
            "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "cwd": _PATH, "timeout": {"type": "number"}}},
    ),
    types.Tool(
        name="write_file",
        description="Write a file in the sandbox: content as text, or content_base64 for bytes.",
        input_schema={"type": "object", "required": ["path"], "additionalProperties": False, "properties": {
            "path": _PATH, "content": {"type": "string"}, "content_base64": {"type": "string"},
            "mode": {"type": "integer", "description": "permission bits, e.g. 420 (0o644)"}}},
    ),
    types.Tool(
        name="read_file",
        description="Read a file of the sandbox: its text (UTF-8), or base64 when it is not text.",
        input_schema={"type": "object", "required": ["path"], "additionalProperties": False, "properties": {
            "path": _PATH, "max_bytes": {"type": "integer", "minimum": 0}}},
    ),
    types.Tool(
        name="list_dir",
        description="List a directory of the sandbox: name, type, size and mode of each entry.",
        input_schema={"type": "object", "required": ["path"], "additionalProperties": False,
                      "properties": {"path": _PATH}},
    ),
]
# fmt: on


class StockadeTools:
    """The MCP session's sandbox and the five tools on it."""

    def __init__(self, controller: Controller, policy: Policy) -> None:
        self.controller = controller
        self.policy = policy
        self.caller = Caller("mcp", "mcp")
        # Each MCP session's sandbox, by its Mcp-Session-Id (stdio has one session, keyed ""): one the
        # SDK has checked (http.py refuses the stateless wire, which checks none).
        self._sandboxes: dict[str, str] = {}
        self._made: list[str] = []
        # A session's first calls may come at once: one makes its sandbox, the others wait for it.
        self._making: dict[str, anyio.Lock] = {}

    async def list_tools(self, _ctx: Any, _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=TOOLS)

    async def call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        # null for an argument left out (bridges with strict schemas send every field): not given.
        args = {key: value for key, value in (params.arguments or {}).items() if value is not None}
        try:
            return await self._call(_session_id(ctx), params.name, args)
        except ValidationError as exc:  # as the daemon's doors word it: each argument refused, by name
            return _text(f"{params.name}: {request_error(exc, 'arguments')}", error=True)
        except (StockadeError, ValueError) as exc:
            return _text(f"{params.name}: {exc}", error=True)

    async def _call(self, session: str, name: str, args: dict[str, Any]) -> types.CallToolResult:
        tool = next((t for t in TOOLS if t.name == name), None)
        if tool is None:
            return _text(f"no tool {name!r}: {', '.join(t.name for t in TOOLS)}", error=True)
        if (problem := _arguments_problem(tool, args)) is not None:
            return _text(f"{name}: {problem}", error=True)
        sandbox_id = await self._sandbox(session)
        if name == "run_code":
            code = SandboxRunCode(sandbox_id=sandbox_id, **args)
            return _run(await self.controller.sandbox_run(code, self.caller))
        if name == "exec":
            return _run(await self.controller.sandbox_run(SandboxExec(sandbox_id=sandbox_id, **args), self.caller))
        if name == "write_file":
            raw = (base64.b64decode(args.pop("content_base64"), validate=True) if "content_base64" in args
                   else str(args.pop("content", "")).encode())  # fmt: skip
            write = WriteFile(sandbox_id=sandbox_id, data=base64.b64encode(raw).decode(), **args)
            written = await self.controller.write_file(write, self.caller)
            return _text(f"wrote {written.size} bytes to {written.path}")
        if name == "read_file":
            args.setdefault("max_bytes", MAX_READ_BYTES)
            data = base64.b64decode((await self.controller.read_file(ReadFile(sandbox_id=sandbox_id, **args),
                                                                     self.caller)).data)  # fmt: skip
            try:
                return _text(data.decode("utf-8"))
            except UnicodeDecodeError:
                return _text(base64.b64encode(data).decode(), structured={"base64": True, "size": len(data)})
        listing = await self.controller.list_dir(ListDir(sandbox_id=sandbox_id, **args), self.caller)
        return _text(json.dumps(listing.entries), structured={"entries": listing.entries})

    async def _sandbox(self, session: str) -> str:
        lock = self._making.setdefault(session, anyio.Lock())
        try:
            async with lock:
                # end_session forgets the session's lock: a call holding it finds the session gone.
                if self._making.get(session) is not lock:
                    raise SandboxLostError("this MCP session ended while this call waited for its sandbox")
                sandbox_id = await self._sandbox_of(session)
                if self._making.get(session) is not lock:  # ended while its sandbox was made: none would close it
                    self._sandboxes.pop(session, None)
                    if sandbox_id in self.controller.held:
                        await self.controller.close_sandbox(SandboxRef(sandbox_id=sandbox_id), self.caller)
                    raise SandboxLostError("this MCP session ended while its sandbox was being made")
                return sandbox_id
        finally:
            # None made (the host busy, say): kept, it would outlive a session that ends idle.
            if session not in self._sandboxes:
                self._drop_lock(session)

    def _drop_lock(self, session: str) -> None:
        """Forget ``session``'s lock, unless a call holds it or waits for it (one woken to take it
        holds it already): a call after would make another, and a second sandbox with it."""
        lock = self._making.get(session)
        if lock is not None and not lock.locked() and lock.statistics().tasks_waiting == 0:
            del self._making[session]

    async def _sandbox_of(self, session: str) -> str:
        sandbox_id = self._sandboxes.get(session)
        if sandbox_id is not None and sandbox_id not in self.controller.held:
            del self._sandboxes[session]
            limit = self.controller.config.sandbox_idle_timeout
            raise SandboxLostError(
                f"this session's sandbox was closed after {limit:g} s without a call (STOCKADE_SANDBOX_IDLE_TIMEOUT), "
                "with its files: the next call makes a new one"
            )
        if sandbox_id is None:
            for gone in [k for k, v in self._sandboxes.items() if v not in self.controller.held]:
                del self._sandboxes[gone]  # sessions whose sandboxes ended idle, asked for no more
                if gone != session:
                    self._drop_lock(gone)
            created = await self.controller.create(SandboxCreate(policy=self.policy, keep=True), self.caller)
            sandbox_id = self._sandboxes[session] = created.sandbox_id
            self._made = [*(m for m in self._made if m in self.controller.held), sandbox_id]  # gone ones forgotten
            log.info("an MCP session's sandbox: %s (%s)", sandbox_id, created.runtime)
        return sandbox_id

    async def end_session(self, session: str) -> None:
        """The client ended ``session`` (over HTTP): its sandbox goes with it, files and all (one being
        made is closed once it is)."""
        self._making.pop(session, None)  # a call making its sandbox now closes it once made (_sandbox)
        sandbox_id = self._sandboxes.pop(session, None)
        if sandbox_id is not None and sandbox_id in self.controller.held:
            log.info("an MCP session ended: its sandbox %s is closed", sandbox_id)
            await self.controller.close_sandbox(SandboxRef(sandbox_id=sandbox_id), self.caller)

    async def close(self) -> None:
        for sandbox_id in self._made:
            if sandbox_id in self.controller.held:
                await self.controller.close_sandbox(SandboxRef(sandbox_id=sandbox_id), self.caller)
        self._made.clear()

    def server(self) -> Server[Any]:
        return Server(
            "stockade",
            instructions="A sandbox for running code: run_code, exec, write_file, read_file, list_dir. "
            "It keeps its files and processes for this session.",
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
        )


def sessions_config(config: DaemonConfig, http: bool) -> DaemonConfig:
    """On stdio, one session, one client: its sandbox lives as long as it does. Over HTTP a session
    lasts as long as its sandbox would without a call, and one never idles out for 30 minutes (the
    SDK's): the SDK ends a session left idle and tells nobody, so its sandbox must go by then too."""
    if not http:
        return config.replace(sandbox_idle_timeout=None)
    if config.sandbox_idle_timeout is None:
        return config.replace(sandbox_idle_timeout=SESSION_IDLE_S)
    return config


async def serve(policy: Policy, http: str | None = None, token: str | None = None) -> None:
    """stockade's tools on this process's stdin and stdout (until the client closes them), or on
    streamable HTTP at ``http`` (until the process is stopped)."""
    config = sessions_config(DaemonConfig.from_env(), http is not None)
    controller = Controller(config)
    tools = StockadeTools(controller, policy)
    try:
        server = tools.server()
        if http is not None:
            assert token is not None
            await serve_http(server, http, token, tools.end_session, config.sandbox_idle_timeout)
        else:
            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())
    finally:
        await tools.close()
        await controller.shutdown(0.0)


def _arguments_problem(tool: types.Tool, args: dict[str, Any]) -> str | None:
    """What is wrong with ``args`` by ``tool``'s schema, before any reaches a request: an argument it
    does not take (``sandbox_id`` is the session's, never the client's), one it needs, a text that is
    none. The request models check the rest (numbers, the command's list, the mode's range)."""
    properties = tool.input_schema["properties"]
    unknown = sorted(set(args) - set(properties))
    if unknown:
        return f"no argument {', '.join(map(repr, unknown))} (it takes {', '.join(properties)})"
    missing = [key for key in tool.input_schema.get("required", []) if key not in args]
    if missing:
        return f"missing argument {', '.join(map(repr, missing))}"
    for key, value in args.items():
        if properties[key].get("type") == "string" and not isinstance(value, str):
            return f"{key} must be a string, not {type(value).__name__}"
    return None


def _session_id(ctx: Any) -> str:
    """The MCP session a request belongs to: its ``Mcp-Session-Id`` over HTTP, "" on stdio."""
    headers = getattr(getattr(ctx, "request", None), "headers", None)
    return str(headers.get("mcp-session-id", "")) if headers is not None else ""


def _run(result: ExecResult) -> types.CallToolResult:
    """A run as MCP content: its output, a cell's values (text; PNG figures as images) and exception,
    then how it ended; the ExecResult (without raw bytes) as structured content."""
    said = [result.stdout] if result.stdout else []
    images: list[types.ImageContent] = []
    for output in result.results:
        if "image/png" in output.data:
            images.append(types.ImageContent(type="image", data=output.data["image/png"], mime_type="image/png"))
        elif output.text is not None:
            said.append(output.text)
    if result.exception is not None:
        said.append(result.exception.traceback or f"{result.exception.name}: {result.exception.value}")
    if result.stderr:
        said.append(f"[stderr]\n{result.stderr}")
    said.append(f"[{result.termination_reason}, exit code {result.exit_code}]")
    summary = {k: v for k, v in result.to_dict().items() if k not in ("stdout_bytes", "stderr_bytes")}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text="\n".join(said)), *images],
        structured_content=summary,
        is_error=not result.success,
    )


def _text(text: str, structured: dict[str, Any] | None = None, error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], structured_content=structured, is_error=error
    )
