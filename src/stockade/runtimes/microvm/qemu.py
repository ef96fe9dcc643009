"""The QEMU command line of one microVM: the machine, its accelerator, the guest's kernel
and initramfs, the console FIFO, the agent's virtio-serial port, and a 9p share for
``/usr`` and each of the policy's shared paths (named to the guest on its kernel
command line, ``stockade.mounts=``, which agent/guest.py reads).
"""

from __future__ import annotations

import os

from ...errors import PolicyError
from ...policy import Policy
from . import image as guest_image
from . import jail
from .console import CONSOLE

MIN_GUEST_MB = 128
KERNEL_CMDLINE_MAX = 2048  # x86's COMMAND_LINE_SIZE, its terminating NUL included
TCG_CACHE_MB = 128  # the emulator's own memory (TCG translation cache, device state)


def qemu_command(qemu: str, image: guest_image.GuestImage, policy: Policy, accel: str, rundir: str,
                  agent_socket: str) -> list[str]:  # fmt: skip
    khz = tsc_khz()
    mounts = []
    args = [
        qemu, "-M", "microvm,x-option-roms=off,pit=off,pic=off,rtc=off", "-accel", _accel_option(accel),
        "-cpu", "host" if accel == "kvm" else "max", "-m", str(max(policy.memory_mb, MIN_GUEST_MB)), "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        *(["-sandbox", jail.SECCOMP] if jail.seccomp_supported(qemu) else []),
        "-kernel", image.kernel, "-initrd", image.initramfs,
        "-serial", f"file:{os.path.join(rundir, CONSOLE)}",  # a FIFO the host drains (console.py)
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=stockade.agent",
        *share_args("usr", "/usr"),
    ]  # fmt: skip
    for i, m in enumerate(policy.filesystem_access):
        tag = f"m{i}"
        args += share_args(tag, os.path.realpath(m.source), m.writable)  # where check_mount_sources looked
        # In hex: a target's spaces, commas and colons would otherwise be read as the command
        # line's own separators (a space even as more kernel parameters).
        target = m.target.encode("utf-8", "surrogateescape").hex()
        mounts.append(f"{tag}:{target}:{'rw' if m.writable else 'ro'}")
    # The scratch size and the network come with the go line (snapshot.go_line), so
    # that one snapshot serves them all; shared paths are devices, fixed at boot.
    cmdline = ["console=ttyS0", "quiet", "panic=-1"]
    if khz:
        cmdline.append(f"tsc_early_khz={khz}")  # without it, 2 boots in 5 hang under TCG here
    if mounts:
        cmdline.append("stockade.mounts=" + ",".join(mounts))
    appended = " ".join(cmdline)
    if len(appended) >= KERNEL_CMDLINE_MAX:  # the kernel would cut it short, shares and all
        raise PolicyError(
            f"filesystem_access: {len(mounts)} shared paths do not fit a microVM's kernel command line "
            f"({len(appended)} of {KERNEL_CMDLINE_MAX - 1} bytes); share fewer paths or shorter targets"
        )
    return [*args, "-append", appended]


def share_args(tag: str, path: str, writable: bool = False) -> list[str]:
    """QEMU's arguments for a 9p share of the host's ``path``, mounted in the guest by ``tag``.
    A comma in the path is written twice: QEMU's escape inside an option list."""
    readonly = "" if writable else ",readonly=on"
    options = f"local,id={tag},path={path.replace(',', ',,')},security_model=none{readonly}"
    return ["-fsdev", options, "-device", f"virtio-9p-device,fsdev={tag},mount_tag={tag}"]


def _accel_option(accel: str) -> str:
    # TCG's translation cache defaults to 1 GiB of (lazily touched) memory: bound it so
    # that QEMU stays inside the cgroup's guest RAM + QEMU_OVERHEAD_MB.
    return f"tcg,tb-size={TCG_CACHE_MB}" if accel == "tcg" else accel


def tsc_khz() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        return None
    return None
