"""The microVM guest's agent (agent/guest.py), the parts that run anywhere.

Its confinement runs in a real guest only: tests/conformance/test_microvm.py.
"""

from __future__ import annotations

import pytest

from stockade import Policy, PolicyError
from stockade.agent import guest
from stockade.runtimes.microvm.image import GuestImage
from stockade.runtimes.microvm.qemu import qemu_command


def _command(policy: Policy) -> list[str]:
    image = GuestImage("/nonexistent", "/nonexistent/vmlinux", "/nonexistent/initramfs.cpio", "6.1.0-test")
    return qemu_command("/nonexistent/qemu", image, policy, "tcg", "/nonexistent/run", "/nonexistent/run/agent.sock")


def test_the_agent_reads_the_shared_paths_the_runtime_puts_on_the_kernel_command_line() -> None:
    # The host names each share's 9p tag, target and mode there; the agent mounts them in the code's namespace.
    cmd = _command(Policy(filesystem_access=["/usr/share:/data", "/var/tmp:/work/out:rw"]))
    cmdline = cmd[cmd.index("-append") + 1]
    assert guest._shares(cmdline) == [("m0", "/data", False), ("m1", "/work/out", True)]
    assert guest._shares("console=ttyS0 quiet panic=-1") == []


def test_separators_in_a_shared_path_stay_inside_it() -> None:
    # A target with a space would have added kernel parameters; a comma or colon split the share's
    # entry; a comma in a source would have started another QEMU option (here: readonly=off).
    source = "/srv/in,readonly=off"
    target = "/data dir, a:b init=/bin/sh \udcff"
    cmd = _command(Policy(filesystem_access=[{"source": source, "target": target}]))
    cmdline = cmd[cmd.index("-append") + 1]
    assert [w for w in cmdline.split() if not w.startswith(("tsc_early_khz=", "stockade.mounts="))] == [
        "console=ttyS0", "quiet", "panic=-1",
    ]  # fmt: skip
    assert guest._shares(cmdline) == [("m0", target, False)]
    fsdev = next(a for a in cmd if a.startswith("local,id=m0,"))
    assert fsdev == "local,id=m0,path=/srv/in,,readonly=off,security_model=none,readonly=on"


def test_shares_that_do_not_fit_the_kernel_command_line_are_refused() -> None:
    many = [{"source": "/srv", "target": f"/data/{i:03d}/" + "x" * 40} for i in range(30)]
    with pytest.raises(PolicyError, match="do not fit a microVM's kernel command line"):
        _command(Policy(filesystem_access=many))


def test_a_path_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(PolicyError, match="lone surrogate"):
        Policy(filesystem_access=[{"source": "/srv", "target": "/data/\ud800"}])
