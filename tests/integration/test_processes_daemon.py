"""Background processes and published ports of a held sandbox through the daemon (its socket,
its HTTP API, and ``status``)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from stockade import AsyncSandbox
from stockade.client import AsyncClient, Client
from stockade.errors import InvalidRequestError, NotFoundError, PolicyError
from tests.conftest import require
from tests.daemon_harness import Daemon, start_daemon
from tests.integration.test_spawn_and_publish import ECHO_SERVER, THREAD_ECHO, _a_spawn_given_up_left_running, _get

ECHO = "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\n"


@pytest.fixture
def http(process_runtime: str) -> Iterator[tuple[Daemon, httpx.Client]]:
    daemon = start_daemon(http="127.0.0.1:0")
    assert daemon.http_url is not None
    with httpx.Client(base_url=daemon.http_url, timeout=60) as client:
        yield daemon, client
    assert daemon.stop() == 0, daemon.logs()


def test_spawn_write_read_wait_kill_and_status(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, client = http
    sandbox = client.post("/api/v1/sandboxes", json={}).json()["sandbox_id"]
    base = f"/api/v1/sandboxes/{sandbox}/processes"
    started = client.post(base, json={"command": ["python3", "-c", ECHO]})
    assert started.status_code == 201, started.text
    echo = started.json()
    assert echo["running"] is True and echo["pid"] > 0 and echo["argv"][0] == "python3"
    handle = echo["handle"]
    assert client.post(f"{base}/{handle}/stdin", content=b"hello\n").status_code == 200
    # Another call on the sandbox while the process runs:
    ran = client.post(f"/api/v1/sandboxes/{sandbox}/exec", json={"command": ["echo", "meanwhile"]}).json()
    assert ran["stdout"] == "meanwhile\n"
    with Client(daemon.socket_path) as rpc:
        status = rpc.status()
    held = [s for s in status["active_sandboxes"] if s["sandbox_id"] == sandbox]
    assert held and [p["handle"] for p in held[0]["processes"]] == [handle], status
    assert client.post(f"{base}/{handle}/stdin", params={"eof": "true"}, content=b"bye\n").status_code == 200
    ended = client.post(f"{base}/{handle}/wait", params={"timeout": 30}).json()
    assert ended["running"] is False and ended["exit_code"] == 0
    output = client.get(f"{base}/{handle}/output").json()
    assert base64.b64decode(output["stdout"]) == b"got hello\ngot bye\n" and output["dropped"] == {
        "stdout": 0,
        "stderr": 0,
    }
    assert base64.b64decode(client.get(f"{base}/{handle}/output").json()["stdout"]) == b""  # read once
    sleeper = client.post(base, json={"command": ["sleep", "300"]}).json()
    killed = client.post(f"{base}/{sleeper['handle']}/kill", params={"signal": "SIGKILL"})
    assert killed.status_code == 200
    assert client.post(f"{base}/{sleeper['handle']}/wait", params={"timeout": 30}).json()["exit_code"] == -9
    every = client.get(base).json()["processes"]
    assert {p["handle"] for p in every} == {handle, sleeper["handle"]}
    assert client.get(f"{base}/p999/output").status_code == 404
    assert client.post(f"{base}/{handle}/kill", params={"signal": "SIGSEGV"}).status_code == 422
    assert client.post(f"{base}/{handle}/wait", params={"timeout": 601}).status_code == 422
    assert client.post(base, json={"command": []}).status_code == 422
    # An argv of MBs is remembered cut: 256 of them held half a GiB, all of it in each status answer.
    long = client.post(base, json={"command": ["true", "a" * (100 << 10), *["b" * 100] * 100]}).json()
    assert long["argv"][:2] == ["true", "a" * 1024 + "…"] and long["argv"][-1] == "…", long["argv"][:3]
    assert sum(map(len, long["argv"])) < 4200
    empty = client.post(base, json={"command": ["true", *[""] * 10_000]}).json()["argv"]
    assert len(empty) < 4200 and empty[-1] == "…", len(empty)
    with Client(daemon.socket_path) as rpc:
        (shown,) = [s for s in rpc.status()["active_sandboxes"] if s["sandbox_id"] == sandbox]
    assert [p["argv"] for p in shown["processes"] if p["handle"] == long["handle"]] == [long["argv"]]
    assert client.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 200


def test_a_client_spawns_and_drives_a_background_process(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, _ = http
    with Client(daemon.socket_path) as client, client.sandbox() as sb:
        echo = sb.spawn(["python3", "-c", ECHO])
        echo.write("one\n")
        assert sb.exec(["echo", "meanwhile"]).stdout == "meanwhile\n"
        echo.write("two\n", eof=True)
        assert echo.wait(30) == 0
        assert echo.read() == (b"got one\ngot two\n", b"")
        sleeper = sb.spawn(["sleep", "300"])
        assert sleeper.wait(0) is None  # asked, and still running
        sleeper.kill("SIGKILL")
        assert sleeper.wait(30) == -9
        chunks: list[bytes] = []
        assert sb.spawn(["sh", "-c", "echo a; echo b; exit 5"]).follow(lambda s, d: chunks.append(d)) == 5
        assert b"".join(chunks) == b"a\nb\n"
        assert {p["handle"] for p in sb.processes()} >= {echo.handle, sleeper.handle}


def test_the_async_client_spawns_too(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, _ = http

    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client, client.sandbox() as sb:
            proc = await sb.spawn(["sh", "-c", "read line; echo got $line"])
            await proc.write("hi\n", eof=True)
            assert await proc.wait(30) == 0
            assert await proc.read() == (b"got hi\n", b"")
            chunks: list[bytes] = []
            late = await sb.spawn(["sh", "-c", "echo a; sleep 0.2; echo b >&2; exit 5"])
            assert await late.follow(lambda stream, data: chunks.append(data)) == 5 and b"".join(chunks) == b"a\nb\n"
            assert not await _a_spawn_given_up_left_running(sb)

    asyncio.run(scenario())


def test_a_held_sandbox_publishes_ports_through_the_daemon(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, _ = http
    with Client(daemon.socket_path) as client:
        with client.sandbox(network_policy="loopback", publish=[8000]) as sb:
            host, port = sb.published[8000]
            assert host == "127.0.0.1" and port > 0
            sb.write_file("/tmp/hello.txt", "hello through the daemon\n")
            server = sb.spawn(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], cwd="/tmp")
            assert _get(f"http://{host}:{port}/hello.txt") == b"hello through the daemon\n"
            again = sb.publish("127.0.0.1:0:8000")  # a second host port for the same one inside
            assert _get(f"http://{again[0]}:{again[1]}/hello.txt") == b"hello through the daemon\n"
            listed = [s for s in client.status()["active_sandboxes"] if s.get("sandbox_id") == sb.sandbox_id]
            assert [(p["port"], p["host_port"]) for p in listed[0]["published"]] == [(8000, port), (8000, again[1])]
            # Refused, with what was wrong: a non-loopback host side, a host port already taken.
            with pytest.raises(InvalidRequestError, match="must be a loopback address"):
                sb.publish("0.0.0.0:9000:8000")
            with pytest.raises(InvalidRequestError, match=f"publish 127.0.0.1:{port} -> 8000: this sandbox already"):
                sb.publish(f"{port}:8000")
            server.kill()
        for ended in (port, again[1]):  # the forwards ended with the sandbox
            with pytest.raises(OSError):
                socket.create_connection((host, ended), timeout=5).close()
        with pytest.raises(PolicyError, match="network_policy='loopback'"), client.sandbox(publish=[8000]):
            pass  # a sandbox without a loopback: refused, and the sandbox made for it is closed
        assert not [s for s in client.status()["active_sandboxes"] if s["kind"] == "held"]


def test_the_http_api_publishes_a_port_but_no_service_port(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, api = http
    made = api.post("/api/v1/sandboxes", json={"policy": {"network_policy": "loopback"}})
    assert made.status_code in (200, 201), made.text
    sandbox = made.json()["sandbox_id"]
    echo = api.post(f"/api/v1/sandboxes/{sandbox}/processes", json={"command": ["python3", "-c", ECHO_SERVER]})
    assert echo.status_code == 201, echo.text
    added = api.post(f"/api/v1/sandboxes/{sandbox}/ports", json={"port": 7000})
    assert added.status_code == 201, added.text
    published = added.json()
    assert (published["sandbox_id"], published["port"], published["address"]) == (sandbox, 7000, "127.0.0.1")
    for _ in range(100):
        try:
            if _round_trip((published["address"], published["host_port"]), b"stockade") == b"edakcots":
                break
        except OSError:
            pass
        time.sleep(0.1)  # the echo server inside is still starting
    else:
        raise AssertionError("the published port never answered")
    # The HTTP API's caller is not root: it does not get the daemon's root to take a service port.
    low = api.post(f"/api/v1/sandboxes/{sandbox}/ports", json={"port": "80:7000"})
    assert low.status_code == 422 and "below 1024, which only root may bind" in low.json()["error"], low.text
    # Nor another loopback address, where a port would answer for a host service bound to one only.
    for spec in ("::1:6379:7000", "127.0.0.53:0:7000"):
        elsewhere = api.post(f"/api/v1/sandboxes/{sandbox}/ports", json={"port": spec})
        assert elsewhere.status_code == 422 and "only root chooses the host address" in elsewhere.json()["error"]
    assert api.post(f"/api/v1/sandboxes/{sandbox}/ports", json={"port": True}).status_code == 422
    assert api.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 200
    with pytest.raises(OSError):
        socket.create_connection((published["address"], published["host_port"]), timeout=5).close()
    deadline = time.monotonic() + 30
    while True:  # a port opened on the host is an act the audit log keeps (its writer appends as it can)
        with open(daemon.audit_log) as f:
            acts = [json.loads(line) for line in f if '"admin"' in line]
        published = [(a["target"], a["door"], a.get("refused")) for a in acts if a["action"] == "sandbox.publish"]
        if len(published) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # The port asked first, then the service port and the other addresses refused: attempts are on the record too.
    assert published == [(sandbox, "http", None), *[(sandbox, "http", "invalid_params")] * 3], published


def test_the_async_client_publishes_too(http: tuple[Daemon, httpx.Client]) -> None:
    daemon, _ = http

    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client:
            async with client.sandbox(network_policy="loopback", publish=[7000]) as sb:
                echo = await sb.spawn(["python3", "-c", ECHO_SERVER])
                got = b""
                while b"listening" not in got:
                    got += (await echo.read())[0]
                    await asyncio.sleep(0.05)
                reversed_back = await asyncio.to_thread(_round_trip, sb.published[7000], b"stockade")
                assert reversed_back == b"edakcots"
                await echo.kill("SIGKILL")

    asyncio.run(asyncio.wait_for(scenario(), 120))


def _round_trip(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=30) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
    return got


def test_traffic_through_a_published_port_keeps_a_held_sandbox_from_idling_out(
    http: tuple[Daemon, httpx.Client],
) -> None:
    daemon, _ = http
    with Client(daemon.socket_path) as client:
        sb = client.sandbox(network_policy="loopback", publish=[8000], idle_timeout=4)
        sb.write_file("/tmp/hello.txt", "hi\n")
        server = sb.spawn(["python3", "-u", "-m", "http.server", "8000", "--bind", "127.0.0.1"], cwd="/tmp")
        # Until it listens, connections reach nothing inside (no use): its start is waited for with
        # calls, which keep the sandbox, however long a loaded host takes.
        said, deadline = b"", time.monotonic() + 60
        while b"Serving HTTP" not in said:
            assert server.poll() is None and time.monotonic() < deadline, said
            said += server.read()[0]
            time.sleep(0.1)
        host, port = sb.published[8000]
        assert _get(f"http://{host}:{port}/hello.txt") == b"hi\n"
        served_until = time.monotonic() + 10  # over two idle timeouts with no call, only traffic
        while time.monotonic() < served_until:
            assert _get(f"http://{host}:{port}/hello.txt", attempts=1) == b"hi\n"
            time.sleep(0.3)
        deadline = time.monotonic() + 30  # no more traffic: it idles out
        while any(s.get("sandbox_id") == sb.sandbox_id for s in client.status()["active_sandboxes"]):
            assert time.monotonic() < deadline, "the sandbox did not idle out once its traffic stopped"
            time.sleep(0.2)
        with pytest.raises(NotFoundError, match="without a call or a connection to a published port"):
            sb.exec(["true"])


@pytest.mark.parametrize("runtime", ["process", "gvisor"])  # joined as root; relayed by the agent
def test_connections_that_reach_nothing_inside_do_not_keep_a_held_sandbox(
    runtime: str, http: tuple[Daemon, httpx.Client]
) -> None:
    """Anyone on the host may connect to a published port: only a connection that reaches the
    port inside is use. One refused there (nothing listens) does not hold the sandbox past its
    idle timeout."""
    require(runtime)
    daemon, _ = http
    with Client(daemon.socket_path) as client:
        sb = client.sandbox(runtime=runtime, network_policy="loopback", publish=[8000], idle_timeout=3)
        address = sb.published[8000]
        deadline = time.monotonic() + 30
        while any(s.get("sandbox_id") == sb.sandbox_id for s in client.status()["active_sandboxes"]):
            assert time.monotonic() < deadline, "connections refused inside kept the sandbox alive"
            try:
                with socket.create_connection(address, timeout=10) as conn:
                    conn.settimeout(10)
                    # Relayed to nothing: reset at once (or closed, where the sandbox closed meanwhile).
                    assert conn.recv(1) == b""
            except (ConnectionRefusedError, ConnectionResetError):
                pass  # reset as relayed to nothing; refused once the sandbox has closed, its port with it
            time.sleep(0.3)
        with pytest.raises(NotFoundError, match="without a call or a connection to a published port"):
            sb.exec(["true"])


def test_a_port_relayed_through_the_agent_takes_turns_with_the_daemons_and_async_sandboxs_calls(
    http: tuple[Daemon, httpx.Client],
) -> None:
    """gVisor's loopback is reached through its agent, by calls that need the sandbox's turn: on the
    daemon and on an AsyncSandbox they queue with the owner's own calls, which are never refused
    for them, and a long process wait gives the turn up to the port's connections."""
    require("gvisor")
    daemon, _ = http
    with Client(daemon.socket_path) as client:
        sb = client.sandbox(runtime="gvisor", network_policy="loopback", publish=[8000])
        sb.write_file("/tmp/hello.txt", "hi from gvisor\n")
        sb.spawn(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], cwd="/tmp")
        host, port = sb.published[8000]
        assert _get(f"http://{host}:{port}/hello.txt") == b"hi from gvisor\n"
        fetched: list[bytes] = []
        failed: list[BaseException] = []

        def fetch_many() -> None:
            try:
                fetched.extend(_get(f"http://{host}:{port}/hello.txt") for _ in range(10))
            except BaseException as exc:  # reported by the assertion below
                failed.append(exc)

        fetcher = threading.Thread(target=fetch_many)
        fetcher.start()
        # Calls of the daemon's own, while the relay's take turns: each is served, none refused.
        said = [sb.exec(["echo", str(i)]).stdout for i in range(10)]
        fetcher.join(120)
        assert not failed and said == [f"{i}\n" for i in range(10)] and fetched == [b"hi from gvisor\n"] * 10
        # A wait on a process that outlives the fetch: the connection is served meanwhile.
        sleeper = sb.spawn(["sleep", "60"])
        waiter = threading.Thread(target=sleeper.wait, args=(90,))
        waiter.start()
        time.sleep(0.5)
        assert _get(f"http://{host}:{port}/hello.txt") == b"hi from gvisor\n"
        assert waiter.is_alive()
        sleeper.kill("SIGKILL")
        waiter.join(60)
        assert not waiter.is_alive() and sleeper.exit_code == -9
        sb.close()

    async def in_process() -> None:
        async with AsyncSandbox(runtime="gvisor", network_policy="loopback", publish=[7200]) as asb:
            cell = await asb.run_code(THREAD_ECHO, session="server")
            assert cell.success, cell.error or cell.stderr
            address = asb.published[7200]
            payloads = [f"payload {i}".encode() for i in range(5)]
            answers = await asyncio.gather(
                *(asyncio.to_thread(_round_trip, address, p) for p in payloads),
                *(asb.exec(["echo", str(i)]) for i in range(5)),
            )
            assert answers[:5] == [p[::-1] for p in payloads]
            assert [r.stdout for r in answers[5:]] == [f"{i}\n" for i in range(5)]  # type: ignore[union-attr]

    asyncio.run(asyncio.wait_for(in_process(), 180))


# A background process's refused calls, made while no run goes: ptrace(PTRACE_ATTACH, 1) three times.
REFUSED_THRICE = "import ctypes\nfor _ in range(3):\n    ctypes.CDLL(None).ptrace(16, 1, 0, 0)\n"


def _violations_counted(api: httpx.Client) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in api.get("/metrics").text.splitlines()
        if line.startswith("stockade_violations_total{")
    )


def test_a_held_sandboxs_life_and_what_it_did_after_its_last_run_are_audited(
    http: tuple[Daemon, httpx.Client],
) -> None:
    # A background process (or one a run left running) made calls no run reported: the sandbox
    # was made, the process started and the calls refused with no record, no metric, at all.
    daemon, api = http
    before = _violations_counted(api)
    created = api.post("/api/v1/sandboxes", json={"agent_id": "auditee"})
    assert created.status_code == 201, created.text
    sandbox = created.json()["sandbox_id"]
    base = f"/api/v1/sandboxes/{sandbox}/processes"
    started = api.post(base, json={"command": ["python3", "-c", REFUSED_THRICE]})
    assert started.status_code == 201, started.text
    handle = started.json()["handle"]
    ended = api.post(f"{base}/{handle}/wait", params={"timeout": 60}).json()
    assert ended["exit_code"] == 0, ended
    assert api.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 200
    assert api.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 404  # refused: an attempt on the record too
    deadline = time.monotonic() + 30
    while True:  # the audit log's writer thread appends as it can, a batch at a time
        with open(daemon.audit_log) as f:
            records = [json.loads(line) for line in f if sandbox in line]
        events = [r["event"] for r in records]
        if ("sandbox.end" in events and events.count("violation") >= 3 and events.count("admin") >= 2) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.1)
    by_event = {r["event"]: r for r in records}
    assert by_event["sandbox.create"]["agent_id"] == "auditee"
    assert by_event["sandbox.create"]["policy_digest"] == created.json()["policy_digest"]
    spawn = by_event["sandbox.spawn"]
    assert (spawn["program"], spawn["handle"], spawn["door"]) == ("python3", handle, "http")
    assert REFUSED_THRICE not in json.dumps(records)  # its arguments are code: never in the log
    end = by_event["sandbox.end"]
    assert (end["ended"], end["runs"], end["leftovers_taken"], end["violations"]) == ("closed", 0, True, 3), end
    refused = [r for r in records if r["event"] == "violation"]
    assert [(r["syscall"], r["between_runs"], r["agent_id"]) for r in refused] == [("ptrace", True, "auditee")] * 3
    assert _violations_counted(api) == before + 3
    closes = [
        (r.get("refused"), r["door"]) for r in records if r["event"] == "admin" and r["action"] == "sandbox.close"
    ]
    assert closes == [(None, "http"), ("not_found", "http")], closes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_shared_daemon_lets_its_callers_name_only_the_host_ports_it_gives_them(process_runtime: str) -> None:
    # Any port from 1024 was a caller's to take: one a host service uses while it is down (or
    # before it starts) would then be answered by a tenant's sandbox, for the host's own clients.
    given = _free_port()
    daemon = start_daemon(http="127.0.0.1:0", env={"STOCKADE_PUBLISH_PORTS": f"{given}-{given}"})
    assert daemon.http_url is not None
    try:
        with httpx.Client(base_url=daemon.http_url, timeout=60) as api:
            made = api.post("/api/v1/sandboxes", json={"policy": {"network_policy": "loopback"}})
            sandbox = made.json()["sandbox_id"]
            service = 6379 if given != 6379 else 6380
            outside = api.post(f"/api/v1/sandboxes/{sandbox}/ports", json={"port": f"{service}:7000"})
            assert outside.status_code == 422, outside.text
            assert f"outside {given}-{given}, the ports this daemon lets its callers name" in outside.json()["error"]
            inside = api.post(f"/api/v1/sandboxes/{sandbox}/ports", json={"port": f"{given}:7000"})
            assert inside.status_code == 201 and inside.json()["host_port"] == given, inside.text
            free = api.post(f"/api/v1/sandboxes/{sandbox}/ports", json={"port": 7001})  # any free one
            assert free.status_code == 201, free.text
            assert api.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 200
    finally:
        assert daemon.stop() == 0, daemon.logs()
