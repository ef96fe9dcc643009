"""The background processes and published ports of ``AgentSandbox``, over the agent channel."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from ..errors import AgentError, AgentProtocolError, InvalidRequestError, PolicyError, start_error
from ..limits import check_call_size
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
        runtime_name: str
        forks_counted: bool

        async def _agent_call(self, method: str, params: dict[str, Any], timeout: float) -> Any: ...
        def _redacted(self, data: bytes) -> bytes: ...
        def _check_usable(self) -> None: ...

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
        raw = stdin.encode() if isinstance(stdin, str) else stdin
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
        self.forwarders.append(forwarder)
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
        said = await self._agent_call(method, params, timeout)
        if not isinstance(said, dict):
            raise AgentProtocolError(f"the agent's answer to {method} is not an object")
        if method == "proc_read" and self.egress is not None and self.egress.redactor:
            for stream in ("stdout", "stderr"):  # a background process's output leaves redacted too
                if isinstance(said.get(stream), str):
                    said[stream] = base64.b64encode(self._redacted(b64_field(said[stream]))).decode()
        return said

    def proc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return run_blocking(self.aproc_call(method, params, timeout))
