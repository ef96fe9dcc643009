"""``Policy``: the one schema every entry point fills (CLI flags, SDK, HTTP, RPC, config files).

Defaults are safe (no network, nothing of the host beyond what the runtime
needs, empty environment); maxima follow seed 003 (memory 2048 MB, cpu 2.0
cores, timeout 600 s). A value out of range raises ``PolicyError`` naming the
field. ``digest`` is the SHA-256 of the canonical JSON, reported with every
result so a caller can check which policy its code ran under.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import posixpath
import re
from functools import cache, cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .agent.wire import MAX_DATA_BYTES
from .errors import PolicyError
from .isolation import RUNTIME_NAMES

IsolationLevel = Literal["none", "process", "gvisor", "microvm"]
TrustLevel = Literal["trusted", "verified", "untrusted"]
NetworkPolicy = Literal["none", "loopback", "allowlist"]

MAX_MEMORY_MB = 2048
MAX_CPU = 2.0
MAX_TIMEOUT_S = 600.0
# The agent's reply carries the output base64-encoded in one frame of at most
# 10 MiB (agent/wire.py, seed 001): 7 MiB of output is what fits.
MAX_OUTPUT_BYTES = MAX_DATA_BYTES
# The fewest tasks with which an isolate can run a command, in every runtime:
# its agent, the runner the agent forks ahead for the next request, and the
# command itself; in a microVM the agent also keeps a thread that answers the
# guest's seccomp filter, and RLIMIT_NPROC counts threads.
MIN_PIDS_LIMIT = 4
MIB = 1024 * 1024
MAX_FILE_SIZE_BYTES = 4096 * MIB
# An address space smaller than this cannot load the agent's runner (a copy of
# the Python interpreter) plus a program; larger than this is no limit at all.
MIN_ADDRESS_SPACE_MB = 64
MAX_ADDRESS_SPACE_MB = 1024 * 1024
# The smallest CPU quota a cgroup takes is 1 ms per 100 ms period: less cannot be enforced.
MIN_CPU = 0.01

# Host paths never shared into an isolate, even when asked: they hand over the host.
_FORBIDDEN_SOURCES = ("/proc", "/sys", "/dev", "/run", "/var/run", "/boot")
# Isolate paths a mount may not cover: the runtime builds them itself.
_RESERVED_TARGETS = ("/", "/proc", "/dev", "/usr", "/etc", "/tmp", "/work", "/bin", "/sbin", "/lib", "/lib64")


class Mount(BaseModel):
    """A host path made visible inside the isolate, read-only unless ``writable``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: str
    target: str = ""
    writable: bool = False

    @model_validator(mode="before")
    @classmethod
    def _parse_short_form(cls, value: Any) -> Any:
        # "SRC[:DST][:rw|ro]", the CLI's --mount form
        if isinstance(value, str):
            parts = value.split(":")
            writable = False
            if parts[-1] in ("rw", "ro") and len(parts) > 1:
                writable = parts.pop() == "rw"
            if len(parts) > 2 or not parts[0]:
                raise ValueError(f"mount {value!r} is not SRC[:DST][:rw]")
            return {"source": parts[0], "target": parts[1] if len(parts) > 1 else parts[0], "writable": writable}
        return value

    @model_validator(mode="after")
    def _check_paths(self) -> Mount:
        source = _clean_abs(self.source, "source")
        target = _clean_abs(self.target or self.source, "target")
        if any(source == p or source.startswith(p + "/") for p in _FORBIDDEN_SOURCES) or source == "/":
            raise ValueError(f"source {source} may not be shared into a sandbox")
        if any(target == p or target.startswith(p + "/") for p in ("/proc", "/dev")) or target in _RESERVED_TARGETS:
            raise ValueError(f"target {target} is reserved by the runtime")
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "target", target)
        return self


def _clean_abs(path: str, what: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"{what} {path!r} must be an absolute path")
    try:
        path.encode("utf-8", "surrogateescape")  # what names a file: text, or the bytes os.fsdecode kept
    except UnicodeEncodeError:
        raise ValueError(f"{what} {path!r} names no file: it holds a lone surrogate") from None
    clean = posixpath.normpath(path)
    if clean.startswith("//"):
        clean = clean[1:]
    return clean


class SecretGrant(BaseModel):
    """A secret the code may use, bound to hosts and a header: inside, its environment
    variable ``name`` holds a handle; the egress proxy replaces a bound header that
    carries the handle with ``format`` filled with the value, for ``hosts`` only."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    hosts: tuple[str, ...]
    header: str = "Authorization"
    format: str = "Bearer {value}"

    @model_validator(mode="before")
    @classmethod
    def _parse_short_form(cls, value: Any) -> Any:
        # "NAME@HOST[,HOST...]", the CLI's --secret form
        if isinstance(value, str):
            name, at, hosts = value.partition("@")
            if not at or not name or not hosts:
                raise ValueError(f"secret {value!r} is not NAME@HOST[,HOST...]")
            return {"name": name, "hosts": tuple(h for h in hosts.split(",") if h)}
        if isinstance(value, dict) and isinstance(value.get("hosts"), list):
            return {**value, "hosts": tuple(value["hosts"])}
        return value

    @model_validator(mode="after")
    def _check(self) -> SecretGrant:
        if not _ENV_NAME.fullmatch(self.name):
            raise ValueError(f"secret name {self.name!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if not self.hosts:
            raise ValueError(f"secret {self.name} is bound to no host")
        if not _HEADER_NAME.fullmatch(self.header):
            raise ValueError(f"secret {self.name}: header {self.header!r} is not an HTTP header name")
        if (
            self.format.count("{value}") != 1
            or "{" in self.format.replace("{value}", "")
            or any(not (" " <= c <= "~") for c in self.format)
        ):
            raise ValueError(
                f"secret {self.name}: format must hold {{value}} once, no other braces, and only visible ASCII "
                "and spaces (no line break)"
            )
        return self


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


class Policy(BaseModel):
    """What an isolate may do and use. ``extra="forbid"``: unknown fields are errors; ``strict``:
    values are taken as JSON gives them (no ``"256"`` read as 256, no ``true`` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    runtime: str | None = Field(default=None, description=f"a runtime by name ({', '.join(RUNTIME_NAMES)})")
    isolation: IsolationLevel | None = Field(
        default=None, description="the isolation level to use (none: no isolation at all, for tests)"
    )
    trust: TrustLevel | None = Field(
        default=None, description="how far the code is trusted: the strongest available level meeting its minimum"
    )
    timeout_seconds: float = Field(
        default=30.0, gt=0, le=MAX_TIMEOUT_S, description="wall-clock limit of a run, seconds"
    )
    memory_mb: int = Field(default=512, ge=16, le=MAX_MEMORY_MB, description="memory limit, MB")
    cpu_limit: float = Field(default=1.0, le=MAX_CPU, description=f"CPU limit, cores (at least {MIN_CPU})")
    pids_limit: int = Field(
        default=128, le=4096, description=f"tasks in the isolate, its agent included (at least {MIN_PIDS_LIMIT})"
    )
    max_output_bytes: int = Field(
        default=1024 * 1024, ge=0, le=MAX_OUTPUT_BYTES, description="stdout and stderr kept, bytes (the rest is cut)"
    )
    max_file_size_bytes: int = Field(
        default=64 * MIB,
        ge=0,
        le=MAX_FILE_SIZE_BYTES,
        description="largest file the code may write, bytes (RLIMIT_FSIZE)",
    )
    cpu_time_seconds: int | None = Field(
        default=None,
        ge=1,
        le=int(MAX_TIMEOUT_S),
        description="CPU time of each process, seconds (RLIMIT_CPU): past it the process gets SIGXCPU and the run "
        "ends cpu_limit; separate from the wall clock (default: none)",
    )
    address_space_mb: int | None = Field(
        default=None,
        ge=MIN_ADDRESS_SPACE_MB,
        le=MAX_ADDRESS_SPACE_MB,
        description="virtual memory of each process, MB (RLIMIT_AS): an allocation past it fails, so Python raises "
        "a catchable MemoryError instead of being killed at memory_mb (default: none)",
    )
    max_open_files: int = Field(default=256, ge=16, le=65536, description="open file descriptors")
    disk_mb: int = Field(default=64, ge=1, le=4096, description="size of the writable scratch (/tmp, /work)")
    network_policy: NetworkPolicy = Field(
        default="none",
        description="none: no network at all; loopback: its own lo; allowlist: its own lo, and the egress proxy to "
        "allowed_hosts as its only way out",
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="with network_policy allowlist: the hosts it may reach through the proxy (NAME, *.DOMAIN, an "
        "address; :PORT optional)",
    )
    allowed_cidrs: tuple[str, ...] = Field(
        default=(),
        description="with network_policy allowlist: private networks an allowed name may resolve to, or that may be "
        "reached by address (CIDR)",
    )
    secrets: tuple[SecretGrant, ...] = Field(
        default=(),
        description="secrets the code uses but never holds: NAME@HOST[,HOST] (it sees a handle; the proxy puts the "
        "value in the bound header for those hosts)",
    )
    filesystem_access: tuple[Mount, ...] = Field(default=(), description="a host path shared in, read-only unless :rw")
    environment: dict[str, str] = Field(default_factory=dict, description="environment variables of the code")
    on_violation: Literal["deny", "kill"] = Field(
        default="deny", description="deny: the call fails with EPERM and is reported; kill: the run ends"
    )
    max_violations: int | None = Field(
        default=None,
        ge=0,
        description="a flood limit: the run ends (violation) once more calls than this were blocked (default: none)",
    )
    environment_name: str | None = Field(
        default=None,
        description="a Python environment by name (stockade env build NAME), mounted read-only at /opt/stockade/env",
    )
    packages: tuple[str, ...] = Field(
        default=(),
        description="Python requirements (pip's syntax): the environment they make, built on first use from wheels "
        "and cached by content",
    )
    environment_id: str | None = Field(
        default=None,
        description="the content id of the environment the code runs with: set from environment_name or packages "
        "on the host; given alone, it pins one",
    )

    def __init__(self, **fields: Any) -> None:
        # ``Policy(memory_mb=99999)`` raises ``PolicyError`` naming the field, as every door does
        # (a pydantic ValidationError is not a StockadeError, so callers would miss it).
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise policy_error(exc) from None

    @field_validator("environment")
    @classmethod
    def _check_environment(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"environment variable {key!r} has an invalid name or value")
        return env

    @field_validator("pids_limit")
    @classmethod
    def _check_pids_limit(cls, value: int) -> int:
        if value < MIN_PIDS_LIMIT:
            raise ValueError(
                f"must be at least {MIN_PIDS_LIMIT}: an isolate's agent, the runner it forks ahead and the "
                "command itself all count (in a microVM, the agent's seccomp thread too), so fewer can never "
                "run a command"
            )
        return value

    @field_validator("cpu_limit")
    @classmethod
    def _check_cpu_limit(cls, value: float) -> float:
        if not value >= MIN_CPU:  # NaN too
            raise ValueError(
                f"must be at least {MIN_CPU} cores: the smallest CPU quota a cgroup takes is 1 ms in every "
                "100 ms, so less could not be enforced"
            )
        return value

    @field_validator("filesystem_access", "packages", "allowed_hosts", "allowed_cidrs", "secrets", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        # Strict mode takes tuples only: a JSON list (every door's) becomes one.
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check_targets_unique(self) -> Policy:
        targets = [m.target for m in self.filesystem_access]
        if len(targets) != len(set(targets)):
            raise ValueError("filesystem_access has two mounts on the same target")
        return self

    @model_validator(mode="after")
    def _check_egress(self) -> Policy:
        from .egress.allowlist import Allowlist, host_covered

        if self.network_policy != "allowlist":
            for name in ("allowed_hosts", "allowed_cidrs", "secrets"):
                if getattr(self, name):
                    raise ValueError(f"{name} needs network_policy 'allowlist' (it is {self.network_policy!r})")
            return self
        allowed = Allowlist(self.allowed_hosts, self.allowed_cidrs)  # a ValueError names the bad entry
        names = [grant.name for grant in self.secrets]
        if len(names) != len(set(names)):
            raise ValueError("secrets: a name is granted twice")
        for grant in self.secrets:
            if grant.name in self.environment:
                raise ValueError(f"secrets: {grant.name} is also set in environment")
            for host in grant.hosts:
                try:
                    covered = host_covered(host, allowed)
                except ValueError as exc:
                    raise ValueError(f"secret {grant.name}: {exc}") from None
                if not covered:
                    raise ValueError(f"secret {grant.name} is bound to {host}, which allowed_hosts does not allow")
        return self

    @field_validator("packages")
    @classmethod
    def _normalise_packages(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from .environments import normalise

        return normalise(value)

    @field_validator("environment_name")
    @classmethod
    def _check_environment_name(cls, value: str | None) -> str | None:
        from .environments import check_name, existing

        if value is not None:
            existing(check_name(value))
        return value

    @model_validator(mode="after")
    def _resolve_environment(self) -> Policy:
        # On the host that reads the policy: environment_name or packages become the content id,
        # which the digest then covers (docs/environments.md).
        if self.environment_name is None and not self.packages and self.environment_id is None:
            return self
        from .environments import ENV_ROOT, resolve

        object.__setattr__(self, "environment_id", resolve(self.environment_name, self.packages, self.environment_id))
        for m in self.filesystem_access:
            if m.target == ENV_ROOT or m.target.startswith(ENV_ROOT + "/") or ENV_ROOT.startswith(m.target + "/"):
                raise ValueError(f"filesystem_access target {m.target} would cover the environment at {ENV_ROOT}")
        return self

    @classmethod
    def build(cls, **fields: Any) -> Policy:
        """Validate: a ``PolicyError`` names each field that is wrong."""
        return cls(**fields)

    def replace(self, **changes: Any) -> Policy:
        return Policy.build(**{**self.model_dump(), **changes})

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @cached_property
    def digest(self) -> str:
        # The model is frozen, so the digest of an instance never changes.
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


# The command line's flag for each Policy field, where it is not the field's own name
# with dashes, and the placeholder its help shows. Everything else a flag says (its
# type, choices, default, bounds and help) is read from the field (cli.py).
CLI_FLAGS: dict[str, tuple[str, str | None]] = {
    "timeout_seconds": ("--timeout", "S"),
    "memory_mb": ("--memory", "MB"),
    "cpu_limit": ("--cpu", "N"),
    "pids_limit": ("--pids", "N"),
    "max_output_bytes": ("--max-output", "BYTES"),
    "max_file_size_bytes": ("--max-file-size", "BYTES"),
    "cpu_time_seconds": ("--cpu-time", "S"),
    "address_space_mb": ("--address-space", "MB"),
    "max_open_files": ("--max-open-files", "N"),
    "disk_mb": ("--disk", "MB"),
    "network_policy": ("--network", None),
    "allowed_hosts": ("--allow-host", "HOST[:PORT]"),
    "allowed_cidrs": ("--allow-cidr", "CIDR"),
    "secrets": ("--secret", "NAME@HOST[,HOST]"),
    "filesystem_access": ("--mount", "SRC[:DST][:rw]"),
    "environment": ("--env", "K=V"),
    "max_violations": ("--max-violations", "N"),
    "environment_name": ("--python-env", "NAME"),
    "packages": ("--package", "REQ"),
    "environment_id": ("--python-env-id", "ID"),
}


def policy_error(exc: ValidationError) -> PolicyError:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "policy"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(field, Policy.model_fields, n=1)
            message = f"unknown field (did you mean {near[0]}?)" if near else "unknown field"
        parts.append(f"{field}: {message}")
    return PolicyError("invalid policy: " + "; ".join(parts))


def coerce_policy(policy: Policy | dict[str, Any] | None, **overrides: Any) -> Policy:
    """Accept a Policy, a dict of fields, or None (defaults), plus keyword overrides."""
    if not policy and (not overrides or all(v is None for v in overrides.values())):
        if policy is None or policy == {}:
            return default_policy()
    if policy is None:
        base: dict[str, Any] = {}
    elif isinstance(policy, Policy):
        if not overrides:
            return policy
        base = policy.model_dump()
    elif isinstance(policy, dict):
        base = dict(policy)
    else:
        raise PolicyError(f"policy must be a Policy or a dict, not {type(policy).__name__}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Policy.build(**base)


@cache
def default_policy() -> Policy:
    """The all-defaults policy, built once (it is immutable)."""
    return Policy()
