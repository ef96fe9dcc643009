"""Seed 003's HTTP API shapes: its execute request and response, status and health.

The field names are the seed's, exactly, so a client written against the
seed's controller works unchanged. Each request becomes stockade's own
``ExecuteRequest`` (one request model, ``protocol/models.py``) and each
result is told back in the seed's words, with ``policy_digest`` where the
seed had its constitutional hash, and stockade's ``stdout``, ``stderr`` and
``exit_code`` besides.

Where stockade's words differ from the seed's:

- ``runtime``: ``firecracker`` is the microVM runtime (QEMU here, a
  Firecracker-class VM); ``gvisor`` and ``process`` are themselves; left
  out, the daemon's default runtime runs it. ``runtime_used`` says which ran
  (``microvm`` for a ``firecracker`` request).
- ``network_policy``: ``none`` (no network at all) and ``restricted`` (only
  the isolate's own loopback) are offered; ``full`` is refused: an isolate has
  no route out (an egress proxy is future work), and stockade says so rather
  than run the code with less than it asked for.
- ``filesystem_access``: host paths shared read-only (``SRC[:DST][:rw]``, as
  the CLI's ``--mount``).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..errors import PolicyError
from ..limits import MAX_LIST_ITEMS
from ..policy import MAX_CPU, MAX_MEMORY_MB, MAX_TIMEOUT_S, Policy
from ..protocol.models import Argv, Env, ExecuteRequest, Language, Request
from ..result import ExecResult, SecurityViolation

SeedRuntime = Literal["gvisor", "firecracker", "microvm", "process"]
RUNTIME_OF = {"gvisor": "gvisor", "firecracker": "microvm", "microvm": "microvm", "process": "process"}
NETWORK_OF = {"none": "none", "restricted": "loopback"}

# What to do about a violation, by the kind of call that was blocked: the seed's ``remediation``.
REMEDIATION = {
    "blocked_syscall": "The call is outside the policy: drop it from the code, or run it at a level that allows it.",
    "gvisor_blocked_syscall": "The Sentry refused the call: drop it from the code.",
    "output_limit": "Write less output, or raise max_output_bytes.",
}
DEFAULT_REMEDIATION = "Review the code: it tried something its policy does not allow; the attempt was blocked."


class SeedExecuteRequest(Request):
    """``POST /api/v1/sandbox/execute``: the seed's fields, and stockade's ``language``,
    ``command``, ``trust_level`` and ``stdin``."""

    agent_id: Annotated[str, Field(min_length=1, max_length=128, description="who the run is for")]
    code: str | None = Field(default=None, description="the code to run (or give command)")
    command: Argv | None = Field(default=None, description="an argv to run")
    language: Language = "python"
    runtime: SeedRuntime | None = Field(default=None, description="left out: the daemon's default runtime")
    trust_level: Literal["trusted", "verified", "untrusted"] | None = None
    timeout_seconds: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    memory_limit_mb: int = Field(default=512, ge=16, le=MAX_MEMORY_MB)
    cpu_limit: float = Field(default=1.0, ge=0.01, le=MAX_CPU, allow_inf_nan=False)
    network_policy: Literal["none", "restricted", "full"] = "none"
    filesystem_access: list[str] = Field(
        default_factory=list, max_length=MAX_LIST_ITEMS, description="host paths shared in: SRC[:DST][:rw]"
    )
    environment: Env = Field(default_factory=dict)
    stdin: str | None = None

    @model_validator(mode="after")
    def _code_or_command(self) -> SeedExecuteRequest:
        if (self.code is None) == (self.command is None):
            raise ValueError("give exactly one of 'code' or 'command'")
        return self

    def policy(self) -> Policy:
        if self.network_policy == "full":
            raise PolicyError(
                "network_policy: 'full' is not offered: a stockade isolate has no route out of the host "
                "(use 'none' or 'restricted', its own loopback)"
            )
        shares, environment = tuple(self.filesystem_access), tuple(sorted(self.environment.items()))
        # Kept only while small: the cache must not hold what callers sent (256 environments of a MiB).
        small = sum(map(len, shares)) + sum(len(k) + len(v) for k, v in environment) <= MAX_CACHED_CHARS
        build = _policy if small else _policy.__wrapped__
        runtime = RUNTIME_OF[self.runtime] if self.runtime else None
        return build(runtime, self.trust_level, self.timeout_seconds, self.memory_limit_mb, self.cpu_limit,
                     NETWORK_OF[self.network_policy], shares, environment)  # fmt: skip

    def to_request(self) -> ExecuteRequest:
        return ExecuteRequest(
            command=self.command,
            code=self.code,
            language=self.language,
            policy=self.policy(),
            stdin=self.stdin,
            agent_id=self.agent_id,
        )


# The request's fields that make its policy: an error in them is a policy error.
POLICY_FIELDS = frozenset(
    {"runtime", "trust_level", "timeout_seconds", "memory_limit_mb", "cpu_limit", "network_policy",
     "filesystem_access", "environment"}
)  # fmt: skip


MAX_CACHED_CHARS = 4096


@functools.lru_cache(maxsize=256)
def _policy(
    runtime: str | None,
    trust: str | None,
    timeout_seconds: float,
    memory_mb: int,
    cpu_limit: float,
    network_policy: str,
    filesystem_access: tuple[str, ...],
    environment: tuple[tuple[str, str], ...],
) -> Policy:
    """The Policy of a request's fields, built (and its digest taken) once per distinct set:
    an agent sends the same limits call after call, and a Policy is immutable."""
    return Policy.build(
        runtime=runtime,
        trust=trust,
        timeout_seconds=timeout_seconds,
        memory_mb=memory_mb,
        cpu_limit=cpu_limit,
        network_policy=network_policy,
        filesystem_access=list(filesystem_access),
        environment=dict(environment),
    )


class SeedViolation(BaseModel):
    violation_id: str
    timestamp: str
    violation_type: str
    severity: str
    description: str
    detection_layer: str
    blocked: bool
    indicators: dict[str, Any]
    remediation: str


class SeedResourceUsage(BaseModel):
    cpu_usage_cores: float | None
    memory_usage_mb: float | None
    network_rx_bytes: int
    network_tx_bytes: int


class SeedExecuteResponse(BaseModel):
    execution_id: str
    success: bool
    output: str
    error: str | None
    security_violations: list[SeedViolation]
    execution_time_seconds: float
    cold_start_time_ms: float
    resource_usage: SeedResourceUsage
    termination_reason: str
    runtime_used: str
    policy_digest: str
    stdout: str
    stderr: str
    exit_code: int | None
    violation_counts: dict[str, int]
    unenforced_limits: list[str]
    limits_reached: list[str]


def violation(v: SecurityViolation) -> SeedViolation:
    indicators: dict[str, Any] = {k: v for k, v in (("syscall", v.syscall), ("pid", v.pid)) if v is not None}
    if v.between_runs:
        indicators["between_runs"] = True
    return SeedViolation(
        violation_id=v.violation_id,
        timestamp=v.timestamp,
        violation_type=v.violation_type,
        severity=v.severity,
        description=v.description,
        detection_layer=v.detection_layer,
        blocked=v.blocked,
        indicators=indicators,
        remediation=REMEDIATION.get(v.violation_type, DEFAULT_REMEDIATION),
    )


def response(result: ExecResult) -> SeedExecuteResponse:
    usage = result.resource_usage
    cpu_cores = None
    if usage.cpu_seconds is not None and result.execution_time_seconds > 0:
        cpu_cores = round(usage.cpu_seconds / result.execution_time_seconds, 4)
    return SeedExecuteResponse(
        execution_id=result.execution_id,
        success=result.success,
        output=result.stdout,
        error=result.error,
        security_violations=[violation(v) for v in result.security_violations],
        execution_time_seconds=result.execution_time_seconds,
        cold_start_time_ms=result.cold_start_time_ms,
        # An isolate has no interface out of the host: nothing it sends or receives
        # crosses one ("restricted" is its own loopback), so the counts are truly zero.
        resource_usage=SeedResourceUsage(
            cpu_usage_cores=cpu_cores, memory_usage_mb=usage.memory_peak_mb, network_rx_bytes=0, network_tx_bytes=0
        ),
        termination_reason=result.termination_reason,
        runtime_used=result.runtime_used,
        policy_digest=result.policy_digest,
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        violation_counts=result.violation_counts,
        unenforced_limits=result.unenforced_limits,
        limits_reached=result.limits_reached,
    )


class SeedActiveSandbox(BaseModel):
    execution_id: str | None
    sandbox_id: str | None
    kind: str
    agent_id: str | None
    runtime: str
    uptime_seconds: float
    pod_name: str | None = Field(default=None, description="the seed's Kubernetes pod; stockade runs none")


class SeedStatus(BaseModel):
    active_sandboxes: list[SeedActiveSandbox]
    total_count: int


class Health(BaseModel):
    status: Literal["healthy", "degraded"]
    service: str
    version: str
    policy_digest: str = Field(description="the digest of the default policy")
    runtimes_available: list[str]
    active_sandboxes: int
    placement: dict[str, Any] | None = Field(
        default=None,
        description="where isolates run when not on this host (stockade serve --placement ray): its type, "
        "whether it is reachable, and how many nodes it has (why not: the authenticated runtimes call)",
    )
