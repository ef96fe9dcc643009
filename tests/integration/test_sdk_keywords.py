"""The SDK's keywords: explicit in every signature, one ``timeout`` everywhere, mistakes named."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

import stockade
from stockade import AsyncSandbox, Policy, Sandbox
from stockade.errors import InvalidRequestError, PolicyError
from stockade.runtimes.manager import RuntimeManager


def test_a_per_call_timeout_above_the_policys_is_refused_not_capped(process_runtime: str) -> None:
    with Sandbox(Policy(runtime=process_runtime, timeout_seconds=5)) as sb:
        with pytest.raises(PolicyError, match=r"timeout=6 is above the policy's timeout_seconds=5"):
            sb.exec(["true"], timeout=6)
        with pytest.raises(PolicyError, match=r"timeout=1000000 is above"):  # as typed, not 1e+06
            sb.exec(["true"], timeout=10**6)
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


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (
            lambda: stockade.run(["true"], timout=1),
            r"run\(\) got an unexpected keyword argument 'timout' \(did you mean 'timeout'\?\)",
        ),
        (lambda: stockade.run(["true"], cpu_time=1), r"'cpu_time' \(did you mean 'cpu_time_seconds'\?\)"),
        (lambda: stockade.run_code("pass", stdn="x"), r"run_code\(\) got .* 'stdn' \(did you mean 'stdin'\?\)"),
        (
            lambda: Sandbox(memroy=64),
            r"Sandbox\(\) got an unexpected keyword argument 'memroy' \(did you mean 'memory_mb'\?\)",
        ),
        (lambda: AsyncSandbox(pids=8), r"AsyncSandbox\(\) got .* 'pids' \(did you mean 'pids_limit'\?\)"),
        (lambda: asyncio.run(stockade.arun(["true"], timout=5)), r"^arun\(\) got .* 'timout' \(did you mean"),
        (lambda: asyncio.run(stockade.arun_code("1", stdn="x")), r"^arun_code\(\) got .* 'stdn' \(did you mean"),
    ],
)
def test_a_keyword_that_is_neither_the_calls_nor_a_policy_field_names_the_nearest(call: object, said: str) -> None:
    with pytest.raises(TypeError, match=said):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("call", "error", "said"),
    [
        (
            lambda m: stockade.run_code(b"print(1)", manager=m),
            TypeError,
            "code must be a str, not bytes: decode it first",
        ),
        (
            lambda m: stockade.run_code("1", language="ruby", manager=m),
            InvalidRequestError,
            "language 'ruby' is not one",
        ),
        (lambda m: stockade.run(None, manager=m), TypeError, "argv must be a list of strings, not NoneType"),
        (lambda m: stockade.run(["echo", 5], manager=m), TypeError, r"argv\[1\] must be a string, not int"),
        (lambda m: stockade.run([], manager=m), InvalidRequestError, "argv is empty"),
        (lambda m: stockade.run(["cat"], stdin=5, manager=m), TypeError, "stdin must be bytes or str, not int"),
        (
            lambda m: stockade.run(["true"], timeout="5", manager=m),
            TypeError,
            "timeout must be a number of seconds, not str",
        ),
        (
            lambda m: stockade.run(["true"], timeout=0, manager=m),
            InvalidRequestError,
            "timeout=0: give seconds above 0",
        ),
    ],
)
def test_a_mistyped_argument_is_refused_by_name_before_an_isolate_is_taken(
    call: object, error: type[Exception], said: str
) -> None:
    manager = RuntimeManager(pool_size=0)
    try:
        with pytest.raises(error, match=said) as caught:
            call(manager)  # type: ignore[operator]
        assert manager.started() == [] and caught.value.__context__ is None  # no runtime touched, nothing chained
    finally:
        manager.close()


def test_a_per_call_timeout_is_seconds_above_zero_and_the_sandbox_takes_the_policys(process_runtime: str) -> None:
    with Sandbox(runtime=process_runtime, timeout=5) as sb:
        assert sb.policy.timeout_seconds == 5
        for bad, error in (
            (0, InvalidRequestError),
            (-1, InvalidRequestError),
            ("5", TypeError),
            (float("nan"), InvalidRequestError),
        ):
            with pytest.raises(error, match="timeout"):
                sb.exec(["true"], timeout=bad)
        assert sb.exec([Path("/bin/echo"), "path"]).stdout == "path\n"  # a path object, as subprocess takes
    with pytest.raises(PolicyError, match="timeout or timeout_seconds, not both"):
        Sandbox(runtime=process_runtime, timeout=5, timeout_seconds=6)


def test_a_held_sandboxs_calls_refuse_mistyped_arguments_on_the_host(process_runtime: str) -> None:
    with Sandbox() as sb:
        with pytest.raises(TypeError, match=r"env must map names to text \(str to str\), not 'A': 1"):
            sb.exec(["true"], env={"A": 1})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match=r"env must map names to text .*, not list"):
            sb.run_code("1", env=[("A", "1")])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"cwd must be a path inside the sandbox \(str\), not int"):
            sb.exec(["true"], cwd=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"mode must be a permission as an int \(such as 0o644\), not '644'"):
            sb.write_file("/work/x", "x", mode="644")  # type: ignore[arg-type]
        assert sb.exec(["sh", "-c", "echo $A"], env={"A": "ok"}).stdout == "ok\n"  # nothing was sent, nothing broke
