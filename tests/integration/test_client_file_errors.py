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
            (lambda: sb.write_file("/tmp/missing/x", "x"), FileNotFoundError, errno.ENOENT, "/tmp/missing/x"),
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
        # read_file refuses a directory (it opens only regular files) and says EISDIR; a FIFO
        # is refused with no errno to name.
        with pytest.raises(IsADirectoryError, match="not a regular file"):
            sb.read_file("/tmp")
        sb.exec(["mkfifo", "/tmp/fifo"])
        with pytest.raises(AgentError, match="not a regular file") as refused:
            sb.read_file("/tmp/fifo")
        assert not isinstance(refused.value, OSError)
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
