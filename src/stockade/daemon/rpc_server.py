"""The Unix-socket RPC server (seed 000): newline-delimited JSON, HMAC, rate limits, peer credentials.

Request:  ``{"method": ..., "params": {...}, "id": ...}`` (+ ``ts``, ``nonce``, ``hmac`` when signed)
Response: ``{"result": ..., "error": null | "message", "id": ...}``; an error also carries
``error_code`` (``auth``, ``rate_limit``, ``busy``, ``invalid_request``, ``invalid_params``,
``method_not_found``, ``not_found``, ``policy``, ``runtime_unavailable``, ``sandbox``, ``internal``).

Order: peer credentials at accept (refused peers are answered once and
dropped before a byte is read), then per request: size, JSON, rate limit
(per connection and per peer uid), authentication, dispatch. Requests on one
connection run in order; connections run in parallel. Nothing a client sends
ends the daemon: every failure becomes an error response.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ..errors import AgentError, ConfigError, PolicyError, RuntimeUnavailableError, StockadeError
from ..protocol import auth
from ..result import ExecResult
from .config import DaemonConfig
from .controller import Controller, RequestError
from .ratelimit import SlidingWindowLimiter

log = logging.getLogger("stockade.daemon")

AUTH_FAILED = "Authentication failed"
RATE_LIMITED = "Rate limit exceeded"
_PEERCRED = struct.Struct("3i")
Emit = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class RPCServer:
    def __init__(self, config: DaemonConfig, controller: Controller) -> None:
        self.config = config
        self.controller = controller
        self.nonces = auth.NonceCache(config.replay_window_s)
        self.per_connection = SlidingWindowLimiter(config.max_requests)
        self.per_uid = SlidingWindowLimiter(config.max_requests)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self.stopping = False
        self.methods = {
            "ping": self._ping,
            "selftest": self._selftest,
            "execute": self._execute,
            "sandbox.create": self._create,
            "sandbox.exec": self._sandbox("exec"),
            "sandbox.run_code": self._sandbox("run_code"),
            "sandbox.write_file": self._sandbox("write_file"),
            "sandbox.read_file": self._sandbox("read_file"),
            "sandbox.close": self._close,
            "status": self._status,
            "runtimes": self._runtimes,
        }

    # ---- socket ---------------------------------------------------------------------

    async def start(self) -> None:
        path = self.config.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        _claim_socket_path(path)
        old_umask = os.umask(0o777 & ~self.config.socket_perms)  # never wider than asked, not even briefly
        try:
            self._server = await asyncio.start_unix_server(self._handle, path, limit=self.config.max_request_bytes + 1)
        finally:
            os.umask(old_umask)
        os.chmod(path, self.config.socket_perms)
        log.info("listening on %s (mode %04o, auth %s)", path, self.config.socket_perms,
                 "hmac" if self.config.auth_token else "off")  # fmt: skip

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let requests in progress answer for up to ``grace_s``, then drop connections."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket_path)
        await self.controller.wait_idle(grace_s)
        await asyncio.sleep(0)  # let the answers of the work that just finished go out
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)

    # ---- one connection -------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        connection = next(self._ids)
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            peer = Peer(*_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)))
            if not self._peer_allowed(peer):
                log.warning("refused peer pid=%d uid=%d gid=%d", peer.pid, peer.uid, peer.gid)
                await _send(writer, _error(None, f"Permission denied: uid {peer.uid} is not allowed", "auth"))
                return
            while True:
                line = await _read_line(reader, self.config.max_request_bytes)
                if line is None:
                    return
                started = time.monotonic()
                method: str | None = None
                sent = False
                if isinstance(line, int):
                    response = _error(None, f"Request too large: over {line} bytes", "invalid_request")
                else:
                    method, response, sent = await self._respond(line, peer, connection, writer)
                if sent:
                    await writer.drain()
                else:
                    await _send(writer, response)
                if method is not None and method != "ping":
                    # Logged once the answer is out, not on the caller's time. Never the
                    # params (they may hold code and data), never the hmac.
                    outcome = response.get("error_code") or "ok"
                    result = response.get("result")
                    run = f" execution={result.execution_id}" if isinstance(result, ExecResult) else ""
                    elapsed_ms = (time.monotonic() - started) * 1000
                    log.info("uid=%d %s %s%s %.1fms", peer.uid, method, outcome, run, elapsed_ms)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection %d failed", connection)
        finally:
            self.per_connection.forget(connection)
            try:
                await self.controller.close_connection(connection)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                if task is not None:
                    self._connections.discard(task)

    def _peer_allowed(self, peer: Peer) -> bool:
        if self.config.allowed_uids is not None and peer.uid not in self.config.allowed_uids:
            return False
        return self.config.allowed_gids is None or peer.gid in self.config.allowed_gids

    async def _respond(
        self, line: bytes, peer: Peer, connection: int, writer: asyncio.StreamWriter
    ) -> tuple[str | None, dict[str, Any], bool]:
        """The answer to one request line, the method it ran (None when refused before
        dispatch), and whether the answer has been written already."""
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            return None, _error(None, "Invalid JSON", "invalid_request"), False
        if not isinstance(request, dict):
            return None, _error(None, "Invalid request: expected a JSON object", "invalid_request"), False
        msg_id = request.get("id")
        if not isinstance(msg_id, (int, str, type(None))) or isinstance(msg_id, bool):
            return (
                None,
                _error(None, "Invalid request: id must be a number, a string or null", "invalid_request"),
                False,
            )
        if not self.per_connection.allow(connection) or not self.per_uid.allow(peer.uid):
            return None, _error(msg_id, RATE_LIMITED, "rate_limit"), False
        if self.stopping:
            return None, _error(msg_id, "Shutting down: no new requests", "unavailable"), False
        if self.config.auth_token is not None and not auth.verify(
            request, self.config.auth_token, self.nonces, raw=line
        ):
            log.warning("authentication failed: uid=%d method=%r", peer.uid, str(request.get("method"))[:64])
            return None, _error(msg_id, AUTH_FAILED, "auth"), False
        method, params = request.get("method"), request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(method, str) or not isinstance(params, dict):
            return (
                None,
                _error(msg_id, "Invalid request: method must be a string and params an object", "invalid_request"),
                False,
            )
        handler = self.methods.get(method)
        if handler is None:
            return None, _error(msg_id, f"Method not found: {method[:64]}", "method_not_found"), False
        if method == "execute" and not params.get("stream"):
            answered = await self._execute_now(params, peer, msg_id, writer)
            if answered is not None:
                return method, answered, True

        def emit(stream: str, data: bytes) -> None:
            # Output of a run with "stream": true, ahead of its answer, on the same connection.
            chunk = {"id": msg_id, "output": {"stream": stream, "data": base64.b64encode(data).decode()}}
            writer.write(json.dumps(chunk).encode() + b"\n")

        return method, await self._call(handler, method, params, peer, connection, msg_id, emit), False

    async def _call(
        self, handler: Any, method: str, params: dict[str, Any], peer: Peer, connection: int, msg_id: Any, emit: Emit
    ) -> dict[str, Any]:
        try:
            return {"result": await handler(params, peer, connection, emit), "error": None, "id": msg_id}
        except Exception as exc:  # noqa: BLE001 - every failure is an answer; _failure logs the unexpected
            return _failure(exc, method, msg_id)

    async def _execute_now(
        self, params: dict[str, Any], peer: Peer, msg_id: Any, writer: asyncio.StreamWriter
    ) -> dict[str, Any] | None:
        """Serve an ``execute`` on a warm isolate without waking this task for the agent's answer.

        The answer is written by the loop's callback that reads the agent's, in
        the same turn: on a host whose caches go cold while the isolate runs,
        every step between the two is the caller's latency. The task only
        learns of it afterwards. None when no warm isolate or slot is free now:
        then the request takes the awaited path.
        """
        answered: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def done(outcome: ExecResult | Exception) -> None:
            try:
                if isinstance(outcome, ExecResult):
                    response: dict[str, Any] = {"result": outcome, "error": None, "id": msg_id}
                else:
                    response = _failure(outcome, "execute", msg_id)
                _write(writer, response)
            except Exception as exc:  # noqa: BLE001 - raised in the task, which logs it and drops the connection
                if not answered.done():
                    answered.set_exception(exc)
                return
            if not answered.done():
                answered.set_result(response)

        try:
            abandon = self.controller.execute_now(params, peer.uid, done)
        except Exception as exc:  # noqa: BLE001 - a bad request is an answer, as on the awaited path
            response = _failure(exc, "execute", msg_id)
            _write(writer, response)
            return response
        if abandon is None:
            return None
        try:
            return await answered
        finally:
            if not answered.done():
                abandon()  # the connection is going away (shutdown): the isolate goes too

    # ---- methods --------------------------------------------------------------------

    async def _ping(self, params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> str:
        return "pong"

    async def _selftest(self, params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> dict[str, Any]:
        return await self.controller.selftest()

    async def _execute(self, params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> ExecResult:
        return await self.controller.execute(params, peer.uid, emit if params.get("stream") else None)

    async def _create(self, params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> dict[str, Any]:
        return await self.controller.create(params, peer.uid, connection)

    def _sandbox(self, method: str) -> Any:
        async def call(params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> Any:
            return await self.controller.sandbox_call(method, params, peer.uid, emit if params.get("stream") else None)

        return call

    async def _close(self, params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> dict[str, Any]:
        return await self.controller.close_sandbox(params, peer.uid)

    async def _status(self, params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> dict[str, Any]:
        return self.controller.status()

    async def _runtimes(self, params: dict[str, Any], peer: Peer, connection: int, emit: Emit) -> list[dict[str, Any]]:
        return await self.controller.runtimes()


def _error(msg_id: Any, message: str, code: str) -> dict[str, Any]:
    return {"result": None, "error": message, "error_code": code, "id": msg_id}


def _failure(exc: Exception, method: str, msg_id: Any) -> dict[str, Any]:
    """The error answer for what a method raised."""
    if isinstance(exc, RequestError):
        return _error(msg_id, str(exc), exc.code)
    if isinstance(exc, PolicyError):
        return _error(msg_id, str(exc), "policy")
    if isinstance(exc, RuntimeUnavailableError):
        return _error(msg_id, str(exc), "runtime_unavailable")
    if isinstance(exc, AgentError):
        return _error(msg_id, str(exc), "agent")
    if isinstance(exc, StockadeError):
        return _error(msg_id, str(exc), "sandbox")
    log.error("internal error in %s", method, exc_info=exc)
    return _error(msg_id, f"Internal error: {type(exc).__name__}", "internal")


async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    _write(writer, response)
    await writer.drain()


def _write(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    result = response["result"]
    if isinstance(result, BaseModel):
        # A model (an ExecResult) goes out through pydantic's own serializer, in
        # the same key order as every other answer.
        line = f'{{"result": {result.model_dump_json()}, "error": null, "id": {json.dumps(response["id"])}}}'
        writer.write(line.encode() + b"\n")
    else:
        # json.dumps' default separators: the seed's health check shows its answer byte for byte.
        writer.write(json.dumps(response).encode() + b"\n")


async def _read_line(reader: asyncio.StreamReader, limit: int) -> bytes | int | None:
    """One request line; None at EOF; the limit (an int) when the line was too long (then skipped)."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial.strip() or None  # a last request without its newline still counts
    except asyncio.LimitOverrunError as exc:
        # Discard up to the end of the oversized line, then carry on with the next one.
        await reader.readexactly(exc.consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return limit
            except asyncio.LimitOverrunError as more:
                await reader.readexactly(more.consumed)
            except asyncio.IncompleteReadError:
                return None
    if len(line) > limit + 1:
        return limit
    stripped = line.strip()
    return stripped if stripped else await _read_line(reader, limit)


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead daemon; never steal a live one's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: stale
        return
    except OSError as exc:
        raise ConfigError(f"cannot check whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"another daemon is already listening on {path}")
