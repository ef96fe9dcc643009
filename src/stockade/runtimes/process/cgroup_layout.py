"""Where this host lets stockade make cgroups: v1, v2, the hybrid of both, or none.

Found once per process (``detect_layout``): the controllers' mounts, this
process's own groups, and ``STOCKADE_CGROUP_PARENT`` (a path inside the
hierarchy, like Docker's ``--cgroup-parent``), made if missing. On v2 the
parent must pass the memory, pids and cpu controllers down; a group that
cannot (one that holds processes, a parent that does not delegate them) is
reported in ``problems`` with why, never silently used. cgroups.py makes and
fills each isolate's groups under what this finds.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

CGROUP_ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
V2_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass
class CgroupLayout:
    """Where this host lets stockade make groups, found once per process."""

    version: str  # "v1", "v2", "hybrid" or "none"
    v1_parents: dict[str, str] = field(default_factory=dict)  # controller -> parent dir
    v2_parent: str | None = None  # parent for v2 groups (limits in v2 mode, kill in hybrid)
    v2_limits: bool = False
    problems: list[str] = field(default_factory=list)
    # On a hybrid host: an isolate gets a controller-less v2 group as well, only for its cgroup.kill
    # (a daemon that gave root up cannot signal its isolates' uids: CgroupManager.hand_to).
    v2_kill: bool = False

    @property
    def isolates_in_v2(self) -> bool:
        """Whether an isolate's groups include a v2 one (and so ``cgroup.kill`` ends it)."""
        return self.v2_parent is not None and (self.v2_limits or not self.v1_parents or self.v2_kill)

    @property
    def limits(self) -> set[str]:
        if self.v2_limits:
            return {"memory", "pids", "cpu"}
        return {c for c in ("memory", "pids", "cpu") if c in self.v1_parents}


def _own_cgroups() -> dict[str, str]:
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    return own


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split()[4]
    return None


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def cgroup_parent_setting() -> str | None:
    """``STOCKADE_CGROUP_PARENT``, checked (settings.py): an absolute path inside the hierarchy, or None."""
    from ...settings import current

    return current().cgroup_parent


def detect_layout() -> CgroupLayout:
    """Find where groups can be made; raises ConfigError for a malformed STOCKADE_CGROUP_PARENT."""
    chosen = cgroup_parent_setting()
    try:
        own = _own_cgroups()
    except OSError as exc:
        return CgroupLayout("none", problems=[f"cannot read /proc/self/cgroup: {exc}"])
    layout = CgroupLayout("none")
    for ctrl in V1_CONTROLLERS:
        if ctrl in own:
            parent = os.path.join(CGROUP_ROOT, ctrl) + (chosen or own[ctrl])
            if chosen is not None:
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as exc:
                    layout.problems.append(f"cgroup v1 {ctrl}: cannot make {parent}: {exc.strerror}")
                    continue
            elif not os.path.isdir(parent):
                parent = os.path.join(CGROUP_ROOT, ctrl)
            if _writable_dir(parent):
                layout.v1_parents[ctrl] = parent
                if ctrl == "memory" and not os.path.exists(os.path.join(parent, "memory.kmem.tcp.limit_in_bytes")):
                    # cgroups.py charges socket buffers through this file; without it, one isolate's
                    # unread connections can hold the host's whole tcp_mem.
                    layout.problems.append(
                        "cgroup v1 memory: this kernel offers no memory.kmem.tcp.limit_in_bytes, so isolates' "
                        "socket buffers are not charged to their memory_mb (one isolate can fill the host's tcp_mem)"
                    )
            else:
                layout.problems.append(f"cgroup v1 {ctrl}: {parent} is not writable by uid {os.getuid()}")
    mount = _cgroup2_mount()
    if mount is not None and "" in own:
        layout.v2_parent, layout.v2_limits = _v2_parent(mount, own[""], chosen, layout.problems)
    if layout.v2_limits:
        layout.version = "v2"
    elif layout.v1_parents:
        layout.version = "hybrid" if layout.v2_parent else "v1"
    elif layout.v2_parent:
        layout.version = "v2"
        layout.problems.append("cgroup v2 controllers memory/pids/cpu are not delegated here")
    return layout


def _v2_parent(mount: str, own_path: str, chosen: str | None, problems: list[str]) -> tuple[str | None, bool]:
    """Pick a v2 parent: the operator's choice, else our own group if it can take
    children with controllers (a delegated, otherwise empty group), else <root>/stockade."""
    try:
        with open(os.path.join(mount, "cgroup.controllers")) as f:
            root_controllers = set(f.read().split())
    except OSError:
        root_controllers = set()
    wanted = set(V2_CONTROLLERS)
    if not wanted <= root_controllers:
        # Hybrid host: the v2 tree has no controllers, but cgroup.kill still works.
        own = mount + own_path.rstrip("/")
        if chosen is not None:
            try:
                os.makedirs(mount + chosen, exist_ok=True)
            except OSError as exc:
                problems.append(f"cgroup v2: cannot make {mount + chosen}: {exc.strerror}")
                return None, False
        for candidate in (mount + chosen,) if chosen is not None else (own, mount):
            if _writable_dir(candidate):
                return candidate, False
        return None, False
    own = mount + own_path.rstrip("/")
    candidates = [mount + chosen] if chosen is not None else [own, os.path.join(mount, "stockade")]
    for candidate in candidates:
        try:
            os.makedirs(candidate, exist_ok=True)
            # Every group from the root down to the candidate must pass the
            # controllers on; our own group already has them if it is ours.
            path = candidate
            chain = []
            while path not in (mount, own) and len(path) > len(mount):
                chain.append(path)
                path = os.path.dirname(path)
            for group in reversed(chain):
                enable_controllers(os.path.join(os.path.dirname(group), "cgroup.subtree_control"), wanted)
            enable_controllers(os.path.join(candidate, "cgroup.subtree_control"), wanted)
            if not _writable_dir(candidate):
                problems.append(f"cgroup v2: {candidate} is not writable by uid {os.getuid()}")
                continue
            return candidate, True
        except OSError as exc:
            problems.append(f"cgroup v2: cannot delegate controllers under {candidate}: {_delegation_error(exc)}")
    return None, False


def _delegation_error(exc: OSError) -> str:
    # The kernel's errnos for cgroup.subtree_control say little on their own.
    if exc.errno == errno.EBUSY:
        return "the group holds processes (cgroup v2 lets only leaf groups hold them)"
    if exc.errno == errno.ENOENT and exc.filename and str(exc.filename).endswith("subtree_control"):
        return "its parent does not pass the memory/pids/cpu controllers down"
    return exc.strerror or str(exc)


def enable_controllers(subtree_control: str, controllers: set[str]) -> None:
    with open(subtree_control) as f:
        have = set(f.read().split())
    missing = controllers - have
    if missing:
        with open(subtree_control, "w") as f:
            f.write(" ".join("+" + c for c in sorted(missing)))
