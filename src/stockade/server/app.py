"""The HTTP API (FastAPI): a second door to the daemon's controller, never a second implementation.

Every route reads its body into a request model (``protocol/models.py``, or
seed 003's and SandboxFusion's shapes, translated into those) and answers
through the same method table as the Unix socket (``daemon/methods.py``).
Errors are answered ``{"error": message, "code": code}`` with the HTTP status
of their code (``errors.HTTP_STATUS``); a refused request never reaches a
sandbox.

- Auth: ``Authorization: Bearer <token>`` on everything but ``door.OPEN_PATHS`` (``/health``,
  ``/ready``, ``/v1/ping``, the dashboard's page and its two files), checked with
  ``hmac.compare_digest``.
- Rate limits: per client address and per ``agent_id`` (429, ``Retry-After``).
- Capacity: a full daemon answers 503 at once; the HTTP door never queues.
- A client that goes away ends its one-shot run (its isolate is killed); a
  held sandbox's call is let finish, so the sandbox stays in step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from importlib import resources
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..daemon.controller import Controller
from ..daemon.methods import METHODS
from ..errors import HTTP_STATUS, InvalidRequestError, StockadeError, printable
from ..limits import stdin_bytes
from ..policy import Policy, default_policy
from ..protocol.models import (
    Argv,
    Caller,
    Cancelled,
    Closed,
    DirListing,
    Env,
    FileWritten,
    InterpreterClosed,
    Interrupted,
    SandboxCreated,
    SandboxInfo,
)
from ..protocol.models import Request as RequestBody
from ..result import ExecResult
from ..rpc.methods import read_request
from . import sandboxfusion, seed
from .bodies_refused import JsonBodyRoute, checked, invalid_body
from .door import ErrorBody, Guard, HttpDoor, describe_bearer, error_response, routed_path
from .processes import RAW_BODY, add_process_routes
from .sse import ClientDisconnected, event_stream, run_while_connected, until_disconnect

log = logging.getLogger("stockade.daemon")


class HttpSandboxCreate(RequestBody):
    """``POST /api/v1/sandboxes``: a held sandbox (closed by DELETE or after its idle timeout)."""

    policy: dict[str, Any] | None = Field(default=None, description="Policy fields; the defaults when left out")
    idle_timeout: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="seconds without a call before it is closed"
    )
    agent_id: str | None = Field(default=None, min_length=1, max_length=128)


class HttpExec(RequestBody):
    command: Argv
    cwd: str | None = None
    stdin: str | None = None
    env: Env | None = None
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class HttpRunCode(RequestBody):
    code: str
    language: str = "python"
    stdin: str | None = None
    env: Env | None = None
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    session: str | None = Field(
        default=None, description="run the code as a cell of this stateful interpreter (python; no stdin)"
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in sorted(set(HTTP_STATUS.values()) | {401, 429, 503})
}


def create_app(door: HttpDoor) -> FastAPI:
    app = FastAPI(
        redirect_slashes=False,  # /api/v1/sandboxes/ is not found, never redirected to another method's route
        # No Swagger or ReDoc pages: they load their scripts from a CDN, which an offline host
        # cannot reach and which the dashboard's Content-Security-Policy keeps out. /openapi.json is served.
        docs_url=None,
        redoc_url=None,
        title="stockade",
        version=__version__,
        description="Run code and tools nobody has vetted behind real isolation boundaries.",
    )
    app.router.route_class = JsonBodyRoute
    controller = door.controller

    app.add_middleware(Guard, door=door)
    describe_bearer(app, door)

    @app.exception_handler(StockadeError)
    async def stockade_error(request: Request, exc: StockadeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # A fault of the daemon's own (or of a library under it, such as Ray's client): answered in
        # the API's shape, as the socket door answers it, and logged with its traceback there.
        path = printable(routed_path(request)[:256].replace("\n", "\\n"))  # the client's words: no line of ours
        log.error("internal error in %s %s", request.method, path, exc_info=exc)
        return error_response(exc)

    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(ClientDisconnect)  # a body read after the client went (the door reads most first)
    async def client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: the metrics do

    app.exception_handler(RequestValidationError)(invalid_body)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's "error parsing the body": the client went
            return Response(status_code=499)
        code = {404: "not_found", 405: "invalid_request"}.get(exc.status_code, "invalid_request")
        return JSONResponse({"error": str(exc.detail), "code": code}, status_code=exc.status_code)

    # ---- seed 003 ------------------------------------------------------------------------

    @app.post(
        "/api/v1/sandbox/execute",
        name="execute",
        response_model=seed.SeedExecuteResponse,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def execute(request: Request, body: seed.SeedExecuteRequest, stream: bool = Query(default=False)) -> Any:
        """Run code or a command in a fresh isolate (seed 003); ``?stream=true`` sends its
        output as server-sent events (``output``, then ``result`` or ``error``)."""
        door.check_agent(body.agent_id)
        job = checked(body.to_request)
        caller = door.caller(request)
        execute = METHODS["execute"]
        if stream:
            controller.require_slot(caller)  # a full daemon is 503, not a stream that says so
            return event_stream(
                lambda out: execute.call(controller, job, caller, out),
                lambda result: seed.response(result).model_dump_json(),
                cancel_on_disconnect=True,
            )
        assert execute.start_now is not None
        start_now = execute.start_now
        result = await run_while_connected(
            request,
            lambda done: start_now(controller, job, caller, done),
            lambda: execute.call(controller, job, caller, None),
        )
        # Written once by pydantic: FastAPI would validate the model again on the way out.
        return Response(seed.response(result).model_dump_json(), media_type="application/json")

    @app.get("/api/v1/sandbox/status", name="status", response_model=seed.SeedStatus, responses=_ERRORS)
    async def status(request: Request) -> seed.SeedStatus:
        now = await door.call("status", {}, door.caller(request))
        return seed.SeedStatus(
            active_sandboxes=[
                seed.SeedActiveSandbox(
                    execution_id=s.execution_id,
                    sandbox_id=s.sandbox_id,
                    kind=s.kind,
                    agent_id=s.agent_id,
                    runtime=s.runtime,
                    uptime_seconds=s.uptime_seconds,
                )
                for s in now.active_sandboxes
            ],
            total_count=len(now.active_sandboxes),
        )

    @app.get("/api/v1/runtimes", name="runtimes", responses=_ERRORS)
    async def runtimes(request: Request) -> Any:
        """Every runtime and whether it works here, from a check at most a minute old (a check
        starts a real sandbox of each: a VM boot for microVM); as ``stockade daemon runtimes``.
        What it finds working, ``/health``'s ``runtimes_available`` lists from then on."""
        return await door.call("runtimes", {}, door.caller(request))

    async def health_now() -> seed.Health:
        available = door.runtimes_available()
        placement = await controller.placement_health()
        reachable = placement is None or placement.get("reachable", True)
        return seed.Health(
            status="healthy" if available and reachable else "degraded",
            service="stockade",
            version=__version__,
            policy_digest=default_policy().digest,
            runtimes_available=available,
            active_sandboxes=controller.active_count(),
            placement=placement,
        )

    @app.api_route(
        "/health", methods=["GET", "HEAD"], name="health", response_model=seed.Health
    )  # HEAD: uptime checkers
    async def health() -> seed.Health:
        return await health_now()

    @app.api_route(
        "/ready",
        methods=["GET", "HEAD"],
        name="ready",
        response_model=seed.Health,
        responses={503: {"model": seed.Health}},
    )
    async def ready() -> JSONResponse:
        """``/health``'s answer, with 503 while the controller's Ray cluster is unreachable: for a load
        balancer's or Kubernetes' readiness check, which then sends no traffic to a controller that could
        only refuse it (and the cluster is looked at again each time). On one host it is ready once it
        serves: a runtime seen to work is learnt from runs, which a controller left without traffic
        would never get. ``/health`` stays 200 for whoever reads its body."""
        now = await health_now()
        unreachable = now.placement is not None and not now.placement.get("reachable", True)
        return JSONResponse(now.model_dump(), status_code=503 if unreachable else 200)

    @app.get(
        "/metrics", name="metrics", response_class=Response, responses={**_ERRORS, 200: {"content": {"text/plain": {}}}}
    )
    async def metrics() -> Response:
        body, content_type = door.observers.exposition()
        return Response(body, media_type=content_type)

    # ---- held sandboxes --------------------------------------------------------------------

    @app.post(
        "/api/v1/sandboxes", name="sandbox.create", status_code=201, response_model=SandboxCreated, responses=_ERRORS
    )
    async def create(request: Request, body: HttpSandboxCreate) -> Any:
        door.check_agent(body.agent_id)
        caller = door.caller(request)
        # A sandbox whose id never reached its client is nobody's to use or close: it held a slot until
        # its idle timeout. Its making ends with its client, and one made as the client left is closed.
        created = await until_disconnect(
            request, door.call("sandbox.create", body.model_dump(exclude_none=True), caller)
        )
        if await request.is_disconnected():
            with contextlib.suppress(StockadeError):
                await door.call("sandbox.close", {"sandbox_id": created.sandbox_id}, caller)
            raise ClientDisconnected("the client disconnected: its sandbox was closed")
        return created

    @app.post(
        "/api/v1/sandboxes/{sandbox_id}/exec",
        name="sandbox.exec",
        response_model=ExecResult,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def sandbox_exec(
        request: Request, sandbox_id: str, body: HttpExec, stream: bool = Query(default=False)
    ) -> Any:
        return await _held_run(door, door.caller(request), "sandbox.exec", sandbox_id, body, stream)

    @app.post(
        "/api/v1/sandboxes/{sandbox_id}/run_code",
        name="sandbox.run_code",
        response_model=ExecResult,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def sandbox_run_code(
        request: Request, sandbox_id: str, body: HttpRunCode, stream: bool = Query(default=False)
    ) -> Any:
        return await _held_run(door, door.caller(request), "sandbox.run_code", sandbox_id, body, stream)

    @app.put(
        "/api/v1/sandboxes/{sandbox_id}/files",
        name="sandbox.write_file",
        response_model=FileWritten,
        responses=_ERRORS,
        openapi_extra=RAW_BODY,
    )
    async def write_file(
        request: Request,
        sandbox_id: str,
        path: str = Query(min_length=1),
        mode: str = Query(
            default="644", pattern="^[0-7]{1,4}$", description="the file's mode in octal, as chmod takes it"
        ),
    ) -> Any:
        data = await request.body()
        params = {"sandbox_id": sandbox_id, "path": path, "mode": int(mode, 8), "data": base64.b64encode(data).decode()}
        return await door.call("sandbox.write_file", params, door.caller(request))

    @app.get(
        "/api/v1/sandboxes/{sandbox_id}/files",
        name="sandbox.read_file",
        response_class=Response,
        responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    )
    async def read_file(
        request: Request,
        sandbox_id: str,
        path: str = Query(min_length=1),
        max_bytes: int | None = Query(default=None, ge=0),
    ) -> Response:
        params: dict[str, Any] = {"sandbox_id": sandbox_id, "path": path, "max_bytes": max_bytes}
        params = {k: v for k, v in params.items() if v is not None}
        caller = door.caller(request)
        answer = await door.call("sandbox.read_file", params, caller)
        # Sent in pieces, counted in the daemon's budget for unread answers meanwhile (door.Guard).
        return Response(base64.b64decode(answer.data), media_type="application/octet-stream")

    @app.get(
        "/api/v1/sandboxes/{sandbox_id}/files/list",
        name="sandbox.list_dir",
        response_model=DirListing,
        responses=_ERRORS,
    )
    async def list_dir(request: Request, sandbox_id: str, path: str = Query(min_length=1)) -> Any:
        return await door.call("sandbox.list_dir", {"sandbox_id": sandbox_id, "path": path}, door.caller(request))

    add_process_routes(app, door, _ERRORS)

    @app.post(
        "/api/v1/sandboxes/{sandbox_id}/interrupt",
        name="sandbox.interrupt",
        response_model=Interrupted,
        responses=_ERRORS,
    )
    async def interrupt(request: Request, sandbox_id: str, session: str | None = Query(default=None)) -> Any:
        """Interrupt the sandbox's run in progress (SIGINT): a cell keeps its interpreter's state.
        ``?session=NAME``: only a cell of that interpreter."""
        params = {"sandbox_id": sandbox_id, **({"session": session} if session is not None else {})}
        return await door.call("sandbox.interrupt", params, door.caller(request))

    @app.delete(
        "/api/v1/sandboxes/{sandbox_id}/interpreters/{session}",
        name="sandbox.close_interpreter",
        response_model=InterpreterClosed,
        responses=_ERRORS,
    )
    async def close_interpreter(request: Request, sandbox_id: str, session: str) -> Any:
        """End a session's interpreter (its atexit handlers run); its next cell starts a fresh one."""
        params = {"sandbox_id": sandbox_id, "session": session}
        return await door.call("sandbox.close_interpreter", params, door.caller(request))

    @app.get("/api/v1/sandboxes/{sandbox_id}", name="sandbox.get", response_model=SandboxInfo, responses=_ERRORS)
    async def describe(request: Request, sandbox_id: str) -> Any:
        """A held sandbox, as its create answered: 404 when there is none (of this API's)."""
        return await door.call("sandbox.get", {"sandbox_id": sandbox_id}, door.caller(request))

    @app.delete("/api/v1/sandboxes/{sandbox_id}", name="sandbox.close", response_model=Closed, responses=_ERRORS)
    async def close(request: Request, sandbox_id: str) -> Any:
        return await door.call("sandbox.close", {"sandbox_id": sandbox_id}, door.caller(request))

    @app.delete(
        "/api/v1/sandbox/execute/{execution_id}", name="execute.cancel", response_model=Cancelled, responses=_ERRORS
    )
    async def cancel(request: Request, execution_id: str) -> Any:
        """End a running execute (its client gets it answered ``killed``)."""
        return await door.call("execute.cancel", {"execution_id": execution_id}, door.caller(request))

    # ---- SandboxFusion ---------------------------------------------------------------------

    @app.post("/run_code", name="sandboxfusion.run_code", response_model=sandboxfusion.RunCodeResponse,
              responses=_ERRORS)  # fmt: skip
    async def run_code(request: Request, body: sandboxfusion.RunCodeRequest) -> Any:
        """SandboxFusion's ``/run_code``, field for field: a framework pointed at this URL runs unchanged."""
        try:
            fields = sandboxfusion.policy_fields(body)
        except sandboxfusion.RequestNotSupported as exc:
            raise InvalidRequestError(str(exc)) from None
        policy = Policy.build(**fields)
        return await until_disconnect(request, _fusion(controller, door.caller(request), body, policy))

    @app.get("/v1/ping", name="sandboxfusion.ping", response_model=str)
    async def ping() -> str:
        return "pong"

    # ---- dashboard -------------------------------------------------------------------------

    @app.get("/api/v1/dashboard", name="dashboard", responses=_ERRORS)
    async def dashboard(request: Request) -> dict[str, Any]:
        caller = door.caller(request)
        now = await door.call("status", {}, caller)
        return {
            "service": "stockade",
            "version": __version__,
            "policy_digest": default_policy().digest,
            "active_sandboxes": [
                {
                    "id": s.sandbox_id or s.execution_id,
                    "kind": s.kind,
                    "agent_id": s.agent_id,
                    "runtime": s.runtime,
                    "uptime_seconds": s.uptime_seconds,
                }
                for s in now.active_sandboxes
            ],
            **door.observers.snapshot(caller),
        }

    static = resources.files("stockade.server") / "static"
    # Never framed by another page (the token form inside one would be clickjacked).
    page_headers = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                    "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}  # fmt: skip

    @app.api_route(
        "/", methods=["GET", "HEAD"], name="dashboard.page", response_class=Response, include_in_schema=False
    )
    async def page() -> Response:
        return Response((static / "dashboard.html").read_bytes(), media_type="text/html", headers=page_headers)

    @app.get("/static/{name}", name="dashboard.static", response_class=Response, include_in_schema=False)
    async def static_file(name: str) -> Response:
        types = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
        if name not in types:
            return JSONResponse({"error": f"no static file {name!r}", "code": "not_found"}, status_code=404)
        return Response((static / name).read_bytes(), media_type=types[name], headers=page_headers)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    return app


async def _held_run(door: HttpDoor, caller: Caller, name: str, sandbox_id: str, body: BaseModel, stream: bool) -> Any:
    params = {"sandbox_id": sandbox_id, **body.model_dump(exclude_none=True)}
    if not stream:
        return await door.call(name, params, caller)
    method = METHODS[name]
    request = read_request(method, params)
    door.controller.require_sandbox(request, caller)  # an unknown sandbox is 404, not a stream that says so
    # A held sandbox's call is let finish when its client goes away: the sandbox stays in step.
    return event_stream(
        lambda out: method.call(door.controller, request, caller, out),
        lambda result: result.to_json() if isinstance(result, ExecResult) else result.model_dump_json(),
        cancel_on_disconnect=False,
    )


class _HeldForFusion:
    """A held sandbox as SandboxFusion's adapter wants it (``sandboxfusion.HeldSandbox``)."""

    def __init__(self, controller: Controller, caller: Caller) -> None:
        self.controller, self.caller, self.sandbox_id = controller, caller, ""

    async def call(self, name: str, **params: Any) -> Any:
        method = METHODS[name]
        if name != "sandbox.create":
            params["sandbox_id"] = self.sandbox_id
        return await method.call(self.controller, read_request(method, params), self.caller, None)

    async def close(self) -> None:
        try:
            await self.call("sandbox.close")
        except StockadeError:
            pass

    async def write_file(self, path: str, data: bytes) -> None:
        await self.call("sandbox.write_file", path=path, data=base64.b64encode(data).decode())

    async def run_code(self, code: str, language: str, *, stdin: str | bytes, timeout: float) -> ExecResult:
        raw = stdin_bytes(stdin)  # as the request models take text stdin
        stdin_field = {"stdin_b64": base64.b64encode(raw).decode()} if raw else {}
        result: ExecResult = await self.call(
            "sandbox.run_code", code=code, language=language, timeout=timeout, **stdin_field
        )
        return result

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        params: dict[str, Any] = {"path": path}
        if max_bytes is not None:
            params["max_bytes"] = max_bytes
        answer = await self.call("sandbox.read_file", **params)
        return base64.b64decode(answer.data)


async def _fusion(controller: Controller, caller: Caller, body: sandboxfusion.RunCodeRequest, policy: Policy) -> Any:
    """A SandboxFusion call: a held sandbox of its own for the files, the run and the fetch."""
    held = _HeldForFusion(controller, caller)
    created = await held.call("sandbox.create", policy=policy.to_dict())
    held.sandbox_id = created.sandbox_id
    try:
        return await sandboxfusion.run(body, held)
    finally:
        await asyncio.shield(held.close())
