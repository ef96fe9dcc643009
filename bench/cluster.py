"""One-shot executions through the ``ray`` placement on a 3-node local Ray cluster, next to ``local``.

The cluster is real (``stockade.testing.LocalRayCluster``): a head and two workers,
each its own ``ray start`` with its own raylet and object store, the workers
offering ``stockade_process``. Each execution is ``placement.acquire`` (a
placement group reserving its CPU, memory and isolation; a hand-over from the
node's warm pool), ``exec(["true"])`` with its result streamed back, and
``release``. The ``local`` placement runs the same executions on this host's own
RuntimeManager, in the same run, as the reference.

Load is open-loop: executions arrive at a fixed offered rate for ``--seconds``
each, whether or not the earlier ones have finished (as RL rollouts fire them),
and each one's time-to-result is measured from its arrival. For each rate:
the achieved rate, p50/p90/p99, and the machine's CPU (every process and
the kernel) per execution. Targets (the agent-sandbox presubmit's bar,
issue: scale-out): p50/p90 <= 300 ms and p99 <= 500 ms at the highest rate
sustained, and at least 50 executions/s. A benchmark: it prints, it asserts nothing.

    .venv/bin/python bench/cluster.py [--rates 10,25,50,75] [--seconds 10] [--pool 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from stockade.placement import Placement, one_shot, open_placement  # noqa: E402
from stockade.policy import Policy  # noqa: E402
from stockade.testing.ray_cluster import LocalRayCluster  # noqa: E402

POLICY = Policy(cpu_limit=0.1, memory_mb=128)  # 0.1 CPU booked per isolate: up to 160 at once on a 16-CPU node
ARGV = ["true"]


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (every process, the kernel), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def offered(placement: Placement, rate: float, seconds: float) -> tuple[float, list[float], int]:
    """Executions arriving every 1/rate s for ``seconds``: (achieved rate, times to result in ms, failures)."""
    times: list[float] = []
    failures = 0

    async def one(arrival: float) -> None:
        nonlocal failures
        try:
            result = await one_shot(placement, POLICY, argv=ARGV)
            if result.termination_reason != "completed":
                failures += 1
                return
        except Exception:  # noqa: BLE001 - counted, not fatal: the curve shows where it breaks
            failures += 1
            return
        times.append((time.perf_counter() - arrival) * 1000)

    started = time.perf_counter()
    tasks = []
    count = int(rate * seconds)
    for i in range(count):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    return len(times) / elapsed, times, failures


async def measure(placement: Placement, rates: list[float], seconds: float, label: str) -> list[str]:
    rows = []
    await one_shot(placement, POLICY, argv=ARGV)  # the pools learn the shape
    for rate in rates:
        busy = machine_cpu_seconds()
        achieved, times, failures = await offered(placement, rate, seconds)
        busy = machine_cpu_seconds() - busy
        if not times:
            rows.append(f"| {label} | {rate:g} | 0 | - | - | - | - | {failures} |")
            continue
        p50, p90, p99 = (percentile(times, q) for q in (0.5, 0.9, 0.99))
        cpu = 1000 * busy / len(times)
        rows.append(
            f"| {label} | {rate:g} | {achieved:.1f} | {p50:.0f} | {p90:.0f} | {p99:.0f} | {cpu:.1f} | {failures} |"
        )
        print(rows[-1], flush=True)
        await asyncio.sleep(2)  # the pools refill between rates
    return rows


async def main(rates: list[float], seconds: float, pool: int) -> None:
    nodes = [(2, {}), (16, {"stockade_process": 256}), (16, {"stockade_process": 256})]
    print("starting a 3-node Ray cluster (a head, two workers with stockade_process) ...", flush=True)
    with LocalRayCluster(nodes) as cluster:
        print("| placement | offered /s | achieved /s | p50 ms | p90 ms | p99 ms | machine CPU ms/run | failed |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
        local = open_placement({"type": "local", "pool_size": pool})
        try:
            await measure(local, rates, seconds, "local")
        finally:
            await local.aclose()
        ray = open_placement({"type": "ray", "address": cluster.address, "pool_size": pool})
        try:
            await ray.connect()  # type: ignore[attr-defined]
            await asyncio.sleep(3)  # every node's pool full
            await measure(ray, rates, seconds, "ray")
        finally:
            await ray.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,25,50,75", help="offered executions per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each rate is offered")
    parser.add_argument("--pool", type=int, default=4, help="warm isolates per node (and for local)")
    args = parser.parse_args()
    asyncio.run(main([float(r) for r in args.rates.split(",")], args.seconds, args.pool))
