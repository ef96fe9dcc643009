"""``Policy``: the one schema every entry point fills (CLI flags, SDK, HTTP, RPC, config files).

Defaults are safe (no network, nothing of the host beyond what the runtime
needs, empty environment); maxima follow seed 003 (memory 2048 MB, cpu 2.0
cores, timeout 600 s). A value out of range raises ``PolicyError`` naming the
field. ``digest`` is the SHA-256 of the canonical JSON, reported with every
result so a caller can check which policy its code ran under.

The three classes are frozen standard-library dataclasses that check
themselves (checked.py: each field's type and bounds), so that a program, or
the command line, that runs one command needs no pydantic. A pydantic model
that holds one (the daemon's requests, the HTTP API, the MCP configuration)
validates it through these same checks, and takes its JSON schema (types,
bounds, descriptions) from the fields. Annotations are real types here, not
strings: the checks read them.
"""

import copy
import dataclasses
import json
import posixpath
import re
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any, Literal

from .agent.wire import MAX_DATA_BYTES
from .checked import Checked, checked_fields, describe, nearest, problems_error, set_fields
from .errors import PolicyError
from .isolation import RUNTIME_NAMES
from .limits import MAX_ENV_ITEMS, MAX_LIST_ITEMS, check_timeout, env_entry_problem

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
ENV_ROOT = "/opt/stockade/env"  # where every runtime mounts a Python environment (agent/rootfs.py says it too)
_RESERVED_TARGETS = ("/", "/proc", "/dev", "/usr", "/etc", "/tmp", "/work", "/bin", "/sbin", "/lib", "/lib64")


@dataclass(frozen=True, init=False)
class Mount(Checked):
    """A host path made visible inside the isolate, read-only unless ``writable``."""

    source: str
    target: str = ""
    writable: bool = False

    def __init__(self, **fields: Any) -> None:
        values = checked_fields(Mount, fields)
        source = _clean_abs(values["source"], "source")
        target = _clean_abs(values["target"] or source, "target")
        if forbidden_source(source):
            raise PolicyError(f"source {source} may not be shared into a sandbox")
        if any(target == p or target.startswith(p + "/") for p in ("/proc", "/dev")) or target in _RESERVED_TARGETS:
            raise PolicyError(f"target {target} is reserved by the runtime")
        set_fields(self, {**values, "source": source, "target": target})

    @classmethod
    def parse(cls, value: str) -> "Mount":
        """ "SRC[:DST][:rw|ro]", the command line's --mount form."""
        parts = value.split(":")
        writable = False
        if parts[-1] in ("rw", "ro") and len(parts) > 1:
            writable = parts.pop() == "rw"
        if len(parts) > 2 or not parts[0]:
            raise PolicyError(f"mount {value!r} is not SRC[:DST][:rw]")
        return cls(source=parts[0], target=parts[1] if len(parts) > 1 else parts[0], writable=writable)


def forbidden_source(path: str) -> bool:
    """Whether ``path`` (absolute, normalised) is one no mount may share: ``/`` or under a host path
    that hands over the host (``_FORBIDDEN_SOURCES``)."""
    return path == "/" or any(path == p or path.startswith(p + "/") for p in _FORBIDDEN_SOURCES)


def _clean_abs(path: str, what: str) -> str:
    if "\0" in path:
        raise PolicyError(f"{what} {path!r} holds a NUL byte, which no path can")
    if not path.startswith("/"):
        raise PolicyError(f"{what} {path!r} must be an absolute path")
    try:
        path.encode("utf-8", "surrogateescape")  # what names a file: text, or the bytes os.fsdecode kept
    except UnicodeEncodeError:
        raise PolicyError(f"{what} {path!r} names no file: it holds a lone surrogate") from None
    clean = posixpath.normpath(path)
    if clean.startswith("//"):
        clean = clean[1:]
    return clean


@dataclass(frozen=True, init=False)
class SecretGrant(Checked):
    """A secret the code may use, bound to hosts and a header: inside, its environment
    variable ``name`` holds a handle; the egress proxy replaces a bound header that
    carries the handle with ``format`` filled with the value, for ``hosts`` only."""

    name: str
    hosts: tuple[str, ...] = field(metadata=describe("the hosts it is sent to", max_length=MAX_LIST_ITEMS))
    header: str = "Authorization"
    format: str = "Bearer {value}"

    def __init__(self, **fields: Any) -> None:
        values = checked_fields(SecretGrant, fields)
        name, hosts, header, form = values["name"], values["hosts"], values["header"], values["format"]
        if not _ENV_NAME.fullmatch(name):
            raise PolicyError(f"secret name {name!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if not hosts:
            raise PolicyError(f"secret {name} is bound to no host")
        if not _HEADER_NAME.fullmatch(header):
            raise PolicyError(f"secret {name}: header {header!r} is not an HTTP header name")
        if form.count("{value}") != 1 or "{" in form.replace("{value}", "") or any(not (" " <= c <= "~") for c in form):
            raise PolicyError(
                f"secret {name}: format must hold {{value}} once, no other braces, and only visible ASCII "
                "and spaces (no line break)"
            )
        set_fields(self, values)

    @classmethod
    def parse(cls, value: str) -> "SecretGrant":
        """ "NAME@HOST[,HOST...]", the command line's --secret form."""
        name, at, hosts = value.partition("@")
        if not at or not name or not hosts:
            raise PolicyError(f"secret {value!r} is not NAME@HOST[,HOST...]")
        return cls(name=name, hosts=tuple(h for h in hosts.split(",") if h))


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


# What an environment may hold: no more than exec takes (one NAME=value of at most 128 KiB, the
# kernel's MAX_ARG_STRLEN), and in all far less than its arguments' share of the stack.
MAX_ENV_ENTRY_BYTES, MAX_ENV_BYTES = 128 << 10, 1 << 20


def check_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` as exec can pass it (a policy's, a call's): names without ``=`` or NUL, values
    without NUL, each text or the bytes os.fsdecode kept, and within exec's bounds."""
    total = 0
    for key, value in env.items():
        if (problem := env_entry_problem(key, value)) is not None:
            raise ValueError(problem)
        try:  # NAME=value and its NUL, as exec counts it
            size = len(key.encode("utf-8", "surrogateescape")) + len(value.encode("utf-8", "surrogateescape")) + 2
        except UnicodeEncodeError:
            raise ValueError(f"environment variable {key[:64]!r} holds a lone surrogate: no text to pass") from None
        if size > MAX_ENV_ENTRY_BYTES:
            raise ValueError(f"environment variable {key[:64]!r} is {size} bytes: at most {MAX_ENV_ENTRY_BYTES}")
        total += size
    if total > MAX_ENV_BYTES:
        raise ValueError(f"the environment is {total} bytes: at most {MAX_ENV_BYTES}")
    return env


def _check_runtime(value: str | None) -> str | None:
    if value is not None and value not in RUNTIME_NAMES:
        near = nearest(value, RUNTIME_NAMES)
        hint = f"; did you mean {near!r}?" if near else ""
        raise ValueError(f"{value!r} is no runtime (one of {', '.join(RUNTIME_NAMES)}){hint}")
    return value


def _check_pids_limit(value: int) -> int:
    if value < MIN_PIDS_LIMIT:
        raise ValueError(
            f"must be at least {MIN_PIDS_LIMIT}: an isolate's agent, the runner it forks ahead and the "
            "command itself all count (in a microVM, the agent's seccomp thread too), so fewer can never "
            "run a command"
        )
    return value


def _check_cpu_limit(value: float) -> float:
    if not value >= MIN_CPU:  # NaN too
        raise ValueError(
            f"must be at least {MIN_CPU} cores: the smallest CPU quota a cgroup takes is 1 ms in every "
            "100 ms, so less could not be enforced"
        )
    return value


def _normalise_packages(value: tuple[str, ...]) -> tuple[str, ...]:
    from .environments import normalise

    return normalise(value)


def check_environment_name(value: str | None) -> str | None:
    from .environments import check_name, existing

    if value is not None:
        existing(check_name(value))
    return value


@dataclass(frozen=True, init=False)
class Policy(Checked):
    """What an isolate may do and use. Unknown fields are errors (naming the nearest one), and
    values are taken as JSON gives them (no ``"256"`` read as 256, no ``true`` as 1)."""

    runtime: str | None = field(
        default=None, metadata=describe(f"a runtime by name ({', '.join(RUNTIME_NAMES)})", check=_check_runtime)
    )
    isolation: IsolationLevel | None = field(
        default=None, metadata=describe("the isolation level to use (none: no isolation at all, for tests)")
    )
    trust: TrustLevel | None = field(
        default=None,
        metadata=describe("how far the code is trusted: its level's runtime, or the nearest stronger one available"),
    )
    timeout_seconds: float = field(
        default=30.0, metadata=describe("wall-clock limit of a run, seconds", gt=0, le=MAX_TIMEOUT_S)
    )
    memory_mb: int = field(default=512, metadata=describe("memory limit, MB", ge=16, le=MAX_MEMORY_MB))
    cpu_limit: float = field(
        default=1.0, metadata=describe(f"CPU limit, cores (at least {MIN_CPU})", le=MAX_CPU, check=_check_cpu_limit)
    )
    pids_limit: int = field(
        default=128,
        metadata=describe(
            f"tasks in the isolate, its agent included (at least {MIN_PIDS_LIMIT})", le=4096, check=_check_pids_limit
        ),
    )
    max_output_bytes: int = field(
        default=1024 * 1024,
        metadata=describe("stdout and stderr kept, bytes (the rest is cut)", ge=0, le=MAX_OUTPUT_BYTES),
    )
    max_file_size_bytes: int = field(
        default=64 * MIB,
        metadata=describe("largest file the code may write, bytes (RLIMIT_FSIZE)", ge=0, le=MAX_FILE_SIZE_BYTES),
    )
    cpu_time_seconds: int | None = field(
        default=None,
        metadata=describe(
            "CPU time of each process, seconds (RLIMIT_CPU): past it the process gets SIGXCPU and the run "
            "ends cpu_limit; separate from the wall clock (default: none)",
            ge=1,
            le=int(MAX_TIMEOUT_S),
        ),
    )
    address_space_mb: int | None = field(
        default=None,
        metadata=describe(
            "virtual memory of each process, MB (RLIMIT_AS): an allocation past it fails, so Python raises "
            "a catchable MemoryError instead of being killed at memory_mb (default: none)",
            ge=MIN_ADDRESS_SPACE_MB,
            le=MAX_ADDRESS_SPACE_MB,
        ),
    )
    max_open_files: int = field(default=256, metadata=describe("open file descriptors", ge=16, le=65536))
    disk_mb: int = field(default=64, metadata=describe("size of the writable scratch (/tmp, /work)", ge=1, le=4096))
    network_policy: NetworkPolicy = field(
        default="none",
        metadata=describe(
            "none: no network at all; loopback: its own lo; allowlist: its own lo, and the egress proxy to "
            "allowed_hosts as its only way out"
        ),
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata=describe(
            "with network_policy allowlist: the hosts it may reach through the proxy (NAME, *.DOMAIN, an "
            "address; :PORT optional)",
            max_length=MAX_LIST_ITEMS,
        ),
    )
    allowed_cidrs: tuple[str, ...] = field(
        default=(),
        metadata=describe(
            "with network_policy allowlist: private networks an allowed name may resolve to, or that may be "
            "reached by address (CIDR)",
            max_length=MAX_LIST_ITEMS,
        ),
    )
    secrets: tuple[SecretGrant, ...] = field(
        default=(),
        metadata=describe(
            "secrets the code uses but never holds: NAME@HOST[,HOST] (it sees a handle; the proxy puts the "
            "value in the bound header for those hosts)",
            max_length=MAX_LIST_ITEMS,
        ),
    )
    filesystem_access: tuple[Mount, ...] = field(
        default=(), metadata=describe("a host path shared in, read-only unless :rw", max_length=MAX_LIST_ITEMS)
    )
    environment: dict[str, str] = field(
        default_factory=dict,
        metadata=describe("environment variables of the code", check=check_environment, max_length=MAX_ENV_ITEMS),
    )
    on_violation: Literal["deny", "kill"] = field(
        default="deny", metadata=describe("deny: the call fails with EPERM and is reported; kill: the run ends")
    )
    max_violations: int | None = field(
        default=None,
        metadata=describe(
            "a flood limit: the run ends (violation) once more calls than this were blocked (default: none)", ge=0
        ),
    )
    environment_name: str | None = field(
        default=None,
        metadata=describe(
            "a Python environment by name (stockade env build NAME), mounted read-only at /opt/stockade/env",
            check=check_environment_name,
        ),
    )
    packages: tuple[str, ...] = field(
        default=(),
        metadata=describe(
            "Python requirements (pip's syntax): the environment they make, built on first use from wheels "
            "and cached by content",
            check=_normalise_packages,
            max_length=MAX_LIST_ITEMS,
        ),
    )
    environment_id: str | None = field(
        default=None,
        metadata=describe(
            "the content id of the environment the code runs with: set from environment_name or packages "
            "on the host; given alone, it pins one"
        ),
    )

    def __init__(self, **fields: Any) -> None:
        """Checked: a ``PolicyError`` names each field that is wrong."""
        set_fields(self, checked_fields(Policy, fields))
        try:
            self._check_together()
        except ValueError as exc:
            said = str(exc).removeprefix("invalid policy: ")
            error = problems_error([((), said)])
            error.args = (f"invalid policy: {said}",)  # it names its fields itself: no "policy: " before it
            raise error from None

    def _check_together(self) -> None:
        """What no field says alone: mount targets, the egress fields, the environment."""
        targets = [m.target for m in self.filesystem_access]
        if len(targets) != len(set(targets)):
            raise ValueError("filesystem_access has two mounts on the same target")
        for target in targets:
            # The environment's place is the runtime's, with or without one: a caller's mount there
            # passed as one (its source let by STOCKADE_MOUNT_ROOTS as the store's own would be).
            if target == ENV_ROOT or target.startswith(ENV_ROOT + "/"):
                raise ValueError(f"filesystem_access target {target} is the environment's place, {ENV_ROOT}")
        self._check_egress()
        if self.environment_name is None and not self.packages and self.environment_id is None:
            return
        # On the host that reads the policy: environment_name or packages become the content id,
        # which the digest then covers (docs/environments.md).
        from .environments import resolve

        object.__setattr__(self, "environment_id", resolve(self.environment_name, self.packages, self.environment_id))
        for target in targets:
            if ENV_ROOT.startswith(target + "/"):
                raise ValueError(f"filesystem_access target {target} would cover the environment at {ENV_ROOT}")

    def _check_egress(self) -> None:
        if self.network_policy != "allowlist":
            for name in ("allowed_hosts", "allowed_cidrs", "secrets"):
                if getattr(self, name):
                    raise ValueError(f"{name} needs network_policy 'allowlist' (it is {self.network_policy!r})")
            return
        from .egress.allowlist import Allowlist, host_covered

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

    @classmethod
    def build(cls, **fields: Any) -> "Policy":
        """Validate: a ``PolicyError`` names each field that is wrong."""
        return cls(**fields)

    def fields(self) -> dict[str, Any]:
        """The fields as given to ``Policy(**...)``: a policy's ``fields()`` builds the same policy."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def non_defaults(self) -> dict[str, Any]:
        """The fields that differ from the defaults, as JSON has them."""
        defaults = default_policy().to_dict()
        return {name: value for name, value in self.to_dict().items() if value != defaults[name]}

    def replace(self, **changes: Any) -> "Policy":
        """A policy with ``changes`` over these fields, checked as any other."""
        return Policy(**{**self.fields(), **changes})

    def with_mount(self, mount: Mount) -> "Policy":
        """This policy with one more shared path that the runtime adds itself (a Python environment at
        its own root, which a policy may not name): not checked again, and the digest stays this one's,
        the policy the caller asked for."""
        grown = copy.copy(self)
        object.__setattr__(grown, "filesystem_access", (*self.filesystem_access, mount))
        grown.__dict__["digest"] = self.digest
        return grown

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @cached_property
    def digest(self) -> str:
        # The policy is frozen, so the digest of an instance never changes. hashlib is imported
        # here: loading OpenSSL costs a one-shot CLI run ~2 ms that is not spent when no digest is asked for.
        import hashlib

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
        base = policy.fields()
    elif isinstance(policy, dict):
        base = dict(policy)
    else:
        raise PolicyError(f"policy must be a Policy or a dict, not {type(policy).__name__}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Policy.build(**base)


def policy_of(
    call: str,
    policy: Policy | dict[str, Any] | None,
    fields: dict[str, Any],
    timeout: float | None = None,
    own: tuple[str, ...] = (),
) -> Policy:
    """The Policy a call with ``**policy_fields`` runs under (``run``, ``Sandbox``, ``Client.execute``...):
    ``policy`` with ``fields``, and ``timeout``, one more name for ``timeout_seconds``. A keyword that
    is neither a field nor one of the call's ``own`` is a ``TypeError`` naming ``call``, as Python
    says it, with the name it most likely meant; a ``timeout`` that is no number of seconds above 0
    is refused too (``limits.check_timeout``)."""
    check_timeout(timeout)
    known = [f.name for f in dataclasses.fields(Policy)]
    for name in fields:
        if name not in known:
            near = nearest(name, [k for k in (*own, "timeout", *known) if k != name])
            raise TypeError(
                f"{call}() got an unexpected keyword argument {name!r}" + (f" (did you mean {near!r}?)" if near else "")
            )
    if timeout is not None:
        if fields.get("timeout_seconds", timeout) != timeout:
            raise PolicyError("give timeout or timeout_seconds, not both (they are the same limit here)")
        fields = {**fields, "timeout_seconds": timeout}
    return coerce_policy(policy, **fields)


@cache
def default_policy() -> Policy:
    """The all-defaults policy, built once (it is immutable)."""
    return Policy()
