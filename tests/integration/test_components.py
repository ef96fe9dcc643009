"""Long-lived components: start, status, ps, logs, stop, restart policies, a killed supervisor."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import processes_with_arg

CLI = [sys.executable, "-m", "stockade.cli"]


@pytest.fixture
def cli(process_runtime: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    env = {**os.environ, "STOCKADE_STATE_DIR": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)

    yield run
    status = run("status", "--json")
    for component in json.loads(status.stdout or "[]"):
        if component["status"] in ("starting", "running"):
            run("stop", component["name"])


def _status(cli: Callable[..., subprocess.CompletedProcess[str]], name: str) -> dict[str, object]:
    out = cli("status", name, "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)[0]
    return result


def _wait(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_lifecycle(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.5"
    started = cli("start", "--name", "ticker", "--memory", "64", "--", "sh", "-c",
                  f"while true; do echo tick; sleep {marker}; done")  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert _status(cli, "ticker")["status"] == "running"
    _wait(lambda: b"tick" in cli("logs", "ticker").stdout.encode())
    assert processes_with_arg(marker)
    assert "ticker" in cli("ps").stdout  # another CLI process sees the same state
    stopped = cli("stop", "ticker")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert _status(cli, "ticker")["status"] == "stopped"
    _wait(lambda: not processes_with_arg(marker))


def test_failed_command_is_failed(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    out = cli("start", "--name", "oops", "--", "sh", "-c", "echo broken >&2; exit 3")
    # 1 if it had already failed when `start` looked, 0 if it was still running then
    assert out.returncode in (0, 1), out.stderr
    _wait(lambda: _status(cli, "oops")["status"] == "failed")
    state = _status(cli, "oops")
    assert state["exit_code"] == 3 and state["restarts"] == 0
    assert "broken" in cli("logs", "oops").stdout


def test_restart_on_failure(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    assert cli("start", "--name", "flaky", "--restart", "on-failure", "--", "sh", "-c", "exit 1").returncode == 0
    _wait(lambda: int(str(_status(cli, "flaky")["restarts"])) >= 2, timeout=30)
    assert cli("stop", "flaky").returncode == 0
    assert _status(cli, "flaky")["status"] == "stopped"


def test_restart_always_restarts_clean_exits(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    assert cli("start", "--name", "loop", "--restart", "always", "--", "echo", "again").returncode == 0
    _wait(lambda: int(str(_status(cli, "loop")["restarts"])) >= 1, timeout=30)
    assert cli("stop", "loop").returncode == 0


def test_killed_supervisor_is_reported_and_its_isolate_dies(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.25"
    assert cli("start", "--name", "victim", "--", "sleep", marker).returncode == 0
    pid = int(str(_status(cli, "victim")["supervisor_pid"]))
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: _status(cli, "victim")["status"] == "failed")
    assert "supervisor is gone" in str(_status(cli, "victim")["error"])
    _wait(lambda: not processes_with_arg(marker))


def test_bad_input(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    for args in (("start", "--name", "Bad Name", "--", "true"), ("start", "--name", "x"), ("logs", "nobody")):
        out = cli(*args)
        assert out.returncode == 125, (args, out.stderr)
    out = cli("start", "--name", "mem", "--memory", "999999", "--", "true")
    assert out.returncode == 125 and "memory_mb" in out.stderr
    assert cli("start", "--name", "dup", "--", "sleep", "60").returncode == 0
    again = cli("start", "--name", "dup", "--", "sleep", "60")
    assert again.returncode == 125 and "already running" in again.stderr
