"""``stockade mcp call-tool``: MCP tools in isolates (mcp/, docs/mcp.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import cli_outcome

EXIT_ERROR = 125  # cli.EXIT_STOCKADE_ERROR: stockade could not do what was asked
EXIT_TOOL_ERROR = 1  # the tool answered, with isError
DAEMON_CALL_TIMEOUT_S = 900.0  # a first call may build its server's environment


def _http_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http",
        nargs="?",
        const="127.0.0.1:8003",
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio (loopback only; default 127.0.0.1:8003)",
    )
    parser.add_argument("--token-file", metavar="FILE", help="with --http: the bearer token every request must carry")


def _http_door(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``--http``'s address and its token (ConfigError when one comes without the other)."""
    from .errors import ConfigError

    if args.http is None:
        if args.token_file:
            raise ConfigError("--token-file is for --http")
        return None, None
    if not args.token_file:
        raise ConfigError("--http needs --token-file FILE (`stockade token new --file FILE` makes one)")
    from .client import read_token_file
    from .mcp.http import parse_address

    parse_address(args.http)
    return args.http, read_token_file(args.token_file)


def add_parser(subparsers: Any) -> None:
    """Add ``mcp`` and its subcommands to the CLI's ``subparsers``."""
    mcp = subparsers.add_parser("mcp", help="MCP servers' tools, each in its own isolate (isolation_config.json)")
    mcp_sub = mcp.add_subparsers(dest="mcp_cmd", required=True)
    call = mcp_sub.add_parser(
        "call-tool",
        help="call one tool of a configured MCP server in the isolate its config gives it",
        description="Start SERVER (as isolation_config.json says) in an isolate under TOOL's policy, initialise an "
        "MCP session over its stdio, call TOOL with JSON_ARGS, print the result, tear it all down.",
    )
    call.add_argument("server", metavar="SERVER", help="an mcp_servers id of the config")
    call.add_argument("tool", metavar="TOOL", help="the tool's name")
    call.add_argument(
        "arguments", nargs="?", default="{}", metavar="JSON_ARGS", help="the tool's arguments (a JSON object)"
    )
    call.add_argument(
        "--config", metavar="FILE", help="the isolation config (default: $STOCKADE_CONFIG_DIR/isolation_config.json)"
    )
    call.add_argument("--json", action="store_true", help="print the MCP result as JSON (with _meta.stockade)")
    call.add_argument(
        "--socket", metavar="PATH", help="call through this daemon, which keeps persistent servers ($STOCKADE_SOCKET)"
    )
    call.add_argument("--token-file", metavar="FILE", help="the daemon's HMAC token (default: $STOCKADE_AUTH_TOKEN)")
    call.add_argument(
        "--require-daemon", action="store_true", help="fail rather than call in-process when no daemon answers"
    )
    call.set_defaults(func=cmd_mcp)
    gateway = mcp_sub.add_parser(
        "gateway",
        help="an MCP server (stdio, or --http) offering every configured server's tools, each call run in its isolate",
        description="Launch this in place of the real MCP servers: it offers their exposed tools (named server.tool "
        "where names collide), resources and prompts, and runs each call as isolation_config.json says.",
    )
    gateway.add_argument(
        "--config", metavar="FILE", help="the isolation config (default: $STOCKADE_CONFIG_DIR/isolation_config.json)"
    )
    gateway.add_argument(
        "--audit-log",
        metavar="FILE",
        help="one record per tool call (default: mcp-gateway.audit.log in $STOCKADE_STATE_DIR; 'off': none)",
    )
    _http_flags(gateway)
    gateway.set_defaults(func=cmd_gateway)
    serve = mcp_sub.add_parser(
        "serve",
        help="an MCP server (stdio, or --http) offering stockade: run_code, exec, write_file, read_file, list_dir",
        description="One sandbox for the MCP session, under the policy these flags give (as `stockade run`'s), "
        "made at the first call and closed when the session ends.",
        allow_abbrev=False,
    )
    from .cli import _policy_flags

    _policy_flags(serve, one_run=False)
    _http_flags(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_mcp(args: argparse.Namespace) -> int:
    from .errors import StockadeError, printable, without_controls

    try:
        arguments = json.loads(args.arguments)
    except ValueError as exc:
        return _fail(f"JSON_ARGS is not JSON: {exc}")
    if not isinstance(arguments, dict):
        return _fail("JSON_ARGS must be a JSON object")
    if missing := _sdk_missing():
        return _fail(missing)
    import anyio

    from .mcp.config import load_config
    from .mcp.tools import ToolHost

    async def call() -> Any:
        async with ToolHost(load_config(args.config)) as host:
            return await host.call(args.server, args.tool, arguments)

    try:
        result = _through_daemon(args, arguments)
        if result is None:
            result = anyio.run(call)
    except StockadeError as exc:
        return cli_outcome.fail_for(exc)  # with --json, on stdout too
    if args.json:
        print(json.dumps(result.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2))
    else:
        for item in result.content:
            if item.type == "text":
                # The server's words, escaped where a terminal would act on them (a title set, the screen
                # cleared, the clipboard written): --json has them exactly.
                print(without_controls(item.text))
            else:
                # A line of stockade's own: what the server chose in it (its type, its MIME type) escaped.
                kind = printable(f"{item.type} content: {getattr(item, 'mime_type', None) or 'no type'}")
                print(f"[{kind}]")
    return EXIT_TOOL_ERROR if result.is_error else 0


def _through_daemon(args: argparse.Namespace, arguments: dict[str, Any]) -> Any:
    """The call made by a daemon (``--socket``, ``$STOCKADE_SOCKET``): None to make it in-process
    (no daemon given, or none answers and none is required)."""
    from mcp import types

    from .cli_daemon import daemon_socket
    from .client import Client
    from .errors import AnswerLostError, DaemonUnavailableError
    from .mcp.config import load_config

    path, required = daemon_socket(args)
    if path is None:
        return None
    config = load_config(args.config)  # checked here first: its errors name the caller's own file
    params = {"config": config.model_dump(mode="json"), "server": args.server, "tool": args.tool,
              "arguments": arguments}  # fmt: skip
    try:
        with Client(path, token_file=args.token_file, timeout=DAEMON_CALL_TIMEOUT_S) as client:
            answer = client.call("mcp.call_tool", params, timeout=DAEMON_CALL_TIMEOUT_S)
    except AnswerLostError:
        raise  # the request went out: the tool may have run, and must not run twice
    except DaemonUnavailableError as exc:
        if required:
            raise
        print(f"stockade: no daemon answers on {path} ({exc}); calling in-process", file=sys.stderr)
        return None
    return types.CallToolResult.model_validate(answer["result"])


def _sdk_missing() -> str | None:
    """Why ``stockade mcp`` cannot run here (no MCP SDK), or None."""
    try:
        import mcp  # noqa: F401
    except ImportError as exc:
        return f"stockade mcp needs the MCP SDK: pip install 'stockade[mcp]' ({exc})"
    return None


def _fail(message: str) -> int:
    return cli_outcome.fail(message)  # with --json, on stdout too


def cmd_gateway(args: argparse.Namespace) -> int:
    from .errors import StockadeError

    if missing := _sdk_missing():
        return _fail(missing)
    import anyio

    from .mcp.config import load_config
    from .mcp.gateway import serve

    audit = None
    try:
        http, token = _http_door(args)
        config = load_config(args.config)
        audit = _gateway_audit(args.audit_log)
        anyio.run(serve, config, audit, http, token)
    except StockadeError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    finally:
        if audit is not None:
            audit.close()
    return 0


def _gateway_audit(asked: str | None) -> Any:
    """The gateway's audit log: ``asked``, else its own file in the state directory. One writer per
    file keeps its hash chain whole: a second gateway at once writes a file named for its pid."""
    import os

    from .audit import AuditLog, AuditLogBusy
    from .settings import current

    if asked == "off":
        return None
    if asked is not None:
        from .errors import ConfigError

        where = os.path.dirname(os.path.abspath(asked))
        if not os.path.isdir(where):  # a typo would lose every record, with only a warning
            raise ConfigError(f"--audit-log {asked}: there is no directory {where}")
        try:
            return AuditLog(asked)
        except AuditLogBusy as exc:
            raise ConfigError(f"--audit-log: {exc}") from None
    directory = current().state_dir
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, "mcp-gateway.audit.log")
    try:
        return AuditLog(path)
    except AuditLogBusy:
        root, ext = os.path.splitext(path)
        return AuditLog(f"{root}-{os.getpid()}{ext}")


def cmd_serve(args: argparse.Namespace) -> int:
    from .cli import _build_policy
    from .errors import StockadeError

    if missing := _sdk_missing():
        return _fail(missing)
    import anyio

    from .mcp.serve import serve

    try:
        http, token = _http_door(args)
        policy = _build_policy(args)
        anyio.run(serve, policy, http, token)
    except StockadeError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0
