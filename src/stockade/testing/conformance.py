"""The conformance suite: what a caller can rely on from any ``Isolate``, whoever placed it.

Every check takes one live isolate (``placement.acquire(policy)``) and uses only
the ``Isolate`` protocol (``aexec``, ``arun_code`` with or without a session,
``aclose_interpreter``, ``awrite_file``, ``aread_file``, ``alist_dir``),
so the same suite runs against each runtime of this host through the ``local``
placement (microVM included: the checks share one isolate, so one boot) and
against a Ray cluster's nodes through the ``ray`` placement::

    failures = asyncio.run(run_suite(open_placement(), Policy(runtime="gvisor")))
    assert failures == [], failures

A check raises ``AssertionError`` (or the error a call raised) when the isolate
does not behave; checks marked ``isolating`` need a real boundary and are left
out for the ``fake`` runtime. Each works in a directory of its own that it
removes, so checks do not see each other's files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AgentError, InvalidRequestError, SandboxError

if TYPE_CHECKING:
    from ..placement.base import Isolate, Placement
    from ..policy import Policy


CheckFn = Callable[["Isolate"], Awaitable[None]]


@dataclass(frozen=True)
class Check:
    name: str
    run: CheckFn
    isolating: bool = False  # needs a real isolation boundary (not the ``fake`` runtime)


CHECKS: list[Check] = []


def check(isolating: bool = False) -> Callable[[CheckFn], CheckFn]:
    """Add the decorated function to the suite."""

    def register(fn: CheckFn) -> CheckFn:
        CHECKS.append(Check(fn.__name__, fn, isolating))
        return fn

    return register


async def _workdir(isolate: Isolate) -> str:
    made = await isolate.aexec(["mktemp", "-d"])
    assert made.termination_reason == "completed" and made.exit_code == 0, made.summary()
    return made.stdout.strip()


async def _raises(call: Awaitable[object], kind: type[BaseException], pattern: str) -> None:
    try:
        await call
    except kind as exc:
        assert re.search(pattern, str(exc)), f"{type(exc).__name__} without {pattern!r}: {exc}"
        return
    raise AssertionError(f"no {kind.__name__} matching {pattern!r}")


# ---- commands ----------------------------------------------------------------------------------


@check()
async def exec_reports_output_exit_code_and_runtime(isolate: Isolate) -> None:
    r = await isolate.aexec(["echo", "hello", "world"])
    assert (r.success, r.stdout, r.exit_code, r.termination_reason) == (True, "hello world\n", 0, "completed"), r
    assert r.runtime_used == isolate.runtime_name
    r = await isolate.aexec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.success, r.exit_code, r.termination_reason) == (False, 7, "completed")
    assert (r.stdout, r.stderr) == ("out\n", "err\n")


@check()
async def a_command_killed_by_a_signal_says_so(isolate: Isolate) -> None:
    r = await isolate.aexec(["sh", "-c", "kill -9 $$"])
    assert (r.exit_code, r.termination_reason) == (-9, "killed"), r.summary()


@check()
async def stdin_env_and_cwd_reach_the_command(isolate: Isolate) -> None:
    r = await isolate.aexec(["sh", "-c", "cat; echo $GREETING; pwd"], stdin=b"piped\n", env={"GREETING": "hi"}, cwd="/")
    assert r.stdout.splitlines() == ["piped", "hi", "/"], r.summary()


@check()
async def a_run_sees_the_base_environment_and_no_more(isolate: Isolate) -> None:
    from ..runtimes.base import BASE_ENV

    code = "import json, os; print(json.dumps(dict(os.environ)))"
    for r in (await isolate.aexec(["python3", "-c", code]), await isolate.arun_code(code)):
        assert r.success, r.summary()
        seen = json.loads(r.stdout)  # (HOME and TMPDIR are a temporary directory's under fake)
        assert sorted(set(seen) - {"MPLBACKEND"}) == sorted(BASE_ENV), seen
        assert (seen["PATH"], seen["LANG"]) == (BASE_ENV["PATH"], BASE_ENV["LANG"]), seen


@check()
async def large_stdin_arrives_whole(isolate: Isolate) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: sixteen pipe buffers
    r = await isolate.aexec(["sha256sum"], stdin=data)
    assert r.success and r.stdout.split()[0] == hashlib.sha256(data).hexdigest(), r.summary()
    r = await isolate.aexec(["true"], stdin=data)  # never read: no stall
    assert r.success, r.summary()


@check()
async def errors_name_a_missing_command_and_a_missing_directory(isolate: Isolate) -> None:
    await _raises(isolate.aexec(["/nonexistent/binary"]), AgentError, "cannot execute '/nonexistent/binary'")
    await _raises(
        isolate.aexec(["pwd"], cwd="/nonexistent"), AgentError, "cannot use '/nonexistent' as the working directory"
    )


@check()
async def a_timeout_ends_the_run_and_the_isolate_goes_on(isolate: Isolate) -> None:
    r = await isolate.arun_code("import time; time.sleep(30)", timeout=0.5)
    assert (r.termination_reason, r.success) == ("timeout", False), r.summary()
    assert r.execution_time_seconds < 10
    assert (await isolate.aexec(["true"])).success


@check()
async def output_streams_in_order_and_binary_output_comes_back_intact(isolate: Isolate) -> None:
    chunks: list[tuple[str, bytes]] = []
    r = await isolate.aexec(["sh", "-c", "echo a; echo b >&2"], on_output=lambda s, d: chunks.append((s, d)))
    assert b"".join(d for s, d in chunks if s == "stdout") == b"a\n"
    assert b"".join(d for s, d in chunks if s == "stderr") == b"b\n"
    assert r.stdout == "a\n"
    r = await isolate.arun_code("import sys; sys.stdout.buffer.write(bytes(range(256)))")
    assert r.success and r.stdout_bytes == bytes(range(256)), r.summary()


@check()
async def commands_inherit_only_their_stdio(isolate: Isolate) -> None:
    listing = "import os; print(sorted(os.listdir('/proc/self/fd')))"
    fds = (await isolate.aexec(["python3", "-I", "-S", "-c", listing])).stdout.strip()
    assert fds == "['0', '1', '2', '3']", fds  # 3: the directory being listed
    fds = (await isolate.arun_code(listing)).stdout.strip()
    assert fds == "['0', '1', '2', '3']", fds


# ---- code --------------------------------------------------------------------------------------


@check()
async def run_code_is_a_fresh_python_main(isolate: Isolate) -> None:
    r = await isolate.arun_code("import sys\nprint(sum(range(10)))\nprint('e', file=sys.stderr)")
    assert (r.success, r.stdout, r.stderr) == (True, "45\n", "e\n"), r.summary()
    r = await isolate.arun_code("print(__name__, sorted(k for k in globals() if not k.startswith('__')))")
    assert r.stdout == "__main__ []\n"


@check()
async def run_code_exits_as_python_does(isolate: Isolate) -> None:
    r = await isolate.arun_code("raise ValueError('boom')")
    assert r.exit_code == 1 and "ValueError: boom" in r.stderr and "Traceback" in r.stderr
    assert (await isolate.arun_code("import sys; sys.exit(3)")).exit_code == 3
    assert (await isolate.arun_code("raise SystemExit('bye')")).exit_code == 1


@check()
async def run_code_runs_bash_and_names_an_unknown_language(isolate: Isolate) -> None:
    r = await isolate.arun_code("for i in 1 2 3; do echo $i; done", language="bash")
    assert r.stdout == "1\n2\n3\n", r.summary()
    # Refused by the host before anything reaches the agent (limits.check_code).
    await _raises(isolate.arun_code("x", language="cobol"), InvalidRequestError, "language 'cobol' is not one")


@check()
async def a_session_keeps_its_state_until_it_is_closed(isolate: Isolate) -> None:
    first = await isolate.arun_code("import os\nx = 41", session="conformance")
    assert first.success and first.execution_count == 1, first.summary()
    r = await isolate.arun_code("x + 1", session="conformance")
    assert [(c.kind, c.text) for c in r.results] == [("execute_result", "42")], r.results
    r = await isolate.arun_code("raise KeyError('k')", session="conformance")
    assert not r.success and r.exception is not None and r.exception.name == "KeyError"
    assert await isolate.aclose_interpreter("conformance")
    r = await isolate.arun_code("'x' in globals()", session="conformance")
    assert (r.execution_count, r.results[0].text) == (1, "False"), r.results


# ---- files -------------------------------------------------------------------------------------


@check()
async def files_persist_across_calls(isolate: Isolate) -> None:
    tmp = await _workdir(isolate)
    try:
        await isolate.awrite_file(f"{tmp}/data.txt", "line1\nline2\n")
        assert (await isolate.aexec(["wc", "-l", f"{tmp}/data.txt"])).stdout.split()[0] == "2"
        await isolate.arun_code(f"open('{tmp}/out.bin', 'wb').write(bytes(range(256)))")
        assert await isolate.aread_file(f"{tmp}/out.bin") == bytes(range(256))
        assert {"data.txt", "out.bin"} == {e["name"] for e in await isolate.alist_dir(tmp)}
        await isolate.awrite_file(f"{tmp}/new/deeper/x.txt", "x")  # its directories made first
        assert await isolate.aread_file(f"{tmp}/new/deeper/x.txt") == b"x"
        await _raises(isolate.awrite_file(f"{tmp}/data.txt/x", "x"), SandboxError, "data.txt/x")
        await _raises(isolate.awrite_file(f"{tmp}/data.txt/sub/x", "x"), SandboxError, "data.txt/sub/x")
    finally:
        await isolate.aexec(["rm", "-rf", tmp])


@check()
async def a_file_larger_than_a_frame_is_read_whole(isolate: Isolate) -> None:
    tmp = await _workdir(isolate)
    try:
        made = await isolate.aexec(["sh", "-c", f"head -c 12000000 /dev/urandom > {tmp}/big && sha256sum {tmp}/big"])
        assert made.success, made.summary()
        data = await isolate.aread_file(f"{tmp}/big")
        assert len(data) == 12_000_000 and hashlib.sha256(data).hexdigest() == made.stdout.split()[0]
        assert await isolate.aread_file(f"{tmp}/big", max_bytes=6_000_000) == data[:6_000_000]
        assert await isolate.aread_file(f"{tmp}/big", max_bytes=0) == b""
    finally:
        await isolate.aexec(["rm", "-rf", tmp])


@check()
async def reading_a_missing_file_is_an_error(isolate: Isolate) -> None:
    await _raises(isolate.aread_file("/nonexistent/file"), SandboxError, "nonexistent")


# ---- the boundary ------------------------------------------------------------------------------


@check(isolating=True)
async def code_runs_unprivileged_with_no_route_out(isolate: Isolate) -> None:
    probe = (
        "import os, socket\n"
        "st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "print(st['CapEff'].strip())\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=3); print('reached')\n"
        "except OSError:\n"
        "    print('no route')\n"
    )
    r = await isolate.arun_code(probe)
    assert r.stdout.split() == ["0000000000000000", "no", "route"], f"{r.summary()} {r.stdout!r} {r.stderr!r}"


# ---- running the suite -------------------------------------------------------------------------


def checks_for(runtime: str) -> list[Check]:
    """The checks that apply to ``runtime`` (all but the isolating ones for ``fake``)."""
    return [c for c in CHECKS if runtime != "fake" or not c.isolating]


async def run_checks(isolate: Isolate) -> list[str]:
    """Every check that applies, in order, on ``isolate``: one line per failure (empty: it conforms)."""
    failures = []
    for item in checks_for(isolate.runtime_name):
        try:
            await item.run(isolate)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the next check goes on
            failures.append(f"{item.name} ({isolate.runtime_name} on {isolate.node}): {type(exc).__name__}: {exc}")
    return failures


async def run_suite(placement: Placement, policy: Policy) -> list[str]:
    """The suite on one isolate of ``placement`` for ``policy``, released afterwards."""
    isolate = await placement.acquire(policy)
    try:
        return await run_checks(isolate)
    finally:
        await placement.release(isolate)
