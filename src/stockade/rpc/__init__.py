"""One Unix-socket RPC server, two instances: the daemon (JSON lines) and the secrets broker (CBOR).

server.py: the socket, peer credentials, admission (size, decoding, rate
limits, authentication, the method's request model) and dispatch through a
method table (methods.py); connection.py: one client's framing, order and
flow control; codec.py: how messages are framed, read and written.
"""
