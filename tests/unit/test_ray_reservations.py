"""The reservations a released Ray isolate leaves booked: bounded, expiring, never on a node in doubt."""

from __future__ import annotations

import pytest

from stockade.placement import ray_reservations
from stockade.placement.ray_reservations import KeptReservations, Reservation, shape_of

SMALL = shape_of({"CPU": 0.25, "memory": 256.0, "stockade_process": 1.0})
LARGE = shape_of({"CPU": 1.0, "memory": 1024.0, "stockade_process": 1.0})


def _everywhere(node_id: str) -> bool:
    return True


def test_a_kept_reservation_goes_to_a_claim_of_its_shape_only() -> None:
    kept = KeptReservations(limit=4, idle_s=30)
    assert kept.keep(Reservation("g1", "n1", SMALL))
    assert kept.take(LARGE, _everywhere) == (None, [])
    taken, dropped = kept.take(SMALL, _everywhere)
    assert taken is not None and taken.group == "g1" and dropped == []
    assert len(kept) == 0 and kept.take(SMALL, _everywhere) == (None, [])


def test_the_shape_is_the_bundle_whatever_its_order() -> None:
    assert shape_of({"memory": 256.0, "CPU": 0.25, "stockade_process": 1.0}) == SMALL


def test_no_more_than_the_limit_is_kept() -> None:
    kept = KeptReservations(limit=2, idle_s=30)
    assert kept.keep(Reservation("g1", "n1", SMALL)) and kept.keep(Reservation("g2", "n1", LARGE))
    assert not kept.keep(Reservation("g3", "n1", SMALL))  # the caller gives it back
    assert len(kept) == 2 and sorted(kept.groups()) == ["g1", "g2"]
    assert KeptReservations(limit=0, idle_s=30).keep(Reservation("g", "n", SMALL)) is False


def test_one_on_a_node_in_doubt_is_given_back_not_handed_out() -> None:
    kept = KeptReservations(limit=4, idle_s=30)
    kept.keep(Reservation("g1", "alive", SMALL))
    kept.keep(Reservation("g2", "lost", SMALL))  # the newest: tried first
    taken, dropped = kept.take(SMALL, lambda node: node == "alive")
    assert taken is not None and taken.group == "g1"
    assert [r.group for r in dropped] == ["g2"]
    assert len(kept) == 0


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The reservations' clock, set by the test: ``now[0]``."""
    clock = [1000.0]
    monkeypatch.setattr(ray_reservations.time, "monotonic", lambda: clock[0])
    return clock


def test_one_unused_too_long_is_given_back(now: list[float]) -> None:
    kept = KeptReservations(limit=4, idle_s=30)
    kept.keep(Reservation("old", "n1", LARGE))
    now[0] += 20
    kept.keep(Reservation("young", "n1", SMALL))
    now[0] += 15  # "old" has waited 35 s, "young" 15 s
    taken, dropped = kept.take(SMALL, _everywhere)
    assert taken is not None and taken.group == "young"
    assert [r.group for r in dropped] == ["old"]
    assert len(kept) == 0


def test_the_next_expiry_is_the_oldest_kept_ones(now: list[float]) -> None:
    kept = KeptReservations(limit=4, idle_s=30)
    assert kept.next_expiry() is None
    kept.keep(Reservation("a", "n1", SMALL))
    now[0] += 10
    kept.keep(Reservation("b", "n1", LARGE))
    assert kept.next_expiry() == 1030.0


def test_drain_takes_out_everything() -> None:
    kept = KeptReservations(limit=4, idle_s=30)
    kept.keep(Reservation("g1", "n1", SMALL))
    kept.keep(Reservation("g2", "n2", LARGE))
    assert sorted(r.group for r in kept.drain()) == ["g1", "g2"]
    assert len(kept) == 0 and kept.groups() == []


def test_a_cluster_lost_under_a_claim_is_an_unavailable_runtime_not_an_internal_error() -> None:
    # Ray raised TaskPlacementGroupRemoved out of the reservation once its head was stopped: it
    # reached the HTTP door as a 500 with a traceback in the log.
    import asyncio

    import ray.exceptions

    from stockade.errors import RuntimeUnavailableError, error_code
    from stockade.placement.config import RayPlacementConfig
    from stockade.placement.ray import RayPlacement
    from stockade.policy import Policy

    placement = RayPlacement(RayPlacementConfig(type="ray", address="127.0.0.1:6391"))

    async def lost(policy: Policy) -> object:
        raise ray.exceptions.TaskPlacementGroupRemoved()

    placement._claim_on_cluster = lost  # type: ignore[method-assign, assignment]
    with pytest.raises(RuntimeUnavailableError, match=r"127\.0\.0\.1:6391 failed this claim") as caught:
        asyncio.run(placement.acquire(Policy()))
    assert error_code(caught.value) == "runtime_unavailable"


def test_a_node_offers_only_the_runtimes_it_is_told_to() -> None:
    # Each runtime a node offers gets a warm pool there: a microVM's is a QEMU each.
    import json
    import subprocess
    import sys

    from tests.conftest import require

    require("process")
    said = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "ray", "resources", "--runtime", "process", "--isolates", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert said.returncode == 0 and json.loads(said.stdout) == {"stockade_process": 3}, said.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "ray", "resources", "--runtime", "fake"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "invalid choice: 'fake'" in refused.stderr


def test_a_nodes_own_refusal_stays_what_it_is() -> None:
    # Ray wraps what the node's actor raised (RayTaskError, itself a RayError): a policy the node
    # refused is the caller's mistake, not a cluster gone.
    import asyncio

    import ray.exceptions

    from stockade.errors import PolicyError
    from stockade.placement.config import RayPlacementConfig
    from stockade.placement.ray import RayPlacement
    from stockade.policy import Policy

    placement = RayPlacement(RayPlacementConfig(type="ray", address="127.0.0.1:6391"))
    refused = PolicyError("the node refused this policy")

    async def wrapped(policy: Policy) -> object:
        raise ray.exceptions.RayTaskError("acquire", "traceback of the node", refused).as_instanceof_cause()

    placement._claim_on_cluster = wrapped  # type: ignore[method-assign, assignment]
    with pytest.raises(PolicyError, match="the node refused this policy") as caught:
        asyncio.run(placement.acquire(Policy()))
    assert caught.value is refused


def test_a_closing_placement_places_nothing_and_a_lost_isolates_room_goes_back_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A claim begun once aclose had waited for the claims got an isolate of a node being stopped, its
    # room never given back; a lost isolate's room stayed booked (on the nodes left: Ray moves a lost
    # node's groups) until its holder closed it; a release begun by kill() was not waited for.
    import asyncio

    from stockade.errors import RuntimeUnavailableError
    from stockade.placement import ray as ray_placement
    from stockade.placement.config import RayPlacementConfig
    from stockade.placement.ray import RayPlacement
    from stockade.placement.ray_isolate import NodeHandle, RayIsolate
    from stockade.policy import Policy

    removed: list[str] = []

    async def remove(group: str) -> None:
        removed.append(group)

    monkeypatch.setattr(ray_placement, "removed", remove)

    async def scenario() -> None:
        placement = RayPlacement(RayPlacementConfig(type="ray", address="127.0.0.1:6391"))
        node = NodeHandle("n1", "10.0.0.2", actor=None)
        info = {"id": "i1", "runtime": "process", "scratch_dir": "/tmp"}
        isolate = RayIsolate(placement, node, info, Policy(), Reservation("g1", "n1", SMALL))
        isolate._mark_lost(RuntimeError("gone"))
        isolate._mark_lost(RuntimeError("gone again"))  # given back once
        await asyncio.gather(*list(placement._claims))
        assert removed == ["g1"] and node.suspect
        release = asyncio.get_running_loop().create_future()
        placement.track(release)
        assert release in placement._claims  # aclose waits for it
        release.set_result(None)
        await asyncio.sleep(0)
        assert release not in placement._claims
        placement._closing = True
        with pytest.raises(RuntimeUnavailableError, match="the ray placement is closing"):
            await placement.acquire(Policy())

    asyncio.run(scenario())
