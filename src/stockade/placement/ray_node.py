"""The actor of one Ray node: it holds the node's runtimes, warm pools and isolates.

Started by the ``ray`` placement on every node that advertises a ``stockade_*``
resource, pinned there (node affinity, no CPU of its own: the isolates' CPU and
memory are reserved by the placement's placement groups). Everything an isolate
does runs on this node, under this node's kernel and cgroups, exactly as on a
single host; Ray only carries the calls, the output and the files.

It is an async actor: calls on different isolates run concurrently on its event
loop, and a run's output goes back as a Ray streaming generator, piece by piece.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ..errors import ConfigError, NotFoundError, SandboxError
from ..policy import Policy
from ..runtimes.sandbox import AgentSandbox
from .base import Isolate
from .config import LocalPlacementConfig
from .local import LocalPlacement

OUTPUT, RESULT = "out", "result"
log = logging.getLogger("stockade.placement")
_GIVEN_UP_KEPT = 4096  # ids released before their hand-over, remembered (the oldest forgotten first)
_PEERS_TTL_S = 30.0  # how long a look at the cluster's machines is taken for the egress of hand-overs


def refuse_cluster_networks(networks: tuple[str, ...] | None, addresses: list[str]) -> None:
    """``ConfigError`` when ``networks`` (the node's STOCKADE_EGRESS_NETWORKS) hold one of the
    cluster's ``addresses`` (the nodes', the GCS's; ``host:port`` or not, a name resolved): a
    caller's allow-list could then have the node's egress proxy connect an isolate to Ray's
    ports, and whoever reaches the GCS runs code on every node."""
    allowed = [ipaddress.ip_network(n) for n in networks or ()]
    if not allowed:
        return
    for text in addresses:
        for address in _resolved(_host_of(text)):
            inside = [str(n) for n in allowed if address in n]
            if inside:
                raise ConfigError(
                    f"STOCKADE_EGRESS_NETWORKS holds {inside[0]}, where this Ray cluster's {address} is: a caller's "
                    "allow-list could reach Ray's ports from an isolate (code on every node); leave the cluster's "
                    "network out of it"
                )


def _host_of(text: str) -> str:
    """The host of ``host:port``, ``[v6]:port`` or a bare host."""
    host = text.rpartition(":")[0] if text.count(":") == 1 or text.startswith("[") else text
    return host.strip("[]")


def _resolved(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """``host``'s addresses: itself when it is one, else what it resolves to (a GCS given as a name,
    ray-head:6379, is one Ray does not resolve); none when it does not resolve."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))


class StockadeNode:
    """One per node and placement; ``runtimes``: the ones the node advertises (warmed now)."""

    def __init__(self, runtimes: list[str], pool_size: int) -> None:
        import ray
        import ray.util

        from ..settings import current, egress_networks, serve_callers

        # Its isolates' egress runs here, for whoever holds the placement (a daemon's callers): a secret
        # its file stores with no hosts, a private network not in STOCKADE_EGRESS_NETWORKS are refused
        # to them, as a daemon refuses them.
        serve_callers()
        context = ray.get_runtime_context()
        self._gcs_address = str(context.gcs_address)
        networks = egress_networks(current())
        if networks:  # the cluster's addresses: this node's, the GCS's, every node's now
            node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
            nodes = [str(n.get("NodeManagerAddress", "")) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
            refuse_cluster_networks(networks, [node_ip, context.gcs_address, *nodes])
        self._peers_at = time.monotonic()
        self._refuse_peers()
        self.node_id = context.get_node_id()
        # The node's own isolates are a local placement's: its warm pools, its hand-overs.
        self.local = LocalPlacement(LocalPlacementConfig(pool_size=pool_size))
        self.isolates: dict[str, Isolate] = {}
        # A hand-over whose reply the placement never got (Ray said the actor was unreachable) is
        # released by its id, maybe before this actor has handed it over: remembered, it is not.
        self._given_up: OrderedDict[str, None] = OrderedDict()
        self.runtimes = runtimes
        for name in runtimes:  # kept full by this actor from now on (pool.py's refill thread)
            self.local.manager.get(name).warm_up()

    def _refuse_peers(self) -> None:
        """The cluster's machines (this node, the GCS, every node Ray knows, alive or not) as this
        host's own to its isolates' egress, public addresses or not (egress/allowlist.py
        ``refuse_peers``): a caller's allow-list naming another node's public address had this
        node's proxy reach its Ray ports, code on every node. Looked at again every _PEERS_TTL_S
        at a hand-over, for the nodes that join."""
        import ray
        import ray.util

        from ..egress.allowlist import refuse_peers

        texts = [str(ray.util.get_node_ip_address()), self._gcs_address]  # type: ignore[no-untyped-call]
        texts += [str(n.get("NodeManagerAddress", "")) for n in ray.nodes()]  # type: ignore[no-untyped-call]
        refuse_peers(a for text in texts if _host_of(text) for a in _resolved(_host_of(text)))

    def describe(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "runtimes": self.runtimes,
            "isolates": len(self.isolates),  # handed out and not yet released
        }

    async def acquire(self, policy_json: str, isolate_id: str) -> dict[str, Any]:
        """An isolate for ``policy_json``, held under ``isolate_id`` (the placement's pick, so that
        it can release one whose hand-over it never heard of)."""
        started = time.monotonic()
        if isolate_id in self.isolates or isolate_id in self._given_up:
            raise SandboxError(f"isolate {isolate_id} was already handed over or given up on node {self.node_id}")
        policy = Policy(**json.loads(policy_json))
        if time.monotonic() - self._peers_at > _PEERS_TTL_S:
            self._peers_at = time.monotonic()  # one look at a time: the acquires meanwhile take the last
            try:
                await asyncio.to_thread(self._refuse_peers)  # a GCS call, and names resolved
            except Exception as exc:  # noqa: BLE001 - the last look stands
                log.warning("the cluster's machines could not be looked at again (the last look stands): %s", exc)
        sandbox = await self.local.acquire(policy)
        if self._given_up.pop(isolate_id, 0) is None:  # released while it was being made
            await self.local.release(sandbox)
            raise SandboxError(f"isolate {isolate_id} was given up by its holder before its hand-over")
        self.isolates[isolate_id] = sandbox
        return {
            "id": isolate_id,
            "runtime": sandbox.runtime_name,
            "scratch_dir": sandbox.scratch_dir,
            "acquire_ms": (time.monotonic() - started) * 1000,
        }

    def _get(self, isolate_id: str) -> Isolate:
        sandbox = self.isolates.get(isolate_id)
        if sandbox is None:
            raise NotFoundError(f"no isolate {isolate_id} on node {self.node_id}")
        return sandbox

    async def run(self, isolate_id: str, kind: str, call: dict[str, Any]) -> AsyncIterator[tuple[Any, ...]]:
        """``exec`` or ``run_code`` (``kind``) with ``call``'s keywords: its output as it comes, then its result."""
        sandbox = self._get(isolate_id)
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def on_output(stream: str, data: bytes) -> None:  # on this loop: the agent's reader calls it here
            queue.put_nowait((OUTPUT, stream, data))

        if kind == "exec":
            task = asyncio.ensure_future(sandbox.aexec(on_output=on_output, **call))
        elif kind == "run_code":
            task = asyncio.ensure_future(sandbox.arun_code(on_output=on_output, **call))
        else:
            raise ValueError(f"unknown call {kind!r}")
        task.add_done_callback(lambda _: queue.put_nowait((RESULT,)))
        try:
            while True:
                item = await queue.get()
                if item[0] == RESULT:
                    break
                yield item
            yield (RESULT, task.result().to_json())
        finally:
            if not task.done():  # the caller went away: given up (the agent's call ends on its node)
                task.cancel()

    async def result_of(self, isolate_id: str, kind: str, call: dict[str, Any]) -> str:
        """``exec`` or ``run_code`` whose caller takes no output as it comes: its result alone, in one
        reply (a streaming generator costs the node a report to the caller per item)."""
        sandbox = self._get(isolate_id)
        if kind == "exec":
            result = await sandbox.aexec(**call)
        elif kind == "run_code":
            result = await sandbox.arun_code(**call)
        else:
            raise ValueError(f"unknown call {kind!r}")
        return result.to_json()

    async def spawn(
        self, isolate_id: str, argv: list[str], stdin: bytes, env: dict[str, str] | None, cwd: str | None
    ) -> dict[str, Any]:
        """A background process in the isolate: its handle and pid (its calls go through ``proc_call``)."""
        process = await self._agent_sandbox(isolate_id).aspawn(argv, stdin=stdin, env=env, cwd=cwd)
        return {"handle": process.handle, "pid": process.pid}

    async def proc_call(self, isolate_id: str, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A background process's call (read, write, wait, kill; a relayed port's): what the agent
        said, its output redacted on this node as on one host."""
        return await self._agent_sandbox(isolate_id).aproc_call(method, params, timeout)

    def _agent_sandbox(self, isolate_id: str) -> AgentSandbox:
        sandbox = self._get(isolate_id)
        if not isinstance(sandbox, AgentSandbox):  # the local placement's isolates are its runtimes' own
            raise TypeError(f"isolate {isolate_id} has no agent to start processes with")
        return sandbox

    async def write_file(self, isolate_id: str, path: str, data: bytes, mode: int) -> None:
        await self._get(isolate_id).awrite_file(path, data, mode)

    async def read_file(self, isolate_id: str, path: str, max_bytes: int) -> bytes:
        return await self._get(isolate_id).aread_file(path, max_bytes)

    async def list_dir(self, isolate_id: str, path: str) -> list[dict[str, Any]]:
        return await self._get(isolate_id).alist_dir(path)

    async def interrupt(self, isolate_id: str, session: str | None = None) -> bool:
        return await self._get(isolate_id).ainterrupt(session)  # one frame to the agent, never a wait

    async def close_interpreter(self, isolate_id: str, session: str) -> bool:
        return await self._get(isolate_id).aclose_interpreter(session)

    async def take_report(self, isolate_id: str) -> Any:
        """What the isolate did since its last run's report (``Isolate.atake_report``)."""
        return await self._get(isolate_id).atake_report()

    async def release(self, isolate_id: str) -> bool:
        """Whether ``isolate_id`` was held here (now released); one not handed over yet never will be."""
        sandbox = self.isolates.pop(isolate_id, None)
        if sandbox is None:
            self._given_up[isolate_id] = None
            while len(self._given_up) > _GIVEN_UP_KEPT:
                self._given_up.popitem(last=False)
            return False
        await self.local.release(sandbox)
        return True

    async def shutdown(self) -> None:
        """Every isolate closed and the runtimes' pools and zygotes ended, before the actor goes."""
        held, self.isolates = list(self.isolates.values()), {}
        await asyncio.gather(*(self.local.release(sandbox) for sandbox in held), return_exceptions=True)
        await self.local.aclose()
