"""The HTTP API: what it adds to an execute, and how it takes a burst.

Starts one real `stockade serve --http 127.0.0.1:0` (process runtime, on
loopback, no token) and an in-process SDK worker (bench/rpc.py's reference:
``stockade.run_code`` with a warm pool of 2, in a process of its own), then
measures from this process:

- sequential ``execute`` of ``print(1)``, time to result: over HTTP
  (``POST /api/v1/sandbox/execute``, one keep-alive ``httpx.Client``), over the
  Unix socket (``stockade.client.Client.execute``) and in-process, interleaved
  round-robin (the order rotating each round, ``--gap`` ms between calls, so
  the warm pools refill and all three see the same machine); then each door's
  round trip with no run (a ping, back to back);
- a burst of ``--burst`` concurrent ``execute`` calls over HTTP (all sent at
  once, ``httpx.AsyncClient``, a connection and an ``agent_id`` per call, as that
  many agents would), a staggered run (one call every ``--stagger`` ms), and the
  same burst over the Unix socket for reference: latency of the successful calls,
  and the failures by kind (503: no free slot, as the HTTP door never queues;
  429: rate limited).

The daemon is set up as a user expecting bursts of that size would:
``STOCKADE_MAX_SANDBOXES`` = the burst (every call needs a slot at once, or is
answered 503), a warm pool as large (``STOCKADE_POOL_SIZE``: a process isolate
built on demand costs ~15 ms of CPU, so 100 of them on 2 cores take over a
second; a warm one costs ~7 MB while it waits), the per-client request rate
raised (one client address sends every call, as a gateway in front of many
agents would) and ``STOCKADE_MAX_CONNECTIONS`` above the burst (for the
Unix-socket reference). ``--pool-size 2`` shows the default pool. The settings
are printed with the results.

Targets: sequential HTTP p50 <= 1.5x the Unix socket's; the HTTP burst 100%
successful with p95 <= 0.6 s (2 cores). A benchmark: it prints PASS/FAIL and
does not fail.

    .venv/bin/python bench/http.py [--rounds 100] [--gap 30] [--burst 100] [--stagger 20]
                                   [--max-sandboxes N] [--pool-size N]
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where this file would
# stand in for the standard library's `http` package (which httpx imports): drop it.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import asyncio
import collections
import contextlib
import http.client
import json
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import httpx

import stockade
from stockade.client import AsyncClient, Client
from stockade.errors import StockadeError, error_code
from stockade.runtimes.manager import RuntimeManager

CODE = "print(1)"
EXECUTE = "/api/v1/sandbox/execute"
BODY = {"agent_id": "bench", "code": CODE, "runtime": "process"}
HTTP_TARGET = 1.5  # sequential HTTP p50 / Unix socket p50
BURST_P95_S = 0.6
REFILL_S = 3.0  # seconds between the concurrent runs: the warm pool full again
SDK_POOL_SIZE = 2  # the in-process reference's warm pool, as in bench/rpc.py


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- the daemon -------------------------------------------------------------------------------


class Daemon:
    """`stockade serve --http 127.0.0.1:0` on a temporary socket; its HTTP URL read from its log."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="stockade-bench-http-")
        self.socket_path = os.path.join(self.dir, "d.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        full_env.update(STOCKADE_SOCKET=self.socket_path, STOCKADE_AUDIT_LOG=os.path.join(self.dir, "audit.log"),
                        STOCKADE_DAEMON_USER="root", **env)  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stockade.cli", "serve", "--http", "127.0.0.1:0"],
                env=full_env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            self.url = self._wait_for_url()
        except BaseException:
            self.stop()
            raise

    def _log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def _wait_for_url(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self._log().splitlines():
                if "HTTP API on " in line:
                    url = line.split("HTTP API on ", 1)[1].split()[0]
                    Client(self.socket_path).ping()
                    return url
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode}:\n{self._log()}")
            time.sleep(0.05)
        raise SystemExit(f"the daemon's HTTP API did not listen within {timeout} s:\n{self._log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- the in-process reference -----------------------------------------------------------------


def sdk_worker(pool_size: int) -> None:
    """Time one in-process ``run_code(CODE)`` per line read; print its ms (bench/rpc.py's worker)."""
    manager = RuntimeManager(pool_size=pool_size)
    stockade.warm_up(manager=manager)
    manager.get("process").wait_ready()  # type: ignore[attr-defined]
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        r = stockade.run_code(CODE, manager=manager, runtime="process")
        elapsed = (time.perf_counter() - t0) * 1000
        assert r.success and r.stdout == "1\n", r.summary()
        print(f"{elapsed:.6f}", flush=True)
    manager.close()


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--sdk-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise SystemExit("the SDK worker did not start")

    def run(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- sequential -------------------------------------------------------------------------------


def timed_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def http_execute(client: httpx.Client) -> None:
    r = client.post(EXECUTE, json=BODY)
    answer = r.json()  # time to result: the answer read and parsed
    assert r.status_code == 200 and answer["success"] and answer["stdout"] == "1\n", r.text


def stdlib_execute(conn: http.client.HTTPConnection) -> None:
    conn.request("POST", EXECUTE, json.dumps(BODY), {"Content-Type": "application/json"})
    r = conn.getresponse()
    answer = json.loads(r.read())  # time to result: the answer read and parsed
    assert r.status == 200 and answer["success"] and answer["stdout"] == "1\n", answer


def unix_execute(client: Client) -> None:
    r = client.execute(code=CODE, policy={"runtime": "process"})
    assert r.success and r.stdout == "1\n", r.summary()


def sequential(daemon: Daemon, worker: Worker, rounds: int, gap_s: float) -> dict[str, list[float]]:
    """Each round: an HTTP execute, a Unix-socket execute and an in-process run_code, in an
    order that rotates, ``gap_s`` apart; then the two doors' round trip alone (a ping each)."""
    client = httpx.Client(base_url=daemon.url, timeout=60)
    address = urllib.parse.urlsplit(daemon.url)
    stdlib = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=60)
    unix = Client(daemon.socket_path)
    sides: list[tuple[str, Callable[[], float]]] = [
        ("http", lambda: timed_ms(lambda: http_execute(client))),
        ("http stdlib", lambda: timed_ms(lambda: stdlib_execute(stdlib))),
        ("unix", lambda: timed_ms(lambda: unix_execute(unix))),
        ("sdk", worker.run),
    ]
    pings: list[tuple[str, Callable[[], float]]] = [
        ("http ping", lambda: timed_ms(lambda: client.get("/v1/ping").raise_for_status())),
        ("unix ping", lambda: timed_ms(unix.ping)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in sides + pings}
    try:
        for _ in range(5):  # warm-up: connections open, code paths hot
            for _, fn in sides + pings:
                fn()
                time.sleep(gap_s)
        for i in range(rounds):
            for k in range(len(sides)):
                name, fn = sides[(i + k) % len(sides)]  # no side always goes first
                time.sleep(gap_s)
                times[name].append(fn())
        for i in range(rounds):
            for k in range(len(pings)):
                name, fn = pings[(i + k) % len(pings)]
                times[name].append(fn())
    finally:
        client.close()
        stdlib.close()
        unix.close()
    return times


# ---- concurrent -------------------------------------------------------------------------------


class Outcome:
    def __init__(self, label: str) -> None:
        self.label = label
        self.ok: list[float] = []  # seconds to the answer, successful calls
        self.failed: collections.Counter[str] = collections.Counter()
        self.wall_s = 0.0

    @property
    def total(self) -> int:
        return len(self.ok) + sum(self.failed.values())

    @property
    def busy(self) -> int:
        return self.failed["503"] + self.failed["busy"]

    @property
    def limited(self) -> int:
        return self.failed["429"] + self.failed["rate_limit"]


async def http_call(client: httpx.AsyncClient, agent_id: str) -> str | None:
    """One execute over HTTP: None when it succeeded, else what it was answered (503, 429, ...)."""
    try:
        r = await client.post(EXECUTE, json={**BODY, "agent_id": agent_id})
    except httpx.HTTPError as exc:
        return type(exc).__name__
    if r.status_code != 200:
        return str(r.status_code)
    return None if r.json().get("stdout") == "1\n" else "wrong answer"


async def unix_call(socket_path: str) -> str | None:
    """One execute over the Unix socket, on a connection of its own: None, or the error's code."""
    try:
        async with AsyncClient(socket_path, timeout=120) as client:
            r = await client.execute(code=CODE, policy={"runtime": "process"})
    except StockadeError as exc:
        return error_code(exc)
    return None if r.success and r.stdout == "1\n" else "wrong answer"


async def concurrent(label: str, call: Callable[[int], Awaitable[str | None]], count: int, every_s: float) -> Outcome:
    """``count`` calls, the i-th started at ``i * every_s`` (0: all at once), each timed to its answer."""
    out = Outcome(label)

    async def timed(i: int) -> None:
        t0 = time.perf_counter()
        failure = await call(i)
        if failure is None:
            out.ok.append(time.perf_counter() - t0)
        else:
            out.failed[failure] += 1

    t0 = time.perf_counter()
    tasks = []
    for i in range(count):
        if every_s:
            await asyncio.sleep(max(0.0, t0 + i * every_s - time.perf_counter()))
        tasks.append(asyncio.create_task(timed(i)))
    await asyncio.gather(*tasks)
    out.wall_s = time.perf_counter() - t0
    return out


async def over_http(label: str, url: str, count: int, every_s: float) -> Outcome:
    # A connection per call in flight (as that many agents would have), an agent_id per call.
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await concurrent(label, lambda i: http_call(client, f"bench-{label[:5]}-{i}"), count, every_s)


async def over_unix(label: str, socket_path: str, count: int, every_s: float) -> Outcome:
    return await concurrent(label, lambda i: unix_call(socket_path), count, every_s)


# ---- report -----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    settings: dict[str, str], args: argparse.Namespace, seq: dict[str, list[float]], runs: list[Outcome]
) -> None:
    print(f"\ndaemon: {', '.join(f'{k}={v}' for k, v in settings.items())}; runtime process; "
          f"{os.cpu_count()} cores; the in-process reference: a warm pool of {SDK_POOL_SIZE}")  # fmt: skip
    print(f"\nsequential, time to result: {args.rounds} rounds, round-robin, {args.gap:g} ms apart")
    print(f"| {'what':<56} | {'p50 ms':>7} | {'p95 ms':>7} | {'mean ms':>7} |")
    print(f"|{'-' * 58}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    rows = (
        ("http stdlib", f"execute({CODE!r}) over HTTP (keep-alive http.client)"),
        ("http", f"execute({CODE!r}) over HTTP (keep-alive httpx.Client)"),
        ("unix", f"execute({CODE!r}) over the Unix socket (Client)"),
        ("sdk", f"run_code({CODE!r}) in-process (SDK, warm pool)"),
        ("http ping", "  no run: GET /v1/ping over HTTP, back to back"),
        ("unix ping", "  no run: ping over the Unix socket, back to back"),
    )
    for key, label in rows:
        times = seq[key]
        print(f"| {label:<56} | {statistics.median(times):7.2f} | {pct(times, 0.95):7.2f} | "
              f"{statistics.fmean(times):7.2f} |")  # fmt: skip
    http_p50, httpx_p50, unix_p50, sdk_p50 = (statistics.median(seq[k]) for k in ("http stdlib", "http", "unix", "sdk"))
    print(f"HTTP (http.client) / Unix socket: {http_p50 / unix_p50:.2f}x (p50; {http_p50 - unix_p50:+.2f} ms); "
          f"with httpx: {httpx_p50 / unix_p50:.2f}x (httpx itself: {httpx_p50 - http_p50:+.2f} ms); "
          f"Unix socket / in-process: {unix_p50 / sdk_p50:.2f}x (p50; {unix_p50 - sdk_p50:+.2f} ms)")  # fmt: skip

    print(f"\nconcurrent execute({CODE!r}): seconds to the answer, successful calls")
    print(f"| {'run':<36} | {'ok':>8} | {'p50 s':>6} | {'p95 s':>6} | {'p99 s':>6} | {'max s':>6} | "
          f"{'wall s':>6} | {'503':>4} | {'429':>4} | {'other':>5} |")  # fmt: skip
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 6}|{'-' * 6}|{'-' * 7}|")
    for out in runs:
        other = out.total - len(out.ok) - out.busy - out.limited
        print(f"| {out.label:<36} | {len(out.ok):>3}/{out.total:<4} | {pct(out.ok, 0.5):6.3f} | "
              f"{pct(out.ok, 0.95):6.3f} | {pct(out.ok, 0.99):6.3f} | {max(out.ok, default=float('nan')):6.3f} | "
              f"{out.wall_s:6.3f} | {out.busy:>4} | {out.limited:>4} | {other:>5} |")  # fmt: skip
        if other:
            print(f"  other failures: {dict(out.failed)}")
    print("(503: no free slot, the HTTP door never queues; 429: rate limited; on the Unix socket: busy, rate_limit)")

    print()
    ratio = http_p50 / unix_p50
    print(f"sequential HTTP <= {HTTP_TARGET}x Unix socket (p50, each door's plainest client: http.client, "
          f"stockade's Client): {ratio:.2f}x {verdict(ratio <= HTTP_TARGET)}")  # fmt: skip
    burst = runs[0]
    rate, p95 = len(burst.ok) / burst.total, pct(burst.ok, 0.95)
    print(f"HTTP burst of {args.burst}: 100% successful: {rate:.0%} {verdict(rate == 1)}; p95 <= {BURST_P95_S} s: "
          f"{p95:.3f} s ({p95 / BURST_P95_S:.2f}x the target) {verdict(p95 <= BURST_P95_S)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=100, help="sequential rounds (HTTP, Unix socket, in-process)")
    parser.add_argument("--gap", type=float, default=30, help="ms between sequential calls")
    parser.add_argument("--burst", type=int, default=100, help="calls in the burst and in the staggered run")
    parser.add_argument("--stagger", type=float, default=20, help="ms between the staggered run's calls")
    parser.add_argument("--max-sandboxes", type=int, default=None, help="STOCKADE_MAX_SANDBOXES (default: --burst)")
    parser.add_argument("--pool-size", type=int, default=None, help="STOCKADE_POOL_SIZE (default: --burst)")
    parser.add_argument("--sdk-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdk_worker:
        sdk_worker(SDK_POOL_SIZE)
        return

    settings = {
        "STOCKADE_MAX_SANDBOXES": str(args.max_sandboxes or args.burst),  # the HTTP door never queues
        "STOCKADE_POOL_SIZE": str(args.burst if args.pool_size is None else args.pool_size),
        "STOCKADE_MAX_CONNECTIONS": str(args.burst + 16),  # per uid, for the Unix-socket burst (default 64)
        "STOCKADE_MAX_REQUESTS": "100000",  # per client address: every call here comes from 127.0.0.1
        "STOCKADE_AGENT_MAX_REQUESTS": "20",  # the default: each concurrent call has an agent_id of its own
    }
    stagger_s = args.stagger / 1000
    daemon = Daemon(settings)
    try:
        worker = Worker()
        try:
            seq = sequential(daemon, worker, args.rounds, args.gap / 1000)
        finally:
            worker.close()
        plan: list[Callable[[], Awaitable[Outcome]]] = [
            lambda: over_http(f"HTTP burst: {args.burst} at once", daemon.url, args.burst, 0),
            lambda: over_http(f"HTTP staggered: 1 every {args.stagger:g} ms", daemon.url, args.burst, stagger_s),
            lambda: over_unix(f"Unix socket burst: {args.burst} at once", daemon.socket_path, args.burst, 0),
        ]
        runs = []
        for run in plan:
            time.sleep(REFILL_S)  # the warm pool full again, the last run's isolates gone
            runs.append(asyncio.run(run()))
    finally:
        daemon.stop()
    report(settings, args, seq, runs)


if __name__ == "__main__":
    main()
