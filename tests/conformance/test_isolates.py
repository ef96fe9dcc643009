"""``stockade.testing.conformance`` on every runtime of this host, through the ``local`` placement.

One isolate per runtime runs the whole suite (so the microVM boots once, not
once per check); a failure names each check that failed. tests/cluster runs the
same suite on a Ray cluster's nodes.
"""

from __future__ import annotations

import asyncio

import pytest

from stockade.placement.config import LocalPlacementConfig
from stockade.placement.local import LocalPlacement
from stockade.policy import Policy
from stockade.runtimes.manager import RuntimeManager
from stockade.testing.conformance import CHECKS, checks_for, run_suite
from tests.conftest import require


@pytest.mark.timeout(600)
@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm", "fake"])
def test_every_runtime_conforms(runtime: str) -> None:
    require(runtime)
    # A manager of its own, without pools: the isolate released, a pool would build the next one
    # (a microVM left running for the rest of the session).
    manager = RuntimeManager(pool_size=0)
    placement = LocalPlacement(LocalPlacementConfig(), manager=manager)
    try:
        failures = asyncio.run(run_suite(placement, Policy(runtime=runtime, timeout_seconds=60)))
    finally:
        manager.close()
    assert failures == [], "\n".join(failures)


def test_the_suite_checks_isolation_except_where_there_is_none() -> None:
    isolating = {c.name for c in CHECKS if c.isolating}
    assert isolating and len(CHECKS) > 10
    assert {c.name for c in checks_for("fake")} == {c.name for c in CHECKS} - isolating
    assert checks_for("microvm") == CHECKS


def test_a_check_that_fails_is_reported_by_name() -> None:
    # The suite can fail: an isolate whose commands answer wrongly fails the first check, by name.
    from stockade.result import ExecResult

    class Wrong:
        runtime_name = "process"
        node = "test"

        async def aexec(self, argv: list[str], **_: object) -> ExecResult:
            return ExecResult(success=True, stdout="nope\n", exit_code=0, termination_reason="completed",
                              runtime_used="process", policy_digest="")  # fmt: skip

        async def arun_code(self, code: str, language: str = "python", **_: object) -> ExecResult:
            return await self.aexec([])

        async def awrite_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
            return None

        async def aread_file(self, path: str, max_bytes: int | None = None) -> bytes:
            return b""

        async def alist_dir(self, path: str) -> list[dict[str, object]]:
            return []

        async def aclose_interpreter(self, session: str) -> bool:
            return False

        async def aclose(self) -> None:
            return None

    from stockade.testing.conformance import run_checks

    failures = asyncio.run(run_checks(Wrong()))  # type: ignore[arg-type]
    assert failures[0].startswith("exec_reports_output_exit_code_and_runtime (process on test): AssertionError")
    assert len(failures) == len(CHECKS)
