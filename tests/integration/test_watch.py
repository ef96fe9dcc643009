"""``Sandbox.watch``: file events from inside a sandbox, on every runtime, in the SDK and through
the daemon; the host reading the watcher's output as the sandbox's own, bounded words."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from stockade import AsyncSandbox, FileEvent, Policy, Sandbox
from stockade.client import AsyncClient, Client
from stockade.errors import PathNotFoundError
from stockade.runtimes.manager import RuntimeManager
from stockade.watch import MAX_LINE, FileWatch, _Lines, watched_path
from tests.conftest import require
from tests.daemon_harness import Daemon, start_daemon

MADE = "mkdir -p /work/out/a/b && echo hi > /work/out/a/b/f"
# Once f is said: b's watch is set by then (f was seen in b, or found as the watch was set).
CHANGED = "echo more >> /work/out/a/b/f && mv /work/out/a/b/f /work/out/g && chmod 600 /work/out/g && rm /work/out/g"


def _collect(watch: FileWatch, until: FileEvent, timeout: float = 30) -> list[FileEvent]:
    """The events up to and including ``until`` (waiting at most ``timeout`` s for it)."""
    seen: list[FileEvent] = []
    for _ in range(int(timeout / 0.5)):
        seen += watch.events(timeout=0.5)
        if until in seen:
            return seen
    raise AssertionError(f"{until} never came; seen: {seen}")


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_recursive_watch_sees_a_tree_made_written_moved_and_removed(runtime: str, manager: RuntimeManager) -> None:
    require(runtime)
    with Sandbox(Policy(runtime=runtime, timeout_seconds=60), manager=manager) as sb:
        sb.exec(["mkdir", "-p", "/work/out"])
        with sb.watch("/work/out", recursive=True) as watch:
            assert sb.exec(["sh", "-c", MADE]).exit_code == 0
            seen = _collect(watch, FileEvent("created", "/work/out/a/b/f", False))
            assert sb.exec(["sh", "-c", CHANGED]).exit_code == 0
            seen += _collect(watch, FileEvent("deleted", "/work/out/g", False))
            kinds = [(e.kind, e.path, e.is_dir) for e in seen]
            # What was made before the new directory's watch was set is said as it is found (what its
            # parent's watch saw made meanwhile may be said again, by that watch: add_tree).
            first_f = kinds.index(("created", "/work/out/a/b/f", False))
            assert list(dict.fromkeys(kinds[: first_f + 1])) == [
                ("created", "/work/out/a", True),
                ("created", "/work/out/a/b", True),
                ("created", "/work/out/a/b/f", False),
            ], kinds
            # The append came after b's watch was set (the first write too, on a slower runtime):
            # written and closed, then the rest in order.
            last_write = max(i for i, k in enumerate(kinds) if k == ("modified", "/work/out/a/b/f", False))
            assert kinds[last_write + 1 :] == [
                ("closed_write", "/work/out/a/b/f", False),
                ("moved_from", "/work/out/a/b/f", False),
                ("moved_to", "/work/out/g", False),
                ("attrib", "/work/out/g", False),
                ("deleted", "/work/out/g", False),
            ], kinds
            assert watch.lost == 0
            handle = [p for p in sb.processes() if p["argv"][:4] == ["python3", "-I", "-S", "-"]]
            assert len(handle) == 1 and handle[0]["running"], sb.processes()
        # The block's end killed the watcher.
        assert not [p for p in sb.processes() if p["argv"][:4] == ["python3", "-I", "-S", "-"] and p["running"]]


def test_the_same_event_again_later_is_said_again(process_runtime: str, manager: RuntimeManager) -> None:
    """Found by review: the watcher said no line the same as the one before, however far apart, so
    a file written again was never said closed_write again (nor a name created again)."""
    with Sandbox(Policy(runtime=process_runtime), manager=manager) as sb:
        sb.exec(["mkdir", "/work/again"])
        with sb.watch("/work/again", events=["closed_write"]) as watch:
            for text in ("a", "b", "c"):
                sb.exec(["sh", "-c", f"echo {text} > /work/again/f"])
                assert watch.events(timeout=10) == [FileEvent("closed_write", "/work/again/f", False)]


def test_a_plain_watch_sees_its_directory_only_and_the_kinds_asked_for(
    process_runtime: str, manager: RuntimeManager
) -> None:
    with Sandbox(Policy(runtime=process_runtime), manager=manager) as sb:
        sb.exec(["mkdir", "-p", "/work/d/sub"])
        # Named loosely, it is watched in its plain form: its events are below it as the host checks them.
        with sb.watch("/work//d/", events=["created", "deleted"]) as watch:
            assert watch.path == "/work/d"
            sb.exec(["sh", "-c", "echo x > /work/d/sub/inner; echo y > /work/d/top; rm /work/d/top"])
            seen = _collect(watch, FileEvent("deleted", "/work/d/top", False))
            assert seen == [FileEvent("created", "/work/d/top", False), FileEvent("deleted", "/work/d/top", False)]


def test_a_watch_on_a_file_and_the_end_of_its_path(process_runtime: str, manager: RuntimeManager) -> None:
    with Sandbox(Policy(runtime=process_runtime), manager=manager) as sb:
        sb.write_file("/work/log", "start\n")
        watch = sb.watch("/work/log", events="closed_write")
        sb.exec(["sh", "-c", "echo more >> /work/log"])
        assert _collect(watch, FileEvent("closed_write", "/work/log", False))
        sb.exec(["rm", "/work/log"])
        # Its path gone, the watch says so (whatever kinds were asked for) and ends: iteration stops.
        assert list(watch) == [FileEvent("deleted", "/work/log", False)]
        assert not watch.running
        sb.exec(["mkdir", "/work/gone"])
        with sb.watch("/work/gone", recursive=True) as tree:
            sb.exec(["mv", "/work/gone", "/work/elsewhere"])
            assert list(tree) == [FileEvent("moved_from", "/work/gone", True)]


def test_what_cannot_be_watched_is_refused_by_name(process_runtime: str, manager: RuntimeManager) -> None:
    with Sandbox(Policy(runtime=process_runtime), manager=manager) as sb:
        with pytest.raises(PathNotFoundError, match="/work/nothing: No such file or directory") as raised:
            sb.watch("/work/nothing")
        assert raised.value.filename == "/work/nothing"
        sb.exec(["sh", "-c", "mkdir /work/closed && chmod 000 /work/closed"])
        with pytest.raises(PermissionError, match="/work/closed: Permission denied"):
            sb.watch("/work/closed")
        with pytest.raises(ValueError, match="absolute path inside the sandbox, not 'work'"):
            sb.watch("work")
        with pytest.raises(ValueError, match=r"events must name some of created, .*not \['made'\]"):
            sb.watch("/work", events=["made"])
        # None of them left a watcher behind.
        assert not [p for p in sb.processes() if p["running"]]


def test_a_flood_of_events_nobody_reads_is_reported_lost_not_held(
    process_runtime: str, manager: RuntimeManager
) -> None:
    """More events than the kernel queues (16384) and than the agent keeps unread (1 MiB): the
    watch says it lost some instead of growing anything, and goes on."""
    with Sandbox(Policy(runtime=process_runtime, timeout_seconds=120), manager=manager) as sb:
        sb.exec(["mkdir", "/work/flood"])
        with sb.watch("/work/flood") as watch:
            name = "n" * 200
            make = f"import os\nfor i in range(20000): open(f'/work/flood/{name}{{i}}', 'w').close()"
            assert sb.run_code(make).exit_code == 0
            events: list[FileEvent] = []
            deadline = time.monotonic() + 60  # the watcher may lag the run on a loaded host
            while watch.lost == 0 and not any(e.kind == "lost" for e in events) and time.monotonic() < deadline:
                events += watch.events(timeout=0.5)
            assert watch.lost > 0 or any(e.kind == "lost" for e in events), len(events)
            assert len(events) < 20000 * 2
            sb.exec(["touch", "/work/flood/after"])
            assert _collect(watch, FileEvent("closed_write", "/work/flood/after", False))


def test_the_host_reads_the_watchers_output_as_untrusted_lines() -> None:
    deep = _Lines("/w")
    deep.feed(b"[" * 100_000 + b"\n")  # nested past the parser's depth: lost, not a RecursionError
    assert deep.lost == 1
    early = _Lines("/w")  # no real watcher says an event before it is ready: none is kept
    early.feed(b'{"kind": "created", "path": "/w/a", "dir": false}\n' * 1000)
    assert early.take() == [] and early.lost == 1000
    lines = _Lines("/w")
    lines.feed(b'{"ready": 1}\n{"kind": "created", "path": "/w/a", "dir": false}\n')
    lines.feed(b'not json\n{"kind": "exploded", "path": "/w/b", "dir": false}\n[1]\n')
    lines.feed(b'{"kind": "deleted", "path": 7, "dir": false}\n{"kind": "deleted", "path": "/w/a", "dir": "no"}\n')
    lines.feed(b"x" * (MAX_LINE + 10))  # a line without end past the bound: dropped, not kept
    assert len(lines.pending) == 0
    lines.feed(b'tail\n{"kind": "moved_to", "path": "/w/c", "dir": true}\n')
    assert lines.ready
    assert lines.take() == [FileEvent("created", "/w/a", False), FileEvent("moved_to", "/w/c", True)]
    assert lines.lost == 7  # not json, unknown kind, a list, a bad path, a bad dir, the long line, its tail
    lines.feed_read(b'{"kind": "created", "path": "/w/d"', b"", {"stdout": 100})  # the agent dropped some
    lines.feed_read(b', "dir": false}\n', b"", {"stdout": 100})
    assert lines.take() == [FileEvent("created", "/w/d", False)] and lines.lost == 8
    # The sandbox's code may write the watcher's stdout (its uid): an event outside the watched path,
    # or named another way than the watcher names one, is not kept (a caller copying by it followed "..").
    forged = _Lines("/w/")
    forged.feed(b'{"ready": 1}\n')
    for path in ("/etc/passwd", "../../host/x", "/w/../etc", "/w//x", "/wx", "w/x", "/w/./x", "/w/a\0b"):
        forged.feed(json.dumps({"kind": "deleted", "path": path, "dir": False}).encode() + b"\n")
    assert forged.take() == [] and forged.lost == 8  # no name holds a NUL
    for path in ("/w/", "/w", "/w/a b\nc", "/w/d/e"):  # the root as given or named, and names of any bytes
        forged.feed(json.dumps({"kind": "lost", "path": path, "dir": True}).encode() + b"\n")
    assert [e.path for e in forged.take()] == ["/w/", "/w", "/w/a b\nc", "/w/d/e"]
    root = _Lines("/")  # a watch of "/": what is below it is named with one "/" first
    root.feed(b'{"ready": 1}\n{"kind": "created", "path": "//x", "dir": false}\n')
    root.feed(b'{"kind": "created", "path": "/x", "dir": false}\n')
    assert [e.path for e in root.take()] == ["/x"] and root.lost == 1
    # A path given with a leading "//" (POSIX keeps one apart) is watched, and named, as "/".
    assert watched_path("//w/d/") == "/w/d" and watched_path("///w") == "/w"
    with pytest.raises(ValueError, match="absolute path"):
        watched_path("/w/a\0b")


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    started = start_daemon()
    yield started
    assert started.stop() == 0, started.logs()


def test_watches_through_the_daemon_and_awaited(daemon: Daemon, manager: RuntimeManager, process_runtime: str) -> None:
    with Client(daemon.socket_path) as client, client.sandbox() as sb:
        sb.exec(["mkdir", "/work/in"])
        with sb.watch("/work/in") as watch:
            sb.exec(["touch", "/work/in/x"])
            assert _collect(watch, FileEvent("closed_write", "/work/in/x", False))[0] == FileEvent(
                "created", "/work/in/x", False
            )

    async def awaited() -> None:
        async with AsyncClient(daemon.socket_path) as client, client.sandbox() as remote:
            await remote.exec(["mkdir", "/work/in"])
            async with await remote.watch("/work/in", events=["created"]) as watch:
                await remote.exec(["touch", "/work/in/y"])
                async for event in watch:
                    assert event == FileEvent("created", "/work/in/y", False)
                    break
        async with AsyncSandbox(Policy(runtime=process_runtime), manager=manager) as local:
            await local.exec(["mkdir", "/work/in"])
            watch = await local.watch("/work/in", events=["created"])
            await local.exec(["touch", "/work/in/z"])
            assert await watch.events(timeout=10) == [FileEvent("created", "/work/in/z", False)]
            await watch.stop()
            assert await watch.events() == []

    asyncio.run(awaited())
