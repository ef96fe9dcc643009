"""The daemon's ``secrets.*`` methods: an admin registers, lists and removes the broker's secrets.

Root on the socket only. The daemon passes each call to the broker (broker/
server.py keeps them encrypted) and keeps nothing: a value crosses it once,
on its way in, and is never logged, audited or answered back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import AuthenticationError, ConfigError
from ..protocol.models import Caller, Empty, SecretPut, SecretRef


def _broker_call(caller: Caller, method: str, params: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
    if not caller.admin:
        raise AuthenticationError(f"secrets.{method} is for an admin (root on the daemon's socket)")
    from ..broker.client import secret_source

    broker = secret_source().broker
    if broker is None:
        raise ConfigError("this daemon has no secrets broker: start `stockade secretd` and set STOCKADE_BROKER_SOCKET")
    return asyncio.get_running_loop().run_in_executor(None, broker.call, method, params)


async def put(request: SecretPut, caller: Caller) -> dict[str, Any]:
    params = {"name": request.name, "value": request.value.get_secret_value(), "hosts": request.hosts}
    return await _broker_call(caller, "put", params)


async def delete(request: SecretRef, caller: Caller) -> dict[str, Any]:
    return await _broker_call(caller, "delete", {"name": request.name})


async def listing(request: Empty, caller: Caller) -> dict[str, Any]:
    return await _broker_call(caller, "list", {})
