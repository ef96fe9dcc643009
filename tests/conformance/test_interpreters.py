"""Stateful interpreters (``sb.interpreter()``, ``run_code(session=...)``) on every runtime.

A session's cells share one namespace as a notebook kernel's do; each returns
its results (the last expression, display(), figures), a structured exception
with the cell's own traceback, and its execution count. Timeouts and
interrupts stop a cell and keep the state; an interpreter that ignores them is
killed and the next cell starts fresh. What the cell writes to the
interpreter's reply pipe is untrusted and cannot hurt the host.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator

import pytest

from stockade import Policy, Sandbox
from stockade.errors import InvalidRequestError
from stockade.runtimes.manager import RuntimeManager
from stockade.sdk import Interpreter
from tests.conformance.test_run_code_like_python import RUNTIMES
from tests.conftest import require

# A 1x1 PNG, as a _repr_png_ would return it.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module", params=RUNTIMES)
def sb(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    require(request.param)
    manager = RuntimeManager(pool_size=0)
    try:
        with Sandbox(Policy(runtime=request.param, timeout_seconds=60), manager=manager) as sandbox:
            yield sandbox
    finally:
        manager.close()


def test_cells_share_variables_imports_and_the_working_directory(sb: Sandbox) -> None:
    notebook = f"{sb.scratch_dir}/nb"
    with sb.interpreter("state") as py:
        first = py.run(
            f"import os\ncount = 41\nos.makedirs({notebook!r}, exist_ok=True)\nos.chdir({notebook!r})\nprint('set')"
        )
        assert first.success and first.stdout == "set\n" and first.execution_count == 1 and first.results == []
        second = py.run("count += 1\nprint(os.getcwd())\ncount")
        assert second.stdout == f"{notebook}\n" and second.execution_count == 2
        assert [(r.kind, r.text) for r in second.results] == [("execute_result", "42")]
        assert py.run("_ * 2").results[0].text == "84"  # the last value, as in IPython


def test_a_cell_awaits_at_its_top_and_a_semicolon_hides_its_value(sb: Sandbox) -> None:
    with sb.interpreter("notebook") as py:
        first = py.run(
            "import asyncio\n"
            "async def later(x):\n    await asyncio.sleep(0.01)\n    return x\n"
            "background = asyncio.ensure_future(later('kept'))\n"  # a task that outlives its cell
            "value = await later(20)\n"
            "await later(value + 1)"
        )
        assert first.success, first.exception
        assert [(r.kind, r.text) for r in first.results] == [("execute_result", "21")]
        second = py.run("[x async for x in (await asyncio.sleep(0, r) for r in ())], await background")
        assert [r.text for r in second.results] == ["([], 'kept')"], second.exception
        assert py.run("value * 2;").results == []  # run, not shown
        assert py.run("hidden = value;  # a comment after it").results == []
        assert [r.text for r in py.run("'a;b'").results] == ["'a;b'"]  # a semicolon in a string is no end
        # A coroutine only named is a value, as in IPython: not run.
        named = py.run("ran = []\nasync def f():\n    ran.append(1)\nf()")
        assert named.results[0].text.startswith("<coroutine object f at "), named.results
        assert [r.text for r in py.run("ran").results] == ["[]"]
        interrupted = py.run("await asyncio.sleep(3600)", timeout=2)
        assert interrupted.exception is not None and interrupted.exception.name == "KeyboardInterrupt"
        assert [r.text for r in py.run("value").results] == ["20"]  # the state survives


def test_display_and_rich_reprs_come_back_typed(sb: Sandbox) -> None:
    code = (
        "import base64\n"
        f"PIXEL = base64.b64decode({base64.b64encode(PIXEL).decode()!r})\n"
        "class Rich:\n"
        "    def _repr_html_(self): return '<b>rich</b>'\n"
        "    def _repr_png_(self): return PIXEL\n"
        "    def _repr_json_(self): return {'a': [1, 2]}\n"
        "    def _repr_svg_(self): return '<svg/>'\n"
        "    def __repr__(self): return 'Rich()'\n"
        "class Bundle:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/markdown': '**md**', 'text/plain': 'bundle'}\n"
        "display('shown first', Bundle())\n"
        "Rich()\n"
    )
    r = sb.interpreter("rich").run(code)
    assert r.success, r.stderr
    shown, bundle, value = r.results
    assert (shown.kind, shown.text) == ("display_data", "'shown first'")
    assert bundle.data == {"text/markdown": "**md**", "text/plain": "bundle"}
    assert value.kind == "execute_result" and value.text == "Rich()" and value.html == "<b>rich</b>"
    assert value.png == PIXEL and value.svg == "<svg/>" and value.json_data == {"a": [1, 2]}


def test_an_exception_is_structured_with_the_cells_frames_only_and_the_state_survives(sb: Sandbox) -> None:
    py = sb.interpreter("errors")
    py.run("kept = 'still here'\ndef divide(a, b):\n    return a / b\n")
    r = py.run("x = 1\ndivide(x, 0)\n")
    assert not r.success and r.termination_reason == "completed" and r.exit_code == 1
    assert r.exception is not None
    assert (r.exception.name, r.exception.value) == ("ZeroDivisionError", "division by zero")
    tb = r.exception.traceback
    assert tb.startswith("Traceback (most recent call last):\n")
    assert '"<cell-2>", line 2' in tb and '"<cell-1>", line 3, in divide' in tb and "return a / b" in tb
    assert "agent" not in tb and "kernel" not in tb
    assert py.run("kept").results[0].text == "'still here'"
    syntax = py.run("def broken(:\n")
    assert syntax.exception is not None and syntax.exception.name == "SyntaxError"
    assert '"<cell-4>", line 1' in syntax.exception.traceback
    outside = py.run("x = 1\nreturn x").exception  # found by the compiler, not the parser: its line shown too
    assert outside is not None and outside.name == "SyntaxError" and "return x" in outside.traceback, outside
    assert "During handling" not in outside.traceback
    assert py.run("print(kept)").stdout == "still here\n"
    ended = py.run("import sys\nsys.exit(3)")  # in a notebook this ends the cell, not the kernel
    assert ended.exception is not None and ended.exception.name == "SystemExit"
    assert (ended.exit_code, ended.success) == (3, False)  # its code, as a script's would be
    assert py.run("kept").execution_count == 8
    ends = ("sys.exit(0)", "sys.exit()", "sys.exit('bye')", "sys.exit('3')")
    assert [(r.exit_code, r.success, r.stderr) for r in map(py.run, ends)] == [
        (0, True, ""),
        (0, True, ""),
        (1, False, "bye\n"),  # said on stderr, as a script's sys.exit("bye") says it
        (1, False, "3\n"),  # a message, whatever it reads
    ]


def test_a_timeout_interrupts_the_cell_and_keeps_the_state(sb: Sandbox) -> None:
    py = sb.interpreter("timeout")
    py.run("progress = 0")
    r = py.run("import time\nwhile True:\n    progress += 1\n    time.sleep(0.01)\n", timeout=1.5)
    assert r.termination_reason == "timeout"
    assert r.error == "timed out after 1.5 s (the cell was interrupted; its interpreter keeps its state)"
    assert r.exception is not None and r.exception.name == "KeyboardInterrupt"
    after = py.run("progress > 0")
    assert after.results[0].text == "True" and after.execution_count == 3


def test_an_interrupt_from_another_thread_stops_the_cell_and_keeps_the_state(sb: Sandbox) -> None:
    py = sb.interpreter("interrupt")
    py.run("marker = 'kept'\nspins = 0")
    assert not py.interrupt()  # nothing runs: nothing to interrupt
    started = threading.Event()

    def seen(stream: str, data: bytes) -> None:
        started.set()

    timer = threading.Thread(target=lambda: started.wait(30) and py.interrupt())
    timer.start()
    r = py.run("print('spinning', flush=True)\nwhile True:\n    spins += 1\n", timeout=50, on_output=seen)
    timer.join()
    assert r.exception is not None and r.exception.name == "KeyboardInterrupt"
    assert (r.termination_reason, r.stdout, r.success) == ("killed", "spinning\n", False)
    assert r.error == "interrupted (the cell raised KeyboardInterrupt; its interpreter keeps its state)"
    after = py.run("marker")
    assert after.results[0].text == "'kept'" and after.execution_count == 3
    # A cell that catches the interrupt ends as it chooses: completed. Sent once the cell is in its try;
    # short sleeps, as Python heeds a SIGINT that lands just before a sleep begins only once it ends.
    inside = threading.Event()
    timer = threading.Thread(target=lambda: inside.wait(30) and py.interrupt())
    timer.start()
    caught = py.run(
        "import time\ntry:\n    print('waiting', flush=True)\n    while True:\n        time.sleep(0.05)\n"
        "except KeyboardInterrupt:\n    print('caught')",
        on_output=lambda stream, data: inside.set(),
    )
    timer.join()
    assert (caught.termination_reason, caught.error, caught.stdout) == ("completed", None, "waiting\ncaught\n")


def test_an_interpreters_interrupt_touches_only_its_own_cells(sb: Sandbox) -> None:
    mine, other = sb.interpreter("mine"), sb.interpreter("other")
    other.run("x = 1")
    started = threading.Event()
    answers: list[bool] = []

    def interrupt_both() -> None:
        if started.wait(30):
            answers.append(other.interrupt())  # not its cell: left alone
            answers.append(mine.interrupt())

    helper = threading.Thread(target=interrupt_both)
    helper.start()
    r = mine.run(
        "print('spinning', flush=True)\nwhile True:\n    pass\n", timeout=50, on_output=lambda s, d: started.set()
    )
    helper.join()
    assert answers == [False, True]
    assert r.exception is not None and r.exception.name == "KeyboardInterrupt"
    # A command is no interpreter's cell: asked while one runs, it is left alone.
    asker = threading.Thread(target=lambda: answers.append(mine.interrupt()))
    slept = sb.exec(["sh", "-c", "echo go; sleep 1; echo done"], on_output=lambda s, d: asker.ident or asker.start())
    asker.join()
    assert answers[-1] is False and slept.success and slept.stdout == "go\ndone\n"
    assert other.run("x").results[0].text == "1"


def test_an_interrupted_command_or_program_reads_killed_and_says_why(sb: Sandbox) -> None:
    # Interrupted once its output shows it runs: sent before the run, an interrupt reaches nothing.
    # The program sleeps in short turns: Python heeds a SIGINT that lands just before a sleep begins
    # only once that sleep ends.
    started = threading.Event()
    runs = (
        lambda: sb.exec(["sh", "-c", "echo go; exec sleep 30"], on_output=lambda stream, data: started.set()),
        lambda: sb.run_code(
            "import time\nprint('go', flush=True)\nfor _ in range(600):\n    time.sleep(0.05)",
            on_output=lambda s, d: started.set(),
        ),
    )
    for run in runs:
        started.clear()
        timer = threading.Thread(target=lambda: started.wait(30) and sb.interrupt())
        timer.start()
        r = run()
        timer.join()
        assert (r.termination_reason, r.exit_code, r.error) == ("killed", -2, "interrupted (SIGINT)"), r
    assert sb.exec(["true"]).termination_reason == "completed"  # the next run is judged on its own


def test_an_interrupt_the_cell_did_not_heed_is_sent_again_before_its_interpreter_is_killed(sb: Sandbox) -> None:
    # A SIGINT that lands just before a sleep begins is heeded only when the sleep ends: the agent sends
    # it again until the kill. Here the cell's handler lets the first one it sees go by, as that race does.
    py = sb.interpreter("again")
    py.run(
        "import signal, time\nseen = []\nkept = 'yes'\n"
        "def once(signum, frame):\n    seen.append(signum)\n    if len(seen) > 1:\n        raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGINT, once)"
    )
    going = threading.Event()
    sender = threading.Thread(target=lambda: going.wait(30) and py.interrupt())
    sender.start()
    r = py.run("print('go', flush=True)\ntime.sleep(30)", timeout=50, on_output=lambda s, d: going.set())
    sender.join()
    assert r.exception is not None and r.exception.name == "KeyboardInterrupt", r.summary()
    assert py.run("kept").results[0].text == "'yes'"  # the same interpreter: not killed


def test_an_interpreter_that_ignores_interrupts_is_killed_and_the_next_cell_starts_fresh(sb: Sandbox) -> None:
    py = sb.interpreter("stubborn")
    py.run("lost = 1\nimport signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)")  # ready before the clock runs
    r = py.run("while True:\n    pass\n", timeout=1)
    assert r.termination_reason == "timeout"
    assert r.error is not None and "its state is lost" in r.error and r.exception is None
    fresh = py.run("'lost' in dir()")
    assert fresh.execution_count == 1 and fresh.results[0].text == "False"
    # An interrupt from another thread is heeded as fast, or the interpreter goes the same way.
    py.run("lost = 1\nimport signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)")
    spinning = threading.Event()  # interrupted once it runs: sent before, the interrupt reaches nothing
    timer = threading.Thread(target=lambda: spinning.wait(30) and py.interrupt())
    timer.start()
    began = time.monotonic()
    r = py.run(
        "print('spinning', flush=True)\nwhile True:\n    pass\n", timeout=50, on_output=lambda s, d: spinning.set()
    )
    timer.join()
    assert time.monotonic() - began < 40, "the interrupt was ignored until the cell's timeout"
    assert (r.termination_reason, r.exception) == ("killed", None)
    assert r.error is not None and r.error.startswith("interrupted, and its interpreter did not stop within 2 s")
    assert "its state is lost" in r.error
    assert py.run("'lost' in dir()").results[0].text == "False"


def test_restart_ends_the_interpreter_as_a_program_ends(sb: Sandbox) -> None:
    py = sb.interpreter("restart")
    mark = f"{sb.scratch_dir}/atexit-ran"
    py.run(f"import atexit\natexit.register(lambda: open({mark!r}, 'w').write('yes'))\nvalue = 1")
    py.restart()
    assert sb.read_file(mark) == b"yes"
    fresh = py.run("'value' in dir()")
    assert fresh.execution_count == 1 and fresh.results[0].text == "False"


def test_sessions_are_separate_namespaces_and_output_belongs_to_its_cell(sb: Sandbox) -> None:
    a, b = sb.interpreter("a"), sb.interpreter("b")
    a.run("name = 'a'")
    b.run("name = 'b'")
    assert a.run("name").results[0].text == "'a'" and b.run("name").results[0].text == "'b'"
    chunks: list[bytes] = []
    r = a.run("print('one')\nimport sys\nprint('two', file=sys.stderr)", on_output=lambda s, d: chunks.append(d))
    assert (r.stdout, r.stderr) == ("one\n", "two\n") and b"".join(sorted(chunks)) == b"one\ntwo\n"
    assert b.run("print('b only')").stdout == "b only\n"


def test_a_cells_output_comes_line_by_line_as_it_prints(sb: Sandbox) -> None:
    # Without flush=True: a notebook shows each line as it is printed, not all at the cell's end.
    lines: list[tuple[float, bytes]] = []
    py = sb.interpreter("streamed")
    began = time.monotonic()
    code = "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.5)\n"
    r = py.run(code, on_output=lambda s, d: lines.append((time.monotonic() - began, d)))
    assert r.stdout == "0\n1\n2\n" and b"".join(d for _, d in lines) == b"0\n1\n2\n"
    first_line_at, cell_took = lines[0][0], time.monotonic() - began
    assert first_line_at < cell_took - 0.5, lines  # the first line came before the last sleep, not at the end


def test_a_cell_has_no_input(sb: Sandbox) -> None:
    r = sb.interpreter("input").run("input()")
    assert r.exception is not None and r.exception.name == "EOFError"


def test_a_cell_that_forges_the_interpreters_reply_only_ends_its_own_interpreter(sb: Sandbox) -> None:
    py = sb.interpreter("forger")
    py.run("x = 1")
    forged = py.run("import os\nos.write(4, b'\\xff\\xff\\xff\\xff garbage')\nimport time\ntime.sleep(5)", timeout=30)
    assert forged.results == [] and forged.error is not None and "state is lost" in forged.error
    also = py.run("import os, struct\nbody = b'not json'\nos.write(4, struct.pack('>I', len(body)) + body)")
    assert also.results == [] and also.error is not None
    assert py.run("1 + 1").results[0].text == "2"  # a fresh interpreter, and the sandbox is fine
    assert sb.exec(["echo", "ok"]).stdout == "ok\n"


FORGE = (
    "import json, os, struct\n"
    "body = json.dumps({'execution_count': 999, 'outputs': [{'kind': 'execute_result',"
    " 'data': {'text/plain': 'FORGED'}}], 'exception': None}).encode()\n"
    "os.write(4, struct.pack('<I', len(body)) + body)\n"
)


def test_a_well_formed_forged_reply_ends_the_interpreter_and_puts_no_cell_out_of_step(sb: Sandbox) -> None:
    # Taken as the cell's answer, it put every later answer one cell behind: the next cell's
    # loop ran past its timeout while it read as the cell before's success.
    with sb.interpreter("out-of-step") as py:
        py.run("x = 1")
        forged = py.run(FORGE + "import time\ntime.sleep(1)\n'real value'", timeout=30)
        assert [r.text for r in forged.results] == [] and forged.error is not None and "state is lost" in forged.error
        assert "its answer to the cell was not the interpreter's" in forged.error  # not "stockade sent none"
        after = py.run("'next value'")
        assert [r.text for r in after.results] == ["'next value'"] and after.execution_count == 1, after
        looped = py.run("while True: pass", timeout=2)
        assert looped.termination_reason == "timeout", looped
        assert [r.text for r in py.run("'and the next'").results] == ["'and the next'"]


def test_a_forged_reply_nested_past_the_decoders_depth_ends_the_interpreter(sb: Sandbox) -> None:
    # The agent's decoder raised RecursionError, which nothing caught: the call failed, and the
    # interpreter went on looping past its cell's timeout.
    with sb.interpreter("deep") as py:
        deep = "body = b'[' * 200000 + b']' * 200000\nimport os, struct\n"
        deep += "os.write(4, struct.pack('<I', len(body)) + body)\n"
        started = time.monotonic()
        r = py.run(deep + "while True: pass", timeout=2)
        assert r.error is not None and "state is lost" in r.error, r
        assert time.monotonic() - started < 30
        assert [x.text for x in py.run("2 + 2").results] == ["4"]


def test_a_cells_json_results_are_bounded_in_values(sb: Sandbox) -> None:
    # Six MiB of "[{},{},...]" cost the host ~300 MB and a second of the daemon's loop, every cell.
    with sb.interpreter("values") as py:
        r = py.run(
            "class J:\n    def __init__(self, n): self.n = n\n    def _repr_json_(self): return [{}] * self.n\n"
            "    def __repr__(self): return f'J({self.n})'\n"
            "display(J(150000))\n"  # past one value's bound: its JSON left out, its text kept
            "display(J(90000), J(90000), J(90000))"  # past the cell's: the last left out, and said
        )
        texts = [x.data.get("text/plain") for x in r.results]
        assert texts[:3] == ["J(150000)", "J(90000)", "J(90000)"] and "application/json" not in r.results[0].data, texts
        assert [len(x.data["application/json"]) for x in r.results[1:3]] == [90000, 90000]
        assert "result(s) left out" in str(texts[-1]) and "J(90000)" not in texts[3:], texts


def test_an_exception_whose_class_lies_about_its_name_is_still_the_cells_exception(sb: Sandbox) -> None:
    # Its reply could not be made: the interpreter ended, and the cell read as a success.
    with sb.interpreter("liar") as py:
        r = py.run(
            "class Meta(type):\n    @property\n    def __name__(cls): return object()\n"
            "class Liar(Exception, metaclass=Meta): pass\n"
            "class Odd(str):\n    def __getitem__(self, i): raise TypeError('no')\n"
            "class Said(Exception):\n    def __str__(self): return Odd('odd')\n"
            "try:\n    raise Said()\nexcept Said:\n    pass\n"
            "raise Liar('x')"
        )
        assert not r.success and r.exception is not None and r.exception.name == "Liar", r
        said = py.run("raise Said()")
        assert said.exception is not None and (said.exception.name, said.exception.value) == ("Said", "odd"), said
        assert [x.text for x in py.run("'kept'").results] == ["'kept'"]  # the same interpreter


def test_sessions_are_python_only_and_read_no_stdin(sb: Sandbox) -> None:
    with pytest.raises(InvalidRequestError, match="session runs Python"):
        sb.run_code("echo hi", "bash", session="s")
    with pytest.raises(InvalidRequestError, match="no stdin"):
        sb.run_code("input()", stdin="x", session="s")
    for name in ("", "x" * 65, "bad\nname"):  # refused before anything is sent, by the sandbox's own error
        with pytest.raises(InvalidRequestError, match="session must be a name of 1 to 64 printable characters"):
            sb.run_code("1", session=name)
    with pytest.raises(InvalidRequestError, match=r"printable characters, not 123 \(int\)$"):
        sb.run_code("1", session=123)  # type: ignore[arg-type]
    assert sb.run_code("print(2)").stdout == "2\n"


def test_a_timeout_while_a_result_is_shown_interrupts_it_and_keeps_the_state(sb: Sandbox) -> None:
    # A value's __repr__ and an exception's __str__ are the cell's code too: an interrupt that found
    # them uninterruptible ended the interpreter (its state lost).
    with sb.interpreter("showing") as py:
        py.run(
            "import time\nkept = 'yes'\nclass Slow:\n    def __repr__(self):\n        time.sleep(60)\n"
            "class Raised(Exception):\n    def __str__(self):\n        time.sleep(60)\n        return 'never'\n"
        )
        for cell in ("Slow()", "raise Raised()"):
            r = py.run(cell, timeout=1)
            assert r.termination_reason == "timeout" and r.exception is not None, r
            assert r.exception.name == "KeyboardInterrupt" and "/.stockade/" not in r.exception.traceback, r
            assert r.error is not None and "keeps its state" in r.error, r
        after = py.run("kept")
        assert [x.text for x in after.results] == ["'yes'"] and after.execution_count == 4, after


def test_an_interrupt_between_cells_keeps_the_state_whatever_threads_the_cell_left(sb: Sandbox) -> None:
    # The kernel may give a process's SIGINT to any thread that takes it: a mask on the main
    # thread alone let a cell's thread take it, and the next cell's read ended the interpreter.
    with sb.interpreter("threads") as py:
        pid = (
            py.run(
                "import os, threading\nkept = 'yes'\n"
                "threading.Thread(target=threading.Event().wait, daemon=True).start()\nos.getpid()"
            )
            .results[0]
            .text
        )
        assert sb.exec(["kill", "-INT", pid]).exit_code == 0
        late = py.run("kept")  # it came between cells: this cell's, as one sent as it is handed over
        assert late.exception is not None and late.exception.name == "KeyboardInterrupt", late
        after = py.run("kept")
        assert [x.text for x in after.results] == ["'yes'"] and after.execution_count == 3, after


def test_many_results_are_left_out_at_once_their_value_kept_and_said(sb: Sandbox) -> None:
    # Cut one at a time, each cut measured the whole reply again: 50,000 displays took past a minute,
    # the interpreter was killed at its timeout; and results past 1,000 went unsaid, the value too.
    with sb.interpreter("many") as py:
        r = py.run("for i in range(20000):\n    display(i)\n'THE ANSWER'", timeout=50)
        assert r.termination_reason == "completed" and len(r.results) == 1000, r.termination_reason
        assert [x.text for x in r.results[:3]] == ["0", "1", "2"]
        assert (r.results[-2].kind, r.results[-2].text) == ("execute_result", "'THE ANSWER'")
        assert r.results[-1].text is not None and r.results[-1].text.startswith("[19002 result(s) left out")
        bundle = py.run(  # past the host's MIME types a result: the cell's results were all dropped
            "class Many:\n    def _repr_mimebundle_(self, **kw):\n"
            "        return {f'text/x-{i}': str(i) for i in range(40)}\nMany()"
        )
        assert len(bundle.results) == 1 and len(bundle.results[0].data) == 32, bundle.results
        assert bundle.results[0].data["text/plain"].startswith("<__main__.Many object")


def test_a_cells_exit_code_is_its_own_whatever_its_int_does(sb: Sandbox) -> None:
    with sb.interpreter("exit") as py:
        py.run("kept = 'yes'")
        r = py.run("class Code(int):\n    def __and__(self, other): raise ValueError('no')\nraise SystemExit(Code(3))")
        assert (r.exit_code, r.exception and r.exception.name) == (3, "SystemExit"), r
        assert [x.text for x in py.run("kept").results] == ["'yes'"]


def test_a_process_a_cell_forks_ends_at_the_cells_end_as_a_scripts_child_does(sb: Sandbox) -> None:
    # The child went back to the interpreter's loop: it answered for the cell (the parent's wait
    # never ended) and then read every later cell itself.
    with sb.interpreter("forks") as py:
        py.run("import os, time\nstate = 'kept'\nme = os.getpid()")
        r = py.run(
            "pid = os.fork()\nif pid == 0:\n    print('child')\nelse:\n    os.waitpid(pid, 0)\n    print('parent done')"
        )
        assert r.success and sorted(r.stdout.splitlines()) == ["child", "parent done"], r
        failing = py.run("pid = os.fork()\nif pid == 0:\n    raise ValueError('in the child')\n"
                         "print('exit', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")  # fmt: skip
        assert failing.success and failing.stdout == "exit 1\n", failing  # its error is its own, on stderr
        assert "ValueError: in the child" in failing.stderr
        exiting = py.run("pid = os.fork()\nif pid == 0:\n    raise SystemExit(7)\n"
                         "print('exit', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")  # fmt: skip
        assert exiting.stdout == "exit 7\n", exiting
        # Below the interpreter's own children, descriptors 3 and 4 are theirs: a grandchild writes its
        # parent's file there (the first fix closed them in every process a cell's process forked).
        nested = py.run(
            "pid = os.fork()\nif pid == 0:\n    f = open('/tmp/nested.txt', 'w')\n    inner = os.fork()\n"
            "    if inner == 0:\n        f.write('from the grandchild')\n        f.close()\n        os._exit(0)\n"
            "    os.waitpid(inner, 0)\n    os._exit(0)\nos.waitpid(pid, 0)\nprint(open('/tmp/nested.txt').read())"
        )
        assert nested.stdout == "from the grandchild\n", nested
        after = py.run("state, os.getpid() == me")
        assert [x.text for x in after.results] == ["('kept', True)"], after  # the interpreter answers, not a child


def test_a_module_named_as_the_standard_librarys_in_the_working_directory_breaks_no_cell(sb: Sandbox) -> None:
    # The interpreter imported inspect, tokenize and asyncio for itself from the cells' path, which
    # begins with their working directory: a data script named tokenize.py broke every cell, restarts too.
    names = ("inspect", "tokenize", "asyncio", "io")
    with sb.interpreter("shadowed") as py:
        workdir = py.run("import os\nos.getcwd()").results[0].text.strip("'")  # where an interpreter starts
        try:
            for name in names:
                sb.write_file(f"{workdir}/{name}.py", "raise RuntimeError('not the standard library')\n")
            py.restart()  # a fresh interpreter, started there
            r = py.run("import sys\nsys.path.insert(1, '.')\nx = 41\nx + 1;")  # "." too, not only ""
            assert r.success and r.results == [], r  # the semicolon read by tokenize
            awaited = py.run("async def answer():\n    return x + 1\nawait answer()")
            assert [v.text for v in awaited.results] == ["42"], awaited
        finally:
            sb.exec(["rm", "-f", *(f"{workdir}/{name}.py" for name in names)])  # the module's tests share its sandbox


def test_a_forged_reply_cannot_make_a_cell_read_as_killed_by_a_limit(sb: Sandbox) -> None:
    # A negative exit code is a signal's death: -24 read as cpu_limit, -25 as a file past its limit.
    forge = (
        "import json, os, struct, sys\nf = sys._getframe()\nwhile 'cell' not in f.f_locals:\n    f = f.f_back\n"
        "body = json.dumps({'execution_count': 1, 'exception': {'name': 'X', 'value': '', 'traceback': '',"
        " 'exit_code': -24}, 'nonce': f.f_locals['cell']['nonce']}).encode()\n"
        "os.write(4, struct.pack('<I', len(body)) + body)\nos.dup2(os.open('/dev/null', os.O_WRONLY), 4)\n"
    )
    with sb.interpreter("forged-code") as py:
        r = py.run(forge)
        assert r.exit_code == 1 and r.termination_reason != "cpu_limit" and not r.limits_reached, r


def test_a_cells_output_and_results_together_stay_within_one_answer(manager: RuntimeManager) -> None:
    # With 7 MiB of output (9.3 MiB as base64), 5 MiB of results passed the agent's 10 MiB frame:
    # the whole cell came back as an error, its output lost with it.
    require("process")
    policy = Policy(runtime="process", timeout_seconds=60, max_output_bytes=7 << 20, memory_mb=512)
    with Sandbox(policy, manager=manager) as big, big.interpreter("big") as py:
        r = py.run(
            "import sys\nsys.stdout.write('a' * (6 << 20))\n"
            "class H:\n    def _repr_html_(self): return 'h' * (5 << 20)\n    def __repr__(self): return 'H'\nH()"
        )
        assert r.success and len(r.stdout) == 6 << 20, r.error
        note = r.results[-1].text
        assert note is not None and "an answer is limited to 10485760 bytes" in note, r.results
        # An exception's text is cut too (64 Ki characters, up to 12 bytes each as JSON writes them).
        raised = py.run("import sys\nsys.stdout.write('a' * (7 << 20))\nraise ValueError('\\u00e9' * 70000)")
        assert len(raised.stdout) == 7 << 20 and raised.exception is not None, raised.error
        assert raised.exception.name == "ValueError" and raised.exception.value == "\u00e9" * 1024
        named = py.run("import sys\nsys.stdout.write('a' * (7 << 20))\nraise type('E' * (3 << 20), (Exception,), {})()")
        assert len(named.stdout) == 7 << 20 and named.exception is not None, named.error
        assert named.exception.name == "E" * 1024, named.exception.name[:80]
        assert [x.text for x in py.run("'kept'").results] == ["'kept'"]


def _interrupt_between_cells(sb: Sandbox, py: Interpreter, tag: str) -> None:
    """A SIGINT to ``py``'s interpreter from a thread its cell left, sent once that cell has ended."""
    go, sent = f"{sb.scratch_dir}/{tag}-go", f"{sb.scratch_dir}/{tag}-sent"
    py.run(
        "import os, signal, threading, time\n"
        "def interrupt(go, sent):\n    while not os.path.exists(go):\n        time.sleep(0.01)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n    open(sent, 'w').close()\n"
        f"threading.Thread(target=interrupt, args=({go!r}, {sent!r}), daemon=True).start()"
    )
    _go_and_wait(sb, go, sent, "the cell's thread never sent its interrupt")


def _go_and_wait(sb: Sandbox, go: str, done: str, never: str) -> None:
    """Make the file ``go`` in ``sb``, which a cell's thread waits for, then wait for it to make ``done``."""
    sb.write_file(go, b"")
    deadline = time.monotonic() + 60
    while sb.exec(["test", "-e", done]).exit_code != 0:
        assert time.monotonic() < deadline, never
        time.sleep(0.05)


def test_a_cells_own_interrupt_handler_is_the_cells_and_cannot_end_the_interpreter_between_cells(
    sb: Sandbox,
) -> None:
    # default_int_handler set by a cell raised between cells (the reply's write, the next cell's
    # read), where nothing catches it: the interpreter ended, its state lost. An interrupt that
    # comes between cells is the next cell's, as the cells' own handler takes it.
    with sb.interpreter("handler") as py:
        py.run("import signal\nkept = 'yes'\nsignal.signal(signal.SIGINT, signal.default_int_handler)")
        _interrupt_between_cells(sb, py, "default")
        late = py.run("kept")
        assert late.exception is not None and late.exception.name == "KeyboardInterrupt", late
        after = py.run("kept, signal.getsignal(signal.SIGINT) is signal.default_int_handler")
        assert [x.text for x in after.results] == ["('yes', True)"], after
        py.run("heard = []\nsignal.signal(signal.SIGINT, lambda *_: heard.append(1))")  # its own handler
        _interrupt_between_cells(sb, py, "own")
        assert [x.text for x in py.run("kept, heard").results] == ["('yes', [1])"]
        py.run("signal.signal(signal.SIGINT, signal.SIG_IGN)")  # ignored
        _interrupt_between_cells(sb, py, "ignored")
        ignored = py.run("kept")
        assert [x.text for x in ignored.results] == ["'yes'"] and ignored.exception is None, ignored
        py.run("signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})")  # a mask of its own carries on
        masked = py.run("signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())")
        assert [x.text for x in masked.results] == ["True"], masked


def test_an_interrupt_disposition_set_from_c_is_left_in_place(sb: Sandbox) -> None:
    # A library that sets SIGINT's handler from C (an embedded runtime): Python's signal module
    # does not see it, and swapping in the interpreter's own between cells threw it away.
    with sb.interpreter("from-c") as py:
        py.run("import ctypes, os, signal\nctypes.CDLL(None).signal(signal.SIGINT, ctypes.c_void_p(1))")  # SIG_IGN
        survived = py.run("os.kill(os.getpid(), signal.SIGINT)\n'survived'")
        assert [x.text for x in survived.results] == ["'survived'"], survived


# A program that sends SIGINT to the pid it is given, as fast as it can, for 1.5 s.
FLOOD = (
    "import os, sys, time\nend = time.monotonic() + 1.5\n"
    "while time.monotonic() < end:\n    os.kill(int(sys.argv[1]), 2)"
)


def test_a_flood_of_interrupts_ends_cells_not_their_interpreter(sb: Sandbox) -> None:
    # With default_int_handler set by a cell, a burst of SIGINTs (a host's interrupt frames, a
    # thread's) found it in place between cells, where its KeyboardInterrupt ended the interpreter.
    with sb.interpreter("flood") as py:
        py.run("import os, signal, subprocess, sys\nkept = 'yes'")
        py.run("signal.signal(signal.SIGINT, signal.default_int_handler)")
        py.run(f"flood = subprocess.Popen([sys.executable, '-c', {FLOOD!r}, str(os.getpid())])")
        for _ in range(10):  # cells in the flood: each may be interrupted, none ends the interpreter
            py.run("1")
        deadline = time.monotonic() + 60
        while [x.text for x in py.run("flood.poll()").results] != ["0"]:  # until the flood has ended
            assert time.monotonic() < deadline, "the flood never ended"
            time.sleep(0.1)
        after = py.run("kept")
        assert [x.text for x in after.results] == ["'yes'"] and after.execution_count > 13, after


def test_an_event_loops_interrupt_handler_hears_an_interrupt_between_cells_once(sb: Sandbox) -> None:
    with sb.interpreter("loop-handler") as py:
        py.run(
            "import asyncio, signal\nheard = []\nawait asyncio.sleep(0)\n"
            "asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: heard.append(1))"
        )  # (a last expression too is taken in the cell's coroutine, the loop running)
        _interrupt_between_cells(sb, py, "loop")
        heard = py.run("await asyncio.sleep(0.2)\nheard")
        assert [x.text for x in heard.results] == ["[1]"] and heard.exception is None, heard


def test_interrupt_dispositions_a_cell_sets_hold_as_in_python(sb: Sandbox) -> None:
    with sb.interpreter("dispositions") as py:
        py.run("import _thread, os, signal, subprocess, sys, threading, time")
        # An ignore is the process's own: a program the cell starts inherits it.
        survived = py.run(
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "subprocess.run(['sh', '-c', 'kill -INT $$; echo survived'], capture_output=True).stdout"
        )
        assert [x.text for x in survived.results] == ["b'survived\\n'"], survived
        # With SIG_DFL, interrupt_main does nothing (as Python's since 3.10): it ended the interpreter.
        quiet = py.run("signal.signal(signal.SIGINT, signal.SIG_DFL)\n_thread.interrupt_main()\ntime.sleep(0.1)\n'ok'")
        assert [x.text for x in quiet.results] == ["'ok'"] and quiet.execution_count == 3, quiet
        # A refusal names the cell's own frames only.
        refused = py.run("signal.signal(signal.SIGINT, None)")
        assert refused.exception is not None and refused.exception.name == "TypeError", refused
        assert "/.stockade/" not in refused.exception.traceback, refused.exception.traceback
        py.run("signal.signal(signal.SIGINT, signal.default_int_handler)")
        # A process a cell's thread forks between cells is interrupted as any Python program is.
        go, forked = f"{sb.scratch_dir}/fork-go", f"{sb.scratch_dir}/fork-pid"
        py.run(
            "def fork_later(go, forked):\n    while not os.path.exists(go):\n        time.sleep(0.01)\n"
            "    pid = os.fork()\n    if pid == 0:\n        try:\n            time.sleep(30)\n"
            "        except KeyboardInterrupt:\n            os._exit(7)\n        os._exit(0)\n"
            "    with open(forked + '.tmp', 'w') as f:\n        f.write(str(pid))\n"
            "    os.rename(forked + '.tmp', forked)\n"
            f"threading.Thread(target=fork_later, args=({go!r}, {forked!r}), daemon=True).start()"
        )
        _go_and_wait(sb, go, forked, "the cell's thread never forked")
        child = py.run(
            f"pid = int(open({forked!r}).read())\ntime.sleep(0.5)\nos.kill(pid, signal.SIGINT)\n"
            "os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])"
        )
        assert [x.text for x in child.results] == ["7"], child
