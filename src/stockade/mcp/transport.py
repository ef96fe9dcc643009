"""The MCP stdio transport to a server running in an isolate: JSON-RPC lines over a spawned process.

The official SDK's ``stdio_client`` starts its server with ``anyio.open_process``; here the
server is a process spawned in a sandbox (``Process``: runtimes/spawned.py), which works the
same on every runtime. Lines its stdout writes become ``SessionMessage``s (a line that is not
JSON-RPC becomes an exception the session reports, as the SDK does); messages written by the
session become lines on its stdin. A line longer than ``MAX_LINE`` ends the transport: a
server that floods is cut off, not buffered. So does a line of more than ``MAX_VALUES`` JSON
values: parsed, each is a Python object of its own (a 16 MiB line of ``0,0,0,...`` took a GiB),
where a large message a server means (a text, an image) is mostly one string.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from mcp import types
from mcp.shared.message import SessionMessage

from ..egress.redact import Redactor
from ..errors import printable
from ..jsonvalues import values_at_most
from ..ratelimit import TokenBucket
from ..runtimes.spawned import Process


class _Sparing(logging.Filter):
    """At most ``per_minute`` records a minute, then one that says how many were left out: the
    MCP SDK logs a warning with a traceback for each notification that fails its checks, and a
    server within its message rate sent 450 a second (0.5 MB/s of log, most of a core formatting
    them), for as long as it was kept."""

    def __init__(self, per_minute: int = 10) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._window, self._said, self._left_out = -60.0, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._window >= 60:
            if self._left_out:
                record.msg = f"{record.msg} ({self._left_out} records of this log left out before it)"
            self._window, self._said, self._left_out = now, 0, 0
        self._said += 1
        if self._said > self.per_minute:
            self._left_out += 1
            return False
        return True


# The SDK's loggers that what a server sends sets off (its client session logs to "client"),
# each with a budget of its own: one flooded does not silence the others.
SDK_LOGS = ("client", "mcp.shared.jsonrpc_dispatcher", "mcp.shared.dispatcher", "mcp.client.stdio",
            "mcp.shared.tool_name_validation")  # fmt: skip
for _name in SDK_LOGS:
    logging.getLogger(_name).addFilter(_Sparing())

MAX_LINE = 16 << 20  # one JSON-RPC message
MAX_VALUES = 1_000_000  # JSON values in one message (~50-100 bytes each once parsed)
MAX_STDERR = 64 << 10  # kept of what the server says on stderr, for an error message
# What a server may make this host process read and parse, its isolate's limits not covering it: a
# few large results at once, then a steady rate far above any conversation's. A server past it
# (notifications without end, asked for or not) is cut off as one that floods its stdout is.
MAX_BYTES_PER_S, MAX_BYTES_BURST = 4 << 20, 64 << 20
MAX_MESSAGES_PER_S, MAX_MESSAGES_BURST = 500.0, 5000.0
# CPU seconds a second this process may spend reading a server's messages (counting and parsing
# them, with the GIL held): the byte and message rates above do not bound it, as a message's
# shape sets its cost (deep nesting parses ten times slower a byte than a flat list).
MAX_PARSE_CPU_PER_S, MAX_PARSE_CPU_BURST = 0.1, 2.0
# How long the reader waits for output while there is none. The agent serves one call at a time, so a
# process's output is asked for, not pushed: often while a conversation is under way (a reply is due
# soon after a request), seldom while it is quiet (an idle server costs the agent next to nothing).
POLL_BUSY_S = 0.0005
POLL_IDLE_S = 0.05
BUSY_FOR_S = 2.0  # after a message either way (a whole one: bytes that end no line keep nothing busy)
# A read of less than this that ended no message is waited after as an empty one: a server that
# trickles bytes (a line that never ends) would otherwise keep the reader asking without a pause.
SMALL_READ = 4096


class ReadBudget:
    """What one server's messages may cost this host to read: its bytes, its messages and the CPU
    time parsing them. Kept by the server's name, not its process, so that every process of it
    draws on one budget: an ephemeral server started per call, or a kept one started again after
    it was cut off, would otherwise bring a fresh burst each time. Locked: calls of one server
    read in threads of their own. ``above``: a budget it draws on too (a daemon's caller's, ``scale``
    servers' worth, for all of its servers: a config sent again with a server renamed is another
    server, with a fresh budget of its own)."""

    def __init__(self, scale: float = 1.0, above: ReadBudget | None = None) -> None:
        self._lock = threading.Lock()
        self._bytes = TokenBucket(MAX_BYTES_PER_S * scale, MAX_BYTES_BURST * scale)
        self._messages = TokenBucket(MAX_MESSAGES_PER_S * scale, MAX_MESSAGES_BURST * scale)
        self._parsing = TokenBucket(MAX_PARSE_CPU_PER_S * scale, MAX_PARSE_CPU_BURST * scale)
        self.above = above

    def overdrawn(self, read: int = 0, messages: int = 0, cpu_s: float = 0.0) -> str | None:
        """Take what was just spent; why the server is cut off when it is past its budget."""
        why = self._spend(read, messages, cpu_s)
        if why is None and self.above is not None:
            why = self.above.overdrawn(read, messages, cpu_s)
            if why is not None:
                why += " (with its caller's other MCP servers)"
        return why

    def _spend(self, read: int, messages: int, cpu_s: float) -> str | None:
        with self._lock:
            if read and not self._bytes.take(read):
                return f"it wrote more than {int(self._bytes.rate) >> 20} MiB a second for too long"
            if messages and not self._messages.take(messages):
                return f"it wrote more than {self._messages.rate:g} messages a second for too long"
            if cpu_s and not self._parsing.take(cpu_s):
                return (
                    f"its messages took more than {self._parsing.rate:.0%} of a core of this host's to read, "
                    "for too long"
                )
            return None


@dataclass
class ServerOutput:
    """What the transport saw of its server besides messages: stderr (the last MAX_STDERR bytes)."""

    stderr: bytearray = field(default_factory=bytearray)
    exit_code: int | None = None
    broken: str | None = None  # why the transport stopped reading, when the server did not just end
    hidden: Redactor | None = None  # the values of the server's environment, never quoted (records.hidden_values)
    cut: bool = False  # stderr's start was let go: what it begins with may be a piece of a value

    def note_stderr(self, data: bytes) -> None:
        self.stderr += data
        if len(self.stderr) > MAX_STDERR:
            del self.stderr[: len(self.stderr) - MAX_STDERR]
            self.cut = True

    def describe(self, cause: BaseException | None = None) -> str:
        """What is known of why the server went: the transport's reason, its exit, its last
        stderr lines and ``cause`` (the session's error), none of them able to steer a terminal,
        nor quoting a value of the server's environment."""
        data = bytes(self.stderr)
        if self.cut:  # from the first line that starts past where any hidden value cut in two could end
            start = data.find(b"\n", self.hidden.longest if self.hidden is not None else 0)
            data = data[start + 1 :] if start >= 0 else b""
        lines = self.hide(data.decode("utf-8", errors="replace")).strip().splitlines()[-5:]
        said = [printable(line) for line in lines]  # the server's words: no terminal control in them
        parts = [self.broken] if self.broken else []
        if self.exit_code is not None:
            parts.append(f"it exited with {self.exit_code}")
        if said:
            parts.append("its stderr ends: " + " | ".join(said))
        described = "; ".join(parts) or "no word from it"
        return f"{described} ({printable(self.hide(str(cause)))})" if cause is not None else described

    def hide(self, text: str) -> str:
        return self.hidden.text(text) if self.hidden is not None else text


@asynccontextmanager
async def process_transport(
    process: Process, output: ServerOutput, budget: ReadBudget
) -> AsyncIterator[tuple[ObjectReceiveStream[SessionMessage | Exception], ObjectSendStream[SessionMessage]]]:
    """``(read_stream, write_stream)`` for ``mcp.ClientSession``, over ``process``'s stdin and stdout,
    read within ``budget`` (its server's)."""
    # Few parsed messages wait for the session: each may be large.
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](4)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](16)
    stop = threading.Event()
    last_message = [time.monotonic()]

    def read_loop() -> None:
        buffer = bytearray()
        scanned = 0  # of the buffer, found to hold no line's end: each byte is looked at once
        opened = 0.0  # when the line now in the buffer began (a message coming in pieces)
        while not stop.is_set():
            ended = process.exit_code is not None
            began = time.thread_time()
            out, err = process.read()
            if err:
                output.note_stderr(err)
            if (why := budget.overdrawn(read=len(out) + len(err))) is not None:
                output.broken = why
                return
            if out and not buffer:
                opened = time.monotonic()
            buffer += out
            ended_lines = 0
            while (end := buffer.find(b"\n", scanned)) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                scanned = 0
                ended_lines += 1
                if values_at_most(line, MAX_VALUES) > MAX_VALUES:
                    output.broken = f"it wrote a message of more than {MAX_VALUES} JSON values"
                    return
                if (why := budget.overdrawn(messages=1)) is not None:
                    output.broken = why
                    return
                parsed = _parse(line) if line.strip() else None
                # The read, the search and the parse are the server's to pay for, with the GIL held.
                spent, began = time.thread_time() - began, time.thread_time()
                if (why := budget.overdrawn(cpu_s=spent)) is not None:
                    output.broken = why
                    return
                if parsed is not None:
                    anyio.from_thread.run(read_writer.send, parsed)
            scanned = len(buffer)
            if ended_lines:
                last_message[0] = time.monotonic()
            elif out or err:  # bytes that end no message cost their read too
                if (why := budget.overdrawn(cpu_s=time.thread_time() - began)) is not None:
                    output.broken = why
                    return
            if len(buffer) > MAX_LINE:
                output.broken = f"it wrote more than {MAX_LINE} bytes without a line's end"
                return
            if process.dropped["stdout"]:  # its messages are cut: nothing after can be trusted to frame
                dropped = process.dropped["stdout"]
                output.broken = f"it wrote more than its stdout buffer holds ({dropped} bytes dropped)"
                return
            if ended:
                output.exit_code = process.exit_code
                return
            if not ended_lines and len(out) + len(err) < SMALL_READ:
                # Busy after a whole message, or while a line that began lately comes in pieces; a
                # line kept open longer (a trickle) keeps nothing busy.
                now = time.monotonic()
                busy = now - last_message[0] < BUSY_FOR_S or (bool(buffer) and now - opened < BUSY_FOR_S)
                process.wait(POLL_BUSY_S if busy else POLL_IDLE_S)

    async def reader() -> None:
        async with read_writer:
            try:
                # A thread for the session's whole life, outside anyio's shared limiter (40 threads):
                # as many sessions at once as it holds would leave none of them a thread to write with.
                await anyio.to_thread.run_sync(read_loop, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))
            except Exception as exc:  # noqa: BLE001 - the sandbox went away under it: the session learns so
                output.broken = output.broken or f"its sandbox stopped answering: {exc}"

    async def writer() -> None:
        async with write_reader:
            async for message in write_reader:
                line = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                last_message[0] = time.monotonic()
                try:
                    await anyio.to_thread.run_sync(process.write, line.encode())
                except Exception as exc:  # noqa: BLE001 - as above: closing the read side ends the session
                    output.broken = output.broken or f"cannot write to it: {exc}"
                    await read_writer.aclose()
                    return

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(reader)
        tasks.start_soon(writer)
        try:
            yield read_stream, write_stream
        finally:
            stop.set()
            write_stream.close()
            read_stream.close()
            tasks.cancel_scope.cancel()


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        return exc
