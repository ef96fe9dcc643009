"""An administrative act is on the audit record however it ends: done, refused, or cut off."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stockade.daemon.methods import METHODS
from stockade.errors import NotFoundError
from stockade.protocol.models import Caller
from stockade.rpc.methods import answer, read_request


class _Log:
    def __init__(self) -> None:
        self.acts: list[tuple[str, str, dict[str, Any]]] = []

    def admin(self, caller: Caller, action: str, target: str, **details: Any) -> None:
        self.acts.append((action, target, details))


class _Controller:
    def __init__(self, outcome: str) -> None:
        self.outcome, self.started = outcome, asyncio.Event()

    async def close_sandbox(self, request: Any, caller: Caller) -> dict[str, Any]:
        self.started.set()
        if self.outcome == "refused":
            raise NotFoundError("no sandbox 'sb-1'")
        if self.outcome == "cut off":
            await asyncio.sleep(3600)
        return {"closed": True}


@pytest.mark.parametrize(
    ("outcome", "details"),
    [("done", {}), ("refused", {"refused": "not_found"}), ("cut off", {"cancelled": True})],
)
def test_a_close_is_recorded_however_it_ends(outcome: str, details: dict[str, Any]) -> None:
    # A caller that went away mid-act (its task cancelled) left no record at all.
    method = METHODS["sandbox.close"]
    log, controller = _Log(), _Controller(outcome)
    caller = Caller(owner="uid 1000", door="socket")

    async def scenario() -> None:
        task = asyncio.create_task(
            answer(method, controller, read_request(method, {"sandbox_id": "sb-1"}), caller, None, log)
        )
        await controller.started.wait()
        if outcome == "cut off":
            task.cancel()
        if outcome == "done":
            await task
        else:
            with pytest.raises((asyncio.CancelledError, NotFoundError)):
                await task

    asyncio.run(scenario())
    assert log.acts == [("sandbox.close", "sb-1", details)]
