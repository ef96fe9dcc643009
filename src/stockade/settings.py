"""Every ``STOCKADE_*`` setting, read into one typed object.

The daemon reads its settings once at start (``DaemonConfig.from_env``),
installs them (``install``), and passes them down; everything else asks
``current()``: the installed settings, or, in a program using stockade as a
library, those of its environment, parsed once for each distinct set of
``STOCKADE_*`` variables (a program, or a test, that changes them gets them
parsed again). No other module reads a ``STOCKADE_*`` variable, except the
lean command line (cli_daemon.py: ``STOCKADE_SOCKET``, ``STOCKADE_AUTH_TOKEN``,
``STOCKADE_DAEMON_USER``).

Every variable is text, parsed by its own function below, which refuses a
malformed value with a ``ConfigError`` naming the variable; an unknown
``STOCKADE_*`` variable is ignored. ``Settings`` is a frozen standard-library
dataclass, so that a program that runs one command reads its settings without
importing pydantic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from .errors import ConfigError
from .paths import DEFAULT_GUEST_PYTHON, default_config_dir, default_socket_path, default_state_dir

if TYPE_CHECKING:
    from .placement.config import PlacementConfig

DEFAULT_HTTP_PORT = 8002  # seed 003's
DEFAULT_SANDBOX_UIDS = (1879048192, 1879113727)  # systemd's unused 0x70000000 range: docs/runtime-process.md
TRUST_LEVELS = ("trusted", "verified", "untrusted")
ISOLATION_LEVELS = ("none", "process", "gvisor", "microvm")


class Secret:
    """A secret setting's value: kept out of reprs and logs (``value`` holds it)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


def _local_placement() -> PlacementConfig:
    from .placement.config import LocalPlacementConfig

    return LocalPlacementConfig()


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The ``STOCKADE_*`` variables; each field is its variable's name without the prefix."""

    # The daemon (docs/daemon.md, docs/deployment.md)
    socket: str = field(default_factory=default_socket_path)
    socket_perms: int = 0o600
    socket_group: str | None = None  # the socket's group (a name or a gid); unset: the daemon's own
    auth_token: Secret | None = None
    max_requests: int = 100
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    max_connections: int = 64
    max_sandboxes: int = 8
    max_sandboxes_per_uid: int | None = None
    queue_limit: int = 16
    queue_timeout: float = 30.0
    replay_window: float = 30.0
    max_request_bytes: int = 16 * 1024 * 1024
    shutdown_grace: float = 10.0
    sandbox_idle_timeout: float | None = 600.0
    http: tuple[str, int] | None = None
    api_token: Secret | None = None
    metrics_token: Secret | None = None  # reads GET /metrics, and nothing else (a scraper's)
    agent_max_requests: int = 20
    http_stall_timeout: float = 60.0
    http_header_timeout: float = 10.0
    http_max_per_network: int = 128
    audit_log: str | None = ""  # "": beside the state, "off" -> None
    audit_max_bytes: int = 64 * 1024 * 1024
    build_packages: bool = False
    # The ``fake`` runtime (isolation ``none``: commands run as the daemon, unconfined) for the
    # daemon's callers: off, or any caller of a root daemon would be root.
    allow_unisolated: bool = False
    # Host directories a shared path (filesystem_access) must lead into; None: anywhere others may read.
    mount_roots: tuple[str, ...] | None = None
    state_dir: str = field(default_factory=default_state_dir)
    daemon_user: str | None = None  # `stockade serve` as root becomes it (unset: stockade if it exists; root: stays)
    # The runtimes
    pool_size: int = 2
    pool_shapes: int | None = None  # None: each runtime's own default
    cgroup_parent: str | None = None
    sandbox_uids: tuple[int, int] = DEFAULT_SANDBOX_UIDS
    trust_map: dict[str, str] = field(default_factory=dict)  # over isolation.DEFAULT_TRUST_MAP
    guest_python: str = DEFAULT_GUEST_PYTHON
    gvisor_platform: str | None = None
    microvm_accel: str | None = None
    microvm_snapshots: bool = True
    # Python environments (docs/environments.md)
    env_store: str | None = None
    env_build_timeout: float | None = None
    # What a daemon's callers' builds (packages=, STOCKADE_BUILD_PACKAGES=1) may fill the store to: each
    # spelling of a requirement list is an environment of its own, kept.
    env_store_limit_mb: int = 20480
    # Egress and secrets (docs/egress.md)
    egress_ca_file: str | None = None
    egress_hosts_file: str | None = None
    # Networks a policy may let a sandbox reach besides public addresses; None: any (allowed_cidrs decides).
    egress_networks: tuple[str, ...] | None = None
    # The host ports a daemon's callers that are not root may name to publish on (None: any from 1024).
    publish_ports: tuple[int, int] | None = None
    secrets_file: str | None = None
    broker_socket: str | None = None
    session_key: Secret | None = None
    session_key_file: str = "/run/stockade/.session"
    # MCP tools (docs/mcp.md)
    config_dir: str = field(default_factory=default_config_dir)
    # Where isolates run (docs/scale-out.md): "local", or JSON such as {"type": "ray", "address": "head:6379"}
    placement: PlacementConfig = field(default_factory=_local_placement)

    def __post_init__(self) -> None:
        if self.audit_log == "":
            object.__setattr__(self, "audit_log", os.path.join(self.state_dir, "audit.log"))

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> Self:
        """The settings of ``env`` (default: this process's environment), each variable parsed
        into its field's value; a malformed one is refused naming it (``ConfigError``)."""
        names = {f.name for f in dataclasses.fields(Settings)}  # a subclass's own fields are no variable
        given: dict[str, Any] = {}
        problems: list[str] = []
        for key, raw in (os.environ if env is None else env).items():
            name = key.removeprefix("STOCKADE_").lower()
            if not key.startswith("STOCKADE_") or name not in names or raw.strip() == "":
                continue  # another program's, not a setting, or set but empty: the default, as unset
            parse = _PARSERS.get(name)
            try:
                given[name] = parse(raw.strip(), key) if parse is not None else raw
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**given)

    def replace(self, **changes: Any) -> Self:
        """These settings with ``changes`` (values, not text)."""
        return dataclasses.replace(self, **changes)

    def secret(self, name: str) -> str | None:
        """A secret setting's value (``auth_token``, ``api_token``, ``metrics_token``, ``session_key``): kept
        out of reprs."""
        value = getattr(self, name)
        return value.value if value is not None else None


# ---- parsing one variable ----------------------------------------------------------------


def _octal(raw: str, name: str) -> int:
    try:
        value = int(raw, 8)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an octal file mode (e.g. 0600)") from None
    if not 0 <= value <= 0o777:
        raise ConfigError(f"{name}={raw!r} is outside 0000-0777")
    return value


def _switch(raw: str, name: str) -> bool:
    if raw not in ("0", "1"):
        raise ConfigError(f"{name}={raw!r}: expected 0 or 1")
    return raw == "1"


def _int(minimum: int) -> Callable[[str, str], int]:
    def parse(raw: str, name: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if value < minimum:
            raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
        return value

    return parse


def _seconds(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:  # nan compares false with everything: refused by name
        raise ConfigError(f"{name}={raw!r} must be a positive, finite number")
    return value


def _seconds_or_never(raw: str, name: str) -> float | None:
    """A positive number of seconds, or None for 0 (never)."""
    with contextlib.suppress(ValueError):  # not a number: _seconds says so, by name
        if float(raw) == 0:
            return None
    return _seconds(raw, name)


def _ids(raw: str, name: str) -> frozenset[int]:
    try:
        return frozenset(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a comma-separated list of numeric ids") from None


def token_setting(raw: str, name: str) -> Secret:
    """A token's value, checked: long enough, and no template's placeholder."""
    if any(c in raw for c in "<> \t") or not raw.isprintable():
        # A template's placeholder left in place (``<token-from-...>``) would be a token anyone can read.
        raise ConfigError(f"{name} looks like a placeholder, not a token (make one with `stockade token new`)")
    if len(raw) < 16:
        raise ConfigError(f"{name} is too short (use at least 16 characters; `stockade token new`)")
    return Secret(raw)


def listen_address(raw: str, name: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; a bare ``HOST``: port 8002) as a host and a port."""
    given = raw.strip()
    bare_ipv6 = given.count(":") > 1 and not given.startswith("[")
    if bare_ipv6 or ":" not in given or (given.startswith("[") and given.endswith("]")):
        given = f"[{given.strip('[]')}]:{DEFAULT_HTTP_PORT}" if ":" in given else f"{given}:{DEFAULT_HTTP_PORT}"
    host, sep, port = given.rpartition(":")
    host = host.strip("[]")
    if sep and host and not host.isdigit() and port.isdigit() and int(port) > 65535:
        raise ConfigError(f"{name}={raw!r}: port {int(port)} is out of range (0-65535; 0: any free one)")
    if not sep or not host or host.isdigit() or not port.isdigit():
        raise ConfigError(f"{name}={raw!r} is not HOST:PORT (e.g. 127.0.0.1:8002)")
    return host, int(port)


def _mount_roots(raw: str, name: str) -> tuple[str, ...]:
    """Comma-separated absolute directories, or ``none`` (no host path may be shared)."""
    if raw.strip().lower() == "none":
        return ()
    roots = []
    for item in filter(None, (x.strip() for x in raw.split(","))):
        if not item.startswith("/") or "\0" in item:
            raise ConfigError(f"{name} entry {item!r} is not an absolute path (or set {name}=none)")
        roots.append(os.path.normpath(item))
    return tuple(roots)


def _networks(raw: str, name: str) -> tuple[str, ...]:
    """Comma-separated networks (CIDR), or ``none`` (public addresses only)."""
    import ipaddress

    if raw.strip().lower() == "none":
        return ()
    networks = []
    for item in filter(None, (x.strip() for x in raw.split(","))):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            why = f"{name} entry {item!r} is not a network such as 10.0.0.0/8 (or set {name}=none)"
            raise ConfigError(why) from None
    return tuple(networks)


def _audit(raw: str, name: str) -> str | None:
    return None if raw.lower() == "off" else raw


def _cgroup_parent(raw: str, name: str) -> str:
    parts = raw.split("/")
    if not raw.startswith("/") or any(p in (".", "..") for p in parts) or "\0" in raw:
        raise ConfigError(
            f"{name}={raw!r}: must be an absolute path inside the cgroup hierarchy, "
            "without '.' or '..' (for example /stockade)"
        )
    return "/" + "/".join(p for p in parts if p)


def _range(what: str, lowest: int, highest: int) -> Callable[[str, str], tuple[int, int]]:
    """A parser of ``first-last``: two numbers with ``lowest <= first <= last <= highest``."""

    def parse(raw: str, name: str) -> tuple[int, int]:
        first_s, sep, last_s = raw.partition("-")
        try:
            first, last = int(first_s), int(last_s)
        except ValueError:
            first = last = -1
        if not sep or not lowest <= first <= last <= highest:
            raise ConfigError(
                f"{name}={raw!r}: expected 'first-last', two {what} with {lowest} <= first <= last <= {highest}"
            )
        return first, last

    return parse


_uid_range = _range("uids", 1000, 2**32 - 2)
_port_range = _range("ports", 1024, 65535)


def _trust_map(raw: str, name: str) -> dict[str, str]:
    mapping = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        trust, sep, level = item.partition("=")
        if not sep or trust not in TRUST_LEVELS or level not in ISOLATION_LEVELS:
            raise ConfigError(
                f"{name} entry {item!r} is not TRUST=LEVEL "
                f"(trust: {', '.join(TRUST_LEVELS)}; level: {', '.join(ISOLATION_LEVELS)})"
            )
        mapping[trust] = level
    return mapping


def _path(raw: str, name: str) -> str:
    return os.path.abspath(raw)


def _placement(raw: str, name: str) -> PlacementConfig:
    from .placement.config import parse_placement

    try:
        return parse_placement(raw)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {str(exc).removeprefix('placement: ')}") from None


def _one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(raw: str, name: str) -> str:
        if raw not in choices:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
        return raw

    return parse


def _timeout(raw: str, name: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "socket_perms": _octal,
    "session_key": lambda raw, name: Secret(raw),
    "auth_token": token_setting,
    "api_token": token_setting,
    "metrics_token": token_setting,
    "max_requests": _int(1),
    "allowed_uids": _ids,
    "allowed_gids": _ids,
    "max_connections": _int(1),
    "max_sandboxes": _int(1),
    "max_sandboxes_per_uid": _int(1),
    "queue_limit": _int(0),
    "queue_timeout": _seconds,
    "replay_window": _seconds,
    "max_request_bytes": _int(1024),
    "shutdown_grace": _seconds,
    "sandbox_idle_timeout": _seconds_or_never,
    "http": listen_address,
    "agent_max_requests": _int(1),
    "http_stall_timeout": _seconds,
    "http_header_timeout": _seconds,
    "http_max_per_network": _int(1),
    "audit_log": _audit,
    "audit_max_bytes": _int(4096),
    "build_packages": _switch,
    "allow_unisolated": _switch,
    "mount_roots": _mount_roots,
    "egress_networks": _networks,
    "publish_ports": _port_range,
    "pool_size": _int(0),
    "pool_shapes": _int(1),
    "cgroup_parent": _cgroup_parent,
    "sandbox_uids": _uid_range,
    "trust_map": _trust_map,
    "microvm_snapshots": _switch,
    "gvisor_platform": _one_of("systrap", "ptrace", "kvm"),  # runsc's platforms
    "microvm_accel": _one_of("tcg", "kvm"),
    "env_store": _path,
    "env_build_timeout": _timeout,
    "env_store_limit_mb": _int(1),
    "placement": _placement,
}


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_set(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the variable of setting ``name`` is given (set and not empty), not defaulted."""
    return bool((os.environ if env is None else env).get(f"STOCKADE_{name.upper()}", "").strip())


# STOCKADE_* variables that are no setting but stockade's own plumbing: a worker's or guest's
# (runtimes set them for the agent) and the test suite's.
INTERNAL_VARIABLES = frozenset(
    {
        "STOCKADE_AGENT_FD",
        "STOCKADE_AGENT_WARM",
        "STOCKADE_GUEST_SECCOMP",
        "STOCKADE_GUEST_SECCOMP_ANSWERS",
        "STOCKADE_RAY_TEST_NODE",
    }
)


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """Each ``STOCKADE_*`` variable of ``env`` (default: this process's) that no setting reads,
    which ``load`` ignores, said with the nearest setting's name: a typo is otherwise silent."""
    from .checked import nearest

    names = [f.name for f in dataclasses.fields(Settings)]
    said = []
    for key in sorted(os.environ if env is None else env):
        name = key.removeprefix("STOCKADE_").lower()  # as load reads it
        if not key.startswith("STOCKADE_") or name in names or key in INTERNAL_VARIABLES:
            continue
        # Matched without the prefix every name shares, which would make any two look alike.
        near = nearest(name, names)
        said.append(f"{key} is no setting (ignored)" + (f": did you mean STOCKADE_{near.upper()}?" if near else ""))
    return said


# The settings that are secrets: a worker stockade starts (a component's supervisor) never gets them.
SECRET_VARIABLES = ("STOCKADE_AUTH_TOKEN", "STOCKADE_API_TOKEN", "STOCKADE_SESSION_KEY")


def worker_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a worker it starts, without a token or a session key."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    env.update(extra or {})
    return env


# ---- the process's settings --------------------------------------------------------------

_installed: Settings | None = None
_serving = False
_parsed: tuple[tuple[tuple[str, str], ...], Settings] | None = None
_lock = threading.Lock()


def install(settings: Settings | None) -> None:
    """Make ``settings`` this process's, whatever its environment says from now on (the daemon's,
    read once at its start); None goes back to the environment's."""
    global _installed
    with _lock:
        _installed = settings


def serve_callers() -> None:
    """Say that this process serves many callers (a daemon, a Ray node's actor), from its start:
    what a library's one caller may choose for itself is then the operator's to allow (a secret
    stored with no hosts, a network beyond public addresses: ``egress_networks``)."""
    global _serving
    _serving = True


def serving_callers() -> bool:
    return _serving


def egress_networks(settings: Settings) -> tuple[str, ...] | None:
    """The networks a policy may let a sandbox reach beyond public addresses: STOCKADE_EGRESS_NETWORKS;
    unset, any (None) for a library's one caller, and none for a process that serves callers: the
    proxy connects from the host's own network, where a caller naming 127.0.0.1 or 169.254.169.254
    would reach the daemon's ports, a Ray cluster's, other sandboxes' published ones, the cloud's
    metadata service."""
    if settings.egress_networks is None and _serving:
        return ()
    return settings.egress_networks


def current() -> Settings:
    """The installed settings, or those of this process's environment as it is now."""
    global _parsed
    if _installed is not None:
        return _installed
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("STOCKADE_")))
    with _lock:
        if _parsed is None or _parsed[0] != key:
            _parsed = (key, Settings.load(dict(key)))
        return _parsed[1]
