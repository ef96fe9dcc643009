"""Front-door conformance: the same request gets the same answer whichever door it comes in by.

The daemon has one controller and one method table (``daemon/methods.py``);
three doors lead to it, and each is driven here through an adapter with one
interface, whose answers are normalized to ``("ok", <result>)`` or
``("error", <code>)``:

- ``in-process``: ``methods.dispatch`` on a ``Controller`` of this process,
  with the ``fake`` runtime (the real guest agent in a plain child process:
  it runs real commands, only confines nothing, so every scenario runs on it);
  the code of a raised error is ``errors.error_code``'s.
- ``unix``: a real daemon's Unix socket, through ``Client.call`` (raw params,
  so that a request the client library would refuse still reaches the
  daemon); the code is the raised class's, mapped back by ``error_code``.
- ``http``: the same daemon's HTTP API, through httpx; the code is the
  body's ``code``, and the status must be ``HTTP_STATUS[code]``.

Both real doors use the ``process`` runtime. Every scenario is one expected
outcome, parametrized over the doors: where a door answers differently from
the others, the test fails for that door.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.client import Client
from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.daemon.methods import dispatch
from stockade.errors import HTTP_STATUS, error_code
from stockade.limits import MAX_CALL_BYTES
from stockade.policy import Policy
from stockade.protocol.models import unix_caller
from stockade.result import ExecResult
from tests import daemon_harness
from tests.conftest import require
from tests.daemon_harness import Daemon, start_daemon

Outcome = tuple[str, Any]
DOORS = ["in-process", "unix", "http"]
MISSING_SANDBOX = "sb-0000000000000000"
CALL_TIMEOUT_S = 60.0  # a bound on a hung door, never a timing assertion

# The seed-003 body names of the policy fields an execute may set (HTTP door).
SEED_POLICY_FIELDS = {
    "timeout_seconds": "timeout_seconds",
    "memory_mb": "memory_limit_mb",
    "cpu_limit": "cpu_limit",
    "environment": "environment",
}


# ---- the doors -------------------------------------------------------------------------------


class Door:
    """One way into the daemon: every method answers ``("ok", result)`` or ``("error", code)``.

    ``runtime`` is the runtime the door's requests ask for; ``scratch`` a
    directory a held sandbox of that runtime may write to.
    """

    name: str
    runtime: str
    scratch: str

    def __init__(self) -> None:
        self.opened: list[str] = []  # held sandboxes this door created: closed at its end

    # Subclasses send a request by method name with the daemon's own params.
    def call(self, method: str, params: dict[str, Any]) -> Outcome:
        raise NotImplementedError

    def policy(self, fields: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"runtime": self.runtime, **(fields or {})}

    def execute(self, **fields: Any) -> Outcome:
        """A one-shot run: ``command`` or ``code``, ``language``, ``stdin``, ``policy`` (its
        fields), ``extra`` (more top-level fields, sent as they are)."""
        return self.answer_run(self.execute_answer(**fields))

    def execute_answer(
        self,
        *,
        command: list[str] | None = None,
        code: str | None = None,
        language: str | None = None,
        stdin: str | None = None,
        policy: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Outcome:
        """``execute``'s answer as the door gives it (not normalized)."""
        params: dict[str, Any] = {"policy": self.policy(policy), **(extra or {})}
        for key, value in (("command", command), ("code", code), ("language", language), ("stdin", stdin)):
            if value is not None:
                params[key] = value
        return self.call("execute", params)

    def create(self, policy: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Outcome:
        return self.create_body({"policy": self.policy(policy), **(extra or {})})

    def create_body(self, body: dict[str, Any]) -> Outcome:
        """``sandbox.create`` with ``body`` as it is (the HTTP API's body is the same)."""
        return self.answer_created(self.call("sandbox.create", body))

    def exec(self, sid: str, argv: list[str], stdin: str | None = None, extra: dict[str, Any] | None = None) -> Outcome:
        params: dict[str, Any] = {"sandbox_id": sid, "command": argv, **(extra or {})}
        if stdin is not None:
            params["stdin"] = stdin
        return self.answer_run(self.call("sandbox.exec", params))

    def run_code(self, sid: str, code: str, language: str = "python", stdin: str | None = None) -> Outcome:
        params: dict[str, Any] = {"sandbox_id": sid, "code": code, "language": language}
        if stdin is not None:
            params["stdin"] = stdin
        return self.answer_run(self.call("sandbox.run_code", params))

    def write(self, sid: str, path: str, data: bytes) -> Outcome:
        params = {"sandbox_id": sid, "path": path, "data": base64.b64encode(data).decode()}
        return self.call("sandbox.write_file", params)

    def read(self, sid: str, path: str) -> Outcome:
        kind, answer = self.call("sandbox.read_file", {"sandbox_id": sid, "path": path})
        return (kind, base64.b64decode(answer["data"])) if kind == "ok" else (kind, answer)

    def list(self, sid: str, path: str) -> Outcome:
        return self.call("sandbox.list_dir", {"sandbox_id": sid, "path": path})

    def close(self, sid: str) -> Outcome:
        return self.call("sandbox.close", {"sandbox_id": sid})

    def cancel(self, eid: str) -> Outcome:
        return self.call("execute.cancel", {"execution_id": eid})

    # ---- normalizing ----------------------------------------------------------------------

    def answer_run(self, outcome: Outcome) -> Outcome:
        """A run's answer, as the fields every door's result shape has."""
        kind, answer = outcome
        if kind != "ok":
            return outcome
        return "ok", {
            "exit_code": answer["exit_code"],
            "stdout": answer["stdout"],
            "stderr": answer["stderr"],
            "termination_reason": answer["termination_reason"],
            "success": answer["success"],
            "runtime_is_the_doors": answer["runtime_used"] == self.runtime,
        }

    def answer_created(self, outcome: Outcome) -> Outcome:
        kind, answer = outcome
        if kind != "ok":
            return outcome
        self.opened.append(answer["sandbox_id"])
        return "ok", {
            "sandbox_id": answer["sandbox_id"],
            "runtime_is_the_doors": answer["runtime"] == self.runtime,
            "idle_timeout": answer["idle_timeout"],
        }

    def shut(self) -> None:
        for sid in self.opened:
            self.close(sid)  # not_found for those a test closed itself


class InProcessDoor(Door):
    """``methods.dispatch`` on a controller of this process, on one event loop (``asyncio.Runner``,
    what ``asyncio.run`` is made of), so that a held sandbox outlives one call."""

    name = "in-process"
    runtime = "fake"

    def __init__(self, scratch: str) -> None:
        super().__init__()
        self.scratch = scratch
        self.caller = unix_caller(0)
        self.runner = asyncio.Runner()
        self.controller = self.runner.run(self._controller())

    @staticmethod
    async def _controller() -> Controller:
        return Controller(DaemonConfig(pool_size=0, allow_unisolated=True))  # its fake runtime, in this process

    def call(self, method: str, params: dict[str, Any]) -> Outcome:
        try:
            answer = self.runner.run(
                asyncio.wait_for(dispatch(self.controller, method, params, self.caller), CALL_TIMEOUT_S)
            )
        except Exception as exc:
            return "error", error_code(exc)
        return "ok", answer.to_dict() if isinstance(answer, ExecResult) else answer.model_dump(mode="json")

    def shut(self) -> None:
        try:
            super().shut()
            self.runner.run(self.controller.shutdown(0))
        finally:
            self.runner.close()


class UnixDoor(Door):
    """A real daemon's Unix socket: ``Client.call`` with the daemon's own params."""

    name = "unix"
    runtime = "process"
    scratch = "/tmp"

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.client = Client(daemon.socket_path, timeout=CALL_TIMEOUT_S)

    def call(self, method: str, params: dict[str, Any]) -> Outcome:
        try:
            return "ok", self.client.call(method, params)
        except Exception as exc:
            return "error", error_code(exc)

    def shut(self) -> None:
        try:
            super().shut()
        finally:
            self.client.close()


class HttpDoor(Door):
    """The same daemon's HTTP API: seed 003's execute, the held sandboxes' REST routes."""

    name = "http"
    runtime = "process"
    scratch = "/tmp"
    _agents = itertools.count(1)

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        assert daemon.http_url is not None
        self.http = httpx.Client(base_url=daemon.http_url, timeout=CALL_TIMEOUT_S)

    def _answer(self, response: httpx.Response, raw: bool = False) -> Outcome:
        if response.is_success:
            return "ok", response.content if raw else response.json()
        try:
            code = response.json()["code"]
        except (ValueError, KeyError, TypeError):
            return "error", f"HTTP {response.status_code} without an error body"
        assert response.status_code == HTTP_STATUS.get(code), (code, response.status_code, response.text[:300])
        return "error", code

    @staticmethod
    def _sandbox(sid: str, tail: str = "") -> str:
        return f"/api/v1/sandboxes/{urllib.parse.quote(sid, safe='')}{tail}"

    def execute_answer(
        self,
        *,
        command: list[str] | None = None,
        code: str | None = None,
        language: str | None = None,
        stdin: str | None = None,
        policy: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Outcome:
        # Seed 003's body: the policy's fields at the top level, under the seed's names.
        # An agent_id of its own for each call: the per-agent rate limit is not what is tested.
        body: dict[str, Any] = {"agent_id": f"front-doors-{next(self._agents)}", "runtime": self.runtime}
        for field, value in (policy or {}).items():
            body[SEED_POLICY_FIELDS[field]] = value
        for key, value in (("command", command), ("code", code), ("language", language), ("stdin", stdin)):
            if value is not None:
                body[key] = value
        body.update(extra or {})
        return self._answer(self.http.post("/api/v1/sandbox/execute", json=body))

    def create_body(self, body: dict[str, Any]) -> Outcome:
        return self.answer_created(self._answer(self.http.post("/api/v1/sandboxes", json=body)))

    def exec(self, sid: str, argv: list[str], stdin: str | None = None, extra: dict[str, Any] | None = None) -> Outcome:
        body: dict[str, Any] = {"command": argv, **(extra or {})}
        if stdin is not None:
            body["stdin"] = stdin
        return self.answer_run(self._answer(self.http.post(self._sandbox(sid, "/exec"), json=body)))

    def run_code(self, sid: str, code: str, language: str = "python", stdin: str | None = None) -> Outcome:
        body: dict[str, Any] = {"code": code, "language": language}
        if stdin is not None:
            body["stdin"] = stdin
        return self.answer_run(self._answer(self.http.post(self._sandbox(sid, "/run_code"), json=body)))

    def write(self, sid: str, path: str, data: bytes) -> Outcome:
        response = self.http.put(
            self._sandbox(sid, "/files"),
            params={"path": path},
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        return self._answer(response)

    def read(self, sid: str, path: str) -> Outcome:
        return self._answer(self.http.get(self._sandbox(sid, "/files"), params={"path": path}), raw=True)

    def list(self, sid: str, path: str) -> Outcome:
        return self._answer(self.http.get(self._sandbox(sid, "/files/list"), params={"path": path}))

    def close(self, sid: str) -> Outcome:
        return self._answer(self.http.delete(self._sandbox(sid)))

    def cancel(self, eid: str) -> Outcome:
        return self._answer(self.http.delete(f"/api/v1/sandbox/execute/{urllib.parse.quote(eid, safe='')}"))

    def shut(self) -> None:
        try:
            super().shut()
        finally:
            self.http.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One real daemon, both doors open, for the whole module (the process runtime's)."""
    require("process")
    daemon = start_daemon(http="127.0.0.1:0")
    # Kept for the module: conftest's per-test cleanup ends every daemon in STARTED.
    daemon_harness.STARTED.remove(daemon)
    try:
        yield daemon
        daemon.stop()
        logs = daemon.logs()
        # Every refusal above is an answer with its code: none is a fault of the daemon's own.
        assert "Traceback" not in logs and "internal error" not in logs, logs[-4000:]
    finally:
        daemon.cleanup()


@pytest.fixture(params=DOORS)
def door(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Door]:
    if request.param == "in-process":
        chosen: Door = InProcessDoor(str(tmp_path))
    else:
        daemon: Daemon = request.getfixturevalue("daemon")
        chosen = UnixDoor(daemon) if request.param == "unix" else HttpDoor(daemon)
    try:
        yield chosen
    finally:
        chosen.shut()


def ran(stdout: str = "", exit_code: int | None = 0, stderr: str = "", reason: str = "completed") -> Outcome:
    """The normalized outcome of a run that ran."""
    return "ok", {
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "termination_reason": reason,
        "success": reason == "completed" and exit_code == 0,
        "runtime_is_the_doors": True,
    }


def held(door: Door, policy: dict[str, Any] | None = None) -> str:
    kind, created = door.create(policy)
    assert kind == "ok", created
    return str(created["sandbox_id"])


def conforms(door: Door, outcome: Outcome, expected: Outcome) -> None:
    """``outcome`` is ``expected``, whatever door gave it."""
    assert outcome == expected, door.name


# ---- one-shot runs ---------------------------------------------------------------------------


def test_a_successful_command(door: Door) -> None:
    assert door.execute(command=["echo", "hello", "world"]) == ran("hello world\n")


def test_a_failing_command(door: Door) -> None:
    outcome = door.execute(command=["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert outcome == ran("out\n", exit_code=3, stderr="err\n")


def test_a_command_killed_by_a_signal(door: Door) -> None:
    assert door.execute(command=["sh", "-c", "kill -9 $$"]) == ran(exit_code=-9, reason="killed")


def test_a_command_that_cannot_start_is_a_missing_path(door: Door) -> None:
    # As subprocess.run raises FileNotFoundError, every door says path_not_found.
    assert door.execute(command=["/no/such/command"]) == ("error", "path_not_found")


def test_stdin_is_passed_through(door: Door) -> None:
    assert door.execute(command=["cat"], stdin="piped\nthrough\n") == ran("piped\nthrough\n")
    assert door.execute(code="import sys; print(sys.stdin.read().upper(), end='')", stdin="abc\n") == ran("ABC\n")


def test_a_command_and_code_run_alike(door: Door) -> None:
    assert door.execute(command=["sh", "-c", "echo $((6 * 7))"]) == ran("42\n")
    assert door.execute(code="print(6 * 7)") == ran("42\n")
    assert door.execute(code="print(6 * 7)", language="python") == ran("42\n")
    assert door.execute(code="echo $((6 * 7))", language="bash") == ran("42\n")


def test_output_that_is_not_utf8_is_replaced_alike(door: Door) -> None:
    assert door.execute(command=["printf", "\\377ok"]) == ran("\ufffdok")


@pytest.mark.parametrize(
    "fields",
    [
        {"command": ["true"], "code": "pass"},
        {},
        {"code": "pass", "language": "cobol"},
        {"command": []},
        {"command": "echo hi"},
        {"command": ["cat"], "stdin": 5},
    ],
    ids=["command-and-code", "neither", "unknown-language", "empty-command", "command-a-string", "stdin-a-number"],
)
def test_a_malformed_execute_is_invalid_params(door: Door, fields: dict[str, Any]) -> None:
    assert door.execute(**fields) == ("error", "invalid_params")


def test_a_timeout_is_a_result_not_an_error(door: Door) -> None:
    kind, result = door.execute(command=["sleep", "5"], policy={"timeout_seconds": 1})
    assert kind == "ok", result
    # -9 (the agent killed it) or None (the host gave up on the agent first, on a loaded host).
    assert result["exit_code"] in (-9, None), result
    assert (kind, result) == ran(exit_code=result["exit_code"], reason="timeout")


def test_the_policy_asked_is_the_policy_run(door: Door) -> None:
    """A door runs the policy it was asked for: the result's digest is that policy's."""
    fields = {"timeout_seconds": 7, "memory_mb": 256}
    kind, answer = door.execute_answer(code="pass", policy=fields)
    assert kind == "ok", answer
    assert answer["policy_digest"] == Policy.build(runtime=door.runtime, **fields).digest


# ---- refused requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [{"timeout_seconds": 0}, {"timeout_seconds": 601}, {"memory_mb": 1}, {"cpu_limit": 0.001}],
    ids=["timeout-0", "timeout-over-max", "memory-too-small", "cpu-too-small"],
)
def test_a_bad_policy_value_on_execute_is_policy(door: Door, policy: dict[str, Any]) -> None:
    outcome = door.execute(command=["true"], policy=policy)
    conforms(door, outcome, ("error", "policy"))


def test_an_environment_with_a_bad_name_on_execute_is_policy(door: Door) -> None:
    # Checked by Policy's own validator, not by a bound the seed body repeats: 'policy' on every door.
    assert door.execute(command=["true"], policy={"environment": {"A=B": "x"}}) == ("error", "policy")


@pytest.mark.parametrize(
    "policy",
    [{"timeout_seconds": 0}, {"memory_mb": 1}, {"pids_limit": 1}, {"no_such_field": 1}, {"network_policy": "full"}],
    ids=["timeout-0", "memory-too-small", "pids-too-small", "unknown-policy-field", "network-full"],
)
def test_a_bad_policy_value_on_create_is_policy(door: Door, policy: dict[str, Any]) -> None:
    assert door.create(policy) == ("error", "policy")


def test_a_policy_that_is_not_an_object_is_policy(door: Door) -> None:
    outcome = door.create_body({"policy": [1]})
    conforms(door, outcome, ("error", "policy"))


def test_an_unknown_field_is_invalid_params(door: Door) -> None:
    assert door.execute(command=["true"], extra={"no_such_field": 1}) == ("error", "invalid_params")
    assert door.create(extra={"no_such_field": 1}) == ("error", "invalid_params")
    sid = held(door)
    assert door.exec(sid, ["true"], extra={"no_such_field": 1}) == ("error", "invalid_params")
    assert door.exec(sid, ["echo", "still", "there"]) == ran("still there\n")


@pytest.mark.parametrize("value", [0, -1, 10_000], ids=["zero", "negative", "over-the-daemons-limit"])
def test_a_bad_idle_timeout_is_invalid_params(door: Door, value: int) -> None:
    assert door.create(extra={"idle_timeout": value}) == ("error", "invalid_params")


@pytest.mark.parametrize("where", ["create-idle_timeout", "exec-timeout"])
def test_a_number_given_as_a_string_is_invalid_params(door: Door, where: str) -> None:
    if where == "create-idle_timeout":
        outcome = door.create(extra={"idle_timeout": "5"})
    else:
        outcome = door.exec(held(door), ["true"], extra={"timeout": "5"})
    conforms(door, ("ok", "accepted") if outcome[0] == "ok" else outcome, ("error", "invalid_params"))


@pytest.mark.parametrize(
    "sid", [MISSING_SANDBOX, "nope", "sb-../../etc", ""], ids=["missing", "malformed", "dotted", "empty"]
)
def test_an_unknown_sandbox_is_not_found(door: Door, sid: str) -> None:
    assert door.exec(sid, ["true"]) == ("error", "not_found")
    assert door.run_code(sid, "pass") == ("error", "not_found")
    assert door.write(sid, "/tmp/x", b"x") == ("error", "not_found")
    assert door.read(sid, "/tmp/x") == ("error", "not_found")
    assert door.list(sid, "/tmp") == ("error", "not_found")
    conforms(door, door.close(sid), ("error", "not_found"))


@pytest.mark.parametrize(
    "eid", ["0123456789abcdef0123456789abcdef", "nope", ""], ids=["well-formed", "malformed", "empty"]
)
def test_cancelling_an_unknown_execution_is_not_found(door: Door, eid: str) -> None:
    conforms(door, door.cancel(eid), ("error", "not_found"))


def test_a_call_over_the_limit_is_too_large(door: Door) -> None:
    over = "#" * (MAX_CALL_BYTES + 1)  # a Python comment: it would run, if it were sent
    assert door.execute(code=over) == ("error", "too_large")
    assert door.execute(command=["cat"], stdin=over) == ("error", "too_large")
    sid = held(door)
    assert door.exec(sid, ["cat"], stdin=over) == ("error", "too_large")
    assert door.run_code(sid, over) == ("error", "too_large")
    assert door.write(sid, f"{door.scratch}/big", over.encode()) == ("error", "too_large")
    # Refused before anything was sent: the sandbox is still in step.
    assert door.exec(sid, ["echo", "fine"]) == ran("fine\n")


# ---- a held sandbox, start to end ------------------------------------------------------------


def test_the_held_sandbox_lifecycle(door: Door) -> None:
    text = b"hello from the front door\n"
    blob = bytes(range(256))
    kind, created = door.create()
    assert kind == "ok", created
    sid = created["sandbox_id"]
    assert created == {"sandbox_id": sid, "runtime_is_the_doors": True, "idle_timeout": 600.0}
    assert sid.startswith("sb-")

    d = door.scratch
    assert door.write(sid, f"{d}/greeting.txt", text) == ("ok", {"path": f"{d}/greeting.txt", "size": len(text)})
    assert door.write(sid, f"{d}/blob.bin", blob) == ("ok", {"path": f"{d}/blob.bin", "size": 256})

    kind, listing = door.list(sid, d)
    assert kind == "ok", listing
    assert listing["path"] == d
    ours = [e for e in listing["entries"] if e["name"] in ("greeting.txt", "blob.bin")]
    assert ours == [
        {"name": "blob.bin", "type": "file", "size": 256},
        {"name": "greeting.txt", "type": "file", "size": len(text)},
    ]

    assert door.exec(sid, ["cat", f"{d}/greeting.txt"]) == ran(text.decode())
    assert door.exec(sid, ["sh", "-c", f"cat; wc -c < {d}/blob.bin"], stdin="in\n") == ran("in\n256\n")
    assert door.exec(sid, ["sh", "-c", "echo out; echo err >&2; exit 3"]) == ran("out\n", exit_code=3, stderr="err\n")
    code = f"print(open('{d}/greeting.txt').read().upper(), end='')"
    assert door.run_code(sid, code) == ran(text.decode().upper())
    assert door.run_code(sid, f"wc -c < {d}/blob.bin", language="bash") == ran("256\n")

    assert door.read(sid, f"{d}/blob.bin") == ("ok", blob)
    assert door.read(sid, f"{d}/greeting.txt") == ("ok", text)
    # A path that is not there is path_not_found on every door; what else the agent refuses is its error.
    assert door.read(sid, f"{d}/no-such-file") == ("error", "path_not_found")
    assert door.list(sid, f"{d}/no-such-dir") == ("error", "path_not_found")
    assert door.read(sid, d) == ("error", "agent")  # a directory
    assert door.exec(sid, ["/no/such/command"]) == ("error", "path_not_found")
    assert door.exec(sid, ["echo", "still", "in", "step"]) == ran("still in step\n")

    assert door.close(sid) == ("ok", {"sandbox_id": sid, "closed": True})
    assert door.exec(sid, ["true"]) == ("error", "not_found")
    assert door.run_code(sid, "pass") == ("error", "not_found")
    assert door.write(sid, f"{d}/late", b"x") == ("error", "not_found")
    assert door.read(sid, f"{d}/blob.bin") == ("error", "not_found")
    assert door.list(sid, d) == ("error", "not_found")
    assert door.close(sid) == ("error", "not_found")


def test_a_held_call_that_times_out_leaves_the_sandbox_usable(door: Door) -> None:
    sid = held(door, {"timeout_seconds": 1})
    kind, result = door.exec(sid, ["sleep", "5"])
    assert kind == "ok", result
    assert result["exit_code"] in (-9, None), result
    assert (kind, result) == ran(exit_code=result["exit_code"], reason="timeout")
    assert door.exec(sid, ["echo", "after"]) == ran("after\n")
