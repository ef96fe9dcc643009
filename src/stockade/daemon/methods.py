"""The daemon's one method table: every door (the Unix-socket RPC, the HTTP API) serves these.

A method is its name, the model its request is read into, and the
controller call that answers it. A door parses the request with ``parse``
(``protocol.models``), then either answers at once (``immediate``), starts a
run answered from the agent's callback (``start_now``, when a warm isolate or
a free held sandbox is there), or awaits ``call``. Adding a method is one
entry here and one controller method.
"""

from __future__ import annotations

from typing import Any

from ..protocol.models import (
    Caller,
    CancelRequest,
    Empty,
    ExecuteRequest,
    InterpreterRef,
    InterruptRequest,
    ListDir,
    ProcessKill,
    ProcessRef,
    ProcessWait,
    ProcessWrite,
    ReadFile,
    SandboxCreate,
    SandboxExec,
    SandboxPublish,
    SandboxRef,
    SandboxRunCode,
    SandboxSpawn,
    SecretPut,
    SecretRef,
    WriteFile,
)
from ..rpc.methods import Method, read_request
from ..runtimes.verdict import OutputCallback
from . import mcp, secrets
from .controller import Controller


async def _ping(c: Controller, r: Empty, caller: Caller, out: OutputCallback | None) -> str:
    return "pong"


async def _status(c: Controller, r: Empty, caller: Caller, out: OutputCallback | None) -> Any:
    return c.status(caller)


async def _cancel(c: Controller, r: CancelRequest, caller: Caller, out: OutputCallback | None) -> Any:
    return c.cancel(r, caller)


async def _interrupt(c: Controller, r: InterruptRequest, caller: Caller, out: OutputCallback | None) -> Any:
    return await c.interrupt(r, caller)


async def _runtimes(c: Controller, r: Empty, caller: Caller, out: OutputCallback | None) -> Any:
    return await c.runtimes()


def _method_list() -> list[Method]:
    return [
        Method("ping", Empty, _ping, immediate=lambda c, r, caller: "pong", small_answer=True),
        Method("status", Empty, _status, immediate=lambda c, r, caller: c.status(caller), small_answer=True),
        Method("selftest", Empty, lambda c, r, caller, out: c.selftest(r, caller)),
        Method(
            "execute",
            ExecuteRequest,
            lambda c, r, caller, out: c.execute(r, caller, out),
            start_now=lambda c, r, caller, done: c.execute_now(r, caller, done),
            ends_with_caller=True,
        ),
        Method("execute.cancel", CancelRequest, _cancel, admin_action=True, small_answer=True),
        Method(
            "sandbox.create",
            SandboxCreate,
            lambda c, r, caller, out: c.create(r, caller),
            unanswered=lambda c, created: c.close_unanswered(created.sandbox_id),
            # A create waiting in line for a slot, or starting its isolate, for a caller that is gone
            # ends: it kept its place, built an isolate nobody would hear of, and closed it again.
            ends_with_caller=True,
        ),
        Method(
            "sandbox.exec",
            SandboxExec,
            lambda c, r, caller, out: c.sandbox_run(r, caller, out),
            start_now=lambda c, r, caller, done: c.sandbox_call_now(r, caller, done),
        ),
        Method(
            "sandbox.run_code",
            SandboxRunCode,
            lambda c, r, caller, out: c.sandbox_run(r, caller, out),
            start_now=lambda c, r, caller, done: c.sandbox_call_now(r, caller, done),
        ),
        Method(
            "sandbox.close_interpreter",
            InterpreterRef,
            lambda c, r, caller, out: c.close_interpreter(r, caller),
            small_answer=True,
        ),
        Method("sandbox.interrupt", InterruptRequest, _interrupt, small_answer=True),
        Method("sandbox.spawn", SandboxSpawn, lambda c, r, caller, out: c.spawn(r, caller)),
        Method("sandbox.process_read", ProcessRef, lambda c, r, caller, out: c.process_read(r, caller)),
        Method("sandbox.process_write", ProcessWrite, lambda c, r, caller, out: c.process_write(r, caller)),
        Method("sandbox.process_wait", ProcessWait, lambda c, r, caller, out: c.process_wait(r, caller)),
        Method(
            "sandbox.process_kill", ProcessKill, lambda c, r, caller, out: c.process_kill(r, caller), small_answer=True
        ),
        Method("sandbox.processes", SandboxRef, lambda c, r, caller, out: c.process_list(r, caller)),
        Method("sandbox.publish", SandboxPublish, lambda c, r, caller, out: c.publish(r, caller), admin_action=True),
        Method("sandbox.write_file", WriteFile, lambda c, r, caller, out: c.write_file(r, caller)),
        Method("sandbox.read_file", ReadFile, lambda c, r, caller, out: c.read_file(r, caller)),
        Method("sandbox.list_dir", ListDir, lambda c, r, caller, out: c.list_dir(r, caller)),
        Method("sandbox.get", SandboxRef, lambda c, r, caller, out: c.describe(r, caller), small_answer=True),
        Method(
            "sandbox.close",
            SandboxRef,
            lambda c, r, caller, out: c.close_sandbox(r, caller),
            admin_action=True,
            small_answer=True,
        ),
        Method("runtimes", Empty, _runtimes, small_answer=True),
        Method(
            "secrets.put",
            SecretPut,
            lambda c, r, caller, out: secrets.put(r, caller),
            admin_action=True,
            small_answer=True,
        ),
        Method(
            "secrets.delete",
            SecretRef,
            lambda c, r, caller, out: secrets.delete(r, caller),
            admin_action=True,
            small_answer=True,
        ),
        Method("secrets.list", Empty, lambda c, r, caller, out: secrets.listing(r, caller), small_answer=True),
        # A call whose caller went away is ended (an ephemeral server's isolate with it): it would
        # hold a slot for no one until its timeout.
        Method(
            "mcp.call_tool", mcp.McpCall, lambda c, r, caller, out: mcp.call_tool(c, r, caller), ends_with_caller=True
        ),
    ]


METHODS: dict[str, Method] = {m.name: m for m in _method_list()}


async def dispatch(
    controller: Controller,
    name: str,
    params: dict[str, Any] | None,
    caller: Caller,
    on_output: OutputCallback | None = None,
) -> Any:
    """Parse and answer one request by method name: what a door with nothing faster to do calls."""
    from ..errors import MethodNotFoundError

    method = METHODS.get(name)
    if method is None:
        raise MethodNotFoundError(f"Method not found: {name[:64]}")
    return await method.call(controller, read_request(method, params), caller, on_output)
