"""MCP tool calls through stockade against the same server called directly, in one run.

The server is `mcp-server-time` from PyPI, in the environment `packages=` builds (the same
interpreter, /usr/bin/python3, and the same packages both ways). Direct: the official SDK's
stdio client starts it as a plain child process. Through stockade: `ToolHost`, the process
runtime, from a warm pool.

- ephemeral: start the server, initialise, call `get_current_time`, end it (a call each);
- persistent: one server, one session; the time of each further call;
- through the gateway (`stockade mcp gateway`, launched once, on stdio): each call, with the
  server ephemeral and persistent.

Targets (issue: MCP tools): persistent adds < 2 ms p50 per call; ephemeral <= 1.3x direct.
A benchmark: it prints, it asserts nothing.

    .venv/bin/python bench/mcp.py [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

# Run as a script, this file's folder comes first on sys.path, where this very file would stand in
# for the MCP SDK (`mcp`): the repository's root instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import anyio  # noqa: E402
from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

from stockade import Policy, environments  # noqa: E402
from stockade.mcp.config import IsolationConfig  # noqa: E402
from stockade.mcp.tools import ToolHost  # noqa: E402
from stockade.runtimes.manager import RuntimeManager  # noqa: E402

PACKAGE = "mcp-server-time==2026.10.19"
ARGS = {"timezone": "UTC"}


def direct_server() -> StdioServerParameters:
    env_id = Policy(packages=[PACKAGE]).environment_id  # built here if it is not yet
    assert env_id is not None
    root = environments.env_path(env_id)
    env = {"PATH": f"{root}/bin:/usr/bin:/bin", "PYTHONPATH": f"{root}/python", "HOME": "/tmp", "LANG": "C.UTF-8"}
    return StdioServerParameters(command="/usr/bin/python3", args=["-m", "mcp_server_time"], env=env)


async def timed(times: list[float], call: Callable[[], Awaitable[object]]) -> None:
    started = time.perf_counter()
    await call()
    times.append((time.perf_counter() - started) * 1000)


def p50(times: list[float]) -> float:
    return statistics.median(times)


async def main(calls: int) -> None:
    server = direct_server()
    config = {"command": "mcp-server-time", "packages": [PACKAGE], "expose": "all", "timeout_secs": 120}
    ephemeral = IsolationConfig.parse({"mcp_servers": {"time": config}})
    persistent = IsolationConfig.parse({"mcp_servers": {"time": {**config, "lifecycle": "persistent"}}})
    manager = RuntimeManager(pool_size=1)
    results: dict[str, list[float]] = {k: [] for k in ("direct ephemeral", "stockade ephemeral",
                                                       "direct persistent", "stockade persistent")}  # fmt: skip

    async def direct_once() -> None:
        async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            await session.call_tool("get_current_time", ARGS)

    async with ToolHost(ephemeral, manager) as host:
        await host.call("time", "get_current_time", ARGS)  # the pool learns the shape
        for _ in range(calls):  # alternated: the machine's noise falls on both
            await timed(results["direct ephemeral"], direct_once)
            await anyio.to_thread.run_sync(lambda: manager.get("process").wait_ready(30))  # type: ignore[attr-defined]
            await timed(results["stockade ephemeral"], lambda: host.call("time", "get_current_time", ARGS))
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        async with ToolHost(persistent, manager) as host:
            await host.call("time", "get_current_time", ARGS)
            for _ in range(calls * 5):
                await timed(results["direct persistent"], lambda: session.call_tool("get_current_time", ARGS))
                await timed(results["stockade persistent"], lambda: host.call("time", "get_current_time", ARGS))
    manager.close()
    for lifecycle in ("ephemeral", "persistent"):
        name = f"gateway {lifecycle}"
        results[name] = []
        with tempfile.TemporaryDirectory() as where:
            path = os.path.join(where, "isolation_config.json")
            with open(path, "w") as f:
                json.dump({"mcp_servers": {"time": {**config, "lifecycle": lifecycle}}}, f)
            stockade = os.path.join(os.path.dirname(sys.executable), "stockade")
            args = ["mcp", "gateway", "--config", path, "--audit-log", "off"]
            gateway = StdioServerParameters(command=stockade, args=args, env=dict(os.environ))
            async with stdio_client(gateway) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                await session.call_tool("get_current_time", ARGS)
                for _ in range(calls if lifecycle == "ephemeral" else calls * 5):
                    await timed(results[name], lambda: session.call_tool("get_current_time", ARGS))
    print(f"MCP get_current_time (mcp-server-time), p50 ms over {calls} ephemeral / {calls * 5} persistent calls")
    for name, times in results.items():
        print(f"{name:<22}{p50(times):10.2f}{min(times):10.2f} (min)")
    ratio = p50(results["stockade ephemeral"]) / p50(results["direct ephemeral"])
    added = p50(results["stockade persistent"]) - p50(results["direct persistent"])
    print(f"ephemeral: {ratio:.2f}x direct (target <= 1.3x: {'PASS' if ratio <= 1.3 else 'FAIL'})")
    print(f"persistent: adds {added:.2f} ms p50 per call (target < 2 ms: {'PASS' if added < 2 else 'FAIL'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    os.environ.setdefault("STOCKADE_POOL_SIZE", "1")
    anyio.run(main, parser.parse_args().calls)
