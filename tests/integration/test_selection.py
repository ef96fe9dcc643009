"""Isolation levels and trust: the strongest runtime that fits, or a clear refusal, never a downgrade."""

from __future__ import annotations

import pytest

import stockade
from stockade import Policy, PolicyError, RuntimeUnavailableError
from stockade.isolation import DEFAULT_TRUST_MAP, LEVEL_INFO, trust_map
from stockade.runtimes.base import Availability
from stockade.runtimes.manager import RuntimeManager


@pytest.fixture
def mgr(process_runtime: str) -> RuntimeManager:
    return RuntimeManager(pool_size=0)


def test_scores_are_ordered_by_strength() -> None:
    scores = [LEVEL_INFO[level].score for level in ("none", "process", "gvisor", "microvm")]
    assert scores == sorted(scores) and scores[0] == 0


def test_trust_map_default_and_override() -> None:
    assert trust_map({}) == DEFAULT_TRUST_MAP
    assert trust_map({"STOCKADE_TRUST_MAP": "untrusted=gvisor, verified=process"})["untrusted"] == "gvisor"
    with pytest.raises(PolicyError, match="STOCKADE_TRUST_MAP"):
        trust_map({"STOCKADE_TRUST_MAP": "untrusted=chroot"})


def test_default_is_the_process_runtime_never_none(mgr: RuntimeManager) -> None:
    try:
        assert mgr.select(Policy()).name == "process"
    finally:
        mgr.close()


def test_a_trust_gets_its_own_level_or_the_nearest_stronger_one(
    mgr: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a new user: trust 'trusted' ran on a microVM (a 5 s cold start here), as every
    trust did wherever one was available, so the trust level chose nothing but what to refuse."""
    try:
        assert mgr.select(Policy(trust="trusted")).name == "process"
        available = {a.name for a in mgr.doctor() if a.available}
        if "gvisor" in available:
            assert mgr.select(Policy(trust="verified")).name == "gvisor"
        if "microvm" in available:
            assert mgr.select(Policy(trust="untrusted")).name == "microvm"
    finally:
        mgr.close()
    # Its own level unavailable: the nearest stronger one, never a weaker one.
    monkeypatch.setenv("STOCKADE_TRUST_MAP", "trusted=gvisor")
    other = RuntimeManager(pool_size=0)
    try:
        other._availability["gvisor"] = Availability("gvisor", False, "gvisor", "broken for this test")
        if other.cached_availability("microvm").available:
            assert other.select(Policy(trust="trusted")).name == "microvm"
    finally:
        other.close()


def test_untrusted_refuses_rather_than_downgrade(mgr: RuntimeManager, monkeypatch: pytest.MonkeyPatch) -> None:
    # Break the microvm runtime for real (QEMU refuses an unknown accelerator; the setting itself
    # takes only tcg or kvm): the process and gvisor runtimes still work, and must not be used instead.
    from stockade.runtimes.microvm import runtime as microvm

    monkeypatch.setattr(microvm, "_choose_accel", lambda runtime: "no-such-accel")
    try:
        assert not mgr.cached_availability("microvm").available
        with pytest.raises(RuntimeUnavailableError, match=r"untrusted.*microvm or stronger.*never falls back"):
            stockade.run(["true"], trust="untrusted", manager=mgr)
    finally:
        mgr.close()


def test_named_runtime_weaker_than_trust_is_refused(mgr: RuntimeManager) -> None:
    try:
        with pytest.raises(RuntimeUnavailableError, match="weaker"):
            mgr.select(Policy(runtime="fake", trust="trusted"))
        assert mgr.select(Policy(isolation="process", trust="trusted")).name == "process"
    finally:
        mgr.close()


def test_trust_map_from_environment(mgr: RuntimeManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_TRUST_MAP", "untrusted=process")
    try:
        r = stockade.run(["echo", "ok"], trust="untrusted", manager=mgr)
        assert r.stdout == "ok\n" and r.runtime_used in ("process", "gvisor", "microvm")
    finally:
        mgr.close()


def test_a_named_runtime_found_unusable_is_refused_with_the_reason() -> None:
    from stockade.runtimes.base import Availability

    mgr = RuntimeManager(pool_size=0)
    try:
        # As after a detect() on a host where the binary exists but cannot boot a guest.
        mgr._availability["microvm"] = Availability("microvm", False, "microvm", "QEMU exited before its agent socket")
        for policy in (Policy(runtime="microvm"), Policy(isolation="microvm")):
            with pytest.raises(RuntimeUnavailableError, match="microvm is not available on this host: QEMU exited"):
                mgr.select(policy)
    finally:
        mgr.close()
