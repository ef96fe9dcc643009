"""The egress proxy: what it adds to an HTTPS request, with and without a secret put in.

One run, three ways to the same HTTPS server on the host's loopback (the
test harness's, tests/egress_harness.py), each on one established keep-alive
connection, timed request by request by the same client script
(/usr/bin/python3, ``http.client``):

- direct: the client on the host, straight to the server (the reference);
- tunnel: the client in a process isolate under ``network_policy: "allowlist"``,
  through the proxy to a host no secret is bound to (CONNECT, TLS end to end);
- substitution: the same isolate, to the host its secret is bound to: the proxy
  terminates TLS with the sandbox's CA, puts the value in the bound header,
  and relays over verified TLS upstream.

Then the isolate with a secret once more, from the warm pool: its hand-over
time against an isolate without one (secrets are the proxy's: no cold start).

Target: substitution adds <= 2 ms p50 over the tunnel. A benchmark: it prints
PASS/FAIL and does not fail.

    .venv/bin/python bench/egress.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Run as a script, this file's folder comes first on sys.path, where bench/http.py would stand in
# for the standard library's `http`: the repository's root instead (for tests/egress_harness.py).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests.egress_harness import serve_upstreams  # noqa: E402

from stockade import Policy, Sandbox  # noqa: E402
from stockade.runtimes.manager import RuntimeManager  # noqa: E402
from stockade.sdk import run_code  # noqa: E402

CLIENT = r"""
import http.client, json, os, socket, ssl, sys, time
host, port, n, cafile, proxied = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
context = ssl.create_default_context(cafile=cafile or None)
if proxied:
    conn = http.client.HTTPSConnection("127.0.0.1", 3128, context=context, timeout=30)
    conn.set_tunnel(host, port)
else:
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    # The name is verified; the address is the loopback (the name is the harness's own, not in DNS).
    conn._create_connection = lambda address, *a, **k: socket.create_connection(("127.0.0.1", address[1]), *a, **k)
headers = {"Authorization": "Bearer " + os.environ.get("API_KEY", "none")}
times = []
for i in range(n + 10):  # the first ten open and warm the connection
    started = time.perf_counter()
    conn.request("GET", "/bench", headers=headers)
    conn.getresponse().read()
    if i >= 10:
        times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    upstreams = serve_upstreams()
    up = next(upstreams)
    ca = os.environ["STOCKADE_EGRESS_CA_FILE"]
    port = up.https.port
    try:
        direct = subprocess.run(
            ["/usr/bin/python3", "-c", CLIENT, "api.stockade.test", str(port), str(args.requests), ca, "0"],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        results = {"direct": json.loads(direct.stdout)}
        policy = Policy(
            network_policy="allowlist",
            allowed_hosts=[f"api.stockade.test:{port}", f"other.stockade.test:{port}"],
            allowed_cidrs=["127.0.0.0/8"],
            secrets=[{"name": "API_KEY", "hosts": [f"api.stockade.test:{port}"]}],
            timeout_seconds=300,
        )
        manager = RuntimeManager(pool_size=1)
        with Sandbox(policy, manager=manager) as sb:
            with open(ca, "rb") as f:
                sb.write_file("/tmp/upstream-ca.pem", f.read())
            sb.write_file("/tmp/client.py", CLIENT)
            for name, host, cafile in (
                ("tunnel", "other.stockade.test", "/tmp/upstream-ca.pem"),
                ("substitution", "api.stockade.test", ""),  # SSL_CERT_FILE: the sandbox's CA and the host's roots
            ):
                done = sb.exec(["python3", "/tmp/client.py", host, str(port), str(args.requests), cafile, "1"])
                if done.exit_code != 0:
                    print(done.stderr, file=sys.stderr)
                    return 1
                results[name] = json.loads(done.stdout)
        assert up.https.seen[-1]["authorization"].startswith("Bearer sk-live"), "the value was not put in"
        print(f"HTTPS GET on one established connection, {args.requests} requests each (ms)")
        print(f"{'path':<14}{'p50':>8}{'p99':>8}")
        for name in ("direct", "tunnel", "substitution"):
            p50, p99 = percentiles(results[name])
            print(f"{name:<14}{p50:8.3f}{p99:8.3f}")
        added = percentiles(results["substitution"])[0] - percentiles(results["tunnel"])[0]
        over_direct = percentiles(results["substitution"])[0] / percentiles(results["direct"])[0]
        print(f"substitution adds {added:.3f} ms p50 over the tunnel ({over_direct:.2f}x direct)")
        print(f"target: <= 2 ms p50: {'PASS' if added <= 2.0 else 'FAIL'}")

        # Hand-over from the warm pool, with a secret and without one (the pool keeps both shapes' isolates).
        plain = Policy(network_policy="allowlist", allowed_hosts=[f"other.stockade.test:{port}"],
                       allowed_cidrs=["127.0.0.0/8"], timeout_seconds=60)  # fmt: skip
        runtime = manager.get("process")
        timings: dict[str, list[float]] = {"with a secret": [], "without": []}
        for _ in range(3):  # the shape joins the pool
            run_code("pass", policy=policy, manager=manager)
            runtime.wait_ready(30)  # type: ignore[attr-defined]
        for _ in range(20):
            for name, chosen in (("with a secret", policy), ("without", plain)):
                runtime.wait_ready(30)  # type: ignore[attr-defined]
                started = time.perf_counter()
                result = run_code("pass", policy=chosen, manager=manager)
                timings[name].append(time.perf_counter() - started)
                assert result.exit_code == 0, result.stderr
        stats = runtime.pool_statistics()  # type: ignore[attr-defined]
        print(f"one-shot run_code('pass') from the warm pool (ms; pool served {stats['served']})")
        for name, times in timings.items():
            p50, p99 = percentiles(times)
            print(f"{name:<14}{p50:8.3f}{p99:8.3f}")
        manager.close()
    finally:
        upstreams.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
