"""The ``ray`` placement: isolates on the nodes of a Ray cluster.

Each node that advertises ``stockade_<runtime>`` (``stockade ray resources``)
gets one ``StockadeNode`` actor of this placement, pinned to it, which keeps
that node's warm pools full. An ``acquire`` reserves the isolate's CPU, memory
and one unit of the isolation resource as a Ray placement group (so Ray, not
stockade, decides which node has room, and the room stays booked for the
isolate's life), then takes an isolate from that node's actor: from its warm
pool when the policy matches, so a claim is a hand-over, not a start.

Ray's resources are bookkeeping; every limit is still enforced by the node's
own kernel, as on one host. A node that goes away ends the runs on it with
``termination_reason="lost"`` naming the node; its held isolates are gone
(``SandboxLostError``), and the next acquire lands elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from ..errors import DaemonBusyError, RuntimeUnavailableError, StockadeError
from .base import reach, runtime_choices
from .ray_cluster import RayCluster, advertised, off_loop, removed, resource_name
from .ray_isolate import NodeHandle, RayIsolate, _cause, actor_died, lost_node
from .ray_reservations import KeptReservations, Reservation, shape_of

if TYPE_CHECKING:
    from ..policy import Policy
    from .base import Isolate
    from .config import RayPlacementConfig

log = logging.getLogger("stockade.placement")
MiB = 1024 * 1024
_ACQUIRE_TRIES = 3  # a node lost between reservation and hand-over: the next try lands elsewhere
_KEPT_IDLE_S = 30.0  # how long a released isolate's room stays booked for a claim of its shape
# A new reservation not placed within this may be waiting for room the kept ones hold: they go back.
_RESERVE_GRACE_S = 0.5


async def _resolved(ref: Any) -> Any:
    return await ref


class RayPlacement:
    """Connects to the cluster at ``config.address`` (``ray.init``) on first use."""

    name = "ray"
    remote = True

    def __init__(self, config: RayPlacementConfig) -> None:
        self.config = config
        self._held: set[RayIsolate] = set()
        self._claims: set[asyncio.Future[Any]] = set()  # claims under way, and give-backs of unclaimed ones
        self._forgets: set[asyncio.Future[None]] = set()  # releases of hand-overs whose replies were lost
        self.cluster = RayCluster(config, self._claims)
        self._kept = KeptReservations(config.kept_reservations, _KEPT_IDLE_S)
        self._expiry: asyncio.TimerHandle | None = None  # gives back what was kept too long unused
        self._closing = False
        self._reserving = 0  # claims waiting for a new reservation to be placed: nothing is kept meanwhile

    async def connect(self) -> dict[str, Any]:
        """Reach the cluster and start every stockade node's actor now (a daemon does this at start)."""
        await self.cluster.connect()
        return self.describe()

    async def check(self) -> dict[str, Any]:
        """``describe()`` after a fresh look at the GCS (at most every few seconds): a cluster gone
        since the start is said, and one that came back is connected to in the background."""
        await self.cluster.check()
        return self.describe()

    # -- isolates ------------------------------------------------------------------------------

    def _bundle(self, policy: Policy, runtime: str) -> dict[str, float]:
        return {"CPU": policy.cpu_limit, "memory": float(policy.memory_mb * MiB), resource_name(runtime): 1.0}

    def _choose(self, policy: Policy, cluster: list[dict[str, Any]]) -> tuple[str, dict[str, float]]:
        """The runtime to ask for: the first of the policy's choices some node could ever hold, or why none."""
        choices, wanted = runtime_choices(policy)
        reasons = []
        for runtime in choices:
            bundle = self._bundle(policy, runtime)
            offering = [n for n in cluster if resource_name(runtime) in n.get("Resources", {})]
            if not offering:
                reasons.append(f"no node advertises {resource_name(runtime)}")
                continue
            if any(all(n["Resources"].get(k, 0.0) >= v for k, v in bundle.items()) for n in offering):
                return runtime, bundle
            biggest = max(offering, key=lambda n: n["Resources"].get("CPU", 0.0))
            reasons.append(
                f"no node offering {resource_name(runtime)} has cpu_limit={policy.cpu_limit:g} and "
                f"memory_mb={policy.memory_mb} in all (the largest: {biggest['Resources'].get('CPU', 0):g} CPU, "
                f"{int(biggest['Resources'].get('memory', 0)) // MiB} MiB)"
            )
        raise RuntimeUnavailableError(f"the Ray cluster cannot hold {wanted}: {'; '.join(reasons)}")

    def runtime_for(self, policy: Policy) -> str:
        return runtime_choices(policy)[0][0]  # the nodes say at the claim whether they have it

    def take_warm(self, policy: Policy) -> Isolate | None:
        return None  # the warm pools are the nodes': a claim is always awaited

    def dispose(self, isolate: Isolate) -> None:
        isolate.kill()  # released on its node in the background

    def pool_statistics(self) -> dict[str, dict[str, int]]:
        return {}  # the nodes' pools are theirs (their actors keep them full)

    async def runtimes(self) -> list[dict[str, Any]]:
        """Each runtime the nodes advertise, and on how many of them (all unavailable, with the
        reason, when the cluster cannot be reached)."""
        described = await reach(self)
        if not described.get("reachable", True):
            return [{"name": self.name, "available": False, "isolation": "", "reason": described["error"]}]
        return [
            {"name": name, "available": True, "isolation": name, "reason": f"{count} node(s) of the ray placement",
             "details": {}}
            for name, count in sorted(advertised(described).items())
        ]  # fmt: skip

    async def acquire(self, policy: Policy) -> Isolate:
        # A claim is several calls to the cluster (a reservation, then a hand-over on the node).
        # A caller cancelled between two of them would leave a reservation, or an isolate on
        # its node, that nobody holds: the claim runs to its end as a task of its own, and
        # what it got is given back when its caller has gone.
        if self._closing:  # what it got would be given back to nothing (its node's actor stopped)
            raise RuntimeUnavailableError("the ray placement is closing: it places no more isolates")
        claim = asyncio.ensure_future(self._claim(policy))
        self._claims.add(claim)
        claim.add_done_callback(self._claims.discard)
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            claim.add_done_callback(self._unclaimed)
            raise

    def _unclaimed(self, claim: asyncio.Future[Isolate]) -> None:
        if claim.cancelled() or claim.exception() is not None:
            return  # it got nothing (what it had reserved, it removed)
        release = asyncio.ensure_future(self.release(claim.result()))
        self._claims.add(release)
        release.add_done_callback(self._claims.discard)

    async def _claim(self, policy: Policy) -> Isolate:
        import ray.exceptions

        try:
            return await self._claim_on_cluster(policy)
        except ray.exceptions.RayError as exc:
            cause = _cause(exc)
            if isinstance(cause, StockadeError):
                raise cause from None  # the node's own answer (a policy it refused, a start that failed)
            # Ray's own word for a cluster that went away under the claim (its placement group
            # removed, its GCS gone): the runtime is unavailable, said as the other doors say it.
            raise RuntimeUnavailableError(
                f"the Ray cluster at {self.config.address} failed this claim ({type(exc).__name__}): it may "
                "be gone; /health and `stockade daemon status` say whether it is reachable"
            ) from None

    async def _claim_on_cluster(self, policy: Policy) -> Isolate:
        await self.cluster.connect_once()
        await self.check()  # a cluster gone since the connection: said now, not after Ray's own wait
        if self.cluster.unreachable is not None:
            raise RuntimeUnavailableError(self.cluster.unreachable)
        last: BaseException | None = None
        for _ in range(_ACQUIRE_TRIES):
            cluster = await self.cluster.refresh(force=last is not None)
            runtime, bundle = self._choose(policy, cluster)
            reservation, expired = self._kept.take(shape_of(bundle), self._usable)
            self._give_back(expired)
            if reservation is None:
                reservation = await self._reserve(policy, runtime, bundle)
            node, isolate_id, asked = None, uuid.uuid4().hex, False
            # Bounded: an actor alive but wedged would hold this claim, its room and the daemon's
            # shutdown (which waits for claims) for good. Its own expiry, not a node's TimeoutError
            # (Ray raises a node's exception as its class: a start that timed out there).
            hand_over = asyncio.timeout(self.config.claim_timeout * 4)
            try:
                node = self.cluster.nodes.get(reservation.node_id)
                if node is None or node.dead:
                    await self.cluster.refresh(force=True)
                    node = self.cluster.nodes.get(reservation.node_id)
                if node is None:  # the node left the cluster since Ray placed the group there
                    await removed(reservation.group)
                    last = RuntimeUnavailableError(f"the Ray node {reservation.node_id} left the cluster")
                    continue
                # The node runs the runtime reserved for it, not its own pick for a trust (it may have
                # a stronger one this placement did not ask Ray for). A policy that names a runtime
                # or a level (or nothing: the default) is the node's to pick the same way: kept as
                # it came, its digest the one its caller checks.
                chooses = policy.trust is not None and not policy.runtime and not policy.isolation
                placed = policy.replace(runtime=runtime) if chooses else policy
                asked = True
                async with hand_over:
                    info = await node.actor.acquire.remote(placed.canonical_json(), isolate_id)
            except Exception as exc:
                await removed(reservation.group)
                wedged = hand_over.expired()
                if not lost_node(exc) and not wedged:
                    raise
                if asked and node is not None and not actor_died(exc):
                    self._forget(node, isolate_id)  # the actor may live on and have handed it over
                if (doubtful := self.cluster.nodes.get(reservation.node_id)) is not None:
                    doubtful.suspect = True  # what is kept there is given back, not tried next
                    doubtful.dead = doubtful.dead or (doubtful is node and actor_died(exc))
                if wedged:
                    exc = RuntimeUnavailableError(
                        f"the Ray node {reservation.node_id} did not hand an isolate over within "
                        f"{self.config.claim_timeout * 4:g} s"
                    )
                last = exc  # the node went between the reservation and the hand-over
                continue
            except BaseException:
                await removed(reservation.group)
                raise
            isolate = RayIsolate(self, node, info, placed, reservation)
            self._held.add(isolate)
            return isolate
        raise RuntimeUnavailableError(f"every node the Ray cluster offered was lost during the hand-over: {last}")

    async def _reserve(self, policy: Policy, runtime: str, bundle: dict[str, float]) -> Reservation:
        """Room for one isolate, booked now: a placement group Ray places, and the node it chose."""
        from ray.util.placement_group import placement_group, placement_group_table

        group = await off_loop(placement_group, [bundle], strategy="STRICT_PACK")  # a GCS call
        self._reserving += 1
        ready = asyncio.ensure_future(_resolved(group.ready()))
        try:
            try:
                await asyncio.wait_for(asyncio.shield(ready), _RESERVE_GRACE_S)
            except TimeoutError:
                # Not placed at once: the room may be what released isolates left kept (of this
                # shape or another), idle while this claim waits. It goes back to Ray.
                self._give_back(self._kept.drain())
                try:
                    await asyncio.wait_for(ready, max(0.0, self.config.claim_timeout - _RESERVE_GRACE_S))
                except TimeoutError:
                    raise DaemonBusyError(
                        f"no node of the Ray cluster had room for {runtime} (cpu_limit={policy.cpu_limit:g}, "
                        f"memory_mb={policy.memory_mb}) within {self.config.claim_timeout:g} s"
                    ) from None
            table = await off_loop(placement_group_table, group)
        except BaseException:
            await removed(group)
            raise
        finally:
            self._reserving -= 1
            if not ready.done():
                ready.cancel()
        return Reservation(group, table["bundles_to_node_id"][0], shape_of(bundle))

    def _forget(self, node: NodeHandle, isolate_id: str) -> None:
        """A hand-over Ray said failed (the actor unreachable), released on the node in the
        background: had it been made, nobody would hold it. The node remembers one it has not made
        yet. Tried again while the actor cannot be reached (a partition heals), until it answers or is
        dead; ``aclose`` ends the tries (it kills the actors, and their isolates with them), and
        none is begun once it has."""
        if self._closing:
            return

        async def release() -> None:
            import ray.exceptions

            wait = 0.5
            until = time.monotonic() + self.config.claim_timeout * 4
            while True:
                try:
                    await asyncio.wait_for(node.actor.release.remote(isolate_id), self.config.claim_timeout)
                    return
                except ray.exceptions.ActorDiedError:
                    return  # its isolates went with it
                except Exception as exc:  # noqa: BLE001 - unreachable still: tried again
                    if time.monotonic() + wait > until:
                        log.warning("isolate %s on node %s could not be released: %s", isolate_id, node.node_id, exc)
                        return
                await asyncio.sleep(wait)
                wait = min(wait * 2, 8.0)

        task = asyncio.ensure_future(release())
        self._forgets.add(task)
        task.add_done_callback(self._forgets.discard)

    def track(self, ending: asyncio.Future[Any]) -> None:
        """An isolate's release begun elsewhere (``kill``, ``dispose``): ``aclose`` waits for it, so
        that its room is given back before the connection goes."""
        self._claims.add(ending)
        ending.add_done_callback(self._claims.discard)

    def lost(self, isolate: RayIsolate) -> None:
        """An isolate whose node was lost: its room goes back now (Ray moves a lost node's groups
        onto the nodes left, where it would book room for nothing until its holder closed it)."""
        self._give_back([isolate.reservation])

    def _usable(self, node_id: str) -> bool:
        node = self.cluster.nodes.get(node_id)
        return node is not None and not node.suspect

    def _give_back(self, reservations: list[Reservation]) -> None:
        """Placement groups removed in the background (aclose waits for them)."""
        for reservation in reservations:
            removal = asyncio.ensure_future(removed(reservation.group))
            self._claims.add(removal)
            removal.add_done_callback(self._claims.discard)

    async def release(self, isolate: Isolate) -> None:
        assert isinstance(isolate, RayIsolate)
        if isolate.closed:
            return
        isolate.closed = True
        self._held.discard(isolate)
        released = False
        node = isolate._node
        try:
            if isolate.lost is not None:
                # Said lost for Ray's word that the actor could not be reached, which is not that it
                # died: the isolate may live on there, its room given back to Ray below. Released
                # in the background, tried again until the actor answers or is dead.
                if not node.dead:
                    self._forget(node, isolate.id)
            else:
                try:
                    # Bounded: a wedged actor must not keep the room booked (given back below instead).
                    released = await asyncio.wait_for(
                        node.actor.release.remote(isolate.id), self.config.claim_timeout * 4
                    )
                except TimeoutError:
                    node.suspect = True  # nothing more is kept there, nor tried there first
                    self._forget(node, isolate.id)
                except Exception as exc:  # noqa: BLE001 - a node lost now: its isolates went with it, if it died
                    log.debug("releasing isolate %s on node %s: %s", isolate.id, isolate.node, exc)
                    if not actor_died(exc):
                        self._forget(node, isolate.id)
        finally:
            # Its room stays booked for the next claim of its shape, unless its node is in doubt
            # or the placement is closing (what aclose has drained is not refilled behind it).
            keep = released and not self._closing and not self._reserving and self._usable(isolate.node)
            if keep and self._kept.keep(isolate.reservation):
                self._expire_later()
            else:
                await removed(isolate.reservation.group)

    def _expire_later(self) -> None:
        due = self._kept.next_expiry()
        if self._expiry is None and due is not None:
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._expire)

    def _expire(self) -> None:
        """Give back what was kept longer than _KEPT_IDLE_S unused; then wait for the next to expire."""
        self._expiry = None
        self._give_back(self._kept.expired())
        if not self._closing:
            self._expire_later()

    def describe(self) -> dict[str, Any]:
        cluster = self.cluster
        described = {
            "type": "ray", "address": self.config.address, "namespace": self.config.namespace,
            "reachable": cluster.connected and cluster.unreachable is None, "error": cluster.unreachable,
            "nodes": cluster.described_nodes(), "held": len(self._held), "kept_reservations": len(self._kept),
        }  # fmt: skip
        described["runtimes"] = sorted(advertised(described))
        return described

    async def aclose(self) -> None:
        """Every held isolate released and every node actor shut down (its pools, its zygotes), then killed."""
        self._closing = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.cluster.stop_connecting()
        while self._claims:  # a claim's caller gone: what it gets is given back before the nodes stop
            await asyncio.gather(*list(self._claims), return_exceptions=True)
        for forget in list(self._forgets):  # the actors are killed below, with what they hold
            forget.cancel()
        await self.cluster.check(fresh=True)  # not a look seconds old: one slow probe would skip the clean-up
        gone = self.cluster.gone
        nodes = self.cluster.forget_nodes()
        if gone:
            # The cluster went away: its actors went with it or cannot be asked. Nothing to wait for.
            self._held.clear()
            nodes = []
        for isolate in list(self._held):
            await self.release(isolate)
        kept = self._kept.drain()
        if not gone:
            await asyncio.gather(*(removed(r.group) for r in kept))
        await self.cluster.close(nodes, gone)
