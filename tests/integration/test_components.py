"""Long-lived components: start, status, ps, logs (-f), stop, rm, exec, attach, restart policies and
their limit, a killed supervisor."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import require
from tests.helpers import processes_with_arg

if TYPE_CHECKING:
    from stockade.components import ComponentState, ComponentStore

CLI = [sys.executable, "-m", "stockade.cli"]


@pytest.fixture
def cli(process_runtime: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    yield from _cli(tmp_path)


@pytest.fixture
def any_cli(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``cli`` for a test that names its runtime (and requires it) itself."""
    yield from _cli(tmp_path)


def _cli(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    env = {**os.environ, "STOCKADE_STATE_DIR": str(tmp_path)}

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)

    yield run
    status = run("status", "--json")
    for component in json.loads(status.stdout or "[]"):
        if component["status"] in ("starting", "running"):
            run("stop", component["name"])


def _status(cli: Callable[..., subprocess.CompletedProcess[str]], name: str) -> dict[str, object]:
    out = cli("status", name, "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)[0]
    return result


def _wait(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_lifecycle(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.5"
    started = cli("start", "--name", "ticker", "--memory", "64", "--", "sh", "-c",
                  f"while true; do echo tick; sleep {marker}; done")  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert started.stdout.split()[:2] == ["NAME", "STATUS"] and "ticker" in started.stdout  # as ps shows it
    assert _status(cli, "ticker")["status"] == "running"
    _wait(lambda: b"tick" in cli("logs", "ticker").stdout.encode())
    assert processes_with_arg(marker)
    assert "ticker" in cli("ps").stdout  # another CLI process sees the same state
    stopped = cli("stop", "ticker")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout and stopped.stdout.startswith("NAME")
    assert _status(cli, "ticker")["status"] == "stopped"
    _wait(lambda: not processes_with_arg(marker))


def test_failed_command_is_failed(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    out = cli("start", "--name", "oops", "--", "sh", "-c", "echo broken >&2; exit 3")
    # 1 if it had already failed when `start` looked, 0 if it was still running then
    assert out.returncode in (0, 1), out.stderr
    _wait(lambda: _status(cli, "oops")["status"] == "failed")
    state = _status(cli, "oops")
    assert state["exit_code"] == 3 and state["restarts"] == 0
    assert "broken" in cli("logs", "oops").stdout


def test_restart_on_failure(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    assert cli("start", "--name", "flaky", "--restart", "on-failure", "--", "sh", "-c", "exit 1").returncode == 0
    _wait(lambda: int(str(_status(cli, "flaky")["restarts"])) >= 2, timeout=30)
    assert cli("stop", "flaky").returncode == 0
    # Stopped: no exit of its own to tell, whatever an earlier run of it exited with.
    assert (_status(cli, "flaky")["status"], _status(cli, "flaky")["exit_code"]) == ("stopped", None)
    # Its name is not taken over by accident: what it was and did is kept until it is removed or replaced.
    again = cli("start", "--name", "flaky", "--", "true")
    assert again.returncode == 125 and "exists (stopped)" in again.stderr and "--replace" in again.stderr, again
    assert int(str(_status(cli, "flaky")["restarts"])) >= 2
    assert cli("start", "--name", "flaky", "--replace", "--", "sleep", "30").returncode == 0
    assert (_status(cli, "flaky")["status"], _status(cli, "flaky")["restarts"]) == ("running", 0)
    assert cli("stop", "flaky").returncode == 0


def test_restart_always_restarts_clean_exits(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    assert cli("start", "--name", "loop", "--restart", "always", "--", "echo", "again").returncode == 0
    _wait(lambda: int(str(_status(cli, "loop")["restarts"])) >= 1, timeout=30)
    assert cli("stop", "loop").returncode == 0


def test_killed_supervisor_is_reported_and_its_isolate_dies(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.25"
    assert cli("start", "--name", "victim", "--", "sleep", marker).returncode == 0
    pid = int(str(_status(cli, "victim")["supervisor_pid"]))
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: _status(cli, "victim")["status"] == "failed")
    assert "supervisor is gone" in str(_status(cli, "victim")["error"])
    _wait(lambda: not processes_with_arg(marker))
    assert cli("stop", "victim").returncode == 0  # it had ended already: it keeps its account of why
    assert _status(cli, "victim")["status"] == "failed" and "supervisor is gone" in str(_status(cli, "victim")["error"])


def test_bad_input(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    negative = cli("logs", "any", "--tail-bytes", "-5")
    assert negative.returncode == 2 and "--tail-bytes: -5: give 0 or more" in negative.stderr, negative.stderr
    for args in (("start", "--name", "Bad Name", "--", "true"), ("start", "--name", "x"), ("logs", "nobody")):
        out = cli(*args)
        assert out.returncode == 125, (args, out.stderr)
    out = cli("start", "--name", "mem", "--memory", "999999", "--", "true")
    assert out.returncode == 125 and "memory_mb" in out.stderr
    assert cli("start", "--name", "dup", "--", "sleep", "60").returncode == 0
    again = cli("start", "--name", "dup", "--", "sleep", "60")
    assert again.returncode == 125 and "already running" in again.stderr


# ---- rm, logs -f, exec, attach, restart limits ----------------------------------------------------

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _client(tmp_path: Path, *args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """A CLI process left running (``logs -f``, ``exec``, ``attach``); the test ends it."""
    env = {**os.environ, "STOCKADE_STATE_DIR": str(tmp_path)}
    return subprocess.Popen([*CLI, *args], env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _read_until(process: subprocess.Popen[bytes], wanted: bytes, timeout: float = 30) -> bytes:
    """What ``process`` printed on stdout, read until ``wanted`` is in it."""
    assert process.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout
    while wanted not in got:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{wanted!r} not printed in time; got {got!r}"
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            assert chunk, f"stdout ended before {wanted!r}; got {got!r}"
            got += chunk
    return got


def test_rm(cli: Cli, tmp_path: Path) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.75"
    assert cli("start", "--name", "gone", "--", "sleep", marker).returncode == 0
    refused = cli("rm", "gone")
    assert refused.returncode == 125 and "rm --force" in refused.stderr
    assert _status(cli, "gone")["status"] == "running"
    forced = cli("rm", "--force", "gone")
    assert forced.returncode == 0, forced.stderr
    assert not (tmp_path / "components" / "gone").exists()
    _wait(lambda: not processes_with_arg(marker))
    assert cli("status", "gone").returncode == 125
    assert cli("rm", "gone").returncode == 125  # nothing left to remove
    assert cli("start", "--name", "done", "--", "true").returncode in (0, 1)
    _wait(lambda: _status(cli, "done")["status"] == "stopped")
    assert cli("rm", "done").returncode == 0  # an ended one needs no --force
    assert "done" not in cli("ps").stdout
    # Several at once, as docker's: each is stopped or removed, one that fails named, the rest done.
    for name in ("a1", "a2"):
        assert cli("start", "--name", name, "--", "sleep", marker).returncode == 0
    stopped = cli("stop", "a1", "nope", "a2")
    assert stopped.returncode == 125 and "nope" in stopped.stderr, stopped.stderr
    assert {_status(cli, n)["status"] for n in ("a1", "a2")} == {"stopped"}
    removed = cli("rm", "a1", "a2")
    assert removed.returncode == 0 and removed.stdout.split() == ["removed", "a1", "removed", "a2"]
    _wait(lambda: not processes_with_arg(marker))


def test_logs_follow_prints_new_output_until_the_component_ends(cli: Cli, tmp_path: Path) -> None:
    script = "i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.2; done"
    assert cli("start", "--name", "ticker", "--", "sh", "-c", script).returncode == 0
    follow = _client(tmp_path, "logs", "-f", "ticker")
    try:
        _read_until(follow, b"tick3\n")  # printed as it was appended, not only what was there
        assert follow.poll() is None
        assert cli("stop", "ticker").returncode == 0
        assert follow.wait(timeout=30) == 0  # the component ended: so does -f
    finally:
        _end(follow)


def _running_record(tmp_path: Path) -> tuple[ComponentStore, ComponentState]:
    """A component's record that reads as running (this process its supervisor), and no component."""
    from stockade import components

    store = components.ComponentStore(str(tmp_path))
    store.create("fake", ["true"], {}, "no")
    state = store.state("fake")
    me = os.getpid()
    state.status, state.supervisor_pid, state.supervisor_start = "running", me, components._start_time(me)
    store.save(state)
    return store, state


def test_follow_log_across_rotation(tmp_path: Path) -> None:
    """``follow_log`` reads a rotated log to its end, then the new one (no component needed)."""
    from stockade import components

    store, state = _running_record(tmp_path)
    log = Path(store.path("fake", "log"))
    log.write_bytes(b"one\n")
    got: list[bytes] = []
    follower = threading.Thread(target=components.follow_log, args=("fake", store, got.append), kwargs={"poll_s": 0.02})
    follower.start()
    try:
        _wait(lambda: b"one\n" in b"".join(got))
        with log.open("ab") as f:
            f.write(b"two\n")  # written to the old file just before it is rotated
        os.replace(log, store.path("fake", "log.1"))
        log.write_bytes(b"three\n")
        _wait(lambda: b"three\n" in b"".join(got))
        with log.open("ab") as f:
            f.write(b"four\n")
        _wait(lambda: b"four\n" in b"".join(got))
    finally:
        state.status = "stopped"
        store.save(state)
        follower.join(timeout=30)
    assert not follower.is_alive()
    assert b"".join(got) == b"one\ntwo\nthree\nfour\n"
    assert components.read_log("fake", store, tail_bytes=0) == b""  # --tail-bytes 0: none (it was all)
    assert components.read_log("fake", store, tail_bytes=5) == b"four\n"


def test_follow_log_says_what_a_reader_slower_than_two_rotations_missed(tmp_path: Path) -> None:
    # Blocked on its output while the log rotated twice, it read its old file to its end, then the
    # newest log: the file between them (10 MiB of output) went missing without a word.
    from stockade import components

    store, state = _running_record(tmp_path)
    log, rotated = Path(store.path("fake", "log")), store.path("fake", "log.1")
    log.write_bytes(b"first\n")
    got: list[bytes] = []

    def slow_reader(data: bytes) -> None:
        if not got:  # while this reader is held up, the writer goes on: two rotations
            for text in (b"lost\n", b"second\n"):
                os.replace(log, rotated)
                log.write_bytes(text)
            os.replace(log, rotated)
            log.write_bytes(b"third\n")
        got.append(data)

    follower = threading.Thread(
        target=components.follow_log, args=("fake", store, slow_reader), kwargs={"poll_s": 0.02}
    )
    follower.start()
    try:
        _wait(lambda: b"third\n" in b"".join(got))
    finally:
        state.status = "stopped"
        store.save(state)
        follower.join(timeout=30)
    said = b"".join(got)
    assert said.startswith(b"first\n") and said.endswith(b"second\nthird\n"), said
    assert b"output may be missing here: the log rotated more than once" in said, said


def test_exec_runs_in_the_components_isolate(cli: Cli) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.5"
    script = f"echo shared > /tmp/shared; exec sleep {marker}"
    assert cli("start", "--name", "box", "--memory", "128", "--", "sh", "-c", script).returncode == 0
    _wait(lambda: cli("exec", "box", "--", "cat", "/tmp/shared").stdout == "shared\n")  # its files
    seen = cli("exec", "box", "--", "sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null; true")
    assert seen.returncode == 0 and marker in seen.stdout  # its processes (the same pid namespace)
    out = cli("exec", "box", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (out.returncode, out.stdout, out.stderr) == (7, "out\n", "err\n")
    fed = cli("exec", "-i", "box", "--", "cat")  # stdin: the fixture gives none, so it is empty
    assert (fed.returncode, fed.stdout) == (0, "")
    missing = cli("exec", "box", "--", "no-such-program")
    assert missing.returncode == 125 and "cannot execute 'no-such-program'" in missing.stderr
    assert cli("exec", "nobody", "--", "true").returncode == 125
    assert _status(cli, "box")["status"] == "running"  # none of that touched the component
    assert processes_with_arg(marker)


def test_exec_stdin_concurrency_interrupt_and_a_vanished_client(cli: Cli, tmp_path: Path) -> None:
    assert cli("start", "--name", "box", "--", "sleep", "3600").returncode == 0
    cat = _client(tmp_path, "exec", "-i", "box", "--", "sh", "-c", "cat; echo done", stdin=subprocess.PIPE)
    try:
        out, err = cat.communicate(b"hello from the host\n", timeout=60)
        assert (cat.returncode, out) == (0, b"hello from the host\ndone\n"), err
    finally:
        _end(cat)
    # One exec waits for another one to do something: they run side by side.
    slow = _client(tmp_path, "exec", "box", "--", "sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo slow")
    try:
        _wait(lambda: cli("exec", "box", "--", "touch", "/tmp/go").returncode == 0)
        out, _ = slow.communicate(timeout=60)
        assert (slow.returncode, out) == (0, b"slow\n")
    finally:
        _end(slow)
    # Ctrl-C reaches the command; a client that goes away takes its command with it.
    for how in (signal.SIGINT, signal.SIGKILL):
        marker = f"{random.randrange(10**6, 10**7)}.5"
        client = _client(tmp_path, "exec", "box", "--", "sleep", marker)
        try:
            _wait(lambda m=marker: len(processes_with_arg(m)) >= 2)  # the client, and the command in the isolate
            client.send_signal(how)
            status = client.wait(timeout=30)
            assert status == (130 if how == signal.SIGINT else -signal.SIGKILL)
            _wait(lambda m=marker: not processes_with_arg(m))
        finally:
            _end(client)
    assert _status(cli, "box")["status"] == "running"


# Inside the component: output files for the next `exec` (its job j2), each one record of 2 MiB that is
# mostly a hole (4 KiB of the isolate's memory): read, each would be 2 MiB of the supervisor's.
STAGE_SPARSE = """
import os, struct, time
d = "/tmp/.stockade-component"
while not os.path.isdir(d):
    time.sleep(0.05)
size = 2 * 1024 * 1024 - 5
for n in range(2, 42):
    with open(f"{d}/j2.t.{n}", "wb") as f:
        f.write(b"o" + struct.pack(">I", size))
        f.truncate(5 + size)
    os.rename(f"{d}/j2.t.{n}", f"{d}/j2.o.{n}")
print("staged", flush=True)
time.sleep(3600)
"""


def test_output_files_staged_for_an_exec_end_it_as_tampered_with(cli: Cli) -> None:
    """The supervisor reads at most a relay's window of a job's output files, and none while its
    client reads slowly: 40 staged files, 80 MiB to read for 160 KiB of the isolate's."""
    assert cli("start", "--name", "stager", "--memory", "128", "--", "python3", "-c", STAGE_SPARSE).returncode == 0
    _wait(lambda: "staged" in cli("logs", "stager").stdout)
    tricked = cli("exec", "stager", "--", "sh", "-c", "echo hi; sleep 30")
    assert tricked.returncode == 125, tricked
    assert "more than 11 output files await reading" in tricked.stderr, tricked.stderr
    assert len(tricked.stdout) <= 12 * 2 * 1024 * 1024  # what it read before it stopped
    assert _status(cli, "stager")["status"] == "running"


def test_an_exec_client_that_leaves_while_its_command_reads_no_input_takes_the_command(
    cli: Cli, tmp_path: Path
) -> None:
    """Its input queued to the limit, the client's thread waited for room that never came: the
    client's going away was never seen, and its command ran on."""
    assert cli("start", "--name", "box", "--", "sleep", "3600").returncode == 0
    marker = f"{random.randrange(10**6, 10**7)}.5"
    client = _client(tmp_path, "exec", "-i", "box", "--", "sleep", marker, stdin=subprocess.PIPE)
    try:
        _wait(lambda: len(processes_with_arg(marker)) >= 2)  # the client, and the command in the isolate
        assert client.stdin is not None
        fd = client.stdin.fileno()
        os.set_blocking(fd, False)  # the client stops reading once the supervisor does: no wait on it
        sent, deadline = 0, time.monotonic() + 20
        while sent < 12 << 20 and time.monotonic() < deadline:  # past what is queued for a command's stdin
            with contextlib.suppress(BlockingIOError):
                sent += os.write(fd, b"x" * (1 << 16))
                continue
            time.sleep(0.05)
        assert sent > 4 << 20, sent  # the queue filled: the supervisor's thread waits for room
        client.kill()
        client.wait(timeout=30)
        _wait(lambda: not processes_with_arg(marker), timeout=30)
    finally:
        _end(client)
    assert _status(cli, "box")["status"] == "running"


def test_an_isolate_that_fails_to_start_on_a_restart_is_a_failed_run_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start that failed for a moment (the host short of memory) ended the component "failed" with
    # its restart policy never applied. Only a first start that fails is final (no run would start).
    from stockade.components import ComponentStore
    from stockade.components_supervisor import Supervisor
    from stockade.errors import SandboxStartError
    from stockade.runtimes.manager import RuntimeManager

    store = ComponentStore(str(tmp_path))
    launch = store.create("flaky", ["true"], {"runtime": "fake"}, "always", max_restarts=2)
    select, starts = RuntimeManager.select, [0]

    def failing_after_the_first(manager: RuntimeManager, policy: object) -> object:
        runtime = select(manager, policy)  # type: ignore[arg-type]

        class Flaky:
            def start(self, policy: object) -> object:
                starts[0] += 1
                if starts[0] > 1:
                    raise SandboxStartError("no memory to spare")
                return runtime.start(policy)  # type: ignore[arg-type]

        return Flaky()

    monkeypatch.setattr(RuntimeManager, "select", failing_after_the_first)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert Supervisor("flaky", store, launch).run() == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    state = store.state("flaky")
    assert (state.status, state.restarts, starts[0]) == ("failed", 2, 3), state
    assert state.error == (
        "its isolate could not be started: no memory to spare; gave up after 2 restarts in a row (--max-restarts 2)"
    )


def test_a_stop_before_the_supervisor_says_who_it_is_sticks(tmp_path: Path) -> None:
    from stockade.components import ComponentStore, stop
    from stockade.components_supervisor import Supervisor

    store = ComponentStore(str(tmp_path))
    launch = store.create("early", ["sleep", "3600"], {"runtime": "fake"}, "no")
    assert stop("early", store).status == "stopped"  # no pid to signal yet: said under the lock
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert Supervisor("early", store, launch).run() == 0  # it reads that, and starts nothing
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    state = store.state("early")
    assert (state.status, state.supervisor_pid, state.started_at) == ("stopped", None, None)
    from stockade.errors import StockadeError

    with pytest.raises(StockadeError, match="no component named 'nosuch'"):
        stop("nosuch", store)


def test_a_supervisor_that_starts_late_runs_nothing_beside_the_one_a_replace_started(tmp_path: Path) -> None:
    # A supervisor slower than 30 s to say who it is (a loaded host) left a record that reads "never
    # started"; `start --replace` then made a new record and supervisor, and the late one ran too.
    from stockade import components
    from stockade.components_supervisor import Supervisor

    store = components.ComponentStore(str(tmp_path))
    late = store.create("slow", ["sleep", "3600"], {"runtime": "fake"}, "no")
    state = store.state("slow")
    state.updated_at -= components.SUPERVISOR_START_S + 1  # its start was told it did not start
    components._write_json(store.path("slow", "state.json"), components.asdict(state))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert store.state("slow").status == "failed"
        assert Supervisor("slow", store, late).run() == 0  # it starts nothing
        replaced = store.create("slow", ["sleep", "3600"], {"runtime": "fake"}, "no", replace=True)
        assert Supervisor("slow", store, late).run() == 0  # the record is the replace's now: not its
        assert store.state("slow").supervisor_pid is None and replaced != late
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_state_directory_someone_else_may_write_is_refused(tmp_path: Path) -> None:
    from stockade.components import ComponentStore
    from stockade.errors import StockadeError

    store = ComponentStore(str(tmp_path))
    os.makedirs(store.root, mode=0o700)
    planted = os.path.join(store.root, "web")
    os.mkdir(planted)
    os.chmod(planted, 0o777)  # as another user's would be: theirs to rewrite
    with pytest.raises(StockadeError, match=r"web is not a directory of this user's that only it may write"):
        store.create("web", ["true"], {}, "no")
    os.chmod(planted, 0o700)
    os.symlink(str(tmp_path / "elsewhere"), os.path.join(planted, "spec.json.tmp"))  # a link where it writes
    store.create("web", ["true"], {}, "no")
    assert not (tmp_path / "elsewhere").exists() and store.spec("web")["argv"] == ["true"]
    os.chmod(store.root, 0o777)
    with pytest.raises(StockadeError, match=r"components belongs to uid \d+ with mode 0777.*writable by no one else"):
        store.create("api", ["true"], {}, "no")


def test_attach_talks_to_a_stdio_server(cli: Cli, tmp_path: Path) -> None:
    server = 'while read -r line; do echo "{\\"echo\\": \\"$line\\"}"; done'
    assert cli("start", "--name", "stdio", "--stdin", "--", "sh", "-c", server).returncode == 0
    for word in (b"first", b"second"):  # its stdin stays open from one client to the next
        client = _client(tmp_path, "attach", "stdio", stdin=subprocess.PIPE)
        try:
            assert client.stdin is not None
            client.stdin.write(word + b"\n")
            client.stdin.flush()
            assert _read_until(client, b"}\n") == b'{"echo": "' + word + b'"}\n'
            if word == b"first":
                other = cli("attach", "stdio")
                assert other.returncode == 125 and "another client is attached" in other.stderr
            client.stdin.close()  # detaches: the component runs on
            assert client.wait(timeout=30) == 0
        finally:
            _end(client)
    assert _status(cli, "stdio")["status"] == "running"
    assert '{"echo": "first"}\n{"echo": "second"}\n' in cli("logs", "stdio").stdout
    # Its whole input piped, ended at once (echo REQUEST | stockade attach): the answer still comes.
    piped = cli("attach", "stdio", stdin="piped\n")
    assert piped.returncode == 0 and piped.stdout == '{"echo": "piped"}\n', piped
    assert cli("start", "--name", "plain", "--", "sleep", "3600").returncode == 0
    refused = cli("attach", "plain")
    assert refused.returncode == 125 and "--stdin" in refused.stderr
    # The component ends while a client is attached: the client is told, and exits 1.
    client = _client(tmp_path, "attach", "stdio", stdin=subprocess.PIPE)
    try:
        assert client.stdin is not None
        client.stdin.write(b"third\n")
        client.stdin.flush()
        _read_until(client, b'"third"}\n')
        assert cli("stop", "stdio").returncode == 0
        assert client.wait(timeout=30) == 1
        assert client.stderr is not None and b"stopped" in client.stderr.read()
    finally:
        _end(client)
    # It ends by itself: the client is told how.
    assert cli("start", "--name", "quits", "--stdin", "--", "sh", "-c", "read -r line; exit 4").returncode == 0
    client = _client(tmp_path, "attach", "quits", stdin=subprocess.PIPE)
    try:
        assert client.stdin is not None
        client.stdin.write(b"bye\n")
        client.stdin.flush()
        assert client.wait(timeout=30) == 1
        assert client.stderr is not None
        assert b"component quits: the component's run ended (exit status 4)" in client.stderr.read()
    finally:
        _end(client)


def test_on_failure_backs_off_and_gives_up_at_the_limit(cli: Cli) -> None:
    out = cli("start", "--name", "crash", "--restart", "on-failure", "--max-restarts", "2", "--",
              "sh", "-c", "echo crashing; printf 'no newline'; exit 3")  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    _wait(lambda: _status(cli, "crash")["status"] == "failed", timeout=60)
    state = _status(cli, "crash")
    assert state["restarts"] == 2 and state["exit_code"] == 3
    assert "exited with 3" in str(state["error"]) and "--max-restarts 2" in str(state["error"])
    log = cli("logs", "crash").stdout
    assert log.count("crashing") == 3
    assert log.index("restarting in 1 s") < log.index("restarting in 2 s")  # the backoff doubles
    assert "not restarting" in log
    # Each note on a line of its own, even after output that ended mid-line.
    assert "no newline[stockade]" not in log and log.count("no newline\n[stockade] ") == 3, log


def test_restart_policies_on_clean_exits(cli: Cli) -> None:
    assert cli("start", "--name", "once", "--restart", "on-failure", "--", "true").returncode in (0, 1)
    _wait(lambda: _status(cli, "once")["status"] == "stopped")
    assert _status(cli, "once")["restarts"] == 0  # on-failure: a clean exit is not restarted
    again = cli("start", "--name", "again", "--restart", "always", "--max-restarts", "1", "--", "true")
    # `start` answers once the run is up, or with its failure where that came first
    assert again.returncode == 0 or "gave up after 1 restarts" in again.stderr, again
    _wait(lambda: _status(cli, "again")["status"] == "failed", timeout=60)
    state = _status(cli, "again")
    assert state["restarts"] == 1 and "gave up after 1 restarts" in str(state["error"])
    assert cli("start", "--name", "neg", "--max-restarts", "-1", "--", "true").returncode == 125


def test_a_relay_killed_inside_the_isolate_ends_the_run(cli: Cli) -> None:
    marker = f"{random.randrange(10**6, 10**7)}.5"
    script = f"sleep 0.2; kill -9 $PPID; exec sleep {marker}"  # $PPID: the relay that runs it
    started = cli("start", "--name", "rogue", "--", "sh", "-c", script)
    # `start` answers once the run is up, or with its failure where that came first
    assert started.returncode == 0 or "relay process is gone" in started.stderr, started
    _wait(lambda: _status(cli, "rogue")["status"] == "failed", timeout=60)
    assert "relay process is gone" in str(_status(cli, "rogue")["error"])
    _wait(lambda: not processes_with_arg(marker))


@pytest.mark.parametrize("runtime", ["gvisor", "microvm"])
def test_exec_and_attach_on_other_runtimes(runtime: str, any_cli: Cli, tmp_path: Path) -> None:
    """The relay needs nothing of a runtime but the agent's calls: the same on gVisor and in a microVM."""
    require(runtime)
    server = 'echo shared > /tmp/shared; while read -r line; do echo "got $line"; done'
    started = any_cli("start", "--name", "other", "--runtime", runtime, "--stdin", "--", "sh", "-c", server)
    assert started.returncode == 0, started.stderr
    assert _status(any_cli, "other")["runtime"] == runtime
    _wait(lambda: any_cli("exec", "other", "--", "cat", "/tmp/shared").stdout == "shared\n", timeout=180)
    four = any_cli("exec", "other", "--", "sh", "-c", "exit 4")
    assert four.returncode == 4, (
        f"{four.stderr}; {_status(any_cli, 'other')}; {any_cli('logs', 'other').stdout[-2000:]!r}"
    )
    client = _client(tmp_path, "attach", "other", stdin=subprocess.PIPE)
    try:
        assert client.stdin is not None
        client.stdin.write(b"ping\n")
        client.stdin.flush()
        try:
            answer = _read_until(client, b"\n", timeout=60)
        except AssertionError:
            _end(client)
            raise AssertionError(
                f"attach said: {client.stderr.read() if client.stderr else b''!r}; "
                f"the component: {_status(any_cli, 'other')}; its log: {any_cli('logs', 'other').stdout[-2000:]!r}"
            ) from None
        assert answer == b"got ping\n"
        client.stdin.close()
        assert client.wait(timeout=60) == 0
    finally:
        _end(client)
    assert any_cli("stop", "other").returncode == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this host")
def test_a_component_with_a_published_port_answers_curl(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """The README's web service as a component, reached from the host through its published port."""
    started = cli("start", "--name", "web", "--network", "loopback", "--publish", "0:8000", "--", "sh", "-c",
                  "cd /tmp && echo 'hello from a component' > index.html && exec python3 -m http.server 8000 "
                  "--bind 127.0.0.1")  # fmt: skip
    assert started.returncode == 0, started.stderr
    state = _status(cli, "web")
    published = state["published"]
    assert isinstance(published, dict) and set(published) == {"8000"}
    host, _, port = str(published["8000"]).rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    url = f"http://127.0.0.1:{port}/index.html"

    def answered() -> bool:
        curl = subprocess.run(["curl", "-sS", "--max-time", "10", url], capture_output=True, text=True, timeout=30)
        return curl.returncode == 0 and curl.stdout == "hello from a component\n"

    _wait(answered, timeout=60)
    assert f"127.0.0.1:{port}->8000" in cli("ps").stdout
    assert cli("stop", "web").returncode == 0
    curl = subprocess.run(["curl", "-sS", "--max-time", "5", url], capture_output=True, text=True, timeout=30)
    assert curl.returncode != 0  # the forward ended with the component


def test_a_free_port_asked_for_is_kept_across_restarts(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    started = cli("start", "--name", "flap", "--network", "loopback", "--publish", "0:8000", "--restart", "always",
                  "--", "sh", "-c", "sleep 0.5")  # fmt: skip
    assert started.returncode == 0, started.stderr
    _wait(lambda: bool(_status(cli, "flap")["published"]), timeout=60)
    first = _status(cli, "flap")["published"]
    _wait(lambda: int(str(_status(cli, "flap")["restarts"])) >= 2, timeout=60)
    _wait(lambda: bool(_status(cli, "flap")["published"]), timeout=60)  # published again, by the new run
    assert _status(cli, "flap")["published"] == first  # the address its clients know
    assert cli("stop", "flap").returncode == 0


def test_publish_needs_a_loopback(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    refused = cli("start", "--name", "web", "--publish", "8000", "--", "sleep", "1")
    assert refused.returncode == 125 and "--network loopback" in refused.stderr
    bad = cli("start", "--name", "web", "--network", "loopback", "--publish", "0.0.0.0:80:8000", "--", "sleep", "1")
    assert bad.returncode == 125 and "loopback address" in bad.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = cli("start", "--name", "busy", "--network", "loopback", "--publish", f"{port}:8000", "--", "sleep", "9")
    assert busy.returncode == 1 and "failed" in busy.stdout
    assert f"stockade start: busy failed: cannot publish: publish 127.0.0.1:{port} -> 8000" in busy.stderr
    assert "Address already in use (another program holds it" in busy.stderr, busy.stderr
    assert cli("rm", "--force", "busy").returncode == 0
    # With a restart policy it waited 120 s and said only that: now at once, with why, and that it goes on.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        began = time.monotonic()
        flapping = cli("start", "--name", "busy", "--network", "loopback", "--publish", f"{port}:8000",
                       "--restart", "on-failure", "--", "sleep", "9")  # fmt: skip
        waited = time.monotonic() - began
    assert flapping.returncode == 1 and waited < 60, (waited, flapping.stderr)
    assert f"stockade start: busy did not start: cannot publish: publish 127.0.0.1:{port}" in flapping.stderr
    assert "it is started again (--restart on-failure) until `stockade stop busy`" in flapping.stderr
    assert cli("rm", "--force", "busy").returncode == 0
    twice = cli("start", "--name", "twice", "--network", "loopback", "--publish", "18091:8000", "--publish",
                "18091:9000", "--", "sleep", "1")  # fmt: skip
    assert (
        twice.returncode == 125 and "host port 127.0.0.1:18091 is given twice (for ports 8000 and 9000)" in twice.stderr
    )
    same = cli("start", "--name", "twice", "--network", "loopback", "--publish", "18091", "--publish", "18091", "--",
               "sleep", "1")  # fmt: skip
    assert same.returncode == 125 and "host port 127.0.0.1:18091 is given twice" in same.stderr, same.stderr


def test_a_components_supervisor_gets_no_token_or_session_key(process_runtime: str, tmp_path: Path) -> None:
    """The worker stockade leaves running for a component starts with the CLI's environment, less its secrets."""
    token, key = "t" * 16 + "0123456789abcdef", "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS1rZXk="
    env = {**os.environ, "STOCKADE_STATE_DIR": str(tmp_path), "STOCKADE_AUTH_TOKEN": token,
           "STOCKADE_SESSION_KEY": key, "STOCKADE_API_TOKEN": token}  # fmt: skip

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)

    assert run("start", "--name", "quiet", "--", "sleep", "30").returncode == 0
    try:
        status = run("status", "quiet", "--json")
        pid = int(json.loads(status.stdout)[0]["supervisor_pid"])
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        assert f"STOCKADE_STATE_DIR={tmp_path}".encode() in environ
        assert not [v for v in environ if v.startswith((b"STOCKADE_AUTH_TOKEN=", b"STOCKADE_API_TOKEN=",
                                                         b"STOCKADE_SESSION_KEY="))]  # fmt: skip
    finally:
        run("stop", "quiet")


def test_a_components_supervisor_imports_nothing_from_the_callers_directory(
    process_runtime: str, tmp_path: Path
) -> None:
    # `stockade start` run from a directory a sandbox wrote (a writable mount): the supervisor it
    # leaves running as root must not import a planted stockade package from there.
    plant = tmp_path / "plant"
    (plant / "stockade").mkdir(parents=True)
    marker = tmp_path / "ran-as-host"
    (plant / "stockade" / "__init__.py").write_text("")
    (plant / "stockade" / "components.py").write_text(f"open({str(marker)!r}, 'w').write('planted')\n")
    script = os.path.join(os.path.dirname(sys.executable), "stockade")  # a console script: no cwd on sys.path
    env = {**os.environ, "STOCKADE_STATE_DIR": str(tmp_path / "state")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, *args], env=env, cwd=plant, capture_output=True, text=True, timeout=120)

    started = run("start", "--name", "planted", "--", "sleep", "30")
    try:
        assert started.returncode == 0, started.stderr
        assert json.loads(run("status", "planted", "--json").stdout)[0]["status"] == "running"
        assert not marker.exists()
    finally:
        run("stop", "planted")


def _forging(record: str) -> str:
    """A command that writes an exit record of its own (``record``, a Python bytes expression) where
    the relay writes its first output file, whole and renamed as the relay writes, then waits."""
    return (
        "import os, struct, time\n"
        f"p = {record}\n"
        "d = '/tmp/.stockade-component'\n"
        "open(f'{d}/j1.t.f', 'wb').write(b'x' + struct.pack('>I', len(p)) + p)\n"
        "os.rename(f'{d}/j1.t.f', f'{d}/j1.o.1')\n"
        "time.sleep(60)\n"
    )


def test_a_forged_exit_record_ends_the_run_not_its_supervisor(cli: Cli) -> None:
    # The relay's output files are in the isolate's /tmp, which its command can write: an exit record
    # nested past any parser's depth must end the run as tampered with, and the restarts go on.
    forge = _forging("b'[' * 100000 + b']' * 100000")
    started = cli(
        "start", "--name", "forger", "--restart", "always", "--max-restarts", "1", "--", "python3", "-c", forge
    )
    # `start` answers once the run is up, or with its failure where that came first
    assert started.returncode == 0 or "output file is garbled" in started.stderr, started
    _wait(lambda: _status(cli, "forger")["status"] == "failed", timeout=90)
    state = _status(cli, "forger")
    assert "output file is garbled" in str(state["error"]) and "gave up after 1 restarts" in str(state["error"]), state


def test_an_empty_output_file_planted_ends_the_run_as_tampered_with(cli: Cli) -> None:
    # Read as no records, it would move the supervisor past the number the relay writes next: the
    # command's output and exit would then never be read.
    plant = "import time\nopen('/tmp/.stockade-component/j1.o.1', 'wb').close()\ntime.sleep(60)\n"
    started = cli("start", "--name", "blank", "--", "python3", "-c", plant)
    # `start` answers once the run is up, or with its failure where that came first
    assert started.returncode == 0 or "output file is garbled" in started.stderr, started
    _wait(lambda: _status(cli, "blank")["status"] == "failed", timeout=30)
    assert "output file is garbled" in str(_status(cli, "blank")["error"])


def test_modules_planted_by_the_command_reach_neither_the_relay_nor_its_probe(cli: Cli) -> None:
    # The relay and its liveness probe run in the isolate, as the command's uid, from /work: what the
    # command plants there or names in PYTHONPATH is not imported, nor a python3 its PATH names first.
    plant = (
        "import os\nos.makedirs('/work/bin')\n"
        "for name in ('json', 'subprocess'):\n"
        "    open(f'/work/{name}.py', 'w').write('import time\\ntime.sleep(3600)\\n')\n"
        "open('/work/bin/python3', 'w').write('#!/bin/sh\\nexec sleep 3600\\n')\nos.chmod('/work/bin/python3', 0o755)\n"
        "import time\ntime.sleep(120)\n"
    )
    env = ["--env", "PYTHONPATH=/work", "--env", "PATH=/work/bin:/usr/bin:/bin"]
    started = cli("start", "--name", "planter", *env, "--", "/usr/bin/python3", "-c", plant)
    assert started.returncode == 0, started.stderr
    _wait(lambda: _status(cli, "planter")["status"] == "running")
    _wait(lambda: cli("exec", "planter", "--", "test", "-e", "/work/subprocess.py").returncode == 0)
    time.sleep(6)  # past the liveness probe's 5 s of quiet: it runs once, with the modules there
    ran = cli("exec", "planter", "--", "echo", "still served")
    assert ran.returncode == 0 and ran.stdout == "still served\n", ran
    state = _status(cli, "planter")
    assert state["status"] == "running" and state["restarts"] == 0, state


def test_a_relay_the_command_holds_up_ends_the_run_not_the_supervisor(cli: Cli) -> None:
    # Same uid as its relays, the command can stop each one before it reports: the launch is given
    # 30 s, then the isolate is ended (an exec's client told why), and the run with it.
    stopper = (
        "import os, signal, time\n"
        "seen = {int(p) for p in os.listdir('/proc') if p.isdigit()}\n"
        "print('stopping', flush=True)\n"
        "while True:\n"
        "    for p in os.listdir('/proc'):\n"
        "        if p.isdigit() and int(p) not in seen:\n"
        "            seen.add(int(p))\n"
        "            try:\n"
        "                os.kill(int(p), signal.SIGSTOP)\n"
        "            except OSError:\n"
        "                pass\n"
        "    time.sleep(0.002)\n"
    )
    started = cli("start", "--name", "stopper", "--max-restarts", "0", "--restart", "on-failure", "--", "python3", "-c",
                  stopper)  # fmt: skip
    assert started.returncode == 0, started.stderr
    _wait(lambda: "stopping" in cli("logs", "stopper").stdout)
    held = cli("exec", "stopper", "--", "echo", "never")
    assert held.returncode == 125 and "did not report within 30 s" in held.stderr, held
    _wait(lambda: _status(cli, "stopper")["status"] == "failed", timeout=60)
    assert "did not report within 30 s" in str(_status(cli, "stopper")["error"])


def test_a_forged_exit_status_out_of_range_ends_the_run_as_tampered_with(cli: Cli) -> None:
    # 256 would reach `stockade exec`'s caller as 0 (an exit status is a byte), True as 1.
    forge = _forging("b'{\"exit_code\": 256}'")
    started = cli("start", "--name", "wrapped", "--", "python3", "-c", forge)
    assert started.returncode == 0 or "output file is garbled" in started.stderr, started
    _wait(lambda: _status(cli, "wrapped")["status"] == "failed", timeout=30)
    state = _status(cli, "wrapped")
    assert "output file is garbled" in str(state["error"]) and state["exit_code"] is None, state


def test_a_garbled_control_line_ends_its_session_and_frees_the_attach(cli: Cli, tmp_path: Path) -> None:
    # A line nested past the parser's depth ended the session's thread before it detached: no
    # client could attach again until the run ended.
    assert cli("start", "--name", "held", "--stdin", "--", "cat").returncode == 0
    _wait(lambda: _status(cli, "held")["status"] == "running")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(tmp_path / "components" / "held" / "control.sock"))
        sock.sendall(b'{"op": "attach"}\n')
        assert b'"attached"' in sock.recv(4096)
        sock.sendall(b"[" * 200000 + b"\n")
        ended = b""
        while chunk := sock.recv(4096):
            ended += chunk
        assert b'"end": "detached"' in ended, ended
    attached = cli("attach", "held", stdin="hello\n")
    assert attached.returncode == 0 and "hello" in attached.stdout, attached


def test_a_control_signal_that_is_no_signal_ends_the_session_and_leaves_no_file(cli: Cli, tmp_path: Path) -> None:
    # -9 (or True, or 1000) was written into the relay's directory as a signal file it never took:
    # left there for good, one per message.
    assert cli("start", "--name", "box", "--", "sleep", "300").returncode == 0
    _wait(lambda: _status(cli, "box")["status"] == "running")
    for bad in (-9, True, 1000, "9"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(tmp_path / "components" / "box" / "control.sock"))
            sock.sendall(b'{"op": "exec", "argv": ["sh", "-c", "echo started; exec sleep 300"], "stdin": false}\n')
            reader = sock.makefile("rb")
            while b"started" not in base64.b64decode(json.loads(reader.readline()).get("data", "")):
                pass
            sock.sendall(json.dumps({"signal": bad}).encode() + b"\n")
            ended = reader.read()
            assert b"a bad message" in ended and b"its command was killed" in ended, (bad, ended)

    # Each killed command's relay takes its signal file, and its files go with it (those left are
    # the listing's own).
    def cleaned() -> bool:
        names = cli("exec", "box", "--", "ls", "/tmp/.stockade-component").stdout.split()
        return len({name.split(".")[0] for name in names}) <= 1 and not any(".k." in name for name in names)

    _wait(cleaned, timeout=30)
