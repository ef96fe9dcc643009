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
| STOCKADE_HTTP | unset | HOST:PORT of the HTTP API (``stockade serve --http``; seed 003's port is 8002) |
| STOCKADE_API_TOKEN | unset | the HTTP API's bearer token; without one it serves loopback only |
| STOCKADE_AGENT_MAX_REQUESTS | 20 | HTTP requests per ``agent_id`` per second |
| STOCKADE_AUDIT_LOG | <state dir>/audit.log | the audit log (``off``: none) |
| STOCKADE_AUDIT_MAX_BYTES | 67108864 | the audit log's size before it rotates (10 files kept) |
| STOCKADE_BUILD_PACKAGES | 0 | 1: a caller's ``packages`` builds its environment on first use (pip on this host) |

A malformed value is refused at start with a message naming the variable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..rpc.server import ServerSettings


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
    unix_socket: bool = True  # False: the HTTP API alone (``stockade serve --http --no-socket``)
    http_listen: tuple[str, int] | None = None
    api_token: str | None = None
    agent_max_requests: int = 20
    audit_log: str | None = None
    audit_max_bytes: int = 64 * 1024 * 1024
    build_packages: bool = False

    def __repr__(self) -> str:  # never print a token
        token = "set" if self.auth_token else "unset"
        api = "set" if self.api_token else "unset"
        return (
            f"DaemonConfig(socket={self.socket_path!r}, perms={self.socket_perms:o}, auth_token={token}, "
            f"http={self.http_listen!r}, api_token={api})"
        )

    def server_settings(self) -> ServerSettings:
        """What the Unix-socket server (rpc/server.py) takes of this config."""
        from ..rpc.server import ServerSettings

        return ServerSettings(
            socket_path=self.socket_path,
            socket_perms=self.socket_perms,
            auth_key=self.auth_token,
            allowed_uids=self.allowed_uids,
            allowed_gids=self.allowed_gids,
            max_requests=self.max_requests,
            max_connections=self.max_connections,
            max_request_bytes=self.max_request_bytes,
            replay_window_s=self.replay_window_s,
        )

    def with_http(
        self, listen: str | None, api_token_file: str | None = None, unix_socket: bool = True
    ) -> DaemonConfig:
        """This config with ``stockade serve``'s ``--http``, ``--api-token-file`` and ``--no-socket``."""
        token = self.api_token
        if api_token_file:
            try:
                with open(api_token_file) as f:
                    token = _api_token(f.read().strip(), f"--api-token-file {api_token_file}")
            except OSError as exc:
                raise ConfigError(f"--api-token-file {api_token_file}: {exc.strerror}") from None
        address = self.http_listen if listen is None else _listen(listen, "--http")
        _check_exposure(address, token)
        if not unix_socket and address is None:
            raise ConfigError("--no-socket leaves the daemon no door: give --http too")
        return dataclasses.replace(self, http_listen=address, api_token=token, unix_socket=unix_socket)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DaemonConfig:
        env = dict(os.environ if env is None else env)
        from ..runtimes.pool import pool_shapes_from_env
        from ..runtimes.process.cgroups import cgroup_parent_setting

        # Read by the runtimes when they start; checked now, so that a bad value stops the daemon's start.
        cgroup_parent_setting(env.get("STOCKADE_CGROUP_PARENT", ""))
        pool_shapes_from_env(env=env)
        config = cls(
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
            http_listen=_listen(env["STOCKADE_HTTP"], "STOCKADE_HTTP") if env.get("STOCKADE_HTTP") else None,
            api_token=_api_token(env.get("STOCKADE_API_TOKEN"), "STOCKADE_API_TOKEN"),
            agent_max_requests=_int(env, "STOCKADE_AGENT_MAX_REQUESTS", 20, minimum=1),
            audit_log=_audit_path(env),
            audit_max_bytes=_int(env, "STOCKADE_AUDIT_MAX_BYTES", 64 * 1024 * 1024, minimum=4096),
            build_packages=_switch(env, "STOCKADE_BUILD_PACKAGES"),
        )
        _check_exposure(config.http_listen, config.api_token)
        return config


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


def _switch(env: dict[str, str], name: str) -> bool:
    raw = env.get(name, "0").strip()
    if raw not in ("0", "1"):
        raise ConfigError(f"{name}={raw!r}: expected 0 or 1")
    return raw == "1"


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


def _listen(raw: str, name: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; a bare ``HOST``: port 8002) as a host and a port."""
    given = raw.strip()
    bare_ipv6 = given.count(":") > 1 and not given.startswith("[")
    if bare_ipv6 or ":" not in given or (given.startswith("[") and given.endswith("]")):
        given = f"[{given.strip('[]')}]:{DEFAULT_HTTP_PORT}" if ":" in given else f"{given}:{DEFAULT_HTTP_PORT}"
    host, sep, port = given.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or host.isdigit() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}={raw!r} is not HOST:PORT (e.g. 127.0.0.1:8002)")
    return host, int(port)


DEFAULT_HTTP_PORT = 8002  # seed 003's


def _check_exposure(address: tuple[str, int] | None, token: str | None) -> None:
    """Without a token the HTTP API serves this host's own loopback, nothing wider."""
    if address is None or token is not None:
        return
    host = address[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"refusing to serve the HTTP API on {host} without a token: anyone who can reach it could run code "
            "here. Set STOCKADE_API_TOKEN (or --api-token-file; `stockade token new`), or serve 127.0.0.1"
        )


def _api_token(token: str | None, name: str) -> str | None:
    if token is None or token == "":
        return None
    if len(token) < 16:
        raise ConfigError(f"{name} is too short (use at least 16 characters; `stockade token new`)")
    return token


def _audit_path(env: dict[str, str]) -> str | None:
    raw = env.get("STOCKADE_AUDIT_LOG", "")
    if raw.lower() == "off":
        return None
    if raw:
        return raw
    from ..components import state_dir

    return os.path.join(env.get("STOCKADE_STATE_DIR") or state_dir(), "audit.log")
