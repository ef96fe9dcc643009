"""``RemoteSandbox`` and ``RemoteInterpreter``: a sandbox the daemon holds, through a ``Client``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Unpack

from ..errors import NotFoundError
from ..result import ExecResult
from ..runtimes.spawned import Process
from .processes import DaemonProcessCalls, spawn_params
from .requests import CodeOptions, ExecOptions, SandboxHandle

if TYPE_CHECKING:
    from ..transfer import TransferSummary
    from ..transfer_unpack import Links
    from ..watch import FileWatch
    from .sync_client import Client


class RemoteSandbox(SandboxHandle):
    """A sandbox the daemon holds, by its id, with the SDK ``Sandbox``'s methods.

    ``close`` is idempotent, and closing a sandbox the daemon already closed
    (its idle timeout, its connection's end, a restart) is not an error.
    """

    def __init__(self, client: Client, sandbox_id: str, memory_mb: int | None = None, **said: Any) -> None:
        super().__init__(sandbox_id, memory_mb, **said)  # said: runtime, policy_digest
        self.client = client

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(self, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        return self.client.sandbox_exec(self.sandbox_id, command, **options)

    def run_code(self, code: str, language: str = "python", **options: Unpack[CodeOptions]) -> ExecResult:
        return self.client.sandbox_run_code(self.sandbox_id, code, language, **options)

    def interpreter(self, name: str = "default") -> RemoteInterpreter:
        """The stateful Python interpreter ``name`` in this sandbox (the SDK's ``Sandbox.interpreter``)."""
        return RemoteInterpreter(self, name)

    def interrupt(self, *, session: str | None = None) -> bool:
        """From another thread: interrupt this sandbox's run in progress (``session``: only a cell
        of that interpreter)."""
        return self.client.interrupt_sandbox(self.sandbox_id, session)

    def publish(self, spec: int | str) -> tuple[str, int]:
        """``Sandbox.publish`` through the daemon: a loopback port of the daemon's host (this host's:
        the socket is local) forwarded to ``spec``'s port inside; the host address and port."""
        return self._note_published(self.client.call(*self.client._publish(self.sandbox_id, spec)))

    def spawn(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """Start ``argv`` in the background (the SDK's ``Sandbox.spawn``): a ``Process``."""
        info = self.client.call("sandbox.spawn", spawn_params(self.sandbox_id, argv, stdin, env, cwd))
        return Process(DaemonProcessCalls(self.client, self.sandbox_id), info["handle"], info["pid"], info["argv"])

    def processes(self) -> list[dict[str, Any]]:
        """Its background processes: ``{handle, pid, argv, running, exit_code}``."""
        listed: list[dict[str, Any]] = self.client.call("sandbox.processes", {"sandbox_id": self.sandbox_id})[
            "processes"
        ]
        return listed

    def watch(self, path: str, *, recursive: bool = False, events: Iterable[str] | None = None) -> FileWatch:
        """``Sandbox.watch`` through the daemon: file events under ``path``, a ``FileWatch``."""
        from ..watch import FileWatch

        return FileWatch.start(lambda argv, source: self.spawn(argv, stdin=source), path, recursive, events)

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        self.client.sandbox_write_file(self.sandbox_id, path, data, mode)

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return self.client.sandbox_read_file(self.sandbox_id, path, max_bytes)

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        return self.client.sandbox_list_dir(self.sandbox_id, path)

    def upload(
        self, local_path: str | os.PathLike[str], remote_dir: str, *, max_bytes: int | None = None
    ) -> TransferSummary:
        """The SDK's ``Sandbox.upload``, through the daemon's file and exec calls."""
        from ..transfer import upload

        return upload(self, local_path, remote_dir, max_bytes=max_bytes)

    def download(
        self,
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
        """The SDK's ``Sandbox.download``, through the daemon's file and exec calls."""
        from ..transfer import download

        return download(
            self,
            remote_path,
            local_dir,
            max_bytes=max_bytes,
            max_files=max_files,
            overwrite=overwrite,
            executable=executable,
            links=links,
            vcs=vcs,
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(NotFoundError):
            self.client.close_sandbox(self.sandbox_id)


class RemoteInterpreter:
    """A stateful interpreter in a daemon's held sandbox: the SDK ``Interpreter``'s methods."""

    def __init__(self, sandbox: RemoteSandbox, name: str) -> None:
        self.sandbox = sandbox
        self.name = name

    def __repr__(self) -> str:
        return f"RemoteInterpreter({self.name!r}, {self.sandbox.sandbox_id!r})"

    def run(
        self,
        code: str,
        *,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> ExecResult:
        return self.sandbox.run_code(code, env=env, timeout=timeout, on_output=on_output, session=self.name)

    def interrupt(self) -> bool:
        """From another thread: interrupt this interpreter's cell that runs; False when none does."""
        return self.sandbox.interrupt(session=self.name)

    def restart(self) -> None:
        self.sandbox.client.close_interpreter(self.sandbox.sandbox_id, self.name)

    close = restart

    def __enter__(self) -> RemoteInterpreter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.sandbox.closed:
            self.close()
