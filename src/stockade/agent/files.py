"""The agent's file calls: ``write_file``, ``read_file`` (in pieces) and ``list_dir``.

Stdlib-only, as the whole agent. The code beside the agent may have put
anything where the host expects a file: only regular files are opened, without
blocking, and a directory's entries removed while it is read are left out.
"""

from __future__ import annotations

import errno
import os
import stat

from . import wire

TYPE_CHECKING = False  # typing is not imported in the guest (its import costs time under gVisor)
if TYPE_CHECKING:
    from typing import Any


def write_file(params: dict[str, Any]) -> dict[str, Any]:
    path = str_param(params, "path")
    data = b64_param(params, "data")
    mode = params.get("mode", 0o644)
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise wire.RPCError(wire.INVALID_PARAMS, "mode must be an integer permission")
    if mode & 0o6000:  # refused here, not by the seccomp filter: the caller's mistake is no violation of the code's
        raise wire.RPCError(
            wire.INVALID_PARAMS, f"mode {mode:#o}: no file in a sandbox may be set-user-ID or set-group-ID"
        )
    append = params.get("append", False) is True  # at the end of what is there, instead of over it
    parent = os.path.dirname(path)
    if parent:
        # As E2B's files.write does: a file is written where it is asked for, its directories made
        # first (0o755 less the umask), with no more right than the code beside this agent has.
        try:
            os.makedirs(parent, 0o755, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            pass  # a file where a directory would be: the open below says ENOTDIR, naming the path asked for
    fd = open_regular(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), mode)
    try:
        wire.write_all(fd, data)
    finally:
        os.close(fd)
    return {"path": path, "size": len(data)}


def read_file(params: dict[str, Any]) -> dict[str, Any]:
    path = str_param(params, "path")
    limit = params.get("max_bytes", wire.MAX_FILE_PIECE)
    if not isinstance(limit, int) or limit < 0:
        raise wire.RPCError(wire.INVALID_PARAMS, "max_bytes must be a non-negative integer")
    offset = params.get("offset", 0)
    if not isinstance(offset, int) or offset < 0:
        raise wire.RPCError(wire.INVALID_PARAMS, "offset must be a non-negative integer")
    limit = min(limit, wire.MAX_FILE_PIECE)  # keep the reply under the frame cap
    with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        data = f.read(limit + 1)
    return {
        "path": path,
        "data": wire.b64encode(data[:limit]),
        "truncated": len(data) > limit,  # more follows this piece
        "size": size,
    }


def list_dir(params: dict[str, Any]) -> dict[str, Any]:
    path = str_param(params, "path")
    entries: list[dict[str, Any]] = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the directory was read (code runs beside this call)
            entries.append({"name": entry.name, "type": _kind(st.st_mode), "size": st.st_size})
    entries.sort(key=lambda e: str(e["name"]))
    return {"path": path, "entries": entries}


def _kind(mode: int) -> str:
    """What ``list_dir`` calls an entry: a FIFO or a socket is no "file" that read_file would read."""
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "other"  # a FIFO, a socket, a device


def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """Open ``path`` for a file call, refusing anything but a regular file.

    The code in the isolate may have put a FIFO or a device where the host
    expects a file: a plain open would then block this (single-threaded) agent
    until the host gives up on it. O_NONBLOCK makes such an open return at
    once; a regular file ignores the flag.
    """
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        # A directory is EISDIR, as open() says; a FIFO or device EINVAL (no errno names them; a socket
        # fails to open at all, ENXIO):
        # either way the caller gets an OSError, as for every file call's failure.
        data = {"errno": errno.EISDIR if stat.S_ISDIR(kind) else errno.EINVAL}
        raise wire.RPCError(wire.INVALID_PARAMS, f"{path} is not a regular file", data)
    return fd


def str_param(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise wire.RPCError(wire.INVALID_PARAMS, f"{name} must be a non-empty string")
    return value


def b64_param(params: dict[str, Any], name: str) -> bytes:
    value = params.get(name, "")
    if not isinstance(value, str):
        raise wire.RPCError(wire.INVALID_PARAMS, f"{name} must be a base64 string")
    try:
        return wire.b64decode(value)
    except ValueError:
        raise wire.RPCError(wire.INVALID_PARAMS, f"{name} is not valid base64") from None
