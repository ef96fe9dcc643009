"""Background processes with handles (``sb.spawn``) and published ports (``Sandbox(publish=[...])``)."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import struct
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from stockade import AsyncSandbox, Policy, Sandbox
from stockade.errors import InvalidRequestError, PolicyError, SandboxClosedError, StockadeError
from stockade.runtimes import publish
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require

ECHO = "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\nprint('bye')\n"


@pytest.fixture(scope="module")
def manager() -> Iterator[RuntimeManager]:
    mgr = RuntimeManager(pool_size=0)
    yield mgr
    mgr.close()


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_spawned_process_runs_beside_other_calls_and_takes_input(runtime: str, manager: RuntimeManager) -> None:
    require(runtime)
    with Sandbox(Policy(runtime=runtime, timeout_seconds=60), manager=manager) as sb:
        echo = sb.spawn(["python3", "-c", ECHO])
        assert echo.pid > 0 and echo.poll() is None
        echo.write("one\n")
        assert sb.exec(["echo", "meanwhile"]).stdout == "meanwhile\n"  # the agent is free
        assert sb.run_code("print(2 + 2)").stdout == "4\n"
        echo.write("two\n", eof=True)
        assert echo.wait(30) == 0
        out, err = echo.read()
        assert (out, err) == (b"got one\ngot two\nbye\n", b"")
        listed = {p["handle"]: p for p in sb.processes()}
        assert listed[echo.handle]["running"] is False and listed[echo.handle]["exit_code"] == 0


def test_kill_wait_follow_and_bounded_output(process_runtime: str, manager: RuntimeManager) -> None:
    with Sandbox(Policy(runtime=process_runtime), manager=manager) as sb:
        sleeper = sb.spawn(["sh", "-c", "sleep 300 & wait"])
        assert sleeper.wait(0.2) is None
        sleeper.kill("SIGKILL")  # the group: the background sleep too
        assert sleeper.wait(30) == -9
        deadline = time.monotonic() + 30  # its background sleep went with the group (reaped by init soon)
        while "sleep" in sb.exec(["ps", "-eo", "stat=,comm="]).stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "sleep" not in sb.exec(["ps", "-eo", "stat=,comm="]).stdout
        chunks: list[tuple[str, bytes]] = []
        ticker = sb.spawn(["sh", "-c", "for i in 1 2 3; do echo tick $i; done; echo done >&2; exit 3"])
        assert ticker.follow(lambda stream, data: chunks.append((stream, data))) == 3
        assert b"".join(d for s, d in chunks if s == "stdout") == b"tick 1\ntick 2\ntick 3\n"
        assert b"".join(d for s, d in chunks if s == "stderr") == b"done\n"
        flood = sb.spawn(["sh", "-c", "head -c 5000000 /dev/zero; echo end >&2"])
        assert flood.wait(60) == 0  # never blocked by a host that does not read
        out, err = flood.read()
        assert len(out) == 1 << 20 and flood.dropped["stdout"] == 5000000 - (1 << 20) and err == b"end\n"
        with pytest.raises(TypeError):
            sb.spawn("sleep 1")  # type: ignore[arg-type]  # a list: no shell
        with pytest.raises(ValueError, match="signal must be one of"):
            ticker.kill("SIGSEGV")
        for way in (signal.SIGKILL, 9):  # a signal.Signals and a number, as os.kill takes them
            other = sb.spawn(["sleep", "300"])
            other.kill(way)
            assert other.wait(30) == -9


def test_an_ended_process_keeps_its_handle_as_popen_keeps_its_returncode(
    process_runtime: str, manager: RuntimeManager
) -> None:
    from stockade.agent.processes import MAX_ENDED, MAX_SPAWNED

    with Sandbox(Policy(runtime=process_runtime), manager=manager) as sb:
        first = sb.spawn(["sh", "-c", "echo bye; exit 4"])
        assert first.wait(30) == 4 and first.read() == (b"bye\n", b"")
        later = sb.spawn(["sleep", "300"])  # a spawn after it used to forget it
        assert first.poll() == 4 and first.read() == (b"", b"")
        first.kill("SIGKILL")  # nothing to signal: no error, and the status stands
        assert first.wait(1) == 4
        listed = {p["handle"]: p for p in sb.processes()}
        assert listed[first.handle]["exit_code"] == 4 and listed[later.handle]["running"]
        # Ended ones count against no limit: more than MAX_SPAWNED come and go beside a running one.
        ended = []
        for _ in range(MAX_SPAWNED + 2):
            p = sb.spawn(["true"])
            assert p.wait(30) == 0
            ended.append(p)
        assert ended[-1].poll() == 0 and len(sb.processes()) <= MAX_ENDED + 2
        later.kill("SIGKILL")
    # Nor do ended ones whose pipes a daemon they started holds: at the cap, the oldest let go.
    with Sandbox(Policy(runtime=process_runtime, pids_limit=256), manager=manager) as sb:
        for i in range(MAX_SPAWNED + 2):
            p = sb.spawn(["sh", "-c", f"setsid sleep 1000.{i} & echo started; exit 0"])
            assert p.wait(30) == 0 and p.read()[0] == b"started\n"
        assert sb.spawn(["true"]).wait(30) == 0


def test_a_spawned_python_program_s_output_comes_as_it_prints(process_runtime: str, manager: RuntimeManager) -> None:
    # As for a streamed exec: no PYTHONUNBUFFERED, and a server's banner never showed before it ended.
    with Sandbox(Policy(runtime=process_runtime), manager=manager) as sb:
        server = sb.spawn(["python3", "-c", "print('ready'); import time; time.sleep(60)"])
        said = b""
        deadline = time.monotonic() + 30
        # Until its whole line: "ready" and its newline may come in two reads.
        while b"ready\n" not in said and time.monotonic() < deadline and server.poll() is None:
            said += server.read()[0]
            time.sleep(0.05)
        assert said == b"ready\n" and server.poll() is None  # while it still runs
        server.kill()


def _get(url: str, attempts: int | None = None) -> bytes:
    """``url``'s body, asked for until the server inside answers (60 s: it starts as slowly as a
    loaded host lets it), or ``attempts`` times."""
    deadline = time.monotonic() + 60
    tried = 0
    while True:
        tried += 1
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return bytes(answer.read())
        except (urllib.error.URLError, ConnectionError):
            if (attempts is not None and tried >= attempts) or time.monotonic() > deadline:
                raise AssertionError(f"nothing answered at {url}") from None
            time.sleep(0.1)  # the server inside is still starting


def test_a_published_port_reaches_the_isolates_loopback_and_nothing_else(
    process_runtime: str, manager: RuntimeManager
) -> None:
    policy = Policy(runtime=process_runtime, network_policy="loopback")
    with Sandbox(policy, manager=manager, publish=[8000]) as sb:
        host, port = sb.published[8000]
        assert host == "127.0.0.1" and port > 0
        sb.write_file("/tmp/hello.txt", "hello from inside\n")
        server = sb.spawn(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], cwd="/tmp")
        assert _get(f"http://{host}:{port}/hello.txt") == b"hello from inside\n"
        # Two more, at once: each connection is relayed on its own.
        assert _get(f"http://{host}:{port}/hello.txt") == _get(f"http://{host}:{port}/hello.txt")
        fixed = sb.publish("127.0.0.1:0:9000")  # a second port, nothing listening there: reset, not hung
        # (The reset may come before the connect returns: a loaded host ran the relay's refusal first.)
        with pytest.raises(ConnectionResetError), socket.create_connection(fixed, timeout=10) as conn:
            conn.settimeout(10)
            conn.recv(1)
        server.kill()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=5).close()  # the forward ended with the sandbox


# Each connection read to its end and answered with its bytes reversed (``server`` listens).
_REVERSE = """
while True:
    conn, _ = server.accept()
    with conn:
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        conn.sendall(got[::-1])
"""
ECHO_SERVER = (
    'import socket\nserver = socket.create_server(("127.0.0.1", 7000))\nprint("listening", flush=True)' + _REVERSE
)


# A server in a stateful interpreter's thread: it outlives the cell that started it.
THREAD_ECHO = (
    'import socket, threading\nserver = socket.create_server(("127.0.0.1", 7200))\ndef serve():'
    + textwrap.indent(_REVERSE, "    ")
    + "threading.Thread(target=serve, daemon=True).start()\n"
)


def test_an_async_sandbox_publishes_at_its_start_and_later(process_runtime: str, manager: RuntimeManager) -> None:
    def round_trip(address: tuple[str, int]) -> bytes:
        with socket.create_connection(address, timeout=30) as conn:
            conn.sendall(b"stockade")
            conn.shutdown(socket.SHUT_WR)
            return conn.recv(64)

    async def scenario() -> None:
        policy = Policy(runtime=process_runtime, network_policy="loopback")
        async with AsyncSandbox(policy, manager=manager, publish=[7200]) as sb:
            first = sb.published[7200]
            cell = await sb.run_code(THREAD_ECHO, session="server")
            assert cell.success, cell.error or cell.stderr
            second = await sb.publish("127.0.0.1:0:7200")
            assert second != first and sb.published[7200] == second
            for address in (first, second):
                assert await asyncio.to_thread(round_trip, address) == b"edakcots"
        with pytest.raises(OSError):
            socket.create_connection(first, timeout=5).close()  # ended with the sandbox
        with pytest.raises(PolicyError, match="network_policy='loopback'"):
            async with AsyncSandbox(Policy(runtime=process_runtime), manager=manager, publish=[7200]):
                pass

    asyncio.run(asyncio.wait_for(scenario(), 120))


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_an_async_sandbox_spawns_and_serves_a_published_port(runtime: str, manager: RuntimeManager) -> None:
    require(runtime)

    async def scenario() -> None:
        policy = Policy(runtime=runtime, network_policy="loopback", timeout_seconds=60)
        async with AsyncSandbox(policy, manager=manager, publish=[8000]) as sb:
            server = await sb.spawn(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], cwd="/tmp")
            assert server.pid > 0 and await server.poll() is None
            said = b""
            while b"Serving HTTP" not in said:  # its ready line
                said += (await server.read())[0]
            host, port = sb.published[8000]
            page = await asyncio.to_thread(urllib.request.urlopen, f"http://{host}:{port}/")
            assert page.status == 200
            echo = await sb.spawn(["python3", "-c", ECHO])
            await echo.write("one\n")
            assert (await sb.exec(["echo", "meanwhile"])).stdout == "meanwhile\n"  # other calls go on
            await echo.close_stdin()
            assert await echo.wait(30) == 0 and (await echo.read())[0] == b"got one\nbye\n"
            listed = {p["handle"]: p for p in await sb.processes()}
            assert listed[server.handle]["running"] and listed[echo.handle]["exit_code"] == 0
            await server.kill()
            assert await server.wait(10) == -15
            seen: list[bytes] = []
            late = await sb.spawn(["sh", "-c", "echo late; exit 3"])
            assert await late.follow(lambda stream, data: seen.append(data)) == 3 and b"".join(seen) == b"late\n"
            assert not await _a_spawn_given_up_left_running(sb)

    asyncio.run(asyncio.wait_for(scenario(), 120))


async def _a_spawn_given_up_left_running(sb: Any) -> list[dict[str, Any]]:
    """Cancel a spawn as it starts: what it started, nobody holds a handle to, so it is ended."""
    task = asyncio.ensure_future(sb.spawn(["sleep", "61"]))
    await asyncio.sleep(0)  # on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 10
    while (running := [p for p in await sb.processes() if p["argv"] == ["sleep", "61"] and p["running"]]) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.05)  # killed: until its agent has seen it end
    return running


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("0.0.0.0:9000:8000", InvalidRequestError, "must be a loopback address"),
        ("8000:99999", InvalidRequestError, "a port is 1-65535"),
        ("web", InvalidRequestError, "ports are numbers"),
    ],
)
def test_bad_publish_specs_are_refused(spec: str, error: type[Exception], match: str, process_runtime: str) -> None:
    with pytest.raises(error, match=match):
        Sandbox(Policy(runtime=process_runtime, network_policy="loopback"), publish=[spec])


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_a_host_port_already_taken_is_refused_by_name_and_the_sandbox_lives(
    runtime: str, manager: RuntimeManager
) -> None:
    require(runtime)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with Sandbox(Policy(runtime=runtime, network_policy="loopback"), manager=manager) as sb:
            said = rf"publish 127.0.0.1:{port} -> 8000: .*Address already in use .*another program"
            with pytest.raises(InvalidRequestError, match=said):
                sb.publish(f"{port}:8000")
            assert sb.exec(["true"]).success
            _, free = sb.publish("0:8000")  # another port goes
            assert free != port
            # The same host port again, from the sandbox that holds it: said as that, not "another program".
            with pytest.raises(
                InvalidRequestError, match=rf"this sandbox already publishes 127.0.0.1:{free} \(to its port 8000\)"
            ):
                sb.publish(f"{free}:9000")


def test_publishing_needs_a_loopback(process_runtime: str) -> None:
    with pytest.raises(PolicyError, match="network_policy='loopback'"):
        Sandbox(Policy(runtime=process_runtime), publish=[8000])


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_published_port_relays_both_ways_whole_on_every_runtime(runtime: str, manager: RuntimeManager) -> None:
    """In gVisor and a microVM the host cannot join the isolate's loopback: the agent relays it.
    Both directions, a half-close, and a stream larger than the agent's buffers, byte for byte."""
    require(runtime)
    policy = Policy(runtime=runtime, network_policy="loopback", timeout_seconds=60)
    with Sandbox(policy, manager=manager, publish=[7000]) as sb:
        server = sb.spawn(["python3", "-c", ECHO_SERVER])
        deadline = time.monotonic() + 60
        while b"listening" not in server.read()[0]:
            assert time.monotonic() < deadline, "the echo server did not start"
            time.sleep(0.1)
        payload = bytes(range(256)) * (6 << 12)  # 6 MiB: past the agent's 1 MiB per direction
        with socket.create_connection(sb.published[7000], timeout=60) as conn:
            conn.sendall(payload[:1])
            count = (  # connections established to port 7000 inside
                "print(sum(l.split()[1].endswith(':1B58') and l.split()[3] == '01' for l in open('/proc/net/tcp')))"
            )
            while sb.exec(["python3", "-c", count]).stdout.strip() == "0":  # until the tunnel reached the server
                assert time.monotonic() < deadline, "the connection never reached the server inside"
                time.sleep(0.05)
            # A connection relayed through the agent is no process of the caller's.
            assert [p["argv"] for p in sb.processes()] == [["python3", "-c", ECHO_SERVER]]
            conn.sendall(payload[1:])
            conn.shutdown(socket.SHUT_WR)  # the server answers once it has it all
            got = bytearray()
            while chunk := conn.recv(1 << 16):
                got += chunk
        assert bytes(got) == payload[::-1]
        server.kill("SIGKILL")


IDLE_SERVER = """
import socket, time
server = socket.create_server(("127.0.0.1", 7100))
print("listening", flush=True)
held = []
while True:
    conn, _ = server.accept()
    held.append(conn)  # accepted, never answered
"""


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_clients_that_go_away_leave_nothing_behind_and_close_ends_the_rest(
    runtime: str, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients that reset or drop their connections mid-way, or close them as clients do (a FIN, which
    TCP cannot tell from a half-close) to a server that never closes its side, leave no tunnel in the
    agent and no thread on the host (the side left gets HALF_CLOSED_IDLE_S without a byte), and the
    sandbox idles again; closing the sandbox ends the connections still open at once."""
    require(runtime)
    monkeypatch.setattr(publish, "HALF_CLOSED_IDLE_S", 1.0)
    policy = Policy(runtime=runtime, network_policy="loopback", timeout_seconds=60)
    sb = Sandbox(policy, manager=manager, publish=[7100])
    try:
        server = sb.spawn(["python3", "-c", IDLE_SERVER])
        deadline = time.monotonic() + 60
        while b"listening" not in server.read()[0]:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        address = sb.published[7100]
        threads_before = threading.active_count()
        for i in range(24):
            conn = socket.create_connection(address, timeout=30)
            conn.sendall(b"half a request")
            if i % 2:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # a reset, or a close as any client's
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tunnels = [p for p in sb.processes() if p["argv"][0] == "tcp"]
            if not tunnels and threading.active_count() <= threads_before:
                break
            time.sleep(0.2)
        assert [p for p in sb.processes() if p["argv"][0] == "tcp"] == []
        assert threading.active_count() <= threads_before
        asked = time.monotonic()
        active = sb._sandbox.port_activity()  # type: ignore[attr-defined]  # "now" while a connection is open
        assert active is not None and active < asked  # in use no more: its idle timeout runs
        waiting = socket.create_connection(address, timeout=30)
        time.sleep(0.5)  # it is relayed (or being set up) when the sandbox closes
    finally:
        sb.close()
    waiting.settimeout(20)
    with waiting:
        try:
            assert waiting.recv(1) == b""  # ended by the close, not left hanging
        except ConnectionResetError:
            pass


def test_a_sandbox_closed_from_another_thread_says_so_to_its_calls(manager: RuntimeManager) -> None:
    require("process")
    policy = Policy(runtime="process", timeout_seconds=60)
    with Sandbox(policy, manager=manager) as sb:
        closer = threading.Thread(target=sb.close)
        # Closed once its output shows the run is under way.
        r = sb.exec(["sh", "-c", "echo go; exec sleep 30"], on_output=lambda s, d: closer.ident or closer.start())
        closer.join()
        assert (r.termination_reason, r.error) == ("killed", "the sandbox was closed during this call")
    with Sandbox(policy, manager=manager) as sb:
        sleeper = sb.spawn(["sleep", "60"])
        channel = sb._sandbox.channel  # type: ignore[attr-defined]

        def close_once_waiting() -> None:  # closed while the wait is in flight, not before it is sent
            deadline = time.monotonic() + 30
            while channel._current is None or channel._running != "proc_wait":
                if time.monotonic() > deadline:
                    break  # closed all the same: the wait's error says what came first
                time.sleep(0.01)
            sb.close()

        timer = threading.Thread(target=close_once_waiting)
        timer.start()
        with pytest.raises(SandboxClosedError, match=r"the sandbox was closed during this call \(proc_wait\)"):
            sleeper.wait()
        timer.join()
        with pytest.raises(SandboxClosedError, match="the sandbox is closed"):
            sb.exec(["true"])  # and after


def test_a_port_published_as_its_sandbox_closes_is_closed_with_it(manager: RuntimeManager) -> None:
    # The forwarder made while close went through the list was added after it: its listener, its
    # thread and its descriptor of the isolate stayed for the rest of the process.
    require("process")
    with Sandbox(Policy(runtime="process", network_policy="loopback"), manager=manager) as sb:
        before = set(threading.enumerate())
        isolate = sb._sandbox  # type: ignore[attr-defined]
        made: list[Any] = []
        real = isolate._forwarder

        def closed_meanwhile(*args: Any) -> Any:
            made.append(real(*args))
            closer = threading.Thread(target=isolate.close)
            closer.start()
            closer.join(30)
            return made[0]

        isolate._forwarder = closed_meanwhile
        with pytest.raises(SandboxClosedError, match="closed while its port was being published"):
            sb.publish(8000)
    (forwarder,) = made
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(forwarder.address, timeout=5).close()

    def forwarding() -> set[threading.Thread]:
        return {t for t in set(threading.enumerate()) - before if t.name.startswith("stockade-publish-")}

    deadline = time.monotonic() + 30
    while forwarding() and time.monotonic() < deadline:
        time.sleep(0.01)  # its accept thread ends once it wakes
    assert not forwarding()


def test_a_program_or_directory_that_is_not_there_raises_as_subprocess_does(manager: RuntimeManager) -> None:
    require("process")
    with Sandbox(Policy(runtime="process", timeout_seconds=60), manager=manager) as sb:
        for start in (sb.exec, sb.spawn):
            with pytest.raises(FileNotFoundError, match="cannot execute 'no-such-program'") as missing:
                start(["no-such-program"])
            assert missing.value.errno == errno.ENOENT and isinstance(missing.value, StockadeError)
            with pytest.raises(FileNotFoundError, match="cannot use '/nope' as the working directory"):
                start(["true"], cwd="/nope")
            with pytest.raises(PermissionError, match="cannot execute '/etc/passwd'"):
                start(["/etc/passwd"])


def test_publish_takes_one_spec_or_a_list_and_a_string_is_one_spec(manager: RuntimeManager) -> None:
    # "8000" was taken as four specs: host port 8 was published first, then "0" was refused.
    require("process")
    policy = Policy(runtime="process", network_policy="loopback")
    with Sandbox(policy, manager=manager, publish="8000") as sb:
        assert list(sb.published) == [8000]
    with Sandbox(policy, manager=manager, publish=8001) as sb:
        assert list(sb.published) == [8001]
    with Sandbox(policy, manager=manager, publish=range(8002, 8004)) as sb:  # any iterable of specs
        assert sorted(sb.published) == [8002, 8003]
    with pytest.raises(TypeError, match="publish takes a port spec or a list of them"):
        Sandbox(policy, manager=manager, publish=8000.5)  # type: ignore[arg-type]


# Run in a process of its own: its descriptor limit is lowered for a moment.
_OUT_OF_DESCRIPTORS = r"""
import os, resource, socket, subprocess, sys, threading, time
from stockade import Sandbox
SERVER = '''
import socket, threading
s = socket.create_server(("127.0.0.1", 8000), backlog=512)
print("ready", flush=True)
def echo(c):
    while (d := c.recv(65536)):
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
'''
def probe(host, port):
    with socket.create_connection((host, port), timeout=10) as c:
        c.sendall(b"ping")
        return c.recv(10)
with Sandbox(runtime="process", network_policy="loopback", timeout_seconds=120) as sb:
    server = sb.spawn(["python3", "-c", SERVER])
    said = b""
    while b"ready" not in said:
        said += server.read()[0]
        time.sleep(0.05)
    host, port = sb.publish(8000)
    assert probe(host, port) == b"ping"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:  # connections from another process (its descriptors are its own): the accepts run out
        subprocess.run([sys.executable, "-c", f'''
import socket, time
held = [socket.create_connection(("{host}", {port}), timeout=10) for _ in range(20)]
time.sleep(2)
'''], check=True, timeout=60)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 30
    while True:
        try:
            print(probe(host, port).decode(), flush=True)
            break
        except OSError:
            assert time.monotonic() < deadline, "the port never served again"
            time.sleep(0.2)
"""


def test_a_published_port_serves_again_after_the_host_ran_out_of_descriptors(process_runtime: str) -> None:
    # An accept that failed (EMFILE: anyone on the host may open connections to the port) ended
    # the port's accept thread: the port stayed bound, and took connections it never served.
    import os
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("the relay in the host process (the Forwarder) is root's; a user's goes through the agent")
    said = subprocess.run([sys.executable, "-c", _OUT_OF_DESCRIPTORS], capture_output=True, text=True, timeout=240)
    assert said.returncode == 0 and said.stdout.strip() == "ping", said.stderr[-3000:]


def test_the_connections_relayed_at_once_are_bounded_for_the_whole_host(
    process_runtime: str, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 a port, 16 ports a sandbox, 8 sandboxes: 8,192 connections (16,384 descriptors and threads).
    monkeypatch.setattr(publish, "_relayed", threading.BoundedSemaphore(2))
    with Sandbox(Policy(runtime="process", network_policy="loopback", timeout_seconds=60), manager=manager) as sb:
        server = sb.spawn(["python3", "-c", ECHO_SERVER])
        said = b""
        while b"listening" not in said:
            said += server.read()[0]
            time.sleep(0.05)
        host, port = sb.publish(7000)
        held = [socket.create_connection((host, port), timeout=10) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"x")  # both relayed (nothing comes back until each half-closes)
            # Refused with a reset, as past a port's own 64: the reset may come as it connects, as it sends,
            # before its half-close (ENOTCONN: the connection is gone already) or as it reads.
            with pytest.raises((ConnectionResetError, BrokenPipeError, OSError)) as refused:
                with socket.create_connection((host, port), timeout=10) as third:
                    third.sendall(b"y")
                    third.shutdown(socket.SHUT_WR)
                    third.recv(10)
            assert (
                isinstance(refused.value, (ConnectionResetError, BrokenPipeError))
                or refused.value.errno == errno.ENOTCONN
            ), refused.value
        finally:
            for sock in held:
                sock.close()
