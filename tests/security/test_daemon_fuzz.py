"""Random requests against a real daemon: every one gets a well-formed answer, none an internal error.

"Nothing a client sends can crash the daemon" (issue 4), checked with
requests built from the daemon's own method and parameter names and values of
every JSON type, including the hostile ones (huge numbers, NaN, deep nesting,
paths out of the sandbox, bad base64). An ``internal`` error code means an
exception the daemon did not expect: a bug, even though the daemon survived it.
The generator is seeded, and a failure names the seed and the request.
"""

from __future__ import annotations

import json
import os
import random
import socket
from typing import Any

import pytest

from tests.daemon_harness import start_daemon

METHODS = [
    "ping", "execute", "sandbox.create", "sandbox.exec", "sandbox.run_code", "sandbox.write_file",
    "sandbox.read_file", "sandbox.list_dir", "sandbox.close", "sandbox.publish", "execute.cancel", "status",
    "runtimes", "selftest",
    "sandbox.", "", "execute ",
]  # fmt: skip
PARAMS = [
    "command", "code", "language", "policy", "stdin", "stdin_b64", "sandbox_id", "path", "data", "mode",
    "max_bytes", "env", "cwd", "timeout", "keep", "stream", "idle_timeout", "execution_id", "port",
]  # fmt: skip
POLICY_FIELDS = [
    "runtime", "isolation", "trust", "memory_mb", "cpu_limit", "pids_limit", "timeout_seconds", "network_policy",
    "max_output_bytes", "disk_mb", "environment", "on_violation", "shared_paths", "allowed_hosts", "unknown_field",
]  # fmt: skip
SCALARS: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2**63, -(2**70), 1e308, -0.0, 0.5, float("nan"), float("inf"),
    "", "python", "bash", "cobol", "echo hi", "pass", "print(1)", "/etc/passwd", "../../../../etc/shadow",
    "/work/f", "sb-0000000000000000", "not base64!", "aGk=", "\x00", "é" * 40, "x" * 5000,
]  # fmt: skip


def _value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.6:
        return rng.choice(SCALARS)
    if roll < 0.75:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if roll < 0.85:
        return ["echo", "fuzz"] if rng.random() < 0.5 else ["true"]
    if roll < 0.95:
        return {rng.choice(POLICY_FIELDS): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    nested: Any = 0
    for _ in range(rng.randint(50, 400)):  # deep nesting
        nested = [nested]
    return nested


def _near_valid(rng: random.Random, held: list[str]) -> tuple[str, dict[str, Any]]:
    """A request that gets past the first checks, with one or two parameters gone wrong."""
    policy = {rng.choice(POLICY_FIELDS): _value(rng) for _ in range(rng.randint(0, 2))}
    sandbox_id = rng.choice(held) if held and rng.random() < 0.9 else rng.choice(SCALARS)
    method, params = rng.choice(
        [
            ("execute", {"command": ["echo", "fuzz"], "policy": policy}),
            ("execute", {"code": "print(1)", "language": rng.choice(["python", "bash", "cobol"]), "policy": policy}),
            ("sandbox.create", {"policy": policy}),
            ("sandbox.create", {"policy": policy, "idle_timeout": _value(rng)}),
            ("sandbox.exec", {"sandbox_id": sandbox_id, "command": ["echo", "x"]}),
            ("sandbox.run_code", {"sandbox_id": sandbox_id, "code": "print(2)"}),
            ("sandbox.write_file", {"sandbox_id": sandbox_id, "path": "/work/f", "data": "aGk="}),
            ("sandbox.read_file", {"sandbox_id": sandbox_id, "path": "/work/f"}),
            ("sandbox.list_dir", {"sandbox_id": sandbox_id, "path": rng.choice(["/work", "/", "/nope", 7])}),
            ("sandbox.close", {"sandbox_id": sandbox_id}),
            ("execute.cancel", {"execution_id": rng.choice(SCALARS)}),
        ]
    )
    # Now and then a stray parameter too: refused by name (requests take no unknown fields).
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        params[rng.choice(PARAMS)] = _value(rng)
    return method, params


def _request(rng: random.Random, msg_id: int, held: list[str]) -> dict[str, Any]:
    if rng.random() < 0.4:
        method, near = _near_valid(rng, held)
        return {"method": method, "params": near, "id": msg_id}
    params: Any = {rng.choice(PARAMS): _value(rng) for _ in range(rng.randint(0, 5))}
    if rng.random() < 0.05:
        params = _value(rng)  # not an object at all
    request: dict[str, Any] = {"method": rng.choice(METHODS), "params": params, "id": msg_id}
    if rng.random() < 0.05:
        request["id"] = _value(rng)
    return request


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("FUZZ_SEEDS", "1,2,3,10").split(",")])
def test_random_requests_get_well_formed_answers(process_runtime: str, seed: int) -> None:
    d = start_daemon({"STOCKADE_MAX_REQUESTS": "100000", "STOCKADE_MAX_SANDBOXES": "4",
                      "STOCKADE_QUEUE_TIMEOUT": "0.2", "STOCKADE_MAX_REQUEST_BYTES": "65536"})  # fmt: skip
    rng = random.Random(seed)
    outcomes: list[str] = []
    held: list[str] = []  # sandboxes the fuzzer created, for later requests to use
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(d.socket_path)
            replies = s.makefile("rb")
            for msg_id in range(150):
                request = _request(rng, msg_id, held)
                line = json.dumps(request).encode()  # NaN and Infinity go out as Python's json writes them
                s.sendall(line + b"\n")
                raw = replies.readline()
                while b'"output"' in raw and b'"result"' not in raw:
                    raw = replies.readline()  # output streamed ahead of the answer
                where = f"seed {seed}, request {line[:300]!r}"
                assert raw.endswith(b"\n"), f"no answer ({where}); daemon log: {d.logs()[-2000:]}"
                reply = json.loads(raw)
                assert isinstance(reply, dict) and set(reply) >= {"result", "error", "id"}, where
                assert (reply["result"] is None) != (reply["error"] is None), where
                outcomes.append(reply.get("error_code") or "ok")
                if isinstance(reply["result"], dict) and "sandbox_id" in reply["result"]:
                    held.append(reply["result"]["sandbox_id"])
                assert reply.get("error_code") != "internal", f"{reply['error']} ({where})"
                if type(request["id"]) is int and len(line) <= 65536:  # a bool id is refused, answered with null
                    assert reply["id"] == request["id"], where
            s.sendall(b'{"method": "ping", "params": {}, "id": "after"}\n')
            assert json.loads(replies.readline()) == {"result": "pong", "error": None, "id": "after"}
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.logs(), d.logs()[-3000:]
    # The fuzzer got deep: real runs, real sandboxes, and refusals from the Policy itself.
    assert outcomes.count("ok") >= 5 and "policy" in outcomes and held, sorted(set(outcomes))


@pytest.mark.parametrize("signed", [False, True])
def test_a_request_nested_a_million_deep_is_refused_and_the_connection_lives(
    process_runtime: str, signed: bool
) -> None:
    env = {"STOCKADE_MAX_REQUEST_BYTES": str(4 << 20)}
    if signed:  # the HMAC's encoding recurses deeper than the decoding did: depths just under its limit too
        env["STOCKADE_AUTH_TOKEN"] = "t" * 32
    d = start_daemon(env)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(d.socket_path)
            replies = s.makefile("rb")
            # Under the count of values a request may hold (more are refused unparsed), deeper than json's parser goes.
            deep = b"[" * 150_000
            inside = b'{"method": "ping", "params": {"x": ' + b"[" * 150_000 + b"]" * 150_000 + b'}, "id": 1}'
            for first, line in ((True, deep), (False, inside)):
                s.sendall(line + b"\n")
                reply = json.loads(replies.readline())
                if signed and not first:  # after a line no signed client sends, a large one is not read
                    assert reply["error_code"] == "unproven", reply
                    continue
                assert reply["error_code"] == "invalid_request" and "nested too deeply" in reply["error"], reply
            for depth in range(900, 1000, 10):  # decoded, then too deep to encode for the HMAC
                nested = b"[" * depth + b"]" * depth
                s.sendall(b'{"method": "ping", "params": {"x": ' + nested + b'}, "id": 2, "hmac": "00"}\n')
                reply = json.loads(replies.readline())  # answered (refused), never a dropped connection
                refusals = ("invalid_params", "invalid_request", "auth")
                assert reply["result"] is None and reply["error_code"] in refusals, reply
            s.sendall(b'{"method": "ping", "params": {}, "id": "after"}\n')
            after = json.loads(replies.readline())  # the same connection still answers (unsigned: refused)
            assert after["id"] == "after" and (after["result"] == "pong" or after["error_code"] == "auth"), after
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.logs(), d.logs()[-3000:]
