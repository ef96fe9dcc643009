"""``ExecResult``: the one result every entry point returns (seed 003's response shape)."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

TerminationReason = Literal[
    "completed", "timeout", "cpu_limit", "memory_limit", "output_limit", "violation", "killed", "error", "lost"
]
Severity = Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"]
DetectionLayer = Literal["SECCOMP", "LANDLOCK", "CGROUP", "RLIMIT", "GVISOR", "HYPERVISOR", "SUPERVISOR", "NETWORK"]

# A run's report keeps its first this many violations whole, on every runtime;
# ``violation_counts`` counts every one, under at most MAX_VIOLATION_NAMES names.
# Code can make millions of blocked calls: the report must not grow with them.
MAX_VIOLATION_RECORDS = 1000
MAX_VIOLATION_NAMES = 256
OTHER_VIOLATIONS = "other"  # where calls past MAX_VIOLATION_NAMES distinct names are counted


def _now() -> str:
    return datetime.now(UTC).isoformat()


def new_id() -> str:
    """A random (version 4) UUID as text: a run's, a violation's id."""
    return str(uuid.uuid4())


class SecurityViolation(BaseModel):
    """Something the code tried that the policy blocked, as seen by the supervisor (host side)."""

    model_config = ConfigDict(extra="forbid")

    violation_id: str = Field(default_factory=new_id)
    timestamp: str = Field(default_factory=_now)
    violation_type: str
    syscall: str | None = None
    severity: Severity = "HIGH"
    description: str = ""
    detection_layer: DetectionLayer = "SECCOMP"
    blocked: bool = True
    pid: int | None = None
    # Made before the run began (in a held sandbox, between runs: by a process an earlier
    # run left running), and reported with this run so that it is reported at all.
    between_runs: bool = False


def violation_key(violation: SecurityViolation) -> str:
    """What a violation is counted under in ``ExecResult.violation_counts``."""
    return violation.syscall or violation.violation_type


class ResourceUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_seconds: float | None = None
    memory_peak_mb: float | None = None


MAX_CELL_RESULTS = 1000  # display items one cell may return (each is bounded by the agent's frame)


class CellOutput(BaseModel):
    """One result of a stateful interpreter's cell: a MIME bundle, as Jupyter's display protocol has it.

    ``kind`` is ``execute_result`` (the value of the cell's last expression) or
    ``display_data`` (``display(obj)``, a matplotlib figure). ``data`` maps MIME
    types to content: text for ``text/*``, ``image/svg+xml``; base64 for
    ``image/png`` and ``image/jpeg``; a JSON value for ``application/json``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["execute_result", "display_data"]
    data: dict[str, Any] = Field(max_length=32)

    @property
    def text(self) -> str | None:
        value = self.data.get("text/plain")
        return value if isinstance(value, str) else None

    @property
    def png(self) -> bytes | None:
        """The PNG's bytes (decoded), if this result has one."""
        value = self.data.get("image/png")
        return base64.b64decode(value) if isinstance(value, str) else None

    @property
    def html(self) -> str | None:
        value = self.data.get("text/html")
        return value if isinstance(value, str) else None

    @property
    def svg(self) -> str | None:
        value = self.data.get("image/svg+xml")
        return value if isinstance(value, str) else None

    @property
    def json_data(self) -> Any:
        return self.data.get("application/json")


class CellException(BaseModel):
    """The exception that ended a cell: its class name, ``str()``, and a traceback of the cell's frames only."""

    model_config = ConfigDict(extra="forbid")

    name: str
    value: str
    traceback: str


class EgressRequest(BaseModel):
    """One request an isolate made through the egress proxy (network_policy "allowlist")."""

    model_config = ConfigDict(extra="forbid")

    timestamp: str = Field(default_factory=_now)
    host: str
    port: int
    method: str = Field(description="the HTTP method; CONNECT for a tunnel the proxy did not open")
    path: str | None = Field(default=None, description="the request's path, without its query (null: a tunnel)")
    scheme: Literal["http", "https", "tunnel", "dns", "tcp"] = "http"
    allowed: bool
    reason: str = Field(default="", description="why it was refused")
    status: int | None = Field(default=None, description="the upstream's HTTP status")
    bytes_sent: int = 0
    bytes_received: int = 0
    secrets_used: list[str] = Field(default_factory=list, description="the names of the secrets put in (never values)")


class ExecResult(BaseModel):
    # Raw output travels as base64 in JSON (pydantic's default would be UTF-8, which it may not be).
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    execution_id: str = Field(default_factory=new_id)
    success: bool
    stdout: str = Field(default="", description="stdout as UTF-8 text (bytes that are not UTF-8 read as U+FFFD)")
    stderr: str = Field(default="", description="stderr as UTF-8 text (bytes that are not UTF-8 read as U+FFFD)")
    stdout_bytes: bytes | None = Field(
        default=None,
        description="stdout's bytes as written (base64 in JSON); sent only when they are not UTF-8, "
        "null when stdout is exact. In Python it is always set.",
    )
    stderr_bytes: bytes | None = Field(default=None, description="stderr's bytes, as stdout_bytes")
    exit_code: int | None = None
    error: str | None = None
    termination_reason: TerminationReason
    security_violations: list[SecurityViolation] = Field(
        default_factory=list, description=f"the run's first violations, at most {MAX_VIOLATION_RECORDS}"
    )
    violation_counts: dict[str, int] = Field(
        default_factory=dict, description="every violation of the run, by syscall (or type), those past the records too"
    )
    violations_dropped: int = Field(default=0, description="violations counted but not kept as records")
    execution_time_seconds: float = 0.0
    cold_start_time_ms: float = 0.0
    resource_usage: ResourceUsage = Field(default_factory=ResourceUsage)
    runtime_used: str
    policy_digest: str
    unenforced_limits: list[str] = Field(
        default_factory=list, description="limits of the policy this host could not enforce, and why"
    )
    egress_requests: list[EgressRequest] = Field(
        default_factory=list, description="what the run asked of the egress proxy (network_policy allowlist)"
    )
    egress_requests_dropped: int = Field(default=0, description="egress requests made but not kept as records")
    secrets_redacted: int = Field(
        default=0, description="how many times a secret's value was taken out of this run's output, files and replies"
    )
    # A stateful interpreter's cell (``run_code(..., session=...)``) only:
    results: list[CellOutput] = Field(
        default_factory=list,
        max_length=MAX_CELL_RESULTS,
        description="a cell's results: its last expression's value, display() calls, matplotlib figures",
    )
    exception: CellException | None = Field(default=None, description="the exception that ended a cell")
    execution_count: int | None = Field(
        default=None, description="the cell's number in its session: 1 for the first cell of a fresh interpreter"
    )

    @model_validator(mode="after")
    def _raw_output(self) -> ExecResult:
        # Output that was UTF-8 travels once, as text; its bytes are the text's.
        if self.stdout_bytes is None:
            self.stdout_bytes = self.stdout.encode()
        if self.stderr_bytes is None:
            self.stderr_bytes = self.stderr.encode()
        return self

    @field_serializer("stdout_bytes", "stderr_bytes")
    def _only_when_not_text(self, raw: bytes | None, info: Any) -> bytes | None:
        text = self.stdout if info.field_name == "stdout_bytes" else self.stderr
        return None if raw is None or raw == text.encode() else raw

    def summary(self) -> str:
        """One line for humans: how it ended and what was blocked."""
        parts = [f"{self.termination_reason}"]
        if self.exit_code is not None:
            parts.append(f"exit {self.exit_code}")
        if self.security_violations or self.violation_counts:
            names = sorted(self.violation_counts or {violation_key(v) for v in self.security_violations})
            total = sum(self.violation_counts.values()) or len(self.security_violations)
            parts.append(f"{total} blocked: {', '.join(names)}")
        if self.error:
            parts.append(self.error)
        if self.unenforced_limits:
            parts.append("not enforced: " + "; ".join(self.unenforced_limits))
        return f"stockade [{self.runtime_used}]: " + ", ".join(parts)
