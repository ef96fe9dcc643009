"""``stockade mcp gateway``: one MCP server that an MCP client launches in place of the real ones.

It offers the exposed tools of every configured server (a tool's own name, or ``server.tool``
where two servers offer the same one), their resources and their prompts, and routes each
request into the isolate its config gives it (``ToolHost``). A server that misbehaves (a crash,
a hang, garbage, a flood) costs only its own tools: each of its calls is answered with an MCP
error result saying what happened, and the others go on. Every tool call is one audit record
(server, tool, argument size, outcome, verdict, egress) — never the arguments or the result.

What each server offers is asked once, when the gateway starts (every server at once, each in
an isolate under its own policy and within its ``timeout_secs``); a server that cannot be asked
is left out, and said so on stderr. A resource URI that two servers offer is offered by neither:
a read of it could not say whose answer it is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp import ClientSession, MCPError, types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from ..audit import AuditLog
from ..errors import printable, without_controls
from .config import IsolationConfig
from .http import serve_http
from .records import call_record, report_record
from .tools import ToolError, ToolHost, every_page

log = logging.getLogger("stockade.mcp")
SEPARATOR = "."
_MCP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # what MCP's specification allows a tool's name


@dataclass
class Offer:
    """What one server offers, as the gateway names it."""

    tools: dict[str, tuple[str, types.Tool]] = field(default_factory=dict)  # exposed name -> (its own, it)
    resources: dict[str, types.Resource] = field(default_factory=dict)  # uri -> it
    prompts: dict[str, tuple[str, types.Prompt]] = field(default_factory=dict)


class Gateway:
    def __init__(self, config: IsolationConfig, host: ToolHost, audit: AuditLog | None = None) -> None:
        self.config = config
        self.host = host
        self.audit = audit
        self.offers: dict[str, Offer] = {}
        self.unavailable: dict[str, str] = {}  # server -> why it offers nothing

    async def survey(self) -> None:
        """Ask every server what it offers; name each tool and prompt once across them all."""
        answers: dict[str, tuple[list[types.Tool], list[types.Resource], list[types.Prompt]]] = {}

        async def ask(server_id: str) -> None:
            try:
                answers[server_id] = await self.host.request(server_id, functools.partial(_describe, server_id))
            except Exception as exc:  # noqa: BLE001 - whatever one server does (an answer of the wrong shape too) costs only it
                self.unavailable[server_id] = printable(str(exc) or type(exc).__name__)  # its words, escaped
                log.warning("MCP server %s offers nothing here: %s", server_id, self.unavailable[server_id])

        async with anyio.create_task_group() as tasks:  # one that hangs costs its own timeout, not the others'
            for server_id in self.config.mcp_servers:
                tasks.start_soon(ask, server_id)
        found = {s: answers[s] for s in self.config.mcp_servers if s in answers}  # in the config's order
        offered_by = Counter(uri for _, resources, _ in found.values() for uri in {str(r.uri) for r in resources})
        for uri in sorted(u for u, count in offered_by.items() if count > 1):
            log.warning("MCP resource %s is offered by more than one server: by none here", printable(uri[:500]))
        # Only what a server may offer here is named: a tool its config does not expose takes no
        # name from another server's, and a name outside MCP's characters is not passed on.
        exposed = {s: [t for t in tools if self.config.exposes(s, t.name) and _well_named(s, "tool", t.name)
                       and _plain_structure(s, "tool", t)]
                   for s, (tools, _, _) in found.items()}  # fmt: skip
        kept = {s: [p for p in prompts if _well_named(s, "prompt", p.name) and _plain_structure(s, "prompt", p)]
                for s, (_, _, prompts) in found.items()}  # fmt: skip
        tool_names = _final_names({s: [t.name for t in tools] for s, tools in exposed.items()})
        prompt_names = _final_names({s: [p.name for p in prompts] for s, prompts in kept.items()})
        for server_id, (_, resources, _) in found.items():
            offer = self.offers[server_id] = Offer()
            for tool in exposed[server_id]:
                name = tool_names[server_id, tool.name]
                offer.tools[name] = (tool.name, _as_offered(tool, name, server_id))
            offer.resources = {str(r.uri): _as_offered(r, None, server_id) for r in resources
                               if offered_by[str(r.uri)] == 1 and _plain_uri(server_id, "resource", r.uri)}  # fmt: skip
            for prompt in kept[server_id]:
                name = prompt_names[server_id, prompt.name]
                offer.prompts[name] = (prompt.name, _as_offered(prompt, name, server_id))

    # ---- the MCP server's handlers --------------------------------------------------------

    async def list_tools(self, _ctx: Any, _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[t for o in self.offers.values() for _, t in o.tools.values()])

    async def call_tool(self, _ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        found = next(((s, o.tools[params.name][0]) for s, o in self.offers.items() if params.name in o.tools), None)
        if found is None:
            return _error(f"no tool {params.name!r} here")
        server_id, tool = found
        arguments = params.arguments or {}
        size = len(json.dumps(arguments))
        try:
            result = await self.host.call(server_id, tool, arguments)
        except ToolError as exc:
            self._record(server_id, tool, size, "error", exc.verdict, str(exc))
            return _error(str(exc), exc.verdict)
        except Exception as exc:  # noqa: BLE001 - every call is answered, and recorded, whatever broke
            said = str(exc) or type(exc).__name__
            self._record(server_id, tool, size, "error", {}, said)
            return _error(f"{server_id}.{tool}: {said}")
        except BaseException:  # cancelled by its client (notifications/cancelled, a session ended)
            self._record(server_id, tool, size, "cancelled", {}, "cancelled by the client")
            raise
        verdict = (result.meta or {}).get("stockade", {})
        self._record(server_id, tool, size, "tool_error" if result.is_error else "ok", verdict)
        return result.model_copy(update={"content": [_linked(c, server_id) for c in result.content]})

    async def list_resources(self, _ctx: Any, _params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[r for o in self.offers.values() for r in o.resources.values()])

    async def read_resource(self, _ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        server_id = next((s for s, o in self.offers.items() if uri in o.resources), None)
        if server_id is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"no resource {uri!r} here")
        return await self.host.request(server_id, lambda session: session.read_resource(uri))

    async def list_prompts(self, _ctx: Any, _params: Any) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=[p for o in self.offers.values() for _, p in o.prompts.values()])

    async def get_prompt(self, _ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        found = next(((s, o.prompts[params.name][0]) for s, o in self.offers.items() if params.name in o.prompts), None)
        if found is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"no prompt {params.name!r} here")
        server_id, name = found
        prompt = await self.host.request(server_id, lambda session: session.get_prompt(name, params.arguments))
        messages = [m.model_copy(update={"content": _linked(m.content, server_id)}) for m in prompt.messages]
        return prompt.model_copy(update={"messages": messages})

    def server(self) -> Server[Any]:
        return Server(
            "stockade-gateway",
            instructions="Tools of MCP servers, each run in a stockade isolate.",
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            on_list_resources=self.list_resources,
            on_read_resource=self.read_resource,
            on_list_prompts=self.list_prompts,
            on_get_prompt=self.get_prompt,
        )

    def _record(
        self, server_id: str, tool: str, size: int, outcome: str, verdict: dict[str, Any], error: str | None = None
    ) -> None:
        if self.audit is not None:
            self.audit.record("mcp.call", **call_record(server_id, tool, size, outcome, verdict, error))


async def serve(
    config: IsolationConfig, audit: AuditLog | None = None, http: str | None = None, token: str | None = None
) -> None:
    """The gateway on this process's stdin and stdout (until the client closes them), or on
    streamable HTTP at ``http`` (until the process is stopped)."""
    from ..settings import current

    # As a daemon's slots: past STOCKADE_MAX_SANDBOXES isolates at once (each up to its memory_mb; an
    # agent's parallel calls, kept servers), a call waits STOCKADE_QUEUE_TIMEOUT for one to end.
    # The survey at the start waits as long as it takes: each server is asked in turn, however many.
    settings = current()
    slots = anyio.Semaphore(settings.max_sandboxes)
    surveyed = False

    @contextlib.asynccontextmanager
    async def admit() -> AsyncIterator[None]:
        try:
            with anyio.fail_after(settings.queue_timeout if surveyed else None):
                await slots.acquire()
        except TimeoutError:
            raise ToolError(
                f"the gateway runs {settings.max_sandboxes} isolates already (STOCKADE_MAX_SANDBOXES), and none "
                f"ended within {settings.queue_timeout:g} s (STOCKADE_QUEUE_TIMEOUT)"
            ) from None
        try:
            yield
        finally:
            slots.release()

    def reported(server_id: str, what: str, verdict: dict[str, Any]) -> None:
        if audit is not None:  # what an isolate did outside a tool call (a listing's, a kept server's)
            audit.record("mcp.report", **report_record(server_id, what, verdict))

    async with ToolHost(config, admit=admit, on_report=reported) as host:
        gateway = Gateway(config, host, audit)
        await gateway.survey()
        surveyed = True
        kept = [s for s, server in config.mcp_servers.items() if server.lifecycle == "persistent"]
        if len(kept) >= settings.max_sandboxes:
            log.warning(
                "%d persistent MCP servers, and the gateway runs %d isolates at once (STOCKADE_MAX_SANDBOXES): "
                "once they are all started, no other server's call gets one",
                len(kept),
                settings.max_sandboxes,
            )
        server = gateway.server()
        if http is not None:
            assert token is not None
            await serve_http(server, http, token)
            return
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


async def _describe(
    server_id: str, session: ClientSession
) -> tuple[list[types.Tool], list[types.Resource], list[types.Prompt]]:
    capabilities = session.server_capabilities or (await session.initialize()).capabilities
    tools = await every_page(server_id, session.list_tools, "tools") if capabilities.tools else []
    resources = await every_page(server_id, session.list_resources, "resources") if capabilities.resources else []
    prompts = await every_page(server_id, session.list_prompts, "prompts") if capabilities.prompts else []
    return tools, resources, prompts


def _as_offered(item: Any, name: str | None, server_id: str) -> Any:
    """A server's tool, prompt or resource as this gateway offers it: under its final name (None: its
    own); a title the server gave it (which clients show before the name) said to be that server's,
    so that none passes for another server's; its description without terminal controls; only icons
    carried inline (a URL would have the client fetch what the isolated server put in it, past its
    network policy)."""
    update: dict[str, Any] = {"name": name} if name is not None else {"name": without_controls(item.name)}
    if item.title:
        update["title"] = f"{server_id}: {without_controls(item.title)}"
    elif name is None:  # a resource's own name is what a client shows without a title: said to be its server's
        update["title"] = f"{server_id}: {update['name']}"
    if item.description:
        update["description"] = without_controls(item.description)
    if item.icons:
        update["icons"] = [i for i in item.icons if str(i.src).startswith("data:")] or None
    annotations = getattr(item, "annotations", None)
    if annotations is not None and getattr(annotations, "title", None):
        update["annotations"] = annotations.model_copy(
            update={"title": f"{server_id}: {without_controls(annotations.title)}"}
        )
    # What a model reads beside the description (a schema's titles and descriptions, a prompt's
    # arguments') or a client shows (a resource's type): the same, or hidden text reached it. What
    # the server reads back (names, enums, patterns) is left as it is: _plain_structure checked it.
    for schema in ("input_schema", "output_schema"):
        if getattr(item, schema, None) is not None:
            update[schema] = _readable(getattr(item, schema))
    if getattr(item, "arguments", None):
        update["arguments"] = [
            a.model_copy(update={k: without_controls(v) for k in ("title", "description") if (v := getattr(a, k))})
            for a in item.arguments
        ]
    mime = getattr(item, "mime_type", None)
    if mime is not None and not _MEDIA_TYPE.fullmatch(mime):
        update["mime_type"] = None
    return item.model_copy(update=update)


_MEDIA_TYPE = re.compile(
    r'[A-Za-z0-9][\w.+-]{0,63}/[A-Za-z0-9][\w.+-]{0,63}(; ?[\w.+-]{1,64}=("[\w .+/=-]{0,64}"|[\w.+-]{1,64})){0,4}',
    re.ASCII,
)
SCHEMA_DEPTH = 64  # deeper than any schema a tool means: one deeper is left out
_READ = frozenset({"title", "description", "$comment"})  # what people and models read in a schema


def _plain_structure(server_id: str, kind: str, item: Any) -> bool:
    """Whether what the server reads back of a tool's schemas or a prompt's arguments (keys,
    names, enums, patterns: all but what people read) holds no terminal controls or hidden
    text, and its schemas nest no deeper than SCHEMA_DEPTH; one that does is left out, and said
    once (escaped, it would ask for arguments the server does not know)."""
    schemas = [getattr(item, n) for n in ("input_schema", "output_schema") if getattr(item, n, None) is not None]
    found = next((f for f in map(_hidden_in, schemas) if f is not None), None)
    for argument in getattr(item, "arguments", None) or []:
        if found is None and without_controls(argument.name) != argument.name:
            found = f"an argument named {argument.name[:64]!r}"
    if found is None:
        return True
    log.warning("MCP server %s offers a %s %s with %s: left out", server_id, kind, printable(item.name[:200]),
                printable(found))  # fmt: skip
    return False


def _hidden_in(value: Any, depth: int = 0) -> str | None:
    """Where a schema's structure holds text ``without_controls`` would change, or nests past
    SCHEMA_DEPTH (None: nowhere)."""
    if depth > SCHEMA_DEPTH:
        return f"a schema nested deeper than {SCHEMA_DEPTH}"
    if isinstance(value, str):
        return f"{value[:64]!r} in its schema" if without_controls(value) != value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if without_controls(str(key)) != key:
                return f"a key {str(key)[:64]!r} in its schema"
            if _read_by_people(key, item):
                continue  # shown escaped (_readable)
            if (found := _hidden_in(item, depth + 1)) is not None:
                return found
    elif isinstance(value, list):
        return next((f for f in (_hidden_in(item, depth + 1) for item in value) if f is not None), None)
    return None


def _read_by_people(key: str, value: Any) -> bool:
    """Whether a schema's ``key`` holds what people and models read: a title, description or
    comment, or examples (not a property so named, whose value is a schema)."""
    return (key in _READ and isinstance(value, str)) or (key == "examples" and isinstance(value, list))


def _readable(value: Any, read: bool = False) -> Any:
    """A schema with what people and models read in it (titles, descriptions, comments, examples)
    without terminal controls or hidden text; ``read``: every string of ``value`` is such, keys too."""
    if isinstance(value, str):
        return without_controls(value) if read else value
    if isinstance(value, dict):
        return {(without_controls(k) if read else k): _readable(v, read or _read_by_people(k, v))
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_readable(v, read) for v in value]
    return value


def _plain_uri(server_id: str, kind: str, uri: Any) -> bool:
    """Whether a resource's URI holds no terminal controls or hidden text (``file:///a\u202egpj.exe``
    shows as ``…exe.jpg``); one that does is left out, and said (escaped, it would name another)."""
    if without_controls(str(uri)) == str(uri):
        return True
    log.warning("MCP server %s offers a %s at %s: its URI holds hidden text; left out", server_id, kind,
                printable(repr(str(uri)[:200])))  # fmt: skip
    return False


def _linked(content: Any, server_id: str) -> Any:
    """A tool's or prompt's content item: a link to a resource offered as a resource is (``_as_offered``);
    one, or a resource embedded, whose URI holds hidden text said to have been left out."""
    if isinstance(content, (types.ResourceLink, types.EmbeddedResource)):
        uri = content.uri if isinstance(content, types.ResourceLink) else content.resource.uri
        if not _plain_uri(server_id, "resource in its content", uri):
            said = f"[{server_id}: a resource whose URI holds hidden text, left out]"
            return types.TextContent(type="text", text=said)
    return _as_offered(content, None, server_id) if isinstance(content, types.ResourceLink) else content


def _well_named(server_id: str, kind: str, name: str) -> bool:
    """Whether a server's tool or prompt name is one MCP allows (1-128 of ``A-Za-z0-9_.-``); one
    that is not (a control character, a space) is left out, and said once."""
    if _MCP_NAME.fullmatch(name):
        return True
    log.warning(
        "MCP server %s offers a %s named %s, outside MCP's names: left out",
        server_id,
        kind,
        printable(repr(name[:200])),
    )
    return False


def _final_names(offered: dict[str, list[str]]) -> dict[tuple[str, str], str]:
    """Each (server, name) its name here: its own where no other server's takes it, else
    ``server.name`` (unique: a server id holds no ``.``), so that no server shadows another's tool.
    A name of a server's own that holds a ``.`` is always ``server.name``: a tool that one server
    calls ``github.create_issue`` is never shown as if it were the ``github`` server's."""
    final = {(s, n): n if SEPARATOR not in n else f"{s}{SEPARATOR}{n}" for s, names in offered.items() for n in names}
    while clashes := {name for name, count in Counter(final.values()).items() if count > 1}:
        # ``server.name`` differs for every (server, name): each pass only names more of them so.
        final = {key: f"{key[0]}{SEPARATOR}{key[1]}" if name in clashes else name for key, name in final.items()}
    return final


def _error(message: str, verdict: dict[str, Any] | None = None) -> types.CallToolResult:
    result = types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)
    return result.model_copy(update={"meta": {"stockade": verdict}}) if verdict else result
