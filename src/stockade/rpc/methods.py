"""A method table's entries, as the RPC server (and the daemon's HTTP door) serve them.

A method is its name, the model its request is read into, and the call that
answers it, on the handler the server was given (the daemon's controller, the
broker). A door parses the request with ``read_request``, then answers at once
(``immediate``), starts a run answered from the agent's callback
(``start_now``, the daemon's warm runs), or awaits ``call``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import error_code
from ..protocol.models import Caller, Request, parse
from ..result import ExecResult
from ..runtimes.verdict import OutputCallback

Done = Callable[[ExecResult | Exception], None]
Call = Callable[[Any, Any, Caller, OutputCallback | None], Awaitable[Any]]
Immediate = Callable[[Any, Any, Caller], Any]
StartNow = Callable[[Any, Any, Caller, Done], Callable[[], None] | None]


@dataclass(frozen=True)
class Method:
    name: str
    request: type[Request]
    call: Call
    # Answered in the callback that read the request: nothing to wait for.
    immediate: Immediate | None = None
    # Starts the run now when it can, answered from the agent's callback (no task woken).
    start_now: StartNow | None = None
    # A caller that goes away ends the run: a one-shot result can go nowhere.
    ends_with_caller: bool = False
    # Logged to the audit log as an administrative act.
    admin_action: bool = False
    # Its answer is small and bounded (a control or status call): taken even while its caller's
    # unread answers fill their share (daemon/answers.py), so that the caller can still cancel,
    # interrupt, close and look.
    small_answer: bool = False
    # What undoes its result when its caller went away before the answer could be sent: a kept
    # sandbox whose id nobody learned would hold its caller's slot until it idled out.
    unanswered: Callable[[Any, Any], Awaitable[None]] | None = None


class Handler(Protocol):
    """What a server asks of the object its methods are called on, beyond the methods."""

    async def close_connection(self, connection: int) -> None:
        """A connection ended: release what it held."""

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the work under way to end; whether it did."""


class AdminLog(Protocol):
    def admin(self, caller: Caller, action: str, target: str, **details: Any) -> None: ...


def read_request(method: Method, params: dict[str, Any] | None) -> Any:
    """``params`` as the method's request model (``InvalidRequestError``/``PolicyError`` naming the field)."""
    return parse(method.request, params, f"{method.name} request")


async def answer(
    method: Method,
    handler: Any,
    request: Any,
    caller: Caller,
    on_output: OutputCallback | None,
    observers: AdminLog,
) -> Any:
    """Answer ``request`` as a door does: the handler's call, and an administrative act
    (ending a run, closing a sandbox, registering a secret) told to the observers (the
    audit log) once it is done, or refused (``refused``: the error's code), by its target's
    id or name: an attempt on another's run is on the record too."""
    if not method.admin_action:
        return await method.call(handler, request, caller, on_output)
    target = getattr(request, "sandbox_id", None) or getattr(request, "execution_id", None)
    target = str(target or getattr(request, "name", ""))  # a secret's name (secrets.*), never its value
    try:
        result = await method.call(handler, request, caller, on_output)
    except Exception as exc:
        observers.admin(caller, method.name, target, refused=error_code(exc))
        raise
    except asyncio.CancelledError:
        # Its caller went away (or the daemon is stopping) before it ended: on the record too,
        # said as such (it may have taken effect, in part or whole).
        observers.admin(caller, method.name, target, cancelled=True)
        raise
    observers.admin(caller, method.name, target)
    return result
