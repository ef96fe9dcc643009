"""A daemon started as root that gives root up (``STOCKADE_DAEMON_USER``): what it still does, what it no longer can.

As root (CI): the users come from ``stockade setup-users``; the daemon binds
its socket and starts its zygote as root, then runs as ``stockade`` with
no capability (or CAP_KILL alone, where cgroup v1 lacks cgroup.kill), and still builds,
limits and ends isolates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from stockade.client import Client
from tests.conftest import require
from tests.daemon_harness import start_daemon
from tests.integration.test_processes_daemon import _round_trip
from tests.integration.test_spawn_and_publish import ECHO_SERVER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts a daemon as root that then gives root up")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_the_daemon_gives_root_up_and_still_builds_limits_and_ends_isolates() -> None:
    require("process")
    subprocess.run([sys.executable, "-m", "stockade.cli", "setup-users"], check=True, capture_output=True, timeout=120)
    audit = tempfile.mkdtemp(prefix="stockade-audit-")
    os.chmod(audit, 0o755)  # the daemon, once it is stockade, goes through it to its own directory
    log = os.path.join(audit, "daemon", "audit.log")  # made for it when missing
    daemon = start_daemon(env={"STOCKADE_DAEMON_USER": "stockade", "STOCKADE_AUDIT_LOG": log})
    try:
        deadline = time.monotonic() + 60  # its socket is bound as root, a moment before root goes
        while "gave up root" not in daemon.logs():
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.logs()
            time.sleep(0.05)
        status = _status(daemon.proc.pid)
        uid = pwd.getpwnam("stockade").pw_uid
        assert status["Uid"].split() == [str(uid)] * 4  # real, effective, saved, filesystem
        from stockade.runtimes.process.cgroup_layout import detect_layout

        kept = 0 if detect_layout().v2_parent is not None else 1 << 5  # none, or CAP_KILL without cgroup.kill
        assert int(status["CapEff"], 16) == kept and int(status["CapPrm"], 16) == kept
        assert "stockade-secrets" in subprocess.run(["id", "-Gn", "stockade"], capture_output=True, text=True).stdout
        with Client(daemon.socket_path) as client:
            ran = client.execute(code="import os; print(os.getuid())")
            assert ran.exit_code == 0 and ran.stdout == "1000\n"  # inside; a sandbox uid outside
            greedy = client.execute(code="x = bytearray(300 * 1024 * 1024)", policy={"memory_mb": 64})
            assert greedy.termination_reason == "memory_limit", greedy
            slow = client.execute(command=["sleep", "30"], policy={"timeout_seconds": 2})
            assert slow.termination_reason == "timeout"  # ended: its group emptied (or CAP_KILL)
            blocked = client.execute(code="import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)")
            assert blocked.violation_counts == {"socket": 1}
            runtimes = {r["name"]: r for r in client.call("runtimes")}
            for name in ("gvisor", "microvm"):
                assert not runtimes[name]["available"] and "STOCKADE_DAEMON_USER" in runtimes[name]["reason"]
            # Without root it cannot join an isolate's network namespace: a published port is
            # relayed through the agent, its calls in the held sandbox's turn beside the client's.
            with client.sandbox(network_policy="loopback", publish=[7000]) as sb:
                echo = sb.spawn(["python3", "-c", ECHO_SERVER])
                said, until = b"", time.monotonic() + 60
                while b"listening" not in said and time.monotonic() < until:
                    said += echo.read()[0]
                    time.sleep(0.05)
                assert _round_trip(sb.published[7000], b"stockade") == b"edakcots"
                assert sb.exec(["echo", "meanwhile"]).stdout == "meanwhile\n"
        assert "gave up root: the daemon runs as stockade" in daemon.logs()
        assert os.stat(os.path.dirname(log)).st_uid == uid and os.path.getsize(log) > 0
        # Every thread's capabilities, not only the main one's: they are per thread, and one started as
        # root (the audit log's writer) kept the whole bounding set, for whatever it would exec.
        threads = os.listdir(f"/proc/{daemon.proc.pid}/task")
        assert len(threads) > 1  # the audit log's writer among them, by now
        for task in threads:
            try:
                with open(f"/proc/{daemon.proc.pid}/task/{task}/status") as f:
                    caps = dict(line.rstrip("\n").split(":\t", 1) for line in f if line.startswith("Cap"))
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended since it was listed
            assert (int(caps["CapBnd"], 16), int(caps["CapPrm"], 16)) == (kept, kept), (task, caps)
        # Stopped, it ends cleanly, its socket in root's directory and all: and the groups it was
        # handed as root (which it cannot remove) go with its root zygote.
        assert daemon.stop() == 0, daemon.logs()
        assert "Traceback" not in daemon.logs(), daemon.logs()
        layout = detect_layout()
        parents = [*layout.v1_parents.values(), *([layout.v2_parent] if layout.v2_parent else [])]
        mine = f"stockade-{daemon.proc.pid}-"
        deadline = time.monotonic() + 30  # the zygote removes them as it ends (within its 20 s clean-up)
        while (left := [os.path.join(p, n) for p in parents for n in os.listdir(p) if n.startswith(mine)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert left == [], "the daemon's groups outlived it"
    finally:
        daemon.cleanup()
        shutil.rmtree(audit, ignore_errors=True)
        from stockade.runtimes.process.cgroups import CgroupManager

        CgroupManager().sweep()  # the groups delegated to the daemon, now that it is gone


def test_serve_as_root_becomes_stockade_by_itself_once_the_accounts_exist_and_root_is_kept_on_request() -> None:
    require("process")
    subprocess.run([sys.executable, "-m", "stockade.cli", "setup-users"], check=True, capture_output=True, timeout=120)
    uid = pwd.getpwnam("stockade").pw_uid
    audit = tempfile.mkdtemp(prefix="stockade-audit-")
    os.chmod(audit, 0o755)
    for asked, expected in (("", uid), ("root", 0)):
        log = os.path.join(audit, asked or "auto", "audit.log")  # a directory of its own, made for it
        daemon = start_daemon(env={"STOCKADE_DAEMON_USER": asked, "STOCKADE_AUDIT_LOG": log})
        try:
            with Client(daemon.socket_path) as client:
                assert client.execute(code="print(1)").stdout == "1\n"
                runtimes = {r["name"]: r for r in client.call("runtimes")}
            assert _status(daemon.proc.pid)["Uid"].split() == [str(expected)] * 4, daemon.logs()
            # Given up, root's runtimes say how to keep it; kept, they are not refused for it.
            said = "STOCKADE_DAEMON_USER=root" in runtimes["gvisor"]["reason"]
            assert said == (expected != 0), runtimes["gvisor"]
        finally:
            daemon.cleanup()
            from stockade.runtimes.process.cgroups import CgroupManager

            CgroupManager().sweep()
    shutil.rmtree(audit, ignore_errors=True)


def test_a_daemon_that_gives_root_up_keeps_its_audit_log_in_a_directory_root_makes_for_it() -> None:
    """No STOCKADE_AUDIT_LOG: the state directory is root's (root's own state is there), so the log
    goes to ``<state dir>/audit-stockade/``, made for the daemon's user, not refused at the start."""
    require("process")
    subprocess.run([sys.executable, "-m", "stockade.cli", "setup-users"], check=True, capture_output=True, timeout=120)
    state = tempfile.mkdtemp(prefix="stockade-state-")
    os.chmod(state, 0o755)  # root's, as /var/lib/stockade is
    daemon = start_daemon(
        env={"STOCKADE_DAEMON_USER": "stockade", "STOCKADE_AUDIT_LOG": "", "STOCKADE_STATE_DIR": state}
    )
    try:
        with Client(daemon.socket_path) as client:
            assert client.execute(code="print(1)").stdout == "1\n"
        log = os.path.join(state, "audit-stockade", "audit.log")
        assert os.stat(os.path.dirname(log)).st_uid == pwd.getpwnam("stockade").pw_uid
        assert os.stat(state).st_uid == 0 and os.path.getsize(log) > 0, daemon.logs()
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.cleanup()
        shutil.rmtree(state, ignore_errors=True)
        from stockade.runtimes.process.cgroups import CgroupManager

        CgroupManager().sweep()


def test_a_daemon_whose_user_could_not_reach_its_audit_log_does_not_start() -> None:
    """A state directory of mode 0700 (systemd's StateDirectoryMode, as the unit had it): the daemon
    started, gave root up and lost every record, its start's too, saying so only in its log."""
    require("process")
    subprocess.run([sys.executable, "-m", "stockade.cli", "setup-users"], check=True, capture_output=True, timeout=120)
    state = tempfile.mkdtemp(prefix="stockade-state-")
    os.chmod(state, 0o700)
    socket_path = os.path.join(state, "s.sock")
    env = {**os.environ, "STOCKADE_DAEMON_USER": "stockade", "STOCKADE_AUDIT_LOG": "", "STOCKADE_STATE_DIR": state,
           "STOCKADE_SOCKET": socket_path, "STOCKADE_POOL_SIZE": "0"}  # fmt: skip
    try:
        done = subprocess.run([sys.executable, "-m", "stockade.cli", "serve"], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 125, done.stderr
        assert f"{state} (mode 0700) is not searchable by it" in done.stderr, done.stderr
        assert not os.path.exists(socket_path)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_daemon_that_gives_root_up_binds_its_http_port_first() -> None:
    """Its HTTP port was bound after root had gone: a port below 1024 (as cli.md says a daemon that
    gives root up may take) failed the start, after the Unix socket listened."""
    require("process")
    subprocess.run([sys.executable, "-m", "stockade.cli", "setup-users"], check=True, capture_output=True, timeout=120)
    import socket

    for port in range(1000, 1010):  # a free port below 1024
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
            break
        except OSError:
            continue
        finally:
            probe.close()
    audit = tempfile.mkdtemp(prefix="stockade-audit-")
    os.chmod(audit, 0o755)
    daemon = start_daemon(env={"STOCKADE_DAEMON_USER": "stockade", "STOCKADE_AUDIT_LOG": os.path.join(audit, "d", "a")},
                          http=f"127.0.0.1:{port}")  # fmt: skip
    try:
        assert "gave up root" in daemon.logs()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    finally:
        assert daemon.stop() == 0, daemon.logs()
        daemon.cleanup()
        shutil.rmtree(audit, ignore_errors=True)


def test_placed_on_a_ray_cluster_the_daemon_keeps_root_unless_told_otherwise() -> None:
    """Given root up, its Ray driver could not write the session directory of this host's node (a
    node started as root owns it), and Ray aborted the daemon."""
    from stockade.daemon.privileges import daemon_user_for

    subprocess.run([sys.executable, "-m", "stockade.cli", "setup-users"], check=True, capture_output=True, timeout=120)
    assert daemon_user_for(None, "local") == "stockade"
    assert daemon_user_for(None, "ray") is None
    assert daemon_user_for("stockade", "ray") == "stockade"  # a node started as that user: the operator says so
    assert daemon_user_for("root", "local") is None
