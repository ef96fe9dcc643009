"""ExecResult: seed 003's response shape, and an honest one-line summary."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from pydantic import ValidationError

from stockade import ExecResult, SecurityViolation
from stockade.result import validate

SEED_003_FIELDS = {
    "execution_id",
    "success",
    "stdout",
    "stderr",
    "exit_code",
    "error",
    "termination_reason",
    "security_violations",
    "execution_time_seconds",
    "cold_start_time_ms",
    "resource_usage",
    "runtime_used",
    "policy_digest",
}


def _result(**kw: object) -> ExecResult:
    base: dict[str, object] = {
        "success": False,
        "termination_reason": "violation",
        "runtime_used": "process",
        "policy_digest": "0" * 64,
    }
    base.update(kw)
    return validate(ExecResult, base)


def test_fields_match_the_spec() -> None:
    assert SEED_003_FIELDS <= {f.name for f in dataclasses.fields(ExecResult)}
    assert {"violation_type", "syscall", "severity", "detection_layer", "blocked", "description", "timestamp"} <= {
        f.name for f in dataclasses.fields(SecurityViolation)
    }


def test_unknown_termination_reason_refused() -> None:
    with pytest.raises(ValidationError):
        _result(termination_reason="fine")


def test_summary_names_blocked_calls_and_unenforced_limits() -> None:
    v = SecurityViolation(violation_type="blocked_syscall", syscall="ptrace", description="ptrace: not here")
    line = _result(exit_code=1, security_violations=[v, v], unenforced_limits=["memory_mb (no cgroup)"]).summary()
    assert "violation" in line and "2 blocked: ptrace (first: ptrace: not here)" in line and "memory_mb" in line


def test_violation_ids_are_unique() -> None:
    a = SecurityViolation(violation_type="x")
    b = SecurityViolation(violation_type="x")
    assert a.violation_id != b.violation_id


def test_new_id_is_a_random_version_4_uuid() -> None:
    import uuid

    from stockade.result import new_id

    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lower-case hex, 8-4-4-4-12, as str(uuid.uuid4())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Every other bit varies: the 122 random bits are not fixed by a mask gone wrong.
    ored, anded = 0, (1 << 128) - 1
    for text in ids:
        n = uuid.UUID(text).int
        ored |= n
        anded &= n
    fixed = (0xF << 76) | (0x3 << 62)
    assert ored | fixed == (1 << 128) - 1
    assert anded & ~fixed == 0


def test_the_json_form_is_compact_utf8_and_always_json() -> None:
    raw = b"\xff\xfe" * 1000
    text = _result(stdout=raw.decode(errors="replace"), stdout_bytes=raw).to_json()
    assert "\\ufffd" not in text and "\ufffd" in text  # six bytes escaped, three as UTF-8
    assert ", " not in text[:200] and '":' in text  # no spaces between items
    said = json.loads(text)
    assert json.loads(_result(execution_time_seconds=float("nan")).to_json())["execution_time_seconds"] is None
    assert base64.b64decode(said["stdout_bytes"], validate=True) == raw  # the standard alphabet
    assert validate(ExecResult, text, json_text=True).stdout_bytes == raw
    lone = _result(error="no such file: b\udcffd").to_json()  # a name os.fsdecode kept: escaped, not lost
    assert json.loads(lone)["error"] == "no such file: b\udcffd" and lone.encode().isascii()
