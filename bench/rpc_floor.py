"""The least any daemon can add to a warm no-op `execute` on this host.

bench/rpc.py measures `stockade serve` against the in-process SDK. This asks
what a daemon of any design would measure in its place, with two servers
that are measuring devices, not servers (one connection, no rate limits, no
slots, no log line, no error handling):

- **the callback-only asyncio server**: the same request served with as
  little as possible around the work that cannot go: the HMAC and replay
  check, the Policy, a warm isolate taken from the same pool, the agent's run
  and the serialized ExecResult. Everything is a callback on the loop (no
  task, no stream, no future: each of those costs a loop turn or more after a
  wake-up, at this VM's cold rate).
- **the in-process SDK behind a socket**: a blocking loop that reads a
  request line and answers it with the SDK's own `stockade.run_code` call,
  the very call the reference times, and its `ExecResult` serialized. It
  checks no HMAC and no limit: it is what is left of a daemon when
  everything a daemon does is taken away, and only the second process and
  the client's own work (signing, one round trip, parsing) remain.

The real `stockade.client.Client` is the client, the SDK worker of
bench/rpc.py the reference, all alternated, 30 ms apart.

    .venv/bin/python bench/rpc_floor.py [--runs 100] [--with-daemon]

With ``--with-daemon`` a real `stockade serve` (HMAC on, as in bench/rpc.py)
is timed in the same rounds too, so the daemon, both floors and the SDK are
compared on one machine phase.

On 2026-11-22 the callback-only server measured 1.11-1.22x across the day;
on 2026-11-23 the SDK behind a socket measured 1.19-1.23x. `stockade serve` now
serves a warm `execute` the same way (daemon/connection.py) and, run side by
side with this server in one harness, measures the same; see
docs/performance.md ("The callback path") for why the two still print
different ratios when each is run alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import stockade
from rpc import ratio_interval, start_daemon  # bench/rpc.py, beside this file
from stockade.agent import wire
from stockade.client import Client
from stockade.policy import coerce_policy
from stockade.protocol import auth
from stockade.runtimes import base
from stockade.runtimes.manager import RuntimeManager

SETTLE_S = 0.03
RPC_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rpc.py")


def serve(path: str, token: str) -> None:
    """Answer `execute(code=...)` requests on ``path`` with callbacks only, until SIGTERM."""
    manager = RuntimeManager(pool_size=2)
    stockade.warm_up(manager=manager)
    runtime: Any = manager.get("process")
    runtime.wait_ready()
    nonces = auth.NonceCache(auth.DEFAULT_WINDOW_S)
    loop = asyncio.new_event_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)

    def accept() -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)
        pending = bytearray()

        def request() -> None:
            data = conn.recv(1 << 16)
            if not data:
                loop.remove_reader(conn.fileno())
                conn.close()
                return
            pending.extend(data)
            if b"\n" not in pending:
                return
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            req = json.loads(line)
            if not auth.verify(req, token, nonces, raw=line):
                raise SystemExit("authentication failed")
            params = req["params"]
            sandbox = runtime.take_warm(coerce_policy(params.get("policy") or {}))
            sandbox.one_shot = True
            run = sandbox._begin_run({"code": params["code"], "language": "python"}, b"", None, None, None)
            msg_id, frame = sandbox._request("run_code", run.params)
            sandbox.conn.sendall(frame)

            def answer() -> None:
                loop.remove_reader(sandbox.conn.fileno())
                _, reply = sandbox._reply(base._decode(wire.read_frame(sandbox.conn)), msg_id, None)
                result = sandbox._finish_run(run, base._verdict(reply), None)
                line = f'{{"result": {result.model_dump_json()}, "error": null, "id": {json.dumps(req["id"])}}}\n'
                conn.send(line.encode())
                loop.call_soon(sandbox.kill)
                loop.call_later(0.005, runtime.dispose, sandbox)

            loop.add_reader(sandbox.conn.fileno(), answer)

        loop.add_reader(conn.fileno(), request)

    loop.add_reader(listener.fileno(), accept)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    print("ready", flush=True)
    try:
        loop.run_forever()
    finally:
        listener.close()
        manager.close()


def serve_sdk(path: str) -> None:
    """Answer `execute(code=...)` lines on ``path`` with the in-process SDK's own call,
    one connection, until it closes (or SIGTERM). No HMAC is checked."""
    manager = RuntimeManager(pool_size=2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # through the finally below
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stockade.warm_up(manager=manager)
        manager.get("process").wait_ready()  # type: ignore[attr-defined]
        listener.bind(path)
        listener.listen()
        print("ready", flush=True)
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                req = json.loads(line)
                result = stockade.run_code(req["params"]["code"], manager=manager)
                conn.sendall(f'{{"result": {result.model_dump_json()}, "error": null, "id": {req["id"]}}}\n'.encode())
    finally:
        listener.close()
        manager.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--with-daemon", action="store_true", help="time `stockade serve` in the same rounds")
    parser.add_argument("--serve", nargs=2, metavar=("SOCKET", "TOKEN"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-sdk", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    if args.serve_sdk:
        serve_sdk(args.serve_sdk)
        return
    token = secrets.token_hex(32)
    scratch = tempfile.mkdtemp(prefix="stockade-floor-")
    path, sdk_path = os.path.join(scratch, "floor.sock"), os.path.join(scratch, "sdk.sock")
    server = subprocess.Popen([sys.executable, __file__, "--serve", path, token], stdout=subprocess.PIPE, text=True)
    sdk_argv = [sys.executable, __file__, "--serve-sdk", sdk_path]
    sdk_server = subprocess.Popen(sdk_argv, stdout=subprocess.PIPE, text=True)
    worker = subprocess.Popen([sys.executable, RPC_BENCH, "--sdk-worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
    assert worker.stdin is not None and worker.stdout is not None
    daemon, daemon_path = start_daemon(token) if args.with_daemon else (None, "")
    try:
        for helper in (server, sdk_server, worker):
            assert helper.stdout is not None
            if helper.stdout.readline().strip() != "ready":
                raise SystemExit("a floor server or the SDK worker did not start")
        servers = {
            "callback-only asyncio server": Client(path, auth_token=token),
            "in-process SDK behind a socket": Client(sdk_path, auth_token=token),
        }
        if daemon is not None:
            servers["stockade serve"] = Client(daemon_path, auth_token=token)
        times: dict[str, list[float]] = {name: [] for name in servers}
        sdk = []
        for _ in range(args.runs):
            for name, client in servers.items():
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                result = client.execute(code="pass")
                times[name].append((time.perf_counter() - t0) * 1000)
                if not result.success:
                    raise SystemExit(f"the run failed on {name}: {result.summary()}")
            time.sleep(SETTLE_S)
            worker.stdin.write("code\n")
            sdk.append(float(worker.stdout.readline()))
        for client in servers.values():
            client.close()
    finally:
        worker.stdin.close()
        worker.wait(30)
        for helper in (server, sdk_server):
            helper.send_signal(signal.SIGTERM)
            helper.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            shutil.rmtree(os.path.dirname(daemon_path), ignore_errors=True)
    s50 = statistics.median(sdk)
    for name, measured in times.items():
        low, high = ratio_interval(measured, sdk)
        m50 = statistics.median(measured)
        print(f"run_code('pass'): {name} {m50:.3f} ms, in-process SDK {s50:.3f} ms, "
              f"ratio {m50 / s50:.2f}x (90% interval {low:.2f}-{high:.2f})")  # fmt: skip
    if daemon is not None:
        ours = times["stockade serve"]
        for name in ("callback-only asyncio server", "in-process SDK behind a socket"):
            low, high = ratio_interval(ours, times[name])
            ratio = statistics.median(ours) / statistics.median(times[name])
            print(f"stockade serve / {name}: {ratio:.2f}x (90% interval {low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
