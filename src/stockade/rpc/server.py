"""The Unix-socket RPC server (seed 000): peer credentials, rate limits, HMAC, a method table.

Two instances: the daemon (newline-delimited JSON, its method table in
daemon/methods.py, which the HTTP API serves too) and the secrets broker
(signed CBOR frames, broker/server.py). The codec (codec.py) is all that
differs in what crosses the socket.

Request:  ``{"method": ..., "params": {...}, "id": ...}`` (+ ``ts``, ``nonce``, ``hmac`` when signed)
Response: ``{"result": ..., "error": null | "message", "id": ...}``; an error also carries
``error_code``, one of ``errors.ERROR_CODES`` (the table every door and client shares).

Order: peer credentials at accept (refused peers are answered once and
dropped before a byte is read), then per request: size, decoding, rate limit
(per connection and per peer uid), authentication, the request model
(``protocol.models``), dispatch through the method table. Requests on one
connection run in order; connections run in parallel (connection.py reads,
orders and answers them). Nothing a client sends ends the server: every
failure becomes an error response.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    AUTH_FAILED,
    RATE_LIMITED,
    UNPROVEN,
    ConfigError,
    StockadeError,
    error_code,
    public_message,
    wire_errno,
)
from ..jsonvalues import too_many_values
from ..owned_paths import check_owned
from ..paths import default_socket_path
from ..protocol import auth
from ..protocol.models import Caller
from ..protocol.peer import Peer
from ..ratelimit import SlidingWindowLimiter
from . import methods
from .answer_log import AnswerLog
from .codec import Codec
from .connection import Connection, LinesUnderWay, error_answer
from .methods import Method, read_request

if TYPE_CHECKING:
    from ..daemon.answers import AnswerBudget
    from ..daemon.observers import Observers

log = logging.getLogger("stockade.daemon")

# Checking a signature decodes the whole request and encodes it again, in the event loop every
# connection shares: a 16 MiB line of numbers held it for over a second, the rate limit never
# reached. A uid that failed authentication (or sent what no signed client sends: a line that is
# not a JSON object, an id of the wrong kind) has shown it may lack the token: for
# AUTH_PENALTY_S, a line of its past UNPROVEN_LINE_BYTES is refused unread ("unproven") on every
# connection of its that has not yet carried a signed request. A signed client then proves the
# connection with a ping and sends the line again (client/, cli_daemon.py).
AUTH_PENALTY_S = 60.0
UNPROVEN_LINE_BYTES = 64 * 1024
Emit = Callable[[str, bytes], None]
Admitted = tuple[Method, Any, Any]  # the method, its request (a model), the id


@dataclass(frozen=True)
class ServerSettings:
    """Who may connect, how much, and how requests are authenticated."""

    socket_path: str
    socket_perms: int = 0o600
    socket_gid: int | None = None  # the socket's group (with 0660: who may connect at all)
    auth_key: str | bytes | None = None  # every request signed with it (HMAC), or None: no signatures
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    # Uids never served (first, last): the isolates' own. No isolate calls the daemon; one that reached
    # its socket (a shared path holding it) would be a caller of its own, with its own quotas.
    refused_uids: tuple[int, int] | None = None
    same_user_namespace: bool = False  # only peers in this process's user namespace (the broker's rule)
    max_requests: int = 100
    max_connections: int = 64
    max_request_bytes: int = 16 * 1024 * 1024
    replay_window_s: float = 30.0


class RPCServer:
    def __init__(
        self,
        config: ServerSettings,
        methods: dict[str, Method],
        codec: Codec,
        handler: Any,
        observers: Observers | None = None,
        listener: socket.socket | None = None,
        answers: AnswerBudget | None = None,
    ) -> None:
        from ..daemon.observers import Observers

        self.config = config
        self.methods = methods
        self.codec = codec
        self.handler = handler  # what the methods are called on (methods.Handler)
        # The daemon's budget for answers its clients have not read: these connections' write
        # buffers count in it, and a caller over its share gets no new work (daemon/answers.py).
        self.answers = answers
        if answers is not None:
            answers.unsent.append(self.unsent_bytes)
        self._listener = listener  # bound already (the broker binds as root, then drops)
        self.nonces = auth.NonceCache(config.replay_window_s, since=time.time())  # before the socket exists
        self.auth_failures = AuthFailures(AUTH_PENALTY_S)
        # max_requests holds per connection and per peer uid alike. Every
        # request a connection makes is also its uid's, under the same limit, so a
        # uid's window always holds at least what any one of its connections' would:
        # checking the uid's checks both, for one window's cost per request.
        self.per_uid = SlidingWindowLimiter(config.max_requests)
        self._server: asyncio.AbstractServer | None = None
        self._made_socket = False
        self.connections: set[Connection] = set()
        self.open_connections: Counter[int] = Counter()  # per peer uid, the ones admitted
        self.lines_under_way = LinesUnderWay()
        self.observers = observers or Observers()
        self.answer_log = AnswerLog(self.observers.request)
        self._ids = itertools.count(1)
        self.stopping = False

    def unsent_bytes(self, owner: str | None = None) -> int:
        """What the connections' clients (``owner``'s, or everyone's) have not read yet (their write buffers)."""
        return sum(
            c.transport.get_write_buffer_size()
            for c in self.connections
            if c.transport is not None and (owner is None or c.caller.owner == owner)
        )

    # ---- socket ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        path = self.config.socket_path
        if self._listener is not None:
            self._server = await loop.create_unix_server(
                lambda: Connection(self, next(self._ids)), sock=self._listener, backlog=LISTEN_BACKLOG
            )
        else:
            _check_socket_path(path)
            os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
            _check_socket_dir(path)
            _claim_socket_path(path)
            old_umask = os.umask(0o777 & ~self.config.socket_perms)  # never wider than asked, not even briefly
            try:
                # A deep backlog: clients wait for room in it (daemon_peer.connect), while a peer
                # over its connection limit is answered and closed only once accepted.
                self._server = await loop.create_unix_server(
                    lambda: Connection(self, next(self._ids)), path, backlog=LISTEN_BACKLOG
                )
            finally:
                os.umask(old_umask)
            self._made_socket = True
            if self.config.socket_gid is not None:
                os.chown(path, -1, self.config.socket_gid)
            os.chmod(path, self.config.socket_perms)
        log.info("listening on %s (mode %04o, auth %s)", path, self.config.socket_perms,
                 "hmac" if self.config.auth_key else "off")  # fmt: skip
        if self.config.socket_perms & 0o002 and not (
            self.config.auth_key or self.config.allowed_uids or self.config.allowed_gids
        ):
            log.warning(
                "the socket's mode %04o lets every user of this host run code through it (each sees only its own "
                "sandboxes); 0600 or 0660, STOCKADE_ALLOWED_UIDS/GIDS or STOCKADE_AUTH_TOKEN keep them out",
                self.config.socket_perms,
            )

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let requests in progress answer for up to ``grace_s``, then drop connections."""
        self.stopping = True
        if self._server is not None:  # never another daemon's socket: only the one this one made
            self._server.close()
            if self._made_socket:
                try:
                    os.unlink(self.config.socket_path)
                except FileNotFoundError:
                    pass
                except PermissionError:
                    # A daemon that gave root up, its socket in root's directory (/run/stockade): the
                    # next start claims the dead socket (_claim_socket_path), systemd removes the directory.
                    log.info("left %s: its directory is root's", self.config.socket_path)
        await self.handler.wait_idle(grace_s)
        await asyncio.sleep(0)  # let the answers of the work that just finished go out
        connections = list(self.connections)
        for connection in connections:
            connection.shut()
        if connections:
            await asyncio.wait([c.closed for c in connections], timeout=5)
        self.answer_log.flush()

    def peer_allowed(self, peer: Peer) -> bool:
        if self.config.allowed_uids is not None and peer.uid not in self.config.allowed_uids:
            return False
        refused = self.config.refused_uids
        if refused is not None and refused[0] <= peer.uid <= refused[1]:
            return False
        return self.config.allowed_gids is None or peer.gid in self.config.allowed_gids

    # ---- one request ----------------------------------------------------------------

    def admit(self, line: bytes, peer: Peer, owner: str, proven: bool = False) -> Admitted | dict[str, Any]:
        """A request line's method, request and id, or the error answer that refuses it.

        In this order: size after a failed authentication (``proven``: the connection carried a
        signed request already), rate limits (before the line is parsed: garbage counts too, and
        past the limit costs no parse), JSON, shape, shutdown, authentication, method, unread
        answers (``owner``'s), request.
        """
        codec = self.codec
        key = self.config.auth_key
        if key is not None and not proven and len(line) > UNPROVEN_LINE_BYTES and self.auth_failures.recent(peer.uid):
            return error_answer(
                None,
                f"{AUTH_FAILED}: uid {peer.uid} failed authentication within {AUTH_PENALTY_S:g} s, and until then its "
                f"requests over {UNPROVEN_LINE_BYTES} bytes are refused unread on a connection that has carried no "
                "signed request yet (send a signed ping on it first)",
                UNPROVEN,
            )
        if not self.per_uid.allow(peer.uid):
            return error_answer(None, RATE_LIMITED, "rate_limit")  # (an answer without an id is the refusal's)
        # Counted before it is parsed (each JSON value a Python object once it is: 16 MiB of "[{},...]"
        # took half a GiB); the broker's CBOR frames are small and not JSON.
        refusal = too_many_values(line) if codec.name == "JSON" else None
        if refusal is None:
            try:
                request = codec.decode(line)
            except ValueError:  # UnicodeDecodeError is one
                refusal = f"Invalid {codec.name}"
            except RecursionError:  # json's parser recurses: [[[[... a million deep
                refusal = f"Invalid {codec.name}: nested too deeply"
            else:
                if not isinstance(request, dict):
                    refusal = f"Invalid request: expected a {codec.name} object"
                elif not isinstance(msg_id := request.get("id"), (int, str, type(None))) or isinstance(msg_id, bool):
                    refusal = "Invalid request: id must be an integer, a string or null"
        if refusal is not None:
            if key is not None:
                self.auth_failures.note(peer.uid)  # no signed client sends it
            return error_answer(None, refusal, "invalid_request")
        if self.stopping:
            return error_answer(msg_id, "Shutting down: no new requests", "unavailable")
        if key is not None and not auth.verify(request, key, self.nonces, encode=codec.canonical):
            if self.auth_failures.note(peer.uid):  # once a window per uid: a flood of them is one line
                log.warning("authentication failed: uid=%d method=%r", peer.uid, str(request.get("method"))[:64])
            self.observers.auth_failure("unix", f"uid {peer.uid} pid {peer.pid}", str(request.get("method"))[:64])
            return error_answer(msg_id, AUTH_FAILED, "auth")
        name, params = request.get("method"), request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(name, str) or not isinstance(params, dict):
            return error_answer(
                msg_id, "Invalid request: method must be a string and params an object", "invalid_request"
            )
        method = self.methods.get(name)
        if method is None:
            return error_answer(msg_id, f"Method not found: {name[:64]}", "method_not_found")
        try:
            if self.answers is not None and not method.small_answer:
                self.answers.refuse_new(owner)
            return method, read_request(method, params), msg_id
        except StockadeError as exc:
            return self.failure(exc, name, msg_id)

    async def call(self, method: Method, request: Any, caller: Caller, msg_id: Any, emit: Emit) -> dict[str, Any]:
        """The answer of an awaited method: its result, or the error it raised."""
        on_output = emit if getattr(request, "stream", False) else None
        work = methods.answer(method, self.handler, request, caller, on_output, self.observers)
        return await self.answer(method.name, msg_id, work)

    async def answer(self, method: str, msg_id: Any, work: Awaitable[Any]) -> dict[str, Any]:
        """``work``'s result as an answer, or the error answer for what it raised."""
        try:
            return {"result": await work, "error": None, "id": msg_id}
        except Exception as exc:  # noqa: BLE001 - every failure is an answer; failure() logs the unexpected
            return self.failure(exc, method, msg_id)

    @staticmethod
    def failure(exc: Exception, method: str, msg_id: Any) -> dict[str, Any]:
        """The error answer for what a method raised: its code from the shared table."""
        code = error_code(exc)
        if code == "internal":
            log.error("internal error in %s", method, exc_info=exc)
        return error_answer(msg_id, public_message(exc), code, wire_errno(exc))


class AuthFailures:
    """When each uid last failed authentication, for ``penalty_s``; at most ``max_uids`` kept."""

    def __init__(self, penalty_s: float, max_uids: int = 4096) -> None:
        self.penalty_s = penalty_s
        self.max_uids = max_uids
        self._last: dict[int, float] = {}  # oldest failure first

    def recent(self, uid: int) -> bool:
        at = self._last.get(uid)
        return at is not None and time.monotonic() - at < self.penalty_s

    def note(self, uid: int) -> bool:
        """Record a failure of ``uid``'s; True when it had none within the window."""
        first = not self.recent(uid)
        now = time.monotonic()
        self._last.pop(uid, None)
        while self._last and (
            len(self._last) >= self.max_uids or now - next(iter(self._last.values())) >= self.penalty_s
        ):
            del self._last[next(iter(self._last))]
        self._last[uid] = now
        return first


# A Unix socket's path, as sockaddr_un holds it (108 bytes with its NUL).
MAX_SOCKET_PATH_BYTES = 107


LISTEN_BACKLOG = 1024  # (net.core.somaxconn caps it)


def _check_socket_path(path: str) -> None:
    """Refuse a path no socket can be made at: too long for sockaddr_un, or in a directory that is
    not there (only the default's, /run/stockade or the user's runtime directory, is made)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"socket path {path!r} is {size} bytes: a Unix socket's path is at most {MAX_SOCKET_PATH_BYTES} "
            "(name a shorter one: --socket, STOCKADE_SOCKET)"
        )
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory) and directory != os.path.dirname(default_socket_path()):
        raise ConfigError(
            f"socket path {path!r}: its directory {directory} is not there: make it first, or name another "
            "(--socket, STOCKADE_SOCKET)"
        )


def _check_socket_dir(path: str) -> None:
    """Refuse a directory whose owner or others could take the socket's name from the daemon (rename
    it, bind their own): one of another user's (made first by them where the default falls back to,
    /tmp/stockade-UID without XDG_RUNTIME_DIR), or one others may write without the sticky bit."""
    directory = os.path.dirname(path) or "."
    st = os.stat(directory)
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"socket path {path!r}: its directory {directory} belongs to uid {st.st_uid}, who could put a socket "
            "of theirs in the daemon's place: use a directory of your own (--socket, STOCKADE_SOCKET)"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"socket path {path!r}: others may write its directory {directory} (mode {stat.S_IMODE(st.st_mode):04o}) "
            "and put a socket of theirs in the daemon's place: use one only you can write, or one with the "
            "sticky bit (--socket, STOCKADE_SOCKET)"
        )
    # And above it: a directory another user may change could have this one moved and another put
    # in its place.
    check_owned(directory, f"socket path {path!r}: its directory", sticky=True)


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
