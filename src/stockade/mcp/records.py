"""What is said of an MCP server outside its own results: the audit log's records of its calls and
reports (never arguments, results or values), and the values of its environment, hidden from every
word of the server's that the host passes on (its stderr, its error answers)."""

from __future__ import annotations

from typing import Any

from ..audit import MAX_AUDITED_EGRESS, short_text
from ..egress.redact import Redactor, each_form
from .config import ServerConfig


def call_record(
    server_id: str, tool: str, argument_bytes: int, outcome: str, verdict: dict[str, Any], error: str | None = None
) -> dict[str, Any]:
    """A tool call's audit record (``mcp.call``): never its arguments, its result or a secret's value."""
    egress = verdict.get("egress_requests") or []
    return {
        "server": server_id, "tool": tool, "argument_bytes": argument_bytes, "outcome": outcome, "error": error,
        "runtime": verdict.get("runtime"), "violations": verdict.get("violation_counts") or {},
        # The names as the daemon's execution records carry them (``substituted``): the audit log
        # redacts any field named like a secret ("secrets_used" included), names and all.
        "egress": [{"host": _text(r.get("host")), "port": r.get("port"), "method": _text(r.get("method")),
                    "allowed": r.get("allowed"), "substituted": r.get("secrets_used") or []}
                   for r in egress[:MAX_AUDITED_EGRESS]],
        "egress_dropped": max(0, len(egress) - MAX_AUDITED_EGRESS),
    }  # fmt: skip


def _text(value: Any) -> str | None:
    return short_text(value) if isinstance(value, str) else None


def report_record(server_id: str, what: str, verdict: dict[str, Any]) -> dict[str, Any]:
    """An isolate's report outside a tool call (``mcp.report``: ``ToolHost``'s ``on_report``)."""
    record = call_record(server_id, "", 0, what, verdict)
    return {k: record[k] for k in ("server", "runtime", "violations", "egress", "egress_dropped")} | {"what": what}


MIN_HIDDEN_CHARS = 6  # shorter values ("1", "true", "debug") are no keys, and would blot out words


def hidden_values(server: ServerConfig) -> Redactor | None:
    """A redactor of the values of ``server``'s environment (its ``env``, its and its tools'
    ``env_vars``) of MIN_HIDDEN_CHARS or more, each said as ``[REDACTED:NAME]``."""
    # By value, every source's: one name set in several places holds a value in each.
    hidden = {
        value: f"[REDACTED:{name}]"
        for source in (server.env, server.env_vars or {}, *(t.env_vars or {} for t in server.tools.values()))
        for name, value in source.items()
        if len(value) >= MIN_HIDDEN_CHARS
    }
    return Redactor(each_form(hidden)) if hidden else None
