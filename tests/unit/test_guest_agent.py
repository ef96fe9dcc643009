"""The microVM guest's agent (agent/guest.py), the parts that run anywhere.

Its confinement runs in a real guest only: tests/conformance/test_microvm.py.
"""

from __future__ import annotations

from stockade import Policy
from stockade.agent import guest
from stockade.runtimes.microvm.image import GuestImage
from stockade.runtimes.microvm.qemu import qemu_command


def test_the_agent_reads_the_shared_paths_the_runtime_puts_on_the_kernel_command_line() -> None:
    # The host names each share's 9p tag, target and mode there; the agent mounts them in the code's namespace.
    policy = Policy(filesystem_access=["/usr/share:/data", "/var/tmp:/work/out:rw"])
    image = GuestImage("/nonexistent", "/nonexistent/vmlinux", "/nonexistent/initramfs.cpio", "6.1.0-test")
    cmd = qemu_command("/nonexistent/qemu", image, policy, "tcg", "/nonexistent/run", "/nonexistent/run/agent.sock")
    cmdline = cmd[cmd.index("-append") + 1]
    assert guest._shares(cmdline) == [("m0", "/data", False), ("m1", "/work/out", True)]
    assert guest._shares("console=ttyS0 quiet panic=-1") == []
