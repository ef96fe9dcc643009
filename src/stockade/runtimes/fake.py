"""The ``fake`` runtime: the real guest agent in a plain child process, with no isolation.

It exists for tests and development (the httpx ``MockTransport`` habit): it
speaks the same protocol to the same agent, so the conformance suite runs
against it too, but it confines nothing. Its isolation level is ``none`` and
every result lists each limit as not enforced. Never a default.
"""

from __future__ import annotations

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

_BOOT = runner.bootstrap("import sys; sys.path.insert(0, sys.argv[1]); from agent import server", "server.main()")


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
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def _release(self) -> None:
        self.proc.wait()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)


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
