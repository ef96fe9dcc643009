"""``ExecResult``: the one result every entry point returns (seed 003's response shape).

Standard-library dataclasses, so that a program that runs one command needs no
pydantic: stockade's own code builds them. What comes from elsewhere (a
daemon's answer, a Ray node's, the egress worker's records) is validated with
pydantic at that door (``validate``), which reads these dataclasses' fields
(types, descriptions); ``to_dict``/``to_json`` are their JSON form, the same
one pydantic writes for them (``Serialised``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from .checked import describe, json_value

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


_T = TypeVar("_T")


def _standard_base64(schema: dict[str, Any]) -> None:
    # What the JSON schema says of a bytes field: base64 in the standard alphabet, as ``json_value``
    # writes it (pydantic's own would say base64url, which it writes; it reads either).
    for part in schema.get("anyOf", [schema]):
        if part.get("type") == "string":
            part["format"] = "base64"


class Serialised:
    """A result dataclass's JSON form, and pydantic's way in and out of it."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self, indent: int | None = None) -> str:
        """Compact unless ``indent``; text as UTF-8 rather than escapes (7 MiB of output that is not
        UTF-8 reads as U+FFFD, six bytes escaped), escaped only where it would not encode."""
        separators = (",", ":") if indent is None else None
        text = json.dumps(self.to_dict(), indent=indent, separators=separators, ensure_ascii=False, allow_nan=False)
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate (a file name's undecodable byte): as \udcXX
            return json.dumps(self.to_dict(), indent=indent, separators=separators, allow_nan=False)
        return text

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        # Read as pydantic reads a dataclass (its fields' types, ``__pydantic_config__``); written as ``to_dict``.
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(
            lambda value: value,
            handler(source),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda value: value.to_dict()),
        )


_adapters: dict[type, Any] = {}


def _adapter(cls: type) -> Any:
    if cls not in _adapters:
        from pydantic import TypeAdapter

        _adapters[cls] = TypeAdapter(cls)
    return _adapters[cls]


def validate(cls: type[_T], data: Any, *, json_text: bool = False, extra: str | None = None) -> _T:
    """``data`` (a dict, or JSON text) as ``cls``, checked by pydantic: for what another process sent.
    A pydantic ``ValidationError`` says what is wrong."""
    adapter = _adapter(cls)
    if json_text:
        return adapter.validate_json(data, extra=extra)  # type: ignore[no-any-return]
    return adapter.validate_python(data, extra=extra)  # type: ignore[no-any-return]


@dataclass(kw_only=True)
class SecurityViolation(Serialised):
    """Something the code tried that the policy blocked, as seen by the supervisor (host side)."""

    __pydantic_config__ = {"extra": "forbid"}

    violation_id: str = field(default_factory=new_id)
    timestamp: str = field(default_factory=_now)
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


@dataclass(kw_only=True)
class ResourceUsage(Serialised):
    __pydantic_config__ = {"extra": "forbid"}

    cpu_seconds: float | None = None
    memory_peak_mb: float | None = None


SUMMARY_FIRST_CHARS = 200  # of the first blocked call's description, in a summary
# The limits a run may reach and go on, which its exit status would hide: named in its summary.
HIDDEN_LIMITS = {
    "pids_limit": "pids_limit (a fork was refused)",
    "disk_mb": "disk_mb (the scratch space was full)",
    "max_file_size_bytes": "max_file_size_bytes (a write past it: SIGXFSZ)",
}
MAX_CELL_RESULTS = 1000  # display items one cell may return (each is bounded by the agent's frame)
MAX_CELL_MIME_TYPES = 32
CELL_KINDS = ("execute_result", "display_data")


@dataclass(kw_only=True)
class CellOutput(Serialised):
    """One result of a stateful interpreter's cell: a MIME bundle, as Jupyter's display protocol has it.

    ``kind`` is ``execute_result`` (the value of the cell's last expression) or
    ``display_data`` (``display(obj)``, a matplotlib figure). ``data`` maps MIME
    types to content: text for ``text/*``, ``image/svg+xml``; base64 for
    ``image/png`` and ``image/jpeg``; a JSON value for ``application/json``.
    """

    __pydantic_config__ = {"extra": "forbid"}

    kind: Literal["execute_result", "display_data"]
    data: dict[str, Any] = field(metadata={"max_length": MAX_CELL_MIME_TYPES})

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


@dataclass(kw_only=True)
class CellException(Serialised):
    """The exception that ended a cell: its class name, ``str()``, and a traceback of the cell's frames only."""

    __pydantic_config__ = {"extra": "forbid"}

    name: str
    value: str
    traceback: str


@dataclass(kw_only=True)
class EgressRequest(Serialised):
    """One request an isolate made through the egress proxy (network_policy "allowlist")."""

    __pydantic_config__ = {"extra": "forbid"}

    timestamp: str = field(default_factory=_now)
    host: str
    port: int
    method: str = field(metadata=describe("the HTTP method; CONNECT for a tunnel the proxy did not open"))
    path: str | None = field(default=None, metadata=describe("the request's path, without its query (null: a tunnel)"))
    scheme: Literal["http", "https", "tunnel", "dns", "tcp"] = "http"
    allowed: bool
    reason: str = field(
        default="", metadata=describe("why it was refused, or why an allowed one failed (its host not reached)")
    )
    status: int | None = field(default=None, metadata=describe("the upstream's HTTP status"))
    bytes_sent: int = 0
    bytes_received: int = 0
    secrets_used: list[str] = field(
        default_factory=list, metadata=describe("the names of the secrets put in (never values)")
    )
    open: bool = field(
        default=False,
        metadata=describe(
            "a tunnel the isolate still held as the run ended: the bytes it moved since the last run's "
            "account; what it moves later is in later runs' records"
        ),
    )


@dataclass(kw_only=True)
class ExecResult(Serialised):
    # Raw output travels as base64 in JSON (pydantic's default would be UTF-8, which it may not be).
    __pydantic_config__ = {"extra": "forbid", "ser_json_bytes": "base64", "val_json_bytes": "base64"}

    execution_id: str = field(default_factory=new_id)
    success: bool
    stdout: str = field(default="", metadata=describe("stdout as UTF-8 text (bytes that are not UTF-8 read as U+FFFD)"))
    stderr: str = field(default="", metadata=describe("stderr as UTF-8 text (bytes that are not UTF-8 read as U+FFFD)"))
    stdout_bytes: bytes | None = field(
        default=None,
        metadata=describe(
            "stdout's bytes as written (base64 in JSON); sent only when they are not UTF-8, "
            "null when stdout is exact. In Python it is always set.",
            json_schema_extra=_standard_base64,
        ),
    )
    stderr_bytes: bytes | None = field(
        default=None, metadata=describe("stderr's bytes, as stdout_bytes", json_schema_extra=_standard_base64)
    )
    exit_code: int | None = None
    error: str | None = None
    termination_reason: TerminationReason
    security_violations: list[SecurityViolation] = field(
        default_factory=list, metadata=describe(f"the run's first violations, at most {MAX_VIOLATION_RECORDS}")
    )
    violation_counts: dict[str, int] = field(
        default_factory=dict,
        metadata=describe("every violation of the run, by syscall (or type), those past the records too"),
    )
    violations_dropped: int = field(default=0, metadata=describe("violations counted but not kept as records"))
    execution_time_seconds: float = 0.0
    cold_start_time_ms: float = 0.0
    resource_usage: ResourceUsage = field(default_factory=ResourceUsage)
    runtime_used: str
    policy_digest: str
    unenforced_limits: list[str] = field(
        default_factory=list, metadata=describe("limits of the policy this host could not enforce, and why")
    )
    limits_reached: list[str] = field(
        default_factory=list,
        metadata=describe(
            "the policy's limits the run ran into, by field name: the one that ended it, and those a "
            "command's exit status would hide (pids_limit: a fork refused; disk_mb: the scratch space "
            "full as it ended; max_file_size_bytes: killed by SIGXFSZ; max_output_bytes: output cut)"
        ),
    )
    egress_requests: list[EgressRequest] = field(
        default_factory=list,
        metadata=describe("what the run asked of the egress proxy (network_policy allowlist)"),
    )
    egress_requests_dropped: int = field(default=0, metadata=describe("egress requests made but not kept as records"))
    secrets_redacted: int = field(
        default=0,
        metadata=describe("how many times a secret's value was taken out of this run's output, files and replies"),
    )
    # A stateful interpreter's cell (``run_code(..., session=...)``) only:
    results: list[CellOutput] = field(
        default_factory=list,
        metadata=describe(
            "a cell's results: its last expression's value, display() calls, matplotlib figures",
            max_length=MAX_CELL_RESULTS,
        ),
    )
    exception: CellException | None = field(default=None, metadata=describe("the exception that ended a cell"))
    execution_count: int | None = field(
        default=None,
        metadata=describe("the cell's number in its session: 1 for the first cell of a fresh interpreter"),
    )

    def __post_init__(self) -> None:
        # Output that was UTF-8 travels once, as text; its bytes are the text's.
        if self.stdout_bytes is None:
            self.stdout_bytes = self.stdout.encode()
        if self.stderr_bytes is None:
            self.stderr_bytes = self.stderr.encode()

    def to_dict(self) -> dict[str, Any]:
        """As JSON has it: raw output only where it is not its text's UTF-8 (then base64)."""
        out = super().to_dict()
        for name, text in (("stdout_bytes", self.stdout), ("stderr_bytes", self.stderr)):
            if getattr(self, name) == text.encode():
                out[name] = None
        return out

    def failed_egress(self) -> list[EgressRequest]:
        """The requests the egress proxy let through whose host was not reached (a name that does not
        resolve, a refused connection): the code sees only the proxy's 502."""
        return [r for r in self.egress_requests if r.allowed and r.reason]

    def summary(self) -> str:
        """One line for humans: how it ended, what was blocked, and what allowed requests failed."""
        parts = [f"{self.termination_reason}"]
        if self.exit_code is not None:
            parts.append(f"exit {self.exit_code}")
        if self.security_violations or self.violation_counts:
            names = sorted(self.violation_counts or {violation_key(v) for v in self.security_violations})
            total = sum(self.violation_counts.values()) or len(self.security_violations)
            first = self.security_violations[0].description if self.security_violations else ""
            # The first one's own words: a name alone ("network_egress") does not say what to change.
            shown = f" (first: {first[:SUMMARY_FIRST_CHARS]})" if first else ""
            parts.append(f"{total} blocked: {', '.join(names)}{shown}")
        if failed := self.failed_egress():
            request = failed[0]
            reason = f"{request.host}:{request.port}: {request.reason}"[:SUMMARY_FIRST_CHARS]
            parts.append(f"{len(failed)} allowed request(s) failed (first: {reason})")
        if self.error:
            parts.append(self.error)
        hidden = [name for name in self.limits_reached if name in HIDDEN_LIMITS]
        if hidden:
            parts.append("reached " + ", ".join(HIDDEN_LIMITS[name] for name in hidden))
        if self.unenforced_limits:
            parts.append("not enforced: " + "; ".join(self.unenforced_limits))
        return f"stockade [{self.runtime_used}]: " + ", ".join(parts)
