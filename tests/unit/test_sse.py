"""Server-sent events: framing, UTF-8 split across chunks, a bounded queue, a run started with its stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from stockade.runtimes.verdict import OutputCallback
from stockade.server.sse import MAX_QUEUED_BYTES, event_stream


def _events(raw: bytes) -> list[tuple[str, Any]]:
    found = []
    for block in raw.decode().split("\n\n"):
        if block:
            event, data = block.split("\n")
            found.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return found


async def _drain(response: Any) -> bytes:
    return b"".join([chunk async for chunk in response.body_iterator])


def test_output_then_the_result_with_characters_split_across_chunks_kept_whole() -> None:
    async def run(out: OutputCallback) -> dict[str, str]:
        text = "é🙂".encode()
        out("stdout", text[:1])  # a character split across two chunks
        out("stdout", text[1:3])
        out("stdout", text[3:])
        out("stderr", b"warn\n")
        return {"done": "yes"}

    events = _events(asyncio.run(_drain(event_stream(run, json.dumps, cancel_on_disconnect=True))))
    stdout = "".join(d["text"] for k, d in events if k == "output" and d["stream"] == "stdout")
    assert stdout == "é🙂" and events[-1] == ("result", {"done": "yes"})
    assert ("output", {"stream": "stderr", "text": "warn\n"}) in events


def test_output_that_ends_in_the_middle_of_a_character_says_it_as_the_result_does() -> None:
    # The decoder held the last bytes for a next chunk that never came: the events lost them.
    async def run(out: OutputCallback) -> dict[str, str]:
        out("stdout", b"ok \xf0\x9f")  # half an emoji, and the end
        return {"done": "yes"}

    events = _events(asyncio.run(_drain(event_stream(run, json.dumps, cancel_on_disconnect=True))))
    stdout = "".join(d["text"] for k, d in events if k == "output" and d["stream"] == "stdout")
    assert stdout == "ok \ufffd" and events[-1] == ("result", {"done": "yes"})


def test_a_reader_that_falls_behind_skips_output_but_never_the_result() -> None:
    chunk = b"x" * 1_000_000

    async def run(out: OutputCallback) -> dict[str, int]:
        for _ in range(7):  # written before the reader takes any of it
            out("stdout", chunk)
        return {"bytes": 7 * len(chunk)}

    raw = asyncio.run(_drain(event_stream(run, json.dumps, cancel_on_disconnect=True)))
    events = _events(raw)
    streamed = sum(len(d["text"]) for k, d in events if k == "output")
    assert [k for k, _ in events][-2:] == ["skipped", "result"]
    assert streamed <= MAX_QUEUED_BYTES and streamed + events[-2][1]["bytes"] == 7 * len(chunk)


def test_errors_are_events_and_the_run_starts_only_with_the_stream() -> None:
    started: list[bool] = []

    async def run(out: OutputCallback) -> None:
        started.append(True)
        raise LookupError("not a stockade error")

    async def scenario() -> None:
        response = event_stream(run, json.dumps, cancel_on_disconnect=True)
        await asyncio.sleep(0.01)
        assert started == []  # a client gone before its stream began starts nothing
        events = _events(await _drain(response))
        assert events == [("error", {"error": "Internal error: LookupError", "code": "internal"})]

    asyncio.run(scenario())
