"""A real Prometheus scrapes a live daemon's ``/metrics``, and every panel of the Grafana
dashboard (deploy/grafana/stockade.json) finds data in it.

The daemon (``stockade serve --http``, the process runtime) is sent a known sequence of
real requests, in two rounds: one-shot runs over HTTP (successes, a failure, a timeout,
a run of blocked escape calls, runs of a shape the warm pool does not keep, a burst),
held-sandbox calls, and Unix-socket requests. The rounds are two so that every counter
has grown between two scrapes: a ``rate()`` needs that, and the dashboard's ratios and
quantiles read NaN without it. Then the counters Prometheus holds are compared with
what was sent.

Nothing sleeps for a fixed time: every wait polls Prometheus (or the daemon), bounded.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from stockade.client import Client
from tests.conftest import require
from tests.daemon_harness import Daemon, start_daemon
from tests.prometheus_harness import PROMETHEUS, Prometheus, Result, has_data

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "stockade.json"
DATA_TIMEOUT_S = 120.0  # for a wait on Prometheus: a loaded two-core machine scrapes late
RUN_TIMEOUT_S = 120.0  # for the daemon to answer one request
ROUNDS = 2
BURST = 3  # concurrent one-shot runs, more than the pool's one warm isolate

# The blocked calls of seed 003's escape patterns, through libc's own wrappers (so no
# architecture's syscall numbers): the process runtime's seccomp profile answers each
# EPERM and reports it, and the code goes on to exit 0.
ESCAPES = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace(0, 0, 0, 0)                          # PTRACE_TRACEME
libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
libc.setns(0, 0)
libc.unshare(0x10000000)                         # CLONE_NEWUSER
libc.ioctl(0, 0x5412, b"x")                      # TIOCSTI: typing into the terminal
libc.socket(17, 3, 0)                            # AF_PACKET, SOCK_RAW
libc.init_module(None, 0, b"")
print("still here")
"""
ESCAPE_CALLS = {"ptrace": 1, "mount": 1, "setns": 1, "unshare": 1, "ioctl": 1, "socket": 1, "init_module": 1}
ESCAPE_PATTERNS = {  # what each run of ESCAPES adds to stockade_escape_attempts_total, by pattern
    "process_spawning": 1,
    "privileged_filesystem": 1,
    "container_runtime": 2,
    "device": 1,
    "network": 1,
    "kernel": 1,
}

pytestmark = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK), reason=f"no Prometheus at {PROMETHEUS} (Debian: apt-get install prometheus)"
)

# Loopback requests go straight to the daemon, whatever *_proxy the environment sets.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def dashboard_exprs() -> list[tuple[str, str]]:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def http(daemon: Daemon, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
    """One call of the daemon's HTTP API, answered ``expect``; its JSON answer."""
    assert daemon.http_url is not None
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        daemon.http_url + path, data=data, headers={"Content-Type": "application/json"}, method=method
    )
    try:
        with _opener.open(request, timeout=RUN_TIMEOUT_S) as answer:
            status, text = answer.status, answer.read()
    except urllib.error.HTTPError as err:
        with err:
            status, text = err.code, err.read()
    assert status == expect, f"{method} {path}: {status} {text[:2000]!r}\n{daemon.logs()[-3000:]}"
    return json.loads(text)


@dataclass
class Sent:
    """What the test sent and the daemon answered, counted as the metrics count it."""

    results: Counter[str] = field(default_factory=Counter)  # the ``result`` label: success, else the reason
    severities: Counter[str] = field(default_factory=Counter)
    patterns: Counter[str] = field(default_factory=Counter)
    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (door, method, code)
    cold_only: int = 0  # one-shot runs of a shape the pool does not keep: each one a pool miss

    def run(self, answer: dict[str, Any], success: bool, reason: str, exit_code: int | None = None) -> None:
        """Count a run's answer, once it is what the test asked for."""
        assert answer["success"] is success, answer
        assert answer["termination_reason"] == reason, answer
        if exit_code is not None:
            assert answer["exit_code"] == exit_code, answer
        assert answer["runtime_used"] == "process", answer
        self.results["success" if success else reason] += 1
        for violation in answer["security_violations"]:
            self.severities[violation["severity"]] += 1


def http_execute(daemon: Daemon, sent: Sent, body: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = http(daemon, "POST", "/api/v1/sandbox/execute", {"runtime": "process", **body})
    sent.requests["http", "execute", "ok"] += 1
    return answer


def drive_round(daemon: Daemon, sent: Sent) -> None:
    """One round of the known traffic; ``sent`` counts it."""
    # The Unix door first: its request metrics are counted just after each answer goes
    # out, so the runs that follow make sure a scrape that has them all has these too.
    with Client(daemon.socket_path, timeout=RUN_TIMEOUT_S) as client:
        assert client.ping()
        sent.requests["unix", "ping", "ok"] += 1
        for word in ("first", "second"):
            result = client.execute(["echo", word])
            assert result.stdout == f"{word}\n"
            sent.run(result.to_dict(), True, "completed", 0)
            sent.requests["unix", "execute", "ok"] += 1
        client.status()
        sent.requests["unix", "status", "ok"] += 1

    # One-shot runs over HTTP, one after another.
    sent.run(http_execute(daemon, sent, {"agent_id": "prom-ok", "code": "print(6 * 7)"}), True, "completed", 0)
    sent.run(http_execute(daemon, sent, {"agent_id": "prom-ok", "command": ["true"]}), True, "completed", 0)
    failed = http_execute(daemon, sent, {"agent_id": "prom-fails", "code": "import sys; sys.exit(3)"})
    sent.run(failed, False, "completed", 3)
    late = http_execute(daemon, sent, {"agent_id": "prom-late", "command": ["sleep", "5"], "timeout_seconds": 1})
    sent.run(late, False, "timeout")
    escapes = http_execute(daemon, sent, {"agent_id": "prom-escape", "code": ESCAPES})
    sent.run(escapes, True, "completed", 0)
    assert escapes["stdout"] == "still here\n" and escapes["violation_counts"] == ESCAPE_CALLS, escapes
    sent.patterns.update(ESCAPE_PATTERNS)
    # Its own loopback: a shape the pool (STOCKADE_POOL_SHAPES=1) never keeps, so a certain miss.
    loopback = http_execute(
        daemon, sent, {"agent_id": "prom-loopback", "command": ["true"], "network_policy": "restricted"}
    )
    sent.run(loopback, True, "completed", 0)
    sent.cold_only += 1
    # A burst larger than the pool.
    with ThreadPoolExecutor(BURST) as pool:
        burst = list(
            pool.map(
                lambda i: http_execute(daemon, sent, {"agent_id": f"prom-burst-{i}", "code": f"print({i})"}),
                range(BURST),
            )
        )
    for answer in burst:
        sent.run(answer, True, "completed", 0)

    # A held sandbox: created, called three times (the last fails), closed.
    sandbox = http(daemon, "POST", "/api/v1/sandboxes", {"agent_id": "prom-held"}, expect=201)["sandbox_id"]
    sent.requests["http", "sandbox.create", "ok"] += 1
    for command, success, code in (
        (["true"], True, 0),
        (["echo", "held"], True, 0),
        (["sh", "-c", "exit 4"], False, 4),
    ):
        answer = http(daemon, "POST", f"/api/v1/sandboxes/{sandbox}/exec", {"command": command})
        sent.requests["http", "sandbox.exec", "ok"] += 1
        sent.run(answer, success, "completed", code)
    assert http(daemon, "DELETE", f"/api/v1/sandboxes/{sandbox}")["closed"] is True
    sent.requests["http", "sandbox.close", "ok"] += 1


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A live daemon with its HTTP API on loopback: one warm isolate, of the default shape only."""
    require("process")
    live = start_daemon(http="127.0.0.1:0", env={"STOCKADE_POOL_SIZE": "1", "STOCKADE_POOL_SHAPES": "1"})
    try:
        yield live
    finally:
        live.stop()


def by(result: Result, label: str) -> dict[str, float]:
    """An instant vector's values by one label."""
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def total(result: Result) -> float:
    return sum(float(r["value"][1]) for r in result)


def test_dashboard_lists_the_seed_panels() -> None:
    exprs = [expr for _, expr in dashboard_exprs()]
    for metric in (
        "stockade_cold_start_duration_seconds_bucket",
        "stockade_violations_total",
        'stockade_executions_total{result="success"}',
        "stockade_active_sandboxes",
        "stockade_escape_attempts_total",
        "stockade_request_duration_seconds_bucket",
    ):
        assert any(metric in expr for expr in exprs), metric


@pytest.mark.timeout(600)
def test_every_dashboard_panel_has_data_from_a_live_daemon(daemon: Daemon) -> None:
    panels = dashboard_exprs()
    sent = Sent()
    address = urlsplit(daemon.http_url).netloc
    with Prometheus(address, "/metrics") as prom:
        prom.wait_for('up{job="stockade"} == 1', timeout=DATA_TIMEOUT_S)
        for _ in range(ROUNDS):
            drive_round(daemon, sent)
            # A scrape with all of this round in it, before the next round grows the counters again.
            runs = sum(sent.results.values())
            prom.wait_for("sum(stockade_executions_total)", lambda r, n=runs: total(r) == n, DATA_TIMEOUT_S)

        found = {title: prom.wait_for(expr, has_data, DATA_TIMEOUT_S) for title, expr in panels}

        # What Prometheus holds is what was sent.
        executions = prom.query("stockade_executions_total")
        assert {r["metric"]["runtime"] for r in executions} == {"process"}
        assert by(executions, "result") == dict(sent.results)
        assert sent.results["success"] == ROUNDS * 11  # the plan: unix 2, ok 2, escapes, loopback, burst 3, held 2
        assert by(prom.query("sum by (severity) (stockade_violations_total)"), "severity") == dict(sent.severities)
        assert by(prom.query("sum by (type) (stockade_violations_total)"), "type") == {
            "blocked_syscall": sent.severities.total()
        }
        assert by(prom.query("stockade_escape_attempts_total"), "pattern") == dict(sent.patterns)
        requests = prom.query("stockade_requests_total")
        counted = {
            (r["metric"]["door"], r["metric"]["method"], r["metric"]["code"]): float(r["value"][1]) for r in requests
        }
        for key, count in sent.requests.items():
            assert counted.get(key) == count, (key, counted)
        assert counted[("http", "metrics", "ok")] >= 2  # Prometheus's own scrapes come in at the HTTP door
        misses = total(prom.query('stockade_pool_misses_total{runtime="process"}'))
        assert misses >= sent.cold_only, misses

        # The gauges: one warm isolate once the pool has refilled; a held sandbox open, then closed.
        prom.wait_for(
            "sum by (runtime) (stockade_pool_warm)", lambda r: by(r, "runtime") == {"process": 1.0}, DATA_TIMEOUT_S
        )
        sandbox = http(daemon, "POST", "/api/v1/sandboxes", {"agent_id": "prom-gauge"}, expect=201)["sandbox_id"]
        prom.wait_for("sum(stockade_active_sandboxes)", lambda r: total(r) == 1, DATA_TIMEOUT_S)
        http(daemon, "DELETE", f"/api/v1/sandboxes/{sandbox}")
        prom.wait_for("sum(stockade_active_sandboxes)", lambda r: total(r) == 0, DATA_TIMEOUT_S)

    assert all(found.values())
    assert by(found["Escape attempts by pattern"], "pattern").keys() == ESCAPE_PATTERNS.keys()
    assert by(found["Request latency p95 by door"], "door").keys() == {"unix", "http"}
    assert by(found["Runs by result"], "result").keys() == {"success", "completed", "timeout"}
    assert by(found["Security violation rate by type"], "type").keys() == {"blocked_syscall"}
    assert by(found["Violations by severity"], "severity").keys() == sent.severities.keys()
    for title in ("Cold start p95 by runtime", "Run duration p95 by runtime", "Warm pool misses", "Warm pool"):
        assert by(found[title], "runtime").keys() == {"process"}, (title, found[title])
    success = by(found["Success rate by runtime"], "runtime")
    assert success.keys() == {"process"} and 0.0 < success["process"] < 1.0
