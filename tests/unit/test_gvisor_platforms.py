"""What stockade reads from a runsc build: the platforms it offers (``runsc flags``), the date it was cut."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from stockade.runtimes.gvisor import BUNDLE_PREFIX, build_date, platforms_from_flags, statx_broken
from stockade.runtimes.gvisor_state import sweep_state
from stockade.runtimes.hosted import sweep_dead_hosts_dirs

# The -platform lines of `runsc flags`, as two builds print them.
DEBIAN_12 = """  -platform string
    \tspecifies which platform to use: ptrace (default), kvm. (default "ptrace")
  -platform_device_path string
"""
BACKPORTS_2024 = """  -platform string
    \tspecifies which platform to use: systrap (default), ptrace, kvm. (default "systrap")
  -platform_device_path string
"""


def test_each_build_lists_its_own_platforms() -> None:
    assert platforms_from_flags(DEBIAN_12) == ["ptrace", "kvm"]
    assert platforms_from_flags(BACKPORTS_2024) == ["systrap", "ptrace", "kvm"]


def test_unknown_platforms_and_unreadable_help_leave_ptrace() -> None:
    # A platform stockade does not know is not probed; help it cannot read leaves the one every build has.
    future = BACKPORTS_2024.replace("systrap (default)", "warp (default), systrap")
    assert platforms_from_flags(future) == ["systrap", "ptrace", "kvm"]
    assert platforms_from_flags("") == ["ptrace"]
    assert platforms_from_flags("  -platform_device_path string\n") == ["ptrace"]


def test_build_dates_from_versions() -> None:
    assert build_date("0.0~20221219.0") == 20221219
    assert statx_broken("0.0~20221219.0")  # Debian 12's own: ls and stat fail
    assert build_date("0.0~20240729.0") == 20240729
    assert not statx_broken("0.0~20240729.0")  # bookworm-backports
    assert build_date("release-20231009.0") == 20231009
    assert build_date("unknown") is None
    assert not statx_broken("unknown")  # a build of no known date is not called broken
    assert build_date("0.0~202407291.0") is None  # nine digits are no date


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_a_killed_hosts_platform_probe_is_swept_as_its_sandboxes_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe's bundle and runsc state were named so that no sweep knew them: a host killed mid-probe left them.
    dead = _dead_pid()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bundle = Path(tempfile.mkdtemp(prefix=f"{BUNDLE_PREFIX}{dead}-probe-"))
    live = Path(tempfile.mkdtemp(prefix=f"{BUNDLE_PREFIX}{__import__('os').getpid()}-probe-"))
    sweep_dead_hosts_dirs(BUNDLE_PREFIX)
    assert not bundle.exists() and live.exists()

    root = tmp_path / "runsc-root"
    root.mkdir(mode=0o700)  # this user's alone, as runsc's state root must be
    for name in (f"abc_sandbox:stockade-probe-{dead}-systrap.state", f"stockade-{dead}-7.lock", "other.state"):
        (root / name).write_text("{}")
    sweep_state(str(root))
    assert sorted(p.name for p in root.iterdir()) == ["other.state"]
