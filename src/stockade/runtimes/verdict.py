"""A run's account from the agent, read on the host: its verdict, the caller's output callback,
and what the host keeps of a run while it is in flight.

The agent is untrusted: a field of an unexpected type reads as "not said",
and a reply that is not an object ends the isolate (``AgentProtocolError``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import AgentProtocolError
from ..result import ExecResult
from .cells import Cell, read_cell

if TYPE_CHECKING:
    from .base import IsolateUsage

OutputCallback = Callable[[str, bytes], None]


class CallbackGuard:
    """The caller's ``on_output``, kept from breaking the conversation with the agent.

    An exception in the callback would leave the rest of the run's output and
    its answer unread on the connection, and the next call would read them as
    its own. So the first exception stops further calls to the callback, the
    run is read to its end, and the exception is raised then.
    """

    def __init__(self, on_output: OutputCallback | None) -> None:
        self._on_output = on_output
        self.error: Exception | None = None
        self.callback: OutputCallback | None = self._call if on_output is not None else None

    def _call(self, stream: str, data: bytes) -> None:
        if self.error is None and self._on_output is not None:
            try:
                self._on_output(stream, data)
            except Exception as exc:  # noqa: BLE001 - raised again once the run has been read to its end
                self.error = exc

    def check(self, result: ExecResult) -> ExecResult:
        if self.error is not None:
            raise self.error
        return result


@dataclass(frozen=True)
class Verdict:
    """What the agent says a run did. Types the host does not expect read as "not said"."""

    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    truncated: bool = False
    cell: Cell | None = None  # a stateful interpreter's account of its cell (run_cell)
    interpreter_lost: bool = False  # run_cell: the interpreter died in the cell; its state is gone
    answer_refused: bool = False  # run_cell: the agent ended it, its answer not the interpreter's
    scratch_full: bool = False  # a scratch directory had no room left as the run ended (disk_mb)


def read_verdict(reply: Any) -> Verdict:
    """Read an exec/run_code reply; AgentProtocolError if it is not one."""
    if not isinstance(reply, dict):
        raise AgentProtocolError("the run's reply is not an object")
    exit_code = reply.get("exit_code")
    return Verdict(
        exit_code=exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None,
        stdout=b64_field(reply.get("stdout")),
        stderr=b64_field(reply.get("stderr")),
        timed_out=reply.get("timed_out") is True,
        truncated=reply.get("output_truncated") is True,
        cell=read_cell(reply.get("cell")),
        interpreter_lost="cell" in reply and reply.get("cell") is None,
        answer_refused=reply.get("answer_refused") is True,
        scratch_full=reply.get("scratch_full") is True,
    )


@dataclass
class PendingRun:
    params: dict[str, Any]
    wait: float  # how long the host waits for the agent's verdict
    before: IsolateUsage
    started: float
    execution_id: str  # the result's: drawn when the run begins, or given by its caller
    answered: bool = False  # the agent's answer (or the call's end) came: the run's account is being taken


def b64_field(value: Any) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise AgentProtocolError("the agent sent invalid base64") from None
