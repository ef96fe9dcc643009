"""deploy/docker/supervisord.conf, run by Debian's supervisord on this host (no container engine can
pull a base image here): the broker starts first and drops to its user, the daemon after it, and a
run through the daemon gets its secret from the broker."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from stockade import Policy
from tests.conftest import require
from tests.egress_harness import SECRET_VALUE, Upstreams, serve_upstreams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(ROOT, "deploy", "docker", "supervisord.conf")
SUPERVISORD = shutil.which("supervisord")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="supervisord starts the broker as root, which drops to its user"),
    pytest.mark.skipif(SUPERVISORD is None, reason="Debian's supervisor package is not installed"),
]


@pytest.fixture
def up() -> Iterator[Upstreams]:
    yield from serve_upstreams()


def _wait(what: str, check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _sandbox_range() -> str:
    from stockade.runtimes.process.uids import DEFAULT_RANGE

    return DEFAULT_RANGE


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _pid_of(ctl: list[str], name: str) -> int:
    out = subprocess.run([*ctl, "pid", name], capture_output=True, text=True, timeout=30).stdout.strip()
    return int(out) if out.isdigit() else 0


def _logs(where: str) -> str:
    found = []
    for name in sorted(os.listdir(where)):
        with open(os.path.join(where, name), errors="replace") as f:
            found.append(f"--- {name}\n{f.read()[-3000:]}")
    return "\n".join(found)


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


def test_supervisord_runs_the_broker_first_as_its_user_and_the_daemon_uses_it(up: Upstreams) -> None:
    require("process")
    subprocess.run([sys.executable, "-m", "stockade.cli", "setup-users"], check=True, capture_output=True, timeout=120)
    where = tempfile.mkdtemp(prefix="stockade-deploy-")
    os.chmod(where, 0o755)  # the broker, once it is its own user, goes through it to its state directory
    run, logs = os.path.join(where, "run"), os.path.join(where, "log")
    os.makedirs(run, mode=0o755)
    os.makedirs(logs, mode=0o700)
    secrets = os.path.join(where, "secrets.json")
    with open(secrets, "w") as f:
        json.dump({"API_KEY": {"value": SECRET_VALUE, "hosts": ["*.stockade.test"]}}, f)
    os.chmod(secrets, 0o600)
    os.chown(secrets, pwd.getpwnam("stockade-secrets").pw_uid, -1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env.update({
        "STOCKADE_HOME": os.path.dirname(os.path.dirname(sys.executable)).removesuffix("/.venv") or ROOT,
        "STOCKADE_RUN": run, "STOCKADE_LOG_DIR": logs, "STOCKADE_SECRETS_FILE": secrets,
        "STOCKADE_BROKER_STATE": os.path.join(where, "broker-state"),
        "STOCKADE_DAEMON_STATE": os.path.join(where, "daemon-state"),
        "STOCKADE_SOCKET": os.path.join(run, "stockade.sock"), "STOCKADE_SOCKET_PERMS": "0600",
        # Only the default policy's isolates kept warm: a held sandbox's egress worker is then
        # the fork server's only child (a pool of allowlist isolates would have workers of its own).
        "STOCKADE_POOL_SIZE": "1", "STOCKADE_POOL_SHAPES": "1",
        "STOCKADE_EGRESS_HOSTS_FILE": os.environ["STOCKADE_EGRESS_HOSTS_FILE"],
        "STOCKADE_EGRESS_CA_FILE": os.environ["STOCKADE_EGRESS_CA_FILE"],
        "STOCKADE_EGRESS_NETWORKS": "127.0.0.0/8",  # the test's upstreams, on the host's loopback
    })  # fmt: skip
    supervisord = subprocess.Popen([SUPERVISORD, "-n", "-c", CONF], env=env, start_new_session=True)
    ctl = ["supervisorctl", "-c", CONF]
    try:
        _wait("the daemon's socket", lambda: os.path.exists(env["STOCKADE_SOCKET"]))
        conf_vars = (
            "STOCKADE_HOME",
            "STOCKADE_RUN",
            "STOCKADE_LOG_DIR",
            "STOCKADE_BROKER_STATE",
            "STOCKADE_DAEMON_STATE",
        )
        ctl_env = {**os.environ, **{k: env[k] for k in conf_vars}}
        ctl = ["env", *(f"{k}={v}" for k, v in ctl_env.items() if k.startswith("STOCKADE_")), *ctl]
        broker_pid, daemon_pid = _pid_of(ctl, "secretd"), _pid_of(ctl, "daemon")
        assert broker_pid and daemon_pid, _logs(logs)
        # Three processes, three identities: supervisord as root, the broker and the daemon as their own users.
        assert _uid_of(supervisord.pid) == 0
        assert _uid_of(broker_pid) == pwd.getpwnam("stockade-secrets").pw_uid
        _wait("the daemon to give root up", lambda: _uid_of(daemon_pid) == pwd.getpwnam("stockade").pw_uid)
        with open(os.path.join(logs, "supervisord.log")) as f:
            log = f.read()
        assert log.index("spawned: 'secretd'") < log.index("spawned: 'daemon'")  # the broker first
        key = os.stat(os.path.join(run, ".session"))
        assert oct(key.st_mode & 0o777) == "0o640" and key.st_gid == grp.getgrnam("stockade-secrets").gr_gid

        from stockade.client import Client

        host = f"api.stockade.test:{up.https.port}"
        policy = Policy(network_policy="allowlist", allowed_hosts=[host], allowed_cidrs=["127.0.0.0/8"],
                        secrets=[{"name": "API_KEY", "hosts": [host]}], timeout_seconds=60)  # fmt: skip
        code = (
            "import os, urllib.request\n"
            f"r = urllib.request.Request('https://{host}/deployed', headers={{'Authorization': 'Bearer ' + "
            "os.environ['API_KEY']})\nprint(urllib.request.urlopen(r, timeout=20).status)"
        )
        with Client(env["STOCKADE_SOCKET"]) as client:
            result = client.execute(code=code, policy=policy.to_dict())
        assert result.stdout == "200\n", result.stderr
        assert up.https.seen[-1]["authorization"] == f"Bearer {SECRET_VALUE}"
        with open(f"/proc/{daemon_pid}/environ", "rb") as f:
            environ = f.read()
        assert SECRET_VALUE.encode() not in environ and b"STOCKADE_SESSION_KEY=" not in environ
        # The daemon read the key as root and kept no group of the broker's: what it starts cannot read it.
        broker_gid = grp.getgrnam("stockade-secrets").gr_gid
        assert str(broker_gid) not in _status(daemon_pid)["Groups"].split()
        with Client(env["STOCKADE_SOCKET"]) as client, client.sandbox(policy.to_dict()) as sb:
            forks = [p for p in _children(daemon_pid) if b"stockade.egress.worker" in _cmdline(p)]
            assert len(forks) == 1, forks  # the fork server; the worker is its child
            # The one-shot run's own worker ends a moment after its answer: this sandbox's is then alone.
            deadline = time.monotonic() + 30
            while len(workers := _children(forks[0])) != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(workers) == 1, workers
            worker = _status(workers[0])
            # Forked by root's fork server, started before the daemon gave root up: its isolate's own uid.
            first, last = (int(n) for n in _sandbox_range().split("-"))
            assert first <= int(worker["Uid"].split()[0]) <= last, worker["Uid"]
            assert worker["Groups"].strip() == "" and worker["NoNewPrivs"] == "1"
            assert int(worker["CapEff"], 16) == 0 and int(worker["CapBnd"], 16) == 0
            assert sb.run_code(code).stdout == "200\n"
    finally:
        subprocess.run([*ctl, "shutdown"], capture_output=True, timeout=60)
        try:
            supervisord.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(supervisord.pid, 9)
            supervisord.wait(10)
        shutil.rmtree(where, ignore_errors=True)
        from stockade.runtimes.process.cgroups import CgroupManager

        CgroupManager().sweep()  # the groups delegated to the daemon, now that it is gone
