"""The ``local`` placement: isolates on this host, from its RuntimeManager and warm pools."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..sdk import AsyncSandbox

if TYPE_CHECKING:
    from ..policy import Policy
    from ..result import ExecResult
    from ..runtimes.manager import RuntimeManager
    from ..runtimes.verdict import OutputCallback
    from .base import Isolate
    from .config import LocalPlacementConfig


class LocalIsolate:
    node = "local"

    def __init__(self, sandbox: AsyncSandbox, runtime: str) -> None:
        self._sandbox = sandbox
        self.runtime = runtime

    async def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        return await self._sandbox.exec(argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout, on_output=on_output)

    async def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        session: str | None = None,
    ) -> ExecResult:
        return await self._sandbox.run_code(
            code, language, stdin=stdin, env=env, timeout=timeout, on_output=on_output, session=session
        )

    async def close_interpreter(self, session: str) -> bool:
        return await self._sandbox.close_interpreter(session)

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self._sandbox.write_file(path, data, mode)

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return await self._sandbox.read_file(path, max_bytes)

    async def list_dir(self, path: str) -> list[dict[str, Any]]:
        return await self._sandbox.list_dir(path)

    async def aclose(self) -> None:
        await self._sandbox.aclose()


class LocalPlacement:
    name = "local"

    def __init__(self, config: LocalPlacementConfig, manager: RuntimeManager | None = None) -> None:
        from ..runtimes.manager import RuntimeManager

        self.config = config
        self._own_manager = manager is None
        self.manager = manager or RuntimeManager(pool_size=config.pool_size)

    async def connect(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.describe)

    async def check(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.describe)

    async def acquire(self, policy: Policy) -> Isolate:
        sandbox = await AsyncSandbox(policy, manager=self.manager).start()
        return LocalIsolate(sandbox, sandbox.runtime)

    async def release(self, isolate: Isolate) -> None:
        await isolate.aclose()

    def describe(self) -> dict[str, Any]:
        return {"type": "local", "runtimes": [asdict(a) for a in self.manager.doctor()]}

    async def aclose(self) -> None:
        if self._own_manager:
            await asyncio.to_thread(self.manager.close)
