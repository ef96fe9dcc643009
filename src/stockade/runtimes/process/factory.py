"""Where the process runtime's isolates come from: the zygote, each isolate's cgroups and
uid, and the spare child the zygote keeps forked ahead into the next isolate's.

The runtime (runtime.py) builds isolates from what ``take`` hands it. A caller that knows it
will want one isolate soon can start a factory before the runtime's own modules are imported
(``IsolateFactory.early``): the CLI does, so that the zygote's boot, the spare's cgroup move and
its agent's start all run on the other core while the CLI imports the rest and reads its flags.
"""

from __future__ import annotations

import os
import threading

from ...errors import SandboxStartError, StockadeError
from .cgroups import IsolateCgroup, SweptCgroupManager, retry_leftovers
from .uids import UidAllocator, UidLease, UidRange
from .zygote import Zygote

LEFTOVERS_WAIT_S = 10.0


class IsolateFactory:
    """The zygote, the groups and uids of the isolates it forks, and its spare child.

    ``spares``: after each isolate taken, have the next one's spare forked ahead (off the
    caller's path). A factory for a process that runs one isolate (the CLI) makes only the
    first: another would be built, and then torn down, for nothing.
    """

    def __init__(self, zygote: Zygote | None = None, spares: bool = True) -> None:
        self._zygote = zygote
        self._lock = threading.Lock()
        self.cgroups = SweptCgroupManager()
        self.spares = spares
        self._next_cgroup: IsolateCgroup | None = None  # where the zygote's spare child waits
        self._next_uid: UidLease | None = None  # and the uid it runs as
        self._uids: UidAllocator | None = None  # as root: one host uid per live isolate
        self._dropped = False  # the daemon gave up root (hand_to): never a zygote of its own user

    @classmethod
    def early(cls, zygote: Zygote) -> IsolateFactory:
        """A factory for one isolate, from a zygote started (``wait=False``) before this module
        was imported, its spare asked for already."""
        factory = cls(zygote, spares=False)
        try:
            factory.prepare_next(zygote)
        except BaseException:
            factory.close()
            raise
        return factory

    @property
    def started(self) -> bool:
        """Whether it has a zygote, or gave root up: a runtime's factory then stays its own."""
        return self._zygote is not None or self._dropped

    def zygote(self) -> Zygote:
        """The zygote, started (again) when there is none or it died."""
        with self._lock:
            if self._zygote is None or not self._zygote.alive:
                if self._dropped:
                    # Another zygote would be this user's, and so would its isolates: never that.
                    raise SandboxStartError(
                        "the zygote is gone, and without root no other can start: restart the daemon"
                    )
                if self._zygote is not None:
                    self._zygote.close()
                self._zygote = Zygote()
            return self._zygote

    def hand_to(self, uid: int, gid: int) -> None:
        """Before the daemon drops root to ``uid``: cgroups of its own (delegated), uid leases of its
        own, and the zygote started now, as root, holding every request to the sandbox uids and to
        those groups (agent/confine.py ``check_request``)."""
        manager = self.cgroups.get()
        manager.hand_to(uid, gid)
        with self._lock:
            if self._zygote is not None:
                self._zygote.close()  # one started before knew no groups to hold requests to
            self._zygote = Zygote(cgroup_parents=manager.parents(), odd_uids_only=True)
        self.zygote()
        if self._uids is None:
            self._uids = UidAllocator(UidRange.from_env())
        self._uids.hand_to(uid, gid)
        self._dropped = True

    def take(self) -> tuple[IsolateCgroup | None, UidLease | None]:
        """The next isolate's cgroup and uid: the spare's, where the zygote forked one ahead into
        them, else made now. The caller owns them (``dispose``)."""
        manager = self.cgroups.get()
        with self._lock:
            cgroup, self._next_cgroup = self._next_cgroup, None
            uid, self._next_uid = self._next_uid, None
        try:
            if cgroup is None and manager.layout.version != "none":
                cgroup = manager.create()
            if uid is None:
                uid = self._lease_uid(cgroup)
        except OSError as exc:
            dispose(cgroup, None)
            raise SandboxStartError(f"cannot create the isolate's cgroup: {exc}") from None
        except BaseException:
            dispose(cgroup, None)
            raise
        return cgroup, uid

    def spare(self) -> tuple[IsolateCgroup | None, UidLease | None]:
        """The group and uid the zygote's spare child waits in ((None, None): none made)."""
        with self._lock:
            return self._next_cgroup, self._next_uid

    def prepare_next(self, zygote: Zygote, limits: tuple[int, int, float] | None = None) -> None:
        """Make the next isolate's cgroup and uid now and have ``zygote`` fork a child ahead into
        them; ``limits`` (memory_mb, pids_limit, cpu_limit), the usual ones, are written now too.
        Nothing is made when ``zygote`` is no longer this factory's (closed meanwhile)."""
        with self._lock:
            if self._zygote is not zygote or self._next_cgroup is not None or self._next_uid is not None:
                # Starts that overlapped: the spare another one made is still there, and serves
                # the next start as well. Replacing it would mean killing the zygote's child in
                # it, which runs as its isolate's uid: a daemon that gave root up cannot, and its
                # reaper (the one-shots' teardowns) would wait out the cgroup's removal.
                return
        manager = self.cgroups.get()
        nxt: IsolateCgroup | None = None
        uid: UidLease | None = None
        try:
            if manager.layout.version != "none":
                nxt = manager.create()
                if limits is not None:
                    nxt.apply_limits(*limits)
            uid = self._lease_uid(nxt)
            # Asked for before the slot is filled: a start that took the slot first would have
            # its isolate built in this group, and then a spare forked into it as well.
            zygote.prepare(nxt.procs_files if nxt is not None else [], *outer_ids(uid))
        except (OSError, StockadeError):
            dispose(nxt, uid)
            return  # the next start makes its own (and reports what fails)
        with self._lock:
            filled = self._zygote is zygote and self._next_cgroup is None and self._next_uid is None
            if filled:
                self._next_cgroup, self._next_uid = nxt, uid
        if not filled:
            # Closed (or replaced) meanwhile: close() has already emptied the slot, and a group
            # put there now would never be removed (the spare forked into it dies with it).
            dispose(nxt, uid)

    def _lease_uid(self, cgroup: IsolateCgroup | None) -> UidLease | None:
        """As root (or once root handed this to the daemon's user), a host uid of the isolate's own;
        rootless: None, the caller's uid."""
        if os.getuid() != 0 and not self._dropped:
            return None
        if self._uids is None:
            self._uids = UidAllocator(UidRange.from_env())
        return self._uids.lease(cgroup.procs_files if cgroup is not None else [])

    def close(self) -> None:
        """Remove the spare's group (its processes killed) and uid, then stop the zygote, which
        removes the groups it was handed, emptied by then."""
        with self._lock:
            zygote, self._zygote = self._zygote, None
            nxt, self._next_cgroup = self._next_cgroup, None
            nxt_uid, self._next_uid = self._next_uid, None
        dispose(nxt, nxt_uid)
        # The factory closes when its process is done with isolates (the CLI's exit, the daemon's
        # stop): a group whose processes were still dying when its isolate closed (a busy host)
        # is waited for here, rather than left for the next start's sweep.
        if not retry_leftovers(wait_s=LEFTOVERS_WAIT_S) and _kept_leases and self._uids is not None:
            _kept_leases.clear()
            self._uids.sweep()  # the leases kept for those groups (release_uid) go with them
        if zygote is not None:
            zygote.close()


def dispose(cgroup: IsolateCgroup | None, uid: UidLease | None) -> None:
    """End what an isolate (or the spare made for one) had: its processes, its cgroup, its uid."""
    removed = True
    if cgroup is not None:
        cgroup.kill()
        removed = cgroup.remove()
    release_uid(uid, removed)


def release_uid(uid: UidLease | None, cgroup_gone: bool) -> None:
    # A group that outlived its wait still names the isolate's last processes in
    # the lease: the uid is not handed out again until they are gone.
    if uid is not None:
        uid.release(keep_record=not cgroup_gone)
        if not cgroup_gone:
            _kept_leases.add(uid.uid)


_kept_leases: set[int] = set()  # uids whose lease files release_uid kept: swept once their groups are gone


def outer_ids(uid: UidLease | None) -> tuple[int | None, int | None]:
    """The uid/gid an isolate runs as outside its user namespace: as root, its leased
    uid (the gid is the same number); rootless, None (the caller's own ids)."""
    return (uid.uid, uid.uid) if uid is not None else (None, None)
