"""``AsyncClient``: ``Client`` for asyncio, and ``AsyncRemoteSandbox``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Unpack

from ..errors import UNPROVEN, NotFoundError, StockadeError
from ..limits import publish_specs
from ..result import ExecResult
from ..runtimes.spawned import spawned_or_killed
from .answers import LINE_LIMIT, Answer, ExecAnswer, Reply, exec_result, naming, parse, read_answer_line, request_line
from .processes import AsyncRemoteProcess, spawn_params
from .requests import (
    CodeOptions,
    ExecOptions,
    PolicyArg,
    Requests,
    SandboxHandle,
    answered,
    answered_bytes,
    described,
    published_address,
)
from .retry import Attempts, ConnectionLost, Retry, hung_up_before_sending, lost_after_sending, unanswered, unreachable

if TYPE_CHECKING:
    from ..transfer import TransferSummary
    from ..transfer_unpack import Links
    from ..watch import AsyncFileWatch


class AsyncClient(Requests):
    """``Client`` for asyncio: the same methods, awaited; the event loop is never blocked.

        async with AsyncClient("/run/stockade/stockade.sock", auth_token=token) as client:
            result = await client.execute(code="print(1)")

    One connection, opened on first use and reopened after a failure; one the
    daemon hung up since its last answer (a restart) is replaced at once, and
    ``retry`` applies as for ``Client``. Calls on one client go out one at a
    time, each answered before the next is sent (a lock keeps them in order on
    the connection): for runs in parallel, use a client each. A call that
    times out or is cancelled drops the connection, so that its late answer is
    never taken for the next call's. A client used under another event loop
    than its last call's (one ``asyncio.run`` after another) leaves the old
    loop's connection and opens one of the new loop's.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        auth_token: str | None = None,
        timeout: float = 30.0,
        *,
        token_file: str | None = None,
        retry: Retry | None = Retry(),  # noqa: B008 - frozen: one shared default is safe
    ) -> None:
        super().__init__(socket_path, auth_token, timeout, token_file=token_file, retry=retry)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answered = False  # the connection has carried an answer: one that fails now went stale
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop the connection and lock are of

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        writer = self._writer if self._loop is asyncio.get_running_loop() else None
        self._drop()
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is None:
            return
        try:
            writer.close()
        except RuntimeError:
            # Its event loop is closed (a client used again after an asyncio.run): nothing can
            # close the transport through it, so the daemon is told the connection is done
            # (its socket shut down) and the socket is closed when the transport is collected.
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)

    def _on_this_loop(self) -> None:
        """Leave a connection and a lock of another event loop (one ``asyncio.run`` after
        another, a test's loop each): they cannot serve this one, whose calls they would fail."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                self._drop()
                self._lock = asyncio.Lock()
            self._loop = loop

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await self._connect_socket(sock)
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
            except OSError as exc:
                sock.close()
                raise unreachable(self.socket_path, exc) from None
            except BaseException:
                sock.close()
                raise
            if (refused := self._impostor(writer.get_extra_info("socket"))) is not None:
                writer.close()
                raise refused
            self._reader, self._writer = reader, writer
            self._answered = False
        return self._reader, self._writer

    async def _connect_socket(self, sock: socket.socket) -> None:
        """Connect ``sock``, waiting up to the client's ``timeout`` for room in a full listen backlog:
        a Unix socket's non-blocking connect is done at once or fails with EAGAIN, which the event
        loop's own connect would take for a connection under way (and hand back one not connected).
        Past the wait, ``BlockingIOError``: nothing was sent."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self.timeout, 0.001
        while True:
            try:
                sock.connect(self.socket_path)
                return
            except BlockingIOError:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> Any:
        """As ``Client.call``: one request, its result or the mapped error."""
        return (await self._call(method, params, timeout, on_output, Answer)).result

    async def _run(
        self, method: str, params: dict[str, Any], timeout: float, on_output: Callable[[str, bytes], None] | None = None
    ) -> ExecResult:
        return exec_result(method, await self._call(method, params, timeout, on_output, ExecAnswer))

    async def _call(
        self,
        method: str,
        params: dict[str, Any] | None,
        timeout: float | None,
        on_output: Callable[[str, bytes], None] | None,
        answer_type: type[Answer],
    ) -> Answer:
        attempts: Attempts | None = None  # made at the first failure: nothing to pay on the usual call
        wait = timeout or self.timeout
        proofs, prove = 0, False
        while True:
            # Each attempt is signed afresh: a nonce the daemon saw would be refused as a replay.
            reply = Reply(next(self._ids), on_output, signed=self._token is not None)
            line = request_line(method, params, reply.msg_id, self._token, streamed=on_output is not None)
            try:
                if prove:  # a signed ping proves the connection the request then goes on
                    await self._ping_signed(wait)
                answer = await self._exchange(line, reply, wait, answer_type, method)
            except ConnectionLost as lost:
                attempts = attempts or Attempts(self.retry, method)
                pause = attempts.after_lost(lost)
            else:
                if answer.error is None:
                    return reply.outcome(answer)
                # Refused unread (a process of this uid failed authentication lately): proved, then
                # sent again; twice at most (the connection may be lost between the two).
                prove = answer.error_code == UNPROVEN and self._token is not None and proofs < 2
                if prove:
                    proofs += 1
                    continue
                attempts = attempts or Attempts(self.retry, method)
                refused = attempts.after_refusal(answer.error_code, answer.error)
                if refused is None:
                    return reply.outcome(answer)
                pause = refused
            await asyncio.sleep(pause)

    async def _ping_signed(self, wait: float) -> None:
        reply = Reply(next(self._ids), None, signed=True)
        line = request_line("ping", {}, reply.msg_id, self._token, streamed=False)
        reply.outcome(await self._exchange(line, reply, wait, Answer, "ping"))

    async def _exchange(self, line: bytes, reply: Reply, wait: float, answer_type: type[Answer], method: str) -> Answer:
        """One attempt: ``line`` sent, its answer read (``ConnectionLost`` when either fails)."""
        self._on_this_loop()
        async with self._lock:
            try:
                # A connection first, within the client's own wait for one: a full backlog past the
                # call's wait is a request never sent (tried again), not one that may have run.
                await self._connect()
                return await asyncio.wait_for(self._send_and_read(line, reply, answer_type), wait)
            except TimeoutError:
                self._drop()
                raise unanswered(method, wait) from None
            except ConnectionLost:
                self._drop()
                raise
            except (OSError, EOFError) as exc:
                self._drop()
                raise lost_after_sending(self.socket_path, exc) from None
            except BaseException:
                self._drop()  # cancelled, or a bad line: a half-read answer must not reach the next call
                raise

    async def _send_and_read(self, line: bytes, reply: Reply, answer_type: type[Answer]) -> Answer:
        reader = await self._send(line)
        if isinstance(reader, Answer):
            return reader  # the daemon's refusal, sent before it hung up
        while not reply.take(answer := parse(await read_answer_line(reader), answer_type)):
            pass
        self._answered = True
        return answer

    async def _send(self, line: bytes) -> asyncio.StreamReader | Answer:
        """Send ``line``: on the kept connection, or on a new one when the daemon hung that one
        up since its last answer. The reader of the answer; or the daemon's refusal."""
        while True:
            stale = self._writer is not None and self._answered
            reader, writer = await self._connect()
            if not (writer.is_closing() or reader.at_eof() or reader.exception() is not None):
                writer.write(line)
                # A transport whose first send fails closes at once, before anything went out
                # (asyncio's selector transports); once some has gone, a failure is the drain's.
                if not writer.is_closing():
                    try:
                        await writer.drain()
                    except ConnectionError:
                        if (refusal := await _refusal(reader)) is None:
                            raise
                        self._drop()
                        return refusal
                    return reader
            # Nothing went out: the daemon had hung this connection up, maybe saying why first.
            refusal = await _refusal(reader)
            self._drop()
            if refusal is not None:
                return refusal
            if not stale:
                raise hung_up_before_sending(self.socket_path)

    # ---- methods (what each sends: Requests) --------------------------------------------

    async def ping(self) -> str:
        return str(await self.call(*self._ping()))

    async def selftest(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(*self._selftest())
        return result

    async def execute(
        self,
        command: list[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        policy: PolicyArg = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        **policy_fields: Any,
    ) -> ExecResult:
        sent = self._execute(command, code, language, policy, stdin, timeout, policy_fields)
        return await self._run(*sent, on_output)

    async def cancel_execution(self, execution_id: str) -> None:
        await self.call(*self._cancel(execution_id))

    @contextlib.asynccontextmanager
    async def sandbox(
        self,
        policy: PolicyArg = None,
        keep: bool = False,
        idle_timeout: float | None = None,
        *,
        publish: Sequence[int | str] = (),
        timeout: float | None = None,
        **policy_fields: Any,
    ) -> AsyncIterator[AsyncRemoteSandbox]:
        """``Client.sandbox`` for asyncio: ``async with client.sandbox(policy) as sb: await sb.exec([...])``."""
        made = await self.call(*self._create(policy, keep, idle_timeout, timeout, policy_fields))
        handle = AsyncRemoteSandbox(self, **described(made))
        try:
            for spec in publish_specs(publish):
                await handle.publish(spec)
            yield handle
        finally:
            await handle.close()

    async def connect_sandbox(self, sandbox_id: str) -> AsyncRemoteSandbox:
        """``Client.connect_sandbox``, awaited."""
        made = await self.call("sandbox.get", {"sandbox_id": sandbox_id})
        return AsyncRemoteSandbox(self, **described(made))

    async def create_sandbox(
        self,
        policy: PolicyArg = None,
        keep: bool = False,
        idle_timeout: float | None = None,
        *,
        timeout: float | None = None,
        **policy_fields: Any,
    ) -> str:
        said = await self.call(*self._create(policy, keep, idle_timeout, timeout, policy_fields))
        return answered(said, "sandbox_id", str)

    async def sandbox_exec(self, sandbox_id: str, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        return await self._run(*self._sandbox_exec(sandbox_id, command, options), options.get("on_output"))

    async def sandbox_run_code(
        self, sandbox_id: str, code: str, language: str = "python", **options: Unpack[CodeOptions]
    ) -> ExecResult:
        return await self._run(*self._sandbox_run_code(sandbox_id, code, language, options), options.get("on_output"))

    async def sandbox_write_file(self, sandbox_id: str, path: str, data: bytes | str, mode: int = 0o644) -> None:
        with naming(path):
            await self.call(*self._write_file(sandbox_id, path, data, mode))

    async def sandbox_read_file(self, sandbox_id: str, path: str, max_bytes: int | None = None) -> bytes:
        with naming(path):
            return answered_bytes(await self.call(*self._read_file(sandbox_id, path, max_bytes)), "data")

    async def sandbox_list_dir(self, sandbox_id: str, path: str) -> list[dict[str, Any]]:
        with naming(path):
            entries: list[dict[str, Any]] = answered(
                await self.call(*self._list_dir(sandbox_id, path)), "entries", list
            )
        return entries

    async def close_interpreter(self, sandbox_id: str, session: str) -> bool:
        closed = answered(await self.call(*self._close_interpreter(sandbox_id, session)), "closed", bool)
        return closed

    async def sandbox_publish(self, sandbox_id: str, spec: int | str) -> tuple[str, int]:
        """``Client.sandbox_publish``, awaited."""
        return published_address(await self.call(*self._publish(sandbox_id, spec)))

    async def interrupt_sandbox(self, sandbox_id: str, session: str | None = None) -> bool:
        """``Client.interrupt_sandbox``: on a connection of its own."""
        async with AsyncClient(self.socket_path, self._token, self.timeout, retry=None) as other:
            interrupted = answered(await other.call(*other._interrupt(sandbox_id, session)), "interrupted", bool)
        return interrupted

    async def close_sandbox(self, sandbox_id: str) -> None:
        await self.call(*self._close(sandbox_id))

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(*self._status())
        return result

    async def runtimes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call(*self._runtimes())
        return result


async def _refusal(reader: asyncio.StreamReader) -> Answer | None:
    """The error a daemon sent before it hung up a connection, if it did (``Client._refusal``)."""
    try:
        answer = parse(await read_answer_line(reader), Answer)
    except (OSError, EOFError, StockadeError):
        return None
    return answer if answer.error is not None else None


class AsyncRemoteSandbox(SandboxHandle):
    """``RemoteSandbox`` for an ``AsyncClient``: the same methods, awaited."""

    def __init__(self, client: AsyncClient, sandbox_id: str, memory_mb: int | None = None, **said: Any) -> None:
        super().__init__(sandbox_id, memory_mb, **said)  # said: runtime, policy_digest
        self.client = client

    async def exec(self, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        return await self.client.sandbox_exec(self.sandbox_id, command, **options)

    async def run_code(self, code: str, language: str = "python", **options: Unpack[CodeOptions]) -> ExecResult:
        return await self.client.sandbox_run_code(self.sandbox_id, code, language, **options)

    async def interrupt(self, *, session: str | None = None) -> bool:
        """Interrupt this sandbox's run in progress (``session``: only a cell of that interpreter)."""
        return await self.client.interrupt_sandbox(self.sandbox_id, session)

    async def publish(self, spec: int | str) -> tuple[str, int]:
        """``RemoteSandbox.publish``, awaited."""
        return self._note_published(await self.client.call(*self.client._publish(self.sandbox_id, spec)))

    async def spawn(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> AsyncRemoteProcess:
        spawning = self.client.call("sandbox.spawn", spawn_params(self.sandbox_id, argv, stdin, env, cwd))
        info = await spawned_or_killed(
            spawning, lambda info: AsyncRemoteProcess(self.client, self.sandbox_id, info).kill("SIGKILL")
        )
        return AsyncRemoteProcess(self.client, self.sandbox_id, info)

    async def processes(self) -> list[dict[str, Any]]:
        said = await self.client.call("sandbox.processes", {"sandbox_id": self.sandbox_id})
        listed: list[dict[str, Any]] = answered(said, "processes", list)
        return listed

    async def watch(self, path: str, *, recursive: bool = False, events: Iterable[str] | None = None) -> AsyncFileWatch:
        """``RemoteSandbox.watch``, awaited: an ``AsyncFileWatch``."""
        from ..watch import AsyncFileWatch

        return await AsyncFileWatch.start(lambda argv, source: self.spawn(argv, stdin=source), path, recursive, events)

    async def close_interpreter(self, session: str) -> bool:
        return await self.client.close_interpreter(self.sandbox_id, session)

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self.client.sandbox_write_file(self.sandbox_id, path, data, mode)

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return await self.client.sandbox_read_file(self.sandbox_id, path, max_bytes)

    async def list_dir(self, path: str) -> list[dict[str, Any]]:
        return await self.client.sandbox_list_dir(self.sandbox_id, path)

    async def upload(
        self, local_path: str | os.PathLike[str], remote_dir: str, *, max_bytes: int | None = None
    ) -> TransferSummary:
        """``RemoteSandbox.upload``, awaited (the host's side in a thread)."""
        from ..transfer import aupload

        return await aupload(self, local_path, remote_dir, max_bytes=max_bytes)

    async def download(
        self,
        remote_path: str,
        local_dir: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        max_files: int | None = None,
        overwrite: bool = False,
        executable: bool = False,
        links: Links = "refuse",
        vcs: bool = False,
    ) -> TransferSummary:
        """``RemoteSandbox.download``, awaited (the host's side in a thread)."""
        from ..transfer import adownload

        return await adownload(
            self,
            remote_path,
            local_dir,
            max_bytes=max_bytes,
            max_files=max_files,
            overwrite=overwrite,
            executable=executable,
            links=links,
            vcs=vcs,
        )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(NotFoundError):
            await self.client.close_sandbox(self.sandbox_id)
