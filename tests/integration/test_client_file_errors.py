"""A held sandbox's file calls through a real daemon raise the stdlib's ``OSError`` classes.

The agent reports an OS error's errno; the daemon raises it as that errno's
``SandboxOSError`` and sends the errno beside the code; the clients raise the
same class, with ``errno`` and ``filename`` set, and the stockade tree intact
(``AgentError``; ``PathNotFoundError`` is a ``NotFoundError`` too).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator

import pytest

from stockade.client import AsyncClient, Client, NotFoundError
from stockade.errors import AgentError, PathNotFoundError, SandboxOSError
from tests.daemon_harness import Daemon, start_daemon


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon()
    yield d
    assert d.stop() == 0, d.logs()


def test_file_calls_raise_the_stdlib_class_of_their_errno(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client, client.sandbox() as sb:
        sb.write_file("/tmp/file", "x")
        cases = [
            (lambda: sb.read_file("/tmp/missing"), FileNotFoundError, errno.ENOENT, "/tmp/missing"),
            (lambda: sb.list_dir("/tmp/missing"), FileNotFoundError, errno.ENOENT, "/tmp/missing"),
            (lambda: sb.write_file("/tmp/file/x", "x"), NotADirectoryError, errno.ENOTDIR, "/tmp/file/x"),
            (lambda: sb.write_file("/tmp", "x"), IsADirectoryError, errno.EISDIR, "/tmp"),
            (lambda: sb.list_dir("/tmp/file"), NotADirectoryError, errno.ENOTDIR, "/tmp/file"),
            (lambda: sb.write_file("/proc/version", "x"), PermissionError, errno.EACCES, "/proc/version"),
        ]
        for call, stdlib, number, path in cases:
            with pytest.raises(stdlib) as caught:
                call()
            error = caught.value
            assert isinstance(error, SandboxOSError) and isinstance(error, AgentError), repr(error)
            assert (error.errno, error.filename) == (number, path)
            assert path in str(error)
            if number == errno.ENOENT:
                assert isinstance(error, PathNotFoundError) and isinstance(error, NotFoundError)
        # read_file refuses a directory (it opens only regular files) and says EISDIR; a FIFO,
        # which no errno names, EINVAL: an OSError either way, as every file call's failure.
        with pytest.raises(IsADirectoryError, match="not a regular file"):
            sb.read_file("/tmp")
        sb.exec(["mkfifo", "/tmp/fifo"])
        with pytest.raises(SandboxOSError, match="not a regular file") as refused:
            sb.read_file("/tmp/fifo")
        assert isinstance(refused.value, OSError) and refused.value.errno == errno.EINVAL
        assert sb.read_file("/tmp/file") == b"x"  # the sandbox is still in step


def test_async_file_calls_raise_the_same(daemon: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client, client.sandbox() as sb:
            with pytest.raises(FileNotFoundError) as missing:
                await sb.read_file("/tmp/missing")
            assert isinstance(missing.value, PathNotFoundError) and missing.value.filename == "/tmp/missing"
            with pytest.raises(IsADirectoryError):
                await sb.write_file("/tmp", b"x")
            with pytest.raises(NotADirectoryError):
                await sb.list_dir("/proc/version")

    asyncio.run(scenario())


def test_a_read_through_the_daemon_is_bounded_and_says_what_to_do_instead(daemon: Daemon) -> None:
    """One read_file answer is one line the daemon holds: at most 32 MiB, the same for both
    clients; a larger file is refused with its way out (download, or max_bytes)."""
    from stockade.daemon.held_calls import READ_FILE_MAX
    from stockade.errors import CallTooLargeError

    policy = {"disk_mb": 128, "max_file_size_bytes": 1 << 27, "memory_mb": 512}
    with Client(daemon.socket_path, timeout=120) as client, client.sandbox(policy) as sb:
        made = sb.exec(["sh", "-c", f"head -c {READ_FILE_MAX} /dev/urandom > /work/edge && "
                        f"head -c {READ_FILE_MAX + 1} /dev/zero > /work/over"])  # fmt: skip
        assert made.success, made.summary()
        edge = sb.read_file("/work/edge")
        assert len(edge) == READ_FILE_MAX and edge == sb.read_file("/work/edge")  # the same bytes, twice
        with pytest.raises(CallTooLargeError, match="larger than the 32 MiB one read_file answers through the daemon"):
            sb.read_file("/work/over")
        assert sb.read_file("/work/over", max_bytes=10) == b"\0" * 10
        assert sb.exec(["true"]).success  # the connection and the sandbox go on

        async def through_async() -> None:
            async with AsyncClient(daemon.socket_path, timeout=120) as other:
                assert len(await other.sandbox_read_file(sb.sandbox_id, "/work/edge")) == READ_FILE_MAX
                with pytest.raises(CallTooLargeError):
                    await other.sandbox_read_file(sb.sandbox_id, "/work/over")

        asyncio.run(through_async())
