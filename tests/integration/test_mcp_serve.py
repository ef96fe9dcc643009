"""`stockade mcp serve`: stockade itself as an MCP server, driven by the official SDK's client."""

from __future__ import annotations

import base64
import os
import sys

import anyio
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import require

STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")


def test_an_agent_runs_code_and_moves_files_in_one_sandbox_for_its_session() -> None:
    require("process")
    params = StdioServerParameters(
        command=STOCKADE, args=["mcp", "serve", "--memory", "64", "--network", "none"],
        env={**os.environ, "STOCKADE_POOL_SIZE": "0"},
    )  # fmt: skip

    async def drive() -> None:
        with anyio.fail_after(300):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                tools = {t.name for t in (await session.list_tools()).tools}
                assert tools == {"run_code", "exec", "write_file", "read_file", "list_dir"}
                wrote = await session.call_tool("write_file", {"path": "/work/data.csv", "content": "a,b\n1,2\n"})
                assert not wrote.is_error and "wrote 8 bytes" in wrote.content[0].text
                ran = await session.call_tool("run_code", {"code": "print(open('/work/data.csv').read().split()[1])"})
                assert not ran.is_error and ran.content[0].text.startswith("1,2\n")
                assert ran.structured_content["exit_code"] == 0 and ran.structured_content["runtime_used"] == "process"
                await session.call_tool("run_code", {"code": "x = 41", "session": "nb"})
                kept = await session.call_tool("run_code", {"code": "x + 1", "session": "nb"})
                assert kept.content[0].text.startswith("42\n")  # the interpreter kept its state
                png = "class Figure:\n    def _repr_png_(self):\n        return b'\\x89PNG\\r\\n\\x1a\\n1'\nFigure()"
                figure = await session.call_tool("run_code", {"code": png, "session": "nb"})
                (image,) = [c for c in figure.content if c.type == "image"]  # a figure comes back as an image
                assert image.mime_type == "image/png" and base64.b64decode(image.data) == b"\x89PNG\r\n\x1a\n1"
                raised = await session.call_tool("run_code", {"code": "1 / 0", "session": "nb"})
                assert raised.is_error and "ZeroDivisionError" in raised.content[0].text
                listed = await session.call_tool("list_dir", {"path": "/work"})
                assert "data.csv" in {e["name"] for e in listed.structured_content["entries"]}
                binary = base64.b64encode(bytes(range(256))).decode()
                await session.call_tool("write_file", {"path": "/work/b.bin", "content_base64": binary})
                back = await session.call_tool("read_file", {"path": "/work/b.bin"})
                assert back.structured_content == {"base64": True, "size": 256} and back.content[0].text == binary
                text = await session.call_tool("read_file", {"path": "/work/data.csv"})
                assert text.content[0].text == "a,b\n1,2\n"
                failed = await session.call_tool("exec", {"command": ["sh", "-c", "echo oops >&2; exit 3"]})
                assert failed.is_error and "oops" in failed.content[0].text and "exit code 3" in failed.content[0].text
                greedy = await session.call_tool("run_code", {"code": "x = bytearray(300 * 1024 * 1024)"})
                assert greedy.is_error and greedy.structured_content["termination_reason"] == "memory_limit"
                outside = await session.call_tool("read_file", {"path": "/etc/shadow"})
                assert outside.is_error
                bad = await session.call_tool("exec", {"command": []})
                assert bad.is_error and "command" in bad.content[0].text
                # Arguments by each tool's schema: the session's sandbox is never the client's to name,
                # and a wrong type is the tool's error, not an internal one.
                for tool, args, said in [
                    ("run_code", {"code": "1", "sandbox_id": "sb-x"}, "no argument 'sandbox_id' (it takes code,"),
                    ("write_file", {"path": "a", "content_base64": 5}, "content_base64 must be a string, not int"),
                    ("write_file", {"path": "a", "content": {"a": 1}}, "content must be a string, not dict"),
                    ("read_file", {}, "missing argument 'path'"),
                ]:
                    refused = await session.call_tool(tool, args)
                    assert refused.is_error and refused.content[0].text.startswith(f"{tool}: {said}"), refused
                nulls = await session.call_tool("run_code", {"code": "print(7)", "session": None, "timeout": None})
                assert not nulls.is_error and nulls.content[0].text.startswith("7\n")  # null: left out

    anyio.run(drive)
