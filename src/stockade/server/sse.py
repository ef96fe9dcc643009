"""Server-sent events for a run's output, and the end of a run whose client went away.

A streamed run answers ``text/event-stream``: an ``output`` event per chunk
(``{"stream": "stdout"|"stderr", "text": ...}``, UTF-8 decoded per stream, so
a character split across chunks is not broken), then one ``result`` event
(the run's result) or one ``error`` event (``{"error", "code"}``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import DaemonUnavailableError, error_code, public_message
from ..runtimes.verdict import OutputCallback

T = TypeVar("T")


class ClientDisconnected(DaemonUnavailableError):
    """The client went away before its answer; its run was ended. Answered to nobody
    (recorded as 499, nginx's word for it, in the request metrics)."""


def sse(event: str, data: str) -> bytes:
    """One event; ``data`` is JSON, so it holds no newline of its own."""
    return f"event: {event}\ndata: {data}\n\n".encode()


# Output queued for a client that reads slower than the run writes, at most: past it the
# stream skips output (the result event still carries all of it) and says how much.
MAX_QUEUED_BYTES = 4 * 1024 * 1024


def event_stream(
    run: Callable[[OutputCallback], Awaitable[Any]],
    render: Callable[[Any], str],
    cancel_on_disconnect: bool,
) -> StreamingResponse:
    """Stream what ``run`` writes, then ``render(result)``.

    The run starts with the stream's first step: a client gone before it starts none.
    With ``cancel_on_disconnect`` a client that goes away ends the run (its task is
    cancelled, which kills a one-shot isolate); otherwise the run is let finish.
    """
    events: asyncio.Queue[bytes | None] = asyncio.Queue()
    decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
    queued = skipped = 0

    def on_output(stream: str, data: bytes) -> None:
        nonlocal queued, skipped
        decoder = decoders.get(stream)
        if decoder is None:
            return
        event = sse("output", json.dumps({"stream": stream, "text": decoder.decode(data)}))
        if queued + len(event) > MAX_QUEUED_BYTES:
            skipped += len(data)
            return
        queued += len(event)
        events.put_nowait(event)

    async def work() -> None:
        try:
            result = await run(on_output)
            for stream, decoder in decoders.items():  # a character its output ended in the middle of
                if tail := decoder.decode(b"", final=True):
                    events.put_nowait(sse("output", json.dumps({"stream": stream, "text": tail})))
            if skipped:
                events.put_nowait(sse("skipped", json.dumps({"bytes": skipped})))
            events.put_nowait(sse("result", render(result)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is an event the client reads
            events.put_nowait(sse("error", json.dumps({"error": public_message(exc), "code": error_code(exc)})))
        finally:
            events.put_nowait(None)

    async def body() -> AsyncIterator[bytes]:
        nonlocal queued
        task = asyncio.get_running_loop().create_task(work())
        try:
            while (event := await events.get()) is not None:
                if event.startswith(b"event: output"):
                    queued -= len(event)
                yield event
        finally:
            if cancel_on_disconnect and not task.done():
                task.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects. Once the request's body is read, the server's
    next message on it is the disconnect, so waiting for it costs nothing while it stays."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; ended (cancelled) if the client disconnects first.

    Once the request's body is read, the server's next message on it is the
    disconnect, so waiting for it costs nothing while the client stays.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client went away (or this handler was cancelled): the run ends
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected("the client disconnected: the run was ended")
    return task.result()


async def run_while_connected(
    request: Request,
    start_now: Callable[[Callable[[Any], None]], Callable[[], None] | None],
    awaited: Callable[[], Awaitable[T]],
) -> T:
    """A run started by ``start_now`` (the controller's callback path: its outcome is handed
    to ``done`` in the loop turn the agent answers, so this handler wakes once), ended if
    the client disconnects first. When it cannot start now, ``awaited()`` answers instead
    (for the HTTP door: "busy" at once)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[Any] = loop.create_future()

    def done(answer: Any) -> None:
        if not outcome.done():
            outcome.set_result(answer)

    abandon = start_now(done)
    if abandon is None:
        return await until_disconnect(request, awaited())
    ended = abandon

    async def gone() -> None:
        await _disconnect(request)
        ended()  # the client went away first: its run ends now
        if not outcome.done():
            outcome.set_exception(ClientDisconnected("the client disconnected: the run was ended"))

    watcher = loop.create_task(gone())
    try:
        answer = await outcome
    except asyncio.CancelledError:
        ended()
        raise
    finally:
        watcher.cancel()
    if isinstance(answer, Exception):
        raise answer
    result: T = answer
    return result
