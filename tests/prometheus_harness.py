"""A real Prometheus in a subprocess, scraping one target, for the metrics tests.

    with Prometheus("127.0.0.1:9100") as prom:
        prom.wait_for("up", lambda result: bool(result), timeout=60)

It listens on loopback only, keeps its data in a temporary directory, and is ended
(SIGTERM, then SIGKILL) when the ``with`` block ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from types import TracebackType
from typing import Any

PROMETHEUS = "/usr/bin/prometheus"
START_TIMEOUT_S = 90.0  # a loaded two-core machine can take long to open the TSDB
START_ATTEMPTS = 3  # a free port picked can be taken before Prometheus binds it

# Loopback requests go straight to the server, whatever *_proxy the environment sets.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Result = list[dict[str, Any]]


class PrometheusError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_data(result: Result) -> bool:
    """A non-empty result whose values are all numbers (not NaN: a rate over no change)."""
    values = [float(r["value"][1]) for r in result if "value" in r]
    return bool(result) and all(math.isfinite(v) for v in values)


class Prometheus:
    """Prometheus scraping ``target`` (``host:port``) at ``metrics_path`` every ``interval``."""

    def __init__(
        self, target: str, metrics_path: str = "/metrics", interval: str = "1s", binary: str = PROMETHEUS
    ) -> None:
        self.target, self.metrics_path, self.interval, self.binary = target, metrics_path, interval, binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._dir = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="stockade-prom-")
        config = os.path.join(self._dir, "prometheus.yml")
        with open(config, "w") as f:
            # JSON is YAML: no quoting to get wrong.
            json.dump(
                {
                    "global": {
                        "scrape_interval": self.interval,
                        "scrape_timeout": self.interval,
                        "evaluation_interval": self.interval,
                    },
                    "scrape_configs": [
                        {
                            "job_name": "stockade",
                            "metrics_path": self.metrics_path,
                            "static_configs": [{"targets": [self.target]}],
                        }
                    ],
                },
                f,
            )
        try:
            for _ in range(START_ATTEMPTS):
                if self._start_once(config):
                    return
            raise PrometheusError(f"Prometheus did not start in {START_ATTEMPTS} tries:\n{self.logs()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def _start_once(self, config: str) -> bool:
        """Start on a fresh port and wait until ready; False if the port was taken meanwhile."""
        self.port = free_port()
        log = open(os.path.join(self._dir, "prometheus.log"), "wb")  # the child writes it; closed here once started
        with log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={os.path.join(self._dir, 'data')}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "address already in use" in self.logs():
                    return False
                raise PrometheusError(f"Prometheus exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            with contextlib.suppress(OSError):
                with _opener.open(f"{self.url}/-/ready", timeout=5) as answer:
                    if answer.status == 200:
                        return True
            time.sleep(0.2)
        raise PrometheusError(f"Prometheus not ready after {START_TIMEOUT_S:g} s:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        try:
            with open(os.path.join(self._dir, "prometheus.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """End Prometheus (SIGTERM, then SIGKILL) and remove its files. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def query(self, expr: str) -> Result:
        """An instant query's result (``data.result``); a query Prometheus rejects raises ``PrometheusError``."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with _opener.open(url, timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as err:  # 400 bad_data, 422 execution: the query is wrong
            raise PrometheusError(f"{expr!r}: {err.code} {err.read().decode(errors='replace')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{expr!r}: {body}")
        result = body["data"]["result"]
        return result if isinstance(result, list) else [{"value": result}]  # a scalar's [time, value]

    def wait_for(self, expr: str, predicate: Callable[[Result], bool] = has_data, timeout: float = 60.0) -> Result:
        """Query ``expr`` until ``predicate`` holds of its result; its last result raises on timeout."""
        deadline = time.monotonic() + timeout
        result: Result = []
        while True:
            with contextlib.suppress(urllib.error.URLError, TimeoutError, ConnectionError):
                result = self.query(expr)
                if predicate(result):
                    return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{expr!r} after {timeout:g} s: {result}\n{self.logs()[-2000:]}")
            time.sleep(0.25)
