"""The ``ray`` placement on a real Ray cluster: a head and two worker nodes, each its own ``ray start``.

Every node is a real raylet with its own object store; the isolates run on the
node Ray reserved room on, under that node's runtimes. Node loss is a real one:
every process of a worker node is SIGKILLed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from stockade.errors import CallTooLargeError, RuntimeUnavailableError, SandboxLostError
from stockade.placement import one_shot, open_placement
from stockade.placement.ray import RayIsolate, RayPlacement
from stockade.policy import Policy
from stockade.testing.ray_cluster import LocalRayCluster
from tests.conftest import require

pytest.importorskip("ray", reason="the ray placement needs ray (the dev extra installs it)")

pytestmark = pytest.mark.timeout(600)
SMALL = Policy(cpu_limit=0.25, memory_mb=256)  # four to a node of one CPU


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    require("process")
    require("gvisor")
    # Head and worker 1 offer process isolates, worker 2 gVisor ones; one CPU each (bookkeeping).
    nodes = [(1, {"stockade_process": 16}), (1, {"stockade_process": 16}), (1, {"stockade_gvisor": 16})]
    with LocalRayCluster(nodes) as running:
        yield running
    assert running.leftovers() == []


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_placement(cluster: LocalRayCluster, body: Any, **config: Any) -> Any:
    placement = open_placement({"type": "ray", "address": cluster.address, "pool_size": 1, **config})
    assert isinstance(placement, RayPlacement)
    try:
        await placement.connect()
        return await body(placement)
    finally:
        await placement.aclose()


def test_executions_land_on_the_node_with_the_resource_asked_for(cluster: LocalRayCluster) -> None:
    async def body(placement: RayPlacement) -> None:
        import ray

        ports = {n["NodeID"]: n["NodeManagerPort"] for n in ray.nodes()}
        gvisor_node = {nid for nid, port in ports.items() if port == cluster.nodes[2].ports["node-manager-port"]}
        for _ in range(3):
            isolate = await placement.acquire(SMALL.replace(runtime="gvisor"))
            try:
                assert isolate.node in gvisor_node
                result = await isolate.exec(["python3", "-c", "print(6 * 7)"])
                assert (result.termination_reason, result.stdout, result.runtime_used) == (
                    "completed",
                    "42\n",
                    "gvisor",
                )
            finally:
                await placement.release(isolate)
            isolate = await placement.acquire(SMALL)
            try:
                assert isolate.node not in gvisor_node and isolate.runtime == "process"
            finally:
                await placement.release(isolate)
        # A trust takes the strongest level a node offers that the trust accepts.
        result = await one_shot(placement, SMALL.replace(trust="verified"), argv=["true"])
        assert (result.termination_reason, result.runtime_used) == ("completed", "gvisor")

    _run(_with_placement(cluster, body))


def test_a_policy_no_node_can_hold_is_refused_with_the_reason(cluster: LocalRayCluster) -> None:
    async def body(placement: RayPlacement) -> None:
        with pytest.raises(RuntimeUnavailableError, match="runtime microvm: no node advertises stockade_microvm"):
            await placement.acquire(SMALL.replace(runtime="microvm"))
        with pytest.raises(
            RuntimeUnavailableError, match=r"no node offering stockade_process has cpu_limit=2 .*: 1 CPU"
        ):
            await placement.acquire(Policy(cpu_limit=2.0))
        assert placement.describe()["held"] == 0

    _run(_with_placement(cluster, body))


def test_output_streams_back_while_the_run_goes_on(cluster: LocalRayCluster) -> None:
    code = "import sys, time\nprint('first', flush=True)\ntime.sleep(15)\nprint('second')\n"

    async def body(placement: RayPlacement) -> None:
        first = asyncio.Event()
        pieces: list[tuple[str, bytes]] = []

        def on_output(stream: str, data: bytes) -> None:
            pieces.append((stream, data))
            first.set()

        isolate = await placement.acquire(SMALL)
        try:
            run = asyncio.ensure_future(isolate.run_code(code, on_output=on_output))
            await asyncio.wait_for(first.wait(), 60)
            assert not run.done(), "the first line came only with the result"
            assert b"".join(d for _, d in pieces) == b"first\n"
            result = await run
        finally:
            await placement.release(isolate)
        assert (result.termination_reason, result.stdout) == ("completed", "first\nsecond\n")
        assert b"".join(d for s, d in pieces if s == "stdout") == b"first\nsecond\n"

    _run(_with_placement(cluster, body))


def test_files_move_through_the_object_store_with_limits(cluster: LocalRayCluster) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: past Ray's inline size, so through the object store

    async def body(placement: RayPlacement) -> None:
        isolate = await placement.acquire(SMALL)
        try:
            await isolate.write_file("/work/data.bin", big)
            assert await isolate.read_file("/work/data.bin") == big
            result = await isolate.exec(["sha256sum", "/work/data.bin"])
            import hashlib

            assert result.stdout.split()[0] == hashlib.sha256(big).hexdigest()
            with pytest.raises(CallTooLargeError, match="max_file_bytes 2097152"):
                await isolate.write_file("/work/too.bin", b"x" * (2 * 1024 * 1024 + 1))
            await isolate.exec(["sh", "-c", "head -c 3000000 /dev/zero > /work/large.bin"])
            assert len(await isolate.read_file("/work/large.bin", max_bytes=100)) <= 100
            with pytest.raises(CallTooLargeError, match="larger than the placement's max_file_bytes 2097152"):
                await isolate.read_file("/work/large.bin")
        finally:
            await placement.release(isolate)
        with pytest.raises(SandboxLostError, match="released"):
            await isolate.exec(["true"])

    _run(_with_placement(cluster, body, max_file_bytes=2 * 1024 * 1024))


def test_an_unreachable_cluster_is_said_at_once() -> None:
    async def body() -> None:
        placement = open_placement({"type": "ray", "address": "127.0.0.1:9"})  # nothing listens on discard
        try:
            with pytest.raises(RuntimeUnavailableError, match=r"the Ray cluster at 127\.0\.0\.1:9 is unreachable"):
                await placement.acquire(SMALL)
            described = placement.describe()
            assert described["reachable"] is False and "unreachable" in described["error"]
        finally:
            await placement.aclose()

    _run(body())


def test_a_lost_node_ends_its_runs_as_lost_and_the_next_runs_land_elsewhere() -> None:
    require("process")
    nodes = [(1, {}), (1, {"stockade_process": 16}), (1, {"stockade_process": 16})]
    with LocalRayCluster(nodes) as cluster:

        async def body(placement: RayPlacement) -> None:
            held: list[RayIsolate] = []
            for _ in range(12):  # until both workers hold isolates (Ray decides where)
                isolate = await placement.acquire(SMALL)
                assert isinstance(isolate, RayIsolate)
                held.append(isolate)
                if len({i.node for i in held}) == 2:
                    break
            assert len({i.node for i in held}) == 2, "Ray put every isolate on one node"
            victim = held[0].node
            index = cluster.index_of(victim)
            assert index != 0
            runs = [asyncio.ensure_future(i.exec(["sleep", "4"])) for i in held]
            await asyncio.sleep(1)
            cluster.kill_node(index)
            assert _node_pids(cluster, index) == []
            results = await asyncio.gather(*runs)
            for isolate, result in zip(held, results, strict=True):
                if isolate.node == victim:
                    assert result.termination_reason == "lost"
                    assert result.error is not None and victim in result.error
                else:
                    assert result.termination_reason == "completed", result.error
            lost = next(i for i in held if i.node == victim)
            with pytest.raises(SandboxLostError, match=victim):
                await lost.read_file("/work/x")
            for isolate in held:
                await placement.release(isolate)
            for _ in range(3):
                isolate = await placement.acquire(SMALL)
                try:
                    assert isolate.node != victim
                    result = await isolate.exec(["true"])
                    assert result.termination_reason == "completed"
                finally:
                    await placement.release(isolate)

        _run(_with_placement(cluster, body))
    assert cluster.leftovers() == []


def _node_pids(cluster: LocalRayCluster, index: int) -> list[int]:
    from stockade.testing.ray_cluster import marked_pids

    return marked_pids(cluster.nodes[index].name)
