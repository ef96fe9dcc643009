"""The ``ray`` placement on a real Ray cluster: a head and two worker nodes, each its own ``ray start``.

Every node is a real raylet with its own object store; the isolates run on the
node Ray reserved room on, under that node's runtimes. Node loss is a real one:
every process of a worker node is SIGKILLed at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from stockade.errors import CallTooLargeError, InvalidRequestError, RuntimeUnavailableError, SandboxLostError
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
                result = await isolate.aexec(["python3", "-c", "print(6 * 7)"])
                assert (result.termination_reason, result.stdout, result.runtime_used) == (
                    "completed",
                    "42\n",
                    "gvisor",
                )
            finally:
                await placement.release(isolate)
            isolate = await placement.acquire(SMALL)
            try:
                assert isolate.node not in gvisor_node and isolate.runtime_name == "process"
            finally:
                await placement.release(isolate)
        # A trust takes its own level where a node offers it (verified: gvisor).
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


def test_a_claim_whose_caller_goes_away_leaves_nothing_held(cluster: LocalRayCluster) -> None:
    # Cancelled between its calls to the cluster (the reservation, the node's hand-over), a
    # claim runs to its end and gives back what it got: no reservation, no isolate on a node.
    async def body(placement: RayPlacement) -> None:
        import time

        from ray.util.placement_group import placement_group_table

        for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.4, 0.8):
            claim = asyncio.ensure_future(placement.acquire(SMALL))
            await asyncio.sleep(delay)
            claim.cancel()
            got = await asyncio.gather(claim, return_exceptions=True)
            if isinstance(got[0], RayIsolate):  # answered before the cancel landed: released as usual
                await placement.release(got[0])
        deadline = time.monotonic() + 60
        while True:  # what is still booked is only what released isolates left for the next claims
            kept = {g.id.hex() for g in placement._kept.groups()}
            live = [i for i, g in placement_group_table().items() if g["state"] != "REMOVED" and i not in kept]
            held = [(await n.actor.describe.remote())["isolates"] for n in placement.cluster.nodes.values()]
            if not live and not any(held):
                break
            assert time.monotonic() < deadline, f"left behind: {len(live)} reservations, isolates {held}"
            await asyncio.sleep(0.2)
        assert placement.describe()["held"] == 0
        result = await one_shot(placement, SMALL, argv=["echo", "after"])  # and claims go on
        assert result.stdout == "after\n"

    _run(_with_placement(cluster, body))


def _live_groups() -> list[str]:
    from ray.util.placement_group import placement_group_table

    return [i for i, g in placement_group_table().items() if g["state"] != "REMOVED"]


def test_a_released_isolates_room_is_kept_for_the_next_claim_of_its_shape(
    cluster: LocalRayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Booking room is calls to the GCS: one-shots in a row reuse the first one's placement group.
    async def body(placement: RayPlacement) -> None:
        from ray.util.placement_group import placement_group_table

        before = set(placement_group_table())
        for _ in range(5):
            assert (await one_shot(placement, SMALL, argv=["true"])).termination_reason == "completed"
        made = set(placement_group_table()) - before
        assert len(made) == 1, f"{len(made)} placement groups for five one-shots in a row"
        assert placement.describe()["kept_reservations"] == 1
        # Another shape books its own; the kept one is not handed to it.
        bigger = SMALL.replace(memory_mb=384)
        isolate = await placement.acquire(bigger)
        try:
            assert isolate.reservation.group.id.hex() not in made
            assert placement.describe()["kept_reservations"] == 1
        finally:
            await placement.release(isolate)
        assert placement.describe()["kept_reservations"] == 2
        assert len(_live_groups()) == 2

    async def none_kept(placement: RayPlacement) -> None:
        for _ in range(2):
            assert (await one_shot(placement, SMALL, argv=["true"])).termination_reason == "completed"
            assert _live_groups() == [] and placement.describe()["kept_reservations"] == 0

    async def expired(placement: RayPlacement) -> None:
        # Kept unused past its time, with no claim coming to notice: given back all the same.
        import time

        assert (await one_shot(placement, SMALL, argv=["true"])).termination_reason == "completed"
        assert placement.describe()["kept_reservations"] == 1 and len(_live_groups()) == 1
        deadline = time.monotonic() + 60  # due after 1 s; given back in the background, a GCS call
        while placement.describe()["kept_reservations"] or _live_groups():
            assert time.monotonic() < deadline, (placement.describe()["kept_reservations"], _live_groups())
            await asyncio.sleep(0.2)

    import logging

    import ray

    # The test's own connection, which the placements use and leave open: the table is read after aclose.
    ray.init(address=cluster.address, namespace="stockade", logging_level=logging.ERROR, log_to_driver=False)
    try:
        _run(_with_placement(cluster, body))
        assert _live_groups() == []  # aclose gave back what was kept
        _run(_with_placement(cluster, none_kept, kept_reservations=0))
        from stockade.placement import ray as ray_placement

        monkeypatch.setattr(ray_placement, "_KEPT_IDLE_S", 1.0)
        _run(_with_placement(cluster, expired))
    finally:
        ray.shutdown()


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
            run = asyncio.ensure_future(isolate.arun_code(code, on_output=on_output))
            await asyncio.wait_for(first.wait(), 60)
            assert not run.done(), "the first line came only with the result"
            assert b"".join(d for _, d in pieces) == b"first\n"
            result = await run
        finally:
            await placement.release(isolate)
        assert (result.termination_reason, result.stdout) == ("completed", "first\nsecond\n")
        assert b"".join(d for s, d in pieces if s == "stdout") == b"first\nsecond\n"

    _run(_with_placement(cluster, body))


def test_kept_room_goes_back_to_a_claim_that_needs_it(
    cluster: LocalRayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both process nodes filled with small isolates, then all released: their kept groups book
    # every CPU there. A claim of another shape that needs a whole node gets the room at once.
    async def body(placement: RayPlacement) -> None:
        held = [await placement.acquire(SMALL) for _ in range(8)]  # 0.25 CPU each, two nodes of 1 CPU
        for isolate in held:
            await placement.release(isolate)
        assert placement.describe()["kept_reservations"] == 8
        whole = await placement.acquire(Policy(cpu_limit=1.0, memory_mb=256))
        try:
            assert whole.runtime_name == "process"
            assert placement.describe()["kept_reservations"] == 0, "the claim waited for room that kept groups held"
        finally:
            await placement.release(whole)

    from stockade.placement import ray as ray_placement

    # Kept far longer than the claim may wait: a claim that gets its room at all got it because they
    # went back for it, not because they expired (how long it took is no measure on a loaded host).
    monkeypatch.setattr(ray_placement, "_KEPT_IDLE_S", 3600.0)
    _run(_with_placement(cluster, body, claim_timeout=60))


def test_a_node_actor_that_dies_on_a_live_node_is_started_again(cluster: LocalRayCluster) -> None:
    """A node's actor killed on a node that lives on (the kernel's OOM killer, a crash) kept its
    handle: every claim Ray placed on that node failed until the daemon restarted. The gVisor node
    is the only one of its kind here: its claims have nowhere else to go."""
    gvisor = Policy(runtime="gvisor", cpu_limit=0.25, memory_mb=256)

    async def body(placement: RayPlacement) -> None:
        isolate = await placement.acquire(gvisor)
        assert isinstance(isolate, RayIsolate)
        try:
            described = await isolate._node.actor.describe.remote()
            os.kill(described["pid"], signal.SIGKILL)
            result = await isolate.aexec(["true"])
            assert result.termination_reason == "lost", result.error
        finally:
            await placement.release(isolate)
        for _ in range(2):
            again = await placement.acquire(gvisor)
            try:
                assert again.node == isolate.node
                assert (await again.aexec(["true"])).termination_reason == "completed"
            finally:
                await placement.release(again)

    _run(_with_placement(cluster, body))


def test_a_node_actor_made_for_a_look_at_the_cluster_that_was_cancelled_is_kept(cluster: LocalRayCluster) -> None:
    # The actor is made in a thread (GCS calls): a connect (a daemon's start, a reconnect) cancelled
    # meanwhile left it made and known to nobody, holding its pool and zygotes, and the next claim
    # made the node another.
    import threading

    gvisor = Policy(runtime="gvisor", cpu_limit=0.25, memory_mb=256)

    async def body(placement: RayPlacement) -> None:
        isolate = await placement.acquire(gvisor)
        assert isinstance(isolate, RayIsolate)
        node_id = isolate.node
        os.kill((await isolate._node.actor.describe.remote())["pid"], signal.SIGKILL)
        assert (await isolate.aexec(["true"])).termination_reason == "lost"
        await placement.release(isolate)
        entered, go = threading.Event(), threading.Event()
        spawn = placement.cluster._spawn
        made: list[Any] = []

        def held_spawn(info: dict[str, Any], runtimes: list[str]) -> Any:
            entered.set()
            go.wait(60)
            made.append(spawn(info, runtimes))
            return made[-1]

        placement.cluster._spawn = held_spawn  # type: ignore[method-assign]
        try:
            looking = asyncio.ensure_future(placement.connect())
            assert await asyncio.to_thread(entered.wait, 60), "no node actor was made again"
            looking.cancel()
            await asyncio.gather(looking, return_exceptions=True)
            go.set()
            deadline = asyncio.get_running_loop().time() + 60
            while node_id not in placement.cluster.nodes:
                assert asyncio.get_running_loop().time() < deadline, "the actor made was not kept for its node"
                await asyncio.sleep(0.05)
            assert placement.cluster.nodes[node_id].actor is made[0]
            again = await placement.acquire(gvisor)  # served by that actor: no other is made
            try:
                assert (await again.aexec(["true"])).termination_reason == "completed"
            finally:
                await placement.release(again)
            assert len(made) == 1
        finally:
            go.set()
            placement.cluster._spawn = spawn  # type: ignore[method-assign]

    _run(_with_placement(cluster, body))


def test_a_run_nobody_streams_is_one_call_and_given_up_as_a_streamed_one_is(cluster: LocalRayCluster) -> None:
    # Without on_output the result comes in one reply; a caller that goes away leaves the run
    # to end on its node, exactly as when it streamed: the isolate takes no other call meanwhile.
    async def body(placement: RayPlacement) -> None:
        import time

        from stockade.errors import SandboxError
        from tests.helpers import processes_with_arg

        for marker, on_output in (("6.0417", None), ("6.0419", lambda stream, data: None)):
            isolate = await placement.acquire(SMALL)
            try:
                quiet = await isolate.aexec(["sh", "-c", "echo out; echo err >&2; exit 3"], on_output=on_output)
                assert (quiet.termination_reason, quiet.exit_code, quiet.stdout, quiet.stderr) == (
                    "completed", 3, "out\n", "err\n",
                )  # fmt: skip
                run = asyncio.ensure_future(isolate.aexec(["sleep", marker], on_output=on_output))
                # Given up once it runs on its node (this host's process, seen in /proc), not before it got there.
                deadline = time.monotonic() + 60
                while not processes_with_arg(marker) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert processes_with_arg(marker), "the run never started on its node"
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                with pytest.raises(SandboxError, match="another call to this sandbox is in progress"):
                    await isolate.aexec(["true"])
                deadline = time.monotonic() + 60
                while True:  # the given-up run ends on its node; until then, only that refusal
                    try:
                        after = await isolate.aexec(["echo", "after"])
                        break
                    except SandboxError as exc:
                        assert "another call to this sandbox is in progress" in str(exc), exc
                        assert time.monotonic() < deadline, "the given-up run never let go of its isolate"
                        await asyncio.sleep(0.2)
                assert after.stdout == "after\n"
            finally:
                await placement.release(isolate)

    _run(_with_placement(cluster, body))


class _Partitioned:
    """One method of a node actor's handle, as a network partition has it: its first ``lost`` calls
    are made on the node but their replies lost; then ``unreachable`` calls never reach it."""

    def __init__(self, method: Any, lost: int = 0, unreachable: int = 0) -> None:
        self.method, self.lost, self.unreachable = method, lost, unreachable

    def remote(self, *args: Any) -> Any:
        import ray.exceptions

        async def call() -> Any:
            fault = ray.exceptions.ActorUnavailableError("partitioned (a test's fault)", None)
            if self.unreachable > 0:
                self.unreachable -= 1
                raise fault
            answer = await self.method.remote(*args)
            if self.lost > 0:
                self.lost -= 1
                raise fault
            return answer

        return call()


class _ReplyLost:
    """A node actor's handle whose hand-over replies are lost on the way back (the hand-over is made
    on the node, then Ray says the actor was unreachable), and whose next release does not reach it."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor
        self.acquire = _Partitioned(actor.acquire, lost=1_000)
        self.release = _Partitioned(actor.release, unreachable=1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._actor, name)


def test_a_hand_over_whose_reply_is_lost_is_released_on_its_node(cluster: LocalRayCluster) -> None:
    # The node made the isolate and lived on; the placement, told the actor was unreachable, tried
    # elsewhere. The isolate made for nobody was held on its node for the actor's whole life.
    async def body(placement: RayPlacement) -> None:
        import time

        import ray

        await placement.cluster.refresh(force=True)
        nodes = list(placement.cluster.nodes.values())
        real = {node.node_id: node.actor for node in nodes}
        for node in nodes:
            node.actor = _ReplyLost(node.actor)
        try:
            with pytest.raises(RuntimeUnavailableError, match="lost during the hand-over"):
                await placement.acquire(SMALL)
            deadline = time.monotonic() + 60
            while True:  # released once the partition lets a release through (the first does not reach)
                held = [(await actor.describe.remote())["isolates"] for actor in real.values()]
                if not any(held):
                    break
                assert time.monotonic() < deadline, f"isolates made for nobody are still held: {held}"
                await asyncio.sleep(0.2)
        finally:
            for node in nodes:
                node.actor = real[node.node_id]

        # A release that reaches the node before the hand-over it names: that hand-over never holds.
        actor = real[nodes[0].node_id]
        assert await actor.release.remote("early") is False
        with pytest.raises(ray.exceptions.RayTaskError, match="given up"):
            await actor.acquire.remote(SMALL.canonical_json(), "early")
        making = actor.acquire.remote(SMALL.canonical_json(), "racing")
        await actor.release.remote("racing")  # submitted after it: while it is made, or once it is held
        await asyncio.gather(making, return_exceptions=True)
        assert (await actor.describe.remote())["isolates"] == 0
        result = await one_shot(placement, SMALL, argv=["echo", "after"])  # and claims go on
        assert result.stdout == "after\n"

    _run(_with_placement(cluster, body))


class _RunUnreachable:
    """A node actor's handle whose next run does not reach the node (Ray says the actor is
    unreachable, not dead); everything else goes through."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor
        self.result_of = _Partitioned(actor.result_of, unreachable=1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._actor, name)


def test_an_isolate_said_lost_while_its_node_lives_on_is_released_there(cluster: LocalRayCluster) -> None:
    # A run Ray could not deliver (the actor unreachable for a moment) made the isolate "lost", and
    # its release was then skipped: it lived on in its node, its room given back to Ray.
    async def body(placement: RayPlacement) -> None:
        import time

        isolate = await placement.acquire(SMALL)
        assert isinstance(isolate, RayIsolate)
        node = isolate._node
        real = node.actor
        node.actor = _RunUnreachable(real)
        try:
            lost = await isolate.aexec(["echo", "never"])
            assert lost.termination_reason == "lost" and "ActorUnavailableError" in (lost.error or ""), lost
            await placement.release(isolate)
            deadline = time.monotonic() + 60
            while (await real.describe.remote())["isolates"]:
                assert time.monotonic() < deadline, "the isolate said lost is still held on its node"
                await asyncio.sleep(0.2)
        finally:
            node.actor = real

    _run(_with_placement(cluster, body))


def test_closing_the_placement_leaves_no_release_of_its_own_running(cluster: LocalRayCluster) -> None:
    # A held isolate said lost was released at the close by a background task begun after the
    # close had cancelled the others: it tried a killed actor for minutes, or died with the loop.
    async def scenario() -> None:
        placement = open_placement({"type": "ray", "address": cluster.address, "pool_size": 1})
        assert isinstance(placement, RayPlacement)
        await placement.connect()
        try:
            isolate = await placement.acquire(SMALL)
            assert isinstance(isolate, RayIsolate)
            unreachable = _RunUnreachable(isolate._node.actor)
            unreachable.release = _Partitioned(isolate._node.actor.release, unreachable=1_000)  # type: ignore[attr-defined]
            isolate._node.actor = unreachable
            assert (await isolate.aexec(["true"])).termination_reason == "lost"
        finally:
            await placement.aclose()
        assert not placement._forgets, placement._forgets

    _run(scenario())


def test_a_sandbox_on_the_cluster_reports_the_digest_of_the_policy_it_was_asked_for(cluster: LocalRayCluster) -> None:
    # The cluster wrote the runtime it chose into every policy: a default one's results carried
    # another digest than its create answer and /health, and a client's check of it failed.
    async def body(placement: RayPlacement) -> None:
        for policy in (Policy(), Policy(isolation="process", cpu_limit=0.25, memory_mb=256)):
            isolate = await placement.acquire(policy)
            try:
                assert isolate.policy.digest == policy.digest
                assert (await isolate.aexec(["true"])).policy_digest == policy.digest
            finally:
                await placement.release(isolate)
        trusted = Policy(trust="verified", cpu_limit=0.25, memory_mb=256)  # the runtime chosen is written in
        isolate = await placement.acquire(trusted)
        try:
            assert isolate.policy.runtime == isolate.runtime_name and isolate.policy.digest != trusted.digest
            assert (await isolate.aexec(["true"])).policy_digest == isolate.policy.digest
        finally:
            await placement.release(isolate)

    _run(_with_placement(cluster, body))


def test_what_an_isolate_did_after_its_last_run_is_taken_from_its_node(cluster: LocalRayCluster) -> None:
    # A held sandbox's leftovers (a daemon audits them as it closes the sandbox) come from its node.
    refused = "import ctypes\nfor _ in range(3):\n    ctypes.CDLL(None).ptrace(16, 1, 0, 0)\n"

    async def body(placement: RayPlacement) -> None:
        isolate = await placement.acquire(SMALL)
        try:
            process = await asyncio.to_thread(isolate.spawn, ["python3", "-c", refused])
            assert await asyncio.to_thread(process.wait, 60) == 0
            taken = await isolate.atake_report()
            assert (taken.report.counts, taken.egress, taken.egress_dropped) == ({"ptrace": 3}, [], 0)
            assert (await isolate.atake_report()).report.counts == {}  # taken once
        finally:
            await placement.release(isolate)

    _run(_with_placement(cluster, body))


def test_files_move_through_the_object_store_with_limits(cluster: LocalRayCluster) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: past Ray's inline size, so through the object store

    async def body(placement: RayPlacement) -> None:
        isolate = await placement.acquire(SMALL)
        try:
            await isolate.awrite_file("/work/data.bin", big)
            assert await isolate.aread_file("/work/data.bin") == big
            result = await isolate.aexec(["sha256sum", "/work/data.bin"])
            import hashlib

            assert result.stdout.split()[0] == hashlib.sha256(big).hexdigest()
            with pytest.raises(CallTooLargeError, match="max_file_bytes 2097152"):
                await isolate.awrite_file("/work/too.bin", b"x" * (2 * 1024 * 1024 + 1))
            await isolate.aexec(["sh", "-c", "head -c 3000000 /dev/zero > /work/large.bin"])
            assert len(await isolate.aread_file("/work/large.bin", max_bytes=100)) <= 100
            with pytest.raises(CallTooLargeError, match="larger than the placement's max_file_bytes 2097152"):
                await isolate.aread_file("/work/large.bin")
        finally:
            await placement.release(isolate)
        with pytest.raises(SandboxLostError, match="released"):
            await isolate.aexec(["true"])

    _run(_with_placement(cluster, body, max_file_bytes=2 * 1024 * 1024))


def test_an_async_sandbox_holds_an_isolate_of_the_cluster(cluster: LocalRayCluster, tmp_path: Any) -> None:
    from stockade.sdk_async import AsyncSandbox

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.csv").write_text("a,b\n1,2\n3,4\n")

    async def body(placement: RayPlacement) -> None:
        async with AsyncSandbox(SMALL, placement=placement) as sb:
            assert sb.runtime == "process" and cluster.index_of(sb.node) in (0, 1)  # a process node
            summary = await sb.upload(tmp_path / "data", "/work/data")  # tar pieces through the object store
            assert summary.files == 1
            counted = await sb.exec(["wc", "-l", "/work/data/rows.csv"])
            assert counted.stdout.split()[0] == "3", counted.error
            await sb.run_code("import csv\nrows = list(csv.reader(open('/work/data/rows.csv')))", session="nb")
            assert (await sb.run_code("len(rows)", session="nb")).results[0].text == "3"
            assert await sb.interrupt() is False  # nothing runs
            spinning = asyncio.Event()
            cell = asyncio.ensure_future(
                sb.run_code(
                    "import time\nprint('spinning', flush=True)\nwhile True: time.sleep(0.1)",
                    session="nb",
                    on_output=lambda stream, data: spinning.set(),
                )
            )
            await asyncio.wait_for(spinning.wait(), 60)  # the cell runs on its node
            assert await sb.interrupt(session="other") is False  # not that interpreter's cell: left alone
            assert await sb.interrupt(session="nb")  # SIGINT to the cell on its node; the interpreter keeps its state
            stopped = await asyncio.wait_for(cell, 30)
            assert stopped.exception is not None and stopped.exception.name == "KeyboardInterrupt", stopped
            assert (await sb.run_code("len(rows)", session="nb")).results[0].text == "3"
            # A background process on its node, and the node's agent's list of them.
            exits = await sb.spawn(["sh", "-c", "exit 4"])
            assert await exits.wait(30) == 4
            assert [(p["handle"], p["exit_code"]) for p in await sb.processes()] == [(exits.handle, 4)]
            held = placement.describe()["held"]
            assert held == 1
        assert placement.describe()["held"] == 0  # released on its node

    _run(_with_placement(cluster, body))


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
            runs = [asyncio.ensure_future(i.aexec(["sleep", "4"])) for i in held]
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
                await lost.aread_file("/work/x")
            with pytest.raises(SandboxLostError, match=victim):
                await asyncio.to_thread(lost.spawn, ["true"])
            for isolate in held:
                await placement.release(isolate)
            for _ in range(3):
                isolate = await placement.acquire(SMALL)
                try:
                    assert isolate.node != victim
                    result = await isolate.aexec(["true"])
                    assert result.termination_reason == "completed"
                finally:
                    await placement.release(isolate)

        _run(_with_placement(cluster, body))
    assert cluster.leftovers() == []


def _node_pids(cluster: LocalRayCluster, index: int) -> list[int]:
    from stockade.testing.ray_cluster import marked_pids

    return marked_pids(cluster.nodes[index].name)


# ---- the daemon in cluster mode (stockade serve --placement ray) ------------------------------


def _serve_on(address: str, env: dict[str, str] | None = None) -> Any:
    from tests.daemon_harness import start_daemon, wait_for_http, wait_for_socket

    daemon = start_daemon(
        {"STOCKADE_MAX_SANDBOXES": "4", **(env or {})},
        http="127.0.0.1:0",
        wait=False,
        args=("--placement", "ray", "--ray-address", address),
    )
    wait_for_socket(daemon, timeout=180)  # it reaches the cluster and starts its node actors first
    wait_for_http(daemon, timeout=30)
    return daemon


def test_the_daemon_serves_both_doors_through_the_ray_placement(cluster: LocalRayCluster) -> None:
    import httpx

    from stockade.client import Client

    small = SMALL.non_defaults()
    daemon = _serve_on(cluster.address)
    try:
        assert "placement ray: 3 node(s)" in daemon.logs()
        with Client(daemon.socket_path) as client:
            chunks: list[bytes] = []
            result = client.execute(
                code="import sys\nfor i in range(3): print(i, flush=True)",
                policy=small,
                on_output=lambda stream, data: chunks.append(data),
            )
            assert (result.termination_reason, result.runtime_used) == ("completed", "process"), result.error
            assert result.stdout == "0\n1\n2\n"
            assert b"".join(chunks) == b"0\n1\n2\n"
            gvisor = client.execute(["cat", "/proc/version"], policy={**small, "runtime": "gvisor"})
            assert gvisor.termination_reason == "completed" and gvisor.runtime_used == "gvisor", gvisor.error
            assert "gVisor" in gvisor.stdout or "#1 SMP" in gvisor.stdout  # runsc's own kernel banner
            with pytest.raises(RuntimeUnavailableError, match="no node advertises stockade_microvm"):
                client.execute(["true"], policy={**small, "runtime": "microvm"})
            # A held sandbox: files in and out through the object store, runs on the same isolate.
            with client.sandbox(small) as sandbox:
                sandbox.write_file("/work/in.txt", b"placed\n")
                copied = sandbox.exec(["sh", "-c", "tr a-z A-Z < /work/in.txt > /work/out.txt"])
                assert copied.termination_reason == "completed", copied.error
                assert sandbox.read_file("/work/out.txt") == b"PLACED\n"
                with pytest.raises(FileNotFoundError) as missing:  # the node's own error, not Ray's wrapper
                    sandbox.read_file("/work/nothing-here")
                assert "ray::" not in str(missing.value) and "pid=" not in str(missing.value), missing.value
                assert sandbox.run_code("print(open('/work/in.txt').read().strip())").stdout == "placed\n"
                assert {e["name"] for e in sandbox.list_dir("/work")} == {"in.txt", "out.txt"}
                sandbox.run_code("x = 41", session="notebook")  # a stateful interpreter on the node
                assert sandbox.run_code("x + 1", session="notebook").results[0].text == "42"
                # A background process on the node: input in, output out, a signal, its end.
                echo = sandbox.spawn(["sh", "-c", "read line; echo got $line; echo err >&2; exec sleep 60"])
                echo.write(b"hi\n", eof=True)
                out, err = b"", b""
                for _ in range(100):
                    more_out, more_err = echo.read()
                    out, err = out + more_out, err + more_err
                    if out and err:
                        break
                    echo.wait(0.1)
                assert (out, err) == (b"got hi\n", b"err\n")
                assert echo.poll() is None
                echo.kill("SIGKILL")
                assert echo.wait(30) == -9
                listed = {p["handle"]: p for p in client.status()["active_sandboxes"][0]["processes"]}
                assert listed[echo.handle]["running"] is False
                assert sandbox.interrupt() is False  # nothing runs: said by the node
                with pytest.raises(
                    InvalidRequestError, match="a published port is not offered by an isolate of the ray"
                ):
                    sandbox.publish(8000)  # the node's loopback is not the client's host's
                assert [s["runtime"] for s in client.status()["active_sandboxes"]] == ["process"]
            assert client.status()["active_sandboxes"] == []
            runtimes = {r["name"]: r for r in client.runtimes()}
            assert runtimes["process"]["available"] and runtimes["gvisor"]["available"] and "microvm" not in runtimes
        with httpx.Client(base_url=daemon.http_url, timeout=60) as http:
            health = http.get("/health").json()
            assert health["status"] == "healthy" and {"process", "gvisor"} <= set(health["runtimes_available"])
            assert (health["placement"]["type"], health["placement"]["reachable"]) == ("ray", True)
            assert health["placement"] == {"type": "ray", "reachable": True, "nodes": 3}  # no address, no ids
            seed = {"agent_id": "t", "code": "print(6 * 7)", "cpu_limit": 0.25, "memory_limit_mb": 256}
            answer = http.post("/api/v1/sandbox/execute", json=seed)
            assert answer.status_code == 200 and answer.json()["stdout"] == "42\n", answer.text
    finally:
        assert daemon.stop() == 0, daemon.logs()
        daemon.cleanup()
    # The daemon's node actors went with it: no stockade worker is left on any node.
    assert _stockade_actors(cluster) == [], "the daemon left its node actors behind"


def _stockade_actors(cluster: LocalRayCluster) -> list[str]:
    """The named stockade actors alive on the cluster (from its GCS, in a driver of its own)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
        "names = ray.util.list_named_actors(all_namespaces=True);"
        "print(json.dumps([a['name'] for a in names if a['name'].startswith('stockade-')]))"
    )
    out = subprocess.run([sys.executable, "-c", code, cluster.address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_daemon_whose_cluster_is_unreachable_says_so_at_start_and_in_health() -> None:
    import httpx

    from stockade.client import Client

    daemon = _serve_on("127.0.0.1:9")  # nothing listens on discard
    try:
        assert "the Ray cluster at 127.0.0.1:9 is unreachable" in daemon.logs()
        with httpx.Client(base_url=daemon.http_url, timeout=30) as http:
            health = http.get("/health").json()
            ready = http.get("/ready")  # no traffic to it, for a readiness check
        assert health["status"] == "degraded" and health["runtimes_available"] == []
        assert health["placement"] == {"type": "ray", "reachable": False, "nodes": 0}
        assert ready.status_code == 503 and ready.json() == health, ready.text
        with Client(daemon.socket_path) as client:
            (said,) = client.runtimes()  # behind the socket's checks: why
            assert said["available"] is False and "127.0.0.1:9 is unreachable" in said["reason"]
            with pytest.raises(RuntimeUnavailableError, match=r"127\.0\.0\.1:9"):
                client.execute(["true"])
    finally:
        assert daemon.stop() == 0, daemon.logs()
        daemon.cleanup()


def test_the_conformance_suite_passes_on_the_cluster_nodes(cluster: LocalRayCluster) -> None:
    from stockade.testing.conformance import run_suite

    async def body(placement: RayPlacement) -> None:
        failures: list[str] = []
        for runtime in ("process", "gvisor"):
            failures += await run_suite(placement, SMALL.replace(runtime=runtime, timeout_seconds=60))
        assert failures == [], "\n".join(failures)

    _run(_with_placement(cluster, body))


def test_a_cluster_lost_under_a_running_daemon_is_said_in_health() -> None:
    import time

    import httpx

    from stockade.client import Client

    require("process")
    with LocalRayCluster([(1, {"stockade_process": 16})]) as lone:
        # Found by ``auto`` (RAY_ADDRESS, as a Ray job's driver finds it): its loss is seen all the same.
        daemon = _serve_on("auto", {"RAY_ADDRESS": lone.address})
        try:
            with httpx.Client(base_url=daemon.http_url, timeout=30) as http:
                assert http.get("/health").json()["status"] == "healthy"
                with Client(daemon.socket_path) as client:
                    assert client.execute(["echo", "up"], policy=SMALL.non_defaults()).stdout == "up\n"
                lone.kill_node(0)  # the head, and with it the whole cluster
                deadline = time.monotonic() + 30
                health = http.get("/health").json()
                while health["status"] != "degraded" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    health = http.get("/health").json()
            assert health["status"] == "degraded" and health["placement"]["reachable"] is False
            # A request is refused at once, with the reason, rather than waiting on the lost GCS.
            port = lone.address.rpartition(":")[2]
            gone = f"the Ray cluster at [^ ]+:{port} is unreachable"  # the GCS address Ray found
            with Client(daemon.socket_path) as client, pytest.raises(RuntimeUnavailableError, match=gone):
                client.execute(["true"])
            assert "lost the Ray cluster" in daemon.logs()
        finally:
            assert daemon.stop() == 0, daemon.logs()
            daemon.cleanup()
    assert lone.leftovers() == []
