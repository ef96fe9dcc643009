"""A stand-in for the daemon's socket, for the clients' tests: what they do with a peer that is not
a real daemon (one that hangs up, answers wrongly, trickles, or reads slowly)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class UnixServer:
    """A Unix socket at ``path`` whose every connection is handed to ``serve`` in a thread of its
    own (which closes it when done); ``connections``: how many were accepted."""

    def __init__(self, path: str, serve: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.serve = serve
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)
