"""The egress worker (egress/worker.py): an allow-listed isolate's proxy runs apart from its keeper.

Attacks on the seam between the process that holds a sandbox and the worker
that serves its network: what the worker could learn of its keeper
(environment, descriptors, identity), what a worker taken over could make its
keeper believe or hold (oversized and forged answers), and what becomes of
the isolate when its worker dies (no way out, reported) or of the worker when
its keeper dies (it ends too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import pytest

from stockade import Policy, Sandbox
from stockade.egress.workers import EgressWorker
from stockade.errors import SandboxStartError
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require
from tests.egress_harness import SECRET_VALUE, Upstreams, serve_upstreams
from tests.integration.test_egress import allow, run

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def up() -> Iterator[Upstreams]:
    yield from serve_upstreams()


@pytest.fixture(scope="module")
def manager() -> Iterator[RuntimeManager]:
    require("process")
    mgr = RuntimeManager(pool_size=0)
    yield mgr
    mgr.close()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # dead; its parent (not this test) reaps it
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not ROOT, reason="the worker serves as its isolate's uid only when started as root")
def test_the_worker_runs_as_its_isolates_uid_with_nothing_of_its_keeper(
    up: Upstreams, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    canaries = {"STOCKADE_AUTH_TOKEN": "canary-token-5d1c", "AWS_SECRET_ACCESS_KEY": "canary-aws-77e0"}
    for name, value in canaries.items():
        monkeypatch.setenv(name, value)
    with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
        isolate = sb._sandbox
        worker = isolate.egress.worker  # type: ignore[attr-defined]
        uid = isolate.uid.uid  # type: ignore[attr-defined]
        status = _status(worker.pid)
        assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(uid)] * 4
        assert status["Groups"].strip() == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, caps
        assert status["NoNewPrivs"].strip() == "1"
        with open(f"/proc/{worker.pid}/limits") as f:  # not its keeper's (root's, the daemon's)
            limits = {line[:26].strip(): line[26:].split()[:2] for line in f.readlines()[1:]}
        assert limits["Max open files"] == ["1024", "1024"] and limits["Max core file size"] == ["0", "0"], limits
        with open(f"/proc/{worker.pid}/environ", "rb") as f:
            environ = f.read()
        assert b"STOCKADE" not in environ and all(v.encode() not in environ for v in canaries.values())
        targets = [os.readlink(f"/proc/{worker.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{worker.pid}/fd")]
        # Its keeper's socket, /dev/null, the isolate's two sockets and its own event loop: no file, no pipe.
        assert all(t.startswith(("socket:", "anon_inode:")) or t == "/dev/null" for t in targets), targets
        # And it still does its work: the secret reaches its host.
        out, _ = run(sb, f'print(json.dumps({{"bound": fetch("https://api.stockade.test:{up.https.port}/w", '
                         '{"Authorization": "Bearer " + os.environ["API_KEY"]})}))')  # fmt: skip
        assert out["bound"][0] == 200 and up.https.seen[-1]["authorization"] == f"Bearer {SECRET_VALUE}"


def test_a_ca_file_only_root_may_read_is_read_before_the_worker_gives_root_up(
    up: Upstreams, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tempfile.mkdtemp(prefix="stockade-private-ca-")  # 0700, as mkdtemp makes it
    try:
        ca = os.path.join(private, "ca.pem")
        shutil.copy(os.environ["STOCKADE_EGRESS_CA_FILE"], ca)
        os.chmod(ca, 0o600)
        monkeypatch.setenv("STOCKADE_EGRESS_CA_FILE", ca)
        with Sandbox(allow(up, "api.stockade.test", secrets=("API_KEY",)), manager=manager) as sb:
            out, _ = run(sb, f'print(json.dumps({{"bound": fetch("https://api.stockade.test:{up.https.port}/ca", '
                             '{"Authorization": "Bearer " + os.environ["API_KEY"]})}))')  # fmt: skip
        assert out["bound"][0] == 200 and json.loads(out["bound"][1])["path"] == "/ca", out
        assert up.https.seen[-1]["authorization"] == f"Bearer {SECRET_VALUE}"
    finally:
        shutil.rmtree(private)


def test_a_dead_worker_leaves_the_isolate_no_way_out_and_is_reported_once(
    up: Upstreams, manager: RuntimeManager
) -> None:
    probe = f'print(json.dumps({{"plain": fetch("http://api.stockade.test:{up.http.port}/after")}}))'
    with Sandbox(allow(up, "api.stockade.test"), manager=manager) as sb:
        out, _ = run(sb, probe)
        assert out["plain"][0] == 200
        os.kill(sb._sandbox.egress.worker.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        out, result = run(sb, probe)
        assert out["plain"][0] is None, out  # nothing listens where the proxy was
        lost = [v for v in result.security_violations if v.violation_type == "egress_worker_lost"]  # type: ignore[attr-defined]
        assert len(lost) == 1 and lost[0].detection_layer == "NETWORK" and "no way out" in lost[0].description
        out, again = run(sb, probe)
        assert out["plain"][0] is None
        assert not [v for v in again.security_violations if v.violation_type == "egress_worker_lost"]  # type: ignore[attr-defined]


def test_a_worker_ends_with_its_keeper(up: Upstreams) -> None:
    require("process")
    keeper = textwrap.dedent(f"""
        import sys, time
        from stockade import Policy, Sandbox
        from stockade.runtimes.manager import RuntimeManager
        policy = Policy(network_policy="allowlist", allowed_hosts=["api.stockade.test:{up.http.port}"])
        sb = Sandbox(policy, manager=RuntimeManager(pool_size=0)).__enter__()
        print(sb._sandbox.egress.worker.pid, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", keeper], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert not _gone(pid, 0.2)
        proc.kill()
        proc.wait()
        assert _gone(pid, 20), "the worker outlived its keeper"
    finally:
        proc.kill()
        proc.wait()


# ---- a worker taken over: what it sends is checked -----------------------------------------


class _Hostile(EgressWorker):
    """A worker whose program is ``script`` (reading msgpack on stdin, writing on stdout)."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.proc: subprocess.Popen[bytes] | None = None
        super().__init__(None)

    def _start(self, uid: int | None) -> tuple[socket.socket, int, int]:
        keeper, child = socket.socketpair()
        with child:
            self.proc = subprocess.Popen([sys.executable, "-c", self.script], stdin=child, stdout=child)
        return keeper, self.proc.pid, os.pidfd_open(self.proc.pid)

    def close(self) -> None:
        super().close()
        assert self.proc is not None
        self.proc.wait()


HOSTILE = """
import msgpack, socket, sys
keeper_in, keeper_out = socket.socket(fileno=0), socket.socket(fileno=1)
unpacker = msgpack.Unpacker()
while data := socket.recv_fds(keeper_in, 65536, 4)[0]:
    unpacker.feed(data)
    for message in unpacker:
        keeper_out.sendall(msgpack.packb(answer(message)))
"""


def _pair() -> list[socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return [listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]


@pytest.mark.parametrize(
    "answer",
    [
        "{'ok': True, 'env': {'X': 'y' * (8 << 20)}}",  # bigger than any honest answer
        "{'ok': True, 'env': {}, 'x': ['y' * (512 << 10)] * 16}",  # as big, each of its strings within bounds
        "{'ok': True, 'env': {}, 'x': [{}] * 50000}",  # small in bytes, huge in objects
        "keeper_out.sendall(msgpack.packb({'ok': True})) or {'ok': True, 'env': {}}",  # two answers to one ask
    ],
)
def test_a_worker_that_floods_its_keeper_is_ended_not_believed(answer: str) -> None:
    worker = _Hostile(f"def answer(m):\n    return {answer}\n" + HOSTILE)
    sockets = _pair()
    try:
        with pytest.raises(SandboxStartError, match="egress worker"):
            worker.serve(Policy(network_policy="allowlist", allowed_hosts=["a.test"]), {}, sockets, None, None)
            worker.take()  # the second answer of the third case, unasked, is found by now
        assert _gone(worker.pid, 10)
    finally:
        worker.close()
        for sock in sockets:
            sock.close()


def test_a_workers_account_is_bounded_and_its_forgeries_refused() -> None:
    record = {"host": "a.test", "port": 443, "method": "CONNECT", "allowed": True}
    worker = _Hostile(
        "def answer(m):\n"
        "    if m['op'] == 'serve':\n"
        "        return {'ok': True, 'env': {'HTTP_PROXY': 'http://127.0.0.1:3128'}, 'ca': None}\n"
        f"    return {{'ok': True, 'records': [{record!r}] * 300, 'dropped': -7, 'redacted': -1}}\n" + HOSTILE
    )
    sockets = _pair()
    refused: list[object] = []
    worker.on_refused = lambda request, times: refused.append(request)
    try:
        env, ca = worker.serve(Policy(network_policy="allowlist", allowed_hosts=["a.test"]), {}, sockets, None, None)
        assert env == {"HTTP_PROXY": "http://127.0.0.1:3128"} and ca is None
        records, dropped, redacted = worker.take()
        assert len(records) == 256 and dropped == 300 - 256 and redacted == 0
    finally:
        worker.close()
        for sock in sockets:
            sock.close()
    forger = _Hostile(
        "def answer(m):\n"
        "    keeper_out.sendall(msgpack.packb({'event': 'refused', 'request': {'host': 7}}))\n"
        "    return {'ok': True, 'records': [], 'dropped': 0, 'redacted': 0}\n" + HOSTILE
    )
    sockets = _pair()
    try:
        with pytest.raises(SandboxStartError, match="broke its protocol"):
            forger.serve(Policy(network_policy="allowlist", allowed_hosts=["a.test"]), {}, sockets, None, None)
        assert json.dumps(refused) == "[]"
    finally:
        forger.close()
        for sock in sockets:
            sock.close()


def test_what_a_worker_leaves_behind_is_killed_with_it() -> None:
    """The fork server's reaping, as a taken-over worker would meet it: the worker starts a process
    that double-forks away and dies; the fork server (a child subreaper) gets the orphan and kills it."""
    program = textwrap.dedent("""
        import os, signal, sys, time
        from stockade.agent import linux
        from stockade.egress.worker import _reap
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        r, w = os.pipe()
        worker = os.fork()
        if worker == 0:  # the worker, taken over
            if os.fork() == 0:
                if os.fork() == 0:  # the orphan-to-be, detached
                    os.setsid()
                    os.write(w, str(os.getpid()).encode().ljust(16))
                    time.sleep(120)
                os._exit(0)
            time.sleep(0.5)
            os._exit(0)  # killed by its keeper, or ending: either way its descendants are orphans
        orphan = int(os.read(r, 16))
        os.waitpid(worker, 0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _reap({worker})  # what the fork server does at each SIGCHLD
            try:
                with open(f"/proc/{orphan}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        os.waitpid(orphan, 0)
                        print("killed"); sys.exit(0)
            except FileNotFoundError:
                print("killed"); sys.exit(0)
            time.sleep(0.05)
        print("survived"); os.kill(orphan, signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "killed", done.stdout + done.stderr


def test_the_fork_server_imports_nothing_from_its_keepers_script_directory(tmp_path: object) -> None:
    # Its module path was the keeper's, first entry and all: root running a script from a
    # directory another user may write (or `python -m` there) had the fork server, root with every
    # capability, import what that user planted there (socket.py, msgpack.py) at its next start.
    require("process")
    where = tempfile.mkdtemp(prefix="stockade-keeper-")
    try:
        script = os.path.join(where, "keeper.py")
        with open(script, "w") as f:
            f.write(
                textwrap.dedent("""
                import time
                from stockade.egress.workers import fork_server
                server = fork_server()
                # Popen returns once the exec has closed its error pipe, which is before the kernel
                # has written the new program's environment: until then /proc says none.
                deadline = time.monotonic() + 30
                while not (raw := open(f"/proc/{server._proc.pid}/environ", "rb").read()):
                    assert time.monotonic() < deadline, "the fork server never showed an environment"
                    time.sleep(0.01)
                said = dict(v.split(b"=", 1) for v in raw.split(b"\\0") if b"=" in v)
                print(said[b"PYTHONPATH"].decode())
            """)
            )
        done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        path = done.stdout.strip().split(os.pathsep)
        assert where not in path and path, path
        assert any(os.path.isdir(os.path.join(p, "stockade")) for p in path), path  # its own modules still
    finally:
        shutil.rmtree(where, ignore_errors=True)
