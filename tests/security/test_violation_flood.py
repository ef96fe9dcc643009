"""A flood of blocked calls, on every runtime: the report stays bounded and its counts exact.

Four threads calling ``ptrace(PTRACE_ATTACH)`` on a pid that does not exist
make tens of thousands of violations a second. Before the report was bounded,
4 s of that grew a result to 33-76 MB and the host process holding it to
hundreds of MB. Every run here is bounded in time (the code stops by itself
after a few seconds; the policy's timeout backs it), and the session runs
inside the outer memory/pids guard of tests/conftest.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import stockade
from stockade import ExecResult, Policy
from stockade.result import MAX_VIOLATION_RECORDS, SecurityViolation
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.process import netcalls, seccomp
from stockade.runtimes.process.supervisor import NOTIFY_BURST, NOTIFY_PER_S
from tests.conftest import require

RUNTIMES = ["process", "gvisor", "microvm"]


def flood(seconds: float) -> str:
    """Code that floods ptrace from four threads for ``seconds``, then prints how many calls it made."""
    return (
        "import ctypes, threading, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"end = time.monotonic() + {seconds}\n"
        "made = []\n"
        "def attack():\n"
        "    n = 0\n"
        "    while time.monotonic() < end:\n"
        "        libc.ptrace(16, 999999, 0, 0)  # PTRACE_ATTACH\n"
        "        n += 1\n"
        "    made.append(n)\n"
        "threads = [threading.Thread(target=attack) for _ in range(4)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print(sum(made))\n"
    )


# A flood that would last 30 s and then say so, unless the run is ended first.
ENDLESS_FLOOD = (
    "import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\nend = time.monotonic() + 30\n"
    "while time.monotonic() < end:\n    libc.ptrace(16, 999999, 0, 0)\nprint('survived')"
)


@pytest.fixture(scope="module")
def own_manager() -> Iterator[RuntimeManager]:
    # No warm pools: a microVM pool would boot VMs this module never uses.
    mgr = RuntimeManager(pool_size=0)
    yield mgr
    mgr.close()


def assert_bounded_and_exact(r: ExecResult, made: int) -> None:
    assert made > MAX_VIOLATION_RECORDS, f"only {made} calls: not a flood, the test proves nothing"
    assert r.violation_counts["ptrace"] == made, r.summary()  # every call counted, exactly
    # Besides: at most what starting four threads reports (runsc 2022 lacks clone3, and says so).
    others = sum(r.violation_counts.values()) - made
    assert others <= 4, r.violation_counts
    assert len(r.security_violations) == MAX_VIOLATION_RECORDS  # the first ones kept whole
    assert sum(v.syscall == "ptrace" and v.blocked for v in r.security_violations) >= MAX_VIOLATION_RECORDS - others
    assert r.violations_dropped == made + others - MAX_VIOLATION_RECORDS
    assert len(r.to_json()) < 1_000_000  # a thousand records, not one per call


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_flood_is_reported_bounded_with_exact_counts_run_after_run(runtime: str, own_manager: RuntimeManager) -> None:
    require(runtime)
    # The guest's notices cross an emulated serial port (about 1,500 a second under TCG).
    seconds = 3 if runtime == "microvm" else 2
    with stockade.Sandbox(Policy(runtime=runtime, timeout_seconds=60), manager=own_manager) as sb:
        for _ in range(2):  # a held sandbox: each run's report is its own, none accumulates
            r = sb.run_code(flood(seconds))
            assert r.termination_reason == "completed", r.summary()
            assert_bounded_and_exact(r, int(r.stdout))
        quiet = sb.run_code("print('quiet')")
        assert quiet.security_violations == [] and quiet.violation_counts == {} and quiet.violations_dropped == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_max_violations_ends_a_flood(runtime: str, own_manager: RuntimeManager) -> None:
    require(runtime)
    r = stockade.run_code(ENDLESS_FLOOD, runtime=runtime, manager=own_manager, max_violations=100, timeout_seconds=60)
    assert r.termination_reason == "violation", r.summary()
    assert "survived" not in r.stdout
    assert r.violation_counts["ptrace"] > 100, r.summary()
    assert r.error is not None and "more than max_violations=100" in r.error and "ptrace" in r.error


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_calls_within_max_violations_do_not_end_the_run(runtime: str, own_manager: RuntimeManager) -> None:
    require(runtime)
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nfor _ in range(100):\n    libc.ptrace(16, 999999, 0, 0)\n"
    code += "print('done')"
    r = stockade.run_code(code, runtime=runtime, manager=own_manager, max_violations=100, timeout_seconds=60)
    assert (r.termination_reason, r.stdout, r.violation_counts) == ("completed", "done\n", {"ptrace": 100}), r.summary()


def test_past_the_cap_a_flood_costs_the_supervisor_a_count_not_a_record(
    process_runtime: str, own_manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every isolate's blocked calls wait on one supervisor thread: one sandbox's
    flood must not make it build a report record for every call it answers."""
    built = []
    real = seccomp.violation_for

    def counted(*args: object, **kwargs: object) -> SecurityViolation:
        built.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(seccomp, "violation_for", counted)
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nfor _ in range(5000):\n    libc.ptrace(16, 999999, 0, 0)\n"
    r = stockade.run_code(code, runtime="process", manager=own_manager, timeout_seconds=60)
    assert r.violation_counts == {"ptrace": 5000}, r.summary()
    assert len(r.security_violations) == MAX_VIOLATION_RECORDS
    assert len(built) == MAX_VIOLATION_RECORDS


def test_a_flood_is_held_to_its_budget_and_other_isolates_are_answered_meanwhile(
    process_runtime: str, own_manager: RuntimeManager
) -> None:
    """Every isolate's blocked calls are answered by one thread of the host's, whose time no
    isolate's cgroup pays for. Before, a flood took as much of it as it could make calls (tens of
    thousands a second, several times its own CPU); now past its burst the flooding isolate's
    calls wait for its budget, and another isolate's blocked call is answered meanwhile."""
    seconds = 4.0
    results: list[ExecResult] = []
    flooding = threading.Thread(
        target=lambda: results.append(
            stockade.run_code(flood(seconds), runtime=process_runtime, manager=own_manager, timeout_seconds=60)
        )
    )
    flooding.start()
    try:
        time.sleep(seconds / 2)
        started = time.monotonic()
        other = stockade.run_code(
            "import ctypes\nprint(ctypes.CDLL(None).ptrace(16, 999999, 0, 0))",
            runtime=process_runtime,
            manager=own_manager,
            timeout_seconds=60,
        )
        waited = time.monotonic() - started
    finally:
        flooding.join(120)
    assert other.stdout == "-1\n" and other.violation_counts == {"ptrace": 1}, other.summary()
    assert waited < 10, waited  # answered beside the flood, not after it
    (r,) = results
    made = int(r.stdout)
    assert_bounded_and_exact(r, made)
    # Its burst, then its rate, for the flood's time (and a second's slack for a slow host).
    assert made <= NOTIFY_BURST + NOTIFY_PER_S * (seconds + 1), made


@pytest.mark.parametrize("fault", [None, "the judging itself fails"])
def test_a_call_the_supervisor_cannot_read_neither_ends_it_nor_goes_unanswered(
    fault: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An allowlist isolate's connect() with a kernel-half address: the host's read of it at
    # /proc/PID/mem raised OverflowError (not an OSError), which ended the one thread answering
    # every isolate's blocked calls: each later one, anyone's, waited in the kernel until its run's
    # timeout, reported nowhere.
    require("process")
    attack = (
        "import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "s = socket.socket()\n"
        "for _ in range(300):\n"
        "    said = libc.syscall(42, s.fileno(), ctypes.c_void_p(0xffffffffffff0000), 16), ctypes.get_errno()\n"
        "print(*said)\n"
    )
    mount = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n" \
        "print(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())\n"  # fmt: skip
    if fault is not None:  # whatever else a notification could make fail: the call is refused, the thread goes on

        def broken(*args: object) -> None:
            raise RuntimeError(fault)

        monkeypatch.setattr(netcalls, "destination", broken)
    allowlist = Policy(network_policy="allowlist", allowed_hosts=["example.com"], timeout_seconds=20)
    attacked = stockade.run_code(attack, policy=allowlist)
    assert attacked.termination_reason == "completed", attacked
    # EFAULT from the kernel, the call let through; or EPERM, refused by the host that could not judge it.
    assert attacked.stdout.split() == ["-1", "14" if fault is None else "1"], attacked.stdout
    # Each one said in the host's log with its traceback, a few a second at most (the rest counted).
    logged = [r for r in caplog.records if "could not be judged" in r.getMessage()]
    assert len(logged) <= (0 if fault is None else 20), len(logged)
    victim = stockade.run_code(mount, policy=Policy(timeout_seconds=20))
    assert victim.termination_reason == "completed" and victim.stdout.split() == ["-1", "1"], victim
    assert victim.violation_counts == {"mount": 1}, victim.violation_counts
