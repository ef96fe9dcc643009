"""``AsyncClient`` against a real daemon: the same RPC, awaited, in order, and never a late answer taken for another."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from stockade import Policy
from stockade.client import AsyncClient, NotFoundError
from stockade.errors import AnswerLostError, AuthenticationError, DaemonUnavailableError
from tests.daemon_harness import TOKEN, Daemon, start_daemon


@pytest.fixture
def signed(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon({"STOCKADE_AUTH_TOKEN": TOKEN, "STOCKADE_MAX_REQUESTS": "10000"})
    yield d
    assert d.stop() == 0, d.logs()


def test_every_method_awaited(signed: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(signed.socket_path, auth_token=TOKEN) as client:
            assert await client.ping() == "pong"
            chunks: list[tuple[str, bytes]] = []
            r = await client.execute(
                ["sh", "-c", "echo out; echo err >&2; exit 3"], on_output=lambda s, d: chunks.append((s, d))
            )
            assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
            assert b"".join(d for s, d in chunks if s == "stdout") == b"out\n"
            assert (await client.execute(code="print(6 * 7)", stdin=b"")).stdout == "42\n"
            sandbox = await client.create_sandbox()
            await client.sandbox_write_file(sandbox, "/work/f.txt", b"kept")
            assert await client.sandbox_read_file(sandbox, "/work/f.txt") == b"kept"
            assert (await client.sandbox_exec(sandbox, ["cat", "/work/f.txt"])).stdout == "kept"
            assert (await client.sandbox_run_code(sandbox, "print(open('/work/f.txt').read())")).stdout == "kept\n"
            held = [s for s in (await client.status())["active_sandboxes"] if s["kind"] == "held"]
            assert [s["sandbox_id"] for s in held] == [sandbox]
            await client.close_sandbox(sandbox)
            with pytest.raises(NotFoundError):
                await client.sandbox_exec(sandbox, ["true"])
            assert any(r["name"] == "process" and r["available"] for r in await client.runtimes())

    asyncio.run(scenario())


def test_an_async_sandbox_handle(signed: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(signed.socket_path, auth_token=TOKEN) as client:
            async with client.sandbox(idle_timeout=60, memory_mb=256) as sb:
                # Described as the SDK's Sandbox is: its runtime, its policy's digest, where code may write.
                assert (sb.runtime, sb.policy_digest, sb.memory_mb) == ("process", Policy(memory_mb=256).digest, 256)
                assert sb.scratch_dir == "/tmp" and repr(sb) == f"AsyncRemoteSandbox({sb.sandbox_id!r})"
                await sb.write_file("/work/f.txt", b"kept")
                assert await sb.read_file("/work/f.txt") == b"kept"
                assert "f.txt" in [e["name"] for e in await sb.list_dir("/work")]
                assert (await sb.exec(["wc", "-c"], stdin=b"\x00\xff")).stdout.strip() == "2"
                assert (await sb.run_code("import os; print(os.environ['X'])", env={"X": "z"})).stdout == "z\n"
                assert [s["sandbox_id"] for s in (await client.status())["active_sandboxes"]] == [sb.sandbox_id]
            assert sb.closed and (await client.status())["total_count"] == 0
            with pytest.raises(NotFoundError):
                await client.sandbox_exec(sb.sandbox_id, ["true"])

    asyncio.run(scenario())


def test_calls_made_at_once_are_answered_each_with_its_own_result(signed: Daemon) -> None:
    async def scenario() -> list[str]:
        async with AsyncClient(signed.socket_path, auth_token=TOKEN) as client:
            runs = [client.execute(code=f"import time; time.sleep(0.{i}); print({i})") for i in range(5)]
            return [r.stdout for r in await asyncio.gather(*runs)]

    assert asyncio.run(scenario()) == [f"{i}\n" for i in range(5)]


def test_a_cancelled_or_timed_out_call_never_hands_its_answer_to_the_next(signed: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(signed.socket_path, auth_token=TOKEN) as client:
            slow = asyncio.ensure_future(client.execute(code="import time; time.sleep(1); print('late')"))
            await asyncio.sleep(0.3)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert (await client.execute(code="print('mine')")).stdout == "mine\n"
            # Sent and not answered: it may have run, so it is not sent again by itself.
            with pytest.raises(AnswerLostError, match=r"did not answer execute within 0\.3 s; it may have run"):
                await client.call("execute", {"code": "import time; time.sleep(2)"}, timeout=0.3)
            assert await client.ping() == "pong"

    asyncio.run(scenario())


def test_errors_map_as_for_the_blocking_client(signed: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(signed.socket_path, auth_token="0" * 64) as wrong:
            with pytest.raises(AuthenticationError):
                await wrong.ping()
        async with AsyncClient(signed.socket_path + ".nope") as gone:
            with pytest.raises(DaemonUnavailableError, match="cannot reach"):
                await gone.ping()

    asyncio.run(scenario())
    assert os.path.exists(signed.socket_path)


def test_both_clients_take_the_token_from_the_environment_as_the_cli_does(
    signed: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stockade.client import Client

    monkeypatch.setenv("STOCKADE_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("STOCKADE_SOCKET", signed.socket_path)
    with Client() as client:
        assert client.ping() == "pong"

    async def scenario() -> None:
        async with AsyncClient() as client:
            assert await client.ping() == "pong"

    asyncio.run(scenario())
    monkeypatch.delenv("STOCKADE_AUTH_TOKEN")
    with Client() as client, pytest.raises(AuthenticationError):
        client.ping()  # unsigned: refused
