"""Writing an archive that came out of an isolate below a host directory.

What comes out of an isolate is hostile (docs/threat-model.md): the archive is
read as a plain tar (no decompression), every member is checked before
anything is written, and only regular files and directories are written, each
through a directory descriptor opened without following links, below the
target directory, to a fresh name renamed over its own. No link is ever made:
a hard link to a file earlier in the archive is written as a copy of that
file's bytes (counted against the cap again), and a symbolic link is refused,
or left out when the caller asks (``links="skip"``). Devices, FIFOs, sparse
members, absolute names and ``..`` are refused, and so are archives over the
byte or member caps, members that could not all be written (a file with
members below it), and what the host holds in their way (a file or a link
where a directory goes): each before the first write. ``transfer.download``
is its one caller.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tarfile
from collections.abc import Callable
from typing import IO, Literal

from .errors import TransferError, TransferTooLargeError, UnsafeArchiveError, printable
from .transfer_paths import open_local, reopen_directory

MAX_DEPTH = 128  # path components of a member
# A GNU long name or link: one holds a name of MAX_DEPTH components of 255 bytes with room to
# spare. (PAX records are refused whole: the packing step asks for GNU's format.)
MAX_METADATA = 64 << 10
_PAX = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_NAMES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_COPY = 1 << 20
# What a directory made on the host is charged against max_bytes: a block of the filesystem's (a
# small archive of long names makes thousands of them, each taking one whatever it holds).
DIRECTORY_BYTES = 4096
# What tarfile raises on an archive it cannot read: its own errors, and the ones a hostile header
# the walk above let through could still raise from inside its parsing.
_MALFORMED = (tarfile.TarError, ValueError, IndexError, EOFError, RecursionError)

# Version control directories whose configuration runs commands (git's core.fsmonitor, hg's hooks).
_VCS = {".git": "git", ".hg": "hg"}
# What makes a directory a repository to git: HEAD, with objects and refs beside it or in the
# directory its commondir names (lowercased: a case-insensitive directory matches any case).
_BARE_GIT = frozenset({"head", "objects", "refs", "commondir"})
# Path components; the regular file whose bytes go there (a hard link's: its target's), None for a directory.
_Plan = tuple[tuple[str, ...], tarfile.TarInfo | None]
Links = Literal["refuse", "skip"]  # what a download does with a symbolic link
LINKS: tuple[Links, ...] = ("refuse", "skip")


def unpack(
    archive: IO[bytes],
    local_dir: str,
    cap: int,
    max_files: int,
    src: str,
    overwrite: bool,
    executable: bool,
    links: Links = "refuse",
    vcs: bool = False,
    stop: Callable[[], None] | None = None,
) -> tuple[int, int, int, int]:
    """Check every member of the untrusted ``archive``, and what each would meet below
    ``local_dir``, then write them there: the files, directories and bytes written, and the
    symbolic links left out. ``stop`` is called before each file and each MiB written (it raises
    to end the writing: an async download's cancel)."""
    _check_headers(archive, src)
    try:
        tar = tarfile.open(fileobj=archive, mode="r:")  # a plain tar: no decompression
    except _MALFORMED as exc:
        raise UnsafeArchiveError(f"the archive of {src} from the sandbox is not a tar: {exc}") from None
    with tar:
        plans, dirs, skipped, marks = _check(tar, cap, max_files, src, links == "skip", vcs)
        # In path order, each directory's members follow it and one another: each path is
        # walked from where the last one's walk left off, not from the top.
        plans.sort(key=lambda plan: plan[0])
        there = _existing(local_dir, plans, src)
        if not vcs:
            _refuse_repositories_with_what_is_there(local_dir, marks, src)
        if there and not overwrite:
            first = printable(os.path.join(local_dir, *there[0]))
            raise TransferError(
                f"download of {src}: {first} exists ({len(there)} file(s) would be replaced): "
                "pass overwrite=True to replace them; nothing was written"
            )
        handle = open_local(local_dir, create=True)
        try:
            walk = _Walk(reopen_directory(handle), make=True)
        finally:
            os.close(handle)
        files = size = 0
        try:
            for parts, member in plans:
                if stop is not None:
                    stop()
                try:
                    parent = walk.to(parts if member is None else parts[:-1])
                except OSError as exc:
                    raise TransferError(
                        f"cannot write {_named(parts)}: {_named(walk.failed)} is not a directory here "
                        f"(links are not followed): {exc.strerror}"
                    ) from None
                if member is not None:
                    _write(tar, parent, parts, member, executable, stop)
                    files += 1
                    size += member.size
        finally:
            walk.close()
    return files, dirs, size, skipped


class _Walk:
    """Directory descriptors along the last path walked below ``root`` (which it owns), none
    opened through a link: a path in order reuses its parents' opens."""

    def __init__(self, root: int, make: bool) -> None:
        self.root, self.make = root, make
        self.chain: list[tuple[str, int]] = []
        self.failed: tuple[str, ...] = ()  # the path a walk that raised could not open

    def to(self, parts: tuple[str, ...]) -> int:
        """``parts``'s descriptor (made, when making); OSError for one that is not a directory."""
        common = 0
        while common < min(len(self.chain), len(parts)) and self.chain[common][0] == parts[common]:
            common += 1
        while len(self.chain) > common:
            os.close(self.chain.pop()[1])
        flags = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDONLY if self.make else os.O_PATH)
        for depth in range(common, len(parts)):
            parent = self.chain[-1][1] if self.chain else self.root
            try:
                if self.make:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(parts[depth], 0o755, dir_fd=parent)
                fd = os.open(parts[depth], flags, dir_fd=parent)
            except OSError:
                self.failed = parts[: depth + 1]
                raise
            self.chain.append((parts[depth], fd))
        return self.chain[-1][1] if self.chain else self.root

    def close(self) -> None:
        while self.chain:
            os.close(self.chain.pop()[1])
        os.close(self.root)


def _named(parts: tuple[str, ...]) -> str:
    """A member's path as a message may quote it: the isolate chose it."""
    return printable("/".join(parts))


def _check(
    tar: tarfile.TarFile, cap: int, max_files: int, src: str, skip_symlinks: bool, vcs: bool
) -> tuple[list[_Plan], int, int, dict[tuple[str, ...], set[str]]]:
    """Every member, checked before a byte is written: regular files and directories only
    (a hard link as a copy of its file), names inside, sizes and counts under the caps; and
    the numbers of directories it makes and of symbolic links left out, and the directories it
    puts what makes a bare git repository in (with those names)."""
    plans: list[_Plan] = []
    files: dict[tuple[str, ...], tarfile.TarInfo] = {}  # the regular files so far, by name
    # Every directory the writes will make, named or not: one member's name of 128 components
    # makes 128 of them, so it is these, not the members, that max_files counts.
    directories: set[tuple[str, ...]] = set()
    marks: dict[tuple[str, ...], set[str]] = {}  # directories holding what makes a bare git repository
    total = skipped = named_directories = 0
    while True:
        try:
            member = tar.next()
        except _MALFORMED as exc:
            raise UnsafeArchiveError(f"the archive of {src} from the sandbox is malformed: {exc}") from None
        if member is None:
            if not vcs:
                _refuse_bare_repositories(marks, src)
            return plans, len(directories), skipped, marks
        if len(plans) + skipped >= max_files:
            raise TransferTooLargeError(
                f"download of {src} has over {max_files} members (max_files); nothing was written"
            )
        parts = _parts(member.name)
        if not vcs and (found := next((p for p in parts if p.lower() in _VCS), None)):
            raise UnsafeArchiveError(
                f"the archive of {src} holds {member.name!r}: a {found} directory's configuration names commands "
                f"{_VCS[found.lower()]} runs on the host, unasked, in any directory below it (a shell prompt's "
                "status, an editor); vcs=True writes it; nothing was written"
            )
        for depth, part in enumerate(parts):
            if part.lower() in _BARE_GIT:
                marks.setdefault(parts[:depth], set()).add(part.lower())
        kept = parts if member.isdir() else parts[:-1]
        for depth in range(len(kept), 0, -1):  # from the deepest: its parents are known once it is
            if kept[:depth] in directories:
                break
            if kept[:depth] in files:
                raise UnsafeArchiveError(
                    f"the archive of {src} holds {member.name!r}, which needs {_named(kept[:depth])} to be a "
                    "directory: it holds a file there before it; nothing was written"
                )
            directories.add(kept[:depth])
        made = len(plans) - named_directories + len(directories) + (not member.isdir())  # with this member's
        if made > max_files:
            raise TransferTooLargeError(
                f"download of {src} makes over {max_files} files and directories (max_files); nothing was written"
            )
        if total + len(directories) * DIRECTORY_BYTES > cap:
            raise TransferTooLargeError(
                f"download of {src} is too large: its files and the {len(directories)} directories it makes "
                f"({DIRECTORY_BYTES} bytes each) come to over {cap} bytes (max_bytes); nothing was written"
            )
        if member.isdir():
            plans.append((parts, None))
            named_directories += 1
            continue
        if member.issym() and skip_symlinks:
            skipped += 1
            continue
        if member.islnk() and parts:
            # Another name of a file packed before it: written as a copy of that file's bytes.
            try:
                target = files.get(_parts(member.linkname))
            except UnsafeArchiveError:
                target = None  # a name out of the tree: no file of this archive
            if target is None:
                raise UnsafeArchiveError(
                    f"the archive of {src} holds {member.name!r}, a hard link to {member.linkname!r}, "
                    "which is no file before it in the archive; nothing was written"
                )
            member = target
        elif not member.isreg() or member.issparse() or not parts:
            hint = " (links='skip' leaves symbolic links out)" if member.issym() else ""
            raise UnsafeArchiveError(
                f"the archive of {src} holds {member.name!r}, {_kind(member)}: a download writes regular files "
                f"and directories only{hint}; nothing was written"
            )
        if member.size < 0:  # base-256 sizes can be negative: one would offset the cap
            raise UnsafeArchiveError(f"the archive's {member.name!r} declares a negative size; nothing was written")
        if parts in directories:
            raise UnsafeArchiveError(
                f"the archive of {src} holds {member.name!r}, a file where it makes a directory; nothing was written"
            )
        total += member.size
        if total + len(directories) * DIRECTORY_BYTES > cap:
            raise TransferTooLargeError(
                f"download of {src} is too large: its files declare over {cap} bytes (max_bytes)"
                + (
                    f", with {DIRECTORY_BYTES} bytes for each of the {n} directories it makes"
                    if (n := len(directories))
                    else ""
                )
                + "; nothing was written"
            )
        plans.append((parts, member))
        files[parts] = member


def _refuse_bare_repositories(marks: dict[tuple[str, ...], set[str]], src: str, there: str = "") -> None:
    """A directory laid out as a bare git repository is one to git, whatever its name (HEAD with
    objects or refs beside it: git's own test), and its config's commands run as a .git's do."""
    for where, names in marks.items():
        if "head" in names and names - {"head"}:
            raise UnsafeArchiveError(
                f"the archive of {src} holds {_named(where) or 'its top'}, laid out as a git repository (HEAD, "
                f"{' and '.join(sorted(names - {'head'}))}){there}: git runs what its config names there, "
                "unasked; vcs=True writes it; nothing was written"
            )


def _refuse_repositories_with_what_is_there(local_dir: str, marks: dict[tuple[str, ...], set[str]], src: str) -> None:
    """The same layout made of this archive and what its directories below ``local_dir`` hold
    already (one download writes objects and refs, the next HEAD and a config)."""
    walk = _walk_below(local_dir)
    if walk is None:
        return
    combined: dict[tuple[str, ...], set[str]] = {}
    try:
        for where, names in sorted(marks.items()):
            try:
                listed = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=walk.to(where))
            except OSError:
                continue  # not there yet: the archive's alone, checked already
            try:
                combined[where] = names | ({name.lower() for name in os.listdir(listed)} & _BARE_GIT)
            finally:
                os.close(listed)
    finally:
        walk.close()
    _refuse_bare_repositories(combined, src, " with what is there already")


def _check_headers(archive: IO[bytes], src: str) -> None:
    """Walk every header as ``tarfile`` will, before it reads any, each parsed by ``tarfile``'s own
    ``TarInfo.frombuf`` (so a field reads here as it will there). Refused: a header it cannot read
    before the archive's end (``tarfile`` would stop there and hand back a shortened archive as
    whole); a PAX member (the packing step writes GNU's format, which has none, and ``tarfile``
    holds PAX records as a dict many times their size, copied into each member after a global
    one: a hostile 2 MiB archive took a GiB); a sparse member (``tarfile`` reads its extension
    blocks into a list before anything can refuse it); a GNU long name or link over
    ``MAX_METADATA``, or more of them in a row than one of each (``tarfile`` follows a chain of
    them by recursion)."""
    end = archive.seek(0, os.SEEK_END)
    archive.seek(0)
    in_a_row = 0  # GNU long names and links just before the member they name
    while len(block := archive.read(512)) == 512 and block.count(0) != 512:  # a zero block: the end
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError) as exc:
            what = "is not a tar" if archive.tell() == 512 else "has a header tar cannot read"
            raise UnsafeArchiveError(
                f"the archive of {src} from the sandbox {what} ({exc}); nothing was written"
            ) from None
        kind, size = info.type, info.size
        if size < 0:  # base-256 sizes can be negative: one would step the walk backwards
            raise UnsafeArchiveError(f"the archive of {src} declares a negative size; nothing was written")
        if kind in _PAX:
            raise UnsafeArchiveError(
                f"the archive of {src} from the sandbox holds PAX records, which the packing step never "
                "writes; nothing was written"
            )
        if kind == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchiveError(
                f"the archive of {src} holds {info.name!r}, a sparse file: a download writes regular files "
                "and directories only; nothing was written"
            )
        if kind in _LONG_NAMES:
            in_a_row += 1
            if size > MAX_METADATA:
                raise UnsafeArchiveError(
                    f"the archive of {src} from the sandbox holds a long name of {size} bytes, over "
                    f"{MAX_METADATA}; nothing was written"
                )
            if in_a_row > len(_LONG_NAMES):
                raise UnsafeArchiveError(
                    f"the archive of {src} from the sandbox holds a chain of long names, which the packing "
                    "step never writes; nothing was written"
                )
        else:
            in_a_row = 0
        # The data tarfile steps over: a long name's, a regular member's and an unknown type's only.
        if kind in _LONG_NAMES or kind in tarfile.REGULAR_TYPES or kind not in tarfile.SUPPORTED_TYPES:
            if size > end - archive.tell():
                raise UnsafeArchiveError(
                    f"the archive of {src} declares {info.name!r} of {size} bytes, more than it holds; "
                    "nothing was written"
                )
            archive.seek(-(-size // 512) * 512, os.SEEK_CUR)
    archive.seek(0)


def _walk_below(local_dir: str) -> _Walk | None:
    """A walk below ``local_dir`` as it is now, opening without making; None if it is not there yet."""
    try:
        handle = open_local(local_dir)
    except FileNotFoundError:
        return None
    try:
        return _Walk(os.dup(handle), make=False)
    finally:
        os.close(handle)


def _existing(local_dir: str, plans: list[_Plan], src: str) -> list[tuple[str, ...]]:
    """The files of ``plans`` (in path order) already below ``local_dir``, an entry of any kind (a
    link included); what the writes could not pass (a file or a link where a directory goes, a
    directory where a file goes) refused. Walked as the writes will walk, without following a link."""
    walk = _walk_below(local_dir)
    if walk is None:
        return []
    there = []
    try:
        for parts, member in plans:
            where = parts if member is None else parts[:-1]
            try:
                parent = walk.to(where)
                if member is None:
                    continue
                found = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # made by the writes
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise TransferError(
                        f"download of {src}: {printable(os.path.join(local_dir, *walk.failed))} is not a directory "
                        f"here (links are not followed), where the archive {'makes' if member is None else 'writes'} "
                        f"{_named(parts)}; nothing was written"
                    ) from None
                raise TransferError(
                    f"cannot check {printable(os.path.join(local_dir, *parts))}: {exc.strerror}"
                ) from None
            if stat.S_ISDIR(found.st_mode):
                raise TransferError(
                    f"download of {src}: {printable(os.path.join(local_dir, *parts))} is a directory here, where the "
                    "archive writes a file; nothing was written"
                )
            there.append(parts)
    finally:
        walk.close()
    return there


def _parts(name: str) -> tuple[str, ...]:
    """A member's name as path components below ``local_dir``; absolute names and ``..`` refused."""
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if name.startswith("/") or "\x00" in name or ".." in parts:
        raise UnsafeArchiveError(f"the archive names {name!r}, outside the download's directory; nothing was written")
    if len(parts) > MAX_DEPTH or any(len(os.fsencode(p)) > 255 for p in parts):
        raise UnsafeArchiveError(f"the archive names {name[:200]!r}..., too deep or too long; nothing was written")
    return parts


_KINDS = {
    tarfile.SYMTYPE: "a symbolic link to",
    tarfile.LNKTYPE: "a hard link to",
    tarfile.CHRTYPE: "a device node",
    tarfile.BLKTYPE: "a device node",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


def _kind(member: tarfile.TarInfo) -> str:
    kind = "a sparse file" if member.issparse() else _KINDS.get(member.type, f"an entry of type {member.type!r}")
    return f"{kind} {member.linkname!r}" if kind.endswith(" to") else kind


def _write(
    tar: tarfile.TarFile,
    parent: int,
    parts: tuple[str, ...],
    member: tarfile.TarInfo,
    executable: bool,
    stop: Callable[[], None] | None,
) -> None:
    """Write one regular file: to a fresh name in its directory, then renamed over its own."""
    source = tar.extractfile(member)
    if source is None:
        raise UnsafeArchiveError(f"the archive's {member.name!r} has no data")
    temp = f".stockade-{secrets.token_hex(8)}"
    mode = 0o755 if executable and member.mode & 0o111 else 0o644
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    try:
        with os.fdopen(fd, "wb") as out:
            left = member.size
            while left:
                if stop is not None:
                    stop()
                chunk = source.read(min(_COPY, left))
                if not chunk:
                    raise UnsafeArchiveError(f"the archive's {member.name!r} ends before its declared size")
                out.write(chunk)
                left -= len(chunk)
            out.flush()
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(out.fileno(), (member.mtime, member.mtime))
        try:
            os.replace(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as exc:
            raise TransferError(f"cannot write {_named(parts)}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise
