"""The daemon's sandbox slots: a free one at once, a bounded first-come queue, a share per uid."""

from __future__ import annotations

import asyncio

import pytest

from stockade.daemon.slots import Slots
from stockade.errors import DaemonBusyError


def test_free_slots_are_taken_at_once_and_given_back() -> None:
    slots = Slots(2, None, queue_limit=4, queue_timeout_s=1)
    assert slots.take_now(1000) and slots.take_now(1001)
    assert not slots.take_now(1000)  # none left
    assert slots.held == {1000: 1, 1001: 1} and slots.free == 0
    slots.release(1000)
    assert slots.held == {1001: 1} and slots.free == 1  # a uid holding none is not listed
    assert slots.take_now(1002)


def test_a_uid_gets_no_more_than_its_share() -> None:
    slots = Slots(4, 2, queue_limit=4, queue_timeout_s=1)
    assert slots.take_now(1000) and slots.take_now(1000)
    assert not slots.take_now(1000)  # its share, with slots still free
    assert slots.take_now(1001)

    async def scenario() -> None:
        with pytest.raises(DaemonBusyError, match=r"busy: 1000 already has 2 .*STOCKADE_MAX_SANDBOXES_PER_UID"):
            await slots.take(1000)  # refused at once, not queued
        assert slots.waiting == 0

    asyncio.run(scenario())


def test_waiters_are_served_in_order_and_never_overtaken() -> None:
    async def scenario() -> list[int]:
        slots = Slots(1, None, queue_limit=4, queue_timeout_s=5)
        assert slots.take_now(1)
        served: list[int] = []

        async def wait(uid: int) -> None:
            await slots.take(uid)
            served.append(uid)

        tasks = [asyncio.create_task(wait(uid)) for uid in (2, 3)]
        await asyncio.sleep(0.01)
        assert slots.waiting == 2
        slots.release(1)
        # Handed to the first waiter: a request arriving now must not jump the queue.
        assert not slots.take_now(9)
        await asyncio.sleep(0.01)
        slots.release(2)
        await asyncio.gather(*tasks)
        assert slots.held == {3: 1} and slots.free == 0 and slots.waiting == 0
        return served

    assert asyncio.run(scenario()) == [2, 3]


def test_the_queue_is_bounded_in_length_and_in_time() -> None:
    async def scenario() -> None:
        slots = Slots(1, None, queue_limit=1, queue_timeout_s=0.05)
        assert slots.take_now(1)
        first = asyncio.create_task(slots.take(2))
        await asyncio.sleep(0.01)
        with pytest.raises(DaemonBusyError, match="1 sandboxes are running and 1 requests are waiting"):
            await slots.take(3)
        with pytest.raises(DaemonBusyError, match=r"no sandbox slot became free within 0\.05 s"):
            await first
        assert slots.waiting == 0
        slots.release(1)
        assert slots.free == 1 and slots.held == {}  # the timed-out waiter took nothing

    asyncio.run(scenario())


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def scenario() -> None:
        slots = Slots(1, None, queue_limit=4, queue_timeout_s=5)
        assert slots.take_now(1)
        cancelled = asyncio.create_task(slots.take(2))
        after = asyncio.create_task(slots.take(3))
        await asyncio.sleep(0.01)
        slots.release(1)  # the slot goes to uid 2's waiter...
        cancelled.cancel()  # ...whose task is cancelled before it runs again
        try:
            await cancelled
        except asyncio.CancelledError:
            pass  # it passed the slot on
        else:  # Python 3.11's wait_for keeps a result that came with the cancellation
            assert slots.held == {2: 1}
            slots.release(2)
        await asyncio.wait_for(after, 1)  # either way the slot reaches the next waiter, never lost
        assert slots.held == {3: 1} and slots.free == 0
        slots.release(3)
        assert slots.free == 1 and slots.held == {}

    asyncio.run(scenario())


def test_a_waiter_whose_uid_filled_its_share_meanwhile_passes_the_slot_on() -> None:
    async def scenario() -> None:
        slots = Slots(2, 1, queue_limit=4, queue_timeout_s=5)
        assert slots.take_now(1) and slots.take_now(2)
        # Two requests of uid 3, which may hold one slot: both wait, holding none yet.
        first, second = asyncio.create_task(slots.take(3)), asyncio.create_task(slots.take(3))
        await asyncio.sleep(0.01)
        slots.release(1)
        await asyncio.wait_for(first, 1)
        slots.release(2)  # handed to the second, which finds its uid's share taken meanwhile
        with pytest.raises(DaemonBusyError, match="busy: 3 already has 1"):
            await second
        assert slots.held == {3: 1} and slots.free == 1  # passed on: back in the count, as nobody else waits

    asyncio.run(scenario())
