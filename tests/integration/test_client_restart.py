"""A client across its daemon's restarts: real daemons, killed and started again on one socket.

- A restart between two calls of one client is not noticed: the second call
  goes on a new connection (even with retries off), and a held sandbox of the
  old daemon is reported lost, naming both daemon instances.
- An ``execute`` whose daemon dies while it runs is not sent again: the
  command appends a line to a host file through a writable mount, so the
  file counts its runs. With ``Retry(resend_unsafe=True)`` it is sent again,
  to the restarted daemon, and runs there.
- A daemon that stays away is given up on after the configured attempts.

The ``process`` runtime; no timing assertions, only generous bounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade import Policy
from stockade.client import AnswerLostError, AsyncClient, Client, RemoteSandbox, Retry, SandboxLostError
from stockade.errors import DaemonUnavailableError, NotFoundError
from stockade.result import ExecResult
from tests.daemon_harness import Daemon, start_daemon

# Long enough for a daemon to start again on a loaded host (it warms its runtime first): ~2 min.
UNTIL_IT_IS_BACK = Retry(attempts=100, backoff_s=0.5, max_backoff_s=1.2)


@pytest.fixture
def first(process_runtime: str) -> Daemon:
    return start_daemon()  # stopped by each test (or by conftest's cleanup)


@pytest.fixture
def share() -> Iterator[str]:
    """A host directory a sandbox may write to (mounted at /out): where runs leave their mark."""
    path = tempfile.mkdtemp(prefix="stockade-runs-")
    os.chmod(path, 0o777)
    with open(os.path.join(path, "runs"), "w"):
        pass
    os.chmod(os.path.join(path, "runs"), 0o666)  # each isolate runs as a uid of its own
    yield path
    shutil.rmtree(path, ignore_errors=True)


def restart(daemon: Daemon, sig: int) -> Daemon:
    """Stop ``daemon`` (SIGKILL: a crash; SIGTERM: a clean stop) and start another on its socket."""
    daemon.stop(sig)
    return start_daemon(socket_path=daemon.socket_path)


def runs(share: str) -> int:
    with open(os.path.join(share, "runs")) as f:
        return len(f.read().splitlines())


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.02)


def counted_run(share: str, marker: str) -> dict[str, Any]:
    """An execute that appends a line to the host's ``runs`` file, then waits for its daemon to
    die (a sleep with ``marker``) while it is the first run; a later run prints ``again``."""
    script = f"echo ran >> /out/runs; [ $(wc -l < /out/runs) -ge 2 ] && echo again || exec sleep {marker}"
    return {"command": ["sh", "-c", script], "policy": {"filesystem_access": [f"{share}:/out:rw"]}}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "clean-stop"])
def test_a_restart_between_two_calls_is_not_noticed_but_its_sandboxes_are_lost(first: Daemon, sig: int) -> None:
    with Client(first.socket_path, retry=None) as client:  # no retries: the restart is over by the next call
        old = client.status()["instance_id"]
        kept = client.create_sandbox(keep=True, memory_mb=256)
        # Another process of the same user takes it up by its id, as E2B's Sandbox.connect does.
        code = ("import sys\nfrom stockade.client import Client\nwith Client(sys.argv[1]) as c:\n"
                "    sb = c.connect_sandbox(sys.argv[2])\n    sb.write_file('/work/x', 'from the other')\n"
                "    print(sb.memory_mb, sb.runtime, sb.policy_digest)")  # fmt: skip
        other = subprocess.run([sys.executable, "-c", code, first.socket_path, kept], capture_output=True, text=True,
                               timeout=120)  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert other.stdout == f"256 process {Policy(memory_mb=256).digest}\n"
        assert client.connect_sandbox(kept).read_file("/work/x") == b"from the other"
        with pytest.raises(NotFoundError, match="no sandbox 'sb-nope'"):
            client.connect_sandbox("sb-nope")
        second = restart(first, sig)
        try:
            assert client.ping() == "pong"
            new = client.status()["instance_id"]
            assert new != old
            with pytest.raises(SandboxLostError) as caught:
                client.sandbox_exec(kept, ["true"])
            assert isinstance(caught.value, NotFoundError)
            assert str(caught.value) == (
                f"sandbox {kept!r} is not this daemon's: its id names daemon instance {old[:8]}, which is "
                f"not running (this daemon is instance {new}); a sandbox that instance made ended "
                "when it stopped"
            )
            with pytest.raises(SandboxLostError):
                client.sandbox_read_file(kept, "/work/x")
            with pytest.raises(SandboxLostError):
                client.connect_sandbox(kept)
            RemoteSandbox(client, kept).close()  # a handle on the lost one closes quietly
            assert client.execute(["echo", "after"]).stdout == "after\n"
        finally:
            assert second.stop() == 0, second.logs()


def test_an_execute_cut_off_by_its_daemons_death_is_not_sent_again(first: Daemon, share: str) -> None:
    marker = "4251.125"
    client = Client(first.socket_path, retry=UNTIL_IT_IS_BACK)
    outcome: list[ExecResult | BaseException] = []
    request = counted_run(share, marker)

    def run() -> None:
        try:
            outcome.append(client.execute(request["command"], policy=request["policy"]))
        except BaseException as exc:  # the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: runs(share) == 1, "the run started")
    first.stop(signal.SIGKILL)
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], AnswerLostError), outcome
    message = str(outcome[0])
    assert message.startswith(f"lost the connection to the stockade daemon at {first.socket_path} (")
    assert "after the execute request went out, before its answer: it may have run, so it was not sent again" in message
    second = start_daemon(socket_path=first.socket_path)
    try:
        assert client.ping() == "pong"  # the client itself is fine
        assert [s for s in client.status()["active_sandboxes"] if s["kind"] == "execute"] == []
        assert runs(share) == 1, "the execute was sent again"
    finally:
        client.close()
        assert second.stop() == 0, second.logs()
    assert re.search(r"uid=\d+ execute ", second.logs()) is None, "the restarted daemon ran an execute"


def test_an_execute_cut_off_is_sent_again_when_the_caller_allows_it(first: Daemon, share: str) -> None:
    marker = "4251.375"
    client = Client(first.socket_path, retry=dataclasses.replace(UNTIL_IT_IS_BACK, resend_unsafe=True))
    outcome: list[ExecResult | BaseException] = []
    request = counted_run(share, marker)

    def run() -> None:
        try:
            outcome.append(client.execute(request["command"], policy=request["policy"]))
        except BaseException as exc:  # the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: runs(share) == 1, "the run started")
    second = restart(first, signal.SIGKILL)  # the client tries again meanwhile, until this one listens
    try:
        thread.join(120)
        assert len(outcome) == 1 and isinstance(outcome[0], ExecResult), outcome
        assert outcome[0].stdout == "again\n", outcome[0].summary()
        assert runs(share) == 2  # once in each daemon
    finally:
        client.close()
        assert second.stop() == 0, second.logs()


def test_a_daemon_that_stays_away_is_given_up_on_after_the_attempts(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "gone.sock")
    with pytest.raises(DaemonUnavailableError) as caught:
        Client(path, retry=Retry(attempts=4, backoff_s=0.05)).execute(["true"])
    assert re.fullmatch(
        rf"cannot reach the stockade daemon at {re.escape(path)}: No such file or directory "
        r"\(gave up after 4 attempts over \d+\.\d s\)",
        str(caught.value),
    ), str(caught.value)


# ---- the same for AsyncClient -------------------------------------------------------------------


def test_async_restarts_lost_sandboxes_and_an_execute_not_sent_again(first: Daemon, share: str) -> None:
    marker = "4251.625"
    request = counted_run(share, marker)
    daemons = [first]

    async def scenario() -> None:
        async with AsyncClient(first.socket_path, retry=None) as client:
            old = (await client.status())["instance_id"]
            kept = await client.create_sandbox(keep=True)
            daemons.append(restart(first, signal.SIGTERM))
            assert await client.ping() == "pong"
            new = (await client.status())["instance_id"]
            with pytest.raises(SandboxLostError, match=rf"instance {old[:8]}, .*this daemon is instance {new}"):
                await client.sandbox_exec(kept, ["true"])
        async with AsyncClient(first.socket_path, retry=UNTIL_IT_IS_BACK) as client:
            running = asyncio.ensure_future(client.execute(request["command"], policy=request["policy"]))
            while runs(share) < 1:
                assert not running.done(), running
                await asyncio.sleep(0.02)
            daemons[-1].stop(signal.SIGKILL)
            with pytest.raises(AnswerLostError, match="after the execute request went out"):
                await asyncio.wait_for(running, 60)
            daemons.append(start_daemon(socket_path=first.socket_path))
            assert await client.ping() == "pong"
            assert runs(share) == 1, "the execute was sent again"

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        assert daemons[-1].stop() == 0, daemons[-1].logs()


def test_async_execute_sent_again_when_the_caller_allows_it(first: Daemon, share: str) -> None:
    marker = "4251.875"
    request = counted_run(share, marker)
    daemons = [first]

    async def scenario() -> ExecResult:
        retry = dataclasses.replace(UNTIL_IT_IS_BACK, resend_unsafe=True)
        async with AsyncClient(first.socket_path, retry=retry) as client:
            running = asyncio.ensure_future(client.execute(request["command"], policy=request["policy"]))
            while runs(share) < 1:
                assert not running.done(), running
                await asyncio.sleep(0.02)
            # The restart blocks this loop while it waits; the client tries again once it is back.
            daemons.append(restart(first, signal.SIGKILL))
            return await asyncio.wait_for(running, 120)

    try:
        result = asyncio.run(scenario())
        assert result.stdout == "again\n", result.summary()
        assert runs(share) == 2
    finally:
        assert daemons[-1].stop() == 0, daemons[-1].logs()
