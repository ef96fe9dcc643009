"""Opening the host path a transfer names without letting a sandbox steer it.

An upload reads, and a download writes, below a host path the caller gives
(``local_path``, ``local_dir``). That path may lie in a directory a sandbox
writes (a shared ``filesystem_access`` mount): a link the sandbox planted on
the way would have the host, as root, read a private tree into the sandbox or
write the sandbox's files into ``/etc/cron.d``. So the path is resolved one
component at a time, each held open (``O_PATH | O_NOFOLLOW``), and a symbolic
link is followed only when root owns it, and only root could have put it
where it is: a sandbox's files are its leased uid's (rootless, the caller's
own, which is why the caller's links are not trusted either), and a sandbox
that writes a directory can move root's links there (or the directories that
hold them) onto the names the host looks up. The system's links
(``/var/run -> /run``, ``/lib``) still work. Below the opened directory,
nothing is ever followed (transfer_pack.py, transfer_unpack.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .errors import TransferError

MAX_LINKS = 40  # the kernel's own limit on links in one resolution (ELOOP past it)
_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def open_local(path: str, *, create: bool = False) -> int:
    """An ``O_PATH`` descriptor of host ``path``: links followed only when root owns them; with
    ``create``, missing directories made (like ``os.makedirs``). ``FileNotFoundError`` when it is
    missing, ``TransferError`` for a link a sandbox could have planted."""
    if not path or "\x00" in path:
        raise ValueError("a host path must be non-empty and without NUL")
    todo = path.split("/")
    fd = os.open("/" if path.startswith("/") else ".", _PATH)
    links = 0
    # Whether a name looked up from here on could have been moved into place by someone but root:
    # a directory on the way whose entries another uid may change.
    movable = _others_may_rename_in(os.fstat(fd))
    try:
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            try:
                inner = os.open(name, _PATH, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=fd)
                todo.insert(0, name)
                continue
            st = os.fstat(inner)
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = _trusted_target(inner, st, path, name, movable)
                finally:
                    os.close(inner)
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, "Too many levels of symbolic links", path)
                todo[:0] = target.split("/")
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _PATH)
                    movable = _others_may_rename_in(os.fstat(fd))
                continue
            os.close(fd)
            fd = inner
            movable = movable or _others_may_rename_in(st)
            if todo and not stat.S_ISDIR(st.st_mode):  # "file/" too, as the kernel says
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _trusted_target(link: int, st: os.stat_result, path: str, name: str, movable: bool) -> str:
    if st.st_uid != 0:
        raise TransferError(
            f"{path}: {name!r} on the way is a symbolic link owned by uid {st.st_uid}, not root (a sandbox "
            "writing a shared directory could have made it): it is not followed; name the real directory instead"
        )
    if movable:
        raise TransferError(
            f"{path}: {name!r} on the way is a symbolic link below a directory whose entries a uid other than "
            "root may change (a sandbox writing a shared directory could have moved a link of root's there): "
            "it is not followed; name the real directory instead"
        )
    return os.readlink("", dir_fd=link)


def _others_may_rename_in(st: os.stat_result) -> bool:
    """Whether a uid other than root may add or rename entries of the directory ``st``: its owner,
    or anyone its group or other write bit lets in. Sticky or not: the sticky bit keeps root's
    entries there, but another uid may still move one of root's links in from elsewhere."""
    if not stat.S_ISDIR(st.st_mode):
        return False
    return st.st_uid != 0 or bool(st.st_mode & 0o022)


def reopen_directory(handle: int) -> int:
    """A readable descriptor of the directory held by the ``O_PATH`` ``handle``."""
    return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=handle)


def reopen_file(handle: int) -> int:
    """A readable descriptor of the file held by the ``O_PATH`` ``handle`` (through
    ``/proc/self/fd``: the inode held, not whatever its name is now)."""
    return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
