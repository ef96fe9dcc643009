"""SandboxFusion's ``/run_code`` served by a real in-process stockade sandbox.

The expected shapes are SandboxFusion's own (bytedance/SandboxFusion,
sandbox/server/sandbox_api.py, sandbox/runners/types.py and the examples of
docs/docs/docs/how-to/run-code/upload-download-files.mdx); the request bodies
are what verl sends (verl/utils/reward_score/sandbox_fusion/utils.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from pydantic import ValidationError

from stockade.errors import CallTooLargeError
from stockade.result import ExecResult
from stockade.runtimes.manager import RuntimeManager
from stockade.sdk_async import AsyncSandbox
from stockade.server.sandboxfusion import (
    LANGUAGES,
    CommandRunResult,
    LanguageNotSupported,
    RequestNotSupported,
    RunCodeRequest,
    RunCodeResponse,
    command_result,
    policy_fields,
    run,
    run_status,
)

# The published field names (sandbox_api.py RunCodeRequest/RunCodeResponse, types.py CommandRunResult).
REQUEST_KEYS = {
    "compile_timeout",
    "run_timeout",
    "memory_limit_MB",
    "code",
    "stdin",
    "language",
    "files",
    "fetch_files",
}
RESPONSE_KEYS = {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
COMMAND_KEYS = {"status", "execution_time", "return_code", "stdout", "stderr"}


class Held:
    """The HeldSandbox an HTTP layer would pass: a thin adapter over AsyncSandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self.sandbox = sandbox

    async def write_file(self, path: str, data: bytes) -> None:
        await self.sandbox.write_file(path, data)

    async def run_code(self, code: str, language: str, *, stdin: str | bytes, timeout: float) -> ExecResult:
        return await self.sandbox.run_code(code, language, stdin=stdin, timeout=timeout)

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return await self.sandbox.read_file(path, max_bytes)


def serve(manager: RuntimeManager, body: dict[str, Any]) -> dict[str, Any]:
    """What the HTTP layer does with one body: validate, take a sandbox, run, answer JSON."""
    request = RunCodeRequest.model_validate(body)

    async def go() -> RunCodeResponse:
        fields = {**policy_fields(request), "runtime": "process"}
        async with AsyncSandbox(fields, manager=manager) as sb:
            return await run(request, Held(sb))

    response = asyncio.run(go())
    answer: dict[str, Any] = json.loads(response.model_dump_json())
    return answer


def verl_body(code: str, stdin: str | None = None, timeout: int = 10, language: str = "python") -> dict[str, Any]:
    # verl's call_sandbox_api payload, field for field
    return {
        "compile_timeout": timeout,
        "run_timeout": timeout,
        "code": code,
        "stdin": stdin,
        "memory_limit_MB": 1024,
        "language": language,
        "files": {},
        "fetch_files": [],
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_hello_world_is_success_with_stdout(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, {"code": 'print("Hello, world!")', "language": "python"})
    assert answer["status"] == "Success"
    assert answer["message"] == ""
    assert answer["compile_result"] is None
    run_result = answer["run_result"]
    assert run_result["status"] == "Finished"
    assert run_result["return_code"] == 0
    assert run_result["stdout"] == "Hello, world!\n"
    assert run_result["stderr"] == ""
    assert isinstance(run_result["execution_time"], float) and run_result["execution_time"] >= 0
    assert answer["files"] == {}


def test_response_json_has_exactly_the_published_field_names(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, verl_body("print(1)"))
    assert set(answer) == RESPONSE_KEYS
    assert set(answer["run_result"]) == COMMAND_KEYS
    assert set(RunCodeRequest.model_fields) == REQUEST_KEYS
    assert set(RunCodeResponse.model_fields) == RESPONSE_KEYS
    assert set(CommandRunResult.model_fields) == COMMAND_KEYS


def test_request_defaults_are_sandboxfusions() -> None:
    request = RunCodeRequest.model_validate({"code": "pass", "language": "python"})
    assert request.compile_timeout == 10
    assert request.run_timeout == 10
    assert request.memory_limit_MB == -1
    assert request.stdin is None
    assert request.files == {}
    assert request.fetch_files == []
    with pytest.raises(ValidationError):  # code and language are required
        RunCodeRequest.model_validate({"code": "pass"})
    with pytest.raises(ValidationError):  # a language SandboxFusion does not know: FastAPI's 422
        RunCodeRequest.model_validate({"code": "pass", "language": "python3"})
    # unknown fields are ignored, as SandboxFusion's pydantic models ignore them
    assert RunCodeRequest.model_validate({"code": "x", "language": "bash", "extra": 1}).code == "x"


def test_bash_runs(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, verl_body("echo $((6 * 7))", language="bash"))
    assert answer["status"] == "Success"
    assert answer["run_result"]["stdout"] == "42\n"


def test_nonzero_exit_is_failed_with_the_return_code(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, verl_body("import sys\nsys.stderr.write('bad\\n')\nsys.exit(3)"))
    assert answer["status"] == "Failed"
    assert answer["message"] == ""
    assert answer["run_result"]["status"] == "Finished"
    assert answer["run_result"]["return_code"] == 3
    assert answer["run_result"]["stderr"] == "bad\n"

    raised = serve(manager, verl_body("raise ValueError('nope')"))
    assert raised["status"] == "Failed"
    assert raised["run_result"]["return_code"] == 1
    assert "ValueError: nope" in raised["run_result"]["stderr"]


def test_a_timeout_is_time_limit_exceeded(manager: RuntimeManager, process_runtime: str) -> None:
    body = verl_body("import time\nprint('started', flush=True)\ntime.sleep(30)", timeout=1)
    answer = serve(manager, body)
    assert answer["status"] == "Failed"
    run_result = answer["run_result"]
    assert run_result["status"] == "TimeLimitExceeded"
    assert run_result["return_code"] is None
    assert run_result["stdout"] == "started\n"
    assert 0.9 <= run_result["execution_time"] < 10


def test_stdin_reaches_the_code(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, verl_body("a, b = map(int, input().split())\nprint(a + b)", stdin="2 40\n"))
    assert answer["status"] == "Success"
    assert answer["run_result"]["stdout"] == "42\n"
    # stdin null (verl sends it when a case has no input): the code reads EOF
    empty = serve(manager, verl_body("import sys\nprint(repr(sys.stdin.read()))", stdin=None))
    assert empty["run_result"]["stdout"] == "''\n"


def test_files_are_written_where_the_code_runs(manager: RuntimeManager, process_runtime: str) -> None:
    body = {
        "code": "import os\nprint(open('flag.txt').read())\nprint(open('data/in.txt').read())\n"
        "print(open('/tmp/abs.txt').read())\nprint(os.getcwd())\nprint(os.path.exists('skipped.txt'))",
        "language": "python",
        "files": {
            "flag.txt": b64(b"secret flag"),
            "data/in.txt": b64(b"nested"),
            "/tmp/abs.txt": b64(b"absolute"),
            "skipped.txt": None,  # a null content is skipped, as SandboxFusion does
        },
    }
    answer = serve(manager, body)
    assert answer["status"] == "Success", answer
    assert answer["run_result"]["stdout"] == "secret flag\nnested\nabsolute\n/work\nFalse\n"


def test_bash_reads_files_by_relative_name(manager: RuntimeManager, process_runtime: str) -> None:
    body = {"code": "cat in.txt | tr a-z A-Z", "language": "bash", "files": {"in.txt": b64(b"hello")}}
    answer = serve(manager, body)
    assert answer["run_result"]["stdout"] == "HELLO"


def test_fetch_files_come_back_base64(manager: RuntimeManager, process_runtime: str) -> None:
    body = {
        "code": "open('flag.txt', 'w').write('this is a secret')\n"
        "import os\nos.mkdir('out')\nopen('out/b.bin', 'wb').write(bytes(range(256)))",
        "language": "python",
        "fetch_files": ["flag.txt", "out/b.bin"],
    }
    answer = serve(manager, body)
    assert answer["status"] == "Success"
    assert answer["files"]["flag.txt"] == "dGhpcyBpcyBhIHNlY3JldA=="  # SandboxFusion's documented example
    assert base64.b64decode(answer["files"]["out/b.bin"]) == bytes(range(256))


def test_a_missing_fetch_file_is_left_out(manager: RuntimeManager, process_runtime: str) -> None:
    body = {
        "code": "open('here.txt', 'w').write('x')",
        "language": "python",
        "fetch_files": ["missing.txt", "here.txt", "/work"],
    }
    answer = serve(manager, body)
    assert answer["status"] == "Success"
    assert answer["files"] == {"here.txt": b64(b"x")}


def test_a_file_named_many_ways_counts_under_each_name(manager: RuntimeManager, process_runtime: str) -> None:
    # Each name is sent with the file's bytes: eight names of a 1 MiB file are 8 MiB of answer,
    # more than one carries, however many times the file itself was read.
    names = ["f", *("./" * n + "f" for n in range(1, 8))]
    body = {"code": "open('f', 'wb').write(b'x' * (1 << 20))", "language": "python", "fetch_files": names}
    with pytest.raises(CallTooLargeError, match="fetch_files: the files asked for hold more than"):
        serve(manager, body)
    answer = serve(manager, {**body, "fetch_files": [*names[:6], "f", "f"]})  # a repeated name is one
    assert sorted(answer["files"]) == sorted(names[:6]) and answer["files"]["./f"] == b64(b"x" * (1 << 20))
    with pytest.raises(ValueError, match="at most 1024 items"):
        RunCodeRequest.model_validate({**body, "fetch_files": ["f"] * 1025})


def test_files_are_fetched_after_a_failed_run_too(manager: RuntimeManager, process_runtime: str) -> None:
    body = {"code": "echo partial > log.txt; exit 2", "language": "bash", "fetch_files": ["log.txt"]}
    answer = serve(manager, body)
    assert answer["status"] == "Failed"
    assert answer["run_result"]["return_code"] == 2
    assert base64.b64decode(answer["files"]["log.txt"]) == b"partial\n"


def test_bad_base64_is_a_sandbox_error(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, {"code": "print(1)", "language": "python", "files": {"a.txt": "abc"}})
    assert answer["status"] == "SandboxError"
    assert "could not write files" in answer["message"]
    assert answer["run_result"] is None


def test_an_unsupported_language_is_refused() -> None:
    for language in ("cpp", "go", "java", "nodejs", "pytest", "python_gpu"):
        request = RunCodeRequest(code="int main() {}", language=language)
        with pytest.raises(LanguageNotSupported) as caught:
            policy_fields(request)
        assert language in str(caught.value) and "python" in str(caught.value) and "bash" in str(caught.value)
        assert isinstance(caught.value, ValueError)
        with pytest.raises(LanguageNotSupported):
            asyncio.run(run(request, _NoSandbox()))  # refused before the sandbox is touched
    assert {"python", "bash", "cpp", "racket"} <= set(LANGUAGES)


def test_a_file_name_that_is_empty_or_holds_a_nul_is_refused_by_name() -> None:
    # It failed deep in the file calls, as a sandbox error here and an invalid request there.
    for fields in ({"files": {"a\x00b": "eA=="}}, {"files": {"": "eA=="}}, {"fetch_files": ["ok", "x\x00"]}):
        with pytest.raises(ValidationError, match=r"is no file name \(empty, or holding a NUL byte\)"):
            RunCodeRequest(code="1", language="python", **fields)
    assert RunCodeRequest(code="1", language="python", files={"a/b": None}, fetch_files=["c"]).files == {"a/b": None}


class _NoSandbox:
    async def write_file(self, path: str, data: bytes) -> None:
        raise AssertionError("touched")

    async def run_code(self, code: str, language: str, *, stdin: str | bytes, timeout: float) -> ExecResult:
        raise AssertionError("touched")

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        raise AssertionError("touched")


def test_policy_fields_bring_the_limits_into_stockades_range() -> None:
    def fields(**body: Any) -> dict[str, Any]:
        return policy_fields(RunCodeRequest(code="", language="python", **body))

    assert fields(memory_limit_MB=1024, run_timeout=10) == {"memory_mb": 1024, "timeout_seconds": 10}
    assert fields() == {"memory_mb": 2048, "timeout_seconds": 10}  # -1: no limit of its own -> stockade's largest
    assert fields(memory_limit_MB=0)["memory_mb"] == 2048
    assert fields(memory_limit_MB=8192)["memory_mb"] == 2048
    assert fields(memory_limit_MB=4)["memory_mb"] == 16
    assert fields(run_timeout=3600)["timeout_seconds"] == 600
    assert fields(run_timeout=0.5)["timeout_seconds"] == 0.5
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(RequestNotSupported):
            fields(run_timeout=bad)


def _exec(reason: str, exit_code: int | None, **more: Any) -> ExecResult:
    return ExecResult(
        success=reason == "completed" and exit_code == 0,
        termination_reason=reason,  # type: ignore[arg-type]
        exit_code=exit_code,
        runtime_used="process",
        policy_digest="x",
        execution_time_seconds=0.5,
        **more,
    )


@pytest.mark.parametrize(
    ("reason", "exit_code", "status", "return_code", "overall"),
    [
        ("completed", 0, "Finished", 0, "Success"),
        ("completed", 1, "Finished", 1, "Failed"),
        ("timeout", -9, "TimeLimitExceeded", None, "Failed"),
        ("memory_limit", -9, "Finished", -9, "Failed"),
        ("memory_limit", None, "Finished", -9, "Failed"),
        ("output_limit", -9, "Finished", -9, "Failed"),
        ("violation", None, "Finished", -9, "Failed"),
        ("killed", -15, "Finished", -15, "Failed"),
        ("error", None, "Error", None, "SandboxError"),
    ],
)
def test_termination_reasons_map_to_sandboxfusions_statuses(
    reason: str, exit_code: int | None, status: str, return_code: int | None, overall: str
) -> None:
    result = command_result(_exec(reason, exit_code, error="why" if reason != "completed" else None))
    assert result.status == status
    assert result.return_code == return_code
    assert result.execution_time == 0.5
    got, message = run_status(None, result)
    assert got == overall
    assert message == ("why" if overall == "SandboxError" else "")


def test_a_run_over_its_memory_is_failed_with_a_return_code(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, {"code": "x = bytearray(300 * 1024 * 1024)", "language": "python", "memory_limit_MB": 64})
    assert answer["status"] == "Failed"
    assert answer["run_result"]["status"] == "Finished"
    assert answer["run_result"]["return_code"] != 0
    assert isinstance(answer["run_result"]["return_code"], int)


def test_a_file_the_isolate_refuses_is_a_sandbox_error(manager: RuntimeManager, process_runtime: str) -> None:
    answer = serve(manager, {"code": "print(1)", "language": "python", "files": {"/usr/x.txt": b64(b"x")}})
    assert answer["status"] == "SandboxError"
    assert answer["message"].startswith("could not write files")
