"""What the HTTP door holds of request bodies (read, and held while their requests run): bounded.

Each body is read whole before its route runs (``door.Guard``), up to the
request cap (16 MiB), over as long as its size allows at the slowest rate a
body may come at (``BODY_MIN_RATE``). Without a bound across requests, a
client with many connections held that many bodies at once (32 connections:
half a GiB of the daemon's memory, for minutes). So the bytes held are one
budget for the whole door (``BODY_BUDGET``), of which the clients of one
network (``ratelimit.peer_network``: loopback is one) may take a share
(``NETWORK_SHARE``): a body that would pass either is refused "busy" as its
bytes come, and what it held is given back.
"""

from __future__ import annotations

from ..errors import DaemonBusyError

BODY_BUDGET = 256 << 20  # sixteen bodies of the largest size at once
NETWORK_SHARE = 128 << 20  # what the clients of one network may hold of it


class BodyBudget:
    """Bytes of request bodies held by the door, in all and by network."""

    def __init__(self, limit: int = BODY_BUDGET, share: int = NETWORK_SHARE) -> None:
        self.limit, self.share = limit, share
        self.held = 0
        self.by_network: dict[str, int] = {}

    def take(self, network: str, size: int) -> None:
        """Count ``size`` more bytes of a body from ``network``, or ``DaemonBusyError`` (nothing counted)."""
        mine = self.by_network.get(network, 0)
        if mine + size > self.share:
            raise DaemonBusyError(
                f"busy: requests from your network hold {mine >> 20} MiB of bodies being read (at most "
                f"{self.share >> 20} MiB at once): send fewer large requests at a time"
            )
        if self.held + size > self.limit:
            raise DaemonBusyError(
                f"busy: the daemon holds {self.held >> 20} MiB of request bodies being read (at most "
                f"{self.limit >> 20} MiB at once): try again shortly"
            )
        self.by_network[network] = mine + size
        self.held += size

    def give_back(self, network: str, size: int) -> None:
        if not size:
            return
        self.held -= size
        left = self.by_network[network] - size
        if left:
            self.by_network[network] = left
        else:
            del self.by_network[network]
