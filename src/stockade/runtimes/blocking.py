"""``run_blocking``: a coroutine of the async agent channel, run to its end for a blocking caller.

The sync ``Sandbox``, the CLI, components and the runtimes' own start-up
calls are blocking code over the one async channel (``channel.py``). Each
thread that makes such a call gets an event loop of its own, made on its
first call and kept for the next (a loop costs an epoll set and a self-pipe:
too much to make per call on the warm path), closed when the thread ends.
A thread whose own loop is running already (a notebook, a blocking call made
from async code) cannot run a second one: its call runs on a short-lived
helper thread, and the caller waits for it, as it asked to.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from . import agent_waits
from .channel import BLOCKING_CALLER

T = TypeVar("T")


class _OwnLoop:
    """A thread's private event loop, closed with the thread's locals."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        if not self.loop.is_closed() and not self.loop.is_running():
            agent_waits.forget(self.loop)
            self.loop.close()


class _ThreadLoops(threading.local):
    own: _OwnLoop | None = None


_loops = _ThreadLoops()


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """``coroutine``'s result (or its exception), waited for in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_a_loop = False
    else:
        in_a_loop = True
    # Run outside the except block: an error of the call would be chained to "no running event loop".
    return _run_on_helper(coroutine) if in_a_loop else _run_here(coroutine)


def _run_here(coroutine: Coroutine[Any, Any, T]) -> T:
    own = _loops.own
    if own is None or own.loop.is_closed():
        own = _loops.own = _OwnLoop()
    context = contextvars.copy_context()
    context.run(BLOCKING_CALLER.set, True)
    task = own.loop.create_task(coroutine, context=context)
    try:
        return own.loop.run_until_complete(task)
    except BaseException:
        # Ctrl-C (or any exception raised out of the loop) left the call pending: cancel it,
        # so that it lets go of the agent's channel before this returns.
        if not task.done():
            task.cancel()
            try:
                own.loop.run_until_complete(task)
            except BaseException:  # noqa: BLE001, S110 - the first exception is the one to raise
                pass
        raise


def _run_on_helper(coroutine: Coroutine[Any, Any, T]) -> T:
    outcome: list[Any] = []
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[T]]] = []

    async def tracked() -> T:
        task = asyncio.current_task()
        assert task is not None
        running.append((asyncio.get_running_loop(), task))  # type: ignore[arg-type]
        return await coroutine

    def run() -> None:
        try:
            outcome.append((True, _run_here(tracked())))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append((False, exc))

    helper = threading.Thread(target=run, name="stockade-blocking-call", daemon=True)
    helper.start()
    try:
        helper.join()
    except BaseException:
        # Ctrl-C in the caller's thread: the call is given up as in a caller of its own loop
        # (cancelled, the isolate ended), not left running behind the caller's back.
        for loop, task in running:
            loop.call_soon_threadsafe(task.cancel)
        helper.join()
        raise
    ok, value = outcome[0]
    if ok:
        return cast(T, value)
    raise value
