"""Every request and answer of the daemon, as pydantic models: the one request model.

The Unix-socket RPC (``params`` of a method), the HTTP API (request bodies)
and both clients read and write these; the controller takes them, whatever
door a request came in by. A request is validated once, where it enters,
and a failure names the field: ``request_error`` turns pydantic's report
into ``InvalidRequestError`` (or ``PolicyError`` when every complaint is
about the policy).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..checked import nearest
from ..errors import InvalidRequestError, PolicyError
from ..limits import MAX_ARGV_ITEMS, MAX_ENV_ITEMS, MAX_LIST_ITEMS, check_call_size, stdin_bytes
from ..policy import Policy, check_environment, default_policy

Language = Literal["python", "bash"]


def _no_nul(value: str) -> str:
    # The kernel ends a C string at a NUL: a path or an argument holding one cannot mean what it says.
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    try:
        value.encode("utf-8", "surrogateescape")  # text, or the bytes os.fsdecode kept
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate: no text a program can be given") from None
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


def _source_text(value: str) -> str:
    try:
        value.encode("utf-8")  # what the interpreter is handed (surrogateescape's bytes are no source either)
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate: no source text") from None
    return value


Code = Annotated[str, AfterValidator(_source_text)]
Path = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]
Argv = Annotated[
    list[Text], Field(min_length=1, max_length=MAX_ARGV_ITEMS, description="the command and its arguments")
]


def items_at_most(limit: int) -> BeforeValidator:
    """A dict's or tuple's bound checked before its items are (pydantic checks ``max_length`` after
    them for those, before them for a list only: a request of half a million wrong items was as many
    errors, seconds and hundreds of MB to say)."""

    def check(value: Any) -> Any:
        if isinstance(value, (dict, list, tuple)) and len(value) > limit:
            kind = "Dictionary" if isinstance(value, dict) else "List"
            raise ValueError(f"{kind} should have at most {limit} items, not {len(value)}")
        return value

    return BeforeValidator(check)


Env = Annotated[
    dict[str, str], items_at_most(MAX_ENV_ITEMS), Field(max_length=MAX_ENV_ITEMS), AfterValidator(check_environment)
]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False, description="seconds")]
AgentId = Annotated[str, Field(min_length=1, max_length=128, description="who the run is for (audit, metrics)")]


GUESSED_FIELDS = 10  # unknown fields said with the nearest known one; the rest without (a search each)


class Request(BaseModel):
    """A request's fields. Unknown fields are refused (a misspelt one would otherwise be
    ignored), and values are taken as JSON gives them: no string is read as a number,
    no ``true`` as 1."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _few_unknown(cls, data: Any) -> Any:
        # pydantic reports each unknown field as an error of its own, and building that report is
        # what costs: 200,000 names (a 2 MiB body, within every bound on values) held the daemon's
        # loop for over a second. Past a few, they are refused as one complaint.
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + GUESSED_FIELDS:
            unknown = [name for name in data if name not in cls.model_fields]
            if len(unknown) > GUESSED_FIELDS:
                named = ", ".join(repr(str(name)[:64]) for name in unknown[:GUESSED_FIELDS])
                raise ValueError(f"{len(unknown)} unknown fields ({named}, ...)")
        return data


class Empty(Request):
    """A method that takes no arguments."""


class _WithPolicy(Request):
    policy: Policy = Field(default_factory=default_policy, description="the isolate's Policy (defaults when omitted)")

    @field_validator("policy", mode="before")
    @classmethod
    def _default_policy(cls, value: Any) -> Any:
        # None and {} are the default policy, built once rather than per request.
        return default_policy() if value is None or value == {} else value


class _WithStdin(Request):
    stdin: str | None = Field(default=None, description="text for the run's standard input")
    stdin_b64: str | None = Field(default=None, description="bytes for standard input, base64 (instead of stdin)")
    stream: bool = Field(default=False, description="send output as it comes, ahead of the result")

    _stdin: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _one_stdin(self) -> Any:
        if self.stdin is not None and self.stdin_b64 is not None:
            raise ValueError("give stdin or stdin_b64, not both")
        if self.stdin_b64 is not None:
            self._stdin = _b64decode(self.stdin_b64, "stdin_b64")
        elif self.stdin:
            self._stdin = stdin_bytes(self.stdin)
        return self

    def stdin_bytes(self) -> bytes:
        """Standard input as bytes (decoded once, when the request was validated)."""
        return self._stdin

    def check_sizes(self) -> None:
        """Refuse code or stdin over one call's limit (``CallTooLargeError``) before a slot is taken."""
        check_call_size("code", getattr(self, "code", None))
        check_call_size("stdin", self._stdin)


class ExecuteRequest(_WithPolicy, _WithStdin):
    """``execute``: one command or piece of code in a fresh isolate."""

    command: Argv | None = None
    code: Code | None = None
    language: Language = "python"
    agent_id: AgentId | None = None

    @model_validator(mode="after")
    def _command_or_code(self) -> ExecuteRequest:
        if (self.command is None) == (self.code is None):
            raise ValueError("execute needs exactly one of 'command' (a list of strings) or 'code'")
        return self


class CancelRequest(Request):
    execution_id: str


class SandboxCreate(_WithPolicy):
    keep: bool = Field(default=False, description="outlive the connection that made it (until closed or idle)")
    idle_timeout: Seconds | None = Field(default=None, description="closed after this long without a call")
    agent_id: AgentId | None = None


class SandboxRef(Request):
    sandbox_id: str


class SecretPut(Request):
    """An admin's secret for the broker to keep (``secrets.put``): never logged, never answered back."""

    name: str
    value: SecretStr
    # Required: one bound to any host would go wherever any caller's policy names (its own server).
    hosts: list[str] = Field(
        min_length=1, max_length=MAX_LIST_ITEMS, description="the only hosts a policy may bind it to"
    )


class SecretRef(Request):
    name: str


class _HeldRun(SandboxRef, _WithStdin):
    env: Env | None = Field(default=None, description="environment for this call, over the policy's")
    timeout: Seconds | None = Field(default=None, description="this call's own limit (the policy's still holds)")


class SandboxExec(_HeldRun):
    command: Argv
    cwd: Path | None = None


Session = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$", description="an interpreter's name")
]


class SandboxRunCode(_HeldRun):
    code: Code
    language: Language = "python"
    session: Session | None = Field(
        default=None, description="run the code as a cell of this stateful interpreter (python; no stdin)"
    )


class InterpreterRef(SandboxRef):
    session: Session


class InterruptRequest(SandboxRef):
    session: Session | None = Field(
        default=None, description="only a cell of this interpreter: a run of anything else is left alone"
    )


Handle = Annotated[str, Field(pattern=r"^p[0-9]{1,10}$", description="a background process's handle")]
Signal = Literal["SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"]
MAX_PROCESS_WAIT_S = 60.0  # one sandbox.process_wait holds the sandbox's turn at most this long


class SandboxSpawn(SandboxRef):
    """``sandbox.spawn``: a background process in a held sandbox; other calls go on meanwhile."""

    command: Argv
    cwd: Path | None = None
    env: Env | None = Field(default=None, description="environment over the policy's")
    stdin_b64: str | None = Field(default=None, description="its first input, base64 (more: process_write)")
    _stdin: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _decode(self) -> SandboxSpawn:
        self._stdin = _b64decode(self.stdin_b64, "stdin_b64") if self.stdin_b64 else b""
        return self

    def stdin_bytes(self) -> bytes:
        return self._stdin


class ProcessRef(SandboxRef):
    handle: Handle


class SandboxPublish(SandboxRef):
    """``sandbox.publish``: a loopback port of the daemon's host forwarded to a port on the held
    sandbox's own loopback, until the sandbox closes (docs/processes-and-ports.md)."""

    port: int | str = Field(
        description="PORT, HOST_PORT:PORT or ADDRESS:HOST_PORT:PORT; the host side a loopback address, "
        "HOST_PORT 0 or left out: any free one"
    )


class ProcessWrite(ProcessRef):
    data: str = Field(default="", description="bytes for its stdin, base64")
    eof: bool = Field(default=False, description="then close its stdin")
    _raw: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _decode(self) -> ProcessWrite:
        self._raw = _b64decode(self.data, "data") if self.data else b""
        return self

    def data_bytes(self) -> bytes:
        return self._raw


class ProcessWait(ProcessRef):
    timeout: float = Field(default=0.0, ge=0, le=MAX_PROCESS_WAIT_S, allow_inf_nan=False)


class ProcessKill(ProcessRef):
    signal: Signal = "SIGTERM"


class WriteFile(SandboxRef):
    path: Path
    data: str = Field(description="the file's bytes, base64")
    mode: int = Field(default=0o644, ge=0, le=0o7777)
    _raw: bytes = PrivateAttr(default=b"")

    @field_validator("mode")
    @classmethod
    def _no_set_id(cls, mode: int) -> int:
        if mode & 0o6000:
            raise ValueError(f"mode {mode:#o}: no file in a sandbox may be set-user-ID or set-group-ID")
        return mode

    @model_validator(mode="after")
    def _decode(self) -> WriteFile:
        self._raw = _b64decode(self.data, "data")
        return self

    def data_bytes(self) -> bytes:
        """The file's bytes (decoded once, when the request was validated)."""
        return self._raw


class ReadFile(SandboxRef):
    path: Path
    max_bytes: int | None = Field(default=None, ge=0)


class ListDir(SandboxRef):
    path: Path


# ---- answers -----------------------------------------------------------------------------


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SandboxCreated(Answer):
    sandbox_id: str
    runtime: str
    policy_digest: str
    idle_timeout: float | None
    memory_mb: int | None = Field(default=None, description="its memory limit, which its scratch disk counts in")


class SandboxInfo(SandboxCreated):
    """A held sandbox, as ``sandbox.get`` describes it (what ``sandbox.create`` answered)."""


class FileWritten(Answer):
    path: str
    size: int


class FileData(Answer):
    path: str
    data: str = Field(description="the file's bytes, base64")


class DirListing(Answer):
    path: str
    entries: list[dict[str, Any]]


class Closed(Answer):
    sandbox_id: str
    closed: bool = True


class PublishedPort(Answer):
    """A published port of a held sandbox: ``host_port`` on the daemon host's ``address`` reaches ``port`` inside."""

    port: int = Field(description="the port on the sandbox's own loopback")
    address: str = Field(description="the loopback address the daemon's host listens on")
    host_port: int


class Published(PublishedPort):
    sandbox_id: str


class ProcessInfo(Answer):
    """A background process of a held sandbox (``sandbox.spawn``)."""

    handle: str
    pid: int
    argv: list[str]
    running: bool
    exit_code: int | None = Field(default=None, description="once it ended; negative: the signal that ended it")


class ProcessOutput(ProcessInfo):
    stdout: str = Field(description="what it wrote to stdout since the last read, base64")
    stderr: str = Field(description="what it wrote to stderr since the last read, base64")
    dropped: dict[str, int] = Field(description="bytes per stream dropped before they were read (1 MiB kept)")


class ProcessList(Answer):
    sandbox_id: str
    processes: list[ProcessInfo]


class InterpreterClosed(Answer):
    sandbox_id: str
    session: str
    closed: bool = Field(description="false when the session had no interpreter running")


class Interrupted(Answer):
    sandbox_id: str
    interrupted: bool = Field(description="false when nothing was running")


class Cancelled(Answer):
    execution_id: str
    cancelled: bool = True


class ActiveSandbox(Answer):
    kind: Literal["held", "execute", "mcp"]
    runtime: str
    owner: str
    owner_uid: int | None = None
    agent_id: str | None = None
    uptime_seconds: float
    sandbox_id: str | None = None
    execution_id: str | None = None
    idle_seconds: float | None = None
    idle_timeout: float | None = None
    closing: bool = False
    processes: list[ProcessInfo] = Field(default_factory=list, description="a held sandbox's background processes")
    published: list[PublishedPort] = Field(default_factory=list, description="a held sandbox's published ports")
    mcp_server: str | None = Field(default=None, description="the MCP server a kept isolate runs (kind mcp)")


class Status(Answer):
    active_sandboxes: list[ActiveSandbox]
    total_count: int
    max_sandboxes: int
    max_sandboxes_per_uid: int | None
    waiting: int
    instance_id: str  # drawn at the daemon's start: a restart changes it


class SelfTest(Answer):
    ok: bool
    message: str
    verified: bool
    runtime: str
    policy_digest: str


# ---- who asks ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request is for, whatever door it came in by.

    ``owner`` keys what the caller holds (its sandboxes, its share of the
    slots): ``uid 1000`` on the Unix socket, ``http`` on the HTTP API (its one
    principal: whoever holds its token).
    ``admin`` callers (root on the socket) see and end everyone's runs.
    ``connection`` is the Unix-socket connection whose end closes the
    sandboxes it made (None: the HTTP API's, closed by DELETE or idleness).
    ``waits``: whether a request may wait in the queue for a free slot; the HTTP
    API's are answered "busy" (503) at once instead, never left hanging.
    ``peer``: where the request came from, for the audit log (an HTTP client's address).
    """

    owner: str
    door: Literal["unix", "http", "local", "mcp"]
    admin: bool = False
    uid: int | None = None
    connection: int | None = None
    waits: bool = True
    peer: str | None = None

    def may_touch(self, owner: str) -> bool:
        """Whether this caller may see or end what ``owner`` holds: its own, or anything as an admin."""
        return self.admin or self.owner == owner


def unix_caller(uid: int, connection: int | None = None) -> Caller:
    return Caller(f"uid {uid}", "unix", admin=uid == 0, uid=uid, connection=connection)


def unknown_field(loc: list[str], model: Any = None, guessed: int = 0) -> str:
    """What to say of a field ``model`` does not have at ``loc``: the name it has nearest to it
    (``guessed``: how many were said so already, at most GUESSED_FIELDS are)."""
    fields = getattr(model, "model_fields", None) if isinstance(model, type) else None
    if loc == ["policy"] and fields:
        # A request that takes a policy's settings at its top level (the HTTP API's execute): said so.
        named = [f for f in ("timeout_seconds", "memory_mb", "memory_limit_mb", "network_policy") if f in fields]
        if named:
            return f"unknown field (this request takes the policy's settings at its top level: {', '.join(named)}, ...)"
    if fields and "policy" in fields and len(loc) == 1 and loc[0] in _POLICY_FIELD_NAMES:
        # A request that takes its policy under "policy" (a held sandbox's create): the field is one of its.
        return 'unknown field (a policy setting: put it under "policy")'
    near = nearest(loc[-1][:64], fields) if fields and len(loc) == 1 and guessed < GUESSED_FIELDS else None
    return f"unknown field (did you mean {near!r}?)" if near else "unknown field"


_POLICY_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Policy))


def request_error(exc: ValidationError, what: str, model: Any = None) -> InvalidRequestError | PolicyError:
    """pydantic's report on a request (``model``'s, where known) as the error that names each field it refuses."""
    parts: list[str] = []
    policy_only = True
    guessed = 0
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        policy_only = policy_only and bool(loc) and loc[0] == "policy"
        field = ".".join(loc) or what
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, PolicyError):  # the Policy's own words, naming its fields under this one's
            parts += [f"{field}.{part}" for part in str(cause).removeprefix("invalid policy: ").split("; ")]
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message, guessed = unknown_field(loc, model, guessed), guessed + 1
        parts.append(f"{field}: {message}")
    text = "; ".join(parts)[:2000]
    if policy_only:
        return PolicyError(f"invalid policy: {text.replace('policy.', '')}")
    return InvalidRequestError(f"invalid {what}: {text}")


def parse(model: type[Request], params: dict[str, Any] | None, what: str) -> Any:
    """``params`` as ``model``, or the error naming what is wrong."""
    try:
        return model.model_validate(params or {})
    except ValidationError as exc:
        raise request_error(exc, what, model) from None


def _b64decode(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None
