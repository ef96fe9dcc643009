"""The file calls of ``AgentSandbox``: write, read (in pieces, bounded) and list, over the agent channel."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from ..agent import wire
from ..errors import AgentError, AgentProtocolError, InvalidRequestError, SandboxError, sandbox_os_error
from ..limits import check_call_size
from .blocking import run_blocking
from .verdict import b64_field

MAX_WHOLE_READ = 4 << 30  # read_file without max_bytes: the largest scratch an isolate can have (disk_mb)


class AgentFiles:
    """Files inside the isolate, as the agent reads and writes them (regular files only)."""

    if TYPE_CHECKING:  # given by AgentSandbox

        async def _agent_call(self, method: str, params: dict[str, Any], timeout: float) -> Any: ...
        def _redacted(self, data: bytes) -> bytes: ...
        def _broke_protocol(self, what: str) -> AgentProtocolError: ...

    async def awrite_file(self, path: str, data: bytes | str, mode: int = 0o644, append: bool = False) -> None:
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise TypeError(f"mode must be a permission as an int (such as 0o644), not {mode!r}")
        if not 0 <= mode <= 0o7777:
            raise InvalidRequestError(f"mode {mode:#o} is no file permission: one is 0 to 0o7777 (such as 0o644)")
        if mode & 0o6000:
            raise InvalidRequestError(f"mode {mode:#o}: no file in a sandbox may be set-user-ID or set-group-ID")
        raw = data.encode() if isinstance(data, str) else data
        check_call_size("write_file data", raw)
        params: dict[str, Any] = {"path": path, "data": base64.b64encode(raw).decode(), "mode": mode}
        if append:
            params["append"] = True
        await self._file_call("write_file", params)

    async def aread_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes: all of them, or the first ``max_bytes``.

        A file larger than one protocol frame comes in pieces. It is read up to
        the size it had when the first piece was read, so code that keeps the
        file growing cannot keep the host reading.
        """
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
            raise ValueError("max_bytes must be a non-negative integer")
        got = bytearray()
        size: int | None = None
        while True:
            piece = wire.MAX_FILE_PIECE if max_bytes is None else min(wire.MAX_FILE_PIECE, max_bytes - len(got))
            data, more, now_size = await self._read_piece(path, len(got), piece)
            got += data
            size = now_size if size is None else size
            if not more or not data or (max_bytes is not None and len(got) >= max_bytes) or len(got) >= size:
                return self._redacted(bytes(got))
            if max_bytes is None and len(got) >= MAX_WHOLE_READ:
                # The size is the agent's word: an untrusted agent could say any. A whole read stops here.
                raise SandboxError(f"{path} is larger than {MAX_WHOLE_READ} bytes: read it with max_bytes, in parts")

    async def alist_dir(self, path: str) -> list[dict[str, Any]]:
        reply = await self._file_call("list_dir", {"path": path})
        entries = reply.get("entries") if isinstance(reply, dict) else None
        if not isinstance(entries, list) or not all(map(_entry, entries)):
            raise self._broke_protocol("list_dir reply has no entries, or one that is not {name, type, size}")
        return entries

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644, append: bool = False) -> None:
        run_blocking(self.awrite_file(path, data, mode, append))

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return run_blocking(self.aread_file(path, max_bytes))

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        return run_blocking(self.alist_dir(path))

    async def _file_call(self, method: str, params: dict[str, Any]) -> Any:
        """A file call to the agent; a path that does not exist there is ``PathNotFoundError``.

        The agent reports an OS error's errno as data. It is untrusted: a false
        ENOENT only changes which error the caller gets, never what happens.
        """
        path = params.get("path")
        if isinstance(path, str) and "\0" in path:
            raise InvalidRequestError(f"path holds a NUL byte, which no path can: {path[:64]!r}")
        try:
            return await self._agent_call(method, params, 30.0)
        except AgentError as exc:
            mapped = sandbox_os_error(exc)  # FileNotFoundError, IsADirectoryError, ... as the agent's errno says
            if mapped is exc:
                raise
            raise mapped from None

    async def _read_piece(self, path: str, offset: int, max_bytes: int) -> tuple[bytes, bool, int]:
        reply = await self._file_call("read_file", {"path": path, "offset": offset, "max_bytes": max_bytes})
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, str):
            raise self._broke_protocol("read_file reply has no data")
        try:
            piece = b64_field(data)
        except AgentProtocolError as exc:
            raise self._broke_protocol(str(exc)) from None
        if len(piece) > max_bytes:
            raise self._broke_protocol(f"read_file sent {len(piece)} bytes where at most {max_bytes} were asked for")
        size = reply.get("size")
        return piece, reply.get("truncated") is True, size if isinstance(size, int) and size >= 0 else 0


_KINDS = ("file", "dir", "symlink", "other")


def _entry(said: Any) -> bool:
    """Whether one entry of the agent's listing is one (it comes from inside the isolate)."""
    return (
        isinstance(said, dict)
        and set(said) == {"name", "type", "size"}
        and isinstance(said["name"], str)
        and said["type"] in _KINDS
        and isinstance(said["size"], int)
        and not isinstance(said["size"], bool)
    )
