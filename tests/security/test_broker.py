"""The secrets broker's boundaries, attacked: the sandbox uid, forged and replayed messages, a daemon taken over.

As root (CI): the tests create the three users (``stockade setup-users``),
start ``stockade secretd`` as root (it drops to ``stockade-secrets``), and act
as the daemon (uid 0 is allowed for the test) or as ``stockade-sandbox``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from stockade import Policy, Sandbox
from stockade.broker import wire
from stockade.broker.client import BrokerClient
from stockade.errors import ConfigError, PolicyError, StockadeError
from stockade.protocol import auth
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users and switches uid: needs root")
STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")
VALUE = "sk-broker-test-4e1f9a7c"


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    socket: str
    key_file: str
    key: bytes
    dir: str


@pytest.fixture(scope="module")
def broker() -> Iterator[Running]:
    subprocess.run([STOCKADE, "setup-users"], check=True, capture_output=True, timeout=120)
    where = tempfile.mkdtemp(prefix="stockade-broker-test-")
    os.chmod(where, 0o755)
    secrets_file = os.path.join(where, "secrets.json")
    with open(secrets_file, "w") as f:
        json.dump({"API_KEY": {"value": VALUE, "hosts": ["*.stockade.test"]}, "UNGRANTED": "sk-never-given"}, f)
    os.chmod(secrets_file, 0o600)
    os.chown(secrets_file, pwd.getpwnam("stockade-secrets").pw_uid, -1)
    sock, key_file = os.path.join(where, "secretd.sock"), os.path.join(where, "session")
    daemon_uid = pwd.getpwnam("stockade").pw_uid
    argv = [STOCKADE, "secretd", "--secrets-file", secrets_file, "--socket", sock, "--key-file", key_file,
            "--allow-uid", "0", "--allow-uid", str(daemon_uid),
            "--state-dir", os.path.join(where, "state")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_SESSION")}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) or not os.path.exists(key_file):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "secretd did not start"
            time.sleep(0.05)
        # Bound before it dropped root: wait for it to listen as itself (root gone from its uids).
        while _uids(process.pid) != {pwd.getpwnam("stockade-secrets").pw_uid}:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, f"secretd did not drop root: uids {_uids(process.pid)}"
            time.sleep(0.05)
        yield Running(process, sock, key_file, wire.read_key(key_file), where)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(where)


def _uids(pid: int) -> set[int]:
    """The real, effective, saved and filesystem uids of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("Uid:"))
    return {int(uid) for uid in line.split()[1:]}


def as_user(user: str, code: str) -> dict[str, object]:
    """``code`` run by python as ``user`` (its groups only); what it printed last, as JSON."""
    entry = pwd.getpwnam(user)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    done = subprocess.run(
        [sys.executable, "-c", code], user=entry.pw_uid, group=entry.pw_gid, extra_groups=groups,
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


PROBE = """
import json, os, socket, sys
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return exc.strerror
def connect(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    finally:
        s.close()
print(json.dumps({
    "key": attempt(lambda: open(%(key)r).read()),
    "socket": attempt(lambda: connect(%(sock)r)),
    "broker_environ": attempt(lambda: open("/proc/%(broker)d/environ").read()),
    "broker_fds": attempt(lambda: os.listdir("/proc/%(broker)d/fd")),
    "broker_mem": attempt(lambda: open("/proc/%(broker)d/mem", "rb").read(1)),
    "daemon_environ": attempt(lambda: open("/proc/%(daemon)d/environ").read()),
}))
"""


def test_the_layout_and_identities(broker: Running) -> None:
    secrets_uid = pwd.getpwnam("stockade-secrets").pw_uid
    secrets_gid = grp.getgrnam("stockade-secrets").gr_gid
    assert "stockade" in grp.getgrnam("stockade-secrets").gr_mem  # the daemon reads the key through the group
    with open(f"/proc/{broker.process.pid}/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    assert set(status["Uid"].split()) == {str(secrets_uid)}  # root is gone: real, effective, saved, filesystem
    caps = [int(status[c], 16) for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")]
    assert caps == [0] * 5 and status["NoNewPrivs"] == "1", status  # none left, none to gain by an exec
    key = os.stat(broker.key_file)
    assert (stat.S_IMODE(key.st_mode), key.st_uid, key.st_gid) == (0o640, secrets_uid, secrets_gid)
    sock = os.stat(broker.socket)
    daemon_gid = pwd.getpwnam("stockade").pw_gid  # the daemon's own group: it keeps no other once it drops root
    assert (stat.S_IMODE(sock.st_mode), sock.st_uid, sock.st_gid) == (0o660, secrets_uid, daemon_gid)
    # setup-users again changes nothing.
    again = subprocess.run([STOCKADE, "setup-users"], check=True, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "all three users and groups exist already"


def test_the_sandbox_uid_reaches_neither_the_key_nor_the_broker_nor_either_process(broker: Running) -> None:
    probe = PROBE % {"key": broker.key_file, "sock": broker.socket, "broker": broker.process.pid,
                     "daemon": os.getpid()}  # fmt: skip
    seen = as_user("stockade-sandbox", probe)
    assert seen == {
        "key": "Permission denied",
        "socket": "Permission denied",
        "broker_environ": "Permission denied",
        "broker_fds": "Permission denied",
        "broker_mem": "Permission denied",
        "daemon_environ": "Permission denied",
    }
    # The daemon's user reads the key and reaches the socket (and nothing of the broker's process).
    daemon = as_user("stockade", probe)
    assert daemon["key"] == daemon["socket"] == "ok"
    assert daemon["broker_environ"] == daemon["broker_mem"] == "Permission denied"


def _raw_call(path: str, body: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(len(body).to_bytes(4, "big") + body)
        header = s.recv(4, socket.MSG_WAITALL)
        return wire.decode(s.recv(wire.length_of(header), socket.MSG_WAITALL))


USER_NAMESPACE_PROBE = """
import ctypes, json, socket, sys
if sys.argv[1] == "own":
    assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0, ctypes.get_errno()  # CLONE_NEWUSER
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(%(sock)r)
try:
    said = s.recv(4096)
except TimeoutError:
    said = b""
print(json.dumps({"refused": b"is not allowed" in said, "said": said.decode("latin-1")}))
"""


def test_the_daemons_user_in_a_user_namespace_of_its_own_is_refused(broker: Running) -> None:
    # A rootless isolate run by the daemon's user keeps that uid and its supplementary groups (an
    # unprivileged process may not drop them), the socket's group among them: with the socket shared
    # in, it listed, put and deleted the broker's secrets. Only the broker's own namespace is served.
    probe = USER_NAMESPACE_PROBE % {"sock": broker.socket}
    entry = pwd.getpwnam("stockade")
    groups = [g.gr_gid for g in grp.getgrall() if "stockade" in g.gr_mem]
    said = {}
    for where in ("same", "own"):
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", probe, where], user=entry.pw_uid, group=entry.pw_gid,
            extra_groups=groups, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        said[where] = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["same"] == {"refused": False, "said": ""}, said  # served: it waits for a request
    assert said["own"]["refused"], said


def test_forged_replayed_and_expired_messages_are_refused(broker: Running) -> None:
    ping = {"method": "ping", "params": {}, "id": 1}
    good = wire.canonical(auth.sign(ping, broker.key, encode=wire.canonical))
    assert _raw_call(broker.socket, good).get("result") is not None
    assert _raw_call(broker.socket, good)["error"] == "Authentication failed"  # the same frame again: a replay
    forged = wire.canonical(auth.sign(ping, b"x" * 32, encode=wire.canonical))
    assert _raw_call(broker.socket, forged)["error"] == "Authentication failed"
    expired = wire.canonical(auth.sign(ping, broker.key, now=time.time() - 120, encode=wire.canonical))
    assert _raw_call(broker.socket, expired)["error"] == "Authentication failed"
    unsigned = wire.canonical({**ping, "ts": time.time(), "nonce": "0123456789abcdef"})
    assert _raw_call(broker.socket, unsigned)["error"] == "Authentication failed"
    tampered = auth.sign({"method": "fetch", "params": {"sandbox": "a", "name": "API_KEY"}, "id": 2}, broker.key,
                         encode=wire.canonical)  # fmt: skip
    tampered["params"]["name"] = "UNGRANTED"
    assert _raw_call(broker.socket, wire.canonical(tampered))["error"] == "Authentication failed"
    assert _raw_call(broker.socket, b"\xff\x00garbage")["error"] == "Invalid CBOR"  # type: ignore[union-attr]
    # Its answers are signed too: a client with the wrong key refuses them.
    with pytest.raises(Exception, match="authentication"):
        BrokerClient(broker.socket, b"y" * 32).call("ping", {})


def test_a_daemon_taken_over_gets_only_what_live_isolates_are_granted(broker: Running) -> None:
    require("process")
    client = BrokerClient(broker.socket, broker.key)
    grant = [{"name": "API_KEY", "hosts": ["api.stockade.test"]}]
    with pytest.raises(PolicyError, match=r"the secrets broker refused a secret's value: .*no such sandbox"):
        client.call("fetch", {"sandbox": "made-up", "name": "API_KEY"})
    with pytest.raises(PolicyError, match=r"refused this sandbox's secrets: .*does not run as a sandbox uid"):
        client.call("register", {"sandbox": "mine", "pid": os.getpid(), "grants": grant})  # itself: not an isolate
    for hosts in ({}, {"hosts": None}, {"hosts": []}):  # a secret of its own bound to any host, its server's
        with pytest.raises(StockadeError, match="hosts"):
            client.call("put", {"name": "MINE", "value": "x", **hosts})
    with pytest.raises(StockadeError, match="hosts"):  # a grant for no host is none
        client.call("register", {"sandbox": "none", "pid": os.getpid(), "grants": [{"name": "API_KEY", "hosts": []}]})
    mgr = RuntimeManager(pool_size=0)
    try:
        with Sandbox(Policy(timeout_seconds=30), manager=mgr) as sb:
            pid = sb._sandbox.isolate_pid()  # type: ignore[union-attr]
            assert pid is not None
            with pytest.raises(PolicyError, match=r"API_KEY is not granted for evil\.com"):
                client.call("register", {"sandbox": "s1", "pid": pid,
                                         "grants": [{"name": "API_KEY", "hosts": ["evil.com"]}]})  # fmt: skip
            with pytest.raises(PolicyError, match=r"API_KEY is not granted for bad host!"):  # refused, not a crash
                client.call("register", {"sandbox": "s1", "pid": pid,
                                         "grants": [{"name": "API_KEY", "hosts": ["bad host!"]}]})  # fmt: skip
            client.call("register", {"sandbox": "s1", "pid": pid, "grants": grant})
            assert client.call("fetch", {"sandbox": "s1", "name": "API_KEY"}) == {"value": VALUE}
            with pytest.raises(PolicyError, match="does not grant"):
                client.call("fetch", {"sandbox": "s1", "name": "UNGRANTED"})
        # The isolate has ended: its registration is worth nothing, pid reuse or not.
        with pytest.raises(PolicyError, match=r"ended|no such sandbox"):
            client.call("fetch", {"sandbox": "s1", "name": "API_KEY"})
    finally:
        mgr.close()
        client.close()


FD_AUDIT = """
import os
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:  # the agent (pid 1) is not this code's to look into
        print(f"{pid}:{exc.errno}")
        continue
    for fd in fds:
        try:
            print(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
"""


def test_secrets_through_the_broker_reach_the_bound_host(broker: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    require("process")
    from tests.egress_harness import serve_upstreams

    upstreams = serve_upstreams()
    up = next(upstreams)
    try:
        monkeypatch.delenv("STOCKADE_SECRETS_FILE")
        monkeypatch.setenv("STOCKADE_BROKER_SOCKET", broker.socket)
        monkeypatch.setenv("STOCKADE_SESSION_KEY_FILE", broker.key_file)
        host = f"api.stockade.test:{up.https.port}"
        policy = Policy(network_policy="allowlist", allowed_hosts=[host], allowed_cidrs=["127.0.0.0/8"],
                        secrets=[{"name": "API_KEY", "hosts": [host]}], timeout_seconds=60)  # fmt: skip
        mgr = RuntimeManager(pool_size=0)
        try:
            with Sandbox(policy, manager=mgr) as sb:
                result = sb.run_code(
                    "import os, urllib.request\n"
                    f"r = urllib.request.Request('https://{host}/', headers={{'Authorization': 'Bearer ' + "
                    "os.environ['API_KEY']})\nprint(urllib.request.urlopen(r, timeout=20).status)"
                )
                assert result.stdout == "200\n", result.stderr
                fds = sb.run_code(FD_AUDIT)
            assert up.https.seen[-1]["authorization"] == f"Bearer {VALUE}"
            # The isolate's descriptors are its own: nothing of the broker, its key or the host's files.
            assert fds.exit_code == 0, fds.stderr
            links = fds.stdout.split()
            assert any(x.startswith(("pipe:", "socket:")) for x in links), links
            host_files = [x for x in links if broker.dir in x or x.startswith(("/home", "/root", "/run", "/tmp/"))]
            assert host_files == [], links
        finally:
            mgr.close()
    finally:
        upstreams.close()


def test_an_admin_registers_secrets_through_the_daemon_and_they_rest_encrypted(broker: Running) -> None:
    require("process")
    import asyncio

    from stockade.client import Client
    from stockade.daemon import secrets as daemon_secrets
    from stockade.errors import AuthenticationError
    from stockade.protocol.models import Caller, SecretRef
    from tests.daemon_harness import start_daemon
    from tests.egress_harness import serve_upstreams

    # Only an admin (root on the socket) may: another uid is refused before the broker is asked.
    with pytest.raises(AuthenticationError, match="for an admin"):
        asyncio.run(daemon_secrets.delete(SecretRef(name="X"), Caller("uid 1000", "unix", uid=1000)))
    upstreams = serve_upstreams()
    up = next(upstreams)
    env = {"STOCKADE_BROKER_SOCKET": broker.socket, "STOCKADE_SESSION_KEY_FILE": broker.key_file,
           **{k: v for k, v in os.environ.items() if k.startswith("STOCKADE_EGRESS")}}  # fmt: skip
    daemon = start_daemon(env=env)
    registered = "sk-registered-5d2c8b1e"
    try:
        cli = [sys.executable, "-m", "stockade.cli", "secrets"]
        cli_env = {**os.environ, "STOCKADE_SOCKET": daemon.socket_path}
        put = subprocess.run([*cli, "put", "REGISTERED", "--host", "*.stockade.test"], input=registered + "\n",
                             capture_output=True, text=True, env=cli_env, timeout=60)  # fmt: skip
        assert put.returncode == 0, put.stderr
        listed = subprocess.run([*cli, "ls", "--json"], capture_output=True, text=True, env=cli_env, timeout=60)
        entries = {e["name"]: e for e in json.loads(listed.stdout)}
        assert entries["REGISTERED"] == {"name": "REGISTERED", "hosts": ["*.stockade.test"], "source": "registered"}
        assert entries["API_KEY"]["source"] == "file" and registered not in listed.stdout
        # At rest: encrypted, in the broker's own directory.
        state = os.path.join(broker.dir, "state")
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert os.stat(state).st_uid == pwd.getpwnam("stockade-secrets").pw_uid
        with open(os.path.join(state, "vault"), "rb") as f:
            assert registered.encode() not in f.read()
        # Used as any other: the bound host gets it.
        host = f"api.stockade.test:{up.https.port}"
        policy = Policy(network_policy="allowlist", allowed_hosts=[host], allowed_cidrs=["127.0.0.0/8"],
                        secrets=[{"name": "REGISTERED", "hosts": [host], "header": "X-Key", "format": "{value}"}],
                        timeout_seconds=60)  # fmt: skip
        code = (f"import os, urllib.request\nr = urllib.request.Request('https://{host}/', headers={{'X-Key': "
                "os.environ['REGISTERED']})\nprint(urllib.request.urlopen(r, timeout=20).status)")  # fmt: skip
        with Client(daemon.socket_path) as client:
            result = client.execute(code=code, policy=policy.to_dict())
        assert result.stdout == "200\n", result.stderr
        assert up.https.seen[-1]["x-key"] == registered
        removed = subprocess.run([*cli, "rm", "REGISTERED"], capture_output=True, text=True, env=cli_env, timeout=60)
        assert removed.returncode == 0 and "removed" in removed.stdout
        daemon.stop()
        with open(daemon.audit_log) as f:
            audit = f.read()
        assert registered not in audit and '"action":"secrets.put"' in audit and '"target":"REGISTERED"' in audit
        assert registered not in daemon.logs()
    finally:
        daemon.cleanup()
        upstreams.close()


def test_a_broker_that_cannot_start_says_why_changes_no_directory_and_leaves_no_socket(broker: Running) -> None:
    """Found by a new user: without its users, secretd showed a traceback (KeyError from getgrnam);
    started with a --socket in a private directory, it made that directory 0755; and a start that
    failed after binding left a socket behind that looked like a broker's."""
    where = tempfile.mkdtemp(prefix="stockade-broker-fail-")  # 0700: the user's private directory
    try:
        secrets_file = os.path.join(broker.dir, "secrets.json")
        roots_file = os.path.join(where, "roots.json")  # a broker staying root reads a file root owns
        with open(roots_file, "w") as f:
            json.dump({"API_KEY": "sk-x"}, f)
        os.chmod(roots_file, 0o600)

        def secretd(*extra: str, secrets: str = secrets_file) -> subprocess.CompletedProcess[str]:
            argv = [STOCKADE, "secretd", "--secrets-file", secrets, "--key-file", os.path.join(where, "key"),
                    "--allow-uid", "0", *extra]  # fmt: skip
            return subprocess.run(argv, capture_output=True, text=True, timeout=60)

        sock = os.path.join(where, "secretd.sock")
        for extra, said in [
            (("--user", "no-such-user-here", "--socket", sock), "--user no-such-user-here: no such user"),
            (("--daemon-group", "no-such-group-here", "--socket", sock), "--daemon-group no-such-group-here: no such"),
            (("--socket", sock), f"its directory {where} is searchable by neither its group nor others (mode 0700)"),
            (("--user", "root", "--daemon-group", "root", "--socket", os.path.join(broker.dir, "x.sock")),
             "could not drop root to root"),
        ]:  # fmt: skip
            done = secretd(*extra, secrets=roots_file if "root" in extra else secrets_file)
            assert done.returncode == 125 and said in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
        assert os.stat(where).st_mode & 0o777 == 0o700  # left as it was
        assert not os.path.exists(sock) and not os.path.exists(os.path.join(broker.dir, "x.sock"))
    finally:
        shutil.rmtree(where)


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_secretd_never_writes_through_a_link_another_user_planted(broker: Running, mode: int) -> None:
    # Started as root with --socket in a directory others may write, it chowned a link planted there
    # (<dir>/secretd -> any root directory) to its user, mode 0700; and --state-dir the same.
    from stockade.broker import identities

    shared = tempfile.mkdtemp(prefix="stockade-broker-shared-")
    victim = tempfile.mkdtemp(prefix="stockade-broker-victim-")
    try:
        os.chmod(shared, mode)
        nobody = pwd.getpwnam("nobody").pw_uid
        os.symlink(victim, os.path.join(shared, "secretd"))
        os.lchown(os.path.join(shared, "secretd"), nobody, -1)  # planted by another user
        with pytest.raises(ConfigError, match=r"must be root's and writable by root alone"):
            identities.prepare_run_dir("stockade-secrets", shared)
        os.chmod(shared, 0o755)  # root's alone now: a link in it (root's own doing) is still not followed
        with pytest.raises(OSError):
            identities.prepare_run_dir("stockade-secrets", shared)
        assert (os.stat(victim).st_uid, os.stat(victim).st_mode & 0o777) == (0, 0o700)  # untouched
        state = os.path.join(shared, "state")
        os.chmod(shared, mode)
        done = subprocess.run(
            [STOCKADE, "secretd", "--secrets-file", os.path.join(broker.dir, "secrets.json"), "--allow-uid", "0",
             "--socket", os.path.join(broker.dir, "y.sock"), "--key-file", os.path.join(broker.dir, "y.key"),
             "--state-dir", state],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 125 and "--state-dir: its parent" in done.stderr, done.stderr
        assert not os.path.exists(state)  # and nothing else was written before it was refused:
        assert not os.path.exists(os.path.join(broker.dir, "y.key")) and not os.path.exists(
            os.path.join(broker.dir, "y.sock")
        )
        # A directory root's alone, below one another user may swap (writable, no sticky bit): refused too.
        inner = os.path.join(shared, "inner")
        os.mkdir(inner, 0o755)
        if mode == 0o777:
            with pytest.raises(ConfigError, match=r"above it belongs to uid 0 with mode 0777"):
                identities.prepare_run_dir("stockade-secrets", inner)
        else:  # the sticky bit: no other user may move or replace what root made there
            identities.prepare_run_dir("stockade-secrets", inner)
            assert os.stat(os.path.join(inner, "secretd")).st_uid == pwd.getpwnam("stockade-secrets").pw_uid
    finally:
        shutil.rmtree(shared)
        shutil.rmtree(victim)
