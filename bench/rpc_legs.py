"""Where the daemon's time goes: one warm `execute(code="pass")`, leg by leg.

The daemon (started here, with HMAC on), the client (this process) and an
in-process SDK (a worker process of its own) stamp the steps of each request
with the same monotonic clock; the stamps are merged per request and printed
as medians. The steps are marked by wrapping the functions that do them, so
no stamping code lives in stockade itself. This is how the table in
docs/performance.md ("Why a no-op costs the daemon what it does here") is
measured. Last, it times the event loop's wait for an answer against a
blocking one, on a bare socket pair, with nothing of stockade in between.

    .venv/bin/python bench/rpc_legs.py [--runs 100]
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

SETTLE_S = 0.03
STAMPS: list[tuple[str, int]] = []


def stamp(tag: str) -> None:
    STAMPS.append((tag, time.monotonic_ns()))


def _wrap(owner: Any, name: str, tag: str) -> None:
    original = getattr(owner, name)
    if hasattr(original, "__func__"):  # a classmethod
        func = original.__func__

        @functools.wraps(func)
        def bound(cls: Any, *args: Any, **kwargs: Any) -> Any:
            stamp(tag + ">")
            try:
                return func(cls, *args, **kwargs)
            finally:
                stamp(tag + "<")

        setattr(owner, name, classmethod(bound))
        return
    if _is_coroutine(original):

        @functools.wraps(original)
        async def awaited(*args: Any, **kwargs: Any) -> Any:
            stamp(tag + ">")
            try:
                return await original(*args, **kwargs)
            finally:
                stamp(tag + "<")

        setattr(owner, name, awaited)
        return

    @functools.wraps(original)
    def called(*args: Any, **kwargs: Any) -> Any:
        stamp(tag + ">")
        try:
            return original(*args, **kwargs)
        finally:
            stamp(tag + "<")

    setattr(owner, name, called)


def _is_coroutine(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def instrument() -> None:
    """Wrap the steps of a request, on whichever side this process is."""
    from stockade import client
    from stockade.daemon import connection, controller, rpc_server
    from stockade.runtimes import base

    _wrap(connection.Connection, "data_received", "daemon: request read")
    _wrap(rpc_server.RPCServer, "admit", "daemon: parse, limits, hmac")
    _wrap(controller.Controller, "execute_now", "daemon: policy, slot, hand-over")
    _wrap(base.AgentSandbox, "start_run", "daemon: the agent's run, sent")
    _wrap(base._LoopCall, "_end", "daemon: the agent's answer, read in the loop's callback")
    _wrap(base.AgentSandbox, "_call", "sdk: the agent's run (blocking)")
    _wrap(base.AgentSandbox, "_finish_run", "usage and result")
    _wrap(connection.Connection, "send", "daemon: result to the socket")
    _wrap(client.Client, "_read_line", "client: waiting for the answer")
    _wrap(client, "_parse", "client: parse and validate the answer")


def dump(path: str) -> None:
    with open(path, "w") as f:
        f.writelines(f"{tag}\t{ns}\n" for tag, ns in STAMPS)


def daemon_main(out: str) -> None:
    instrument()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    from stockade.cli import main

    try:
        main(["serve"])
    except KeyboardInterrupt:
        pass
    finally:
        dump(out)


def sdk_main(out: str) -> None:
    instrument()
    import stockade
    from stockade.runtimes.manager import RuntimeManager

    manager = RuntimeManager(pool_size=2)
    stockade.warm_up(manager=manager)
    manager.get("process").wait_ready()  # type: ignore[attr-defined]
    print("ready", flush=True)
    for _ in sys.stdin:
        stamp("sdk: start")
        stockade.run_code("pass", manager=manager)
        stamp("sdk: end")
        print("done", flush=True)
    manager.close()
    dump(out)


def legs(stamps: list[tuple[int, str]], start: str, end: str) -> list[tuple[str, float]]:
    """Median time from one stamp to the next, over every request from ``start`` to ``end``."""
    requests: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    for ns, tag in stamps:
        if tag == start:
            current = [(ns, tag)]
        elif current is not None:
            current.append((ns, tag))
            if tag == end:
                requests.append(current)
                current = None
    offsets: defaultdict[str, list[float]] = defaultdict(list)
    for request in requests:
        seen: set[str] = set()
        for ns, tag in request:
            if tag not in seen:  # the first of a repeated step
                seen.add(tag)
                offsets[tag].append((ns - request[0][0]) / 1e6)
    ordered = sorted((statistics.median(v), tag) for tag, v in offsets.items() if len(v) >= len(requests) // 2)
    rows, previous = [], 0.0
    for at, tag in ordered:
        rows.append((tag, at - previous))
        previous = at
    return rows


def loop_wait_cost(runs: int, reply_after_s: float = 0.0025) -> None:
    """An answer that comes ``reply_after_s`` later, waited for with a blocking
    ``select`` and with the event loop's ``sock_recv``: what the loop costs alone."""
    import asyncio
    import select
    import socket

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the answering side: busy for a while, like a running command
        ours.close()
        while theirs.recv(16):
            until = time.perf_counter() + reply_after_s
            while time.perf_counter() < until:
                pass
            theirs.send(b"answer")
        os._exit(0)
    theirs.close()

    async def compare() -> tuple[list[float], list[float]]:
        loop = asyncio.get_running_loop()
        blocking, awaited = [], []
        for _ in range(runs):
            await asyncio.sleep(SETTLE_S / 3)
            ours.setblocking(True)
            t0 = time.perf_counter()
            ours.send(b"go")
            select.select([ours], [], [])
            ours.recv(64)
            blocking.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(SETTLE_S / 3)
            ours.setblocking(False)
            t0 = time.perf_counter()
            await loop.sock_sendall(ours, b"go")
            await loop.sock_recv(ours, 64)
            awaited.append((time.perf_counter() - t0) * 1000)
        return blocking, awaited

    try:
        blocking, awaited = asyncio.run(compare())
    finally:
        ours.close()
        os.waitpid(pid, 0)
    print(f"\nan answer {reply_after_s * 1000:g} ms later, medians of {runs}:")
    print(f"  {statistics.median(blocking):7.3f}  blocking select + recv")
    print(f"  {statistics.median(awaited):7.3f}  asyncio loop.sock_recv")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--daemon", help=argparse.SUPPRESS)
    parser.add_argument("--sdk", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.daemon:
        daemon_main(args.daemon)
        return
    if args.sdk:
        sdk_main(args.sdk)
        return

    import stockade
    from stockade.client import Client

    instrument()
    work = tempfile.mkdtemp(prefix="stockade-legs-")
    token = secrets.token_hex(32)
    path = os.path.join(work, "d.sock")
    env = {**os.environ, "STOCKADE_SOCKET": path, "STOCKADE_AUTH_TOKEN": token,
           "STOCKADE_MAX_REQUESTS": "1000000", "STOCKADE_POOL_SIZE": "2"}  # fmt: skip
    daemon = subprocess.Popen([sys.executable, __file__, "--daemon", os.path.join(work, "daemon")], env=env,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    sdk = subprocess.Popen([sys.executable, __file__, "--sdk", os.path.join(work, "sdk")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
    assert sdk.stdin is not None and sdk.stdout is not None
    try:
        client = Client(path, auth_token=token)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except stockade.DaemonUnavailableError:
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon did not start") from None
                time.sleep(0.05)
        if sdk.stdout.readline().strip() != "ready":
            raise SystemExit("the SDK worker did not start")
        for _ in range(args.runs):
            time.sleep(SETTLE_S)
            stamp("client: start")
            client.execute(code="pass")
            stamp("client: end")
            time.sleep(SETTLE_S)
            sdk.stdin.write("go\n")
            sdk.stdout.readline()
    finally:
        sdk.stdin.close()
        sdk.wait(30)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    merged = sorted([(ns, tag) for tag, ns in STAMPS] + _read(os.path.join(work, "daemon"))
                    + _read(os.path.join(work, "sdk")))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    for title, start, end in (("via the daemon", "client: start", "client: end"),
                              ("in-process SDK", "sdk: start", "sdk: end")):  # fmt: skip
        rows = legs(merged, start, end)
        print(f"\n{title}: ms from the step before, medians of {args.runs} requests")
        for tag, ms in rows:
            label = f"{tag[:-1]} (starts)" if tag.endswith(">") else f"{tag[:-1]} (ends)" if tag.endswith("<") else tag
            print(f"  {ms:7.3f}  {label}")
        print(f"  {sum(ms for _, ms in rows):7.3f}  total")
    loop_wait_cost(args.runs * 3)


def _read(path: str) -> list[tuple[int, str]]:
    with open(path) as f:
        return [(int(ns), tag) for tag, ns in (line.rstrip("\n").split("\t") for line in f)]


if __name__ == "__main__":
    main()
