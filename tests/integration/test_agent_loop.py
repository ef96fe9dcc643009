"""End to end, as an agent builder uses stockade: CSV in, analysis, a PNG out, across cells.

A stateful interpreter in an environment with pandas and matplotlib, driven
cell by cell as an LLM agent loop drives it (each cell sees what the earlier
ones made), in-process and through a daemon; then a daemon killed and
restarted between two calls of one client; then a web service with a
published port answered through curl.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from stockade import Policy, Sandbox
from stockade.client import Client
from stockade.errors import SandboxLostError
from stockade.runtimes.manager import RuntimeManager
from tests.daemon_harness import Daemon, start_daemon

CSV = "day,region,sales\n1,north,10\n2,north,30\n3,south,20\n4,south,25\n"
CELLS = [
    # The agent looks at the data...
    "import pandas as pd\ndf = pd.read_csv('/work/sales.csv')\ndf.head()",
    # ...analyses it, using what the first cell loaded...
    "by_region = df.groupby('region').sales.sum()\nprint(by_region.to_dict())\nint(by_region.sum())",
    # ...and plots it: the figure comes back as a result, and as a file.
    "import matplotlib.pyplot as plt\nax = by_region.plot(kind='bar', title='sales by region')\n"
    "plt.savefig('/work/sales.png', dpi=72)\nplt.show()",
]


def _drive(run: object) -> None:
    """The agent loop: each cell's results checked as an agent would read them."""
    head, totals, plot = (run(cell) for cell in CELLS)  # type: ignore[operator]
    assert head.success and head.stderr == "", head.stderr
    table = head.results[0]
    assert table.kind == "execute_result" and "<table" in (table.html or "") and "north" in (table.text or "")
    assert totals.stdout == "{'north': 40, 'south': 45}\n" and totals.results[0].text == "85"
    assert plot.success and plot.stderr == "", plot.stderr  # no font-cache, backend or config warnings
    figure = [r for r in plot.results if r.png is not None]
    assert len(figure) == 1 and figure[0].png is not None and figure[0].png.startswith(b"\x89PNG\r\n\x1a\n")
    assert [head.execution_count, totals.execution_count, plot.execution_count] == [1, 2, 3]


@pytest.mark.timeout(900)
def test_the_agent_loop_in_process(ds: str) -> None:
    manager = RuntimeManager(pool_size=0)
    policy = Policy(runtime="process", environment_name="ds", memory_mb=1024, timeout_seconds=120)
    try:
        with Sandbox(policy, manager=manager) as sb:
            sb.write_file("/work/sales.csv", CSV)
            py = sb.interpreter("agent")
            _drive(py.run)
            assert sb.read_file("/work/sales.png").startswith(b"\x89PNG\r\n\x1a\n")
    finally:
        manager.close()


@pytest.fixture
def daemon(ds: str, process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon(env={"STOCKADE_ENV_STORE": os.environ["STOCKADE_ENV_STORE"]})
    yield d
    d.stop()


@pytest.mark.timeout(900)
def test_the_agent_loop_through_a_daemon_that_restarts(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client:
        sb = client.sandbox({"environment_name": "ds", "memory_mb": 1024, "timeout_seconds": 120})
        sb.write_file("/work/sales.csv", CSV)
        _drive(sb.interpreter("agent").run)
        assert sb.read_file("/work/sales.png").startswith(b"\x89PNG\r\n\x1a\n")
        # The daemon dies between two calls of this client, and comes back on the same socket.
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(30)
        again = start_daemon(
            socket_path=daemon.socket_path, env={"STOCKADE_ENV_STORE": os.environ["STOCKADE_ENV_STORE"]}
        )
        try:
            assert client.ping() == "pong"  # the stale connection is replaced by itself
            with pytest.raises(SandboxLostError, match="instance"):
                sb.run_code("1", session="agent")  # that sandbox went with the old daemon, and it says so
            fresh = client.sandbox({"environment_name": "ds", "memory_mb": 1024, "timeout_seconds": 120})
            assert fresh.run_code("import pandas\nprint('ok')").stdout == "ok\n"
            fresh.close()
        finally:
            again.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this host")
def test_a_web_service_with_a_published_port_answers_curl(process_runtime: str) -> None:
    with Sandbox(Policy(runtime=process_runtime, network_policy="loopback"), publish=["127.0.0.1:0:8000"]) as sb:
        sb.write_file("/work/index.html", "<h1>hello from the sandbox</h1>\n")
        sb.spawn(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], cwd="/work")
        host, port = sb.published[8000]
        deadline = time.monotonic() + 60
        while True:
            curl = subprocess.run(
                ["curl", "-sS", "--max-time", "10", f"http://{host}:{port}/index.html"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if curl.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the server inside is still starting
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == "<h1>hello from the sandbox</h1>\n"
