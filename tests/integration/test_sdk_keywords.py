"""The SDK's keywords: explicit in every signature, one ``timeout`` everywhere, mistakes named."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import stockade
from stockade import AsyncSandbox, Policy, Sandbox
from stockade.errors import PolicyError
from stockade.runtimes.manager import RuntimeManager


def test_a_per_call_timeout_above_the_policys_is_refused_not_capped(process_runtime: str) -> None:
    with Sandbox(Policy(runtime=process_runtime, timeout_seconds=5)) as sb:
        with pytest.raises(PolicyError, match=r"timeout=6 is above the policy's timeout_seconds=5"):
            sb.exec(["true"], timeout=6)
        with pytest.raises(PolicyError, match="timeout_seconds=5"):
            sb.run_code("pass", timeout=6)
        assert sb.exec(["true"], timeout=5).success  # the sandbox is still usable


def test_a_per_call_timeout_reports_its_own_value(process_runtime: str) -> None:
    with Sandbox(Policy(runtime=process_runtime, timeout_seconds=30)) as sb:
        r = sb.run_code("import time; time.sleep(60)", timeout=1.5)
        assert r.termination_reason == "timeout" and r.error == "timed out after 1.5 s"


def test_one_shots_take_timeout_as_their_policys_timeout_seconds(process_runtime: str) -> None:
    r = stockade.run_code("import time; time.sleep(60)", runtime=process_runtime, timeout=1)
    assert r.termination_reason == "timeout" and r.error == "timed out after 1 s"
    assert stockade.run(["true"], runtime=process_runtime, timeout=2, timeout_seconds=2).success
    with pytest.raises(PolicyError, match="timeout or timeout_seconds, not both"):
        stockade.run(["true"], runtime=process_runtime, timeout=2, timeout_seconds=3)


@pytest.mark.parametrize("method", ["exec", "run_code"])
def test_keywords_are_explicit_and_a_misspelt_one_names_the_public_class(method: str) -> None:
    for cls in (Sandbox, AsyncSandbox):
        params = inspect.signature(getattr(cls, method)).parameters
        assert {"stdin", "env", "timeout", "on_output"} <= set(params)
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    sandbox = Sandbox.__new__(Sandbox)  # the signature is checked before anything runs
    with pytest.raises(TypeError, match=rf"Sandbox\.{method}\(\) got an unexpected keyword argument 'timout'"):
        getattr(sandbox, method)(["true"] if method == "exec" else "pass", timout=1)


def test_the_async_sandbox_refuses_a_timeout_above_the_policys_too(process_runtime: str) -> None:
    async def main() -> None:
        async with AsyncSandbox(Policy(runtime=process_runtime, timeout_seconds=2), manager=manager) as sb:
            with pytest.raises(PolicyError, match="timeout_seconds=2"):
                await sb.exec(["true"], timeout=3)
            assert (await sb.run_code("print(1)", timeout=2)).stdout == "1\n"

    manager = RuntimeManager(pool_size=0)
    try:
        asyncio.run(main())
    finally:
        manager.close()
