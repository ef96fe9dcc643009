"""``stockade mcp call-tool``: MCP tools in isolates (mcp/, docs/mcp.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_ERROR = 125  # cli.EXIT_STOCKADE_ERROR: stockade could not do what was asked
EXIT_TOOL_ERROR = 1  # the tool answered, with isError


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
    call.set_defaults(func=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> int:
    from .errors import StockadeError

    try:
        arguments = json.loads(args.arguments)
    except ValueError as exc:
        return _fail(f"JSON_ARGS is not JSON: {exc}")
    if not isinstance(arguments, dict):
        return _fail("JSON_ARGS must be a JSON object")
    try:
        import anyio

        from .mcp.config import load_config
        from .mcp.tools import ToolHost
    except ImportError as exc:
        return _fail(f"stockade mcp needs the MCP SDK: pip install 'stockade[mcp]' ({exc})")

    async def call() -> Any:
        async with ToolHost(load_config(args.config)) as host:
            return await host.call(args.server, args.tool, arguments)

    try:
        result = anyio.run(call)
    except StockadeError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(result.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2))
    else:
        for item in result.content:
            if item.type == "text":
                print(item.text)
            else:
                print(f"[{item.type} content: {getattr(item, 'mime_type', None) or 'no type'}]")
    return EXIT_TOOL_ERROR if result.is_error else 0


def _fail(message: str) -> int:
    print(f"stockade: {message}", file=sys.stderr)
    return EXIT_ERROR
