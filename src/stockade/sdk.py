"""The Python SDK: one-shot ``run``/``run_code`` and the held ``Sandbox``.

One-shot calls get a fresh isolate each time (from the warm pool when the
policy's shape allows) and tear it down in the background. A held sandbox keeps
its files and processes across calls until it is closed. The awaited twins
(``AsyncSandbox``, ``arun``, ``arun_code``) are sdk_async.py's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import SandboxClosedError
from .limits import argv_list, check_call_size, check_code, publish_specs
from .policy import Policy, policy_of
from .result import ExecResult
from .runtimes.agent_requests import check_session
from .runtimes.manager import RuntimeManager, default_manager
from .runtimes.publish import parse_publish
from .runtimes.sandbox import AgentSandbox
from .runtimes.spawned import Process
from .runtimes.verdict import OutputCallback

if TYPE_CHECKING:
    from .transfer import TransferSummary
    from .transfer_unpack import Links
    from .watch import FileWatch


def one_shot(
    policy: Policy, run: Callable[[AgentSandbox], ExecResult], manager: RuntimeManager | None = None
) -> ExecResult:
    """``run`` on a fresh isolate for ``policy`` (from the warm pool when its shape fits),
    torn down afterwards off the caller's path: the one-shot path of ``run``, ``run_code``
    and the CLI (the daemon's is ``Controller._launch``, on its event loop)."""
    runtime = (manager or default_manager()).select(policy)
    sandbox = runtime.acquire(policy)
    sandbox.one_shot = True
    try:
        return run(sandbox)
    finally:
        runtime.dispose(sandbox)


def run(
    argv: list[str],
    policy: Policy | dict[str, Any] | None = None,
    *,
    stdin: bytes | str = b"",
    timeout: float | None = None,
    on_output: OutputCallback | None = None,
    manager: RuntimeManager | None = None,
    **policy_fields: Any,
) -> ExecResult:
    """Run ``argv`` (a list: no shell) in a fresh isolate and return what happened.

    ``policy`` and ``policy_fields`` (``memory_mb=256``, ...) make the isolate's
    Policy; ``timeout`` is its ``timeout_seconds`` (seconds of wall clock).
    ``stdin`` and ``on_output`` are ``Sandbox.exec``'s.
    """
    check_call_size("stdin", stdin)  # before an isolate is taken for a call that cannot be sent
    command = argv_list(argv)
    pol = policy_of("run", policy, policy_fields, timeout, _RUN_KEYWORDS)
    return one_shot(pol, lambda sb: sb.exec(command, stdin=stdin, on_output=on_output), manager)


def run_code(
    code: str,
    language: str = "python",
    policy: Policy | dict[str, Any] | None = None,
    *,
    stdin: bytes | str = b"",
    timeout: float | None = None,
    on_output: OutputCallback | None = None,
    manager: RuntimeManager | None = None,
    **policy_fields: Any,
) -> ExecResult:
    """Run ``code`` (``python``, as ``python3 -`` would; or ``bash``) in a fresh isolate.

    The keywords are ``run``'s.
    """
    check_code(code, language)  # before an isolate is taken for a call that cannot be sent
    check_call_size("code", code)
    check_call_size("stdin", stdin)
    pol = policy_of("run_code", policy, policy_fields, timeout, _RUN_CODE_KEYWORDS)
    return one_shot(pol, lambda sb: sb.run_code(code, language, stdin=stdin, on_output=on_output), manager)


# A call's own keywords, which a misspelt one may have meant as much as a Policy field.
_RUN_KEYWORDS = ("stdin", "on_output", "manager")
_RUN_CODE_KEYWORDS = ("language", *_RUN_KEYWORDS)
_SANDBOX_KEYWORDS = ("manager", "publish")


class Sandbox:
    """A sandbox you hold: files and processes persist across calls until ``close``.

    >>> with Sandbox() as sb:
    ...     sb.write_file("/work/x.py", "print(6 * 7)")
    ...     sb.exec(["python3", "/work/x.py"]).stdout
    '42\\n'
    """

    def __init__(
        self,
        policy: Policy | dict[str, Any] | None = None,
        *,
        manager: RuntimeManager | None = None,
        publish: Sequence[int | str] = (),
        timeout: float | None = None,
        **policy_fields: Any,
    ) -> None:
        self.policy = policy_of("Sandbox", policy, policy_fields, timeout, _SANDBOX_KEYWORDS)
        if manager is not None and not isinstance(manager, RuntimeManager):
            raise TypeError(f"manager must be a RuntimeManager, not {type(manager).__name__}: {manager!r}")
        specs = publish_specs(publish)  # refused before an isolate is started for it
        self._sandbox = (manager or default_manager()).select(self.policy).start(self.policy)
        # port inside -> (host address, host port) of its published forward
        self.published: dict[int, tuple[str, int]] = {}
        try:
            for spec in specs:
                self.publish(spec)
        except BaseException:
            self._sandbox.close()
            raise

    def publish(self, spec: int | str) -> tuple[str, int]:
        """Forward a host loopback port to a port on the sandbox's own loopback (docs/processes-and-ports.md).

        ``8000`` (any free host port), ``"9000:8000"`` or ``"127.0.0.1:9000:8000"``;
        needs ``network_policy="loopback"``. The host address and port.
        """
        address = self._sandbox.publish(spec)
        self.published[parse_publish(spec)[2]] = address
        return address

    @property
    def runtime(self) -> str:
        return self._sandbox.runtime_name

    @property
    def scratch_dir(self) -> str:
        """A writable directory inside the sandbox (``/tmp`` in every isolating runtime)."""
        return self._sandbox.scratch_dir

    def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` (a list: no shell) in this sandbox.

        ``stdin``: the command's input. ``env``: added to the policy's environment.
        ``cwd``: its working directory (default ``/work``). ``timeout``: seconds of
        wall clock for this call, at most the policy's ``timeout_seconds`` (more is
        refused with ``PolicyError``). ``on_output(stream, data)``: called with each
        piece of output as it comes (``"stdout"``/``"stderr"``, bytes).
        """
        return self._sandbox.exec(argv_list(argv), stdin=stdin, env=env, cwd=cwd, timeout=timeout, on_output=on_output)

    def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        session: str | None = None,
    ) -> ExecResult:
        """Run ``code`` (``python``, as ``python3 -`` would: docs/run-code.md; or ``bash``) in this sandbox.

        The keywords are ``exec``'s, and ``session``: run the code as a cell of that
        session's stateful interpreter (``interpreter()``), which keeps its variables,
        imports and working directory from cell to cell and returns rich results.
        """
        return self._sandbox.run_code(
            code, language, stdin=stdin, env=env, timeout=timeout, on_output=on_output, session=session
        )

    def spawn(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """Start ``argv`` in the background: a ``Process`` (``pid``, ``read()``, ``write()``,
        ``wait()``, ``kill()``, ``follow(on_output)``); other calls go on meanwhile.

        >>> with Sandbox(network_policy="loopback") as sb:
        ...     server = sb.spawn(["python3", "-m", "http.server", "8000"])
        ...     sb.exec(["python3", "-c", "import urllib.request as u; ..."])
        ...     server.kill()
        """
        return self._sandbox.spawn(argv_list(argv), stdin=stdin, env=env, cwd=cwd)

    def processes(self) -> list[dict[str, Any]]:
        """The background processes of this sandbox: ``{handle, pid, argv, running, exit_code}``."""
        return self._sandbox.processes()

    def watch(self, path: str, *, recursive: bool = False, events: Iterable[str] | None = None) -> FileWatch:
        """Watch ``path`` (a directory, ``recursive``: and those under it; or a file) for changes:
        a ``FileWatch`` whose ``events()`` are ``FileEvent(kind, path, is_dir)`` (docs/sdk.md).

        >>> with sb.watch("/work/out") as w:
        ...     sb.exec(["sh", "-c", "echo done > /work/out/result"])
        ...     w.events(timeout=1)   # [FileEvent('created', '/work/out/result', False), ...]
        """
        from .watch import FileWatch

        return FileWatch.start(lambda argv, source: self.spawn(argv, stdin=source), path, recursive, events)

    def interpreter(self, name: str = "default") -> Interpreter:
        """The stateful Python interpreter called ``name`` in this sandbox (started by its first cell)."""
        return Interpreter(self, name)

    def interrupt(self, *, session: str | None = None) -> bool:
        """From another thread: interrupt the run in progress (SIGINT). False when nothing runs
        (``session``: when no cell of that interpreter runs; anything else is left alone)."""
        return self._sandbox.interrupt(session)

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        self._sandbox.write_file(path, data, mode)

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return self._sandbox.read_file(path, max_bytes)

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        return self._sandbox.list_dir(path)

    def upload(
        self, local_path: str | os.PathLike[str], remote_dir: str, *, max_bytes: int | None = None
    ) -> TransferSummary:
        """Copy a host file or directory into ``remote_dir`` (made if missing) as a tar stream:
        a directory's contents, or a file by its name. ``max_bytes`` caps the archive (256 MiB)."""
        from .transfer import upload

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
        """Copy ``remote_path`` (a directory's contents, or a file) into ``local_dir`` on the host:
        regular files and directories only, checked before a byte is written (docs/sdk.md)."""
        from .transfer import download

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

    @property
    def closed(self) -> bool:
        return self._sandbox.closed

    def close(self) -> None:
        self._sandbox.close()

    def __enter__(self) -> Sandbox:
        if self._sandbox.closed:
            raise SandboxClosedError("the sandbox is closed")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Interpreter:
    """A stateful Python interpreter in a sandbox, as a notebook kernel is (docs/interpreters.md).

    >>> with Sandbox() as sb:
    ...     py = sb.interpreter()
    ...     py.run("import math\nr = 2")
    ...     py.run("math.pi * r ** 2").results[0].text
    '12.566370614359172'

    Each ``run`` returns an ``ExecResult`` with the cell's ``results`` (its last
    expression's value, ``display()`` calls, matplotlib figures as PNG),
    ``exception`` (name, value, the cell's traceback) and ``execution_count``.
    A ``timeout`` interrupts the cell (KeyboardInterrupt) and keeps the state.
    """

    def __init__(self, sandbox: Sandbox, name: str) -> None:
        self.sandbox = sandbox
        self.name = check_session(name)  # refused now, not at its first cell

    def __repr__(self) -> str:
        return f"Interpreter({self.name!r}, runtime={self.sandbox.runtime!r})"

    def run(
        self,
        code: str,
        *,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run one cell. ``env`` applies when the cell starts the interpreter."""
        return self.sandbox.run_code(code, env=env, timeout=timeout, on_output=on_output, session=self.name)

    def interrupt(self) -> bool:
        """From another thread: interrupt this interpreter's cell that runs (its state stays);
        False when none runs (a cell of another interpreter, or a command, is left alone)."""
        return self.sandbox.interrupt(session=self.name)

    def restart(self) -> None:
        """End the interpreter (its atexit handlers run); the next cell starts a fresh one."""
        self.sandbox._sandbox.close_interpreter(self.name)

    close = restart

    def __enter__(self) -> Interpreter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.sandbox.closed:
            self.close()


def warm_up(manager: RuntimeManager | None = None) -> None:
    """Start the default runtime's zygote and fill its warm pool now."""
    (manager or default_manager()).select(Policy()).warm_up()
