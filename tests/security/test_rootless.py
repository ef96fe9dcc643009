"""Rootless mode: stockade run by an ordinary user still confines, and says what it cannot enforce.

CI runs as root, so the test switches to uid 65534 in a child process that
imports stockade from a world-readable copy of the package and its
dependencies (the checkout itself may sit in a private home directory).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import stockade

NOBODY = 65534
PACKAGES = ["stockade", "pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection"]

CHILD = r"""
import json, os, stockade
from stockade.runtimes.manager import RuntimeManager
m = RuntimeManager(pool_size=0)
r = stockade.run(["sh", "-c", "id -u; grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status; ls /root 2>&1"],
                 runtime="process", manager=m)
v = stockade.run_code("import ctypes; ctypes.CDLL(None).unshare(0x10000000)", runtime="process", manager=m)
from stockade.runtimes.process.cgroups import detect_layout
print(json.dumps({"uid": os.getuid(), "result": r.model_dump(), "limits": sorted(detect_layout().limits),
                  "violations": [x.syscall for x in v.security_violations]}))
m.close()
"""


@pytest.fixture(scope="module")
def portable_site() -> Iterator[str]:
    site = tempfile.mkdtemp(prefix="stockade-rootless-")
    os.chmod(site, 0o755)
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        origin = Path(module.__file__ or "")
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, Path(site) / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, site)
    for root, dirs, files in os.walk(site):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    yield site
    shutil.rmtree(site)


def test_rootless_run_is_confined_and_honest(process_runtime: str, portable_site: str) -> None:
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root; this session already runs rootless")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": portable_site, "HOME": "/nonexistent", "XDG_RUNTIME_DIR": "/tmp"}
    out = subprocess.run(
        ["/usr/bin/python3", "-c", CHILD],
        env=env,
        cwd="/",
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["uid"] == NOBODY
    result = stockade.ExecResult.model_validate(report["result"])
    lines = result.stdout.splitlines()
    assert lines[0] == "1000"
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines and "Seccomp:\t2" in lines
    assert "No such file or directory" in lines[-1]
    assert report["violations"] == ["unshare"]
    # Where no cgroup is delegated to this user, the run must say so, not drop limits silently.
    memory_unenforced = any("memory_mb" in item for item in result.unenforced_limits)
    assert memory_unenforced == ("memory" not in report["limits"]), (report["limits"], result.unenforced_limits)
