"""runsc's state directory: where it is, whose it must be, and what a dead host left in it.

runsc keeps each container's state (its pids among it) under ``--root``; ``runsc delete``
acts on what it finds there, so the directory must be this user's alone. A host killed
mid-run leaves containers there that the next start's sweep deletes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tempfile

from ..errors import SandboxStartError
from .process.cgroups import pid_alive


def runsc_binary() -> str | None:
    return shutil.which("runsc") or (os.path.exists("/usr/bin/runsc") and "/usr/bin/runsc") or None


def state_root() -> str:
    if os.getuid() == 0:
        return "/run/stockade/runsc"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), f"stockade-runsc-{os.getuid()}")


def made_state_root(root: str) -> str:
    """``root``, made if need be, once it is known to be this user's alone: runsc keeps each
    container's state there (its pids among it), and ``runsc delete`` acts on what it finds. A
    directory another user made first (``/tmp/stockade-runsc-UID`` without XDG_RUNTIME_DIR) would
    let them plant state that has runsc signal a pid of their choosing."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxStartError(
            f"{root} (runsc's state) must be a directory owned by uid {os.geteuid()} with mode 0700; it is "
            f"{stat.filemode(st.st_mode)} owned by uid {st.st_uid} (set XDG_RUNTIME_DIR, or remove it)"
        )
    return root


def runsc_delete(root: str, container_id: str) -> None:
    runsc = runsc_binary()
    if runsc is None:
        return
    try:
        names = os.listdir(root)
    except OSError:
        return
    # runsc names its files "<sandbox id>_sandbox:<container id>.state" (and ".lock").
    if any(n.endswith(f":{container_id}.state") or n == container_id for n in names):
        # A delete that hangs is given up, never raised: the caller's release goes on (cgroup,
        # uids, bundle), and the cgroup's kill ends what runsc left; the sweep deletes its state.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [runsc, f"--root={root}", "delete", "--force", container_id],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                check=False,
            )


_STATE = re.compile(r"(?:^|:)(stockade-(?:probe-)?(\d+)-[a-z0-9]+)\.(?:state|lock)$")  # a sandbox's, a probe's


def sweep_state(root: str) -> None:
    """Delete containers whose stockade process is gone (a SIGKILLed host's leftovers)."""
    try:
        names = os.listdir(made_state_root(root))
    except (OSError, SandboxStartError):
        return  # none, or not this user's to act on (a start says why)
    for name in names:
        match = _STATE.search(name)
        if match is None:
            continue
        base, pid = match.group(1), int(match.group(2))
        if pid_alive(pid):
            continue  # its owner lives
        runsc_delete(root, base)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(root, name))  # what runsc delete could not remove
