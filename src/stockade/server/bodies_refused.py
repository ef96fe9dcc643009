"""How the HTTP door refuses a request body: counted before it is parsed, and each wrong field named.

FastAPI parses a route's body into its request model and reports pydantic's
errors as ``RequestValidationError``; the door answers them in the API's
shape (``{"error", "code"}``), with the same words as the socket door's
``protocol.models.request_error``: the field's name, the nearest known name
for an unknown one, and a refusal of the policy alone as a policy error.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from ..errors import InvalidRequestError, PolicyError
from ..jsonvalues import too_many_values
from ..protocol.models import request_error, unknown_field
from . import seed
from .door import error_response

T = TypeVar("T")

# Request fields that are the policy's (seed 003's names, and a held sandbox's ``policy``).
POLICY_FIELDS = {"policy", *seed.POLICY_FIELDS}


class JsonBodyRoute(APIRoute):
    """A route whose body is parsed as JSON (a request model) counts its values first: more than
    ``MAX_REQUEST_VALUES`` are refused unparsed, as on the socket (each is a Python object once
    parsed: 16 MiB of ``[{},{},...]`` took the daemon half a GiB). A route that reads its body raw
    (a file written, a process's stdin) has no body field, and its bytes are data, never counted."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if self.body_field is None:
            return handle

        async def counted(request: Request) -> Response:
            # Whatever its Content-Type says: FastAPI reads one of any case ("application/JSON") as
            # JSON, and a test of the header's text let such a body be parsed uncounted. (The body
            # read once: the handler is given it as kept.)
            if (said := too_many_values(await request.body())) is not None:
                return error_response(InvalidRequestError(said))
            return await handle(request)

        return counted


async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The answer to a body FastAPI could not take: not JSON, or not the route's request model."""
    content_type = request.headers.get("content-type", "")
    lowered = content_type.lower()  # a media type's case is not its own (FastAPI reads any as JSON)
    if request.method in ("POST", "PUT") and "json" not in lowered and "octet-stream" not in lowered:
        if any(tuple(err.get("loc", ())) == ("body",) for err in exc.errors()):
            message = f"send the body as JSON, with 'Content-Type: application/json' (not {content_type!r})"
            return JSONResponse({"error": message, "code": "invalid_request"}, status_code=400)
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        return JSONResponse({"error": "Invalid JSON in the request body", "code": "invalid_request"}, status_code=400)
    parts, fields = [], set()
    body_field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body_field, "field_info", None), "annotation", None)  # the route's body model
    guessed = 0
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        fields.add(loc[0] if loc else "")
        said = str(err.get("msg", "")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden" and loc:
            said, guessed = unknown_field(loc, model, guessed), guessed + 1
        parts.append(f"{'.'.join(loc) or 'body'}: {said}")
    text = "; ".join(parts)[:2000]
    if fields <= POLICY_FIELDS:  # only the policy is wrong: answered as the other doors answer it
        return error_response(PolicyError(f"invalid policy: {text}"))
    return error_response(InvalidRequestError(f"invalid request: {text}"))


def checked(build: Callable[[], T]) -> T:
    """A request translated into stockade's model; pydantic's complaint, by field name."""
    try:
        return build()
    except ValidationError as exc:
        raise request_error(exc, "request") from None
