"""``Metrics``: after a known sequence of observations, the exposition says exactly that."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

pytest.importorskip("prometheus_client", reason="the server extra (prometheus_client) is not installed")

from prometheus_client.parser import text_string_to_metric_families

from stockade.metrics import ESCAPE_PATTERNS, MAX_LABEL_VALUES, Metrics
from stockade.result import ExecResult, SecurityViolation
from stockade.runtimes.process.syscalls_x86_64 import SYSCALLS_X86_64

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=")  # the Prometheus text format
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def named(got: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in got.items() if n == name}


def result(**fields: object) -> ExecResult:
    base: dict[str, object] = {
        "success": True,
        "termination_reason": "completed",
        "exit_code": 0,
        "runtime_used": "process",
        "policy_digest": "d",
    }
    return ExecResult(**(base | fields))


def refused(syscall: str, severity: str = "HIGH", kind: str = "blocked_syscall") -> SecurityViolation:
    return SecurityViolation(violation_type=kind, syscall=syscall, severity=severity)


def test_executions_by_runtime_and_result() -> None:
    m = Metrics()
    m.observe_execution(result())
    m.observe_execution(result())
    m.observe_execution(result(success=False, termination_reason="timeout", runtime_used="gvisor"))
    m.observe_execution(result(success=False, termination_reason="completed", exit_code=1))
    m.observe_execution(result(success=False, termination_reason="memory_limit"))
    got = named(samples(m), "stockade_executions_total")
    assert got == {
        frozenset({("runtime", "process"), ("result", "success")}): 2.0,
        frozenset({("runtime", "gvisor"), ("result", "timeout")}): 1.0,
        frozenset({("runtime", "process"), ("result", "completed")}): 1.0,  # ran to its end, exit 1
        frozenset({("runtime", "process"), ("result", "memory_limit")}): 1.0,
    }


def test_durations_and_cold_starts_are_histograms_by_runtime() -> None:
    m = Metrics()
    m.observe_execution(result(execution_time_seconds=0.02, cold_start_time_ms=2.0))
    m.observe_execution(result(execution_time_seconds=3.0, cold_start_time_ms=300.0))
    m.observe_execution(result(execution_time_seconds=0.5, cold_start_time_ms=0.0))  # no cold start: not observed
    m.observe_execution(result(execution_time_seconds=0.5, cold_start_time_ms=9.0), cold_start=False)  # held
    got = samples(m)
    cold = "stockade_cold_start_duration_seconds"
    assert value(got, f"{cold}_count", runtime="process") == 2.0
    assert value(got, f"{cold}_sum", runtime="process") == pytest.approx(0.302)
    assert value(got, f"{cold}_bucket", runtime="process", le="0.001") == 0.0
    assert value(got, f"{cold}_bucket", runtime="process", le="0.0025") == 1.0
    assert value(got, f"{cold}_bucket", runtime="process", le="0.25") == 1.0
    assert value(got, f"{cold}_bucket", runtime="process", le="0.5") == 2.0
    assert value(got, f"{cold}_bucket", runtime="process", le="10.0") == 2.0
    run = "stockade_execution_duration_seconds"
    assert value(got, f"{run}_count", runtime="process") == 4.0
    assert value(got, f"{run}_sum", runtime="process") == pytest.approx(4.02)
    assert value(got, f"{run}_bucket", runtime="process", le="0.025") == 1.0
    assert value(got, f"{run}_bucket", runtime="process", le="0.5") == 3.0
    assert value(got, f"{run}_bucket", runtime="process", le="+Inf") == 4.0


def test_violations_count_every_call_and_never_guess_what_was_not_recorded() -> None:
    m = Metrics()
    records = [refused("ptrace", "CRITICAL")] * 3 + [refused("ioctl", "CRITICAL"), refused("ioctl", "HIGH")]
    records.append(SecurityViolation(violation_type="unsupported_syscall", syscall="open_tree", severity="LOW"))
    counts = {"ptrace": 5, "ioctl": 4, "open_tree": 1, "mount": 2, "other": 7}
    m.observe_execution(result(security_violations=records, violation_counts=counts, violations_dropped=13))
    got = named(samples(m), "stockade_violations_total")
    assert got == {
        # the records: 3 ptrace + 1 ioctl CRITICAL, and the 2 ptrace past them, whose records all agree
        frozenset({("type", "blocked_syscall"), ("severity", "CRITICAL")}): 6.0,
        # 1 ioctl recorded HIGH
        frozenset({("type", "blocked_syscall"), ("severity", "HIGH")}): 1.0,
        # 2 ioctl past the records: the type is agreed, the severity is not
        frozenset({("type", "blocked_syscall"), ("severity", "UNKNOWN")}): 2.0,
        frozenset({("type", "unsupported_syscall"), ("severity", "LOW")}): 1.0,
        # mount and "other" have no records at all
        frozenset({("type", "unrecorded"), ("severity", "UNKNOWN")}): 9.0,
    }
    assert sum(got.values()) == sum(counts.values())


def test_escape_attempts_by_pattern_count_every_call_by_name() -> None:
    m = Metrics()
    counts = {"ptrace": 5, "mount": 2, "unshare": 1, "socket": 3, "ioctl": 1, "finit_module": 1, "kcmp": 4}
    m.observe_execution(result(security_violations=[refused("ptrace")], violation_counts=counts))
    # A result with records and no counts (from an older peer) is counted by its records.
    m.observe_execution(result(security_violations=[refused("setns"), refused("pivot_root")]))
    got = named(samples(m), "stockade_escape_attempts_total")
    assert got == {
        frozenset({("pattern", "process_spawning")}): 5.0,
        frozenset({("pattern", "privileged_filesystem")}): 3.0,
        frozenset({("pattern", "container_runtime")}): 2.0,
        frozenset({("pattern", "network")}): 3.0,
        frozenset({("pattern", "device")}): 1.0,
        frozenset({("pattern", "kernel")}): 1.0,
    }  # kcmp is a violation, not an escape attempt


def test_escape_table_names_real_syscalls() -> None:
    assert set(ESCAPE_PATTERNS) <= set(SYSCALLS_X86_64)
    assert set(ESCAPE_PATTERNS.values()) == {
        "container_runtime",
        "privileged_filesystem",
        "device",
        "network",
        "process_spawning",
        "kernel",
    }


def test_active_sandboxes_are_read_at_each_scrape() -> None:
    active = [3]
    m = Metrics(active=lambda: active[0])
    assert value(samples(m), "stockade_active_sandboxes") == 3.0
    active[0] = 1
    assert value(samples(m), "stockade_active_sandboxes") == 1.0

    def broken() -> int:
        raise RuntimeError("controller gone")

    m.set_active(broken)
    got = value(samples(m), "stockade_active_sandboxes")  # the scrape still answers
    assert got is not None and math.isnan(got)


def test_pool_gauge_and_misses() -> None:
    m = Metrics()
    m.observe_pool("process", warm=2, misses=0)
    m.observe_pool("process", warm=1, misses=3)
    m.observe_pool("gvisor", warm=0, misses=1)
    got = samples(m)
    assert value(got, "stockade_pool_warm", runtime="process") == 1.0
    assert value(got, "stockade_pool_warm", runtime="gvisor") == 0.0
    assert value(got, "stockade_pool_misses_total", runtime="process") == 3.0
    assert value(got, "stockade_pool_misses_total", runtime="gvisor") == 1.0


def test_requests_by_door_method_and_code() -> None:
    m = Metrics()
    m.observe_request("unix", "run", 200, 0.004)
    m.observe_request("unix", "run", 200, 0.2)
    m.observe_request("http", "POST /v1/run", "429", 0.0003)
    got = samples(m)
    assert value(got, "stockade_requests_total", door="unix", method="run", code="200") == 2.0
    assert value(got, "stockade_requests_total", door="http", method="POST /v1/run", code="429") == 1.0
    latency = "stockade_request_duration_seconds"
    assert value(got, f"{latency}_count", door="unix", method="run") == 2.0
    assert value(got, f"{latency}_bucket", door="unix", method="run", le="0.005") == 1.0
    assert value(got, f"{latency}_bucket", door="http", method="POST /v1/run", le="0.0005") == 1.0
    with pytest.raises(ValueError, match="door"):
        m.observe_request("tcp", "run", 200, 0.1)  # type: ignore[arg-type]


def test_label_values_a_caller_chooses_are_bounded() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_VALUES + 10):
        m.observe_request("http", f"GET /junk/{i}", 404, 0.001)
    methods = {dict(labels)["method"] for labels in named(samples(m), "stockade_requests_total")}
    assert len(methods) == MAX_LABEL_VALUES + 1 and "other" in methods
    assert value(samples(m), "stockade_requests_total", door="http", method="other", code="404") == 10.0


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # a second one must not clash with the first's names
    a.observe_execution(result())
    assert value(samples(a), "stockade_executions_total", runtime="process", result="success") == 1.0
    assert value(samples(b), "stockade_executions_total", runtime="process", result="success") is None


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_import_stockade_does_not_import_metrics() -> None:
    proc = _python(
        "import sys, stockade\n"
        "stockade.ExecResult\n"
        "assert 'stockade.metrics' not in sys.modules and 'prometheus_client' not in sys.modules\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_without_prometheus_client_the_import_error_says_what_to_install() -> None:
    proc = _python(
        "import sys\n"
        "sys.modules['prometheus_client'] = None  # as if not installed\n"
        "try:\n"
        "    import stockade.metrics\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('imported')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'stockade[server]'" in proc.stdout
