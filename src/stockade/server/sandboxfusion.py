"""SandboxFusion's ``POST /run_code``, served by a stockade sandbox.

A framework configured with a SandboxFusion URL (verl's sandbox reward, the
``sandbox-fusion`` SDK, ...) sends ``RunCodeRequest`` and reads
``RunCodeResponse``; the models here match SandboxFusion's field by field, with
its defaults (bytedance/SandboxFusion ``sandbox/server/sandbox_api.py`` and
``sandbox/runners/types.py``). The HTTP layer validates the body as
``RunCodeRequest``, takes a held sandbox with ``policy_fields(request)`` and
answers ``await run(request, sandbox)``.

What stockade does as SandboxFusion does:

- The code runs with its working directory at ``/work`` (stockade's ``run_code``
  runs there already: the agent's default cwd is ``HOME=/work``), where
  SandboxFusion uses a fresh ``/tmp/tmpXXXX``. A relative name in ``files`` or
  ``fetch_files`` is taken under ``/work``, an absolute one as it is (SandboxFusion
  joins it with ``os.path.join``, which does the same); the folders of a file are
  made first. A ``files`` entry whose content is null, or whose name holds
  ``IGNORE_THIS_FILE``, is skipped; contents are base64, decoded as
  ``base64.b64decode`` does (not strictly).
- A ``fetch_files`` entry that is missing (or not a regular file) is left out of
  ``files``, with no error; the others come back base64-encoded, under the name
  as given.
- python and bash are interpreted: ``compile_result`` is null and
  ``compile_timeout`` is unused.
- ``status`` is ``Success`` only when the run finished with return code 0;
  ``Failed`` for a time-out or another return code; ``SandboxError`` (with
  ``message``) when stockade could not run the code or write its files.
- A run that ends on its time limit is ``TimeLimitExceeded`` with no
  ``return_code`` and the output it had written. A run stockade ended for
  memory, output, a policy violation or a signal is ``Finished`` with the
  return code it got (``-9`` when the isolate was killed with no code: a
  ``Finished`` result always has one, which the SandboxFusion SDK requires).

Where stockade differs: python runs as stockade runs it (``python3 -I -c``: no
``__file__``, and ``/work`` is not on ``sys.path``, so ``files`` cannot be
imported as modules); output is decoded as UTF-8 with replacement characters
(SandboxFusion writes ``[DecodeError] ...`` instead); the memory limit covers
the whole isolate (a cgroup), not the process's address space; and a
``Failed`` run that stockade ended (memory, output, violation, a signal) says
why in ``message``, which SandboxFusion leaves empty.
"""

from __future__ import annotations

import base64
import math
import posixpath
import shlex
from typing import Annotated, Any, Literal, Protocol, get_args

from pydantic import BaseModel, Field, field_validator

from ..errors import CallTooLargeError, InvalidRequestError, SandboxError, printable
from ..limits import MAX_CALL_BYTES
from ..policy import MAX_MEMORY_MB, MAX_TIMEOUT_S
from ..protocol.models import items_at_most
from ..result import ExecResult

# SandboxFusion's ``Language`` (sandbox/runners/types.py): a request naming any
# other is invalid (FastAPI answers it 422). Of these stockade runs SUPPORTED_LANGUAGES.
Language = Literal[
    "python",
    "cpp",
    "nodejs",
    "go",
    "go_test",
    "java",
    "php",
    "csharp",
    "bash",
    "typescript",
    "sql",
    "rust",
    "cuda",
    "lua",
    "R",
    "perl",
    "D_ut",
    "ruby",
    "scala",
    "julia",
    "pytest",
    "junit",
    "kotlin_script",
    "jest",
    "verilog",
    "python_gpu",
    "lean",
    "swift",
    "racket",
]
LANGUAGES: tuple[str, ...] = get_args(Language)

# SandboxFusion's language -> stockade's run_code language.
SUPPORTED_LANGUAGES: dict[str, str] = {"python": "python", "bash": "bash"}

RunStatus = Literal["Success", "Failed", "SandboxError"]
CommandRunStatus = Literal["Finished", "Error", "TimeLimitExceeded"]

WORKDIR = "/work"  # where the code runs, and where relative file names land
_MADE_DIRS = ("/work", "/tmp")  # there in every isolate: no mkdir needed
_KILLED_CODE = -9  # the return code of a run whose isolate was killed without one
_SKIP_MARK = "IGNORE_THIS_FILE"  # SandboxFusion's restore_files skips such names
_MKDIR_TIMEOUT_S = 10.0


MAX_FETCH_NAMES = 1024  # names in one fetch_files
MAX_FILES = 4096  # files in one request's files (each is a write of its own)


class RequestNotSupported(ValueError):
    """A valid SandboxFusion request that stockade cannot serve (the HTTP layer refuses it)."""


class LanguageNotSupported(RequestNotSupported):
    """A SandboxFusion language that stockade does not run."""

    def __init__(self, language: str) -> None:
        self.language = language
        super().__init__(
            f"language {language!r} is not supported by stockade; supported: {', '.join(SUPPORTED_LANGUAGES)}"
        )


class RunCodeRequest(BaseModel):
    """The body of ``POST /run_code``, as SandboxFusion defines it (unknown fields ignored)."""

    compile_timeout: float = Field(default=10, description="compile timeout for compiled languages, seconds")
    run_timeout: float = Field(default=10, description="code run timeout, seconds")
    memory_limit_MB: int = Field(
        default=-1, description="maximum memory allowed in megabytes (-1: no limit of its own)"
    )
    code: str = Field(..., examples=['print("hello")'], description="the code to run")
    stdin: str | None = Field(default=None, examples=[""], description="optional string passed to the code's stdin")
    language: Language = Field(..., examples=["python"], description="the language to run the code in")
    files: Annotated[dict[str, str | None], items_at_most(MAX_FILES)] = Field(
        default={}, max_length=MAX_FILES, description="file path -> base64-encoded content, written before the run"
    )
    fetch_files: list[str] = Field(
        default=[], max_length=MAX_FETCH_NAMES, description="file paths to return (base64) after the run"
    )

    @field_validator("files", "fetch_files")
    @classmethod
    def _names(cls, value: dict[str, str | None] | list[str]) -> dict[str, str | None] | list[str]:
        # Refused here, named: an empty name, or one with a NUL (no path holds one), failed deep in
        # the file calls, one way or another as to where it was.
        for name in value:
            if not name or "\x00" in name:
                raise ValueError(f"{printable(repr(name[:200]))} is no file name (empty, or holding a NUL byte)")
        return value


class CommandRunResult(BaseModel):
    """One command's outcome (SandboxFusion runs a compile and a run command)."""

    status: CommandRunStatus
    execution_time: float | None = None  # wall-clock seconds
    return_code: int | None = None  # None unless Finished
    stdout: str | None = None
    stderr: str | None = None


class RunCodeResponse(BaseModel):
    """The answer to ``POST /run_code``, as SandboxFusion defines it."""

    status: RunStatus
    message: str
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = {}


class HeldSandbox(Protocol):
    """What ``run`` needs of a held stockade sandbox (``stockade.sdk_async.AsyncSandbox`` has it)."""

    async def write_file(self, path: str, data: bytes) -> None: ...

    async def run_code(self, code: str, language: str, *, stdin: str | bytes, timeout: float) -> ExecResult: ...

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes: ...


def check_language(language: str) -> str:
    """stockade's ``run_code`` language for SandboxFusion's ``language``, or ``LanguageNotSupported``."""
    try:
        return SUPPORTED_LANGUAGES[language]
    except KeyError:
        raise LanguageNotSupported(language) from None


def run_timeout(request: RunCodeRequest) -> float:
    """The run's time limit in seconds: ``run_timeout``, at most stockade's 600 s.

    More is clamped to 600 (a framework's generous limit should not fail every
    call); zero, a negative number or a non-finite one is refused.
    """
    value = request.run_timeout
    if not math.isfinite(value) or value <= 0:
        raise RequestNotSupported(f"run_timeout must be a positive number of seconds, not {value!r}")
    return min(value, MAX_TIMEOUT_S)


def memory_mb(request: RunCodeRequest) -> int:
    """The isolate's memory limit: ``memory_limit_MB`` brought into stockade's 16..2048 MB.

    SandboxFusion's default ``-1`` (and any value <= 0) means no limit of the
    request's own: stockade has to have one, and gives its largest, 2048.
    A larger request gets 2048 too, a smaller one 16.
    """
    asked = request.memory_limit_MB
    if asked <= 0:
        return MAX_MEMORY_MB
    return max(16, min(asked, MAX_MEMORY_MB))


def policy_fields(request: RunCodeRequest) -> dict[str, Any]:
    """The stockade ``Policy`` fields of the sandbox that serves ``request``.

    Refuses (``RequestNotSupported``, ``LanguageNotSupported``) what stockade
    cannot run, so the HTTP layer answers before it takes a sandbox.
    """
    check_language(request.language)
    return {"timeout_seconds": run_timeout(request), "memory_mb": memory_mb(request)}


# The fetched files of one answer, at most (one call's data, as every door's limit): every name
# counts, a file asked for under several names as often as it is named, since each is sent.
MAX_FETCH_BYTES = MAX_CALL_BYTES


def resolve_path(name: str) -> str:
    """Where a ``files``/``fetch_files`` name lies in the isolate: relative names under ``/work``."""
    return posixpath.normpath(posixpath.join(WORKDIR, name))


def command_result(result: ExecResult) -> CommandRunResult:
    """SandboxFusion's account of one stockade run."""
    reason = result.termination_reason
    if reason in ("timeout", "cpu_limit"):  # a judge's time limit is either clock
        return CommandRunResult(
            status="TimeLimitExceeded",
            execution_time=result.execution_time_seconds,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    if reason == "error" or (reason == "completed" and result.exit_code is None):
        return CommandRunResult(
            status="Error",
            execution_time=result.execution_time_seconds,
            return_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.error or result.stderr or "the sandbox could not run the code",
        )
    # completed, or ended by stockade (memory_limit, output_limit, violation, killed):
    # the process finished, with the code it got.
    return CommandRunResult(
        status="Finished",
        execution_time=result.execution_time_seconds,
        return_code=result.exit_code if result.exit_code is not None else _KILLED_CODE,
        stdout=result.stdout,
        stderr=result.stderr,
    )


def run_status(compile_result: CommandRunResult | None, run_result: CommandRunResult | None) -> tuple[RunStatus, str]:
    """The overall status and message, as SandboxFusion's ``parse_run_status`` decides them."""
    results = [r for r in (compile_result, run_result) if r is not None]
    for r in results:
        if r.status == "Error":
            return "SandboxError", r.stderr or ""
    if any(r.status == "TimeLimitExceeded" for r in results):
        return "Failed", ""
    if any(r.return_code is not None and r.return_code != 0 for r in results):
        return "Failed", ""
    return "Success", ""


def sandbox_error(message: str) -> RunCodeResponse:
    """SandboxFusion's answer when the sandbox side failed: HTTP 200, ``SandboxError``."""
    return RunCodeResponse(status="SandboxError", message=message)


async def run(request: RunCodeRequest, sandbox: HeldSandbox) -> RunCodeResponse:
    """Serve ``request`` in ``sandbox``: write ``files``, run the code, read ``fetch_files``.

    Raises ``LanguageNotSupported``/``RequestNotSupported`` for what stockade
    cannot run and ``InvalidRequestError`` (``CallTooLargeError``) for code,
    stdin or a file over one call's size; a failure of the sandbox is answered
    as SandboxFusion answers it, ``SandboxError`` with a message.
    """
    language = check_language(request.language)
    timeout = run_timeout(request)
    try:
        await _write_files(request.files, sandbox, min(_MKDIR_TIMEOUT_S, timeout))
    except InvalidRequestError:
        raise  # a file over one call's size: the request's fault (CallTooLargeError, HTTP 413)
    except (ValueError, SandboxError) as exc:  # bad base64 (binascii.Error), a path the isolate refuses
        return sandbox_error(f"could not write files: {exc}")
    try:
        result = await sandbox.run_code(request.code, language, stdin=request.stdin or "", timeout=timeout)
    except InvalidRequestError:
        raise
    except SandboxError as exc:
        return sandbox_error(f"could not run the code: {exc}")
    run_result = command_result(result)
    status, message = run_status(None, run_result)
    if status == "Failed" and result.termination_reason in ("memory_limit", "output_limit", "violation", "killed"):
        message = result.error or ""
    files = await _fetch_files(request.fetch_files, sandbox)
    return RunCodeResponse(status=status, message=message, compile_result=None, run_result=run_result, files=files)


async def _write_files(files: dict[str, str | None], sandbox: HeldSandbox, mkdir_timeout: float) -> None:
    wanted: list[tuple[str, bytes]] = []
    for name, content in files.items():
        if not isinstance(content, str) or _SKIP_MARK in name:
            continue
        wanted.append((resolve_path(name), base64.b64decode(content)))
    folders = sorted({posixpath.dirname(path) for path, _ in wanted} - set(_MADE_DIRS) - {"/"})
    if folders:
        made = await sandbox.run_code(
            "mkdir -p -- " + " ".join(shlex.quote(f) for f in folders), "bash", stdin="", timeout=mkdir_timeout
        )
        if made.termination_reason != "completed" or made.exit_code != 0:
            raise SandboxError(f"could not make {', '.join(folders)}: {(made.stderr or made.error or '').strip()}")
    for path, data in wanted:
        await sandbox.write_file(path, data)


async def _fetch_files(names: list[str], sandbox: HeldSandbox) -> dict[str, str]:
    """The files asked for, base64, under the names as given: each path read once, and at most
    MAX_FETCH_BYTES in all, counted per name (an answer is held whole in the daemon's memory)."""
    fetched: dict[str, str] = {}
    by_path: dict[str, tuple[int, str]] = {}
    total = 0
    too_large = CallTooLargeError(
        f"fetch_files: the files asked for hold more than {MAX_FETCH_BYTES} bytes, more than one answer carries"
    )
    for name in names:
        if name in fetched:
            continue  # a name given twice is answered once
        path = resolve_path(name)
        if path not in by_path:  # "f", "./f" and "/work/f" are one file, read once
            try:
                data = await sandbox.read_file(path, MAX_FETCH_BYTES - total + 1)
            except SandboxError:
                continue  # missing, not a regular file, or unreadable: left out, as SandboxFusion does
            by_path[path] = (len(data), base64.b64encode(data).decode("ascii"))
        size, encoded = by_path[path]
        total += size  # under each name it is sent again
        if total > MAX_FETCH_BYTES:
            raise too_large
        fetched[name] = encoded
    return fetched
