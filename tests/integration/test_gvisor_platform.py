"""The gVisor platform stockade picks: the fastest of those that work here, measured once."""

from __future__ import annotations

import json
import os

import pytest

from stockade.runtimes import gvisor
from tests.conftest import require


def test_the_chosen_platform_is_the_fastest_probed_and_is_cached(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    require("gvisor")
    runsc = gvisor.runsc_binary()
    assert runsc is not None
    monkeypatch.delenv("STOCKADE_GVISOR_PLATFORM", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = os.path.join(str(tmp_path), "state")
    chosen = gvisor._choose_platform(root)
    with open(os.path.join(str(tmp_path), "stockade", "gvisor-platform.json")) as f:
        cached = json.load(f)
    timings = cached["probe_ms"]
    # Every platform this build offers was tried (kvm only where it can run), and ptrace works everywhere.
    offered = gvisor.known_platforms(runsc)
    assert set(timings) <= set(offered)
    assert "ptrace" in timings and all(ms > 0 for ms in timings.values())
    assert chosen == cached["platform"] == min(timings, key=timings.__getitem__)
    # Probed once per runsc build and kernel: the next choice comes from the cache.
    monkeypatch.setattr(gvisor, "_probe_platform", lambda *_: pytest.fail("probed again"))
    assert gvisor._choose_platform(root) == chosen
    # No probe container is left behind.
    assert not [name for name in os.listdir(root) if "probe" in name]


def test_a_forced_platform_is_taken_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_GVISOR_PLATFORM", "systrap")
    assert gvisor._choose_platform("/nonexistent") == "systrap"
