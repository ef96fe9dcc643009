"""What the MCP gateway offers of a server's own words: no hidden text in what a client shows or a
model reads, under a property named like a schema keyword too, nor in a resource's URI."""

from __future__ import annotations

from typing import Any

from mcp import types

from stockade.mcp.gateway import _linked, _plain_structure, _plain_uri, _readable

HIDDEN = "k\u202e\U000e0041"


def _tool(schema: dict[str, Any]) -> types.Tool:
    return types.Tool(name="t", input_schema={"type": "object", **schema})


def test_a_property_named_examples_is_a_schema_checked_as_any_other() -> None:
    # The key "examples" was taken for the keyword wherever it stood: under it, no key was checked.
    under_property = {"properties": {"examples": {"type": "object", "properties": {HIDDEN: {"type": "string"}}}}}
    assert not _plain_structure("s", "tool", _tool(under_property))
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(70):
        deep = {"type": "object", "properties": {"x": deep}}
    assert not _plain_structure("s", "tool", _tool({"properties": {"examples": deep}}))
    # The keyword itself is what people read: shown escaped, keys of its values too.
    keyword = {"properties": {"q": {"type": "object", "examples": [{HIDDEN: "v\u202e"}]}}}
    assert _plain_structure("s", "tool", _tool(keyword))
    shown = _readable(keyword)["properties"]["q"]["examples"]
    assert shown == [{"k\\u202e\\U000e0041": "v\\u202e"}], shown
    # An enum under a property named "examples" is read back by the server: left as it is.
    kept = {"properties": {"examples": {"type": "string", "enum": ["a", "b"]}}}
    assert _plain_structure("s", "tool", _tool(kept)) and _readable(kept) == kept


def test_a_resource_whose_uri_holds_hidden_text_is_left_out() -> None:
    assert _plain_uri("s", "resource", "file:///notes")
    assert not _plain_uri("s", "resource", "file:///a\u202egpj.exe")
    link = types.ResourceLink(type="resource_link", uri="https://attacker.example/?\u202e", name="n")
    said = _linked(link, "s")
    assert isinstance(said, types.TextContent) and said.text == "[s: a resource whose URI holds hidden text, left out]"
    embedded = types.EmbeddedResource(
        type="resource", resource=types.TextResourceContents(uri="file:///a\u202egpj.exe", text="x")
    )
    assert isinstance(_linked(embedded, "s"), types.TextContent)
    plain = types.ResourceLink(type="resource_link", uri="file:///notes", name="n")
    offered = _linked(plain, "s")
    assert isinstance(offered, types.ResourceLink) and offered.title == "s: n"


def test_every_value_a_servers_environment_may_hold_is_hidden_and_hidden_before_it_is_cut() -> None:
    # By name, the last of one name's values was hidden alone: the server's own and another tool's
    # were said as they are. And a value cut in two by a bound was said in part.
    from mcp import MCPError

    from stockade.mcp.config import IsolationConfig
    from stockade.mcp.records import hidden_values
    from stockade.mcp.tools import _answered_error
    from stockade.mcp.transport import MAX_STDERR, ServerOutput

    config = IsolationConfig.parse({"mcp_servers": {"s": {
        "command": "x", "env": {"API_KEY": "server-key-AAAAAA", "MODE": "debug"},
        "env_vars": {"API_KEY": "server-vars-key-DDDD"},
        "tools": {"a": {"env_vars": {"API_KEY": "tool-a-key-BBBBBB"}},
                  "c": {"env_vars": {"API_KEY": "tool-c-key-CCCCCC"}}},
    }}})  # fmt: skip
    hidden = hidden_values(config.server("s"))
    assert hidden is not None
    said = hidden.text("server-key-AAAAAA tool-a-key-BBBBBB tool-c-key-CCCCCC server-vars-key-DDDD debug")
    assert said == "[REDACTED:API_KEY] [REDACTED:API_KEY] [REDACTED:API_KEY] [REDACTED:API_KEY] debug"
    straddling = "x" * 1990 + " key=tool-a-key-BBBBBB"
    error = _answered_error("s.a", MCPError(-32001, straddling), None, hidden)
    assert "tool-a-key" not in str(error) and "BBB" not in str(error), str(error)[-60:]
    output = ServerOutput(hidden=hidden)
    output.note_stderr(b"key=tool-c-key-CCCCCC\n" + b"y" * (MAX_STDERR - 30) + b"\nline two\nthe end\n")  # start let go
    assert "CC" not in output.describe() and output.describe().endswith(": line two | the end"), output.describe()[-40:]


def test_a_value_of_several_lines_cut_by_stderrs_bound_is_not_said_in_part() -> None:
    from stockade.mcp.config import IsolationConfig
    from stockade.mcp.records import hidden_values
    from stockade.mcp.transport import MAX_STDERR, ServerOutput

    key = "-----BEGIN KEY-----\nAAAAsecretline1AAAA\nBBBBsecretline2BBBB\nCCCCsecretline3CCCC\n-----END KEY-----"
    config = IsolationConfig.parse({"mcp_servers": {"s": {"command": "x", "env": {"PEM": key}}}})
    output = ServerOutput(hidden=hidden_values(config.server("s")))
    ahead = b"y" * (MAX_STDERR - len(key) + 10) + b"\nline two\n"  # the bound cuts the value's first line off
    output.note_stderr(key.encode() + b"\n" + ahead + b"the end\n")
    said = output.describe()
    assert "secretline" not in said and "END KEY" not in said and said.endswith(": line two | the end"), said[-80:]
