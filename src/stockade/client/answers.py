"""The daemon's wire as both clients speak it: a request line out, answer lines in.

An answer is one line of JSON, read in one pass into its model; output
streamed ahead of it (``{"id", "output": {"stream", "data"}}``) goes to the
call's ``on_output``. Errors map to the ``StockadeError`` tree through the
answer's ``error_code`` (and a file call's ``errno``: ``errors.error_from_code``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import AuthenticationError, SandboxOSError, StockadeError, error_from_code, refused_signature
from ..jsonvalues import values_at_most
from ..protocol import auth
from ..result import ExecResult

# An answer is one line: a file's data (up to 32 MiB, base64: daemon/held.py READ_FILE_MAX) or a run's output
# (JSON escapes can take six bytes a character) stay well under this.
LINE_LIMIT = 64 << 20
# The values an answer may hold (a directory's listing, a status of many sandboxes stay well under).
MAX_ANSWER_VALUES = 2_000_000


class Answer(BaseModel):
    """One line from the daemon: an answer, or output streamed ahead of it.

    Lines are read straight from their JSON bytes into this model: one pass
    of pydantic's parser instead of ``json.loads`` and then validation.
    """

    result: Any = None
    error: Any = None
    error_code: Any = None
    errno: Any = None  # a file call's OS error: which one (the client raises its stdlib class)
    id: Any = None
    output: Any = None


class ExecAnswer(Answer):
    result: ExecResult | None = None


def request_line(method: str, params: dict[str, Any] | None, msg_id: int, token: str | None, streamed: bool) -> bytes:
    """One request, signed when there is a token, as the line to send (a fresh nonce each time)."""
    if streamed:
        params = {**(params or {}), "stream": True}
    request: dict[str, Any] = {"method": method, "params": params or {}, "id": msg_id}
    if token:
        return auth.signed_line(request, token) + b"\n"
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


class Reply:
    """The lines of one call's reply, as both clients read them: output streamed ahead
    of the answer (``{"id", "output": {"stream", "data"}}``) goes to ``on_output``,
    then the answer ends it."""

    def __init__(self, msg_id: int, on_output: Callable[[str, bytes], None] | None, signed: bool = False) -> None:
        self.msg_id = msg_id
        self.on_output = on_output
        self.signed = signed  # the request carried an HMAC signature (a refusal's hint says which way)
        self.callback_error: Exception | None = None

    def take(self, answer: Answer) -> bool:
        """Take one line; True once it is the answer."""
        output = answer.output
        if not isinstance(output, dict) or "result" in answer.model_fields_set:
            # An error about the connection itself (a refusal) carries no id (null); anything else must be ours.
            refusal = answer.id is None and answer.error_code is not None
            if answer.id != self.msg_id and "id" in answer.model_fields_set and not refusal:
                raise StockadeError(f"the daemon answered request {answer.id!r}, not {self.msg_id}")
            return True
        # A callback that raises is not called again, and its exception waits for
        # the answer: left unread, that would be taken for the next call's.
        if self.on_output is not None and self.callback_error is None and answer.id == self.msg_id:
            try:
                data = base64.b64decode(str(output.get("data", "")), validate=True)
            except ValueError:  # binascii.Error
                raise StockadeError("the daemon sent an invalid response: an output chunk that is not base64") from None
            try:
                self.on_output(str(output.get("stream")), data)
            except Exception as exc:  # noqa: BLE001 - raised by outcome(), once the answer is read
                self.callback_error = exc
        return False

    def outcome(self, answer: Answer) -> Answer:
        """The answer, or what to raise instead: the callback's exception, then the daemon's error."""
        if self.callback_error is not None:
            raise self.callback_error
        if (failure := error_of(answer)) is not None:
            if isinstance(failure, AuthenticationError):
                raise AuthenticationError(refused_signature(str(failure), self.signed)) from None
            raise failure
        return answer


def error_of(answer: Answer) -> StockadeError | None:
    """The error an answer carries, as its class in the ``StockadeError`` tree (the shared table)."""
    if answer.error is None:
        return None
    return error_from_code(answer.error_code, str(answer.error), answer.errno)


def exec_result(method: str, answer: Answer) -> ExecResult:
    """A run's answer as its ``ExecResult`` (an answer without one is an error)."""
    if not isinstance(answer.result, ExecResult):
        raise StockadeError(f"the daemon's answer to {method} has no result")
    return answer.result


def parse(line: bytes, answer_type: type[Answer]) -> Answer:
    if values_at_most(line, MAX_ANSWER_VALUES) > MAX_ANSWER_VALUES:
        # Parsed, each value is an object of its own: a 60 MiB line of "[[],[],...]" took 2 GB.
        raise StockadeError(f"the daemon sent an invalid response: more than {MAX_ANSWER_VALUES} JSON values")
    try:
        # Fields this client does not know (a newer daemon's) are skipped, at any
        # depth: a client older than its daemon still reads its results.
        return answer_type.model_validate_json(line, extra="ignore")
    except ValidationError:
        raise StockadeError("the daemon sent an invalid response") from None


async def read_answer_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return (await reader.readuntil(b"\n"))[:-1]
    except asyncio.IncompleteReadError:
        raise EOFError("the daemon closed the connection") from None
    except asyncio.LimitOverrunError:
        raise StockadeError(f"the daemon sent an answer longer than {LINE_LIMIT} bytes") from None


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """A file call's OS error names its path (``filename``), as the stdlib's do."""
    try:
        yield
    except SandboxOSError as exc:
        if exc.filename is None:
            exc.filename = path
        raise
