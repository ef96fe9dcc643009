"""The microVM snapshot files' life cycle: found, set aside, settled, reclaimed.

Files only: no QEMU here (tests/conformance/test_microvm.py restores real VMs).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stockade.runtimes.microvm import snapshot

KEY = "0123456789abcdef0123"


@pytest.fixture
def saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = snapshot.path_for(KEY)
    os.makedirs(os.path.dirname(path))
    Path(path).write_bytes(b"vm state")
    return path


def test_a_set_aside_snapshot_is_not_found_until_settled(saved: str) -> None:
    assert snapshot.find(KEY) == saved
    snapshot.set_aside(KEY)
    assert snapshot.find(KEY) is None
    snapshot.settle(KEY, booted=False)  # the boot failed too: the snapshot was not at fault
    assert snapshot.find(KEY) == saved
    snapshot.set_aside(KEY)
    snapshot.settle(KEY, booted=True)  # the boot worked: the snapshot was at fault
    assert snapshot.find(KEY) is None
    assert os.listdir(os.path.dirname(saved)) == []


def test_an_abandoned_suspect_is_put_back_after_a_while(saved: str) -> None:
    snapshot.set_aside(KEY)  # ... and the process that did it died before settling
    assert snapshot.find(KEY) is None  # a judge may still be at work
    later = time.time() + snapshot.SUSPECT_ABANDONED_S + 1
    assert snapshot.find(KEY, now=later) == saved
    assert not os.path.exists(saved + ".suspect")


def test_an_empty_snapshot_is_never_found(saved: str) -> None:
    Path(saved).write_bytes(b"")
    assert snapshot.find(KEY) is None


def test_a_save_a_killed_host_left_half_written_is_recognised_for_removal() -> None:
    # Tens of MB each, and nothing removed them: the next save sweeps those whose process is gone.
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    assert snapshot._abandoned(f"{KEY}.vmstate.{gone.pid}.tmp")
    assert not snapshot._abandoned(f"{KEY}.vmstate.{os.getpid()}.tmp")  # a save under way
    assert not snapshot._abandoned(f"{KEY}.vmstate") and not snapshot._abandoned("notes.tmp")
