"""The live dashboard (``GET /``) of a real daemon, in a real headless Chromium.

Each test starts a daemon with its HTTP API (``stockade serve --http``, the process
runtime), makes real runs through ``POST /api/v1/sandbox/execute`` and reads what
the page shows of them: their rows by ``data-execution-id``, their violations,
the cold-start chart, the token form, the disconnected banner.

Nothing here sleeps for a fixed time: every wait polls the page (or the daemon),
with a timeout meant for a loaded two-core machine, and returns as soon as the
page is right.

``STOCKADE_SCREENSHOT=1`` also makes a handful of varied runs and saves the page
as docs/dashboard.png.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests import browser_harness
from tests.conftest import availability, require
from tests.daemon_harness import Daemon, start_daemon

API = "/api/v1/dashboard"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
WAIT = 45  # seconds: the page polls every 2 s; a busy machine may take a few polls
RUN_TIMEOUT = 120  # seconds for the daemon to answer one run on a busy machine
TOKEN = "dashboard-test-token-0123456789"  # STOCKADE_API_TOKEN wants 16 characters or more
HOSTILE = "<img src=x onerror=alert(1)>"

# Code for the runs. Blocked calls go through libc's own wrappers, so no syscall
# number of one architecture is written here; the process runtime's seccomp
# profile answers them EPERM and reports each.
OK = "print('hello from the dashboard test')"
FAILS = "import sys; sys.exit(3)"
PTRACE = "import ctypes; ctypes.CDLL(None, use_errno=True).ptrace(0, 0, 0, 0)"  # PTRACE_TRACEME
MOUNT = "import ctypes; ctypes.CDLL(None, use_errno=True).mount(b'none', b'/tmp', b'tmpfs', 0, None)"
RAW_SOCKET = "import ctypes; ctypes.CDLL(None, use_errno=True).socket(17, 3, 0)"  # AF_PACKET, SOCK_RAW

pytestmark = pytest.mark.timeout(300)

# Loopback requests go straight to the daemon, whatever *_proxy the environment sets.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Live:
    """A daemon serving its HTTP API, and the calls the tests make of it."""

    daemon: Daemon
    token: str | None = None

    @property
    def url(self) -> str:
        assert self.daemon.http_url is not None
        return self.daemon.http_url

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> tuple[int, Any]:
        """(status, JSON answer) of one call, sent with ``token`` (None: none)."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with _opener.open(req, timeout=RUN_TIMEOUT) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read() or b"null")

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """A call with the daemon's token (if it has one) that must be answered ``expect``."""
        status, answer = self.request(method, path, body, token=self.token)
        assert status == expect, f"{method} {path}: {status} {answer}\n{self.daemon.logs()[-3000:]}"
        return answer

    def execute(self, **body: Any) -> dict[str, Any]:
        """A one-shot run on the process runtime (seed 003's request); its answer."""
        answer: dict[str, Any] = self.call("POST", "/api/v1/sandbox/execute", {"runtime": "process", **body})
        return answer

    def stop(self) -> None:
        self.daemon.stop()


@pytest.fixture
def stockade() -> Iterator[Callable[..., Live]]:
    """Start real daemons with their HTTP API on loopback (``token=`` to require one,
    ``port=`` for a given port); each is stopped after the test."""
    require("process")
    started: list[Live] = []

    def start(token: str | None = None, port: int = 0) -> Live:
        env = {"STOCKADE_API_TOKEN": token} if token else {}
        live = Live(start_daemon(http=f"127.0.0.1:{port}", env=env), token)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture
def driver() -> Iterator[Any]:
    browser_harness.require_browser()
    with browser_harness.browser() as drv:
        yield drv


# ---- reading the page: in one script each, so a redraw between two reads cannot go stale ----


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition, message=f"waited {WAIT}s for {what}")


def execution_row(driver: Any, execution_id: str) -> dict[str, Any] | None:
    return driver.execute_script(
        """
        const row = [...document.querySelectorAll('#executions tbody tr')]
            .find((r) => r.dataset.executionId === arguments[0]);
        if (!row) return null;
        return {cells: [...row.cells].map((c) => c.textContent), outcome: row.cells[3].className,
                violations: row.cells[6].className, html: row.innerHTML};
        """,
        execution_id,
    )


def violation_rows(driver: Any, execution_id: str) -> list[list[str]]:
    """The cells of the violations table's rows of one execution (found by its full id)."""
    rows: list[list[str]] = driver.execute_script(
        """
        return [...document.querySelectorAll('#violations tbody tr')]
            .filter((r) => { const id = r.cells[1] && r.cells[1].querySelector('code');
                             return id && id.title === arguments[0]; })
            .map((r) => [...r.cells].map((c) => c.textContent));
        """,
        execution_id,
    )
    return rows


def sandbox_row(driver: Any, sandbox_id: str) -> list[str] | None:
    cells: list[str] | None = driver.execute_script(
        """
        const row = [...document.querySelectorAll('#sandboxes tbody tr')]
            .find((r) => r.dataset.sandboxId === arguments[0]);
        return row ? [...row.cells].map((c) => c.textContent) : null;
        """,
        sandbox_id,
    )
    return cells


def page_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script(
        """
        const text = (sel) => { const e = document.querySelector(sel); return e ? e.textContent : null; };
        return {
            status: text('#status'),
            banner: document.getElementById('banner').hidden ? null : text('#banner'),
            authShown: !document.getElementById('auth').hidden,
            authError: text('#auth-error'),
            executions: document.querySelectorAll('#executions tbody tr[data-execution-id]').length,
            polylines: [...document.querySelectorAll('#chart svg polyline')]
                .map((p) => [p.dataset.runtime, p.getAttribute('points').split(' ').length]),
            legend: [...document.querySelectorAll('#chart .legend li')].map((li) => li.textContent),
            yLabels: [...document.querySelectorAll('#chart svg text')].map((t) => t.textContent),
            images: document.images.length,
        };
        """
    )


def state_when(test: Callable[[dict[str, Any]], Any]) -> Callable[[Any], dict[str, Any] | bool]:
    """A wait condition: the page's state once ``test`` holds for it."""

    def condition(driver: Any) -> dict[str, Any] | bool:
        state = page_state(driver)
        return state if test(state) else False

    return condition


updated = state_when(lambda s: (s["status"] or "").startswith("updated"))


def open_dashboard(driver: Any, base_url: str) -> dict[str, Any]:
    driver.get(base_url + "/")
    return wait_for(driver, updated, "the first answer of the API to be shown")


def shows_row(execution_id: str) -> Callable[[Any], dict[str, Any] | None]:
    return lambda d: execution_row(d, execution_id)


def _close_to(shown: str, value: float) -> bool:
    """A number the page shows with one decimal is ``value`` (JavaScript's toFixed(1))."""
    return abs(float(shown) - value) <= 0.051


def _violation(answer: dict[str, Any]) -> dict[str, Any]:
    """The one violation a run's answer reports."""
    violations = answer["security_violations"]
    assert len(violations) == 1, violations
    return dict(violations[0])


# ---- the tests ----


def test_real_runs_show_up_with_their_violation_and_chart(driver: Any, stockade: Callable[..., Live]) -> None:
    live = stockade()
    state = open_dashboard(driver, live.url)
    assert state["executions"] == 0 and state["polylines"] == []  # a new daemon has run nothing

    ok = live.execute(agent_id="dashboard-ok", code=OK)
    failed = live.execute(agent_id="dashboard-fails", code=FAILS)
    blocked = live.execute(agent_id="dashboard-escape", code=PTRACE)
    slow = live.execute(agent_id="dashboard-slow", code="import time; time.sleep(60)", timeout_seconds=1)
    # What the daemon answered, before what the page shows of it.
    assert (ok["success"], ok["exit_code"], ok["stdout"]) == (True, 0, "hello from the dashboard test\n")
    assert (failed["success"], failed["termination_reason"], failed["exit_code"]) == (False, "completed", 3)
    violation = _violation(blocked)
    assert (violation["violation_type"], violation["indicators"]["syscall"]) == ("blocked_syscall", "ptrace")
    assert violation["detection_layer"] == "SECCOMP" and violation["blocked"] is True

    rows = {}
    assert (slow["termination_reason"], slow["exit_code"]) == ("timeout", -9)
    for answer in (ok, failed, blocked, slow):
        rows[answer["execution_id"]] = wait_for(driver, shows_row(answer["execution_id"]), "a run's row")
    for answer, agent, outcome, kind, violations in (
        (ok, "dashboard-ok", "completed", "ok", "0"),
        (failed, "dashboard-fails", "completed (exit 3)", "fail", "0"),
        (blocked, "dashboard-escape", "completed", "ok", "1"),  # refused with EPERM; the code went on
        (slow, "dashboard-slow", "timeout", "fail", "0"),  # the program chose no exit status: none is shown
    ):
        row = rows[answer["execution_id"]]
        ident, agent_cell, runtime, outcome_cell, duration, cold, violations_cell, _finished = row["cells"]
        assert answer["execution_id"].startswith(ident.rstrip("…"))
        assert (agent_cell, runtime, outcome_cell, violations_cell) == (agent, "process", outcome, violations)
        assert kind in row["outcome"].split()
        assert ("warn" in row["violations"].split()) == (violations != "0")
        assert _close_to(duration, answer["execution_time_seconds"] * 1000), (duration, answer)
        assert _close_to(cold, answer["cold_start_time_ms"]), (cold, answer)

    shown = wait_for(driver, lambda d: violation_rows(d, blocked["execution_id"]), "the run's violation")
    assert len(shown) == 1
    _time, ident, agent, kind, syscall, severity, layer = shown[0]
    assert blocked["execution_id"].startswith(ident.rstrip("…"))
    assert (agent, kind, syscall) == ("dashboard-escape", "blocked_syscall", "ptrace")
    assert (severity, layer) == (violation["severity"], "SECCOMP")

    # One point per run that had a cold start to show (a warm isolate's can be ~0 ms, never below).
    points = sum(1 for answer in (ok, failed, blocked, slow) if answer["cold_start_time_ms"] > 0)
    assert points > 0, (ok, failed, blocked, slow)
    state = wait_for(
        driver, state_when(lambda s: ["process", points] in s["polylines"]), "the process line of the chart"
    )
    assert [runtime for runtime, _ in state["polylines"]] == ["process"]
    assert state["executions"] == 4
    assert state["banner"] is None and not state["authShown"]
    assert any(item.startswith("process") for item in state["legend"])
    assert any(label.endswith(" ms") for label in state["yLabels"])
    assert browser_harness.console_errors(driver) == []

    if os.environ.get("STOCKADE_SCREENSHOT") == "1":
        _screenshot(driver, live)


def _screenshot(driver: Any, live: Live) -> None:
    """docs/dashboard.png: the page after a handful of varied runs (both runtimes, when
    gVisor is here too), with a held sandbox open."""
    runs = [
        {"agent_id": "planner", "code": "print(sum(range(10**5)))"},
        {"agent_id": "coder", "command": ["sh", "-c", "ls / | wc -l"]},
        {"agent_id": "coder", "code": MOUNT},
        {"agent_id": "planner", "command": ["sleep", "5"], "timeout_seconds": 1},
        {"agent_id": "reviewer", "code": "import json; print(json.dumps({'ok': True}))"},
        {"agent_id": "coder", "code": RAW_SOCKET},
        {"agent_id": "reviewer", "code": "raise SystemExit('tests failed')"},
        {"agent_id": "planner", "code": "print('done')"},
    ]
    if availability("gvisor").available:
        runs[1:1] = [{"agent_id": "planner", "code": "print(1)", "runtime": "gvisor"}]
        runs[5:5] = [{"agent_id": "coder", "command": ["uname", "-r"], "runtime": "gvisor"}]
    last = ""
    for body in runs:
        last = live.execute(**body)["execution_id"]
    held = live.call("POST", "/api/v1/sandboxes", {"agent_id": "notebook"}, expect=201)["sandbox_id"]
    call = live.call("POST", f"/api/v1/sandboxes/{held}/exec", {"command": ["python3", "-c", "print(2 + 2)"]})
    for execution_id in (last, call["execution_id"]):
        wait_for(driver, shows_row(execution_id), "the last runs' rows")
    wait_for(driver, lambda d: sandbox_row(d, held), "the held sandbox's row")
    browser_harness.screenshot(driver, str(SCREENSHOT))


def test_api_text_is_shown_as_text(driver: Any, stockade: Callable[..., Live]) -> None:
    """An agent_id is whatever a client sends: the page shows it, never runs it."""
    live = stockade()
    open_dashboard(driver, live.url)
    run = live.execute(agent_id=HOSTILE, code=PTRACE)
    assert len(run["security_violations"]) == 1
    held = live.call("POST", "/api/v1/sandboxes", {"agent_id": HOSTILE}, expect=201)["sandbox_id"]

    row = wait_for(driver, shows_row(run["execution_id"]), "the hostile run's row")
    assert row["cells"][1] == HOSTILE
    assert "<img" not in row["html"]  # serialised back, the markup is escaped
    violation = wait_for(driver, lambda d: violation_rows(d, run["execution_id"]), "the hostile run's violation")
    assert violation[0][2] == HOSTILE
    sandbox = wait_for(driver, lambda d: sandbox_row(d, held), "the hostile agent's held sandbox")
    assert sandbox[2] == HOSTILE

    state = page_state(driver)
    assert state["images"] == 0
    assert not driver.execute_script("return document.querySelector('main img, main script, #chart svg svg')")
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - reading it is what raises when there is none
    assert browser_harness.console_errors(driver) == []


def _auth_failures(daemon: Daemon) -> list[dict[str, Any]]:
    with open(daemon.audit_log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("event") == "auth_failure"]


def test_a_daemon_with_a_token_asks_for_it_and_then_works(driver: Any, stockade: Callable[..., Live]) -> None:
    from selenium.webdriver.common.by import By

    live = stockade(token=TOKEN)
    assert live.request("GET", "/api/v1/sandbox/status")[0] == 401  # the API itself wants the token
    run = live.execute(agent_id="dashboard-token", code=OK)

    driver.get(live.url + "/")  # the page and its files are served without one
    wait_for(driver, state_when(lambda s: s["authShown"]), "the token form")

    def submit(token: str) -> None:
        field = driver.find_element(By.ID, "token")
        field.clear()
        field.send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#auth button[type=submit]").click()

    submit("wrong-token-0123456789")
    wait_for(driver, state_when(lambda s: s["authError"]), "the token to be refused")

    submit(TOKEN)
    state = wait_for(driver, updated, "the dashboard with the token")
    assert not state["authShown"]
    assert wait_for(driver, shows_row(run["execution_id"]), "the run made with the token")["cells"][1] == (
        "dashboard-token"
    )
    assert driver.execute_script("return sessionStorage.getItem('stockade.token')") == TOKEN

    driver.refresh()  # the token is kept for the tab's session: no form this time
    state = wait_for(driver, updated, "the dashboard after a reload")
    assert not state["authShown"]
    # Chromium logs each 401 itself; there were two (no token, the wrong one), and the
    # page stopped polling while it waited for a token, so nothing more.
    refused = rf"{API} - Failed to load resource: .*401"
    assert browser_harness.console_errors(driver, expected=[refused]) == []

    live.stop()  # the audit log is complete once the daemon has stopped
    # Three refusals from one peer within seconds (the test's own call, the page's first poll
    # and the wrong token): one record, the other two counted when the log closes.
    failures = _auth_failures(live.daemon)
    assert len(failures) == 1 and failures[0]["method"] == "/api/v1/sandbox/status", failures
    assert failures[0]["door"] == "http" and failures[0]["peer"] == "127.0.0.1"
    with open(live.daemon.audit_log) as f:
        unrecorded = [json.loads(line) for line in f if '"auth_failures_unrecorded"' in line]
    assert [r["count"] for r in unrecorded] == [2]
    with open(live.daemon.audit_log) as f:
        audit = f.read()
    assert TOKEN not in audit and "wrong-token" not in audit


def test_a_stopped_daemon_shows_a_banner_until_one_answers_again(driver: Any, stockade: Callable[..., Live]) -> None:
    live = stockade()
    open_dashboard(driver, live.url)
    before = live.execute(agent_id="dashboard-banner", code=OK)
    wait_for(driver, shows_row(before["execution_id"]), "the run's row")

    live.stop()
    state = wait_for(driver, state_when(lambda s: s["banner"]), "the disconnected banner")
    assert "Disconnected" in state["banner"]
    assert state["status"] == "disconnected"

    # A new daemon on the same address: the page, still polling, picks it up on its own.
    again = stockade(port=urlsplit(live.url).port)
    after = again.execute(agent_id="dashboard-banner", code=OK)
    wait_for(driver, shows_row(after["execution_id"]), "the page to come back")
    state = page_state(driver)
    assert state["banner"] is None and state["executions"] == 1  # the new daemon's history is its own
    assert execution_row(driver, before["execution_id"]) is None
    # The page logs nothing itself: what is there is Chromium's own line per failed fetch.
    assert browser_harness.console_errors(driver, expected=[rf"{API} - Failed to load resource: net::ERR_"]) == []
