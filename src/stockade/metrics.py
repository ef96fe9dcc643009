"""Prometheus metrics of a stockade server (seed 003's Monitoring section, ``stockade_`` names).

Needs ``prometheus_client`` (``pip install 'stockade[server]'``); ``import stockade`` never
imports this module. A ``Metrics`` owns its own registry: two in one process never clash.

Label values (every one bounded: a sandboxed program or a client must not be able to grow
the server's memory through them; past ``MAX_LABEL_VALUES`` new values read ``"other"``):

- ``result``: ``"success"``, else the run's ``termination_reason`` (``"completed"`` then means
  it ran to its end and exited non-zero). Requests refused before a run are not executions.
- ``type``/``severity``: each kept ``SecurityViolation``'s ``violation_type`` and ``severity``.
  Calls counted in ``violation_counts`` past the kept records have no record: they count
  under the type and severity their name's kept records all agree on, else under
  ``"unrecorded"`` / ``"UNKNOWN"`` (so the total is every violation, and nothing is guessed).
- ``pattern``: seed 003's escape patterns, from ``ESCAPE_PATTERNS`` (a call's name to its
  pattern), plus ``"kernel"`` (loading code into the host's kernel), which none of the five
  fits. Every call of those names counts, past the records too, refused or (in gVisor's own
  kernel) allowed: an attempt is an attempt. Other names are violations, not escapes.
- ``door``: ``"unix"`` or ``"http"``; ``method`` and ``code`` are the caller's.
"""

from __future__ import annotations

import math
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Literal

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError as exc:  # the server extra is not installed
    raise ImportError(
        "stockade.metrics needs prometheus_client, which comes with the server extra: pip install 'stockade[server]'"
    ) from exc

from .result import ExecResult, SecurityViolation, violation_key

Door = Literal["unix", "http"]
DOORS = ("unix", "http")
MAX_LABEL_VALUES = 64  # distinct values a label keeps; later ones count as "other"
UNRECORDED_TYPE, UNRECORDED_SEVERITY = "unrecorded", "UNKNOWN"

COLD_START_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EXECUTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _table(rows: dict[str, str]) -> dict[str, str]:
    return {name: pattern for pattern, names in rows.items() for name in names.split()}


# The names runtimes report (seccomp_profile.json's rules, gvisor.TRACED) that are escape attempts.
ESCAPE_PATTERNS: dict[str, str] = _table(
    {
        # namespaces: the container's own walls
        "container_runtime": "setns unshare",
        "privileged_filesystem": "mount umount2 pivot_root chroot open_tree open_tree_attr move_mount fsopen fsconfig"
        " fsmount fspick mount_setattr open_by_handle_at name_to_handle_at quotactl quotactl_fd swapon swapoff"
        " fanotify_init",
        # terminal injection (TIOCSTI, TIOCLINUX), I/O ports, device nodes
        "device": "ioctl iopl ioperm mknod mknodat",
        # the profile reports only the socket families and types it refuses
        "network": "socket socketpair",
        # other processes' memory and descriptors; clone is reported only with CLONE_NEW* flags
        "process_spawning": "ptrace process_vm_readv process_vm_writev pidfd_getfd clone",
        # not one of seed 003's five: code loaded into the host's kernel
        "kernel": "init_module finit_module delete_module create_module kexec_load kexec_file_load bpf",
    }
)


class _Bounded:
    """A label's values: the first ``limit`` distinct ones as they are, the rest ``"other"``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return "other"
            self._seen.add(value)
            return value


def _agreed(values: Iterable[str], otherwise: str) -> str:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else otherwise


class Metrics:
    """The server's metrics. ``active`` says how many sandboxes are open (read at each scrape)."""

    def __init__(self, active: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._runtime, self._type, self._method, self._code = _Bounded(), _Bounded(), _Bounded(), _Bounded()
        self.executions = Counter(
            "stockade_executions_total", "Runs by runtime and result", ["runtime", "result"], registry=r
        )
        self.violations = Counter(
            "stockade_violations_total", "Security violations by type and severity", ["type", "severity"], registry=r
        )
        self.escape_attempts = Counter(
            "stockade_escape_attempts_total", "Calls of escape patterns (seed 003)", ["pattern"], registry=r
        )
        self.cold_start = Histogram(
            "stockade_cold_start_duration_seconds",
            "Time to hand a run an isolate",
            ["runtime"],
            buckets=COLD_START_BUCKETS,
            registry=r,
        )
        self.execution_duration = Histogram(
            "stockade_execution_duration_seconds",
            "Time a run took",
            ["runtime"],
            buckets=EXECUTION_BUCKETS,
            registry=r,
        )
        self.active = Gauge("stockade_active_sandboxes", "Sandboxes open now", registry=r)
        self.pool_warm = Gauge("stockade_pool_warm", "Pre-built isolates ready", ["runtime"], registry=r)
        self.pool_misses = Counter(
            "stockade_pool_misses_total", "One-shot runs the warm pool could not serve", ["runtime"], registry=r
        )
        self.requests = Counter("stockade_requests_total", "Requests answered", ["door", "method", "code"], registry=r)
        self.request_duration = Histogram(
            "stockade_request_duration_seconds",
            "Time to answer a request",
            ["door", "method"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        if active is not None:
            self.set_active(active)

    def set_active(self, active: Callable[[], int]) -> None:
        """Have the active-sandboxes gauge read ``active()`` at each scrape (a failing one reads NaN)."""

        def read() -> float:
            try:
                return float(active())
            except Exception:  # noqa: BLE001 - a scrape must not fail with the controller's callback
                return math.nan

        self.active.set_function(read)

    def observe_execution(self, result: ExecResult, *, cold_start: bool = True) -> None:
        """Count a finished run. ``cold_start=False`` for a run in a held sandbox after its
        first (it reports its sandbox's cold start again); a zero cold start is not observed."""
        runtime = self._runtime(result.runtime_used)
        outcome = "success" if result.success else result.termination_reason
        self.executions.labels(runtime, outcome).inc()
        self.execution_duration.labels(runtime).observe(max(0.0, result.execution_time_seconds))
        if cold_start and result.cold_start_time_ms > 0:
            self.cold_start.labels(runtime).observe(result.cold_start_time_ms / 1000)
        self.observe_violations(result.security_violations, result.violation_counts)

    def observe_violations(self, records: list[SecurityViolation], counts: dict[str, int]) -> None:
        """Count a report's violations: a run's, an MCP call's, a held sandbox's after its last run."""
        kept: dict[str, list[SecurityViolation]] = {}
        for v in records:
            self.violations.labels(self._type(v.violation_type), v.severity).inc()
            kept.setdefault(violation_key(v), []).append(v)
        # Every call by name; a result with records but no counts (an older peer's) is counted by them.
        every = counts or Tally(violation_key(v) for v in records)
        for name, count in every.items():
            same = kept.get(name, [])
            if (extra := count - len(same)) > 0:
                kind = _agreed((v.violation_type for v in same), UNRECORDED_TYPE)
                severity = _agreed((v.severity for v in same), UNRECORDED_SEVERITY)
                self.violations.labels(self._type(kind), severity).inc(extra)
            if (pattern := ESCAPE_PATTERNS.get(name)) is not None and count > 0:
                self.escape_attempts.labels(pattern).inc(count)

    def observe_request(self, door: Door, method: str, code: int | str, seconds: float) -> None:
        """Count a request answered at ``door`` (``"unix"``/``"http"``), with its outcome ``code``."""
        if door not in DOORS:
            raise ValueError(f"door must be one of {DOORS}, not {door!r}")
        method = self._method(method)
        self.requests.labels(door, method, self._code(str(code))).inc()
        self.request_duration.labels(door, method).observe(max(0.0, seconds))

    def observe_pool(self, runtime: str, warm: int, misses: int = 0) -> None:
        """The pool of ``runtime`` holds ``warm`` ready isolates; ``misses`` one-shot runs
        since the last call found none of their shape (they started cold)."""
        runtime = self._runtime(runtime)
        self.pool_warm.labels(runtime).set(warm)
        if misses > 0:
            self.pool_misses.labels(runtime).inc(misses)

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of a ``/metrics`` answer."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
