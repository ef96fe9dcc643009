"""``run_code`` behaves as ``python3 - < program`` would, on every runtime.

A Python program runs in a forked copy of the isolate's agent (no interpreter
start-up): these tests hold it to what a fresh interpreter does. It ends as an
interpreter ends (objects finalised, files flushed, atexit, threads joined),
its tracebacks and stack show only its own code, nothing of the agent is in
reach, streamed output comes line by line, and output that is not UTF-8 comes
back byte for byte.

One sandbox per runtime for the whole module (a microVM boot costs seconds
under TCG); the tests do not depend on each other's files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from stockade import ExecResult, Policy, Sandbox
from stockade.result import validate
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require

RUNTIMES = ["process", "gvisor", "microvm", "fake"]


@pytest.fixture(scope="module", params=RUNTIMES)
def sb(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    require(request.param)
    manager = RuntimeManager(pool_size=0)
    try:
        with Sandbox(Policy(runtime=request.param, timeout_seconds=60), manager=manager) as sandbox:
            yield sandbox
    finally:
        manager.close()


def test_a_file_left_open_is_flushed_and_closed_at_the_end(sb: Sandbox) -> None:
    r = sb.run_code(
        "f = open('/work/left-open.txt', 'w'); f.write('hello')\n"
        "def keep(): return f\n"  # a function holds the module's globals: a reference cycle
        "class Holder:\n    def __del__(self): open('/work/finalised.txt', 'w').write('del ran')\n"
        "h = Holder()\n"
    )
    assert r.success, r.stderr
    assert sb.read_file("/work/left-open.txt") == b"hello"
    assert sb.read_file("/work/finalised.txt") == b"del ran"


def test_atexit_handlers_run_after_the_program_in_reverse_order(sb: Sandbox) -> None:
    r = sb.run_code(
        "import atexit\natexit.register(print, 'registered first')\natexit.register(print, 'registered last')\n"
        "print('program')"
    )
    assert r.success and r.stdout == "program\nregistered last\nregistered first\n"


def test_atexit_runs_after_an_uncaught_exception_too(sb: Sandbox) -> None:
    r = sb.run_code("import atexit\natexit.register(print, 'cleanup')\nraise ValueError('boom')")
    assert r.exit_code == 1 and r.stdout == "cleanup\n"
    assert r.stderr.endswith("ValueError: boom\n")


def test_non_daemon_threads_and_thread_pools_finish_before_the_end(sb: Sandbox) -> None:
    r = sb.run_code(
        "import threading, concurrent.futures\n"
        "printed = threading.Event()\n"
        "def late():\n    printed.wait(60); print('thread done', flush=True)\n"
        "threading.Thread(target=late).start()\n"
        "pool = concurrent.futures.ThreadPoolExecutor(2)\n"
        "print(pool.submit(sum, [40, 2]).result(), flush=True)\n"
        "printed.set()\n"
    )
    assert r.success, r.stderr
    assert r.stdout == "42\nthread done\n"


@pytest.mark.parametrize(
    ("ending", "status", "stderr"),
    [
        ("raise SystemExit", 0, ""),
        ("import sys; sys.exit(3)", 3, ""),
        ("import sys; sys.exit(256 + 7)", 7, ""),
        ("import sys; sys.exit('a message')", 1, "a message\n"),
    ],
)
def test_sys_exit_ends_as_the_interpreter_does(sb: Sandbox, ending: str, status: int, stderr: str) -> None:
    r = sb.run_code(f"print('before')\n{ending}\nprint('after')")
    assert r.exit_code == status and r.stdout == "before\n" and r.stderr == stderr


def test_a_traceback_shows_only_the_programs_frames_with_their_lines(sb: Sandbox) -> None:
    r = sb.run_code("x = 1\n\ndef inner():\n    return 1 / 0\n\ninner()\n")
    assert r.exit_code == 1
    assert r.stderr == (
        "Traceback (most recent call last):\n"
        '  File "<stdin>", line 6, in <module>\n'
        '  File "<stdin>", line 4, in inner\n'
        "ZeroDivisionError: division by zero\n"
    )


def test_a_syntax_error_names_the_programs_line_only(sb: Sandbox) -> None:
    r = sb.run_code("ok = 1\nbroken = (\n")
    assert r.exit_code == 1
    assert r.stderr.startswith('  File "<stdin>", line 2\n') and "SyntaxError" in r.stderr
    assert "agent" not in r.stderr and "Traceback" not in r.stderr


def test_nothing_of_the_agent_is_in_reach(sb: Sandbox) -> None:
    r = sb.run_code(
        "import sys, json, traceback, io, inspect\n"
        "stack = io.StringIO(); traceback.print_stack(file=stack)\n"
        "try:\n    import agent\n    importable = True\nexcept ImportError:\n    importable = False\n"
        "print(json.dumps({'argv': sys.argv, 'orig_argv': sys.orig_argv, 'path0': sys.path[0],\n"
        "    'modules': [m for m in sys.modules if m == 'agent' or m.startswith(('agent.', 'stockade'))],\n"
        "    'files': [getattr(m, '__file__', '') or '' for m in list(sys.modules.values())],\n"
        "    'stack': stack.getvalue(), 'frames': [f.filename for f in inspect.stack()],\n"
        "    'importable': importable, 'main': __name__, 'has_file': '__file__' in globals()}))\n"
    )
    assert r.success, r.stderr
    seen = json.loads(r.stdout)
    assert seen["argv"] == ["-"] and seen["orig_argv"][1:] == ["-"] and seen["path0"] == ""
    assert seen["modules"] == [] and not seen["importable"]
    assert not [f for f in seen["files"] if "stockade" in f or "/agent/" in f]
    assert "agent" not in seen["stack"] and 'File "<stdin>", line 2' in seen["stack"]
    assert "<stdin>" in seen["frames"] and not [f for f in seen["frames"] if "agent" in f]
    assert seen["main"] == "__main__" and not seen["has_file"]


def test_the_agents_future_imports_are_not_the_programs(sb: Sandbox) -> None:
    """The agent's modules say ``from __future__ import annotations``; the program did not."""
    r = sb.run_code("def f(x: int) -> str: pass\nprint(f.__annotations__['x'] is int)")
    assert r.stdout == "True\n"


def test_functions_of_the_program_pickle_by_reference_to_main(sb: Sandbox) -> None:
    r = sb.run_code(
        "import pickle, sys\ndef double(x): return 2 * x\n"
        "print(pickle.loads(pickle.dumps(double))(21), sys.modules['__main__'].double is double)"
    )
    assert r.stdout == "42 True\n"


def test_the_working_directory_is_importable(sb: Sandbox) -> None:
    sb.run_code("open('helper_mod.py', 'w').write('VALUE = 42')")
    r = sb.run_code("import helper_mod; print(helper_mod.VALUE)")
    assert r.stdout == "42\n", r.stderr


@pytest.mark.parametrize("how", ["run_code", "python3 in exec"])
def test_streamed_output_comes_line_by_line(sb: Sandbox, how: str) -> None:
    """A line printed before the program dies reaches the caller: output still in a block buffer
    would die with the program (SIGKILL flushes nothing)."""
    program = "print('first line')\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    chunks: list[bytes] = []

    def seen(stream: str, data: bytes) -> None:
        chunks.append(data)

    if how == "run_code":
        r = sb.run_code(program, on_output=seen)
    else:
        r = sb.exec(["python3", "-c", program], on_output=seen)
    assert r.termination_reason == "killed" and r.exit_code == -9
    assert b"".join(chunks) == b"first line\n" and r.stdout == "first line\n"


def test_output_that_is_not_utf8_comes_back_byte_for_byte(sb: Sandbox) -> None:
    every_byte = bytes(range(256))
    r = sb.run_code(
        "import sys\nsys.stdout.buffer.write(bytes(range(256)))\nsys.stderr.buffer.write(b'\\xff\\xfe err')"
    )
    assert r.success
    assert r.stdout_bytes == every_byte and r.stderr_bytes == b"\xff\xfe err"
    assert r.stdout == every_byte.decode("utf-8", errors="replace")  # the text, as before
    wire = json.loads(r.to_json())
    assert isinstance(wire["stdout_bytes"], str)  # base64 on the wire
    again = validate(ExecResult, r.to_json(), json_text=True)
    assert again.stdout_bytes == every_byte and again.stderr_bytes == b"\xff\xfe err"


def test_a_name_of_undecodable_bytes_prints_as_python3_prints_it(sb: Sandbox) -> None:
    program = (
        "import os, sys\nopen(b'/work/caf\\xe9.txt', 'w').close()\n"
        "print(*[n for n in os.listdir('/work') if n.startswith('caf')])\n"
        "print(sys.stdin.errors, sys.stdout.errors, sys.stderr.errors)"
    )
    code = sb.run_code(program)
    python3 = sb.exec(["python3", "-c", program])
    assert code.success and python3.success, code.stderr + python3.stderr
    said = b"caf\xe9.txt\nsurrogateescape surrogateescape backslashreplace\n"
    assert code.stdout_bytes == python3.stdout_bytes == said


def test_utf8_output_travels_once_as_text(sb: Sandbox) -> None:
    r = sb.run_code("print('héllo ✓')")
    assert r.stdout_bytes == "héllo ✓\n".encode()
    wire = json.loads(r.to_json())
    assert wire["stdout"] == "héllo ✓\n" and wire["stdout_bytes"] is None
    assert validate(ExecResult, wire).stdout_bytes == "héllo ✓\n".encode()


def test_a_program_that_forks_keeps_all_its_descriptors(sb: Sandbox) -> None:
    """Nothing of the agent acts in the program's forks: in a microVM the guest agent's at-fork hook
    closed the descriptor number its seccomp listener had, in every later fork, whatever the
    program had opened there since."""
    r = sb.run_code(
        "import os\npipes = [os.pipe() for _ in range(24)]\npid = os.fork()\n"
        "if pid == 0:\n    for _, w in pipes:\n        os.write(w, b'x')\n    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), b''.join(os.read(r, 1) for r, _ in pipes))\n"
    )
    assert r.stdout == f"0 {b'x' * 24!r}\n", r.stderr
