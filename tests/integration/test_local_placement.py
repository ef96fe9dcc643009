"""The ``local`` placement: isolates of this host's runtimes behind the placement seam."""

from __future__ import annotations

import asyncio

from stockade.placement import one_shot, open_placement
from stockade.policy import Policy


def test_acquire_run_release_on_this_host(process_runtime: str) -> None:
    async def body() -> None:
        placement = open_placement("local")
        try:
            described = await placement.connect()  # the default runtime started, its pool filling
            assert (described["type"], described["runtimes"]) == ("local", ["process"])
            assert any(r["name"] == "process" and r["available"] for r in await placement.runtimes())
            isolate = await placement.acquire(Policy())
            assert (isolate.node, isolate.runtime_name) == ("local", "process")
            await isolate.awrite_file("/work/x.py", "print(6 * 7)")
            result = await isolate.aexec(["python3", "/work/x.py"])
            assert (result.termination_reason, result.stdout) == ("completed", "42\n")
            assert await isolate.aread_file("/work/x.py") == b"print(6 * 7)"
            await placement.release(isolate)
            await placement.release(isolate)  # idempotent
            pieces: list[bytes] = []
            result = await one_shot(
                placement, Policy(), code="print('a')", on_output=lambda _stream, data: pieces.append(data)
            )
            assert (result.stdout, b"".join(pieces)) == ("a\n", b"a\n")
        finally:
            await placement.aclose()

    asyncio.run(body())
