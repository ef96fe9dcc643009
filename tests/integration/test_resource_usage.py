"""``resource_usage`` of a run in a held sandbox is the run's own, not the sandbox's so far.

``cpu_seconds`` is the difference of the cgroup's counter; ``memory_peak_mb``
is its peak counter, reset as each run opens (v1's ``memory.max_usage_in_bytes``,
v2's ``memory.peak`` from Linux 6.12). The process runtime's group holds the
run's own processes; gVisor's holds the Sentry and microvm's the emulator, which
keep memory a run freed (the peak after a reset starts from it: docs/policy.md).
"""

from __future__ import annotations

from stockade import Policy, Sandbox
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require


def test_a_runs_memory_peak_is_its_own() -> None:
    runtime = "process"
    require(runtime)
    manager = RuntimeManager(pool_size=0)
    try:
        with Sandbox(Policy(runtime=runtime, memory_mb=512, timeout_seconds=60), manager=manager) as sb:
            quiet = sb.run_code("pass").resource_usage
            big = sb.run_code("b = b'x' * (150 << 20)").resource_usage
            after = sb.run_code("pass").resource_usage
    finally:
        manager.close()
    assert quiet.memory_peak_mb is not None and big.memory_peak_mb is not None and after.memory_peak_mb is not None
    assert big.memory_peak_mb >= quiet.memory_peak_mb + 140, (quiet, big)
    assert after.memory_peak_mb < big.memory_peak_mb - 100, (big, after)  # not the sandbox's lifetime peak
