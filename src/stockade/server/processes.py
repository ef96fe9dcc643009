"""The HTTP routes of a held sandbox's background processes and published ports
(``sandbox.spawn``, ``sandbox.process_*``, ``sandbox.publish``)."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import FastAPI, Query, Request
from pydantic import Field

from ..protocol.models import Argv, Env, ProcessInfo, ProcessList, ProcessOutput, Published
from ..protocol.models import Request as RequestBody
from .door import HttpDoor


class HttpSpawn(RequestBody):
    command: Argv
    cwd: str | None = None
    env: Env | None = None
    stdin_b64: str | None = Field(default=None, description="its first input, base64")


class HttpPublish(RequestBody):
    port: int | str = Field(description="PORT, HOST_PORT:PORT or ADDRESS:HOST_PORT:PORT (a loopback address)")


# A body taken as the bytes it is, whatever its Content-Type says (a ``bytes`` Body parameter is
# JSON-decoded when the client calls it JSON: "hello" with its quotes wrote 5 bytes, not 7).
RAW_BODY: dict[str, Any] = {
    "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
}


def add_process_routes(app: FastAPI, door: HttpDoor, errors: dict[int | str, Any]) -> None:
    processes = "/api/v1/sandboxes/{sandbox_id}/processes"

    @app.post("/api/v1/sandboxes/{sandbox_id}/ports", name="sandbox.publish", status_code=201,
              response_model=Published, responses=errors)  # fmt: skip
    async def publish(request: Request, sandbox_id: str, body: HttpPublish) -> Any:
        """Forward a loopback port of the daemon's host to a port on the sandbox's own loopback,
        until the sandbox closes (``Sandbox.publish``)."""
        return await door.call("sandbox.publish", {"sandbox_id": sandbox_id, "port": body.port}, door.caller(request))

    @app.post(processes, name="sandbox.spawn", status_code=201, response_model=ProcessInfo, responses=errors)
    async def spawn(request: Request, sandbox_id: str, body: HttpSpawn) -> Any:
        """Start a background process; it runs beside the sandbox's later calls."""
        params = {"sandbox_id": sandbox_id, **body.model_dump(exclude_none=True)}
        return await door.call("sandbox.spawn", params, door.caller(request))

    @app.get(processes, name="sandbox.processes", response_model=ProcessList, responses=errors)
    async def process_list(request: Request, sandbox_id: str) -> Any:
        return await door.call("sandbox.processes", {"sandbox_id": sandbox_id}, door.caller(request))

    @app.get(processes + "/{handle}/output", name="sandbox.process_read", response_model=ProcessOutput,
             responses=errors)  # fmt: skip
    async def process_read(request: Request, sandbox_id: str, handle: str) -> Any:
        """What the process wrote since the last read (each byte is read once), base64."""
        params = {"sandbox_id": sandbox_id, "handle": handle}
        return await door.call("sandbox.process_read", params, door.caller(request))

    @app.post(processes + "/{handle}/stdin", name="sandbox.process_write", response_model=ProcessInfo,
              responses=errors, openapi_extra=RAW_BODY)  # fmt: skip
    async def process_write(
        request: Request,
        sandbox_id: str,
        handle: str,
        eof: bool = Query(default=False, description="then close its stdin"),
    ) -> Any:
        data = await request.body()
        params = {"sandbox_id": sandbox_id, "handle": handle, "data": base64.b64encode(data).decode(), "eof": eof}
        return await door.call("sandbox.process_write", params, door.caller(request))

    @app.post(processes + "/{handle}/wait", name="sandbox.process_wait", response_model=ProcessInfo,
              responses=errors)  # fmt: skip
    async def process_wait(
        request: Request,
        sandbox_id: str,
        handle: str,
        timeout: float = Query(default=0.0, ge=0, le=60, allow_inf_nan=False),
    ) -> Any:
        params = {"sandbox_id": sandbox_id, "handle": handle, "timeout": timeout}
        return await door.call("sandbox.process_wait", params, door.caller(request))

    @app.post(processes + "/{handle}/kill", name="sandbox.process_kill", response_model=ProcessInfo,
              responses=errors)  # fmt: skip
    async def process_kill(
        request: Request, sandbox_id: str, handle: str, signal: str = Query(default="SIGTERM")
    ) -> Any:
        params = {"sandbox_id": sandbox_id, "handle": handle, "signal": signal}
        return await door.call("sandbox.process_kill", params, door.caller(request))
