"""The Ray cluster as the ``ray`` placement sees it: its connection, its nodes, their actors.

The connection is made on first use (``ray.init``, after a TCP probe of the
GCS, since ``ray.init`` would retry a dead address for minutes), or is the one
a Ray job already has. The cluster's alive nodes are read at most every
_NODES_TTL_S, and each node that advertises ``stockade_<runtime>`` gets one
``StockadeNode`` actor, pinned to it. ``/health`` probes the GCS at most every
_CHECK_TTL_S. Claims of isolates on the nodes are ``ray.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RuntimeUnavailableError
from .ray_isolate import NodeHandle
from .ray_node import StockadeNode

if TYPE_CHECKING:
    from .config import RayPlacementConfig

T = TypeVar("T")
log = logging.getLogger("stockade.placement")
RESOURCE_PREFIX = "stockade_"
_NODES_TTL_S = 1.0  # how long a read of the cluster's nodes is reused by acquires
_CHECK_TTL_S = 2.0  # how long a check of the cluster's reachability (for /health) is reused
_REMOVE_WAIT_S = 10.0  # a give-back waits no longer for a GCS that has gone away


def resource_name(runtime: str) -> str:
    return f"{RESOURCE_PREFIX}{runtime}"


def advertised(described: dict[str, Any]) -> dict[str, int]:
    """The runtimes a cluster's nodes advertise (``stockade_<runtime>``), each with how many nodes do."""
    offered: dict[str, int] = {}
    for node in described.get("nodes", []):
        for resource in node.get("resources", {}):
            if resource.startswith(RESOURCE_PREFIX):
                name = resource[len(RESOURCE_PREFIX) :]
                offered[name] = offered.get(name, 0) + 1
    return offered


def _probe(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to the cluster's GCS, or the OSError that says why there is none."""
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
        pass


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn`` in a daemon thread of its own. A call to the GCS may never return once the cluster
    is gone: neither the event loop's executor (which ``asyncio.run`` waits for at its end) nor
    the interpreter's exit may wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args, **kwargs), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="stockade-ray-call", daemon=True).start()
    return await future


async def removed(group: Any) -> None:
    """A placement group given back, off the event loop: it is a call to the GCS, which may be gone."""
    from ray.util.placement_group import remove_placement_group

    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(off_loop(remove_placement_group, group)), _REMOVE_WAIT_S)


class RayCluster:
    """The connection to the cluster at ``config.address`` and an actor on each stockade node.

    ``tasks`` is the placement's set of work its ``aclose`` waits for: the
    making of a node actor goes there (an actor made for nobody would hold its
    pool and zygotes for good, so the placement kills it once made).
    """

    def __init__(self, config: RayPlacementConfig, tasks: set[asyncio.Future[Any]]) -> None:
        self.config = config
        self.instance = uuid.uuid4().hex[:8]
        self.nodes: dict[str, NodeHandle] = {}  # by Ray's node id: the stockade nodes' actors
        self.alive: list[dict[str, Any]] = []  # ray.nodes() of the last read, alive only
        self.connected = False
        self.unreachable: str | None = None  # why the cluster cannot be reached, when it cannot
        self.closing = False  # no node actor is adopted once set
        self._tasks = tasks
        self._actors_started = itertools.count(1)  # numbers the node actors' names
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._owns_connection = False
        self._checked_at = 0.0
        self._reconnect: asyncio.Task[None] | None = None
        self._connecting = threading.Lock()
        self._gcs_address = config.address  # "auto" until a connection says which GCS it found

    @property
    def gone(self) -> bool:
        """Connected once and unreachable now: its actors went with it or cannot be asked."""
        return self.unreachable is not None and self.connected

    # -- the connection ------------------------------------------------------------------------

    async def connect_once(self) -> None:
        await off_loop(self._connect)

    def _connect(self) -> None:
        with self._connecting:  # a claim and /health's reconnection may both try
            self._connect_unlocked()

    def _connect_unlocked(self) -> None:
        import ray

        if self.connected:
            return
        if ray.is_initialized():  # inside a Ray job (an RL trainer's driver, say): its connection
            self.connected = True
            self._learn_gcs_address()
            return
        try:
            _probe(self.config.address)  # ray.init would retry a dead address for minutes
            ray.init(
                address=self.config.address,
                namespace=self.config.namespace,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster, in its words
            self.unreachable = f"the Ray cluster at {self.config.address} is unreachable: {exc}"
            raise RuntimeUnavailableError(self.unreachable) from None
        self._owns_connection = True
        self.unreachable = None
        self.connected = True
        if self.config.address == "auto":
            self._learn_gcs_address()

    def _learn_gcs_address(self) -> None:
        """The GCS that ``auto`` (or a Ray job's own connection) found, for later probes."""
        import ray

        with contextlib.suppress(Exception):
            self._gcs_address = str(ray.get_runtime_context().gcs_address)

    async def connect(self) -> None:
        """Reach the cluster and start every stockade node's actor now (a daemon does this at start)."""
        await self.connect_once()
        await self.refresh(force=True)
        nodes = list(self.nodes.values())
        ready = await asyncio.gather(*(self._node_ready(n) for n in nodes), return_exceptions=True)
        for node, outcome in zip(nodes, ready, strict=True):
            if isinstance(outcome, BaseException):  # its claims fail (and say so); the log says why here
                log.error("the stockade actor on Ray node %s (%s) is not ready: %s", node.node_id, node.address,
                          outcome or type(outcome).__name__)  # fmt: skip

    async def check(self, fresh: bool = False) -> None:
        """A fresh look at the GCS (a TCP connection, at most every _CHECK_TTL_S unless ``fresh``): a
        cluster gone since the start is said in ``unreachable``, and one that came back after an
        unreachable start is connected to in the background (not once the placement is closing)."""
        if not fresh and time.monotonic() - self._checked_at < _CHECK_TTL_S:
            return
        self._checked_at = time.monotonic()
        try:
            await asyncio.wait_for(off_loop(_probe, self._gcs_address, 1.0), 1.5)
        except (OSError, TimeoutError, ValueError) as exc:
            if self.unreachable is None and self.connected:
                # Ray itself ends a driver that cannot reach its GCS for 60 s
                # (gcs_rpc_server_reconnect_timeout_s): a supervisor starts the daemon again.
                log.error("lost the Ray cluster at %s: %s", self._gcs_address, exc)
            self.unreachable = f"the Ray cluster at {self._gcs_address} is unreachable: {exc or 'timed out'}"
        else:
            if self.connected:
                self.unreachable = None
            elif not self.closing and (self._reconnect is None or self._reconnect.done()):
                self._reconnect = asyncio.get_running_loop().create_task(self._quiet_connect())

    async def _quiet_connect(self) -> None:
        with contextlib.suppress(Exception):  # said by unreachable: its error
            await self.connect()

    async def _node_ready(self, node: NodeHandle) -> None:
        # A node actor that never comes up must not hold up the daemon's start: its claims fail instead.
        await asyncio.wait_for(node.actor.describe.remote(), self.config.claim_timeout * 4)

    # -- the nodes -----------------------------------------------------------------------------

    async def refresh(self, force: bool = False) -> list[dict[str, Any]]:
        """The cluster's alive nodes (read at most every _NODES_TTL_S), and an actor on each stockade node."""
        import ray

        async with self._lock:
            if not force and time.monotonic() - self._read_at < _NODES_TTL_S:
                return self.alive
            nodes = await off_loop(ray.nodes)
            self.alive = [n for n in nodes if n.get("Alive")]
            self._read_at = time.monotonic()
            alive = {n["NodeID"] for n in self.alive}
            for gone in set(self.nodes) - alive:
                del self.nodes[gone]  # its actor died with it
            for node_id in [i for i, handle in self.nodes.items() if handle.dead]:
                del self.nodes[node_id]  # its actor is gone; the node, if alive, gets another below
            for info in self.alive:
                runtimes = sorted(
                    k[len(RESOURCE_PREFIX) :] for k in info.get("Resources", {}) if k.startswith(RESOURCE_PREFIX)
                )
                if runtimes and info["NodeID"] not in self.nodes:
                    # Named: GCS calls, which may wait. Made whether or not this claim waits for it (its
                    # caller may go): an actor made for nobody would hold its pool and zygotes for good.
                    spawning = asyncio.ensure_future(off_loop(self._spawn, info, runtimes))
                    spawning.add_done_callback(functools.partial(self._adopt, info))
                    self._tasks.add(spawning)  # the placement's aclose waits for it: the actor is then killed
                    spawning.add_done_callback(self._tasks.discard)
                    await asyncio.shield(spawning)
            return self.alive

    def _adopt(self, info: dict[str, Any], spawning: asyncio.Future[Any]) -> None:
        """A node actor just made: the node's, unless it has one by now or the placement is closing."""
        if spawning.cancelled() or spawning.exception() is not None:
            return
        actor = spawning.result()
        known = self.nodes.get(info["NodeID"])
        if self.closing or (known is not None and not known.dead):
            import ray

            killing = asyncio.ensure_future(off_loop(ray.kill, actor))
            self._tasks.add(killing)
            killing.add_done_callback(self._tasks.discard)
            return
        self.nodes[info["NodeID"]] = NodeHandle(info["NodeID"], info["NodeManagerAddress"], actor)

    def _spawn(self, info: dict[str, Any], runtimes: list[str]) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_class = ray.remote(StockadeNode)
        return actor_class.options(
            # One more each time: a dead actor's name may still be taken when the next one starts.
            name=f"stockade-node-{info['NodeID'][:16]}-{self.instance}-{next(self._actors_started)}",
            num_cpus=0,
            max_restarts=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(info["NodeID"], soft=False),
        ).remote(runtimes, self.config.pool_size)

    def described_nodes(self) -> list[dict[str, Any]]:
        return [
            {"node_id": n.node_id, "address": n.address, "resources": dict(info.get("Resources", {}))}
            for info in self.alive
            for n in [self.nodes.get(info["NodeID"])]
            if n is not None
        ]

    # -- the end -------------------------------------------------------------------------------

    def stop_connecting(self) -> None:
        """No reconnection nor node actor from now on (the placement is closing)."""
        self.closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()

    def forget_nodes(self) -> list[NodeHandle]:
        """The node actors, forgotten here: for ``close`` (what they hold is theirs to end)."""
        nodes, self.nodes = list(self.nodes.values()), {}
        return nodes

    async def close(self, nodes: list[NodeHandle], gone: bool) -> None:
        """Each node actor shut down (its pools, its zygotes), then killed; the connection this
        made, ended, unless the cluster is ``gone`` (ray.shutdown would wait for its GCS until Ray
        ends the process, 60 s)."""
        import ray

        if nodes:
            await asyncio.gather(*(self._stop(n) for n in nodes), return_exceptions=True)
        for node in nodes:
            with contextlib.suppress(Exception):
                ray.kill(node.actor)
        self.connected = False
        if self._owns_connection and not gone:
            self._owns_connection = False
            await off_loop(ray.shutdown)  # the connection it made: the next placement makes its own

    async def _stop(self, node: NodeHandle) -> None:
        await asyncio.wait_for(node.actor.shutdown.remote(), 30)
