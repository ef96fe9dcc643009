"""Client for the stockade daemon's Unix-socket RPC.

    from stockade.client import Client, Retry
    client = Client("/run/stockade/stockade.sock", auth_token=token)
    result = client.execute(code="print(1)")

``AsyncClient`` has the same methods for asyncio callers, awaited.

A connection the daemon hung up since its last answer (a restart) is replaced
at once; a daemon that cannot be reached is tried again with backoff
(``retry=Retry(...)``, by default three attempts 1 s then 2 s apart;
``retry=None``: one), and a request that may have run (an ``execute`` whose
connection broke before its answer) is not sent again unless
``Retry(resend_unsafe=True)``: it raises ``AnswerLostError``. A held sandbox
that ended with its daemon raises ``SandboxLostError``, naming both instances.

Errors map to the ``StockadeError`` tree through the response's ``error_code``:
an unreachable daemon is ``DaemonUnavailableError`` (a ``ConnectionError``),
a refused signature ``AuthenticationError``, the rate limit ``RateLimitError``,
a file call's OS error its stdlib class (``PathNotFoundError`` is a
``FileNotFoundError``; ``IsADirectoryError``, ``NotADirectoryError``,
``PermissionError``... where the sandbox's agent reports the errno).

The modules: ``requests`` (what each method sends), ``answers`` (the wire:
lines out and in, errors), ``retry`` (when a call is tried again),
``sync_client`` (``Client``) and ``async_client`` (``AsyncClient``).
"""

from __future__ import annotations

from ..errors import AnswerLostError, DaemonBusyError, NotFoundError, SandboxLostError
from .async_client import AsyncClient, AsyncRemoteSandbox
from .processes import AsyncRemoteProcess
from .remote_sandbox import RemoteInterpreter, RemoteSandbox
from .requests import CodeOptions, ExecOptions, RunOptions, read_token_file
from .retry import RESENT_WHEN_ASKED, SAFE_TO_RESEND, Retry, call_with_retry
from .sync_client import Client

__all__ = [
    "RESENT_WHEN_ASKED",
    "SAFE_TO_RESEND",
    "AnswerLostError",
    "AsyncClient",
    "AsyncRemoteProcess",
    "AsyncRemoteSandbox",
    "Client",
    "CodeOptions",
    "DaemonBusyError",
    "ExecOptions",
    "NotFoundError",
    "RemoteInterpreter",
    "RemoteSandbox",
    "Retry",
    "RunOptions",
    "SandboxLostError",
    "call_with_retry",
    "read_token_file",
]
