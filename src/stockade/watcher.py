"""The file watcher that ``Sandbox.watch`` starts inside the isolate (``watch.py``, the host's side).

It runs as any code in the sandbox runs (its uid, its policy; the host sends this file to
``python3 -I -S -`` on its stdin), so it is stdlib-only and needs nothing the isolate lacks:
inotify through ``ctypes`` (every runtime's kernel has it: the host's, gVisor's Sentry, the
guest's). What it prints is one JSON object a line, which the host reads as untrusted text:

- ``{"ready": N}`` once N directories are watched (the host's ``watch()`` returns then);
- ``{"kind": K, "path": P, "dir": D}``: K one of ``KINDS``; ``lost`` says events were lost
  (the kernel's queue overflowed, or a new directory could not be watched: P);
- ``{"error": TEXT, "errno": NAME}`` when it cannot watch ``path`` at all (it exits 2).

It ends when its root is deleted or moved (after saying so) or when it is killed.
Arguments: PATH RECURSIVE(0/1) KIND,KIND,... (the kinds to report).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import sys

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_ISDIR = 0x1000000, 0x2000000, 0x4000000, 0x40000000
IN_CLOEXEC = 0o2000000
KINDS = {  # what each reported kind is, by inotify's mask bit
    IN_CREATE: "created",
    IN_MODIFY: "modified",
    IN_CLOSE_WRITE: "closed_write",
    IN_ATTRIB: "attrib",
    IN_DELETE: "deleted",
    IN_MOVED_FROM: "moved_from",
    IN_MOVED_TO: "moved_to",
}
MASK = sum(KINDS) | IN_DELETE_SELF | IN_MOVE_SELF | IN_EXCL_UNLINK
HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
MAX_DIRECTORIES = 100_000  # watched at once: past it, a new directory's events are reported lost


class Watcher:
    def __init__(self, root: str, recursive: bool, kinds: set[str]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.root, self.recursive, self.kinds = root, recursive, kinds
        self.paths: dict[int, str] = {}  # wd -> the path it watches
        self.moving: dict[int, str] = {}  # cookie -> the path a directory left, until its moved_to (or the batch ends)
        self.last: str | None = None  # the "modified"/"created" line printed last in this read
        self.root_is_dir = os.path.isdir(root)
        # The kernel's views a recursive watch stays out of (but one its root is in: asked for).
        self.views = [v for v in ("/proc", "/sys", "/dev") if not (root == v or root.startswith(v + "/"))]
        self.root_wd = -1

    def add(self, path: str, top: bool = False) -> None:
        flags = MASK if top else MASK | IN_ONLYDIR | IN_DONT_FOLLOW
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), flags)
        if wd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)
        self.paths[wd] = path
        if top:
            self.root_wd = wd

    def add_tree(self, path: str, say_created: bool, watched: bool = False) -> None:
        """Watch ``path`` (unless ``watched`` already) and the directories under it; with
        ``say_created``, report what is there already (made before its watch was: a directory
        made and filled at once). Each directory is watched before it is listed, so that what is
        made in it meanwhile is either listed or seen by its watch (or both: said twice)."""
        stack = [(path, watched)]
        while stack:
            directory, done = stack.pop()
            if not done:
                if len(self.paths) >= MAX_DIRECTORIES:
                    self.say("lost", directory, True)
                    continue
                try:
                    self.add(directory)
                except OSError:  # gone already, or past the kernel's limit: its events are lost
                    self.say("lost", directory, True)
                    continue
            try:
                with os.scandir(directory) as listing:
                    entries = [(entry.path, entry.is_dir(follow_symlinks=False)) for entry in listing]
            except OSError:
                continue  # gone, or not ours to list
            entries.sort()
            if say_created:
                for entry_path, is_dir in entries:
                    self.say("created", entry_path, is_dir)
            stack += [
                (entry_path, False) for entry_path, is_dir in reversed(entries) if is_dir and self.walks(entry_path)
            ]

    def walks(self, directory: str) -> bool:
        """Whether a recursive watch goes into ``directory``: not into /proc, /sys or /dev (the
        kernel's views, with no events to give and trees without end) unless its root is there."""
        return not any(directory == view or directory.startswith(view + "/") for view in self.views)

    def say(self, kind: str, path: str, is_dir: bool, always: bool = False) -> None:
        if not always and kind != "lost" and kind not in self.kinds:
            return
        line = json.dumps({"kind": kind, "path": path, "dir": is_dir})
        # A burst of writes to one file is one "modified" (and a file found by a walk and by its
        # watch at once, one "created"); the same event again after another, or in a later read
        # of the kernel's queue, is said again.
        if line != self.last:
            sys.stdout.write(line + "\n")
        self.last = line if kind in ("modified", "created") else None

    def moved_out(self, old: str) -> None:
        """A watched directory left for somewhere unwatched: stop watching it and what is under it."""
        for wd, path in list(self.paths.items()):
            if path == old or path.startswith(old + "/"):
                self.libc.inotify_rm_watch(self.fd, wd)
                del self.paths[wd]

    def moved_in(self, old: str, new: str) -> None:
        for wd, path in list(self.paths.items()):
            if path == old or path.startswith(old + "/"):
                self.paths[wd] = new + path[len(old) :]

    def event(self, wd: int, mask: int, cookie: int, name: str) -> bool:
        """One event; False once the root is gone."""
        if mask & IN_Q_OVERFLOW:
            self.say("lost", self.root, True)
            return True
        base = self.paths.get(wd)
        if base is None:
            return True  # a watch already dropped
        if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
            if wd == self.root_wd:  # deleted, moved, or its filesystem unmounted: nothing left to watch
                self.say("moved_from" if mask & IN_MOVE_SELF else "deleted", base, self.root_is_dir, always=True)
                return False
            if mask & IN_IGNORED:
                del self.paths[wd]
            return True
        path = os.path.join(base, name) if name else base
        is_dir = bool(mask & IN_ISDIR)
        for bit, kind in KINDS.items():
            if mask & bit:
                self.say(kind, path, is_dir)
        if is_dir and self.recursive:
            if mask & IN_CREATE:
                self.add_tree(path, say_created=True)
            elif mask & IN_MOVED_FROM:
                self.moving[cookie] = path
            elif mask & IN_MOVED_TO:
                old = self.moving.pop(cookie, None)
                if old is not None:
                    self.moved_in(old, path)
                else:
                    self.add_tree(path, say_created=False)
        return True

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 256 * 1024)
            except InterruptedError:
                continue
            at = 0
            while at + HEADER.size <= len(data):
                wd, mask, cookie, size = HEADER.unpack_from(data, at)
                raw = data[at + HEADER.size : at + HEADER.size + size].split(b"\0", 1)[0]
                at += HEADER.size + size
                if not self.event(wd, mask, cookie, os.fsdecode(raw)):
                    sys.stdout.flush()
                    return
            for old in self.moving.values():  # moved out of the tree: no moved_to came with it
                self.moved_out(old)
            self.moving.clear()
            self.last = None
            sys.stdout.flush()


def main() -> None:
    root, recursive, kinds = os.path.abspath(sys.argv[1]), sys.argv[2] == "1", set(sys.argv[3].split(","))
    try:
        watcher = Watcher(root, recursive, kinds)
        watcher.add(root, top=True)
        if recursive and watcher.root_is_dir:
            watcher.add_tree(root, say_created=False, watched=True)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        sys.stdout.write(json.dumps({"error": f"{root}: {exc.strerror}", "errno": code}) + "\n")
        sys.exit(2)
    sys.stdout.write(json.dumps({"ready": len(watcher.paths)}) + "\n")
    sys.stdout.flush()
    watcher.run()


if __name__ == "__main__":
    main()
