"""CPU time, address space and file size as policy limits, on every runtime (RLIMIT_CPU, _AS, _FSIZE).

What code-judging sandboxes (openedx/codejail) expect: CPU time separate from
the wall clock, ending ``cpu_limit``; an address-space limit under which
Python raises a catchable MemoryError; a file-size limit exact to the byte.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

import stockade
from stockade import Policy, Sandbox
from stockade.errors import PolicyError
from stockade.runtimes.manager import RuntimeManager
from tests.conformance.test_conformance import RUNTIMES as CONFORMANCE_RUNTIMES
from tests.conformance.test_run_code_like_python import RUNTIMES as ALL_RUNTIMES
from tests.conftest import require

REAL_RUNTIMES = [r for r in ALL_RUNTIMES if r != "fake"]  # the fake runtime sets no limit at all
assert set(CONFORMANCE_RUNTIMES) <= set(ALL_RUNTIMES)

SPIN = "while True:\n    pass\n"


@pytest.fixture(scope="module")
def manager() -> Iterator[RuntimeManager]:
    mgr = RuntimeManager(pool_size=0)
    yield mgr
    mgr.close()


def sandbox(runtime: str, manager: RuntimeManager, **fields: object) -> Sandbox:
    require(runtime)
    return Sandbox(Policy(runtime=runtime, timeout_seconds=60, **fields), manager=manager)  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", REAL_RUNTIMES)
def test_cpu_time_ends_a_spinning_run_as_cpu_limit_and_sleeping_is_not_cpu(
    runtime: str, manager: RuntimeManager
) -> None:
    with sandbox(runtime, manager, cpu_time_seconds=1) as sb:
        spun = sb.run_code(SPIN)
        assert spun.termination_reason == "cpu_limit", spun.summary()
        assert spun.exit_code == -signal.SIGXCPU and not spun.success
        assert spun.error is not None and "cpu_time_seconds=1" in spun.error
        assert spun.execution_time_seconds < 30  # the CPU limit, not the 60 s wall clock, ended it
        # A command too: it goes through a runner that sets the limit, not through posix_spawn.
        command = sb.exec(["python3", "-c", SPIN])
        assert command.termination_reason == "cpu_limit", command.summary()
        # Waiting costs no CPU: three seconds asleep pass a one-second CPU limit.
        slept = sb.run_code("import time; time.sleep(3); print('woke')")
        assert slept.success and slept.stdout == "woke\n", slept.summary()


def test_a_process_that_ignores_sigxcpu_dies_at_the_hard_limit_still_cpu_limit(manager: RuntimeManager) -> None:
    with sandbox("process", manager, cpu_time_seconds=1) as sb:
        r = sb.run_code(f"import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n{SPIN}")
        assert r.exit_code == -signal.SIGKILL
        assert r.termination_reason == "cpu_limit", r.summary()


@pytest.mark.parametrize("runtime", REAL_RUNTIMES)
def test_address_space_gives_a_catchable_memory_error(runtime: str, manager: RuntimeManager) -> None:
    with sandbox(runtime, manager, address_space_mb=256, memory_mb=1024) as sb:
        r = sb.run_code(
            "try:\n    block = bytearray(512 << 20)\nexcept MemoryError:\n    print('caught MemoryError')\n"
            "small = bytearray(16 << 20)\nprint('still running', len(small))"
        )
        assert r.success, r.summary() + r.stderr
        assert r.stdout == f"caught MemoryError\nstill running {16 << 20}\n"
        assert r.termination_reason == "completed"


@pytest.mark.parametrize("runtime", REAL_RUNTIMES)
def test_max_file_size_is_exact_to_the_byte(runtime: str, manager: RuntimeManager) -> None:
    with sandbox(runtime, manager, max_file_size_bytes=1000) as sb:
        r = sb.run_code(
            "import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "with open('/tmp/fits', 'wb') as f:\n    f.write(b'x' * 1000)\n"
            "try:\n    with open('/tmp/over', 'wb') as f:\n        f.write(b'x' * 1001)\n"
            "except OSError as e:\n    print('refused', e.errno)\n"
        )
        assert r.stdout == "refused 27\n", r.stderr  # EFBIG
        assert sb.read_file("/tmp/fits") == b"x" * 1000


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"cpu_time_seconds": 0}, "cpu_time_seconds"),
        ({"cpu_time_seconds": 1.5}, "cpu_time_seconds"),
        ({"address_space_mb": 8}, "address_space_mb"),
        ({"max_file_size_bytes": -1}, "max_file_size_bytes"),
        ({"max_file_size_mb": 1}, "did you mean max_file_size_bytes"),
    ],
)
def test_limits_out_of_range_are_refused_naming_the_field(fields: dict[str, object], names: str) -> None:
    with pytest.raises(PolicyError, match=names):
        Policy(**fields)  # type: ignore[arg-type]


def test_the_cli_takes_the_limits_as_flags(process_runtime: str) -> None:
    from stockade.cli import build_parser

    args = build_parser("run").parse_args(
        ["run", "--cpu-time", "2", "--address-space", "512", "--max-file-size", "4096", "--", "true"]
    )
    assert (args.cpu_time_seconds, args.address_space_mb, args.max_file_size_bytes) == (2, 512, 4096)
    assert stockade.run(["true"], cpu_time_seconds=2, address_space_mb=512, runtime=process_runtime).success
