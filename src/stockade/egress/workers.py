"""The keeper's side of egress workers (worker.py): one per allow-listed isolate, from a fork server.

The fork server is started by the first allow-listed isolate this process
builds (its imports overlap that isolate's start) and forks a worker for each
later one in about a millisecond. A worker is asked for when an isolate for
``network_policy: "allowlist"`` is built (by the pool, ahead of any caller),
and serves that isolate alone until it is closed. What it sends back is
checked as what it is, an account from a process the isolate may have taken
over: bounded in size, validated, a refusal counted, nothing trusted for more
than the isolate's own record.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
from pydantic import ValidationError

from ..errors import SandboxStartError
from ..policy import Policy
from ..result import EgressRequest, validate
from .gate import MAX_RECORDS, MAX_REFUSALS_SAID

MAX_REPLY = 1 << 20  # 256 records of a few hundred bytes, and a CA certificate
SERVE_TIMEOUT_S = 60.0  # the fork server started a moment ago may still be importing, on a loaded host
TAKE_TIMEOUT_S = 10.0
# Nothing of the keeper's environment: workers read no setting from it.
WORKER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def module_path() -> list[str]:
    """This process's module path without what its start put first: the directory of the script
    it runs, or the one ``python -m`` ran in (for the fork server, root's, a directory another user
    may write), unless it is where stockade itself comes from."""
    own = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    first = 0 if sys.flags.safe_path else 1  # under -P nothing was put first: the path is PYTHONPATH's
    return [p for i, p in enumerate(sys.path) if p and (i >= first or os.path.abspath(p) == own)]


class ForkServer:
    """``python -P -s -m stockade.egress.worker``: forks this process's workers (``fork_server()``)."""

    def __init__(self) -> None:
        keeper, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The keeper's own module path, whatever made it (a venv, PYTHONPATH); -s: no user site of the
            # user it runs as, -P: not the current directory, nor the keeper's script's or `-m`'s.
            env = {**WORKER_ENV, "PYTHONPATH": os.pathsep.join(module_path())}
            argv = [sys.executable, "-P", "-s", "-m", "stockade.egress.worker"]
            if os.geteuid() == 0:  # it forks workers only as a uid of the sandbox range
                from ..settings import current

                first, last = current().sandbox_uids
                argv += ["--uids", f"{first}-{last}"]
            self._proc = subprocess.Popen(
                argv, stdin=child.fileno(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, env=env,
            )  # fmt: skip
        except OSError as exc:
            keeper.close()
            raise SandboxStartError(f"cannot start the egress workers' fork server: {exc}") from None
        finally:
            child.close()
        self._ctl = keeper
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def kill(self, pid: int) -> None:
        """SIGKILL worker ``pid`` (for a keeper that may not signal its uid)."""
        with self._lock:
            self._ctl.send(msgpack.packb({"kill": pid}))
            if select.select([self._ctl], [], [], SERVE_TIMEOUT_S)[0]:
                self._ctl.recv(4096)

    def end(self) -> None:
        with self._lock:
            self._ctl.close()
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait()

    def fork(self, uid: int | None) -> tuple[socket.socket, int, int]:
        """A new worker serving as ``uid``: the keeper's end of its socket, its pid and its pidfd."""
        keeper, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                socket.send_fds(self._ctl, [msgpack.packb({"uid": uid})], [child.fileno()])
                if not select.select([self._ctl], [], [], SERVE_TIMEOUT_S)[0]:
                    threading.Thread(target=forget_fork_server, daemon=True).start()  # not under its lock
                    raise OSError("the fork server did not answer")
                raw, fds, _flags, _address = socket.recv_fds(self._ctl, 4096, 1)
            answer = msgpack.unpackb(raw) if raw else {}
            if len(fds) != 1 or not isinstance(answer.get("pid"), int):
                for fd in fds:
                    os.close(fd)
                raise OSError(str(answer.get("error") or "the fork server ended"))
        except BaseException:
            keeper.close()
            raise
        finally:
            child.close()
        return keeper, answer["pid"], fds[0]


_fork_server: ForkServer | None = None
_fork_server_lock = threading.Lock()


_started_as_root = False  # then one started later, without root, could not put workers on the isolates' uids


def fork_server() -> ForkServer:
    """This process's fork server, started (again, if it ended) on demand. A daemon that gives root up
    starts it before (daemon/privileges.py): one it lost after that is not replaced by a lesser one."""
    global _fork_server, _started_as_root
    with _fork_server_lock:
        if _fork_server is None or not _fork_server.alive():
            if _started_as_root and os.geteuid() != 0:
                raise SandboxStartError("the egress workers' fork server (root's) ended: restart the daemon")
            _fork_server = ForkServer()
            _started_as_root = _started_as_root or os.geteuid() == 0
        return _fork_server


def forget_fork_server() -> None:
    """After a fork server stopped answering: ended, so that its late answers pair with nothing."""
    global _fork_server
    with _fork_server_lock:
        server, _fork_server = _fork_server, None
    if server is not None:
        server.end()


class EgressWorkerLost(Exception):
    """The worker ended or broke its protocol; its sandbox has no way out any more."""


class EgressWorker:
    def __init__(self, uid: int | None) -> None:
        """A worker that serves as ``uid`` (the isolate's own) where its fork server is root; else as
        the fork server's user."""
        self.on_refused: Callable[[EgressRequest, int], None] | None = None
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()  # one request at a time
        self._lost: str | None = None
        self._pidfd_lock = threading.Lock()  # closed by close() while the reader may be killing it
        self._waiting = threading.Event()  # a request is out: one answer may come
        try:
            self._sock, self._pid, self._pidfd = self._start(uid)  # as root, its fork server drops it to uid
        except OSError as exc:
            raise SandboxStartError(f"cannot start the egress worker: {exc}") from None
        self._reader = threading.Thread(target=self._read, name="stockade-egress-worker", daemon=True)
        self._reader.start()

    def _start(self, uid: int | None) -> tuple[socket.socket, int, int]:
        return fork_server().fork(uid)

    @property
    def pid(self) -> int:
        return self._pid

    def serve(
        self, policy: Policy, values: Mapping[str, str], sockets: list[socket.socket],
        upstream_ca: str | None, pinned_hosts: str | None, refused: list[str] | None = None,
    ) -> tuple[dict[str, str], bytes | None]:  # fmt: skip
        """Hand the worker its sandbox (``upstream_ca``: PEM; ``pinned_hosts``: hosts(5) text;
        ``refused``: addresses never reached, allowlist.peers): returns the variables its runs get
        and its CA (PEM)."""
        message = {"op": "serve", "policy": policy.to_dict(), "values": dict(values),
                   "upstream_ca": upstream_ca, "pinned_hosts": pinned_hosts, "refused": refused or []}  # fmt: skip
        try:
            reply = self._ask(message, [s.fileno() for s in sockets], SERVE_TIMEOUT_S)
        except EgressWorkerLost as exc:
            raise SandboxStartError(f"the egress worker did not start serving: {exc}") from None
        env, ca = reply.get("env"), reply.get("ca")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise SandboxStartError("the egress worker answered serve with no environment")
        if ca is not None and not isinstance(ca, bytes):
            raise SandboxStartError("the egress worker answered serve with a CA that is not PEM")
        return env, ca

    def take(self) -> tuple[list[EgressRequest], int, int]:
        """The requests made since the last take, how many more were not kept, and how many secret
        values its proxy redacted from replies. Every refusal before them has been counted."""
        reply = self._ask({"op": "take"}, [], TAKE_TIMEOUT_S)
        raw, dropped, redacted = reply.get("records"), reply.get("dropped"), reply.get("redacted")
        if not isinstance(raw, list) or not isinstance(dropped, int) or not isinstance(redacted, int):
            raise self._broke("take")
        try:
            records = [validate(EgressRequest, r) for r in raw[:MAX_RECORDS]]
        except ValidationError:
            raise self._broke("take") from None
        return records, max(0, dropped) + max(0, len(raw) - MAX_RECORDS), max(0, redacted)

    def close(self) -> None:
        """End the worker now (its proxy's connections with it) and reap it."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        # SIGKILLed, it runs no more code of its own whether or not it has exited yet, and its fork server
        # reaps it: nothing to wait for before its isolate's uid goes back.
        self._kill()
        with self._pidfd_lock:
            os.close(self._pidfd)
            self._pidfd = -1
        self._sock.close()  # its reader sees the end and returns

    # ---- the socket ---------------------------------------------------------------------

    def _ask(self, message: dict[str, Any], fds: list[int], timeout: float) -> dict[str, Any]:
        with self._lock:
            if self._lost is not None:
                raise EgressWorkerLost(self._lost)
            try:
                data = msgpack.packb(message)
                self._waiting.set()
                sent = socket.send_fds(self._sock, [data], fds) if fds else 0  # the descriptors ride the first bytes
                self._sock.sendall(data[sent:])
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise self._broke(f"no answer to {message['op']} in {timeout:g} s") from None
            except OSError as exc:
                raise self._broke(f"cannot reach it: {exc}") from None
            finally:
                self._waiting.clear()
            if reply is None:
                raise EgressWorkerLost(self._lost or "it ended")
            if not reply.get("ok"):
                error = reply.get("error")
                raise EgressWorkerLost(error[:500] if isinstance(error, str) else "it refused")
            return reply

    def _broke(self, what: str) -> EgressWorkerLost:
        """The worker is no use any more: ended, so that the isolate has no way out at all."""
        self._lost = self._lost or what
        self._kill()
        return EgressWorkerLost(self._lost)

    def _kill(self) -> None:
        with self._pidfd_lock:
            if self._pidfd < 0:
                return
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:  # it runs as its isolate's uid, and this keeper gave root up
                with contextlib.suppress(OSError, SandboxStartError):
                    fork_server().kill(self._pid)

    def _read(self) -> None:
        # No message bigger than the largest honest one, and none of many tiny objects (1 MiB of empty
        # maps unpacks to tens of MiB).
        # The unpacker builds a message as its bytes come (its buffer bounds only what it has not read
        # yet): a message's size is counted here, from the end of the one before.
        unpacker = msgpack.Unpacker(max_buffer_size=MAX_REPLY, max_array_len=1024, max_map_len=1024)
        fed = boundary = 0
        try:
            while data := self._sock.recv(65536):
                fed += len(data)
                if fed - boundary > MAX_REPLY:
                    raise ValueError(f"a message larger than {MAX_REPLY} bytes")
                unpacker.feed(data)
                for message in unpacker:
                    boundary = unpacker.tell()
                    if not isinstance(message, dict):
                        raise ValueError("a message that is not a map")
                    if message.get("event") == "refused":
                        self._refused(message.get("request"), message.get("count", 1))
                    elif self._waiting.is_set() and self._replies.empty():
                        self._replies.put(message)
                    else:
                        raise ValueError("an answer nobody asked for")
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            self._broke(f"it broke its protocol: {exc}" if not isinstance(exc, OSError) else str(exc))
        self._lost = self._lost or "it ended"
        self._replies.put(None)

    def _refused(self, request: Any, count: Any) -> None:
        try:
            record = validate(EgressRequest, request)
        except ValidationError:
            raise ValueError("a refusal that is not a request record") from None
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_REFUSALS_SAID:
            raise ValueError(f"a refusal count that is not 1 to {MAX_REFUSALS_SAID}")
        if self.on_refused is not None:
            self.on_refused(record, count)
