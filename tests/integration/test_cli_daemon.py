"""``stockade run``/``exec-code`` through a daemon: the lean path (cli_daemon.py), and what
happens when no daemon answers.

The lean path reads the run's flags from a table instead of the Policy model, and
builds the daemon's request with the standard library: these tests hold it to the
model (the same flags, the same request), to the in-process run (the same output,
exit status and messages), and to its point, that it imports no pydantic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade import cli_daemon
from stockade.cli import _build_policy, _flag_type, build_parser
from tests.daemon_harness import TOKEN, Daemon, start_daemon
from tests.helpers import full_backlog, make_room_and_read, wait_in_connect

STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")


def cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with no STOCKADE_* setting but ``env``'s."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    full_env.update(env or {})
    return subprocess.run([STOCKADE, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon()
    yield d
    assert d.stop() == 0, d.logs()


def _logged(daemon: Daemon, text: str, timeout: float = 10) -> bool:
    """Whether the daemon's log says ``text`` (a request's line comes a moment after its answer)."""
    deadline = time.monotonic() + timeout
    while text not in daemon.logs():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def dead_socket(tmp_path: Path) -> str:
    """A socket file nobody listens on (a daemon that died): connecting is refused."""
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
    return path


# ---- the lean path's flags and request are the model's --------------------------------------


def test_the_lean_flags_are_the_models() -> None:
    from stockade.policy import CLI_FLAGS, Policy

    derived = []
    for field in dataclasses.fields(Policy):
        name = field.name
        flag = CLI_FLAGS.get(name, ("--" + name.replace("_", "-"), None))[0]
        kind, choices, repeated = _flag_type(field.type)
        derived.append((name, flag, kind, tuple(choices) if choices else None, repeated))
    rows = "\n".join(f"    ({n!r}, {f!r}, {k.__name__}, {c!r}, {r})," for n, f, k, c, r in derived)
    assert list(cli_daemon.FLAGS) == derived, f"cli_daemon.FLAGS must read, as the model's flags do:\n{rows}"
    assert Policy().timeout_seconds == cli_daemon.DEFAULT_TIMEOUT_S


@pytest.mark.parametrize("command", ["run", "exec-code"])
def test_the_lean_parser_knows_every_option_of_the_full_one(command: str) -> None:
    # A flag added to the full parser and not to cli_daemon would send every run that
    # uses it down argparse's path: correct, but slow. Keep the two in step.
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "cmd").choices[command]  # type: ignore[index]
    full = {s for a in sub._actions for s in a.option_strings} - {"-h", "--help", "-f"}
    lean = {f[1] for f in cli_daemon.FLAGS} | set(cli_daemon._COMMON)
    if command == "exec-code":
        lean |= set(cli_daemon._EXEC_CODE)
    assert full == lean


PARSED = [
    ["run", "--", "echo", "hi"],
    ["run", "echo", "--json", "--memory", "64"],  # after the command: the command's
    ["run", "--memory", "64", "--env", "A=1", "--env=B=x=y", "--mount", "/srv:/data:rw", "--json", "--", "sh"],
    ["run", "--timeout=1.5", "--cpu", "0.5", "--network", "loopback", "--isolation", "process", "--trust",
     "untrusted", "--runtime", "fake", "--pids", "8", "--max-output", "10", "--max-file-size", "1",
     "--cpu-time", "2", "--address-space", "256", "--max-open-files", "32", "--disk", "8", "--on-violation",
     "kill", "--max-violations", "3", "--policy-file", "/p.json", "--socket", "/s", "--token-file", "/t",
     "--require-daemon", "true"],
    ["run", "--memory", "64", "--memory", "128", "--runtime=", "--", "--", "x"],
    ["run"],
    ["run", "--json"],
    ["exec-code", "print(1)"],
    ["exec-code", "print(1)", "--json", "--language", "bash", "--cpu", "1e-1"],
    ["exec-code", "-f", "x.py", "--memory", "64", "--socket=/s"],
    ["exec-code", "--file=x.py", "--language=python"],
    ["exec-code", "-", "--require-daemon"],
    ["exec-code"],
]  # fmt: skip


@pytest.mark.parametrize("argv", PARSED, ids=" ".join)
def test_the_lean_parser_reads_what_argparse_reads(argv: list[str]) -> None:
    full = vars(build_parser(argv[0]).parse_args(argv))
    lean = cli_daemon.parse(argv)
    assert lean is not None
    assert {k: getattr(lean, k) for k in full if k not in ("cmd", "func", "version")} == {
        k: v for k, v in full.items() if k not in ("cmd", "func", "version")
    }


UNUSUAL = [
    ["run", "--help"],
    ["run", "-h"],
    ["run", "--mem", "64", "--", "true"],  # no abbreviations
    ["run", "--memory", "lots", "--", "true"],
    ["run", "--memory"],
    ["run", "--network", "wifi", "--", "true"],
    ["run", "--env", "-x", "--", "true"],
    ["run", "--timeout", "-1", "--", "true"],
    ["run", "--json=yes", "--", "true"],
    ["run", "-f", "x.py", "--", "true"],
    ["exec-code", "a", "b"],
    ["exec-code", "--", "print(1)"],
    ["exec-code", "-fx.py"],
    ["exec-code", "--language", "perl", "1"],
]


@pytest.mark.parametrize("argv", UNUSUAL, ids=" ".join)
def test_the_lean_parser_leaves_anything_unusual_to_argparse(argv: list[str]) -> None:
    assert cli_daemon.parse(argv) is None


def test_a_flag_missing_from_the_table_is_read_by_argparse_and_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = tuple(f for f in cli_daemon.FLAGS if f[0] != "cpu_time_seconds")
    monkeypatch.setattr(cli_daemon, "FLAGS", flags)
    monkeypatch.setattr(cli_daemon, "POLICY_FIELDS", tuple(f[0] for f in flags))
    argv = ["run", "--cpu-time", "2", "--memory", "64", "--", "true"]
    assert cli_daemon.parse(argv) is None
    args = build_parser("run").parse_args(argv)
    assert cli_daemon.policy_fields(args) == {"cpu_time_seconds": 2, "memory_mb": 64}


def test_an_unusual_command_line_still_goes_through_the_daemon(daemon: Daemon) -> None:
    r = cli("run", "--timeout", "-1", "--", "true", env={"STOCKADE_SOCKET": daemon.socket_path})
    assert r.returncode == 125 and "--timeout (timeout_seconds): Input should be greater than 0" in r.stderr
    r = cli("run", "--max-violations", "-0", "--", "echo", "hi", env={"STOCKADE_SOCKET": daemon.socket_path})
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")
    assert _logged(daemon, "execute ok"), daemon.logs()


REQUESTS = [
    ["run", "--", "echo", "hi"],
    ["run", "--memory", "64", "--timeout", "5", "--env", "A=1", "--mount", "/srv", "--mount", "/opt:/o:rw",
     "--network", "loopback", "--max-violations", "0", "--cpu-time", "3", "--", "sh", "-c", "x"],
    ["run", "--policy-file", "{policy_file}", "--env", "B=2", "--mount", "/opt", "--cpu", "0.5", "--", "true"],
    ["exec-code", "--language", "bash", "--pids", "16", "echo hi"],
    ["exec-code", "print(1)"],
]  # fmt: skip


def _sent_by_the_client(**execute: Any) -> dict[str, Any]:
    """The request line ``Client.execute(**execute)`` sends, caught by a socket that
    answers it with an error."""
    from stockade.client import Client
    from stockade.errors import StockadeError

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "catch.sock")
        lines: list[bytes] = []
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen(1)

            def catch() -> None:
                conn, _ = server.accept()
                with conn, conn.makefile("rb") as f:
                    lines.append(f.readline())
                    answer = {"id": json.loads(lines[0])["id"], "result": None, "error": "caught", "error_code": "x"}
                    conn.sendall(json.dumps(answer).encode() + b"\n")

            catcher = threading.Thread(target=catch)
            catcher.start()
            try:
                with Client(path) as client, pytest.raises(StockadeError, match="caught"):
                    client.execute(**execute)
            finally:
                catcher.join(10)
    request: dict[str, Any] = json.loads(lines[0])
    return request


@pytest.mark.parametrize("argv", REQUESTS, ids=" ".join)
@pytest.mark.parametrize("streamed", [True, False])
def test_the_lean_request_is_the_clients(argv: list[str], streamed: bool, tmp_path: Path) -> None:
    from stockade.protocol.models import ExecuteRequest, parse

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"memory_mb": 128, "environment": {"A": "1"}, "filesystem_access": ["/srv"]}))
    argv = [a.format(policy_file=policy_file) for a in argv]
    args = cli_daemon.parse(argv)
    assert args is not None
    stdin = b"some\x00bytes"
    execute: dict[str, Any] = {"policy": _build_policy(args), "stdin": stdin}
    if streamed:
        execute["on_output"] = lambda stream, data: None
    payload: Any
    if argv[0] == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        call, payload, execute["command"] = "exec", command, command
    else:
        call, payload = "run_code", (args.language, args.code)
        execute.update(code=args.code, language=args.language)
    ours = cli_daemon._request(call, payload, stdin, cli_daemon.policy_fields(args), streamed)
    theirs = _sent_by_the_client(**execute)
    assert (ours["method"], ours["params"].get("stream")) == (theirs["method"], theirs["params"].get("stream"))
    mine, clients = parse(ExecuteRequest, ours["params"], "lean"), parse(ExecuteRequest, theirs["params"], "client")
    assert mine == clients
    assert mine.stdin_bytes() == clients.stdin_bytes() == stdin
    assert mine.policy.digest == clients.policy.digest


# ---- through a live daemon, as in-process ---------------------------------------------------

SAME_AS_IN_PROCESS: list[tuple[list[str], str | None]] = [
    (["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], None),
    (["run", "--", "tr", "a-z", "A-Z"], "shout\n"),
    (["run", "--env", "A=1", "--network", "loopback", "--", "sh", "-c", "echo $A; grep -c lo /proc/net/dev"], None),
    (["run", "--timeout", "0.5", "--", "sleep", "10"], None),
    (["run", "--", "sh", "-c", "kill -9 $$"], None),
    (["run", "--", "python3", "-c", "import ctypes; ctypes.CDLL(None).ptrace(16, 1, 0, 0)"], None),
    (["run", "--", "/no/such/program"], None),
    (["run", "--memory", "99999", "--cpu", "9", "--", "true"], None),
    (["run", "--mount", "/proc:/x", "--", "true"], None),
    (["run", "--runtime", "warp", "--", "true"], None),
    (["run", "--env", "NOEQUALS", "--", "true"], None),
    (["run"], None),
    (["exec-code", "print(6 * 7)"], None),
    (["exec-code", "-"], "print('code from stdin')"),
    (["exec-code", "--language", "bash", "echo $((6 * 7)); exit 4"], None),
    (["exec-code"], None),
]


@pytest.mark.parametrize(("argv", "stdin"), SAME_AS_IN_PROCESS, ids=[" ".join(c[0]) for c in SAME_AS_IN_PROCESS])
def test_through_the_daemon_as_in_process(daemon: Daemon, argv: list[str], stdin: str | None) -> None:
    here = cli(*argv, stdin=stdin)
    there = cli(*argv, stdin=stdin, env={"STOCKADE_SOCKET": daemon.socket_path})
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)


def test_json_through_the_daemon_is_the_same_exec_result(daemon: Daemon, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"memyro_mb": 64}))
    argv = ["run", "--json", "--memory", "128", "--env", "A=hi", "--", "sh", "-c", "echo $A; exit 2"]
    here = cli(*argv)
    there = cli(*argv, env={"STOCKADE_SOCKET": daemon.socket_path})
    assert (there.returncode, there.stderr) == (here.returncode, here.stderr) == (2, "")
    ours, theirs = json.loads(there.stdout), json.loads(here.stdout)
    assert list(ours) == list(theirs)  # the same ExecResult, field for field
    same = ("stdout", "exit_code", "termination_reason", "runtime_used", "policy_digest", "security_violations")
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    # A policy the daemon refuses is worded as here: the flag or field, and the nearest name.
    here = cli("run", "--policy-file", str(policy_file), "--", "true")
    there = cli("run", "--policy-file", str(policy_file), "--", "true", env={"STOCKADE_SOCKET": daemon.socket_path})
    assert (there.returncode, there.stderr) == (here.returncode, here.stderr) == (125, here.stderr)
    assert "did you mean memory_mb?" in there.stderr


def test_with_a_token_the_request_is_signed(process_runtime: str, tmp_path: Path) -> None:
    d = start_daemon({"STOCKADE_AUTH_TOKEN": TOKEN})
    try:
        r = cli("run", "--", "echo", "signed", env={"STOCKADE_SOCKET": d.socket_path, "STOCKADE_AUTH_TOKEN": TOKEN})
        assert (r.returncode, r.stdout, r.stderr) == (0, "signed\n", "")
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        r = cli("exec-code", "--socket", d.socket_path, "--token-file", str(token_file), "print(1)")
        assert (r.returncode, r.stdout) == (0, "1\n")
        # A daemon that answers and refuses is no reason to run in-process.
        r = cli("run", "--", "echo", "unsigned", env={"STOCKADE_SOCKET": d.socket_path})
        assert (r.returncode, r.stdout) == (125, "")
        assert r.stderr == (
            "stockade: Authentication failed: the daemon requires signed requests: give its token "
            "(--token-file FILE, STOCKADE_AUTH_TOKEN, or Client(token_file=...))\n"
        )
    finally:
        assert d.stop() == 0, d.logs()


# ---- no daemon there ------------------------------------------------------------------------


def test_no_daemon_on_stockade_socket_says_so_and_runs_in_process(dead_socket: str, tmp_path: Path) -> None:
    r = cli("run", "--", "sh", "-c", "echo hi; exit 5", env={"STOCKADE_SOCKET": dead_socket})
    assert (r.returncode, r.stdout) == (5, "hi\n")
    assert r.stderr == f"stockade: no daemon answers on {dead_socket} (Connection refused); running in-process\n"
    missing = str(tmp_path / "missing.sock")
    # Code read from standard input is read once, by the run that happens.
    r = cli("exec-code", "-", stdin="print('from stdin')", env={"STOCKADE_SOCKET": missing})
    assert (r.returncode, r.stdout) == (0, "from stdin\n")
    assert r.stderr == f"stockade: no daemon answers on {missing} (No such file or directory); running in-process\n"
    r = cli("run", "--json", "--", "tr", "a-z", "A-Z", stdin="shout", env={"STOCKADE_SOCKET": missing})
    assert json.loads(r.stdout)["stdout"] == "SHOUT" and r.returncode == 0


def test_require_daemon_refuses_to_run_in_process(dead_socket: str) -> None:
    r = cli("run", "--require-daemon", "--", "echo", "ran", env={"STOCKADE_SOCKET": dead_socket})
    assert (r.returncode, r.stdout) == (125, "")
    assert r.stderr == (
        f"stockade: cannot reach the stockade daemon at {dead_socket}: Connection refused "
        "(--require-daemon: not running in-process)\n"
    )
    # --socket names the daemon to use: it is required too.
    r = cli("exec-code", "--socket", dead_socket, "print('ran')")
    assert (r.returncode, r.stdout) == (125, "")
    assert r.stderr.endswith("Connection refused (--socket: not running in-process)\n")
    # With --json, the code of a daemon out of reach, as an error answer names it (not "error").
    r = cli("run", "--json", "--socket", dead_socket, "--", "echo", "ran")
    assert r.returncode == 125 and json.loads(r.stdout)["code"] == "unavailable", r


def test_require_daemon_alone_uses_the_default_socket() -> None:
    from stockade.paths import default_socket_path

    default = default_socket_path()
    if os.path.exists(default):
        pytest.skip(f"a daemon may listen on {default}")
    r = cli("run", "--require-daemon", "--", "echo", "ran")
    assert (r.returncode, r.stdout) == (125, "")
    assert r.stderr.startswith(f"stockade: cannot reach the stockade daemon at {default}: ")


def test_require_daemon_with_a_daemon_runs_there(daemon: Daemon) -> None:
    r = cli("run", "--require-daemon", "--", "echo", "there", env={"STOCKADE_SOCKET": daemon.socket_path})
    assert (r.returncode, r.stdout, r.stderr) == (0, "there\n", "")


def test_a_run_the_daemon_took_is_not_run_again_here(process_runtime: str) -> None:
    d = start_daemon()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env["STOCKADE_SOCKET"] = d.socket_path
    proc = subprocess.Popen(
        [STOCKADE, "run", "--", "sh", "-c", "echo started; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"  # streamed while it runs
        d.stop(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out) == (125, "")
    assert err.startswith("stockade: lost the connection to the stockade daemon") and "in-process" not in err


# ---- what the lean path costs ----------------------------------------------------------------

# Runs the CLI as its program does (main() reads sys.argv), then lists the modules it loaded.
PROBE = """
import os, sys
from stockade.cli import main
try:
    status = main()
finally:
    with open(os.environ["PROBE_OUT"], "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
sys.exit(status)
"""
HEAVY = ("pydantic", "pydantic_core", "stockade.policy", "stockade.client", "stockade.result", "stockade.sdk",
         "stockade.sdk_async", "stockade.runtimes", "stockade.protocol.models", "asyncio", "argparse")  # fmt: skip


def _heavy(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY))}


def _modules_loaded(args: list[str], env: dict[str, str], tmp_path: Path, stdin: str | None = None) -> Any:
    out = tmp_path / "modules"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    full_env.update(env, PROBE_OUT=str(out))
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], input=stdin, capture_output=True, text=True, env=full_env, timeout=60
    )
    return r, set(out.read_text().split())


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["run", "--memory", "64", "--env", "A=1", "--", "sh", "-c", "echo $A; cat"], "in"),
        (["exec-code", "--language", "bash", "echo 1"], None),
    ],
)
def test_the_daemon_path_imports_no_pydantic(
    daemon: Daemon, args: list[str], stdin: str | None, tmp_path: Path
) -> None:
    r, loaded = _modules_loaded(args, {"STOCKADE_SOCKET": daemon.socket_path}, tmp_path, stdin)
    assert r.returncode == 0 and r.stdout in ("1\nin", "1\n"), r.stderr
    assert "stockade.cli_daemon" in loaded
    assert not _heavy(loaded)


def test_the_daemon_path_imports_no_pydantic_when_signing(process_runtime: str, tmp_path: Path) -> None:
    d = start_daemon({"STOCKADE_AUTH_TOKEN": TOKEN})
    try:
        env = {"STOCKADE_SOCKET": d.socket_path, "STOCKADE_AUTH_TOKEN": TOKEN}
        r, loaded = _modules_loaded(["run", "--", "echo", "hi"], env, tmp_path)
        assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
        assert "stockade.protocol.auth" in loaded and not _heavy(loaded)
    finally:
        assert d.stop() == 0, d.logs()


@pytest.mark.parametrize(
    "args", [["run", "--json", "--memory", "64", "--", "echo", "hi"], ["exec-code", "print('hi')"]]
)
def test_a_run_in_the_cli_s_own_process_imports_no_pydantic(
    process_runtime: str, args: list[str], tmp_path: Path
) -> None:
    # The Policy, the settings, the runtime and the result are the standard library's
    # dataclasses and code: pydantic (~100 ms of imports) is for the daemon's doors.
    r, loaded = _modules_loaded(args, {}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["stdout"] if "--json" in args else r.stdout) in ("hi\n", "1\n")
    assert {"stockade.policy", "stockade.result", "stockade.settings", "stockade.runtimes.process.runtime"} <= loaded
    assert not {m for m in loaded if m.split(".")[0] in ("pydantic", "pydantic_core", "pydantic_settings")}


def test_json_and_summaries_load_the_result_model_only_then(daemon: Daemon, tmp_path: Path) -> None:
    env = {"STOCKADE_SOCKET": daemon.socket_path}
    r, loaded = _modules_loaded(["run", "--json", "--", "echo", "hi"], env, tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["stdout"] == "hi\n"
    assert "stockade.result" in loaded and "stockade.runtimes" not in loaded and "stockade.client" not in loaded


@pytest.mark.parametrize("through_daemon", [False, True])
def test_with_json_a_failure_is_a_json_object_on_stdout_too(daemon: Daemon, through_daemon: bool) -> None:
    env = {"STOCKADE_SOCKET": daemon.socket_path} if through_daemon else None
    for argv, code, said in (
        (["--", "no-such-program-here"], "path_not_found", "cannot execute 'no-such-program-here'"),
        (["--memory", "99999", "--", "true"], "policy", "--memory (memory_mb)"),
        # A problem of two fields together names both flags (it named the Policy's fields only).
        (["--allow-host", "api.example.com", "--", "true"], "policy",
         "--allow-host (allowed_hosts) needs --network (network_policy) 'allowlist'"),
        # A field's name inside a host is the host's: left as it is.
        (["--network", "allowlist", "--allow-host", "https://secrets.example.com/x", "--", "true"], "policy",
         "allowed host 'https://secrets.example.com/x': give a host name ('secrets.example.com'), not a URL"),
        (["--network", "allowlist", "--allow-host", "10.0.0.0/8", "--", "true"], "policy",
         "'10.0.0.0/8' is a network: give it in --allow-cidr (allowed_cidrs)"),
    ):  # fmt: skip
        r = cli("run", "--json", *argv, env=env)
        failure = json.loads(r.stdout)
        assert r.returncode == 125 and failure["code"] == code and said in failure["error"], r
        assert r.stderr == f"stockade: {failure['error']}\n"  # and said on stderr, as without --json


def test_with_json_the_other_commands_failures_are_json_on_stdout_too(tmp_path: Path) -> None:
    gone = str(tmp_path / "no-daemon.sock")
    config = tmp_path / "isolation_config.json"
    config.write_text("{}")
    for argv in (
        ["secrets", "ls", "--json", "--socket", gone],
        ["mcp", "call-tool", "--json", "--config", str(config), "nowhere", "tool", "{}"],
    ):
        r = cli(*argv)
        failure = json.loads(r.stdout)
        assert r.returncode == 125 and failure["error"] and failure["code"], (argv, r)
        assert r.stderr.endswith(f"stockade: {failure['error']}\n"), (argv, r)


def test_an_allowed_request_that_failed_upstream_is_said_through_the_daemon_too(process_runtime: str) -> None:
    from tests.integration.test_cli import closed_port, reach_closed_port

    daemon = start_daemon({"STOCKADE_EGRESS_NETWORKS": "127.0.0.0/8"})
    try:
        port = closed_port()
        r = cli("run", *reach_closed_port(port), env={"STOCKADE_SOCKET": daemon.socket_path})
        assert r.returncode == 0 and r.stdout == "502\n", r.stderr
        assert f"1 allowed request(s) failed (first: localhost:{port}: " in r.stderr
    finally:
        assert daemon.stop() == 0


def test_a_daemon_whose_backlog_is_full_is_waited_for_not_run_around(tmp_path: Path) -> None:
    """Anyone who may connect can keep the daemon's listen backlog full. A connect that failed at
    once on it (EAGAIN) was taken for "no daemon", and the command ran in-process, outside the
    daemon's limits and audit log; now the connect waits for room, as a client would."""
    path = str(tmp_path / "d.sock")
    with full_backlog(path) as (listener, held):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}, "STOCKADE_SOCKET": path}
        proc = subprocess.Popen([STOCKADE, "run", "--", "echo", "ran-in-process"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert wait_in_connect(lambda: [proc.pid]), "the command never waited in connect"
            got = make_room_and_read(listener, held)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert "running in-process" not in err and "ran-in-process" not in out, (out, err)
    assert proc.returncode == 125 and json.loads(got)["method"] == "execute", (err, got)
