"""Where a sandbox's secret values come from: the broker, or (no broker) a secrets file.

- ``STOCKADE_BROKER_SOCKET`` set: the broker (``stockade secretd``) at that
  socket, with the session key of ``STOCKADE_SESSION_KEY`` (base64) or the
  file ``STOCKADE_SESSION_KEY_FILE`` (default ``/run/stockade/.session``).
  The daemon registers each sandbox with secrets (the pid of its isolate and
  its grants), fetches the values, and releases it when it closes.
- Else ``STOCKADE_SECRETS_FILE``: a ``0600`` file of this process's own uid,
  read directly (stockade as a library, one trusted host process).
- Else a policy with secrets is refused, saying so.
"""

from __future__ import annotations

import secrets
import socket
import threading
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PolicyError
from ..policy import SecretGrant
from ..protocol import auth
from ..settings import serving_callers
from . import wire
from .store import SecretStore

if TYPE_CHECKING:
    from ..settings import Settings

CALL_TIMEOUT_S = 10.0


# What each method asks, as a refusal names it to a caller who never heard of the broker's methods.
_ASKED = {"register": "this sandbox's secrets", "fetch": "a secret's value", "release": "the sandbox's release"}


class BrokerClient:
    """Signed calls to the broker over one Unix socket connection (reopened when it breaks)."""

    def __init__(self, path: str, key: bytes) -> None:
        self.path = path
        self.key = key
        self.nonces = auth.NonceCache()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            # A random id, which the signed answer must carry: an answer to another request never fits.
            request = {"method": method, "params": params, "id": secrets.token_hex(16)}
            for attempt in (1, 2):  # a connection the broker closed (its restart) is opened again, once
                try:
                    answer = self._exchange(request)
                    break
                except (ConnectionError, EOFError) as exc:
                    self._drop()
                    if attempt == 2:
                        raise ConfigError(f"the secrets broker at {self.path} did not answer: {exc}") from None
                except OSError as exc:
                    self._drop()
                    raise ConfigError(f"cannot reach the secrets broker at {self.path}: {exc.strerror}") from None
        if not wire.verify(answer, self.key, self.nonces):
            raise ConfigError("the secrets broker's answer failed authentication (is the session key right?)")
        if "method" in answer:  # signed under the same key: a request sent back is no answer
            raise ConfigError("the secrets broker's socket sent a request back, not an answer")
        if answer.get("error") is not None:
            raise PolicyError(f"the secrets broker refused {_ASKED.get(method, method)}: {answer['error']}")
        if answer.get("id") != request["id"]:
            raise ConfigError(f"the secrets broker answered request {answer.get('id')!r}, not {request['id']}")
        result = answer.get("result")
        return result if isinstance(result, dict) else {}

    def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(CALL_TIMEOUT_S)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        self._sock.sendall(wire.frame(request, self.key))
        header = _recv_exact(self._sock, 4)
        return wire.decode(_recv_exact(self._sock, wire.length_of(header)))

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the broker closed the connection")
        data += chunk
    return bytes(data)


class SecretSource:
    """The values of a sandbox's grants, and their release when it closes."""

    def __init__(self, broker: BrokerClient | None, store_path: str | None) -> None:
        self.broker = broker
        self.store_path = store_path

    def open(self, sandbox: str, pid: int | None, grants: tuple[SecretGrant, ...]) -> dict[str, str]:
        if self.broker is not None:
            if pid is None:
                raise PolicyError("secrets through the broker need an isolate the broker can check (a process pid)")
            wanted = [{"name": g.name, "hosts": list(g.hosts)} for g in grants]
            self.broker.call("register", {"sandbox": sandbox, "pid": pid, "grants": wanted})
            try:
                return {g.name: str(self.broker.call("fetch", {"sandbox": sandbox, "name": g.name})["value"])
                        for g in grants}  # fmt: skip
            except BaseException:
                self.close(sandbox)
                raise
        if self.store_path is not None:
            store = SecretStore.load(self.store_path)
            hostless = not serving_callers()  # a daemon's callers are many: none may use it (check_grant)
            return {g.name: store.check_grant(g.name, g.hosts, hostless=hostless).value for g in grants}
        raise PolicyError(
            "this policy grants secrets, and no secrets broker or file is configured: run `stockade secretd` and "
            "set STOCKADE_BROKER_SOCKET, or set STOCKADE_SECRETS_FILE (docs/security.md: The broker; docs/egress.md)"
        )

    def close(self, sandbox: str) -> None:
        if self.broker is not None:
            try:
                self.broker.call("release", {"sandbox": sandbox})
            except (ConfigError, PolicyError):
                pass  # the broker drops a dead isolate's registration by itself


_source: SecretSource | None = None
_source_key: tuple[str | None, ...] = ()
_lock = threading.Lock()


def secret_source(settings: Settings | None = None) -> SecretSource:
    """The source ``settings`` name (default: this process's; made again when they change)."""
    global _source, _source_key
    if settings is None:
        from ..settings import current

        settings = current()
    raw_key = settings.secret("session_key")
    key = (settings.broker_socket, raw_key, settings.session_key_file, settings.secrets_file)
    with _lock:
        if _source is None or key != _source_key:
            if _source is not None and _source.broker is not None:
                _source.broker.close()
            broker = None
            if settings.broker_socket:
                session = (
                    wire.parse_key(raw_key, "STOCKADE_SESSION_KEY")
                    if raw_key
                    else wire.read_key(settings.session_key_file)
                )
                broker = BrokerClient(settings.broker_socket, session)
            _source, _source_key = SecretSource(broker, settings.secrets_file), key
        return _source
