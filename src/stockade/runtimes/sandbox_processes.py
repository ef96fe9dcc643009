"""The background processes and published ports of ``AgentSandbox``, over the agent channel."""

from __future__ import annotations

import base64
import threading
from typing import TYPE_CHECKING, Any

from ..errors import AgentError, AgentProtocolError, InvalidRequestError, PolicyError, SandboxClosedError, start_error
from ..limits import check_call_size, stdin_bytes
from ..policy import Policy
from .agent_requests import exec_params, job_limits
from .blocking import run_blocking
from .publish import AgentRelay, AsyncTurn, Forwarder, parse_publish
from .spawned import Process, listed_processes
from .verdict import b64_field

if TYPE_CHECKING:
    from .egress import Egress


class AgentProcesses:
    """Processes that outlive a call (``spawn``) and host ports that reach the isolate's loopback."""

    if TYPE_CHECKING:  # given by AgentSandbox
        policy: Policy
        environment_env: dict[str, str]
        egress: Egress | None
        forwarders: list[Forwarder | AgentRelay]
        forwarders_lock: threading.Lock
        _closed: bool
        runtime_name: str
        forks_counted: bool

        async def _agent_call(self, method: str, params: dict[str, Any], timeout: float) -> Any: ...
        def _redacted(self, data: bytes) -> bytes: ...
        def _check_usable(self) -> None: ...
        def _broke_protocol(self, what: str) -> AgentProtocolError: ...

    def spawn(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """Start ``argv`` in the background; its handle (``runtimes/spawned.py``). It runs until it
        ends, is killed, or the sandbox closes; other calls go on meanwhile."""
        return run_blocking(self.aspawn(argv, stdin=stdin, env=env, cwd=cwd))

    async def aspawn(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """``spawn``, awaited (a Ray node's actor starts one for its caller so)."""
        raw = stdin_bytes(stdin)
        check_call_size("stdin", raw)
        params = {
            **exec_params(argv, cwd),
            "env": {**self.environment_env, **self.policy.environment, **(env or {})},
            "stdin": base64.b64encode(raw).decode() if raw else "",
            "limits": job_limits(self.policy, forks_counted=self.forks_counted),
        }
        try:
            said = await self.aproc_call("spawn", params)
        except AgentError as exc:
            raise start_error(exc) from None  # no such program: FileNotFoundError, as Popen raises
        return Process(self, str(said.get("handle")), int(said.get("pid", 0)), list(argv))

    def publish(self, spec: int | str, *, turn: AsyncTurn | None = None) -> tuple[str, int]:
        """Forward a host loopback port to ``spec``'s port on this isolate's own loopback
        (``runtimes/publish.py``); the host address and port. ``turn``: the owner's calls queue
        on an event loop (the daemon, ``AsyncSandbox``), and a relay's calls join them there.
        Runtimes that can reach their isolate's network namespace override ``_forwarder``."""
        address, host_port, port = parse_publish(spec)
        self._check_usable()
        if self.policy.network_policy != "loopback":
            raise PolicyError(
                "publishing a port needs network_policy='loopback': the isolate has no loopback otherwise"
            )
        for held in self.forwarders:  # (one port inside may have several host ports: each a forward)
            if host_port and held.address == (address, host_port):
                raise InvalidRequestError(
                    f"publish {address}:{host_port} -> {port}: this sandbox already publishes {address}:{host_port} "
                    f"(to its port {held.port}); pick another host port, or 0 for any free one"
                )
        forwarder = self._forwarder(address, host_port, port, turn)
        with self.forwarders_lock:  # against a close at the same moment, which closes those it finds
            kept = not self._closed
            if kept:
                self.forwarders.append(forwarder)
        if not kept:
            forwarder.close()
            raise SandboxClosedError("the sandbox was closed while its port was being published")
        return forwarder.address

    def port_activity(self) -> float | None:
        """When its published ports were last in use (now while a connection is open); None: it has none."""
        return max((f.active_since() for f in self.forwarders), default=None)

    def _forwarder(self, address: str, host_port: int, port: int, turn: AsyncTurn | None) -> Forwarder | AgentRelay:
        # The isolate's loopback is out of a host thread's reach (gVisor's netstack, a guest
        # kernel): relayed through the agent. The process runtime joins it instead.
        return AgentRelay(self, address, host_port, port, turn)

    def processes(self) -> list[dict[str, Any]]:
        """The background processes the agent holds: ``{handle, pid, argv, running, exit_code}``."""
        return listed_processes(self)

    async def aproc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """A background-process call to the agent; its answer as an object (a garbled one is refused)."""
        said: dict[str, Any] = await self._agent_call(method, params, timeout)
        wrong = _wrong_answer(method, said)
        if wrong is not None:  # read as given, it would raise in the caller's hands (a daemon's 500)
            raise self._broke_protocol(f"the agent's answer to {method} {wrong}")
        if method == "proc_read" and self.egress is not None and self.egress.redactor:
            for stream in ("stdout", "stderr"):  # a background process's output leaves redacted too
                if isinstance(said.get(stream), str):
                    said[stream] = base64.b64encode(self._redacted(b64_field(said[stream]))).decode()
        return said

    def proc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return run_blocking(self.aproc_call(method, params, timeout))


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


def _summary_wrong(said: dict[str, Any]) -> str | None:
    """What is wrong with a process's summary as the agent sends it (``Spawned.summary``)."""
    argv = said.get("argv")
    code = said.get("exit_code")
    if not isinstance(said.get("handle"), str) or not _count(said.get("pid")):
        return "names no process (a handle and a pid)"
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        return "has an argv that is not a list of strings"
    if not isinstance(said.get("running"), bool) or not (code is None or type(code) is int):
        return "has a state that is not running and an exit code"
    return None


def _wrong_answer(method: str, said: Any) -> str | None:
    """What is wrong with the agent's answer to a background-process call (None: nothing)."""
    if not isinstance(said, dict):
        return "is not an object"
    if method in ("spawn", "tunnel_open"):
        if not isinstance(said.get("handle"), str) or not _count(said.get("pid")):
            return "names no process (a handle and a pid)"
        return None
    if method == "proc_write":
        return None if _count(said.get("queued")) else "says no queued byte count"
    if method == "proc_list":
        listed = said.get("processes")
        if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
            return "is not a list of processes"
        return next((f"lists a process that {w}" for p in listed if (w := _summary_wrong(p))), None)
    wrong = _summary_wrong(said)  # proc_read, proc_wait, proc_kill
    if wrong is None and method == "proc_read":
        dropped = said.get("dropped")
        if not isinstance(dropped, dict) or not all(_count(dropped.get(s, 0)) for s in ("stdout", "stderr")):
            return "has a dropped count that is not a count of bytes per stream"
        for stream in ("stdout", "stderr"):
            try:
                base64.b64decode(said.get(stream, ""), validate=True)
            except (ValueError, TypeError):
                return f"has {stream} that is not base64"
    return wrong
