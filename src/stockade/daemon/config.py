"""Daemon settings, read from ``STOCKADE_*`` environment variables (seed 000 names, stockade's prefix).

| variable | default | meaning |
| --- | --- | --- |
| STOCKADE_SOCKET | /run/stockade/stockade.sock (root), $XDG_RUNTIME_DIR/stockade.sock | the Unix socket |
| STOCKADE_SOCKET_PERMS | 0600 | socket file mode, octal |
| STOCKADE_AUTH_TOKEN | unset | HMAC token; every request must then be signed |
| STOCKADE_MAX_REQUESTS | 100 | requests per client per second (sliding window) |
| STOCKADE_ALLOWED_UIDS / _GIDS | unset | comma-separated peers allowed (SO_PEERCRED) |
| STOCKADE_MAX_CONNECTIONS | 64 | connections open at once per peer uid |
| STOCKADE_MAX_SANDBOXES | 8 | sandboxes alive at once (held + executing) |
| STOCKADE_MAX_SANDBOXES_PER_UID | unset | of those, the most one peer uid may hold; more is "busy" at once |
| STOCKADE_QUEUE_LIMIT | 16 | requests that may wait for a free slot; more get "busy" |
| STOCKADE_QUEUE_TIMEOUT | 30 | seconds a request may wait for a slot |
| STOCKADE_REPLAY_WINDOW | 30 | seconds a signed request stays valid |
| STOCKADE_MAX_REQUEST_BYTES | 16777216 | longest request line |
| STOCKADE_SHUTDOWN_GRACE | 10 | seconds SIGTERM waits for running work |
| STOCKADE_SANDBOX_IDLE_TIMEOUT | 600 | seconds a held sandbox may go uncalled before it is closed (0: never) |

A malformed value is refused at start with a message naming the variable.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

from ..errors import ConfigError


def default_socket_path() -> str:
    if os.getuid() == 0:
        return "/run/stockade/stockade.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/stockade-{os.getuid()}"
    return os.path.join(runtime_dir, "stockade.sock")


def socket_path_from_env() -> str:
    return os.environ.get("STOCKADE_SOCKET") or default_socket_path()


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: str = field(default_factory=default_socket_path)
    socket_perms: int = 0o600
    auth_token: str | None = None
    max_requests: int = 100
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    max_connections: int = 64
    max_sandboxes: int = 8
    max_sandboxes_per_uid: int | None = None
    queue_limit: int = 16
    queue_timeout_s: float = 30.0
    replay_window_s: float = 30.0
    max_request_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    pool_size: int = 2
    # A held sandbox nobody calls still holds a slot, an isolate and its memory:
    # one a client forgot (or a crashed client's kept one) is closed after this.
    sandbox_idle_timeout_s: float | None = 600.0

    def __repr__(self) -> str:  # never print the token
        token = "set" if self.auth_token else "unset"
        return f"DaemonConfig(socket={self.socket_path!r}, perms={self.socket_perms:o}, auth_token={token})"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DaemonConfig:
        env = dict(os.environ if env is None else env)
        from ..runtimes.pool import pool_shapes_from_env
        from ..runtimes.process.cgroups import cgroup_parent_setting

        # Read by the runtimes when they start; checked now, so that a bad value stops the daemon's start.
        cgroup_parent_setting(env.get("STOCKADE_CGROUP_PARENT", ""))
        pool_shapes_from_env(env=env)
        return cls(
            socket_path=env.get("STOCKADE_SOCKET") or default_socket_path(),
            socket_perms=_octal(env, "STOCKADE_SOCKET_PERMS", 0o600),
            auth_token=_token(env),
            max_requests=_int(env, "STOCKADE_MAX_REQUESTS", 100, minimum=1),
            allowed_uids=_ids(env, "STOCKADE_ALLOWED_UIDS"),
            allowed_gids=_ids(env, "STOCKADE_ALLOWED_GIDS"),
            max_connections=_int(env, "STOCKADE_MAX_CONNECTIONS", 64, minimum=1),
            max_sandboxes=_int(env, "STOCKADE_MAX_SANDBOXES", 8, minimum=1),
            max_sandboxes_per_uid=_int(env, "STOCKADE_MAX_SANDBOXES_PER_UID", 0, minimum=1) or None,
            queue_limit=_int(env, "STOCKADE_QUEUE_LIMIT", 16, minimum=0),
            queue_timeout_s=_float(env, "STOCKADE_QUEUE_TIMEOUT", 30.0),
            replay_window_s=_float(env, "STOCKADE_REPLAY_WINDOW", 30.0),
            max_request_bytes=_int(env, "STOCKADE_MAX_REQUEST_BYTES", 16 * 1024 * 1024, minimum=1024),
            shutdown_grace_s=_float(env, "STOCKADE_SHUTDOWN_GRACE", 10.0),
            pool_size=_int(env, "STOCKADE_POOL_SIZE", 2, minimum=0),
            sandbox_idle_timeout_s=_seconds_or_never(env, "STOCKADE_SANDBOX_IDLE_TIMEOUT", 600.0),
        )


def _octal(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 8)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an octal file mode (e.g. 0600)") from None
    if not 0 <= value <= 0o777:
        raise ConfigError(f"{name}={raw!r} is outside 0000-0777")
    return value


def _int(env: dict[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:  # nan compares false with everything: refused by name
        raise ConfigError(f"{name}={raw!r} must be a positive, finite number")
    return value


def _seconds_or_never(env: dict[str, str], name: str, default: float) -> float | None:
    """A positive number of seconds, or None for 0 (never)."""
    raw = env.get(name)
    with contextlib.suppress(ValueError):  # not a number: _float says so, by name
        if raw is not None and raw.strip() and float(raw) == 0:
            return None
    return _float(env, name, default)


def _ids(env: dict[str, str], name: str) -> frozenset[int] | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return frozenset(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a comma-separated list of numeric ids") from None


def _token(env: dict[str, str]) -> str | None:
    token = env.get("STOCKADE_AUTH_TOKEN")
    if token is None or token == "":
        return None
    if len(token) < 16:
        raise ConfigError("STOCKADE_AUTH_TOKEN is too short (use at least 16 characters; `stockade token new`)")
    return token
