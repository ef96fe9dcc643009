"""Background processes of a daemon's held sandbox: ``RemoteSandbox.spawn`` → a ``Process``.

The SDK's ``Process`` (runtimes/spawned.py) through the daemon's ``sandbox.spawn`` and
``sandbox.process_*`` calls (``DaemonProcessCalls``); ``AsyncRemoteProcess`` has the
same methods, awaited.
Each call takes the sandbox's turn briefly; a wait is made of calls of at most
WAIT_SLICE_S, so that other calls on the sandbox are not held up for long.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

from ..limits import argv_list, check_call_size, signal_name, stdin_bytes
from ..protocol.models import (
    MAX_PROCESS_WAIT_S,
    ProcessKill,
    ProcessRef,
    ProcessWait,
    ProcessWrite,
    SandboxSpawn,
)
from ..runtimes.spawned import AwaitedFollow
from .requests import _build, _params, answered_bytes

if TYPE_CHECKING:
    from .async_client import AsyncClient
    from .sync_client import Client

WAIT_SLICE_S = 10.0


def spawn_params(
    sandbox_id: str, argv: list[str], stdin: bytes | str, env: dict[str, str] | None, cwd: str | None
) -> dict[str, Any]:
    raw = stdin_bytes(stdin)
    check_call_size("stdin", raw)
    fields = {"sandbox_id": sandbox_id, "command": argv_list(argv), "env": env, "cwd": cwd}
    if raw:
        fields["stdin_b64"] = base64.b64encode(raw).decode()
    return _params(_build(SandboxSpawn, "sandbox.spawn", **fields))


class DaemonProcessCalls:
    """The agent's ``proc_*`` calls, as the SDK's ``Process`` makes them, sent as the daemon's
    ``sandbox.process_*``: the same fields and answers, for one held sandbox. So a process
    in a daemon's sandbox is a ``Process`` (runtimes/spawned.py), with its methods."""

    _METHODS = {
        "proc_read": "sandbox.process_read",
        "proc_write": "sandbox.process_write",
        "proc_wait": "sandbox.process_wait",
        "proc_kill": "sandbox.process_kill",
    }

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self.client, self.sandbox_id = client, sandbox_id

    def proc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        name = self._METHODS[method]
        if method == "proc_wait":
            params = {**params, "timeout": min(float(params.get("timeout", 0.0)), MAX_PROCESS_WAIT_S)}
        # The Process's timeout assumes an agent's 30 s per call; the daemon's client has its own.
        wait = timeout - 30.0 + self.client.timeout if method == "proc_wait" else self.client.timeout
        said: dict[str, Any] = self.client.call(name, {"sandbox_id": self.sandbox_id, **params}, wait)
        return said


class AsyncRemoteProcess(AwaitedFollow):
    """``Process`` (runtimes/spawned.py) for an ``AsyncClient``: the same methods, awaited."""

    def __init__(self, client: AsyncClient, sandbox_id: str, info: dict[str, Any]) -> None:
        self.client = client
        self.sandbox_id = sandbox_id
        self.handle: str = info["handle"]
        self.pid: int = info["pid"]
        self.argv: list[str] = info["argv"]
        self.exit_code: int | None = None
        self.dropped = {"stdout": 0, "stderr": 0}

    def __repr__(self) -> str:
        state = "running" if self.exit_code is None else f"exit {self.exit_code}"
        return f"{type(self).__name__}({self.argv!r}, pid={self.pid}, {state})"

    def _ref(self, model: type[Any], method: str, **fields: Any) -> dict[str, Any]:
        return _params(_build(model, method, sandbox_id=self.sandbox_id, handle=self.handle, **fields))

    def _note(self, said: dict[str, Any]) -> dict[str, Any]:
        if said.get("running") is False and isinstance(said.get("exit_code"), int):
            self.exit_code = said["exit_code"]
        return said

    def _output(self, said: dict[str, Any]) -> tuple[bytes, bytes]:
        self._note(said)
        for stream, count in said.get("dropped", {}).items():
            if stream in self.dropped:
                self.dropped[stream] += int(count)
        return answered_bytes(said, "stdout"), answered_bytes(said, "stderr")

    async def read(self) -> tuple[bytes, bytes]:
        said = await self.client.call("sandbox.process_read", self._ref(ProcessRef, "sandbox.process_read"))
        return self._output(said)

    async def write(self, data: bytes | str, *, eof: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else data
        check_call_size("stdin", raw)
        params = self._ref(ProcessWrite, "sandbox.process_write", data=base64.b64encode(raw).decode(), eof=eof)
        self._note(await self.client.call("sandbox.process_write", params))

    async def close_stdin(self) -> None:
        await self.write(b"", eof=True)

    async def poll(self) -> int | None:
        self._note(await self.client.call("sandbox.process_wait", self._ref(ProcessWait, "sandbox.process_wait")))
        return self.exit_code

    async def wait(self, timeout: float | None = None) -> int | None:
        until = None if timeout is None else time.monotonic() + timeout
        while self.exit_code is None:
            left = WAIT_SLICE_S if until is None else max(0.0, min(WAIT_SLICE_S, until - time.monotonic()))
            params = self._ref(ProcessWait, "sandbox.process_wait", timeout=left)
            self._note(await self.client.call("sandbox.process_wait", params, left + self.client.timeout))
            if until is not None and time.monotonic() >= until:
                break
        return self.exit_code

    async def kill(self, signal: str | int = "SIGTERM") -> None:
        params = self._ref(ProcessKill, "sandbox.process_kill", signal=signal_name(signal))
        self._note(await self.client.call("sandbox.process_kill", params))
