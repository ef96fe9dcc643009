"""A shared path whose name is bytes that are not UTF-8 (os.fsdecode keeps them as lone surrogates).

The policy takes such a name; the process runtime's agent encoded it strictly as it mounted the
share, and the isolate's setup failed with "UnicodeEncodeError ... surrogates not allowed". Now the
process runtime and a microVM share it by its bytes, and gVisor, whose runsc reads paths as UTF-8
text, refuses it by name before anything starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from stockade import Policy, PolicyError, Sandbox
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require


@pytest.fixture
def odd_dir() -> Iterator[str]:
    parent = tempfile.mkdtemp(prefix="stockade-odd-")
    os.chmod(parent, 0o755)
    odd = os.path.join(parent, os.fsdecode(b"name-\xff"))
    os.mkdir(odd, 0o755)
    with open(os.path.join(odd, "f"), "w") as f:
        f.write("read through a name of other bytes\n")
    os.chmod(os.path.join(odd, "f"), 0o644)
    yield odd
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize("runtime", ["process", "microvm"])
def test_a_share_named_in_bytes_that_are_not_utf8_is_shared_by_those_bytes(runtime: str, odd_dir: str) -> None:
    require(runtime)
    target = "/data/" + os.fsdecode(b"t-\xfe")
    policy = Policy(runtime=runtime, filesystem_access=[{"source": odd_dir, "target": target}])
    manager = RuntimeManager(pool_size=0)
    try:
        with Sandbox(policy, manager=manager) as sb:
            r = sb.exec(["sh", "-c", "cat /data/t-*/f; ls /data | od -An -c"])
            assert r.exit_code == 0, r.stderr
            assert r.stdout.startswith("read through a name of other bytes\n"), r.stdout
            assert "376" in r.stdout  # the target's own byte, 0xfe
    finally:
        manager.close()


def test_gvisor_refuses_a_share_named_in_bytes_that_are_not_utf8_by_name(odd_dir: str) -> None:
    require("gvisor")
    policy = Policy(runtime="gvisor", filesystem_access=[{"source": odd_dir, "target": "/data"}])
    manager = RuntimeManager(pool_size=0)
    try:
        with pytest.raises(PolicyError, match="gVisor takes only paths that are UTF-8 text"):
            Sandbox(policy, manager=manager).__enter__()
    finally:
        manager.close()
