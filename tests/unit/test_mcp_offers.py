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
