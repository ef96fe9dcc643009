"""Packing a host file or directory into the tar an upload sends.

The tree may lie where a sandbox writes (a shared directory), and may change
while it is read: it is walked through directory descriptors, never by path.
Each directory is opened below its parent without following links, each file
the same way and checked to be the regular file just listed, so a directory
swapped for a link mid-walk (``renameat2(RENAME_EXCHANGE)``) is refused, not
followed into a tree the host may read and the sandbox may not. The path the
caller gave is opened by ``transfer_paths.open_local``. A link inside the tree
goes as a link when its target stays inside; any other is refused, as are
FIFOs, sockets and devices. The archive is held to its cap before each entry
is written.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO

from .errors import TransferError, TransferTooLargeError
from .transfer_paths import open_local, reopen_directory, reopen_file

MAX_DEPTH = 128  # directories below the uploaded one: each is held open while its children are read
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Packed:
    """What went into the archive: regular files, directories, links and the files' bytes."""

    files: int = 0
    directories: int = 0
    links: int = 0
    bytes: int = 0
    local: str = field(default="", repr=False)


def pack(local: str, spool: IO[bytes], cap: int) -> Packed:
    """Write the tar of ``local`` to ``spool``: a directory's contents, or one file by its name."""
    handle = open_local(local)
    packed = Packed(local=local)
    try:
        top = os.fstat(handle)
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.GNU_FORMAT) as tar:
            if stat.S_ISDIR(top.st_mode):
                directory = reopen_directory(handle)
                try:
                    _pack_directory(tar, spool, cap, directory, "", local, 0, packed)
                finally:
                    os.close(directory)
            elif stat.S_ISREG(top.st_mode):
                _add_file(tar, spool, cap, reopen_file(handle), os.path.basename(os.path.normpath(local)), packed)
            else:
                raise TransferError(f"{local} is neither a regular file nor a directory")
    finally:
        os.close(handle)
    if spool.tell() > cap:
        raise TransferTooLargeError(
            f"upload of {local} is too large: {spool.tell()} bytes or more as an archive, "
            f"and max_bytes is {cap}; nothing was sent"
        )
    return packed


def _pack_directory(
    tar: tarfile.TarFile, spool: IO[bytes], cap: int, fd: int, prefix: str, where: str, depth: int, packed: Packed
) -> None:
    """Every entry below the directory ``fd`` (``where`` on the host, ``prefix`` in the archive)."""
    for name in sorted(os.listdir(fd)):
        arcname = prefix + name
        path = os.path.join(where, name)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
        except OSError as exc:  # gone, or no longer a link, since the listing
            raise TransferError(f"{path} changed while it was packed ({exc.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            inside = posixpath.normpath(posixpath.join(posixpath.dirname(arcname), target))
            if target.startswith("/") or inside == ".." or inside.startswith("../"):
                raise TransferError(f"{path} is a link to {target}, outside the uploaded tree: links are not followed")
            tar.addfile(_held_to_cap(_info(arcname, st, tarfile.SYMTYPE, target), spool, cap, packed))
            packed.links += 1
        elif stat.S_ISDIR(st.st_mode):
            if depth >= MAX_DEPTH:
                raise TransferError(f"{path} is over {MAX_DEPTH} directories deep: it cannot be uploaded")
            inner = _open_as_listed(name, fd, _DIRECTORY, st, path)
            try:
                tar.addfile(_held_to_cap(_info(arcname, st, tarfile.DIRTYPE), spool, cap, packed))
                packed.directories += 1
                _pack_directory(tar, spool, cap, inner, arcname + "/", path, depth + 1, packed)
            finally:
                os.close(inner)
        elif stat.S_ISREG(st.st_mode):
            _add_file(tar, spool, cap, _open_as_listed(name, fd, _FILE, st, path), arcname, packed)
        else:
            raise TransferError(f"{path} is not a regular file, directory or link: it cannot be uploaded")


def _open_as_listed(name: str, parent: int, flags: int, listed: os.stat_result, path: str) -> int:
    """``name`` below ``parent``, not through a link, and the very entry listed a moment ago."""
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        raise TransferError(f"{path} changed while it was packed ({exc.strerror}): links are not followed") from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (listed.st_dev, listed.st_ino) or stat.S_IFMT(now.st_mode) != stat.S_IFMT(
        listed.st_mode
    ):
        os.close(fd)
        raise TransferError(f"{path} changed while it was packed: it was replaced by another entry")
    return fd


def _add_file(tar: tarfile.TarFile, spool: IO[bytes], cap: int, fd: int, arcname: str, packed: Packed) -> None:
    """The regular file open on ``fd`` (checked so by whoever opened it), at its size now."""
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(f.fileno())
        info = _info(arcname, now, tarfile.REGTYPE)
        info.size = now.st_size
        try:
            tar.addfile(_held_to_cap(info, spool, cap, packed), _Sized(f, info.size))
        except _Shrank:
            raise TransferError(f"{arcname} shrank while it was packed (something writes it)") from None
    packed.files += 1
    packed.bytes += info.size


class _Shrank(Exception):
    """A file ended before the size its header was written with."""


class _Sized:
    """A file read for ``size`` bytes, that says so (``_Shrank``) when it ends before them."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        data = self.f.read(want)
        if len(data) < want:
            raise _Shrank
        self.left -= len(data)
        return data


def _held_to_cap(info: tarfile.TarInfo, spool: IO[bytes], cap: int, packed: Packed) -> tarfile.TarInfo:
    """``info``, once the archive with it (its headers, long names included, and its data) and the
    end blocks stays within ``cap``: refused before anything is written, so that a tree of many
    links or a huge file never fills the spool past it."""
    at_least = spool.tell() + len(info.tobuf(tarfile.GNU_FORMAT)) + -(-info.size // 512) * 512 + 1024
    if at_least > cap:
        raise TransferTooLargeError(
            f"upload of {packed.local} is too large: at least {at_least} bytes as an archive, "
            f"and max_bytes is {cap}; nothing was sent"
        )
    return info


def _info(arcname: str, st: os.stat_result, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.mtime = max(0, int(st.st_mtime))
    info.mode = stat.S_IMODE(st.st_mode) & 0o777
    info.type = kind
    info.linkname = linkname
    return info
