"""Directory upload and download: a tar stream carried by a sandbox's own file calls.

``upload`` packs a host file or directory into a tar on the host, writes it
into the isolate in pieces of at most one call's data (``write_file``, 7 MiB)
and unpacks it there with the isolate's ``tar``. ``download`` has the isolate's
``tar`` pack a path into pieces under ``/tmp``, reads them back (``read_file``),
each seam between two held to both (a read redacts a secret's value alone),
and unpacks them on the host. Only ``write_file``, ``read_file`` and ``exec``
are used, so the same code serves the SDK's ``Sandbox``, the daemon's
``RemoteSandbox`` and every runtime (docs/sdk.md, "Directories").

The host path may lie where a sandbox writes: it is opened by
``transfer_paths.py`` (a link followed only when root owns it)
and walked through directory descriptors (``transfer_pack.py``). What comes
out of an isolate is hostile: ``transfer_unpack.py`` checks the whole archive
before it writes a byte, and writes only regular files and directories, never
through a link.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import secrets
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeVar

from .agent.wire import MAX_FILE_PIECE
from .broker.store import MAX_VALUE_BYTES
from .errors import (
    PathNotFoundError,
    StockadeError,
    TransferError,
    TransferTooLargeError,
    UnsafeArchiveError,
    printable,
)
from .limits import MAX_CALL_BYTES
from .result import ExecResult
from .transfer_pack import pack
from .transfer_scripts import (
    A_LINK,
    NO_ROOM,
    NOT_FOUND,
    OVER_MAX,
    PACK,
    REMOVE,
    ROOM,
    STAGING_RESERVE,
    UNPACK,
)
from .transfer_unpack import LINKS, Links, unpack

DEFAULT_MAX_BYTES = 256 << 20  # the archive, either way
DEFAULT_MAX_FILES = 100_000  # members of a downloaded archive
_MIN_PIECE = 64 << 10  # an upload's pieces shrink to this for a small max_file_size_bytes, no further
# A download's seams: each piece is read, and redacted, alone; a secret's value written across two
# pieces is in the seam between them, whole while it is no longer than this (its longest written
# form: each character escaped as "&quot;" is, six bytes), or than half a piece.
SEAM_BYTES = 6 * MAX_VALUE_BYTES

T = TypeVar("T")


@dataclass(frozen=True)
class TransferSummary:
    """What a transfer carried: regular files, directories, links (uploads only) and the files' bytes;
    ``skipped``: the symbolic links a download left out (``links="skip"``)."""

    files: int
    directories: int
    bytes: int
    links: int = 0
    skipped: int = 0


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
        packed = pack(os.fspath(local_path), spool, cap)
        summary = TransferSummary(
            files=packed.files, directories=packed.directories, bytes=packed.bytes, links=packed.links
        )
        size = spool.tell()
        spool.seek(0)
        _check_room(sandbox, local_path, dest, size)
        base = f"/tmp/.stockade-upload-{secrets.token_hex(8)}"
        unpacked = False
        try:
            _send(sandbox, spool, base)
            result = sandbox.exec(["sh", "-c", UNPACK, "sh", base, dest])
            unpacked = result.success  # the script removed the parts
        finally:
            if not unpacked:
                _remove(sandbox, base)
    if not unpacked:
        why = _why(result)
        if "No space left" in why or "Wrote only" in why:
            why += " (the sandbox's scratch space is full: disk_mb)"
        raise TransferError(f"unpacking the upload into {dest} in the sandbox failed: {why}")
    return summary


def _check_room(sandbox: Transferable, local_path: str | os.PathLike[str], dest: str, size: int) -> None:
    """Refuse an upload the sandbox has no room for, before a byte is sent: it is staged in /tmp
    and unpacked beside it, and the scratch is the sandbox's memory (filling it past its memory
    limit would end the sandbox)."""
    memory = _memory_limit(sandbox)
    check = sandbox.exec(["sh", "-c", ROOM, "sh", dest, str(size), str(memory), str(STAGING_RESERVE)])
    said = _numbers(check, 3)
    if check.exit_code == NO_ROOM and said is not None:
        free, need, used = said
        raise TransferError(
            f"upload of {os.fspath(local_path)} into {dest}: it needs {need} bytes of the sandbox's scratch "
            f"space (its archive in /tmp, and what it unpacks to there), which has {free} bytes free, {used} "
            f"used ({_limits_named(memory)}; the scratch is its memory): it does not fit; nothing was sent"
        )
    if not check.success:
        raise TransferError(f"checking the sandbox's room for the upload failed: {_why(check)}")


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
    links: Links = "refuse",
    vcs: bool = False,
) -> TransferSummary:
    """Copy ``remote_path`` from the sandbox into ``local_dir`` on the host (made if missing):
    a directory's contents, or a file by its name. Only regular files and directories are
    written: a hard link as a copy of its file; a symbolic link, device or FIFO in the archive
    is refused (``UnsafeArchiveError``), symbolic links left out instead with ``links="skip"``
    (counted in ``skipped``). The archive is capped at ``max_bytes`` (default 256 MiB) and
    ``max_files`` files and directories (100,000).

    What the sandbox sends is the untrusted code's: a file that already exists under
    ``local_dir`` is refused unless ``overwrite`` (a planted ``.git/hooks/...`` or ``.envrc``
    would run later on the host), so is a ``.git`` or ``.hg`` directory unless ``vcs`` (its
    configuration names commands git or hg run there unasked), and files are written without
    execute bits unless ``executable``."""
    cap = _cap(max_bytes)
    members = _cap(max_files, DEFAULT_MAX_FILES, "max_files")
    src = _remote(remote_path, "remote_path")
    if links not in LINKS:
        raise ValueError(f"links must be one of {', '.join(map(repr, LINKS))}, not {links!r}")
    normal = posixpath.normpath(src)  # "/work/dl/" is the link "/work/dl" too
    parent, name = posixpath.split(normal)
    base = f"/tmp/.stockade-download-{secrets.token_hex(8)}"
    with tempfile.TemporaryFile() as archive:
        try:
            size, piece, seam = _pack_remote(sandbox, normal, parent or ".", name, base, cap, _memory_limit(sandbox))
            _fetch(sandbox, base, size, piece, seam, archive)
        finally:
            _remove(sandbox, base)
        archive.seek(0)
        stop = getattr(sandbox, "stop_if_cancelled", None)  # an async download's: a cancel ends the writing
        files, directories, size, skipped = unpack(
            archive, os.fspath(local_dir), cap, members, src, overwrite, executable, links, vcs, stop
        )
        return TransferSummary(files=files, directories=directories, bytes=size, skipped=skipped)


def _memory_limit(sandbox: Any) -> int:
    """The sandbox's memory limit in bytes, when its handle knows it (a policy, the daemon's
    answer); 0: unknown, and only the free scratch space is checked."""
    mb = getattr(sandbox, "memory_mb", None)
    if mb is None:
        mb = getattr(getattr(sandbox, "policy", None), "memory_mb", None)
    return mb << 20 if isinstance(mb, int) and not isinstance(mb, bool) else 0


def _least_piece(sandbox: Any) -> int:
    """The smallest piece the isolate may cut a download into: its files' size limit in whole
    512-byte blocks, at most _MIN_PIECE, where the handle knows its policy (512 where it does not).
    The isolate says what it cut: pieces of 512 bytes would make a GiB two million reads."""
    limit = getattr(getattr(sandbox, "policy", None), "max_file_size_bytes", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return 512
    return max(512, min(_MIN_PIECE, limit // 512 * 512))


def _pack_remote(
    sandbox: Transferable, src: str, parent: str, name: str, base: str, cap: int, memory: int
) -> tuple[int, int, int]:
    """Have the isolate's tar pack ``src`` into pieces; the archive's size, the pieces' and the seams'."""
    limits = [str(cap), str(MAX_FILE_PIECE), str(memory), str(STAGING_RESERVE), str(SEAM_BYTES)]
    result = sandbox.exec(["sh", "-c", PACK, "sh", src, parent, name, base, *limits])
    if result.exit_code == NOT_FOUND:
        error = PathNotFoundError(f"{src}: no such file or directory in the sandbox")
        error.filename = src
        raise error
    if result.exit_code == A_LINK:
        target = result.stdout.rstrip("\n")[:4096]
        raise UnsafeArchiveError(
            f"{src} is a symbolic link (to {target!r}) in the sandbox: a download does not follow it; "
            "download its target instead"
        )
    if result.exit_code == OVER_MAX:
        raise TransferTooLargeError(
            f"download of {src} is too large: over {cap} bytes as an archive (max_bytes); nothing was packed"
        )
    said = _numbers(result, 3)
    if result.exit_code == NO_ROOM and said is not None:
        size, free, used = said
        raise TransferError(
            f"download of {src}: its archive ({size} bytes) is staged in the sandbox's scratch space "
            f"(/tmp: {free} bytes free, {used} used; {_limits_named(memory)}), which is its memory, and it "
            "does not fit: staging it would end the sandbox. Download a part of it, or give the sandbox more "
            "memory_mb and disk_mb; nothing was packed"
        )
    answer = _numbers(result, 4)
    if not result.success or answer is None:
        raise TransferError(f"packing {src} in the sandbox failed: {_why(result)}")
    status, size, piece, seam = answer
    if not _least_piece(sandbox) <= piece <= MAX_FILE_PIECE or seam != min(SEAM_BYTES, piece // 2):
        raise TransferError(f"packing {src} in the sandbox failed: it cut pieces of {piece} bytes, seams of {seam}")
    if size > cap:
        raise TransferTooLargeError(
            f"download of {src} is too large: over {cap} bytes as an archive (max_bytes); nothing was written"
        )
    # GNU tar's 1, "some files differ": a file or directory changed as it was read (the bytes are the
    # file's, as tar read them: taken), or a file shrank and tar padded it with zeros (not its bytes).
    if status == 1 and "shrank" in (result.stderr or ""):
        raise TransferError(
            f"download of {src}: a file shrank in the sandbox while it was packed, and tar padded its copy with "
            f"zeros ({_why(result)}); nothing was written: download it again once nothing writes it"
        )
    if status not in (0, 1) or size == 0:
        raise TransferError(f"packing {src} in the sandbox failed: tar exited {status}: {_why(result)}")
    return size, piece, seam


def _fetch(sandbox: Transferable, base: str, size: int, piece_size: int, seam: int, archive: IO[bytes]) -> None:
    """Read the pieces into ``archive``: each exactly as long as the packing step said, and each
    seam the two pieces' ends it joins, as read (a read that took a secret's value out is shorter,
    or no longer matches: one written across two pieces is whole in their seam)."""
    tail = b""
    for index in range(-(-size // piece_size)):
        want = min(piece_size, size - index * piece_size)
        piece = _read(sandbox, f"{base}.{index:06d}", want + 1)
        if len(piece) != want:
            raise TransferError(
                f"a piece of the archive changed in the sandbox while it was read ({len(piece)} bytes, not {want}), "
                "or held a secret's value, which a download does not bring out; nothing was written"
            )
        if index:
            joined = tail + piece[:seam]
            if _read(sandbox, f"{base}.s{index - 1:06d}", len(joined) + 1) != joined:
                raise TransferError(
                    "two pieces of the archive do not meet as they were read: one changed in the sandbox while "
                    "it was read, or a secret's value is written across them, which a download does not bring "
                    "out; nothing was written"
                )
        tail = piece[-seam:]
        archive.write(piece)


def _read(sandbox: Transferable, path: str, limit: int) -> bytes:
    """``read_file`` of at most ``limit`` bytes: the isolate may have grown the piece since."""
    return sandbox.read_file(path, limit)


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
        sandbox.exec(["sh", "-c", REMOVE, "sh", base])


def _numbers(result: ExecResult, count: int) -> tuple[int, ...] | None:
    """The ``count`` numbers a transfer script answers with, or None when its answer is not that."""
    fields = result.stdout.split()
    # ASCII digits, a count's length at most: str.isdigit takes "²", int() then refuses it (and a
    # sandbox writes the file one of these numbers is read from).
    if len(fields) != count or not all(f.isascii() and f.isdigit() and len(f) <= 20 for f in fields):
        return None
    return tuple(map(int, fields))


def _limits_named(memory: int) -> str:
    """The policy fields a room check was held to: ``disk_mb``, and ``memory_mb`` when known."""
    return f"disk_mb, memory_mb={memory >> 20}" if memory else "disk_mb"


def _why(result: ExecResult) -> str:
    """What a failed transfer step said: the sandbox's words, so no terminal control in them."""
    said = (result.stderr or result.error or "").strip()
    if len(said) > 2000:
        said = "..." + said[-2000:]
    return printable(said) or result.summary()


# ---- async ----------------------------------------------------------------------------


class _Blocking:
    """An async sandbox's calls, made from a worker thread on the event loop that owns it."""

    def __init__(self, sandbox: AsyncTransferable, loop: asyncio.AbstractEventLoop) -> None:
        self._sandbox = sandbox
        self._loop = loop
        self._cancelled = threading.Event()
        self.memory_mb = _memory_limit(sandbox) >> 20 or None
        self.policy = getattr(sandbox, "policy", None)  # its file size limit: the least piece (_least_piece)

    def cancel(self) -> None:
        self._cancelled.set()

    def stop_if_cancelled(self) -> None:
        """Raise once the transfer is cancelled: between the host's writes, which make no call."""
        if self._cancelled.is_set():
            raise TransferError("the transfer was cancelled")

    def _wait(self, call: Callable[[], Awaitable[T]], cleanup: bool = False) -> T:
        if not cleanup:  # the pieces' removal runs after a cancel too: it is what a cancel leaves
            self.stop_if_cancelled()

        async def run() -> T:
            return await call()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def write_file(self, path: str, data: bytes, mode: int, /) -> None:
        self._wait(lambda: self._sandbox.write_file(path, data, mode))

    def read_file(self, path: str, max_bytes: int | None = None, /) -> bytes:
        return self._wait(lambda: self._sandbox.read_file(path, max_bytes))

    def exec(self, argv: list[str], /) -> ExecResult:
        return self._wait(lambda: self._sandbox.exec(argv), cleanup=argv[:3] == ["sh", "-c", REMOVE])


async def _in_thread(sandbox: AsyncTransferable, work: Any, *args: Any, **kwargs: Any) -> TransferSummary:
    bridge = _Blocking(sandbox, asyncio.get_running_loop())
    worker = asyncio.ensure_future(asyncio.to_thread(work, bridge, *args, **kwargs))
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        # The thread stops at its next call into the sandbox, or the next file it writes; the
        # cancel is answered once it has, and removed the pieces: nothing lands after it.
        bridge.cancel()
        while not worker.done():
            try:
                await asyncio.shield(worker)
            except asyncio.CancelledError:
                continue  # cancelled again: the thread still has to stop
            except Exception:  # noqa: BLE001 - its own end (the cancel, raised in it): the caller's is raised
                break
        raise


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
    links: Links = "refuse",
    vcs: bool = False,
) -> TransferSummary:
    """``download`` for an async sandbox (``AsyncRemoteSandbox``): the host's work in a thread."""
    return await _in_thread(
        sandbox, download, remote_path, local_dir, max_bytes=max_bytes, max_files=max_files,
        overwrite=overwrite, executable=executable, links=links, vcs=vcs,
    )  # fmt: skip
