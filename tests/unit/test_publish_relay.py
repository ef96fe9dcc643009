"""The relay of a process isolate's published port, on socket pairs: both ways at once, each end
passed on, and a connection whose other side stays quiet after one has ended let go of."""

from __future__ import annotations

import socket
import threading

import pytest

from stockade.runtimes import publish


def _pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """(the client, the relay's client side, the relay's inner side, the server inside)."""
    client, relay_client = socket.socketpair()
    relay_inner, server = socket.socketpair()
    return client, relay_client, relay_inner, server


def _relaying(relay_client: socket.socket, relay_inner: socket.socket) -> threading.Thread:
    thread = threading.Thread(target=publish._relay, args=(relay_client, relay_inner), daemon=True)
    thread.start()
    return thread


def test_a_client_that_sends_as_it_reads_and_a_server_that_answers_as_it_reads_both_go_on() -> None:
    # One thread for both directions stalled here for good: its send to the server blocked (the
    # server was not reading, its answers backed up), and nobody read the server's answers any more.
    client, relay_client, relay_inner, server = _pairs()
    relay = _relaying(relay_client, relay_inner)
    total = 8 << 20
    answered = [0]

    def serve() -> None:
        while chunk := server.recv(4096):
            server.sendall(b"a" * (len(chunk) * 16))
        server.shutdown(socket.SHUT_WR)

    def read_answers() -> None:
        while chunk := client.recv(1 << 16):
            answered[0] += len(chunk)

    threads = [threading.Thread(target=serve, daemon=True), threading.Thread(target=read_answers, daemon=True)]
    for thread in threads:
        thread.start()
    client.sendall(b"q" * total)
    client.shutdown(socket.SHUT_WR)
    for thread in (*threads, relay):
        thread.join(60)
        assert not thread.is_alive(), "the relay stalled"
    assert answered[0] == total * 16
    for sock in (client, relay_client, relay_inner, server):
        sock.close()


@pytest.mark.parametrize("client_reads", [True, False])
def test_a_side_left_quiet_after_the_other_ended_is_let_go_of(
    monkeypatch: pytest.MonkeyPatch, client_reads: bool
) -> None:
    # The client closes (to TCP, a half-close); the server never closes its side: it stays quiet,
    # or floods a client that no longer reads. Either way the relay ends past the bound.
    monkeypatch.setattr(publish, "HALF_CLOSED_IDLE_S", 0.5)
    client, relay_client, relay_inner, server = _pairs()
    relay = _relaying(relay_client, relay_inner)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert server.recv(64) == b"request" and server.recv(64) == b""  # the end passed on
    if not client_reads:
        server.setblocking(False)
        try:
            while True:
                server.send(b"x" * 65536)  # until the relay's send to the client blocks
        except BlockingIOError:
            pass
    relay.join(30)
    assert not relay.is_alive(), "a half-closed connection held the relay"
    for sock in (client, relay_client, relay_inner, server):
        sock.close()
