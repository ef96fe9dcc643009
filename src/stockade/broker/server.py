"""``stockade secretd``: the secrets broker, the only process that holds secret values at rest.

It runs as its own uid (``stockade-secrets``) and answers on a Unix socket
that only the daemon's uid may use (SO_PEERCRED, checked before a byte is
read). Every message is signed (wire.py). What it gives out is bounded by
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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..daemon.ratelimit import SlidingWindowLimiter
from ..errors import PolicyError
from ..protocol import auth
from ..protocol.peer import Peer, peer_of
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


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.nonces = auth.NonceCache(config.replay_window_s)
        self.limiter = SlidingWindowLimiter(MAX_REQUESTS_PER_S)
        self.open: Counter[int] = Counter()
        self.sandboxes: dict[str, _Registered] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = self.config.listener or listen(self.config.socket_path, self.config.socket_gid)
        self._server = await asyncio.start_unix_server(self._connection, sock=sock)
        log.info("secretd: %d secrets, listening on %s", len(self.config.store.names()), self.config.socket_path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):  # bound by root in root's directory: root removes it
                os.unlink(self.config.socket_path)
        for registered in self.sandboxes.values():
            os.close(registered.pidfd)
        self.sandboxes.clear()

    # ---- one connection ---------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            peer = peer_of(sock)
        except OSError:
            writer.transport.abort()
            return
        if peer.uid not in self.config.allowed_uids or self.open[peer.uid] >= MAX_CONNECTIONS_PER_UID:
            log.warning("secretd: refused peer pid=%d uid=%d", peer.pid, peer.uid)
            writer.transport.abort()  # nothing read, nothing said
            return
        self.open[peer.uid] += 1
        try:
            while True:
                try:
                    header = await reader.readexactly(4)
                    body = await reader.readexactly(wire.length_of(header))
                except (asyncio.IncompleteReadError, ValueError, ConnectionError):
                    return
                writer.write(wire.frame(self._answer(body, peer), self.config.key))
                await writer.drain()
        finally:
            self.open[peer.uid] -= 1
            writer.transport.abort()

    def _answer(self, body: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = wire.decode(body)
        except ValueError as exc:
            return {"id": None, "error": str(exc)}
        msg_id = request.get("id")
        if not self.limiter.allow(peer.uid):
            return {"id": msg_id, "error": "rate limit exceeded"}
        if not wire.verify(request, self.config.key, self.nonces):
            log.warning("secretd: authentication failed (uid %d)", peer.uid)
            return {"id": msg_id, "error": "authentication failed"}
        method, params = request.get("method"), request.get("params")
        handler = {"ping": self._ping, "register": self._register, "fetch": self._fetch, "release": self._release,
                   "put": self._put, "delete": self._delete, "list": self._list}  # fmt: skip
        if not isinstance(method, str) or method not in handler or not isinstance(params, dict):
            return {"id": msg_id, "error": f"unknown method {str(method)[:32]!r}"}
        try:
            return {"id": msg_id, "result": handler[method](params)}
        except (PolicyError, ValueError, OSError) as exc:
            log.info("secretd: %s refused: %s", method, exc)
            return {"id": msg_id, "error": str(exc)}

    # ---- the methods --------------------------------------------------------------------

    def _ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"secrets": len(self.config.store.names()), "sandboxes": len(self.sandboxes)}

    def _register(self, params: dict[str, Any]) -> dict[str, Any]:
        sandbox, pid, grants = params.get("sandbox"), params.get("pid"), params.get("grants")
        if not isinstance(sandbox, str) or not 0 < len(sandbox) <= 64:
            raise ValueError("register: sandbox must be an id")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError("register: pid must be a process id")
        if not isinstance(grants, list) or not grants:
            raise ValueError("register: grants must be a non-empty list")
        if sandbox in self.sandboxes:
            raise ValueError(f"register: sandbox {sandbox} is registered already")
        self._sweep()
        if len(self.sandboxes) >= MAX_SANDBOXES:
            raise ValueError(f"register: {MAX_SANDBOXES} sandboxes are registered")
        checked: dict[str, tuple[str, ...]] = {}
        for grant in grants:
            name, hosts = (grant.get("name"), grant.get("hosts")) if isinstance(grant, dict) else (None, None)
            if not isinstance(name, str) or not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ValueError("register: a grant is {name, hosts}")
            self.config.store.check_grant(name, hosts)
            checked[name] = tuple(hosts)
        pidfd = os.pidfd_open(pid)
        try:
            uid = _real_uid(pid)
            first, last = self.config.sandbox_uids
            registered = _Registered(pid, pidfd, checked)
            # Read after the pidfd was opened: if the process is still alive now, the uid read was its own.
            if not registered.alive():
                raise ValueError(f"register: process {pid} is gone")
            if uid is None or not first <= uid <= last:
                raise ValueError(f"register: process {pid} does not run as a sandbox uid ({first}-{last})")
        except BaseException:
            os.close(pidfd)
            raise
        self.sandboxes[sandbox] = registered
        return {"granted": sorted(checked)}

    def _fetch(self, params: dict[str, Any]) -> dict[str, Any]:
        sandbox, name = params.get("sandbox"), params.get("name")
        registered = self.sandboxes.get(sandbox) if isinstance(sandbox, str) else None
        if registered is None:
            raise ValueError("fetch: no such sandbox is registered")
        if not registered.alive():
            self._forget(str(sandbox))
            raise ValueError("fetch: that sandbox's isolate has ended")
        if not isinstance(name, str) or name not in registered.grants:
            raise ValueError("fetch: that sandbox's policy does not grant this secret")
        stored = self.config.store.check_grant(name, registered.grants[name])
        return {"value": stored.value}

    def _release(self, params: dict[str, Any]) -> dict[str, Any]:
        sandbox = params.get("sandbox")
        return {"released": isinstance(sandbox, str) and self._forget(sandbox)}

    # ---- an admin's secrets, through the daemon (vault.py) ---------------------------------

    def _vault(self) -> Vault:
        vault = self.config.store.vault
        if vault is None:
            raise ValueError("this broker keeps no registered secrets (start it with --state-dir)")
        return vault

    def _put(self, params: dict[str, Any]) -> dict[str, Any]:
        name, value, hosts = params.get("name"), params.get("value"), params.get("hosts")
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError("put: name and value are strings")
        if hosts is not None and (not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts)):
            raise ValueError("put: hosts is a list of host names")
        if self.config.store.from_file(name):
            raise ValueError(f"put: {name} comes from the broker's file, which an admin edits there")
        self._vault().put(name, value, hosts)
        log.info("secretd: %s registered", name)
        return {"name": name}

    def _delete(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise ValueError("delete: name is a string")
        return {"deleted": self._vault().delete(name)}

    def _list(self, params: dict[str, Any]) -> dict[str, Any]:
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


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


async def serve(config: BrokerConfig, ready: asyncio.Event | None = None) -> None:
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await broker.close()
