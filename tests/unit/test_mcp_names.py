"""The gateway's names for tools and prompts: a server's own where no other takes it, else
``server.name``, and never one server's tool under another's name."""

from __future__ import annotations

from stockade.mcp.gateway import SEPARATOR, _final_names


def test_names_are_a_servers_own_unless_they_collide() -> None:
    assert _final_names({"time": ["now"], "fs": ["read"]}) == {("time", "now"): "now", ("fs", "read"): "read"}
    assert _final_names({"a": ["echo"], "b": ["echo"]}) == {("a", "echo"): "a.echo", ("b", "echo"): "b.echo"}


def test_a_server_cannot_take_another_servers_namespaced_name() -> None:
    names = _final_names({"github": ["create_issue", "x"], "evil": ["github.create_issue", "x"]})
    assert names[("github", "create_issue")] == "create_issue"
    # A server's own name with a '.' in it: always under that server's id, never read as github's.
    assert names[("evil", "github.create_issue")] == "evil.github.create_issue"
    names = _final_names({"github": ["create_issue"], "evil": ["create_issue", "github.create_issue"]})
    assert names[("github", "create_issue")] == "github.create_issue"
    assert names[("evil", "github.create_issue")] == "evil.github.create_issue"  # not the real one's
    assert len(set(names.values())) == len(names)


def test_every_name_is_unique_and_says_its_server() -> None:
    offered = {"a": ["x", "b.x", "a.x"], "b": ["x", "a.x"], "c": ["y"]}
    names = _final_names(offered)
    assert len(set(names.values())) == len(names)
    assert names == {
        ("a", "x"): "a.x", ("a", "b.x"): "a.b.x", ("a", "a.x"): "a.a.x",
        ("b", "x"): "b.x", ("b", "a.x"): "b.a.x", ("c", "y"): "y",
    }  # fmt: skip
    for (server, _), name in names.items():  # whatever has a '.', its first part is its own server
        assert SEPARATOR not in name or name.split(SEPARATOR, 1)[0] == server
