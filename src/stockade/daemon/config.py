"""Daemon settings, read from ``STOCKADE_*`` environment variables (seed 000 names, stockade's prefix).

| variable | default | meaning |
| --- | --- | --- |
| STOCKADE_SOCKET | /run/stockade/stockade.sock (root), $XDG_RUNTIME_DIR/stockade.sock | the Unix socket |
| STOCKADE_SOCKET_PERMS | 0600 | socket file mode, octal |
| STOCKADE_SOCKET_GROUP | unset | the socket's group, a name or a gid (unset: the daemon's own) |
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
| STOCKADE_AUDIT_LOG | <state dir>/audit.log (audit-USER/audit.log, root given up) | the audit log (``off``: none) |
| STOCKADE_AUDIT_MAX_BYTES | 67108864 | the audit log's size before it rotates (10 files kept) |
| STOCKADE_BUILD_PACKAGES | 0 | 1: a caller's ``packages`` builds its environment on first use (pip on this host) |

The variables are read once, with every other ``STOCKADE_*`` setting:
``DaemonConfig`` is ``settings.Settings`` with what only the command line
says (``--no-socket``), and the daemon installs it for the whole process
(``settings.install``) at its start. A malformed value is refused at start
with a message naming the variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..settings import DEFAULT_HTTP_PORT, Secret, Settings, listen_address, loopback, token_setting

if TYPE_CHECKING:
    from ..rpc.server import ServerSettings


def socket_path_from_env() -> str:
    """The daemon's socket for a client: ``STOCKADE_SOCKET``, or the default."""
    from ..settings import current

    return current().socket


@dataclass(frozen=True, kw_only=True)
class DaemonConfig(Settings):
    """The daemon's settings: every ``STOCKADE_*`` variable, and ``stockade serve``'s flags."""

    unix_socket: bool = True  # False: the HTTP API alone (``stockade serve --http --no-socket``)

    def socket_gid(self) -> int | None:
        """STOCKADE_SOCKET_GROUP's gid; a name this host does not know is a ConfigError naming it."""
        group = self.socket_group
        if group is None:
            return None
        if group.isdigit():
            return int(group)
        import grp

        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"STOCKADE_SOCKET_GROUP={group!r}: no such group on this host") from None

    def server_settings(self) -> ServerSettings:
        """What the Unix-socket server (rpc/server.py) takes of this config."""
        from ..rpc.server import ServerSettings

        return ServerSettings(
            socket_path=self.socket,
            socket_perms=self.socket_perms,
            socket_gid=self.socket_gid(),
            auth_key=self.secret("auth_token"),
            allowed_uids=self.allowed_uids,
            allowed_gids=self.allowed_gids,
            refused_uids=self.sandbox_uids,
            max_requests=self.max_requests,
            max_connections=self.max_connections,
            max_request_bytes=self.max_request_bytes,
            replay_window_s=self.replay_window,
        )

    def with_http(
        self, listen: str | None, api_token_file: str | None = None, unix_socket: bool = True
    ) -> DaemonConfig:
        """This config with ``stockade serve``'s ``--http``, ``--api-token-file`` and ``--no-socket``."""
        token = self.secret("api_token")
        if api_token_file:
            try:
                with open(api_token_file) as f:
                    token = f.read().strip() or None
            except OSError as exc:
                raise ConfigError(f"--api-token-file {api_token_file}: {exc.strerror}") from None
            if token is not None:
                token = token_setting(token, f"--api-token-file {api_token_file}").value
        if listen:
            address: tuple[str, int] | None = listen_address(listen, "--http")
        elif listen == "":  # --http alone
            address = self.http or ("127.0.0.1", DEFAULT_HTTP_PORT)
        else:
            address = self.http
        _check_exposure(address, token)
        if not unix_socket and address is None:
            raise ConfigError("--no-socket leaves the daemon no door: give --http too")
        secret = Secret(token) if token is not None else None
        return self.replace(http=address, api_token=secret, unix_socket=unix_socket)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DaemonConfig:
        config = cls.load(env)
        assert isinstance(config, DaemonConfig)
        _check_exposure(config.http, config.secret("api_token"))
        return config


def _check_exposure(address: tuple[str, int] | None, token: str | None) -> None:
    """Without a token the HTTP API serves this host's own loopback, nothing wider."""
    if address is None or token is not None:
        return
    host = address[0]
    if not loopback(host):
        raise ConfigError(
            f"refusing to serve the HTTP API on {host} without a token: anyone who can reach it could run code "
            "here. Set STOCKADE_API_TOKEN (or --api-token-file; `stockade token new`), or serve 127.0.0.1"
        )
