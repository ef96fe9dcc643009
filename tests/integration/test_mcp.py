"""MCP tools in isolates (docs/mcp.md): the isolation config, `stockade mcp call-tool`, `ToolHost`.

A real server nobody here wrote (`mcp-server-time`, from PyPI, in an environment built from
the host's pip configuration) and a hostile one of the suite's own (tests/mcp_servers/hostile.py,
shared into the isolate with the config's `mounts`), each ephemeral and persistent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from stockade.errors import ConfigError
from stockade.mcp.config import IsolationConfig, load_config
from stockade.mcp.tools import ToolError, ToolHost
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require

STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")
HOSTILE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "mcp_servers")
TIME = {"command": "mcp-server-time", "packages": ["mcp-server-time==2026.10.19"], "timeout_secs": 120}
FETCH_PACKAGE = "mcp-server-fetch==2026.10.24"


@pytest.fixture(scope="module")
def manager() -> Iterator[RuntimeManager]:
    require("process")
    mgr = RuntimeManager(pool_size=0)
    yield mgr
    mgr.close()


def config(**servers: dict[str, Any]) -> IsolationConfig:
    return IsolationConfig.parse({"mcp_servers": servers})


def hostile(**fields: Any) -> dict[str, Any]:
    return {"command": "python3", "args": ["/mcp/hostile.py"], "expose": "all", "timeout_secs": 60,
            "mounts": [{"host_path": HOSTILE_DIR, "guest_path": "/mcp"}], **fields}  # fmt: skip


def call(host: ToolHost, server: str, tool: str, arguments: dict[str, Any] | None = None) -> Any:
    async def go() -> Any:
        return await host.call(server, tool, arguments)

    return anyio.run(go)


def text_of(result: Any) -> Any:
    return json.loads(result.content[0].text)


def test_call_tool_runs_a_real_server_in_a_fresh_isolate(manager: RuntimeManager, tmp_path: Any) -> None:
    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps({"mcp_servers": {"time": {**TIME, "tools": {"get_current_time": {}}}}}))
    done = subprocess.run(
        [STOCKADE, "mcp", "call-tool", "--config", str(path), "--json", "time", "get_current_time",
         '{"timezone": "Europe/Paris"}'],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert json.loads(result["content"][0]["text"])["timezone"] == "Europe/Paris"
    verdict = result["_meta"]["stockade"]
    assert verdict["runtime"] == "process" and verdict["isolate"] == "ephemeral"
    assert verdict["security_violations"] == []
    # Text by default; a tool the config does not list is not offered.
    plain = subprocess.run([STOCKADE, "mcp", "call-tool", "--config", str(path), "time", "get_current_time",
                            '{"timezone": "UTC"}'], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert plain.returncode == 0 and json.loads(plain.stdout)["timezone"] == "UTC", plain.stderr
    hidden = subprocess.run([STOCKADE, "mcp", "call-tool", "--config", str(path), "time", "convert_time", "{}"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert hidden.returncode == 125 and "'convert_time' of MCP server 'time' is not offered" in hidden.stderr


def test_call_tool_shows_a_servers_text_without_what_a_terminal_would_act_on(tmp_path: Any) -> None:
    """The text was printed as the server wrote it: a title set, the screen cleared, a line forged."""
    require("process")
    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps({"mcp_servers": {"bad": hostile()}}))
    argv = [STOCKADE, "mcp", "call-tool", "--config", str(path)]
    shown = subprocess.run([*argv, "bad", "shout", "{}"], capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "\\x1b]0;PWNED\\x07\\x1b[31mred\\x0d\nstockade: forged line\n"
    exact = subprocess.run([*argv, "--json", "bad", "shout", "{}"], capture_output=True, text=True, timeout=600)
    assert json.loads(exact.stdout)["content"][0]["text"] == "\x1b]0;PWNED\x07\x1b[31mred\r\nstockade: forged line"


def test_a_persistent_server_keeps_its_isolate_and_is_started_again_when_it_dies(manager: RuntimeManager) -> None:
    host = ToolHost(config(time={**TIME, "lifecycle": "persistent", "expose": "all"}), manager)

    async def go() -> None:
        async with host:
            first = await host.call("time", "get_current_time", {"timezone": "UTC"})
            live = host._live["time"]
            noon = {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
            second = await host.call("time", "convert_time", noon)
            assert host._live["time"] is live  # one isolate, one session
            assert text_of(second)["target"]["datetime"].endswith("21:00:00+09:00")
            for result in (first, second):
                assert result.meta["stockade"]["isolate"] == "persistent"
            names = {t.name for t in await host.list_tools("time")}
            assert {"get_current_time", "convert_time"} <= names
            # The server dies: the next call starts it again, in a new isolate.
            await anyio.to_thread.run_sync(lambda: live.sandbox.exec(["sh", "-c", "kill -9 -1"]))
            with anyio.fail_after(30):
                while live.alive():  # its keeper sees the end within a poll or two
                    await anyio.sleep(0.01)
            again = await host.call("time", "get_current_time", {"timezone": "UTC"})
            assert host._live["time"] is not live and text_of(again)["timezone"] == "UTC"

    anyio.run(go)
    assert not host._live


@pytest.mark.parametrize("lifecycle", ["ephemeral", "persistent"])
def test_a_hostile_server_is_contained_and_what_it_tried_is_in_the_verdict(
    manager: RuntimeManager, lifecycle: str
) -> None:
    host = ToolHost(config(bad=hostile(lifecycle=lifecycle, memory_mb=256)), manager)

    async def go() -> None:
        async with host:
            snooped = await host.call("bad", "snoop")
            seen = text_of(snooped)
            assert all(v in ("No such file or directory", "Permission denied") for k, v in seen.items()
                       if k.startswith("/")), seen  # fmt: skip
            assert not [k for k in seen["environ"] if k.startswith("STOCKADE") or k in ("SSH_AUTH_SOCK", "USER")]
            assert seen["network"] != "connected" and seen["raw"] != "opened"
            verdict = snooped.meta["stockade"]
            assert verdict["violation_counts"].get("socket") == 1, verdict  # the raw socket, refused by seccomp
            assert verdict["violation_counts"].get("ptrace") == 1 and seen["ptrace"] == -1, verdict
            # Garbage on stdout is reported and skipped; the answer after it still arrives.
            assert text_of(await host.call("bad", "garbage")) == "after the garbage"
            hog = await host.call("bad", "hog")
            assert text_of(hog)["child"] == -9 and hog.meta["stockade"]["limits_hit"] == ["memory_mb"], hog.meta
            assert (await host.call("bad", "echo")).meta["stockade"]["limits_hit"] == []  # per call, not ever after
            forked = text_of(await host.call("bad", "fork"))
            assert 0 < forked["children"] < 1000  # the isolate's pids limit, not the host's
            assert text_of(await host.call("bad", "echo", {"still": "here"})) == {"still": "here"}

    anyio.run(go)


@pytest.mark.parametrize("lifecycle", ["ephemeral", "persistent"])
def test_what_a_server_did_is_said_however_it_answers_and_outside_calls(
    manager: RuntimeManager, lifecycle: str
) -> None:
    # A server hid its refused calls by answering an error (the verdict was empty), and what a
    # listing's isolate, or a kept server since its last call, did was said nowhere.
    reports: list[tuple[str, str, dict[str, Any]]] = []
    server = hostile(
        lifecycle=lifecycle, args=["/mcp/hostile.py", "--ptrace-on-list"], tools={"hide": {"timeout_secs": 3}}
    )
    host = ToolHost(config(bad=server), manager, on_report=lambda *said: reports.append(said))

    async def go() -> None:
        async with host:
            with pytest.raises(ToolError, match="answered error -32602") as hidden:
                await host.call("bad", "hide")
            assert hidden.value.verdict["violation_counts"] == {"ptrace": 2}, hidden.value.verdict
            assert [v["syscall"] for v in hidden.value.verdict["security_violations"]] == ["ptrace", "ptrace"]
            with pytest.raises(ToolError, match="timed out after 3 s") as hung:  # or by hanging past its timeout
                await host.call("bad", "hide", {"then": "sleep"})
            assert hung.value.verdict["violation_counts"] == {"ptrace": 2}, hung.value.verdict
            assert hung.value.verdict["termination_reason"] == "timeout"
            # Or by answering a result that is no tool's (the SDK's check raised past the verdict, which
            # a kept server's next call, maybe another client's, was then charged with).
            with pytest.raises(ToolError, match=r"not a tool's result \(content: .*valid list\)") as malformed:
                await host.call("bad", "hide", {"then": "malformed"})
            assert malformed.value.verdict["violation_counts"] == {"ptrace": 2}, malformed.value.verdict
            assert "\x1b" not in str(malformed.value)
            after = await host.call("bad", "count")
            assert (after.meta or {})["stockade"]["violation_counts"] == {}, after.meta
            assert [t.name for t in await host.list_tools("bad")][:1] == ["snoop"]
            if lifecycle == "ephemeral":  # the listing's own isolate, reported as it ends
                assert _said(reports) == [("bad", "request", {"ptrace": 1})]

    anyio.run(go)
    if lifecycle == "persistent":  # the kept server's, since its last call, reported as it stops
        assert _said(reports) == [("bad", "stop", {"ptrace": 1})]


def _said(reports: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, int]]]:
    return [(server, what, verdict["violation_counts"]) for server, what, verdict in reports]


@pytest.mark.parametrize("runtime", ["gvisor", "microvm"])
def test_a_hostile_server_is_contained_under_the_stronger_runtimes_too(runtime: str) -> None:
    require(runtime)
    manager = RuntimeManager(pool_size=0)
    host = ToolHost(config(bad=hostile(execution_mode=runtime, timeout_secs=180)), manager)

    async def go() -> None:
        async with host:
            snooped = await host.call("bad", "snoop")
            seen = text_of(snooped)
            assert all(v == "No such file or directory" for k, v in seen.items() if k.startswith("/")), seen
            assert not [k for k in seen["environ"] if k.startswith("STOCKADE") or k in ("SSH_AUTH_SOCK", "USER")]
            assert seen["network"] != "connected" and seen["raw"] != "opened" and seen["ptrace"] == -1
            verdict = snooped.meta["stockade"]
            assert verdict["runtime"] == runtime and verdict["violation_counts"].get("ptrace") == 1, verdict
            assert text_of(await host.call("bad", "garbage")) == "after the garbage"
            try:  # a fork bomb: stopped by the isolate's limits, or the end of the isolate; the host goes on
                assert text_of(await host.call("bad", "fork"))["children"] < 1000
            except ToolError as exc:
                assert "ended during the call" in str(exc)
            assert text_of(await host.call("bad", "echo", {"after": "it all"})) == {"after": "it all"}

    try:
        anyio.run(go)
    finally:
        manager.close()


def test_as_many_sessions_at_once_as_anyio_has_threads_all_get_answers(manager: RuntimeManager) -> None:
    # Each session's reader held one of anyio's shared thread tokens for its life: with as many
    # sessions as tokens (40, a gateway or daemon with that many slots), none could write its
    # initialize, and every call failed after its timeout, "blaming" its server. Four tokens here.
    host = ToolHost(config(bad=hostile(timeout_secs=20)), manager)
    answers: list[str] = []

    async def go() -> None:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 4
        async with host, anyio.create_task_group() as calls:
            for _ in range(4):
                calls.start_soon(one)

    async def one() -> None:
        result = await host.call("bad", "echo", {"n": 1})
        answers.append(result.content[0].text)

    anyio.run(go)
    assert answers == ['{"n": 1}'] * 4


def test_a_tool_that_never_answers_is_ended_at_its_timeout(manager: RuntimeManager) -> None:
    host = ToolHost(config(bad=hostile(tools={"sleep": {"timeout_secs": 2}})), manager)
    with pytest.raises(ToolError, match=r"bad.sleep timed out after 2 s; its isolate was killed"):
        call(host, "bad", "sleep")


def test_a_cancelled_call_ends_its_isolate_with_it(manager: RuntimeManager) -> None:
    """A client may cancel a call (MCP's notifications/cancelled, a session ended). The isolate's
    close was not shielded: cancelled, it never ran, so the server lived on past its timeout_secs,
    outside the slot its call gave back (three cancels, three servers, with one slot)."""
    import uuid

    from tests.helpers import processes_with_arg

    tag = f"--tag={uuid.uuid4()}"  # the server's processes, found by their command line
    host = ToolHost(config(bad=hostile(args=["/mcp/hostile.py", tag], tools={"sleep": {"timeout_secs": 600}})), manager)

    async def go() -> None:
        async with host:
            for _ in range(2):
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(host.call, "bad", "sleep")
                        with anyio.fail_after(60):
                            while not processes_with_arg(tag):  # the call is under way, in its isolate
                                await anyio.sleep(0.05)
                        scope.cancel()
                assert not processes_with_arg(tag)  # ended with the call, not at the tool's 600 s

    anyio.run(go)


@pytest.mark.parametrize("lifecycle", ["ephemeral", "persistent"])
def test_a_server_that_never_answers_initialize_is_ended_in_time(manager: RuntimeManager, lifecycle: str) -> None:
    stalled = hostile(lifecycle=lifecycle, timeout_secs=2, args=["/mcp/hostile.py", "--stall", "initialize"])
    host = ToolHost(config(bad=stalled), manager)

    async def go() -> None:
        async with host:
            started = time.monotonic()
            with pytest.raises(ToolError, match=r"bad did not answer initialize in 2 s \(its timeout_secs\)"):
                await host.call("bad", "echo")
            assert time.monotonic() - started < 60  # not the 600 s it once had

    anyio.run(go)


def test_a_message_of_millions_of_values_cuts_its_server_off(manager: RuntimeManager) -> None:
    host = ToolHost(config(bad=hostile(lifecycle="persistent", timeout_secs=60)), manager)

    async def go() -> None:
        async with host:
            with pytest.raises(ToolError, match="bad ended during the call: it wrote a message of more than 1000000"):
                await host.call("bad", "bloat")
            assert text_of(await host.call("bad", "echo", {"a": 1})) == {"a": 1}  # started again

    anyio.run(go)


def test_nothing_a_server_sends_stops_the_host_process(manager: RuntimeManager) -> None:
    """Two messages whose handling once held the GIL for hours, every thread of the process (a
    daemon's other callers) stopped: an unclosed string full of escaped quotes, counted by a pattern
    that rescanned it from each; and a result its own outputSchema's pattern backtracks on."""
    host = ToolHost(config(bad=hostile(lifecycle="persistent", timeout_secs=60)), manager)
    ticks: list[float] = []

    async def go() -> None:
        async with host, anyio.create_task_group() as tasks:

            async def tick() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await anyio.sleep(0.1)

            tasks.start_soon(tick)
            # Not JSON: an unclosed string's rest is counted as values, which cuts it off, in a moment.
            with pytest.raises(ToolError, match="bad ended during the call: it wrote a message of more than 1000000"):
                await host.call("bad", "unclosed")
            redos = await host.call("bad", "redos")  # passed on as the server sent it, unchecked here
            assert redos.structured_content == {"s": "a" * 100 + "b"}
            tasks.cancel_scope.cancel()

    anyio.run(go)
    # Both calls took seconds, the loop ran all along: the old code stopped it for hours.
    assert len(ticks) > 10


def test_a_server_whose_messages_cost_too_much_to_read_is_cut_off(
    manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the byte and message rates, a message's shape sets what it costs this process to parse
    (the GIL held): nested lists, a notification a second, took most of a core. The budget is
    lowered here so that the test does not depend on how fast this host parses."""
    from stockade.mcp import transport

    monkeypatch.setattr(transport, "MAX_PARSE_CPU_PER_S", 0.01)
    monkeypatch.setattr(transport, "MAX_PARSE_CPU_BURST", 0.2)
    host = ToolHost(config(bad=hostile(lifecycle="persistent", timeout_secs=90)), manager)

    async def go() -> None:
        async with host:
            with pytest.raises(ToolError, match="bad ended during the call: its messages took more than 1% of a core"):
                await host.call("bad", "nest")
            assert text_of(await host.call("bad", "echo", {"a": 1})) == {"a": 1}  # started again

    anyio.run(go)


def test_a_server_started_per_call_draws_on_one_read_budget(
    manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a server's messages may cost the host to read is its server's, not its process's: before,
    an ephemeral server (a process per call) brought a fresh burst to every call, so a hostile one
    was given its seconds of the host's CPU again at each. Here the burst holds two calls' results
    and refills at a byte a second: the third call is cut off."""
    from stockade.mcp import transport

    monkeypatch.setattr(transport, "MAX_BYTES_PER_S", 1)
    monkeypatch.setattr(transport, "MAX_BYTES_BURST", 75_000)
    host = ToolHost(config(bad=hostile()), manager)  # ephemeral
    payload = {"a": "a" * 30_000}
    assert text_of(call(host, "bad", "echo", payload)) == payload
    assert text_of(call(host, "bad", "echo", payload)) == payload
    with pytest.raises(ToolError, match="bad ended during the call: it wrote more than 0 MiB a second"):
        call(host, "bad", "echo", payload)
    # A daemon has each of one caller's servers draw on the caller's budget too: a config sent again
    # with the server renamed (another server) brought a fresh burst each time, read by the daemon.
    caller = transport.ReadBudget()  # one server's worth, here
    first = ToolHost(config(bad=hostile()), manager, budget=caller)
    assert text_of(call(first, "bad", "echo", payload)) == payload
    assert text_of(call(first, "bad", "echo", payload)) == payload
    renamed = ToolHost(config(other=hostile()), manager, budget=caller)
    with pytest.raises(ToolError, match=r"other ended during the call: .* \(with its caller's other MCP servers\)"):
        call(renamed, "other", "echo", payload)
    # Below the caller's ceiling, one server's spending does not cut another off.
    roomy = ToolHost(config(a=hostile(), b=hostile()), manager, budget=transport.ReadBudget(scale=4))
    for server in ("a", "a", "b", "b"):
        assert text_of(call(roomy, server, "echo", payload)) == payload


def test_a_server_that_chatters_without_end_is_cut_off_and_its_stderr_cannot_steer_a_terminal(
    manager: RuntimeManager,
) -> None:
    """Each message a server writes is read and parsed by the host process, outside the isolate's
    limits: before, a kept server sending notifications without end took a third of a core of the
    daemon's for as long as it lived. And its stderr, quoted in the error, carried raw escapes."""
    host = ToolHost(config(bad=hostile(lifecycle="persistent", timeout_secs=60)), manager)

    async def go() -> None:
        async with host:
            started = time.monotonic()
            with pytest.raises(ToolError, match="bad ended during the call: it wrote more than 500 messages a second"):
                await host.call("bad", "chatter")
            assert time.monotonic() - started < 30  # its burst and a few seconds, not its minute
            with pytest.raises(ToolError, match="it exited with 4") as ended:
                await host.call("bad", "escape")
            said = str(ended.value)
            assert "\x1b" not in said and "\\x1b[2K |  stockade INFO forged line\\x1b[8m hidden" in said, said
            assert text_of(await host.call("bad", "echo", {"a": 1})) == {"a": 1}  # started again

    anyio.run(go)


@pytest.mark.parametrize("lifecycle", ["ephemeral", "persistent"])
def test_a_servers_environment_values_are_never_quoted_from_its_words(manager: RuntimeManager, lifecycle: str) -> None:
    # Its stderr's last lines, and its error answers, go to the caller, the logs and the audit log:
    # an env value (where most servers take their keys) in them was said as it is.
    key = "s3cr3t-hostile-value"
    server = hostile(lifecycle=lifecycle, env={"HOSTILE_KEY": key, "MODE": "debug"})
    host = ToolHost(config(bad=server), manager)

    async def go() -> None:
        async with host:
            with pytest.raises(ToolError, match="exited with 5") as ended:
                await host.call("bad", "confess")
            assert "token=[REDACTED:HOSTILE_KEY]" in str(ended.value) and key not in str(ended.value)
            with pytest.raises(ToolError, match="answered error -32000") as answered:
                await host.call("bad", "confess", {"how": "error"})
            assert str(answered.value).endswith("bad key [REDACTED:HOSTILE_KEY]"), answered.value
            # -32000 is the server's own error (JSON-RPC's server errors), not a closed connection.
            assert text_of(await host.call("bad", "echo", {"after": 1})) == {"after": 1}

    anyio.run(go)


def test_a_servers_tools_are_read_from_every_page_of_its_listing(manager: RuntimeManager) -> None:
    # Only the first page was read: a server that pages its tools offered the first of them alone.
    paged = ToolHost(config(bad=hostile(args=["/mcp/hostile.py", "--pages", "3"])), manager)
    names = [t.name for t in call_listing(paged)]
    assert len(names) > 9 and names[:3] == ["snoop", "sleep", "garbage"] and "hidden_enum" in names, names
    endless = ToolHost(config(bad=hostile(args=["/mcp/hostile.py", "--pages", "2", "--endless-pages"])), manager)
    assert len(call_listing(endless)) == 2 * 64  # read no further than 64 pages


def call_listing(host: ToolHost) -> list[Any]:
    async def go() -> list[Any]:
        return await host.list_tools("bad")

    return anyio.run(go)


def test_a_flooding_server_is_cut_off(manager: RuntimeManager) -> None:
    host = ToolHost(config(bad=hostile(lifecycle="persistent", timeout_secs=60)), manager)

    async def go() -> None:
        async with host:
            with pytest.raises(ToolError, match="bad ended during the call: it wrote more than"):
                await host.call("bad", "flood")
            assert text_of(await host.call("bad", "echo", {"a": 1})) == {"a": 1}  # started again

    anyio.run(go)


def test_a_fetch_server_reaches_its_allowed_host_through_the_proxy_and_nothing_else(manager: RuntimeManager) -> None:
    from tests.egress_harness import SECRET_VALUE, serve_upstreams

    upstreams = serve_upstreams()
    up = next(upstreams)
    try:
        allowed = f"api.stockade.test:{up.http.port}"
        # The test's server is on the host's loopback: the fetch server's own SSRF guard must let it by,
        # and the proxy's allow-list name it.
        args = ["--ignore-robots-txt", "--allow-private-ips"]
        fetch = {"command": "mcp-server-fetch", "args": args, "packages": [FETCH_PACKAGE], "allowed_hosts": [allowed],
                 "allowed_cidrs": ["127.0.0.0/8"], "expose": "all", "timeout_secs": 120}  # fmt: skip
        host = ToolHost(config(fetch=fetch), manager)
        got = call(host, "fetch", "fetch", {"url": f"http://{allowed}/through-the-proxy", "raw": True})
        assert not got.is_error and "/through-the-proxy" in got.content[0].text, got.content[0].text
        (request,) = got.meta["stockade"]["egress_requests"]
        assert request["host"] == "api.stockade.test" and request["allowed"] and request["status"] == 200
        # A host the server's secret is bound to that sends the value back: the server reads the handle.
        bound = ToolHost(config(fetch={**fetch, "secrets": [f"API_KEY@{allowed}"]}), manager)
        leaked = call(bound, "fetch", "fetch", {"url": f"http://{allowed}/leak", "raw": True})
        assert not leaked.is_error and "the key is stockade-secret-" in leaked.content[0].text, leaked.content[0].text
        assert SECRET_VALUE not in leaked.model_dump_json()
        refused = call(host, "fetch", "fetch", {"url": f"http://other.stockade.test:{up.http.port}/", "raw": True})
        assert refused.is_error and "403" in refused.content[0].text
        verdict = refused.meta["stockade"]
        assert verdict["violation_counts"].get("network_egress", 0) >= 1
        assert all(not r["allowed"] for r in verdict["egress_requests"])
    finally:
        upstreams.close()


# ---- the config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"mcp_servers": {"s": {"command": "x", "tools": {"t": {"memroy_mb": 5}}}}},
         r"mcp_servers\.s\.tools\.t\.memroy_mb: Extra inputs are not permitted"),
        ({"mcp_servers": {"s": {"command": "x", "tools": {"t": {"memory_mb": -5}}}}},
         r"mcp_servers\.s\.tools\.t\.memory_mb: Input should be greater than or equal to 16"),
        ({"mcp_servers": {"s": {"command": "x", "tools": {"t": {"execution_mode": "unikernel"}}}}},
         r"mcp_servers\.s\.tools\.t\.execution_mode: execution_mode 'unikernel' is not offered here: stockade has "
         r"no unikernel runtime"),
        ({"mcp_servers": {"s": {"command": "x", "lifecycle": "persistent", "tools": {"t": {"memory_mb": 64}}}}},
         r"mcp_servers\.s: tools\.t\.memory_mb: the tools of a persistent server share its isolate"),
        ({"mcp_servers": {"s": {"command": "x", "lifecycle": "persistent", "tools": {"t": {"env_vars": {"A": "b"}}}}}},
         r"mcp_servers\.s: tools\.t\.env_vars: the tools of a persistent server share its isolate"),
        ({"mcp_servers": {"s": {"command": "x", "network_enabled": True}}},
         r"mcp_servers\.s\.network_enabled: name the hosts it may reach"),
        ({"mcp_servers": {"s": {"command": "x", "mounts": [{"host_path": "/proc", "guest_path": "/p"}]}}},
         r"mcp_servers\.s\.mounts\.0: source /proc may not be shared into a sandbox"),
        ({"mcp_servers": {"s": {"command": "x", "secrets": ["NOPE"]}}}, r"mcp_servers\.s\.secrets"),
        ({"mcp_servers": {"s": {"command": "x", "allowed_hosts": ["bad host"]}}},
         r"mcp_servers\.s: allowed host 'bad host' is not a host name"),
        ({"default_execution_mode": "vm"}, r"default_execution_mode: Input should be"),
        ({"mcp_servers": {"git.hub": {"command": "x"}}}, r"mcp_servers: .*'git\.hub' is not a server id"),
        # Each tool's policy is made as the config is read (a daemon's caller's, on its event loop).
        ({"mcp_servers": {f"s{i}": {"command": "x"} for i in range(65)}},
         r"mcp_servers: Dictionary should have at most 64 items"),
        ({"mcp_servers": {f"s{i}": {"command": "x", "tools": {f"t{j}": {} for j in range(300)}} for i in range(4)}},
         r"mcp_servers: 1200 tools are listed, more than 1024 in all"),
        # Each list and map refused by its count, before its items: two million wrong args held a
        # daemon's loop for 15 s while each was said.
        ({"mcp_servers": {"s": {"command": "x", "args": [0] * 20_000}}},
         r"mcp_servers\.s\.args: List should have at most 16384 items, not 20000$"),
        ({"mcp_servers": {"s": {"command": "x", "env": {str(i): 0 for i in range(5000)}}}},
         r"mcp_servers\.s\.env: Dictionary should have at most 4096 items"),
        ({"mcp_servers": {"s": {"command": "x", "mounts": [0] * 1000}}},
         r"mcp_servers\.s\.mounts: List should have at most 256 items"),
        ({"mcp_servers": {"s": {"command": "x", "allowed_hosts": [0] * 1000}}},
         r"mcp_servers\.s\.allowed_hosts: List should have at most 256 items"),
        ({"mcp_servers": {str(i): 0 for i in range(1000)}}, r"mcp_servers: Dictionary should have at most 64 items"),
        # And all of them together, before anything is checked: lists each within its bound, 30 servers'
        # worth of 1024 tools of 256 wrong mounts, took 65 s and 13 GB.
        ({"mcp_servers": {f"s{i}": {"command": "x", "tools": {f"t{j}": {"mounts": [0] * 256} for j in range(100)}}
                          for i in range(5)}},
         r"^isolation_config\.json: the config holds more than 100000 values in its lists and maps"),
    ],
)  # fmt: skip
def test_a_bad_config_is_refused_naming_the_path(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        IsolationConfig.parse(data, "isolation_config.json")


def test_direct_is_honoured_only_when_the_config_says_so() -> None:
    said = IsolationConfig.parse({"default_execution_mode": "direct", "mcp_servers": {"s": {"command": "x"}}})
    assert said.policy_for("s", "t") is None
    server = {"command": "x", "memory_mb": 96, "vcpus": 0.5, "env_vars": {"A": "1"}, "env": {"A": "0", "B": "2"}}
    unsaid = IsolationConfig.parse({"mcp_servers": {"s": server}})
    policy = unsaid.policy_for("s", "t")
    assert policy is not None and policy.runtime == "process" and policy.network_policy == "none"
    assert policy.memory_mb == 96 and policy.cpu_limit == 0.5 and policy.environment == {"A": "1", "B": "2"}
    strongest = IsolationConfig.parse({"mcp_servers": {"s": {"command": "x", "execution_mode": "isolated"}}})
    assert strongest.policy_for("s", None).trust == "trusted"  # type: ignore[union-attr]


def test_isolated_runs_on_the_strongest_runtime_that_works_here(manager: RuntimeManager) -> None:
    """A trust picks its own level now (trusted: process); MCP's "isolated" still means the
    strongest runtime this host runs."""
    config = IsolationConfig.parse({"mcp_servers": {"s": {"command": "x", "execution_mode": "isolated"}}})
    policy = config.policy_for("s", None)
    assert policy is not None
    placed = ToolHost(config, manager)._placed(policy)
    working = {a.name for a in manager.doctor() if a.available}
    best = next(name for name in ("microvm", "gvisor", "process") if name in working)
    assert (placed.runtime, placed.trust) == (best, None)


def test_the_config_is_found_where_settings_say(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=f"no MCP isolation config at {tmp_path}/isolation_config.json"):
        load_config()
    (tmp_path / "isolation_config.json").write_text('{"mcp_servers": {"s": {"command": "x"}}}')
    assert load_config().server("s").command == "x"
    (tmp_path / "isolation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config()


def test_through_the_daemon_a_persistent_server_outlives_each_call_tool(tmp_path: Any) -> None:
    require("process")
    from tests.daemon_harness import start_daemon

    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps({"mcp_servers": {"bad": hostile(lifecycle="persistent")}}))
    daemon = start_daemon(env={"STOCKADE_POOL_SIZE": "0"})
    try:

        def call_tool(tool: str) -> subprocess.CompletedProcess[str]:
            argv = [STOCKADE, "mcp", "call-tool", "--config", str(path), "--socket", daemon.socket_path,
                    "--require-daemon", "--json", "bad", tool, "{}"]  # fmt: skip
            return subprocess.run(argv, capture_output=True, text=True, timeout=300)

        counts = [json.loads(json.loads(call_tool("count").stdout)["content"][0]["text"]) for _ in range(3)]
        assert counts == [1, 2, 3]  # one server, kept by the daemon across three processes
        hid = call_tool("hide")  # its refused calls, then an error: they are in the call's record all the same
        assert hid.returncode == 125 and "answered error -32602" in hid.stderr, hid.stderr
        died = call_tool("die")
        assert died.returncode == 125 and "bad ended during the call" in died.stderr and "exited with 3" in died.stderr
        again = json.loads(call_tool("count").stdout)
        assert json.loads(again["content"][0]["text"]) == 1 and again["_meta"]["stockade"]["isolate"] == "persistent"
        # A caller's config cannot have the daemon run its command outside an isolate.
        marker = tmp_path / "ran-on-the-host"
        direct = {
            "default_execution_mode": "direct",
            "mcp_servers": {"bad": {"command": "touch", "args": [str(marker)]}},
        }
        path.write_text(json.dumps(direct))
        refused = call_tool("anything")
        assert refused.returncode == 125 and "execution_mode 'direct' runs no isolate" in refused.stderr
        assert not marker.exists()
        # Each call the daemon made is one audit record: no arguments, no result.
        audit = os.path.join(os.path.dirname(daemon.socket_path), "audit.log")
        deadline = time.monotonic() + 10
        while True:
            with open(audit) as f:
                records = [json.loads(line) for line in f if '"mcp.call"' in line]
            if len(records) >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        expected = [("count", "ok")] * 3 + [("hide", "error"), ("die", "error"), ("count", "ok")]
        assert [(r["tool"], r["outcome"]) for r in records] == expected
        assert records[3]["violations"] == {"ptrace": 2}, records[3]
        assert records[0]["server"] == "bad" and records[0]["runtime"] == "process" and records[0]["door"] == "unix"
    finally:
        assert daemon.stop() == 0, daemon.logs()
        daemon.cleanup()


def test_a_daemons_mcp_call_ends_with_its_caller(tmp_path: Any) -> None:
    require("process")
    import socket
    import uuid

    from stockade.client import Client
    from tests.daemon_harness import start_daemon
    from tests.helpers import processes_with_arg

    tag = f"--tag={uuid.uuid4()}"  # its server's processes, found by their command line
    server = hostile(args=["/mcp/hostile.py", tag], tools={"sleep": {"timeout_secs": 600}})
    env = {"STOCKADE_POOL_SIZE": "0", "STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_TIMEOUT": "60"}
    daemon = start_daemon(env=env)
    try:
        call = {"method": "mcp.call_tool", "params": {"config": {"mcp_servers": {"bad": server}}, "server": "bad",
                "tool": "sleep"}, "id": 1}  # fmt: skip
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(daemon.socket_path)
            conn.sendall(json.dumps(call).encode() + b"\n")
            deadline = time.monotonic() + 60
            while not processes_with_arg(tag):  # the call is under way, in its isolate
                assert time.monotonic() < deadline, daemon.logs()
                time.sleep(0.05)
        # Its caller gone, the call is ended with its isolate: the daemon's one slot comes back.
        started = time.monotonic()
        with Client(daemon.socket_path, timeout=120) as client:
            assert client.execute(code="print(1)").stdout == "1\n"
        assert time.monotonic() - started < 60 and not processes_with_arg(tag)  # not the tool's 600 s
        with open(daemon.audit_log) as f:  # and the call is in the log, as ended by its caller
            calls = [json.loads(line) for line in f if '"mcp.call"' in line]
        said = [(r["tool"], r["outcome"], r["error"]) for r in calls]
        assert said == [("sleep", "cancelled", "its caller went away")]
    finally:
        assert daemon.stop() == 0, daemon.logs()
        daemon.cleanup()


def test_the_daemons_mcp_isolates_take_its_slots(tmp_path: Any) -> None:
    require("process")
    from stockade.client import Client
    from stockade.errors import DaemonBusyError
    from tests.daemon_harness import start_daemon

    path = tmp_path / "isolation_config.json"
    path.write_text(json.dumps({"mcp_servers": {"bad": hostile(lifecycle="persistent")}}))
    daemon = start_daemon(env={"STOCKADE_POOL_SIZE": "0", "STOCKADE_MAX_SANDBOXES": "1", "STOCKADE_QUEUE_TIMEOUT": "1"})
    try:
        argv = [STOCKADE, "mcp", "call-tool", "--config", str(path), "--socket", daemon.socket_path, "bad", "count"]
        assert subprocess.run(argv, capture_output=True, text=True, timeout=300).returncode == 0
        with Client(daemon.socket_path) as client:
            with pytest.raises(DaemonBusyError, match="no sandbox slot"):
                client.execute(code="print(1)")  # the kept server holds the daemon's only slot
            # ...and status says so (found by a new user: a kept server was in no status or metric).
            status = client.status()
            (kept,) = status["active_sandboxes"]
            assert (kept["kind"], kept["mcp_server"], kept["runtime"], status["total_count"]) == (
                "mcp",
                "bad",
                "process",
                1,
            )
    finally:
        assert daemon.stop() == 0, daemon.logs()
        daemon.cleanup()
