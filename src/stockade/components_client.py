"""The client's side of a component's control socket: ``stockade exec`` and ``stockade attach``.

The wire (one JSON object a line, bytes as base64) and the supervisor's side
are ``components_control.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from .components_control import CHUNK, SOCKET, Lines, b64, send_line, socket_address, unb64
from .errors import StockadeError

if TYPE_CHECKING:
    from .components import ComponentStore


def connect(store: ComponentStore, name: str) -> socket.socket:
    state = store.state(name)
    if state.status != "running":
        raise StockadeError(f"component {name!r} is {state.status}, not running")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_address(store.path(name)) as address:
            sock.connect(address)
    except OSError as exc:
        sock.close()
        raise StockadeError(
            f"component {name!r}: its supervisor does not answer on {store.path(name, SOCKET)}: {exc.strerror}"
        ) from None
    return sock


class _Sender:
    """Messages to the supervisor from two threads (the stdin relay, Ctrl-C)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self.lock, contextlib.suppress(OSError):
            send_line(self.sock, message)


def _relay_stdin(stdin: IO[bytes], send: _Sender, at_end: dict[str, Any]) -> None:
    fd = stdin.fileno()
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            data = b""
        if not data:
            send(at_end)
            return
        send({"stdin": b64(data)})


def exec_command(
    store: ComponentStore,
    name: str,
    argv: list[str],
    stdin: IO[bytes] | None,
    write: Callable[[str, bytes], None],
) -> tuple[int | None, str | None]:
    """``stockade exec``: run ``argv`` in the component's isolate; its (exit code, error).

    A first Ctrl-C is passed on to the command (SIGINT); a second one leaves, and the command is killed.
    """
    sock = connect(store, name)
    with sock:
        send = _Sender(sock)
        send({"op": "exec", "argv": argv, "stdin": stdin is not None})
        if stdin is not None:
            threading.Thread(target=_relay_stdin, args=(stdin, send, {"eof": True}), daemon=True).start()
        lines = Lines(sock)
        interrupted = False
        while True:
            try:
                message = lines.next()
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                send({"signal": int(signal.SIGINT)})
                continue
            if message is None:
                return None, "lost the connection to the component's supervisor"
            if "stream" in message:
                stream = message["stream"] if message["stream"] in ("stdout", "stderr") else "stderr"
                write(stream, unb64(message.get("data")))
            elif "exit_code" in message or "error" in message:
                code = message.get("exit_code")
                error = message.get("error")
                return (code if isinstance(code, int) else None), (str(error) if error is not None else None)


def attach(store: ComponentStore, name: str, stdin: IO[bytes], write: Callable[[bytes], None]) -> str:
    """``stockade attach``: relay ``stdin`` to the component's stdin and its stdout to ``write``
    until ``stdin`` ends (returns ``"detached"``) or the run does (returns why)."""
    sock = connect(store, name)
    with sock:
        send = _Sender(sock)
        send({"op": "attach"})
        lines = Lines(sock)
        first = lines.next()
        if first is None or "error" in first or first.get("attached") is not True:
            why = first.get("error") if first else "lost the connection to the component's supervisor"
            raise StockadeError(f"component {name!r}: cannot attach: {why}")
        threading.Thread(target=_relay_stdin, args=(stdin, send, {"detach": True}), daemon=True).start()
        while True:
            message = lines.next()
            if message is None:
                return "lost the connection to the component's supervisor"
            if message.get("stream") == "stdout":
                write(unb64(message.get("data")))
            elif "end" in message or "error" in message:
                return str(message.get("end") or message.get("error"))
