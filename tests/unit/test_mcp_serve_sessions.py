"""`stockade mcp serve`'s sessions and their sandboxes, without a door: what it keeps per session."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.errors import DaemonBusyError
from stockade.mcp.serve import StockadeTools
from stockade.policy import Policy


def test_a_session_whose_sandbox_could_not_be_made_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its lock was kept for the life of the door: sessions that never got a sandbox (the host busy)
    # and then ended idle grew it by one each.
    async def scenario() -> None:
        controller = Controller(DaemonConfig(pool_size=0))

        async def busy(*args: Any) -> Any:
            raise DaemonBusyError("busy: no sandbox slot became free")

        monkeypatch.setattr(controller, "create", busy)
        tools = StockadeTools(controller, Policy())
        try:
            for n in range(50):
                with pytest.raises(DaemonBusyError):  # answered to its client as an error result
                    await tools._call(f"session-{n}", "exec", {"command": ["true"]})
            assert tools._making == {} and tools._sandboxes == {}
        finally:
            await controller.shutdown(0.0)

    anyio.run(scenario)
