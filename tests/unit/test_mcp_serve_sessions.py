"""`stockade mcp serve`'s sessions and their sandboxes, without a door: what it keeps per session."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.errors import DaemonBusyError, SandboxLostError
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


def test_a_sessions_calls_share_one_sandbox_after_a_make_that_failed() -> None:
    # The first call's make failed and its lock was forgotten while the call it woke held it: a
    # third call took a new lock and made a second sandbox beside the second call's.
    async def scenario() -> None:
        made: list[str] = []
        held: set[str] = set()
        go = [anyio.Event(), anyio.Event()]

        async def create(*args: Any) -> Any:
            n = len(made) + sum(1 for e in go if e.is_set())
            await go[min(n, 1)].wait()
            if not made and not go[1].is_set():
                raise DaemonBusyError("busy: no sandbox slot became free")
            sandbox_id = f"sb-{len(made) + 1}"
            made.append(sandbox_id)
            held.add(sandbox_id)
            return SimpleNamespace(sandbox_id=sandbox_id, runtime="fake")

        controller = SimpleNamespace(create=create, held=held, config=SimpleNamespace(sandbox_idle_timeout=None))
        tools = StockadeTools(controller, Policy())  # type: ignore[arg-type]
        got: list[str] = []

        async def call() -> None:
            try:
                got.append(await tools._sandbox("S"))
            except DaemonBusyError:
                got.append("busy")

        async def until(check: Any) -> None:
            with anyio.fail_after(10):
                while not check():
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as calls:
            calls.start_soon(call)  # its make waits, then fails
            await until(lambda: "S" in tools._making and tools._making["S"].locked())
            calls.start_soon(call)  # waits for the first's lock
            await until(lambda: tools._making["S"].statistics().tasks_waiting == 1)
            go[0].set()
            await until(lambda: got == ["busy"])
            calls.start_soon(call)  # after the failure, while the second call holds the lock
            await anyio.sleep(0.05)
            go[1].set()
        assert got[0] == "busy" and got[1:] == ["sb-1", "sb-1"] and made == ["sb-1"], (got, made)

    anyio.run(scenario)


def test_a_sandbox_made_for_a_session_that_ended_meanwhile_is_closed() -> None:
    # A DELETE that came while the session's first call made its sandbox: the sandbox, made after,
    # was kept for a session that was gone, and nothing ever closed it.
    async def scenario() -> None:
        held: set[str] = set()
        closed: list[str] = []
        started, release = anyio.Event(), anyio.Event()

        async def create(*args: Any) -> Any:
            started.set()
            await release.wait()
            held.add("sb-1")
            return SimpleNamespace(sandbox_id="sb-1", runtime="fake")

        async def close_sandbox(ref: Any, caller: Any) -> None:
            closed.append(ref.sandbox_id)
            held.discard(ref.sandbox_id)

        controller = SimpleNamespace(create=create, close_sandbox=close_sandbox, held=held,
                                     config=SimpleNamespace(sandbox_idle_timeout=None))  # fmt: skip
        tools = StockadeTools(controller, Policy())  # type: ignore[arg-type]
        said: list[BaseException] = []

        async def first_call() -> None:
            try:
                await tools._sandbox("S")
            except SandboxLostError as exc:
                said.append(exc)

        async with anyio.create_task_group() as calls:
            calls.start_soon(first_call)
            await started.wait()
            calls.start_soon(first_call)  # a second call, waiting for the first's lock
            with anyio.fail_after(10):
                while tools._making["S"].statistics().tasks_waiting == 0:
                    await anyio.sleep(0.01)
            await tools.end_session("S")  # the client's DELETE, while the make is under way
            release.set()
        assert closed == ["sb-1"] and held == set() and tools._sandboxes == {}, (closed, held)
        assert sorted(str(e) for e in said) == [
            "this MCP session ended while its sandbox was being made",
            "this MCP session ended while this call waited for its sandbox",  # it made none after
        ], said

    anyio.run(scenario)


def test_an_argument_of_the_wrong_kind_is_said_as_the_daemons_doors_say_it() -> None:
    # pydantic's own report reached the agent: "1 validation error for SandboxExec ... For further
    # information visit https://errors.pydantic.dev/...".
    from mcp import types

    async def scenario() -> types.CallToolResult:
        async def create(*args: Any) -> Any:
            return SimpleNamespace(sandbox_id="sb-1", runtime="fake")

        async def sandbox_run(*args: Any) -> Any:
            raise AssertionError("a request its model refused was run")

        controller = SimpleNamespace(create=create, held={"sb-1"}, sandbox_run=sandbox_run,
                                     config=SimpleNamespace(sandbox_idle_timeout=None))  # fmt: skip
        tools = StockadeTools(controller, Policy())  # type: ignore[arg-type]
        params = types.CallToolRequestParams(name="exec", arguments={"command": "ls -l"})
        return await tools.call_tool(SimpleNamespace(request=None), params)

    answer = anyio.run(scenario)
    (said,) = answer.content
    assert answer.is_error and said.text.startswith("exec: invalid arguments: command: Input should be a valid list")
    assert "pydantic" not in said.text and "validation error for" not in said.text, said.text


def test_over_http_a_sessions_sandbox_idles_out_with_it_even_where_sandboxes_never_do() -> None:
    # The SDK ends a session left idle (30 minutes where sandboxes never idle out) and tells no one:
    # the session's sandbox stayed until the door stopped.
    from stockade.mcp.http import SESSION_IDLE_S
    from stockade.mcp.serve import sessions_config

    never = DaemonConfig(pool_size=0, sandbox_idle_timeout=None)
    assert sessions_config(never, http=True).sandbox_idle_timeout == SESSION_IDLE_S
    assert sessions_config(DaemonConfig(sandbox_idle_timeout=120.0), http=True).sandbox_idle_timeout == 120.0
    # On stdio one client holds the one session: its sandbox lasts as long as it does.
    assert sessions_config(DaemonConfig(sandbox_idle_timeout=120.0), http=False).sandbox_idle_timeout is None
