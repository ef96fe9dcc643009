"""A spawn whose caller gives up, once or twice, leaves no process nobody holds."""

from __future__ import annotations

import asyncio

from stockade.runtimes.spawned import spawned_or_killed


def test_a_spawn_cancelled_twice_still_kills_what_it_started() -> None:
    started: list[str] = []
    killed: list[str] = []

    async def spawning() -> str:
        await asyncio.sleep(0.2)  # the start, under way when its caller gives up
        started.append("p1")
        return "p1"

    async def kill(handle: str) -> None:
        await asyncio.sleep(0.05)
        killed.append(handle)

    async def scenario() -> None:
        task = asyncio.ensure_future(spawned_or_killed(spawning(), kill))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # again, while it waits for the start to end
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("a cancelled spawn returned")

    asyncio.run(scenario())
    assert started == ["p1"] and killed == ["p1"]


def test_a_spawn_that_fails_to_start_has_nothing_to_kill() -> None:
    async def spawning() -> str:
        await asyncio.sleep(0.05)
        raise FileNotFoundError("no such program")

    async def kill(handle: str) -> None:
        raise AssertionError("nothing started")

    async def scenario() -> None:
        task = asyncio.ensure_future(spawned_or_killed(spawning(), kill))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return
        raise AssertionError("a cancelled spawn returned")

    asyncio.run(scenario())
