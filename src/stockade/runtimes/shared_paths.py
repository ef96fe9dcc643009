"""Which host paths a policy may share into an isolate (``filesystem_access``), checked before
anything is built, the same for every runtime: each source and the way to it must be open to
the sandbox's uid, lie within the host's STOCKADE_MOUNT_ROOTS, be no path that hands over the
host, hold no mount of a filesystem that would (proc, sysfs, devices), and be unswappable by
another sandbox between this check and the mount."""

from __future__ import annotations

import os
import stat
from collections import deque
from dataclasses import dataclass

from ..agent import linux
from ..environments import store_root
from ..errors import PolicyError
from ..policy import ENV_ROOT, Mount, Policy, forbidden_source
from ..settings import current


def _check_within_roots(where: str, mount: Mount, real: str) -> None:
    """A host that names its mount roots (STOCKADE_MOUNT_ROOTS) shares nothing outside them, but
    its own Python environments, one at a time, read-only where environments go (any sandbox may name one).
    ``real``: where the source leads, which is what is mounted (as root, no sandbox can swap a step
    of the way since: ``_check_unswappable``)."""
    roots = current().mount_roots
    if roots is None:
        return
    if mount.target == ENV_ROOT and not mount.writable:
        # One environment (envs/ID), or one being built (tmp/BUILD: its caches are primed so)
        store = os.path.realpath(store_root())
        if real.startswith((f"{store}/envs/", f"{store}/tmp/")):
            return
    if any(_below(real, root) for root in roots):
        return
    named = ",".join(roots) or "none"
    raise PolicyError(f"{where} leads to {real}, outside what this host shares (STOCKADE_MOUNT_ROOTS={named})")


def _check_not_over_the_store(where: str, mount: Mount, real: str) -> None:
    """No writable share holds the environment store, nor lies in it: rootless, its files are the
    isolate's own uid's, and their read-only modes no bar to a chmod (a sandbox rewrote a package
    every later sandbox of that environment imported)."""
    if not mount.writable:
        return
    store = os.path.realpath(store_root())
    if _below(store, real, resolved=False) or _below(real, store, resolved=False):
        raise PolicyError(
            f"{where} leads to {real}, which holds the Python environments' store ({store}) or lies in it: "
            "share it read-only, or a directory outside it"
        )


def _check_named_within_roots(where: str, mount: Mount) -> None:
    """Under STOCKADE_MOUNT_ROOTS, the path as named lies below a root too (its links are followed
    later, where the isolate's builder would follow them): outside, it is refused unread."""
    roots = current().mount_roots
    if roots is None or (mount.target == ENV_ROOT and not mount.writable):
        return  # an environment is checked where it leads (_check_within_roots)
    named = os.path.normpath(mount.source)
    if any(_below(named, root) or _below(named, root, resolved=False) for root in roots):
        return
    shown = ",".join(roots) or "none"
    raise PolicyError(f"{where} is outside what this host shares (STOCKADE_MOUNT_ROOTS={shown})")


def _resolved_as_others(where: str, source: str) -> str:
    """Where ``source`` leads, its links followed one step at a time, each directory it goes
    through searchable by others before anything below it is looked at; else one message,
    whichever it is (a caller learns nothing of what a 0700 directory holds, nor where a link in
    one leads). A last step that is missing is left for the caller to find missing."""
    parts = deque(p for p in source.split("/") if p)
    resolved, links = "/", 0
    while parts:
        part = parts.popleft()
        if part in (".", ".."):
            resolved = resolved if part == "." else os.path.dirname(resolved)
            continue
        st = os.stat(resolved)
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            raise PolicyError(f"{where} is not accessible to the sandbox's uid: {resolved} is not searchable by others")
        step = os.path.join(resolved, part)
        try:
            st = os.lstat(step)
        except OSError:
            if parts:
                raise PolicyError(f"{where} does not exist on this host") from None
            return step
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise PolicyError(f"{where} leads through more than {MAX_LINKS} links")
            target = os.readlink(step)
            parts.extendleft(reversed([p for p in target.split("/") if p]))
            resolved = "/" if target.startswith("/") else resolved
            continue
        resolved = step
    return resolved


MAX_LINKS = 40  # as the kernel follows at most


def _below(path: str, root: str, resolved: bool = True) -> bool:
    root = os.path.realpath(root) if resolved else root
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_unswappable(where: str, path: str, st: os.stat_result, last: bool) -> None:
    """A step on the way to a shared path that no sandbox can swap for a link of its own between
    this check and runsc's or QEMU's open of the source as root: not a link or directory of a
    sandbox uid's (one made in another share), and, above the source, no directory others may
    write without the sticky bit (another sandbox's read-write share is one)."""
    first, last_uid = current().sandbox_uids
    if first <= st.st_uid <= last_uid:
        kind = "a link" if stat.S_ISLNK(st.st_mode) else "an entry"
        raise PolicyError(
            f"{where}: {path} is {kind} of uid {st.st_uid}, a sandbox's: it may not be on the way to a shared path"
        )
    if not last and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PolicyError(
            f"{where} lies below {path}, which others may write (mode {stat.S_IMODE(st.st_mode):04o}, no sticky "
            "bit): a sandbox that writes it (another share) could swap the way for a link; share a path whose "
            "parents only their owners may change"
        )


# Filesystems that hand over the host as /proc, /sys and /dev do (forbidden_source): a share
# is mounted with the mounts below it, so one holding such a mount (a chroot's proc and dev) is
# refused as they are.
HOST_FILESYSTEMS = frozenset(
    {
        "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf",
        "configfs", "fusectl", "pstore", "efivarfs", "mqueue", "binfmt_misc", "nsfs", "selinuxfs", "rpc_pipefs",
        "nfsd", "hugetlbfs",
    }
)  # fmt: skip


NOT_SHARED = "it may not be shared into a sandbox"


@dataclass(frozen=True)
class _Mount:
    """One line of mountinfo (linux.mount_table): a mount of ``device``'s ``root`` at ``point``."""

    device: str
    root: str
    point: str
    kind: str


def _check_mounts(where: str, real: str) -> None:
    """What a share of ``real`` shows, from the mount it lies in and every mount below it, is of
    no filesystem in HOST_FILESYSTEMS (a chroot's /proc, or a path within one); and no mount below
    it shows files the host mounts only at paths no share may name (a bind of /run, /run/user/N
    or / below a directory). Files the host also mounts where a share may name them (/usr/share,
    beside a toolbox's /run/host/usr/share) are shared as that path would be."""
    table = [_Mount(*entry) for entry in linux.mount_table()]
    # The mount ``real`` lies in: the deepest mount point above it (the last mounted, of several).
    above = [(len(m.point), i) for i, m in enumerate(table) if _below(real, m.point, resolved=False)]
    if not above:  # a chroot, whose root is no mount it can see
        raise PolicyError(f"{where}: no mount of this host's holds {real}, so what it shows cannot be checked")
    held = table[max(above)[1]]
    below = [m for m in table if m is not held and _below(m.point, real, resolved=False)]
    for mount in [held, *below]:
        if mount.kind in HOST_FILESYSTEMS:
            raise PolicyError(f"{where} shows a {mount.kind} mount at {mount.point}: {NOT_SHARED}")
    for mount in below:  # where else the host mounts the same files, outside the share
        elsewhere = [
            os.path.normpath(os.path.join(other.point, os.path.relpath(mount.root, other.root)))
            for other in table
            if other.device == mount.device
            and _below(mount.root, other.root, resolved=False)
            and not _below(other.point, real, resolved=False)
        ]
        if elsewhere and all(forbidden_source(p) and not _below(p, INACCESSIBLE, resolved=False) for p in elsewhere):
            raise PolicyError(f"{where} shows {mount.point}, which is {elsewhere[0]}: {NOT_SHARED}")


# What systemd's InaccessiblePaths= mounts over a path: an empty directory (or file) of mode 000.
INACCESSIBLE = "/run/systemd/inaccessible"


def check_mount_sources(policy: Policy) -> None:
    """Shared paths are opened with the sandbox's uid, a different one for each
    isolate (as root): they must be open to others. Say so before building anything."""
    for i, mount in enumerate(policy.filesystem_access):
        where = f"filesystem_access[{i}]: {mount.source}"
        # Nothing is said of the path itself before its name is checked and its way in is open to
        # others: a caller must not learn what a 0700 directory holds, or where a link in it leads,
        # from which error it gets.
        _check_named_within_roots(where, mount)
        # The policy checked its name; a link (/var/lock -> /run/lock, one of a caller's own) is
        # checked where it leads too. (What the sandbox's uid may open is the boundary: this says
        # so early, and plainly.)
        # As root, resolved a step at a time as others may: realpath would follow a link inside a
        # 0700 directory, and an error naming where it leads would say what only root may read.
        real = _resolved_as_others(where, mount.source) if os.getuid() == 0 else os.path.realpath(mount.source)
        if not os.path.exists(mount.source):
            raise PolicyError(f"{where} does not exist on this host")
        if forbidden_source(real):
            raise PolicyError(f"{where} leads to {real}, which may not be shared into a sandbox")
        _check_within_roots(where, mount, real)
        _check_not_over_the_store(where, mount, real)
        _check_mounts(where, real)
        if os.getuid() != 0:
            continue
        # Every directory on the way, as named and where a link leads: runsc and QEMU resolve the
        # source as root before their leased uids reach it, so a link to below a 0700 directory
        # must not be their way in.
        for named in dict.fromkeys((mount.source, real)):
            path = ""
            parts = named.strip("/").split("/")
            for depth, part in enumerate(parts):
                path += "/" + part
                _check_unswappable(where, path, os.lstat(path), last=depth == len(parts) - 1)
                st = os.stat(path)
                if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
                    raise PolicyError(
                        f"{where} is not accessible to the sandbox's uid: {path} is not searchable by others"
                    )
        st = os.stat(mount.source)
        need = stat.S_IROTH | (stat.S_IWOTH if mount.writable and stat.S_ISDIR(st.st_mode) else 0)
        if st.st_mode & need != need:
            # Said as what the sandbox's uid lacks, and never as a chmod to run: opening a system
            # directory (/etc) to every local user is no fix; a directory made for the sandbox is.
            raise PolicyError(
                f"{where} is not accessible to the sandbox's uid: it needs to be "
                f"{'readable and writable' if need & stat.S_IWOTH else 'readable'} by others, which would open "
                f"{mount.source} to every local user too. Share a directory made for the sandbox instead "
                "(a writable one: docs/policy.md says how several sandboxes may share one)"
            )
