"""Published ports: a host loopback port forwarded to a port on an isolate's own loopback.

Two forwarders, one listener each on the host's loopback:

- ``Forwarder`` (the process runtime, as root) lives on the host side of the
  isolate's network namespace. For each connection it accepts, a short-lived
  thread joins the isolate's network namespace (``setns`` on the isolate's
  pidfd: the namespace of that thread only, which ends with it), connects to
  ``127.0.0.1:PORT`` there, and leaves; the two sockets are then relayed.
- ``AgentRelay`` (gVisor, a microVM: their loopback is in gVisor's netstack
  or the guest's kernel, which no host thread can join; and a process isolate
  whose host has no root to join its namespace with) has the agent connect
  to the port (``tunnel_open``) and relays through the agent's calls,
  polling. Each call takes the sandbox's turn: a long ``exec`` on the same
  sandbox holds the relay up until it ends. For a sync ``Sandbox`` that is
  the channel's turn, waited for in the relay's thread; for an owner whose
  calls queue on an event loop (the daemon's held sandbox, an
  ``AsyncSandbox``) the relay's calls join that queue (``AsyncTurn``), in
  order with the owner's own.

Nothing else of the isolate is reachable: one port, on its loopback, from a
host loopback address.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from ..agent import linux
from ..errors import AgentError, InvalidRequestError, SandboxError

if TYPE_CHECKING:
    from typing import Protocol

    from .spawned import ProcCalls

    class RelayedSandbox(ProcCalls, Protocol):
        async def aproc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]: ...


log = logging.getLogger("stockade.publish")
_CHUNK = 65536
MAX_CONNECTIONS = 64  # relayed at once per published port (each takes two host threads)
# Relayed at once by this process, every port of every isolate together: anyone on the host may
# open connections to a published port, and each takes two descriptors (the daemon's soft limit
# is systemd's 1,024) and two threads.
MAX_RELAYED = 256
_relayed = threading.BoundedSemaphore(MAX_RELAYED)
# Once one side of a connection has ended (its client closed, or half-closed), how long the other
# may go without a byte before the connection ends: a client's close is a half-close as far as TCP
# tells, and a server inside that never closes its side held the relay, its slot and the sandbox's
# idleness for good.
HALF_CLOSED_IDLE_S = 60.0
# The turn of an owner whose calls are made on an event loop: that loop, and the lock its calls
# queue on (the daemon's ``Held.lock``, ``AsyncSandbox``'s). The channel refuses a caller on a
# loop that finds it busy (channel.py), so a relay's thread must not take it beside them.
AsyncTurn = tuple[asyncio.AbstractEventLoop, asyncio.Lock]
_TURN_CHECK_S = 1.0  # how often a relay call queued on an owner's loop looks whether the port closed


def parse_publish(spec: int | str) -> tuple[str, int, int]:
    """``8000``, ``"8000"``, ``"9000:8000"`` or ``"127.0.0.1:9000:8000"`` → (host address, host port, port).

    The host side is a loopback address (by default 127.0.0.1, port 0: any free one).
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        parts: list[str] = [str(spec)]
    elif isinstance(spec, str):
        parts = spec.rsplit(":", 2)
    else:
        raise InvalidRequestError(f"publish takes PORT, HOST_PORT:PORT or ADDRESS:HOST_PORT:PORT, not {spec!r}")
    try:
        numbers = [int(p) for p in parts[-2:]]
    except ValueError:
        raise InvalidRequestError(f"publish {spec!r}: ports are numbers") from None
    port, host_port = numbers[-1], (numbers[0] if len(numbers) == 2 else 0)
    address = parts[0] if len(parts) == 3 else "127.0.0.1"
    if not 0 < port < 65536 or not 0 <= host_port < 65536:
        raise InvalidRequestError(f"publish {spec!r}: a port is 1-65535")
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidRequestError(f"publish {spec!r}: the host side must be a loopback address, not {address}")
    return address, host_port, port


# How long an accept that failed (no descriptor, no memory) waits before the next, doubling to the most.
_ACCEPT_PAUSE_S = 0.05
_ACCEPT_PAUSE_MAX_S = 1.0


class _PublishedPort:
    """What both forwarders share: a listener on the host's loopback whose connections (at most
    MAX_CONNECTIONS relayed at once: a flood gets no threads) are each served by ``_serve`` in a
    thread of its own; ``close`` ends the listener and every connection still open."""

    def __init__(self, address: str, host_port: int, port: int, name: str) -> None:
        self.port = port
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            self.listener = socket.create_server((address, host_port), family=family)
        except PermissionError:
            raise  # a port below the unprivileged range: its caller knows why it has no root
        except OSError as exc:
            where = f"[{address}]:{host_port}" if family == socket.AF_INET6 else f"{address}:{host_port}"
            busy = " (another program holds it: pick another host port, or 0 for any free one)"
            raise InvalidRequestError(
                f"publish {where} -> {port}: cannot listen on {where} on the host: {os.strerror(exc.errno or 0)}"
                + (busy if exc.errno == errno.EADDRINUSE else "")
            ) from None
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        # Of those, the connections that reached the port inside. Only they are use (a daemon's idle
        # timeout reads it): connections that reach nothing, which anyone on the host may make, are not.
        self._reached: set[socket.socket] = set()
        self._closed = threading.Event()
        self.last_active = time.monotonic()  # the last reaching connection's end
        threading.Thread(target=self._accept, name=f"{name}-{port}", daemon=True).start()

    def active_since(self) -> float:
        """When it was last in use: now while a connection is open, else its last connection's end."""
        with self._lock:
            return time.monotonic() if self._reached else self.last_active

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            sockets, self._open, self._reached = list(self._open), set(), set()
        _shut(self.listener)
        for sock in sockets:
            _shut(sock)  # their relays end at once, not after their client's next byte

    def _accept(self) -> None:
        pause = _ACCEPT_PAUSE_S
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                # Out of descriptors or memory for a moment (EMFILE, ENFILE, ENOBUFS: anyone on the
                # host may open connections to the port): the port serves again once there are some.
                log.warning("published port %s: accept failed (%s), trying again", self.address, exc.strerror)
                self._closed.wait(pause)
                pause = min(pause * 2, _ACCEPT_PAUSE_MAX_S)
                continue
            pause = _ACCEPT_PAUSE_S
            if not self._slots.acquire(blocking=False):
                _refuse(client)  # as many as it serves at once are open
                continue
            if not _relayed.acquire(blocking=False):
                self._slots.release()
                _refuse(client)  # as many as the host relays at once are open
                continue
            try:
                threading.Thread(target=self._serve_one, args=(client,), daemon=True).start()
            except RuntimeError:  # no thread to be had now: this one refused, its slots given back
                _relayed.release()
                self._slots.release()
                _refuse(client)

    def _serve_one(self, client: socket.socket) -> None:
        try:
            self._serve(client)
        finally:
            _relayed.release()
            self._slots.release()

    def _keep(self, *sockets: socket.socket, reached: bool = True) -> bool:
        """Track ``sockets`` for ``close`` (``reached``: their connection reached the port inside);
        False (nothing tracked) once the port is closed."""
        with self._lock:
            if self._closed.is_set():
                return False
            self._open.update(sockets)
            if reached:
                self._reached.update(sockets)
            return True

    def _mark_reached(self, sock: socket.socket) -> None:
        with self._lock:
            if sock in self._open:
                self._reached.add(sock)

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            if self._reached.intersection(sockets):
                self._reached.difference_update(sockets)
                self.last_active = time.monotonic()
            self._open.difference_update(sockets)

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError


class Forwarder(_PublishedPort):
    """One published port of a process isolate: each connection relayed into its network namespace."""

    def __init__(self, pidfd: int, address: str, host_port: int, port: int) -> None:
        # A descriptor of its own: the isolate's is closed when the isolate is released, and a
        # connection still being set up must never setns() through a number reused since.
        self.pidfd = os.dup(pidfd)
        self._busy = 0  # connections being set up (joining the namespace through the pidfd)
        try:
            super().__init__(address, host_port, port, "stockade-publish")
        except BaseException:
            os.close(self.pidfd)
            raise

    def close(self) -> None:
        super().close()
        self._maybe_release()

    def _maybe_release(self) -> None:
        """The pidfd goes once the forward is closed and no connection is being set up."""
        with self._lock:
            if self._closed.is_set() and self._busy == 0 and self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            if self._closed.is_set():  # the forward is closing: the connection reaches nothing
                _refuse(client)
                return
            self._busy += 1
        try:
            inner = connect_inside(self.pidfd, self.port)
        except (OSError, SandboxError, RuntimeError) as exc:  # nothing listens there (yet), no thread: it ends
            log.info("published port %s: %s", self.port, exc)
            _refuse(client)
            return
        finally:
            with self._lock:
                self._busy -= 1
            self._maybe_release()
        if not self._keep(client, inner):
            _refuse(client)
            _shut(inner)
            return
        try:
            _relay(client, inner)
        except RuntimeError:  # its second thread could not start: refused, as one past the cap is
            _refuse(client)
            _shut(inner)
        finally:
            self._forget(client, inner)
        client.close()
        inner.close()


class AgentRelay(_PublishedPort):
    """One published port relayed through the isolate's agent (module docstring)."""

    # How often a quiet connection asks the agent for more: soon after what the client sent (an
    # answer is likely), then less and less often. Each ask takes the sandbox's turn, and an idle
    # connection anyone on the host may hold open must not cost the sandbox or the host much.
    POLL_MIN_S, POLL_MAX_S = 0.002, 0.5
    BEHIND_WAIT_S = 0.05  # a port inside that has not read what was written yet: ask again then

    def __init__(
        self, sandbox: RelayedSandbox, address: str, host_port: int, port: int, turn: AsyncTurn | None = None
    ) -> None:
        # Weakly: the relay's threads must not keep a forgotten sandbox (and its isolate) alive;
        # its finaliser closes the sandbox, and with it this relay.
        self._sandbox = weakref.ref(sandbox)
        self._turn = turn
        super().__init__(address, host_port, port, "stockade-relay")

    def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        sandbox = self._sandbox()
        if sandbox is None or self._closed.is_set():
            raise SandboxError("the sandbox of this published port is closed")
        if self._turn is None:
            return sandbox.proc_call(method, params)
        loop, lock = self._turn
        try:
            future = asyncio.run_coroutine_threadsafe(_in_turn(lock, sandbox, method, params), loop)
        except RuntimeError:  # the owner's loop has closed
            raise SandboxError("the sandbox of this published port is closed") from None
        del sandbox  # the call holds it while it runs; this thread, waiting, must not
        # Still queued behind the owner's calls (a long exec), or running: given up only once the
        # port has closed, or the loop that would run it has. (Waited for apart from its result,
        # which may itself be a TimeoutError.)
        while not concurrent.futures.wait([future], _TURN_CHECK_S).done:
            if self._closed.is_set() or loop.is_closed():
                future.cancel()
                raise SandboxError("the sandbox of this published port is closed")
        return future.result()

    def _serve(self, client: socket.socket) -> None:
        if not self._keep(client, reached=False):
            _refuse(client)
            return
        handle = None
        gone = threading.Event()  # either side ended abnormally: the whole connection goes
        sent = threading.Event()  # the client sent something (or its side ended): poll soon
        ended = threading.Event()  # the client's side ended (its end passed on to the port inside)
        try:
            handle = self._call("tunnel_open", {"port": self.port})["handle"]
            self._mark_reached(client)
            upstream = threading.Thread(target=self._upstream, args=(client, handle, gone, sent, ended), daemon=True)
            upstream.start()
            self._downstream(client, handle, gone, sent, ended)
            upstream.join(30)  # the client finishes its side (a half-closed HTTP exchange: at once)
        except Exception as exc:  # noqa: BLE001 - nothing listens, the sandbox closed: this connection ends
            log.info("published port %s (relayed): %s", self.port, exc)
        finally:
            gone.set()
            if handle is not None:
                with contextlib.suppress(Exception):
                    self._call("proc_kill", {"handle": handle})
            self._forget(client)
            if handle is None:
                _refuse(client)
            else:
                _shut(client)

    def _upstream(
        self, client: socket.socket, handle: str, gone: threading.Event, sent: threading.Event, ended: threading.Event
    ) -> None:
        """What the host's client sends, written to the port inside (then its end)."""
        try:
            while not gone.is_set() and (data := client.recv(_CHUNK)):
                self._write(handle, data, eof=False, gone=gone)
                sent.set()
            self._write(handle, b"", eof=True, gone=gone)
            ended.set()
        except Exception:  # noqa: BLE001 - a reset client, a closed sandbox: the connection goes
            gone.set()
        sent.set()

    def _write(self, handle: str, data: bytes, eof: bool, gone: threading.Event) -> None:
        params = {"handle": handle, "data": base64.b64encode(data).decode(), "eof": eof}
        while not gone.is_set():
            try:
                self._call("proc_write", params)
                return
            except AgentError as exc:
                if "has not read its input" not in str(exc):
                    raise
                gone.wait(self.BEHIND_WAIT_S)  # the port inside is behind: wait for it

    def _downstream(
        self, client: socket.socket, handle: str, gone: threading.Event, sent: threading.Event, ended: threading.Event
    ) -> None:
        """What the port inside sends, to the host's client, until the port closes its side (or is
        quiet for HALF_CLOSED_IDLE_S once the client's side has ended)."""
        idle = self.POLL_MIN_S
        quiet_since: float | None = None  # once the client's side has ended: the port's last byte, or that end
        while not gone.is_set():
            sent.clear()
            said = self._call("proc_read", {"handle": handle})
            data = base64.b64decode(said.get("stdout") or "")
            if ended.is_set() and (data or quiet_since is None):
                quiet_since = time.monotonic()
            if data:
                client.sendall(data)
                idle = self.POLL_MIN_S
            elif said.get("running") is False:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                return
            elif quiet_since is not None and time.monotonic() - quiet_since > HALF_CLOSED_IDLE_S:
                return  # the connection ends (its tunnel is closed by the caller)
            elif sent.wait(idle):
                idle = self.POLL_MIN_S
            else:
                idle = min(idle * 2, self.POLL_MAX_S)


async def _in_turn(lock: asyncio.Lock, sandbox: RelayedSandbox, method: str, params: dict[str, Any]) -> dict[str, Any]:
    async with lock:
        return await sandbox.aproc_call(method, params)


def connect_inside(pidfd: int, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP socket connected to 127.0.0.1:``port`` in the network namespace of ``pidfd``'s process."""
    made: list[socket.socket] = []
    failed: list[OSError] = []

    def join_and_connect() -> None:
        try:
            linux.setns(pidfd, linux.CLONE_NEWNET)  # this thread only: it ends right after
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                raise
            sock.settimeout(None)
            made.append(sock)
        except OSError as exc:
            failed.append(exc)

    worker = threading.Thread(target=join_and_connect, name="stockade-publish-connect", daemon=True)
    worker.start()
    worker.join()
    if failed or not made:
        why = failed[0] if failed else OSError("no socket")
        raise SandboxError(f"cannot reach port {port} inside the isolate: {why}")
    return made[0]


def _relay(client: socket.socket, inner: socket.socket) -> None:
    """Both directions of a connection, one in a thread of its own (a blocked send must not stop
    the other direction: a server that answers as it reads would wait for ever on a client that
    sends as it reads). Each is copied until its end, which is passed on (half-close); the
    direction that ends first then watches the other, which gets HALF_CLOSED_IDLE_S without a
    byte (read or sent) before the connection ends. A failure ends both."""
    moved = [time.monotonic()]  # when a byte last went either way (or a direction ended)
    up_done, down_done = threading.Event(), threading.Event()

    def down() -> None:
        _copy(inner, client, moved)
        down_done.set()
        _watch(up_done, moved, client, inner)

    back = threading.Thread(target=down, name="stockade-publish-down", daemon=True)
    back.start()
    _copy(client, inner, moved)
    up_done.set()
    _watch(down_done, moved, client, inner)
    back.join()


def _copy(source: socket.socket, sink: socket.socket, moved: list[float]) -> None:
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
            moved[0] = time.monotonic()
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    moved[0] = time.monotonic()


def _watch(other_done: threading.Event, moved: list[float], *sockets: socket.socket) -> None:
    """This direction has ended: the other has until HALF_CLOSED_IDLE_S passes without a byte."""
    while not other_done.wait(max(0.0, moved[0] + HALF_CLOSED_IDLE_S - time.monotonic())):
        if time.monotonic() - moved[0] >= HALF_CLOSED_IDLE_S:
            for sock in sockets:  # wakes the other direction's recv or send: it ends
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return


def _refuse(client: socket.socket) -> None:
    """End a connection that reached nothing inside with a reset: its client reads "connection
    reset" (as near "refused" as a connection already accepted can come), not an empty answer."""
    with contextlib.suppress(OSError):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
