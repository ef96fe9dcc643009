"""Room on a Ray node that a released isolate leaves booked for the next claim of its shape.

A claim books its isolate's CPU, memory and isolation resource as a placement
group: three calls to the cluster's GCS (create it, wait until it is placed, ask
on which node) and a fourth to give it back. Under sustained load (an RL step's
thousands of one-shots) those calls, not the isolates, are most of what a claim
costs the cluster. So a released isolate's placement group is kept, still
booked, for the next claim of the same shape (runtime, CPU, memory): that claim
is a hand-over on the node, with no call to the GCS on its path.

What is kept stays honest bookkeeping: Ray still counts the room as taken (as a
warm pool's isolates take the node's memory), at most ``limit`` groups are kept,
each for at most ``idle_s`` unused, and a group whose node is gone or suspect is
never handed out again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[tuple[str, float], ...]


def shape_of(bundle: dict[str, float]) -> Shape:
    return tuple(sorted(bundle.items()))


@dataclass
class Reservation:
    """A placement group of one bundle, placed on ``node_id``."""

    group: Any
    node_id: str
    shape: Shape
    kept_at: float = field(default=0.0)


class KeptReservations:
    """The kept groups, oldest first per shape. Not thread-safe: the placement's event loop owns it."""

    def __init__(self, limit: int, idle_s: float) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self._kept: dict[Shape, list[Reservation]] = {}

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._kept.values())

    def take(self, shape: Shape, usable: Callable[[str], bool]) -> tuple[Reservation | None, list[Reservation]]:
        """A kept reservation of ``shape`` on a node ``usable`` says yes to (the newest: its node
        is the likeliest still warm), and the ones to give back (expired, or on a node gone)."""
        drop = self.expired()
        kept = self._kept.get(shape, [])
        while kept:
            reservation = kept.pop()
            if usable(reservation.node_id):
                return reservation, drop
            drop.append(reservation)
        return None, drop

    def keep(self, reservation: Reservation) -> bool:
        """Keep ``reservation`` for the next claim of its shape; False when the limit is reached
        (the caller gives it back)."""
        if len(self) >= self.limit:
            return False
        reservation.kept_at = time.monotonic()
        self._kept.setdefault(reservation.shape, []).append(reservation)
        return True

    def expired(self) -> list[Reservation]:
        """Those kept longer than ``idle_s`` unused, taken out (the caller gives them back)."""
        deadline = time.monotonic() - self.idle_s
        gone: list[Reservation] = []
        for shape in list(self._kept):
            kept = self._kept[shape]
            fresh = [r for r in kept if r.kept_at > deadline]
            gone.extend(r for r in kept if r.kept_at <= deadline)
            if fresh:
                self._kept[shape] = fresh
            else:
                del self._kept[shape]
        return gone

    def next_expiry(self) -> float | None:
        """When the oldest kept reservation expires (``time.monotonic``), or None if none is kept."""
        oldest = [kept[0].kept_at for kept in self._kept.values() if kept]
        return min(oldest) + self.idle_s if oldest else None

    def drain(self) -> list[Reservation]:
        """Every kept reservation, taken out (the placement is closing)."""
        drained = [r for kept in self._kept.values() for r in kept]
        self._kept.clear()
        return drained

    def groups(self) -> list[Any]:
        return [r.group for kept in self._kept.values() for r in kept]
