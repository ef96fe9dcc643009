"""What reading an MCP server's stdout may cost this host: bytes that end no message included."""

from __future__ import annotations

import time

import anyio
import pytest

from stockade.mcp import transport
from stockade.mcp.transport import ReadBudget, ServerOutput, process_transport


class Trickle:
    """A server's process, as the transport sees it, that wrote 1 MiB without a line's end and
    then a byte at a time, for ever (a kept server may, with no call in flight to time out)."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self.dropped = {"stdout": 0, "stderr": 0}
        self.reads = 0

    def read(self) -> tuple[bytes, bytes]:
        self.reads += 1
        return (b"x" * (1 << 20) if self.reads == 1 else b"x"), b""

    def wait(self, timeout: float | None = None) -> int | None:
        time.sleep(timeout or 0)
        return None

    def write(self, data: bytes) -> None:
        pass


def test_a_line_that_never_ends_pays_for_its_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only whole messages were charged to the parse budget: a server that kept a line open and
    # added to it kept the reader searching it (the whole of it, each time) and asking for more
    # without a pause, most of a host core for as long as it was kept. Now every read that ends no
    # message is charged too, so a budget of 0.2 ms cuts it off at once.
    monkeypatch.setattr(transport, "MAX_PARSE_CPU_PER_S", 1e-5)
    monkeypatch.setattr(transport, "MAX_PARSE_CPU_BURST", 2e-4)
    process, output = Trickle(), ServerOutput()

    async def go() -> None:
        async with process_transport(process, output, ReadBudget()) as (read, _write):  # type: ignore[arg-type]
            with anyio.fail_after(60):
                async for message in read:
                    raise AssertionError(f"no message was written, yet {message!r} was read")

    anyio.run(go)
    assert output.broken is not None and "of a core of this host's to read" in output.broken, output.broken
