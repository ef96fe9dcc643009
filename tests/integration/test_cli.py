"""The ``stockade`` command, end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STOCKADE = [os.path.join(os.path.dirname(sys.executable), "stockade")]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STOCKADE, *args], input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def _needs_process(process_runtime: str) -> None:
    return None


def test_run_passes_output_and_exit_status() -> None:
    r = cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_run_passes_stdin() -> None:
    r = cli("run", "--", "tr", "a-z", "A-Z", stdin="shout\n")
    assert r.stdout == "SHOUT\n" and r.returncode == 0


def test_stdin_up_to_the_cap_and_a_clear_error_beyond() -> None:
    from stockade.cli import MAX_STDIN

    r = cli("run", "--", "wc", "-c", stdin="x" * MAX_STDIN)
    assert r.returncode == 0 and r.stdout.strip() == str(MAX_STDIN), r.stderr[-500:]
    r = cli("run", "--", "wc", "-c", stdin="x" * (MAX_STDIN + 1))
    assert r.returncode != 0 and "larger than" in r.stderr and "Traceback" not in r.stderr


def test_run_json_is_an_exec_result() -> None:
    r = cli("run", "--json", "--memory", "128", "--", "echo", "hi")
    result = json.loads(r.stdout)
    assert result["stdout"] == "hi\n" and result["termination_reason"] == "completed"
    assert result["runtime_used"] == "process" and len(result["policy_digest"]) == 64


def test_violation_summary_goes_to_stderr() -> None:
    code = "import ctypes; ctypes.CDLL(None).ptrace(16, 1, 0, 0)"
    r = cli("run", "--", "python3", "-c", code)
    assert r.returncode == 0
    assert "blocked: ptrace" in r.stderr.splitlines()[-1]


def test_timeout_and_memory_exit_statuses() -> None:
    assert cli("run", "--timeout", "0.5", "--", "sleep", "10").returncode == 124
    r = cli(
        "run", "--memory", "32", "--", "python3", "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"
    )
    assert r.returncode == 137 and "memory_limit" in r.stderr


def test_a_run_whose_output_was_cut_exits_141_however_it_ended() -> None:
    # Ended before the agent saw the cap passed, or killed for passing it: the same status.
    for argv in (["seq", "1", "100"], ["sh", "-c", "seq 1 100000; exec sleep 30"]):
        r = cli("run", "--max-output", "10", "--", *argv)
        assert r.returncode == 141 and "output_limit" in r.stderr, (argv, r)


def test_env_mount_and_network_flags(tmp_path: Path) -> None:
    r = cli(
        "run",
        "--env",
        "A=1",
        "--env",
        "B=two",
        "--network",
        "loopback",
        "--",
        "sh",
        "-c",
        "echo $A$B; cat /proc/net/dev | grep -c lo",
    )
    assert r.stdout.split() == ["1two", "1"]


def test_bad_flags_are_clear_errors() -> None:
    r = cli("run", "--memory", "99999", "--", "true")
    assert r.returncode == 125 and "memory_mb" in r.stderr
    r = cli("run", "--env", "NOEQUALS", "--", "true")
    assert r.returncode == 125 and "K=V" in r.stderr
    r = cli("run")
    assert r.returncode == 125 and "no command" in r.stderr
    r = cli("run", "--runtime", "warp", "--", "true")
    assert r.returncode == 125 and "runtime: 'warp' is no runtime" in r.stderr
    r = cli("run", "--mount", "/proc:/x", "--", "true")
    assert r.returncode == 125 and "filesystem_access" in r.stderr


def test_missing_command_inside_is_reported() -> None:
    r = cli("run", "--", "/no/such/program")
    assert r.returncode == 125 and "cannot execute" in r.stderr


def test_exec_code_forms(tmp_path: Path) -> None:
    assert cli("exec-code", "print(1 + 1)").stdout == "2\n"
    assert cli("exec-code", "-", stdin="print('from stdin')").stdout == "from stdin\n"
    script = tmp_path / "s.sh"
    script.write_text("echo $((6 * 7))")
    assert cli("exec-code", "--language", "bash", "-f", str(script)).stdout == "42\n"
    r = cli("exec-code", "--json", "raise SystemExit(4)")
    assert json.loads(r.stdout)["exit_code"] == 4 and r.returncode == 4
    # Both CODE and -f FILE: one was run and the other dropped unsaid.
    for args in (("-f", str(script), "print(1)"), ("print(1)", "-f", str(script))):
        both = cli("exec-code", *args)
        assert both.returncode == 125 and "give CODE or -f FILE, not both" in both.stderr, both


def test_exec_code_reads_a_source_file_as_python_does(tmp_path: Path) -> None:
    latin = tmp_path / "latin.py"  # a coding cookie, as python3 FILE honours it
    latin.write_bytes(b'# -*- coding: latin-1 -*-\nprint("caf\xe9")\n')
    assert cli("exec-code", "-f", str(latin)).stdout == "caf\u00e9\n"
    garbled = tmp_path / "garbled.py"
    garbled.write_bytes(b"\xff\xfe print(1)\n")
    for args, where in (((("-f", str(garbled))), f"-f {garbled}"), (("-",), "the code on standard input")):
        r = subprocess.run(
            [*STOCKADE, "exec-code", *args], input=garbled.read_bytes(), capture_output=True, timeout=120
        )
        assert r.returncode == 125 and r.stderr.decode().startswith(f"stockade: {where}: cannot read it as utf-8")
        assert b"Traceback" not in r.stderr


def test_doctor() -> None:
    r = cli("doctor", "--json")
    report = json.loads(r.stdout)
    runtimes = {x["name"]: x for x in report["runtimes"]}
    assert runtimes["process"]["available"] is True
    assert runtimes["fake"]["isolation"] == "none"
    for entry in runtimes.values():
        assert entry["available"] or entry["reason"], f"{entry['name']} is unavailable without a reason"
        assert 0 <= entry["score"] <= 100 and entry["boundary"]
    assert runtimes["process"]["available"] is True
    assert report["trust_map"]["untrusted"] == "microvm"
    assert report["host"]["cgroup_version"] in ("v1", "v2", "hybrid", "none")
    from stockade.settings import current

    with open("/proc/sys/kernel/pid_max") as f:  # host-wide: what isolates may take of it is said
        small = int(f.read()) < (current().max_sandboxes + 1) * 4096
    budgets = report["host"]["kernel_budget_problems"]
    assert any(p.startswith("kernel.pid_max = ") for p in budgets) == small, budgets
    human = cli("doctor").stdout
    assert "process" in human and "landlock" in human
    # Where isolates' groups go, as deployment.md says doctor prints.
    from stockade.runtimes.process.cgroup_layout import detect_layout

    layout = detect_layout()
    parents = report["host"]["cgroup_parents"]
    assert parents.get("memory") == layout.v1_parents.get("memory") and parents.get("v2") == layout.v2_parent
    if parents:
        assert "isolates' groups under: " in human


def test_doctor_names_a_misspelt_setting() -> None:
    env = {**os.environ, "STOCKADE_POOLSIZE": "3"}
    r = subprocess.run([*STOCKADE, "doctor", "--json"], capture_output=True, text=True, timeout=120, env=env)
    said = json.loads(r.stdout)["host"]["settings_problems"]
    assert "STOCKADE_POOLSIZE is no setting (ignored): did you mean STOCKADE_POOL_SIZE?" in said


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "No such file or directory"),
        ("{bad", "not JSON"),
        ("[1, 2]", "expected a JSON object of Policy fields"),
    ],
)
def test_a_bad_policy_file_is_named_by_its_flag(tmp_path: Path, content: str | None, said: str) -> None:
    path = tmp_path / "policy.json"
    if content is not None:
        path.write_text(content)
    out = cli("run", "--policy-file", str(path), "--", "true")
    assert out.returncode == 125 and out.stderr.startswith(f"stockade: --policy-file {path}: ")
    assert said in out.stderr


def test_a_policy_files_out_of_range_field_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"memory_mb": 99999}')
    out = cli("run", "--policy-file", str(path), "--", "true")
    assert out.returncode == 125 and "2048" in out.stderr
    assert f"--policy-file {path} (memory_mb)" in out.stderr  # the file said it: not --memory
    out = cli("run", "--policy-file", str(path), "--memory", "99999", "--", "true")
    assert out.returncode == 125 and "--memory (memory_mb)" in out.stderr  # the flag said it
    path.write_text('{"timeot_seconds": 5, "memory_mb": "lots"}')  # every problem the file holds names it
    out = cli("run", "--policy-file", str(path), "--", "true")
    assert out.returncode == 125 and f"--policy-file {path} (timeot_seconds): unknown field" in out.stderr, out.stderr
    assert f"--policy-file {path} (memory_mb)" in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--", "true"),  # the run the early start was for
        ("run", "--memory", "99999", "--", "true"),  # refused once the Policy is read
        ("run", "--memory", "lots", "--", "true"),  # refused by the parser
        ("run", "--"),  # no command
        ("exec-code", "-f", "/no/such/file.py"),  # no code
        ("run", "--timeout", "0.3", "--", "sleep", "30"),  # killed by its deadline
        ("exec-code", "raise SystemExit(3)"),
    ],
)
def test_the_isolate_begun_before_the_flags_are_read_leaves_nothing(args: tuple[str, ...]) -> None:
    """The CLI starts the zygote and its spare isolate (cgroups, a uid) before it reads its flags
    (cli.py ``_early_factory``): whatever the command then does, none of it may outlive the CLI."""
    from stockade.runtimes.process.cgroup_layout import detect_layout
    from stockade.runtimes.process.uids import LOCK_DIR

    proc = subprocess.Popen([*STOCKADE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    mine = f"stockade-{proc.pid}-"
    layout = detect_layout()  # the CLI ran in this process's groups, so it made its own under the same parents
    parents = [*layout.v1_parents.values(), *([layout.v2_parent] if layout.v2_parent else [])]
    assert [n for p in parents if os.path.isdir(p) for n in os.listdir(p) if n.startswith(mine)] == []
    leases = []
    for name in os.listdir(LOCK_DIR) if os.path.isdir(LOCK_DIR) else []:
        try:
            with open(os.path.join(LOCK_DIR, name)) as f:
                if mine in f.read():
                    leases.append(name)
        except OSError:
            continue  # released while listed
    assert leases == [], "a sandbox uid is still leased to the CLI's isolate"


@pytest.mark.parametrize("command", [["doctor"], ["status"], ["env", "ls"]])
def test_a_bad_setting_is_said_by_every_command_not_a_traceback(command: list[str]) -> None:
    env = {**os.environ, "STOCKADE_POOL_SIZE": "abc"}
    done = subprocess.run([sys.executable, "-m", "stockade.cli", *command], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 125, done.stderr
    assert "stockade: STOCKADE_POOL_SIZE='abc' is not an integer" in done.stderr and "Traceback" not in done.stderr


def test_a_reader_that_goes_away_ends_the_cli_with_141_and_no_traceback() -> None:
    command = " ".join(STOCKADE) + " run -- sh -c 'yes | head -n 300000' | head -1"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (141, "y\n") and "Traceback" not in done.stderr, done.stderr


def test_an_allowed_request_that_failed_upstream_is_said_with_why() -> None:
    # The code sees only the proxy's 502; why (nothing listens there) was in --json alone.
    port = closed_port()
    r = cli("run", *reach_closed_port(port))
    assert r.returncode == 0 and r.stdout == "502\n", r.stderr
    assert f"1 allowed request(s) failed (first: localhost:{port}: " in r.stderr


def closed_port() -> int:
    """A loopback port nothing listens on (one just let go of)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reach_closed_port(port: int) -> list[str]:
    """``stockade run``'s arguments for a GET of localhost:``port`` through the egress proxy."""
    fetch = (
        "import http.client\nc = http.client.HTTPConnection('127.0.0.1', 3128, timeout=20)\n"
        f"c.request('GET', 'http://localhost:{port}/')\nprint(c.getresponse().status)"
    )
    return ["--network", "allowlist", "--allow-host", f"localhost:{port}", "--allow-cidr", "127.0.0.0/8", "--",
            "python3", "-c", fetch]  # fmt: skip


def test_a_one_shot_run_that_exits_at_once_leaves_nothing_of_its_isolate(tmp_path: Path) -> None:
    # The reaper's thread, tearing the isolate down after the run, ended with the interpreter:
    # every `stockade run --isolation none` left its scratch directory behind.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for _ in range(3):
        r = subprocess.run([*STOCKADE, "run", "--isolation", "none", "--", "true"], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_a_socket_or_policy_file_flag_that_names_nothing_usable_is_refused_by_name(tmp_path: Path) -> None:
    # An empty --socket ran in-process (or served on the default socket); a missing directory was
    # made, as root; a path too long for a Unix socket ended in a traceback; an empty
    # --policy-file was ignored.
    for args, said in [
        (("run", "--socket", "", "--", "true"), "--socket: give the daemon's socket path (it was empty)"),
        (("run", "--policy-file", "", "--", "true"), "--policy-file: give the path of a JSON file"),
        (("serve", "--socket", ""), "--socket: give the path to listen on (it was empty)"),
        (("serve", "--socket", str(tmp_path / "missing" / "d.sock")), "is not there: make it first"),
        (("serve", "--socket", str(tmp_path / ("x" * 120))), "a Unix socket's path is at most 107"),
    ]:
        r = cli(*args)
        assert r.returncode == 125 and said in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_socket_directory_another_could_take_the_name_in_is_refused(tmp_path: Path) -> None:
    # Without XDG_RUNTIME_DIR the default socket falls back to /tmp/stockade-UID, which another user
    # could make first: the daemon listened in it, and its owner put a socket of theirs in its place.
    open_to_all, theirs, below_theirs = tmp_path / "open", tmp_path / "theirs", tmp_path / "above" / "mine"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    theirs.mkdir()
    below_theirs.mkdir(parents=True)  # mine, in one another user could swap for their own
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
        os.chown(below_theirs.parent, 65534, 65534)
    for where, said in [
        (open_to_all, "others may write its directory"),
        *([(theirs, "belongs to uid 65534, who could put a socket of theirs")] if os.geteuid() == 0 else []),
        *([(below_theirs, f"{below_theirs.parent} belongs to uid 65534")] if os.geteuid() == 0 else []),
    ]:
        r = cli("serve", "--socket", str(where / "d.sock"))
        assert r.returncode == 125 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (where / "d.sock").exists()
    assert not (tmp_path / "missing").exists()


def test_a_share_the_sandboxes_uid_cannot_reach_is_refused_without_advice_to_open_it(tmp_path: Path) -> None:
    # It said "chmod o+rwx opens it to every local user too" of /etc: advice that would open a
    # system directory to everyone. It says what is missing, and to share a directory made for it.
    import shutil
    import tempfile

    parent = tempfile.mkdtemp(prefix="stockade-share-")  # searchable by others, unlike pytest's tmp_path
    os.chmod(parent, 0o755)
    private = os.path.join(parent, "private")
    os.mkdir(private, 0o755)  # others may read it, not write it: a writable share it cannot be
    try:
        r = cli("run", "--mount", f"{private}:/x:rw", "--", "true")
    finally:
        shutil.rmtree(parent)
    assert r.returncode == 125 and "needs to be readable and writable by others" in r.stderr, r.stderr
    assert "Share a directory made for the sandbox instead" in r.stderr and "chmod" not in r.stderr


def test_a_file_flag_naming_no_file_is_named_in_its_error(tmp_path: Path) -> None:
    # Both said only "[Errno 2] No such file or directory: '/nonexistent'".
    missing = str(tmp_path / "nonexistent")
    token = cli("run", "--socket", str(tmp_path / "d.sock"), "--token-file", missing, "--", "true")
    assert token.returncode == 125 and f"--token-file {missing}: No such file or directory" in token.stderr, token
    reqs = cli("env", "build", "x", "-r", missing)
    assert reqs.returncode == 2 and f"-r {missing}: No such file or directory" in reqs.stderr, reqs


def test_a_usage_error_of_a_json_command_is_json_too() -> None:
    # Every other failure of a --json command is one JSON document on stdout; a flag argparse refused
    # was only its usage, on stderr, which a program reading stdout could not tell from a crash.
    for args, said in [
        (("run", "--json", "--bogus", "--", "true"), "unrecognized arguments: --bogus"),
        (("exec-code", "--json", "--memory", "abc", "print(1)"), "argument --memory: invalid int value: 'abc'"),
    ]:
        r = cli(*args)
        assert r.returncode == 2 and json.loads(r.stdout) == {"error": said, "code": "usage"}, r
        assert "usage: stockade" in r.stderr
    plain = cli("run", "--bogus", "--", "true")  # without --json: the usage alone
    assert plain.returncode == 2 and plain.stdout == "" and "unrecognized arguments: --bogus" in plain.stderr
