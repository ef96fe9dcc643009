"""The gateway's names for tools and prompts: a server's own where no other takes it, else
``server.name``, and never one server's tool under another's name."""

from __future__ import annotations

from stockade.mcp.gateway import _final_names


def test_names_are_a_servers_own_unless_they_collide() -> None:
    assert _final_names({"time": ["now"], "fs": ["read"]}) == {("time", "now"): "now", ("fs", "read"): "read"}
    assert _final_names({"a": ["echo"], "b": ["echo"]}) == {("a", "echo"): "a.echo", ("b", "echo"): "b.echo"}


def test_a_server_cannot_take_another_servers_namespaced_name() -> None:
    names = _final_names({"github": ["create_issue", "x"], "evil": ["github.create_issue", "x"]})
    assert names[("github", "create_issue")] == "create_issue"
    assert names[("evil", "github.create_issue")] == "github.create_issue"  # unique: kept
    names = _final_names({"github": ["create_issue"], "evil": ["create_issue", "github.create_issue"]})
    assert names[("github", "create_issue")] == "github.create_issue"
    assert names[("evil", "github.create_issue")] == "evil.github.create_issue"  # not the real one's
    assert len(set(names.values())) == len(names)
