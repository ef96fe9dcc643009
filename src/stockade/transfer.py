"""Directory upload and download: a tar stream carried by a sandbox's own file calls.

``upload`` packs a host file or directory into a tar on the host, writes it
into the isolate in pieces of at most one call's data (``write_file``, 7 MiB)
and unpacks it there with the isolate's ``tar``. ``download`` has the isolate's
``tar`` pack a path into pieces under ``/tmp``, reads them back (``read_file``)
and unpacks them on the host. Only ``write_file``, ``read_file`` and ``exec``
are used, so the same code serves the SDK's ``Sandbox``, the daemon's
``RemoteSandbox`` and every runtime (docs/sdk.md, "Directories").

What comes out of an isolate is hostile (docs/threat-model.md): the archive is
read as a plain tar (no decompression), every member is checked before
anything is written, and only regular files and directories are written, each
through a directory descriptor opened without following links, below
``local_dir``. Links, devices, FIFOs, sparse members, absolute names and
``..`` are refused, and so are archives over the byte or member caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import secrets
import stat
import tarfile
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeVar

from .agent.wire import MAX_FILE_PIECE
from .errors import PathNotFoundError, SandboxError, StockadeError
from .limits import MAX_CALL_BYTES
from .result import ExecResult

DEFAULT_MAX_BYTES = 256 << 20  # the archive, either way
DEFAULT_MAX_FILES = 100_000  # members of a downloaded archive
MAX_DEPTH = 128  # path components of a downloaded member
_NOT_FOUND = 66  # the download script's exit status for a missing path (EX_NOINPUT)
_COPY = 1 << 20
_MIN_PIECE = 64 << 10  # an upload's pieces shrink to this for a small max_file_size_bytes, no further

T = TypeVar("T")


class TransferError(SandboxError):
    """An upload or download could not be done; the message says why (tar's own words where it spoke)."""


class TransferTooLargeError(TransferError):
    """The archive is over ``max_bytes`` (or a download over ``max_files``); nothing was sent or written."""


class UnsafeArchiveError(TransferError):
    """The archive from the sandbox holds what the host will not write (a link, a device, a name outside)."""


@dataclass(frozen=True)
class TransferSummary:
    """What a transfer carried: regular files, directories, links (uploads only) and the files' bytes."""

    files: int
    directories: int
    bytes: int
    links: int = 0


class Transferable(Protocol):
    """What a transfer needs of a sandbox: ``Sandbox``, ``RemoteSandbox`` (or ``read_file(path, max_bytes)``)."""

    def write_file(self, path: str, data: bytes, mode: int, /) -> None: ...

    def read_file(self, path: str, max_bytes: int | None = None, /) -> bytes: ...

    def exec(self, argv: list[str], /) -> ExecResult: ...


class AsyncTransferable(Protocol):
    """The async twin: ``AsyncSandbox``, ``AsyncRemoteSandbox``."""

    def write_file(self, path: str, data: bytes, mode: int, /) -> Awaitable[None]: ...

    def read_file(self, path: str, max_bytes: int | None = None, /) -> Awaitable[bytes]: ...

    def exec(self, argv: list[str], /) -> Awaitable[ExecResult]: ...


# The parts are files in /tmp named by a random base: BASE.000000, BASE.000001, ...
_UNPACK = 'mkdir -p -- "$2" && cat -- "$1".[0-9]* | tar -x --no-same-owner -f - -C "$2"\ns=$?\nrm -f -- "$1".*\nexit $s'
# Pieces no larger than the policy's max_file_size_bytes (RLIMIT_FSIZE, in 512-byte blocks).
# It answers "TAR_STATUS SIZE PIECE_SIZE".
_PACK = """src=$1 parent=$2 name=$3 out=$4 max=$5 piece=$6
if [ -d "$src" ]; then set -- -C "$src" .
elif [ -e "$src" ] || [ -L "$src" ]; then set -- -C "$parent" "./$name"
else echo "$src: No such file or directory" >&2; exit 66
fi
blocks=$(ulimit -f)
case $blocks in *[!0-9]*|'') ;; *) [ "$((blocks * 512))" -lt "$piece" ] && piece=$((blocks * 512)) ;; esac
{ tar -cf - --exclude="${out##*/}.*" "$@"; echo $? >"$out.rc"; } | head -c "$((max + 1))" \
  | split -a 6 -d -b "$piece" - "$out." || { echo "cutting the archive into pieces failed" >&2; exit 70; }
echo "$(cat -- "$out.rc") $(cat -- "$out".[0-9]* 2>/dev/null | wc -c) $piece"
"""
_REMOVE = 'rm -f -- "$1".*'


# ---- upload ---------------------------------------------------------------------------


def upload(
    sandbox: Transferable, local_path: str | os.PathLike[str], remote_dir: str, *, max_bytes: int | None = None
) -> TransferSummary:
    """Copy ``local_path`` into ``remote_dir`` in the sandbox (made if missing): a directory's
    contents, or a file by its name. ``max_bytes`` caps the archive (default 256 MiB): one over
    it raises ``TransferTooLargeError`` before anything is sent."""
    cap = _cap(max_bytes)
    dest = _remote(remote_dir, "remote_dir")
    with tempfile.TemporaryFile() as spool:
        summary = _pack(os.fspath(local_path), spool, cap)
        spool.seek(0)
        base = f"/tmp/.stockade-upload-{secrets.token_hex(8)}"
        unpacked = False
        try:
            _send(sandbox, spool, base)
            result = sandbox.exec(["sh", "-c", _UNPACK, "sh", base, dest])
            unpacked = result.success  # the script removed the parts
        finally:
            if not unpacked:
                _remove(sandbox, base)
    if not unpacked:
        raise TransferError(f"unpacking the upload into {dest} in the sandbox failed: {_why(result)}")
    return summary


def _send(sandbox: Transferable, spool: IO[bytes], base: str) -> None:
    """Write ``spool`` in pieces of one call's data, halved while the isolate's file size
    limit (the policy's ``max_file_size_bytes``) refuses them."""
    size = MAX_CALL_BYTES
    index = 0
    while piece := spool.read(size):
        try:
            sandbox.write_file(f"{base}.{index:06d}", piece, 0o600)
        except OSError as exc:
            if exc.errno != errno.EFBIG or size <= _MIN_PIECE:
                raise
            spool.seek(-len(piece), os.SEEK_CUR)
            size = min(size, len(piece)) // 2
            continue
        index += 1


def _pack(local: str, spool: IO[bytes], cap: int) -> TransferSummary:
    """Write the tar of ``local`` to ``spool``: a directory's contents, or one file."""
    root = os.path.realpath(local)  # the path given is followed; nothing below it is
    top = os.stat(root)
    if stat.S_ISDIR(top.st_mode):
        entries = list(_walk(root))
    elif stat.S_ISREG(top.st_mode):
        entries = [(root, os.path.basename(os.path.normpath(local)), top)]
    else:
        raise TransferError(f"{local} is neither a regular file nor a directory")
    estimate = 1024 + sum(512 + -(-st.st_size // 512) * 512 if stat.S_ISREG(st.st_mode) else 512 for *_, st in entries)
    if estimate > cap:
        raise TransferTooLargeError(
            f"upload of {local} is too large: at least {estimate} bytes as an archive, "
            f"and max_bytes is {cap}; nothing was sent"
        )
    files = dirs = links = size = 0
    with tarfile.open(fileobj=spool, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, arcname, st in entries:
            info = tarfile.TarInfo(arcname)
            info.mtime = max(0, int(st.st_mtime))
            info.mode = stat.S_IMODE(st.st_mode) & 0o777
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                dirs += 1
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
                links += 1
            else:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    now = os.fstat(f.fileno())
                    if not stat.S_ISREG(now.st_mode):
                        raise TransferError(f"{path} changed into something other than a regular file")
                    info.size = now.st_size
                    tar.addfile(info, f)
                files += 1
                size += info.size
            if spool.tell() > cap:
                break
    if spool.tell() > cap:
        raise TransferTooLargeError(
            f"upload of {local} is too large: {spool.tell()} bytes or more as an archive, "
            f"and max_bytes is {cap}; nothing was sent"
        )
    return TransferSummary(files=files, directories=dirs, bytes=size, links=links)


def _walk(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """Every entry below ``root``, parents first, as (host path, name in the archive, lstat).

    Links are not followed: one whose target, read as a path from where it
    lies, stays inside the tree goes as a link; any other is refused, as are
    FIFOs, sockets and devices.
    """
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as listing:
            found = sorted(listing, key=lambda e: e.name)
        for entry in found:
            arcname = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.path)
                inside = posixpath.normpath(posixpath.join(posixpath.dirname(arcname), target))
                if target.startswith("/") or inside == ".." or inside.startswith("../"):
                    raise TransferError(
                        f"{entry.path} is a link to {target}, outside the uploaded tree: links are not followed"
                    )
            elif stat.S_ISDIR(st.st_mode):
                stack.append((arcname + "/", entry.path))
            elif not stat.S_ISREG(st.st_mode):
                raise TransferError(f"{entry.path} is not a regular file, directory or link: it cannot be uploaded")
            yield entry.path, arcname, st


# ---- download -------------------------------------------------------------------------


def download(
    sandbox: Transferable,
    remote_path: str,
    local_dir: str | os.PathLike[str],
    *,
    max_bytes: int | None = None,
    max_files: int | None = None,
    overwrite: bool = False,
    executable: bool = False,
) -> TransferSummary:
    """Copy ``remote_path`` from the sandbox into ``local_dir`` on the host (made if missing):
    a directory's contents, or a file by its name. Only regular files and directories are
    written (a link, device or FIFO in the archive is refused: ``UnsafeArchiveError``); the
    archive is capped at ``max_bytes`` (default 256 MiB) and ``max_files`` members (100,000).

    What the sandbox sends is the untrusted code's: a file that already exists under
    ``local_dir`` is refused unless ``overwrite`` (a planted ``.git/hooks/...`` or ``.envrc``
    would run later on the host), and files are written without execute bits unless
    ``executable``."""
    cap = _cap(max_bytes)
    members = _cap(max_files, DEFAULT_MAX_FILES, "max_files")
    src = _remote(remote_path, "remote_path")
    normal = posixpath.normpath(src)
    parent, name = posixpath.split(normal)
    base = f"/tmp/.stockade-download-{secrets.token_hex(8)}"
    with tempfile.TemporaryFile() as archive:
        try:
            size, piece = _pack_remote(sandbox, src, parent or ".", name, base, cap)
            _fetch(sandbox, base, size, piece, archive)
        finally:
            _remove(sandbox, base)
        archive.seek(0)
        return _unpack(archive, os.fspath(local_dir), cap, members, src, overwrite, executable)


def _pack_remote(sandbox: Transferable, src: str, parent: str, name: str, base: str, cap: int) -> tuple[int, int]:
    """Have the isolate's tar pack ``src`` into pieces; the archive's size and the pieces'."""
    argv = ["sh", "-c", _PACK, "sh", src, parent, name, base, str(cap), str(MAX_FILE_PIECE)]
    result = sandbox.exec(argv)
    if result.exit_code == _NOT_FOUND:
        error = PathNotFoundError(f"{src}: no such file or directory in the sandbox")
        error.filename = src
        raise error
    fields = result.stdout.split()
    if not result.success or len(fields) != 3 or not all(f.isdigit() for f in fields):
        raise TransferError(f"packing {src} in the sandbox failed: {_why(result)}")
    status, size, piece = (int(f) for f in fields)
    if not 512 <= piece <= MAX_FILE_PIECE:
        raise TransferError(f"packing {src} in the sandbox failed: it cut pieces of {piece} bytes")
    if size > cap:
        raise TransferTooLargeError(
            f"download of {src} is too large: over {cap} bytes as an archive (max_bytes); nothing was written"
        )
    if status not in (0, 1) or size == 0:  # GNU tar's 1: a file changed as it was read, the archive stands
        raise TransferError(f"packing {src} in the sandbox failed: tar exited {status}: {_why(result)}")
    return size, piece


def _fetch(sandbox: Transferable, base: str, size: int, piece_size: int, archive: IO[bytes]) -> None:
    """Read the pieces into ``archive``: each exactly as long as the packing step said."""
    for index in range(-(-size // piece_size)):
        want = min(piece_size, size - index * piece_size)
        piece = _read(sandbox, f"{base}.{index:06d}", want + 1)
        if len(piece) != want:
            raise TransferError(
                f"a piece of the archive changed in the sandbox while it was read ({len(piece)} bytes, not {want})"
            )
        archive.write(piece)


def _read(sandbox: Transferable, path: str, limit: int) -> bytes:
    """``read_file`` of at most ``limit`` bytes: the isolate may have grown the piece since."""
    return sandbox.read_file(path, limit)


_Plan = tuple[tuple[str, ...], tarfile.TarInfo | None]  # path components; the member, None for a directory


def _unpack(
    archive: IO[bytes], local_dir: str, cap: int, max_files: int, src: str, overwrite: bool, executable: bool
) -> TransferSummary:
    """Check every member of the untrusted ``archive``, then write them below ``local_dir``."""
    try:
        tar = tarfile.open(fileobj=archive, mode="r:")  # a plain tar: no decompression
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"the archive of {src} from the sandbox is not a tar: {exc}") from None
    with tar:
        plans = _check(tar, cap, max_files, src)
        if not overwrite:
            there = [p for p, m in plans if m is not None and os.path.lexists(os.path.join(local_dir, *p))]
            if there:
                first = os.path.join(local_dir, *there[0])
                raise TransferError(
                    f"download of {src}: {first} exists ({len(there)} file(s) would be replaced): "
                    "pass overwrite=True to replace them; nothing was written"
                )
        os.makedirs(local_dir, exist_ok=True)
        root = os.open(local_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        files = dirs = size = 0
        held: tuple[tuple[str, ...], int] | None = None  # the last parent directory, kept open
        try:
            for parts, member in plans:
                where = parts if member is None else parts[:-1]
                if held is None or held[0] != where:
                    fd = _directory(root, where, parts)
                    if held is not None:
                        os.close(held[1])
                    held = (where, fd)
                if member is None:
                    dirs += 1 if parts else 0
                else:
                    _write(tar, held[1], parts, member, executable)
                    files += 1
                    size += member.size
        finally:
            if held is not None:
                os.close(held[1])
            os.close(root)
    return TransferSummary(files=files, directories=dirs, bytes=size)


def _check(tar: tarfile.TarFile, cap: int, max_files: int, src: str) -> list[_Plan]:
    """Every member, checked before a byte is written: regular files and directories only,
    names inside, sizes and counts under the caps."""
    plans: list[_Plan] = []
    total = 0
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as exc:
            raise UnsafeArchiveError(f"the archive of {src} from the sandbox is malformed: {exc}") from None
        if member is None:
            return plans
        if len(plans) >= max_files:
            raise TransferTooLargeError(
                f"download of {src} has over {max_files} members (max_files); nothing was written"
            )
        parts = _parts(member.name)
        if member.isdir():
            plans.append((parts, None))
            continue
        if not member.isreg() or member.issparse() or not parts:
            raise UnsafeArchiveError(
                f"the archive of {src} holds {member.name!r}, {_kind(member)}: a download writes regular files "
                "and directories only; nothing was written"
            )
        if member.size < 0:  # base-256 sizes can be negative: one would offset the cap
            raise UnsafeArchiveError(f"the archive's {member.name!r} declares a negative size; nothing was written")
        total += member.size
        if total > cap:
            raise TransferTooLargeError(
                f"download of {src} is too large: its files declare over {cap} bytes (max_bytes); nothing was written"
            )
        plans.append((parts, member))


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


def _directory(root: int, parts: tuple[str, ...], wanted: tuple[str, ...]) -> int:
    """An open descriptor of ``parts`` below ``root``, each made if missing and none a link."""
    fd = os.dup(root)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                raise TransferError(
                    f"cannot write {'/'.join(wanted)}: {'/'.join(parts)} is not a directory here "
                    f"(links are not followed): {exc.strerror}"
                ) from None
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(
    tar: tarfile.TarFile, parent: int, parts: tuple[str, ...], member: tarfile.TarInfo, executable: bool
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
            raise TransferError(f"cannot write {'/'.join(parts)}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise


# ---- shared ---------------------------------------------------------------------------


def _cap(value: int | None, default: int = DEFAULT_MAX_BYTES, name: str = "max_bytes") -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    return value


def _remote(path: str, name: str) -> str:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError(f"{name} must be a non-empty path without NUL")
    return path


def _remove(sandbox: Transferable, base: str) -> None:
    """Remove the pieces (best effort: a sandbox that is gone keeps nothing anyway)."""
    with contextlib.suppress(StockadeError, OSError):
        sandbox.exec(["sh", "-c", _REMOVE, "sh", base])


def _why(result: ExecResult) -> str:
    said = (result.stderr or result.error or "").strip()
    if len(said) > 2000:
        said = "..." + said[-2000:]
    return said or result.summary()


# ---- async ----------------------------------------------------------------------------


class _Blocking:
    """An async sandbox's calls, made from a worker thread on the event loop that owns it."""

    def __init__(self, sandbox: AsyncTransferable, loop: asyncio.AbstractEventLoop) -> None:
        self._sandbox = sandbox
        self._loop = loop
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def _wait(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._cancelled.is_set():
            raise TransferError("the transfer was cancelled")

        async def run() -> T:
            return await call()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def write_file(self, path: str, data: bytes, mode: int, /) -> None:
        self._wait(lambda: self._sandbox.write_file(path, data, mode))

    def read_file(self, path: str, max_bytes: int | None = None, /) -> bytes:
        return self._wait(lambda: self._sandbox.read_file(path, max_bytes))

    def exec(self, argv: list[str], /) -> ExecResult:
        return self._wait(lambda: self._sandbox.exec(argv))


async def _in_thread(sandbox: AsyncTransferable, work: Any, *args: Any, **kwargs: Any) -> TransferSummary:
    bridge = _Blocking(sandbox, asyncio.get_running_loop())
    try:
        summary: TransferSummary = await asyncio.to_thread(work, bridge, *args, **kwargs)
    except asyncio.CancelledError:
        bridge.cancel()  # the thread stops at its next call into the sandbox
        raise
    return summary


async def aupload(
    sandbox: AsyncTransferable, local_path: str | os.PathLike[str], remote_dir: str, *, max_bytes: int | None = None
) -> TransferSummary:
    """``upload`` for an async sandbox (``AsyncRemoteSandbox``): the host's work in a thread."""
    return await _in_thread(sandbox, upload, local_path, remote_dir, max_bytes=max_bytes)


async def adownload(
    sandbox: AsyncTransferable,
    remote_path: str,
    local_dir: str | os.PathLike[str],
    *,
    max_bytes: int | None = None,
    max_files: int | None = None,
    overwrite: bool = False,
    executable: bool = False,
) -> TransferSummary:
    """``download`` for an async sandbox (``AsyncRemoteSandbox``): the host's work in a thread."""
    return await _in_thread(
        sandbox, download, remote_path, local_dir, max_bytes=max_bytes, max_files=max_files,
        overwrite=overwrite, executable=executable,
    )  # fmt: skip
