"""The ``fake`` runtime: the real guest agent in a plain child process, with no isolation.

It exists for tests and development (the httpx ``MockTransport`` habit): it
speaks the same protocol to the same agent, so the conformance suite runs
against it too, but it confines nothing. Its isolation level is ``none`` and
every result lists each limit as not enforced. Never a default.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .. import environments
from ..agent import runner
from ..errors import SandboxStartError
from ..policy import Policy
from .base import BASE_ENV, Availability, Runtime
from .process.zygote import AGENT_PARENT
from .sandbox import AgentSandbox

# The agent is the subreaper of what its runs start, as an isolate's agent is its pid namespace's
# init: a process that leaves its group or session, or outlives its parent, stays below it, and
# ``kill`` finds it there.
_BOOT = runner.bootstrap(
    "import sys; sys.path.insert(0, sys.argv[1]); from agent import linux, server; "
    "linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)",
    "server.main()",
)
# Rounds of finding and killing the agent's descendants: each round's killed cannot fork again,
# so only what forked while the round was listing is left for the next.
KILL_ROUNDS = 50


def _python() -> str:
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


class FakeSandbox(AgentSandbox):
    runtime_name = "fake"

    def __init__(
        self, policy: Policy, conn: socket.socket, cold_ms: float, proc: subprocess.Popen[bytes], scratch: str
    ) -> None:
        super().__init__(policy, conn, cold_ms)
        self.proc = proc
        self.scratch_dir = scratch
        self.unenforced_limits = [
            "memory_mb, cpu_limit, pids_limit, disk_mb, network_policy, filesystem isolation: "
            "the fake runtime isolates nothing"
        ]

    def kill(self) -> None:
        """The agent and everything below it, whatever group or session it made for itself."""
        if self.proc.poll() is not None:
            return
        for _ in range(KILL_ROUNDS):
            below = _descendants(self.proc.pid)
            if not below:
                break
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _release(self) -> None:
        self.proc.wait()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """The live (not yet exited) processes below ``pid``, read from /proc's children lists."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                todo.append(child)
                if not _exited(child):
                    found.append(child)
    return found


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # the state follows the name
    except OSError:
        return True


class FakeRuntime(Runtime):
    name = "fake"
    isolation = "none"

    def detect(self) -> Availability:
        return Availability(self.name, True, self.isolation, "no isolation: tests and development only")

    def start(self, policy: Policy) -> FakeSandbox:
        started = time.monotonic()
        env_root = None
        if policy.environment_id is not None:
            environments.share(policy)  # built first if need be; not mounted: used where it lies
            env_root = environments.env_path(policy.environment_id)
        host, guest = socket.socketpair()
        scratch = tempfile.mkdtemp(prefix="stockade-fake-")
        env = {**BASE_ENV, "HOME": scratch, "TMPDIR": scratch, "STOCKADE_AGENT_FD": str(guest.fileno())}
        try:
            proc = subprocess.Popen(
                [
                    sys.executable if not os.path.exists("/usr/bin/python3") else "/usr/bin/python3",
                    "-I",
                    "-c",
                    _BOOT,
                    AGENT_PARENT,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=[guest.fileno()],
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            host.close()
            shutil.rmtree(scratch, ignore_errors=True)
            raise SandboxStartError(f"cannot start the agent: {exc}") from None
        finally:
            guest.close()
        sandbox = FakeSandbox(policy, host, (time.monotonic() - started) * 1000, proc, scratch)
        if env_root is not None:
            sandbox.environment_env = environments.run_env(env_root, os.path.join(scratch, ".cache"), BASE_ENV["PATH"])
        return sandbox
