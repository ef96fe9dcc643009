"""``stockade secretd``: the secrets broker, the only process that holds secret values at rest.

It runs as its own uid (``stockade-secrets``) and answers on a Unix socket
that only the daemon's uid may use. The server is the daemon's own
(rpc/server.py: SO_PEERCRED checked before a byte is read, per-uid caps and
rate limits, HMAC with a replay window), with the broker's codec (signed
CBOR frames, wire.py) and method table. What it gives out is bounded by
what it can check itself, not by what the daemon says:

- ``register`` names a sandbox by the pid of its isolate. The broker opens a
  pidfd on it and checks that the process runs as a sandbox uid
  (``STOCKADE_SANDBOX_UIDS``), not as the daemon or anyone else; each grant
  must name a secret it holds and hosts that secret may be bound to.
- ``fetch`` gives a value only for a registered sandbox whose isolate still
  lives (the pidfd says so; a pid reused since cannot pass) and whose grants
  hold that name.
- ``release`` forgets a sandbox; a dead isolate's registration is dropped
  at the next call anyway.

So a daemon taken over by an attacker can fetch only the secrets that live
isolates' policies grant, for hosts their keeper allows: never "everything".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from ..errors import InvalidRequestError, NotFoundError, PolicyError
from ..protocol.models import Caller, Empty, Request
from ..rpc.methods import Method
from ..rpc.server import RPCServer, ServerSettings
from . import wire
from .store import SecretStore
from .vault import Vault

log = logging.getLogger("stockade.secretd")
MAX_SANDBOXES = 4096
MAX_CONNECTIONS_PER_UID = 16
MAX_REQUESTS_PER_S = 500


@dataclass
class _Registered:
    pid: int
    pidfd: int
    grants: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def alive(self) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)  # a pidfd polls readable once its process has exited
        return not poller.poll(0)


@dataclass(frozen=True)
class BrokerConfig:
    socket_path: str
    key: bytes
    store: SecretStore
    allowed_uids: frozenset[int]  # the daemon's uid
    sandbox_uids: tuple[int, int]  # first, last: what an isolate runs as
    socket_gid: int | None = None  # the daemon's group: the socket is 0660 to it
    listener: socket.socket | None = None  # bound already (as root, before the broker dropped to its user)
    replay_window_s: float = 30.0


# ---- the requests ---------------------------------------------------------------------


class Grant(Request):
    name: str
    hosts: list[str] = Field(min_length=1)  # a value is bound to the hosts it may be sent to, never to none


class Register(Request):
    sandbox: str = Field(min_length=1, max_length=64)
    pid: int = Field(gt=0)
    grants: list[Grant] = Field(min_length=1, max_length=256)


class Fetch(Request):
    sandbox: str
    name: str


class SandboxName(Request):
    sandbox: str


class Put(Request):
    name: str
    value: str
    hosts: list[str] = Field(min_length=1)  # never any host: see Vault.put


class Name(Request):
    name: str


class Broker:
    """The registrations and the secrets; its methods are the table ``METHODS`` serves."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.sandboxes: dict[str, _Registered] = {}

    # What the RPC server asks of its handler (rpc/methods.Handler): nothing to release, nothing to wait for.
    async def close_connection(self, connection: int) -> None:
        return None

    async def wait_idle(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        for registered in self.sandboxes.values():
            os.close(registered.pidfd)
        self.sandboxes.clear()

    # ---- the methods --------------------------------------------------------------------

    def ping(self, request: Empty, caller: Caller) -> dict[str, Any]:
        return {"secrets": len(self.config.store.names()), "sandboxes": len(self.sandboxes)}

    def register(self, request: Register, caller: Caller) -> dict[str, Any]:
        if request.sandbox in self.sandboxes:
            raise InvalidRequestError(f"register: sandbox {request.sandbox} is registered already")
        self._sweep()
        if len(self.sandboxes) >= MAX_SANDBOXES:
            raise PolicyError(f"register: {MAX_SANDBOXES} sandboxes are registered")
        checked: dict[str, tuple[str, ...]] = {}
        for grant in request.grants:
            self.config.store.check_grant(grant.name, grant.hosts)
            checked[grant.name] = tuple(grant.hosts)
        try:
            pidfd = os.pidfd_open(request.pid)
        except OSError as exc:
            raise PolicyError(f"register: process {request.pid}: {exc.strerror}") from None
        try:
            uid = _real_uid(request.pid)
            first, last = self.config.sandbox_uids
            registered = _Registered(request.pid, pidfd, checked)
            # Read after the pidfd was opened: if the process is still alive now, the uid read was its own.
            if not registered.alive():
                raise PolicyError(f"register: process {request.pid} is gone")
            if uid is None or not first <= uid <= last:
                raise PolicyError(f"register: process {request.pid} does not run as a sandbox uid ({first}-{last})")
        except BaseException:
            os.close(pidfd)
            raise
        self.sandboxes[request.sandbox] = registered
        return {"granted": sorted(checked)}

    def fetch(self, request: Fetch, caller: Caller) -> dict[str, Any]:
        registered = self.sandboxes.get(request.sandbox)
        if registered is None:
            raise NotFoundError("fetch: no such sandbox is registered")
        if not registered.alive():
            self._forget(request.sandbox)
            raise NotFoundError("fetch: that sandbox's isolate has ended")
        if request.name not in registered.grants:
            raise PolicyError("fetch: that sandbox's policy does not grant this secret")
        stored = self.config.store.check_grant(request.name, registered.grants[request.name])
        return {"value": stored.value}

    def release(self, request: SandboxName, caller: Caller) -> dict[str, Any]:
        return {"released": self._forget(request.sandbox)}

    # ---- an admin's secrets, through the daemon (vault.py) ---------------------------------

    def _vault(self) -> Vault:
        vault = self.config.store.vault
        if vault is None:
            raise PolicyError("this broker keeps no registered secrets (start it with --state-dir)")
        return vault

    def put(self, request: Put, caller: Caller) -> dict[str, Any]:
        if self.config.store.from_file(request.name):
            raise PolicyError(f"put: {request.name} comes from the broker's file, which an admin edits there")
        self._vault().put(request.name, request.value, request.hosts)
        log.info("secretd: %s registered", request.name)
        return {"name": request.name}

    def delete(self, request: Name, caller: Caller) -> dict[str, Any]:
        return {"deleted": self._vault().delete(request.name)}

    def listing(self, request: Empty, caller: Caller) -> dict[str, Any]:
        store = self.config.store
        found = []
        for name in store.names():
            hosts = store.hosts_of(name)
            source = "file" if store.from_file(name) else "registered"
            found.append({"name": name, "hosts": list(hosts) if hosts is not None else None, "source": source})
        return {"secrets": found}

    def _forget(self, sandbox: str) -> bool:
        registered = self.sandboxes.pop(sandbox, None)
        if registered is None:
            return False
        os.close(registered.pidfd)
        return True

    def _sweep(self) -> None:
        for sandbox in [s for s, r in self.sandboxes.items() if not r.alive()]:
            self._forget(sandbox)


def _method(name: str, request: type[Request], answer: Any) -> Method:
    async def call(broker: Broker, r: Any, caller: Caller, out: Any) -> Any:
        return answer(broker, r, caller)

    return Method(name, request, call, immediate=answer)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _method("ping", Empty, Broker.ping),
        _method("register", Register, Broker.register),
        _method("fetch", Fetch, Broker.fetch),
        _method("release", SandboxName, Broker.release),
        _method("put", Put, Broker.put),
        _method("delete", Name, Broker.delete),
        _method("list", Empty, Broker.listing),
    )
}


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def listen(path: str, gid: int | None, owner: int | None = None) -> socket.socket:
    """The broker's socket at ``path``: 0600, or 0660 to group ``gid`` (the daemon's)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    if gid is not None or owner is not None:
        os.chown(path, -1 if owner is None else owner, -1 if gid is None else gid)
    if gid is not None:
        os.chmod(path, 0o660)
    sock.listen(64)
    return sock


async def serve(config: BrokerConfig, ready: asyncio.Event | None = None) -> None:
    broker = Broker(config)
    settings = ServerSettings(
        socket_path=config.socket_path,
        socket_perms=0o660 if config.socket_gid is not None else 0o600,
        socket_gid=config.socket_gid,
        auth_key=config.key,
        allowed_uids=config.allowed_uids,
        # The daemon is in this broker's user namespace. An isolate is not: a rootless one run by the
        # daemon's user keeps that user's uid and supplementary groups (an unprivileged process may
        # not drop them), and with them the socket's group, should the socket be shared with it.
        same_user_namespace=True,
        max_requests=MAX_REQUESTS_PER_S,
        max_connections=MAX_CONNECTIONS_PER_UID,
        max_request_bytes=wire.MAX_FRAME,
        replay_window_s=config.replay_window_s,
    )
    listener = config.listener or listen(config.socket_path, config.socket_gid)
    server = RPCServer(settings, METHODS, wire.CborFrames(config.key), broker, listener=listener)
    await server.start()
    log.info("secretd: %d secrets", len(config.store.names()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await server.close()
        broker.close()
