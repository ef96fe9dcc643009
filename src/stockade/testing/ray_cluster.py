"""A real Ray cluster on this one machine: a head and worker nodes, each its own ``ray start``.

For tests and benchmarks of the ``ray`` placement (docs/scale-out.md): each node
is a ``ray start --block`` of its own, with its own raylet, object store and
ports (several raylets on one host need distinct ones), listening on loopback,
and advertising the resources it is given (``stockade ray resources`` says what
a real node would). A node's processes (raylet, workers, the actors stockade
runs there, their zygotes) all carry an environment marker naming the node,
which is how ``kill_node`` finds every one of them, even those a dead parent
left to init, and how ``leftovers`` proves nothing is left. Ray's dashboard
and runtime-env agents overwrite that environment when they rename themselves
(setproctitle), and a raylet restarts an agent that dies: those are found by
the files they hold open in the cluster's temp dir (each inherits its raylet's
log files), whoever their parent is by then.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MARKER = "STOCKADE_RAY_TEST_NODE"
_WORKER_PORTS = 200  # per node: the ports its Ray workers listen on
JOIN_WAIT_S = 35  # how long a joining node waits for the GCS before it gives up (Ray's 30 s, and a margin)


@dataclass
class RayNode:
    name: str
    resources: dict[str, float]
    num_cpus: int
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""
    ports: dict[str, int] = field(default_factory=dict)


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, all distinct (held open together while chosen)."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _free_range(width: int, avoid: set[int]) -> int:
    """The first port of ``width`` ports below the kernel's ephemeral range with nothing bound."""
    for _ in range(50):
        start = 20000 + secrets.randbelow(10000 // width) * width
        if any(p in avoid for p in range(start, start + width)):
            continue
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", start))
        except OSError:
            continue
        finally:
            probe.close()
        return start
    raise RuntimeError("no free port range for a Ray node's workers")


def marked_pids(value: str) -> list[int]:
    """The processes whose environment carries ``MARKER=value`` (or a prefix of it ending in '-')."""
    want = f"{MARKER}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(item == want or (value.endswith("-") and item.startswith(want)) for item in env):
            found.append(int(entry))
    return found


def _open_files(pid: str) -> list[str]:
    """What ``pid``'s descriptors name (a removed file keeps its path, then " (deleted)")."""
    names: list[str] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return names
    for fd in fds:
        with contextlib.suppress(OSError):
            names.append(os.readlink(f"/proc/{pid}/fd/{fd}").removesuffix(" (deleted)"))
    return names


def holders(match: Callable[[str], bool]) -> list[int]:
    """The processes but this one holding open a file whose path ``match`` takes."""
    me = str(os.getpid())
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and e != me and any(map(match, _open_files(e)))]


def _node_log(path: str) -> bool:
    """A log of a node's own processes (raylet.*, gcs_server.*), which everything they start
    inherits; a Ray driver (this process, a daemon under test) holds none of them."""
    return os.path.basename(path).startswith(("raylet.", "gcs_server."))


def _kill_until_gone(processes: Callable[[], list[int]], what: str) -> None:
    """SIGKILL whatever ``processes`` names until it names none (30 s at most)."""
    deadline = time.monotonic() + 30
    while pids := processes():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} left processes that do not die: {pids}")
        time.sleep(0.05)


class LocalRayCluster:
    """``nodes``: the head first. ``start()`` waits until every node has joined."""

    def __init__(self, nodes: list[tuple[int, dict[str, float]]], object_store_mb: int = 80) -> None:
        self.id = secrets.token_hex(4)
        self.temp_dir = tempfile.mkdtemp(prefix="stockade-ray-")
        self.nodes = [RayNode(f"{self.id}-{i}", dict(res), cpus) for i, (cpus, res) in enumerate(nodes)]
        self.object_store_mb = object_store_mb
        self.address = ""

    def _env(self, node: RayNode) -> dict[str, str]:
        env = dict(os.environ)
        env.update({MARKER: node.name, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
        # A lost node is noticed in ~3 s (the default takes ~30 s), so that tests of node loss are short.
        env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"})  # fmt: skip
        return env

    def _assign_ports(self) -> None:
        """Every node's ports, chosen together: each distinct from every other node's."""
        names = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port"]  # fmt: skip
        wanted = [[*names, "port", "dashboard-port"]] + [names] * (len(self.nodes) - 1)
        ports = iter(_free_ports(sum(len(w) for w in wanted)))
        taken: set[int] = set()
        for node, node_names in zip(self.nodes, wanted, strict=True):
            node.ports = {name: next(ports) for name in node_names}
            taken |= set(node.ports.values())
        for node in self.nodes:
            start = _free_range(_WORKER_PORTS, taken)
            node.ports["min-worker-port"], node.ports["max-worker-port"] = start, start + _WORKER_PORTS - 1
            taken |= set(range(start, start + _WORKER_PORTS))

    def _command(self, node: RayNode, head: bool) -> list[str]:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={node.num_cpus}",
               f"--resources={json.dumps(node.resources)}",
               f"--object-store-memory={self.object_store_mb << 20}"]  # fmt: skip
        cmd += [f"--{name}={port}" for name, port in node.ports.items()]
        if head:
            cmd += ["--head", "--include-dashboard=false", f"--temp-dir={self.temp_dir}"]
        else:
            cmd += [f"--address={self.address}"]
        return cmd

    def _launch(self, node: RayNode, head: bool) -> None:
        node.log = os.path.join(self.temp_dir, f"{node.name}.log")
        with open(node.log, "wb") as log:
            node.proc = subprocess.Popen(
                self._command(node, head), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._env(node), start_new_session=True,
            )  # fmt: skip

    def start(self, timeout: float = 180.0) -> LocalRayCluster:
        try:
            self._start_head(time.monotonic() + timeout)
            self._wait_for(1, time.monotonic() + timeout)
            for index in range(1, len(self.nodes)):
                self._join(index, time.monotonic() + timeout)
            self._wait_for(len(self.nodes), time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def alive_nodes(self) -> int:
        """How many nodes the cluster's GCS counts alive (asked by a short-lived ``ray`` process)."""
        code = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, self.address], capture_output=True, timeout=60,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, check=False,
        )  # fmt: skip
        try:
            return int(out.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def _start_head(self, deadline: float) -> None:
        """Start the head; one that gives up on its own raylet (Ray's 30 s wait for it to register,
        which a loaded machine can miss: "The current node timed out during startup") is killed,
        with everything it started, and started again on fresh ports, until ``deadline``."""
        head = self.nodes[0]
        attempt = 0
        while True:
            attempt += 1
            self._assign_ports()
            self._launch(head, head=True)
            self.address = f"127.0.0.1:{head.ports['port']}"
            try:
                self._wait_for_log(head, "Ray runtime started", deadline)
                return
            except RuntimeError as exc:
                self.kill_node(0)
                _kill_until_gone(lambda: holders(self._node_log_here), "the Ray head")  # its GCS too
                if "timed out during startup" not in str(exc) or time.monotonic() > deadline - JOIN_WAIT_S:
                    raise RuntimeError(f"{exc}\n(attempt {attempt})") from None

    def _join(self, index: int, deadline: float) -> None:
        """Start worker node ``index``; one that gives up joining (Ray's own 30 s wait for the
        GCS, which a loaded machine can miss) is killed and started again, until ``deadline``."""
        node = self.nodes[index]
        attempt = 0
        while True:
            attempt += 1
            self._launch(node, head=False)
            try:
                self._wait_for_log(node, "Ray runtime started", deadline)
                return
            except RuntimeError as exc:
                self.kill_node(index)
                if time.monotonic() > deadline - JOIN_WAIT_S:  # no room for another wait
                    gcs = self._session_log("gcs_server.err") + self._session_log("gcs_server.out")
                    raise RuntimeError(f"{exc}\n(attempt {attempt}; the head's GCS log ends: {gcs})") from None

    def _session_log(self, name: str) -> str:
        """The end of one of the head's log files (the session's logs directory)."""
        for path in glob.glob(os.path.join(self.temp_dir, "session_*", "logs", name)):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        return ""

    def _wait_for_log(self, node: RayNode, line: str, deadline: float) -> None:
        while line not in self.tail(node):
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"ray node {node.name} exited: {self.tail(node)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray node {node.name} did not start in time: {self.tail(node)}")
            time.sleep(0.2)

    def _wait_for(self, count: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited: {self.tail(node)}")
            if self.alive_nodes() >= count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not reach {count} nodes in time: {self.tail(self.nodes[-1])}")

    def tail(self, node: RayNode) -> str:
        try:
            with open(node.log, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def kill_node(self, index: int) -> None:
        """The node is lost: every process of it gets SIGKILL at once, as a machine that goes away."""
        node = self.nodes[index]
        logs: set[str] = set()  # the node's raylet's log files, which every process it starts inherits

        def processes() -> list[int]:
            marked = marked_pids(node.name)
            for pid in marked:
                logs.update(f for f in _open_files(str(pid)) if os.path.basename(f).startswith("raylet."))
            return sorted(set(marked) | set(holders(logs.__contains__)))

        _kill_until_gone(processes, f"ray node {node.name}")
        if node.proc is not None:
            node.proc.wait()

    def index_of(self, node_id: str) -> int:
        """Which of this cluster's nodes Ray calls ``node_id`` (by its node manager's port; in a driver)."""
        import ray

        port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)  # type: ignore[no-untyped-call]
        return next(i for i, node in enumerate(self.nodes) if node.ports["node-manager-port"] == port)

    def _node_log_here(self, path: str) -> bool:
        return path.startswith(self.temp_dir + "/") and _node_log(path)

    def leftovers(self) -> list[int]:
        return sorted(set(marked_pids(f"{self.id}-")) | set(holders(self._node_log_here)))

    def stop(self) -> None:
        """Every node killed (workers first), then anything a node started that still holds
        its logs, and the cluster's files removed."""
        for index in reversed(range(len(self.nodes))):
            self.kill_node(index)
        _kill_until_gone(lambda: holders(self._node_log_here), "the Ray cluster")
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
