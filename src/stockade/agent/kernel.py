"""A stateful Python interpreter in the isolate: cells run one after another in one namespace.

Stdlib-only, no Jupyter: a forked runner (``start``) that reads cells from a
pipe and answers each with a frame holding its ``execution_count``, its
``outputs`` (the last expression's value, what ``display()`` showed, and the
matplotlib figures the cell left open, each a MIME bundle as IPython's
display protocol has it: ``_repr_html_``, ``_repr_png_``, ...) and its
``exception`` (name, value, and a traceback of the cell's own frames); the
results, and the bounds of the reply that carries them, are display.py's.
stdout and stderr go to pipes the agent reads as for any run.

SIGINT interrupts the cell that runs (KeyboardInterrupt), showing its results
included, and nothing else. The interpreter's own handler stays in place: a
function a cell sets for SIGINT is kept by the kernel and called only while a
cell runs (``getsignal`` says it), so that between cells, where a handler's
exception would end the interpreter, none of the cell's runs (``SIG_IGN`` and
``SIG_DFL`` are set as they are: no code runs for them). There the main
thread also blocks SIGINT; one the kernel gives to a thread a cell left running
is only noted, and one that arrived late is discarded before the next cell, so
the namespace survives an interrupt.

The agent treats the reply as untrusted, as everything from inside: the cell
can write to the reply pipe too.
"""

from __future__ import annotations

import os
import sys

from . import display, jsoncodec, runner, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any
else:
    import _signal as signal

# What matplotlib's Agg backend says when a cell calls plt.show(): the figure is shown anyway.
_SHOW_WARNING = r"(FigureCanvasAgg is non-interactive|Matplotlib is currently using agg)"


class Kernel:
    """The agent's handle on one interpreter: its pid and pipes (``out_r``, ``err_r``: -1 once closed,
    at their end: a cell can close its stdout, and the number is then another descriptor's)."""

    def __init__(self, pid: int, out_r: int, err_r: int, cmd_w: int, reply_r: int) -> None:
        self.pid, self.out_r, self.err_r, self.cmd_w, self.reply_r = pid, out_r, err_r, cmd_w, reply_r
        self.interrupted = False  # a SIGINT was sent during the last cell
        # The cell's own word, echoed in its reply: a reply left from a cell before, or one a program
        # the cell started wrote, is not the answer to the cell just sent (sessions.py then ends the
        # interpreter). The cell itself can read it: what a session's cells say is theirs to say.
        self.nonce = ""

    def output_fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.out_r, self.err_r) if fd >= 0)

    def outputs_left(self, still_open: set[int]) -> None:
        """After a cell: those of its output pipes that reached their end were closed."""
        self.out_r = self.out_r if self.out_r in still_open else -1
        self.err_r = self.err_r if self.err_r in still_open else -1


def start(env: dict[str, str], cwd: str, limits: dict[str, Any], forget: Callable[[], None]) -> Kernel:
    """Fork an interpreter (in the agent); OSError when the fork fails."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
    reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            forget()
            # No input (input() raises EOFError); 3 and 4 not inherited: what a cell starts must
            # not read the next cells or forge replies.
            runner.settle_child(os.open("/dev/null", os.O_RDONLY), out_w, err_w, cmd_r, reply_w)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            runner.apply_rlimits(limits)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            os.environ.setdefault("MPLBACKEND", "Agg")
            _own_modules()  # before the cells' path: theirs begins with their working directory
            main = runner.become_main()
        except BaseException:  # noqa: BLE001
            os._exit(126)
        try:
            _serve(main.__dict__)
        finally:  # nothing of the agent's below this frame runs in the interpreter: it only ends
            os._exit(70)
    for fd in (out_w, err_w, cmd_r, reply_w):
        os.close(fd)
    # All four non-blocking: the agent writes the cell as the interpreter takes it, from the loop
    # that waits for its reply, so that a stopped interpreter (SIGSTOP, by something of the same
    # uid) is interrupted at the timeout, then killed, like any other.
    for fd in (out_r, err_r, cmd_w, reply_r):
        os.set_blocking(fd, False)
    return Kernel(pid, out_r, err_r, cmd_w, reply_r)


def cell_frame(kernel: Kernel, code: str) -> bytes:
    """The frame that hands ``code`` to the interpreter."""
    # A SIGINT the agent sent the last cell may have come after that cell ended (it is then
    # pending, blocked): the interpreter drops it before this cell, and only then.
    kernel.nonce = os.urandom(16).hex()
    cell = {"code": code, "drop_interrupt": kernel.interrupted, "nonce": kernel.nonce}
    kernel.interrupted = False
    return wire.encode_frame(jsoncodec.dumps(cell).encode())


# ---- inside the interpreter -------------------------------------------------------------


def _own_modules() -> None:
    """The standard library's modules the interpreter uses, loaded from the agent's path: once the
    cells' path begins with their working directory, a cell's ``inspect.py`` or ``tokenize.py``
    there (a data script's name) would be taken for them and break every cell, restarts included.
    Loaded now too, not when a cell fails or is interrupted: an interrupted cell's account then
    comes at once (its grace before a kill is short), whatever the isolate's speed."""
    global _own_path
    import ast
    import io
    import linecache
    import tokenize
    import traceback
    import warnings

    del ast, io, linecache, tokenize, traceback, warnings
    _own_path = sys.path[:]  # for what is imported later (_own_import)


_own_path: list[str] = []  # the agent's module path, before the cells' (their directory first)


def _serve(namespace: dict[str, Any]) -> None:
    """The interpreter's loop; never returns."""
    import warnings

    interpreter = os.getpid()
    warnings.filterwarnings("ignore", message=_SHOW_WARNING)
    # A cell's output comes as it is printed, line by line, as a notebook's does (run_code's too
    # when streamed): a cell that prints and sleeps is watched, not heard from at its end.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    _set_handler(signal.SIGINT, _on_interrupt)  # blocked since the fork (start) until a cell runs
    signal.signal, signal.getsignal = _cells_signal, _cells_getsignal  # the signal module's too: it calls these
    os.register_at_fork(after_in_child=_as_cells_set_it)
    results = display.Results()
    namespace["display"] = results.display
    count = 0
    while True:
        try:
            header = _read_exact(3, wire.HEADER_SIZE)
            cell = jsoncodec.loads(_read_exact(3, wire.frame_length(header)))
        except (EOFError, OSError, ValueError):
            _end(namespace)
        count += 1
        results.clear()
        if cell.get("drop_interrupt") is True:
            while signal.sigtimedwait({signal.SIGINT}, 0) is not None:  # blocked, waiting for the main thread
                pass
            _heed_signals()  # one a thread took, noted by the C handler only: its Python handler first
            _interrupt.waiting = False
        exception = _run_cell(str(cell.get("code", "")), f"<cell-{count}>", namespace, results)
        if os.getpid() != interpreter:
            # A process the cell forked, at the cell's end: it ends as a script's child would (its
            # exception said on stderr), and neither answers for the cell nor reads the next one.
            _end(namespace, exception)
        reply = {"execution_count": count, "exception": exception, "nonce": cell.get("nonce")}
        try:
            wire.write_all(4, display.bounded_frame(reply, results))
        except OSError:
            _end(namespace)


class _Interrupt:
    """Whether a cell runs (SIGINT is the cell's then), whether one came while none did, and what
    the cells left of SIGINT for the next cell: their handler, and whether they block it."""

    running = False
    waiting = False
    cells_handler: Any = signal.default_int_handler
    cells_block: bool | None = None


_interrupt = _Interrupt()
_set_handler, _get_handler = signal.signal, signal.getsignal  # the originals, before the cells' replace them


def _on_interrupt(signum: int, frame: Any) -> None:
    """SIGINT, the interpreter's only handler: Python runs it in the main thread, whichever thread
    the kernel gave the signal to. In a cell, what the cells' handler says; between cells, noted."""
    if not _interrupt.running:
        _interrupt.waiting = True
        return
    handler = _interrupt.cells_handler
    if isinstance(handler, int) and handler == signal.SIG_IGN:
        return
    if isinstance(handler, int) and handler == signal.SIG_DFL:  # as asked: the interpreter ends, as a program would
        _set_handler(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
        return
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, frame)
        return
    raise KeyboardInterrupt


def _cells_signal(signalnum: int, handler: Any) -> Any:
    """``signal.signal`` in the interpreter: a SIGINT function is kept for the cells (``_on_interrupt``
    calls it), ``SIG_IGN`` and ``SIG_DFL`` set as they are (no handler of the cells' runs then, and
    programs started inherit an ignore); every other signal's handler set as it would be."""
    _get_handler(signalnum)  # Python's own refusal of what is no signal number
    if signalnum != signal.SIGINT:
        return _set_handler(signalnum, handler)
    _set_handler(signal.SIGINT, _on_interrupt)  # Python's own checks: the main thread only; pending handlers run
    plain = isinstance(handler, int) and handler in (signal.SIG_IGN, signal.SIG_DFL)
    if not callable(handler) and not plain:
        raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
    previous, _interrupt.cells_handler = _interrupt.cells_handler, handler
    if plain:
        _set_handler(signal.SIGINT, handler)
    return previous


def _cells_getsignal(signalnum: int) -> Any:
    _get_handler(signalnum)  # Python's own refusal of what is no signal number
    return _interrupt.cells_handler if signalnum == signal.SIGINT else _get_handler(signalnum)


def _as_cells_set_it() -> None:
    """In a process a cell forks: SIGINT as the cells set it, and Python's own signal functions (no
    cell of this interpreter's runs there, and none ends between cells); and none of the pipes the
    cells come on and are answered on, which are the interpreter's alone."""
    global _pipes_closed
    signal.signal, signal.getsignal = _set_handler, _get_handler
    _set_handler(signal.SIGINT, _interrupt.cells_handler)
    if not _pipes_closed:  # only in the interpreter's own children: below them, 3 and 4 are theirs
        _pipes_closed = True  # (inherited by what they fork)
        for fd in (3, 4):
            try:
                os.close(fd)
            except OSError:
                pass


_pipes_closed = False  # in a process a cell forked: the interpreter's pipes, closed


def _heed_signals() -> None:
    """Nothing: a call lets CPython run the handlers of signals already caught."""


def _cells_turn() -> None:
    """SIGINT let through as the cells left its mask; one that came for this cell while none ran
    (noted by the handler) is this cell's, as its handler says."""
    blocked, _interrupt.cells_block = _interrupt.cells_block, None
    if not blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if _interrupt.waiting:
        _interrupt.waiting = False
        _on_interrupt(signal.SIGINT, None)


def _interpreters_turn() -> None:
    """SIGINT blocked on the main thread until the next cell (its mask as the cell left it, kept).
    A handler runs here only as the interpreter's: it notes, it does not raise."""
    if _interrupt.cells_block is None:
        _interrupt.cells_block = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())  # read only
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _run_cell(code: str, filename: str, namespace: dict[str, Any], results: display.Results) -> Any:
    """Run one cell and show its results; its exception as ``{name, value, traceback}``, or None.
    Interruptible to its end: a value's ``__repr__``, an exception's ``__str__`` and the figures
    are the cell's code too, and an interrupt that found them uninterruptible ended the interpreter."""
    import linecache

    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # source lines in tracebacks
    exception, failed = None, None
    _interrupt.running = True
    try:
        exception = _evaluate(code, filename, namespace, results)
        results.outputs.extend(display.figures(display.MAX_CELL_RESULTS - 1 - len(results.outputs), results))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # before the reply: the agent has the cell's output when it reads it
            except Exception:  # noqa: BLE001, S112
                continue
    except BaseException as exc:  # noqa: BLE001 - outside the cell's own code (its results shown): said below
        failed = exc  # no call here: a SIGINT is still the cell's
    finally:
        _interrupt.running = False  # no call before it: a signal's handler runs only at a call
        _interpreters_turn()
    if failed is not None:
        name = _TYPE_NAME.__get__(type(failed), type)[:1024]
        said = "interrupted" if isinstance(failed, KeyboardInterrupt) else "failed"
        return {"name": name, "value": "", "traceback": f"{name} (outside the cell's code, as it began or its "
                f"results were shown: {said})\n"}  # fmt: skip
    return exception


def _evaluate(code: str, filename: str, namespace: dict[str, Any], results: display.Results) -> Any:
    import ast

    # A notebook's: ``await`` at the top of a cell, its coroutine run on the interpreter's own loop.
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        _cells_turn()
        tree = ast.parse(code, filename)
        shows = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)  # the last expression's value is the result
        if shows:
            # Kept by the cell's own code, so that it is taken where the rest runs (in the cell's
            # coroutine, when it awaits: its loop running, as in a notebook).
            last = tree.body[-1]
            assert isinstance(last, ast.Expr)
            kept = ast.Assign(targets=[ast.Name(id=_VALUE, ctx=ast.Store())], value=last.value)
            tree.body[-1] = ast.copy_location(kept, last)
            ast.fix_missing_locations(tree)
        namespace.pop(_VALUE, None)
        try:
            code_object = compile(tree, filename, "exec", flags, dont_inherit=True)
        except SyntaxError as found:
            # One the compiler finds (``return`` outside a function), not the parser, carries no
            # source line (it reads one only from a file): the cell's own, as a script's is shown.
            lines = code.splitlines()
            if found.text is None and isinstance(found.lineno, int) and 0 < found.lineno <= len(lines):
                found.text = lines[found.lineno - 1] + "\n"
            raise
        _run(code_object, namespace)
        value = namespace.pop(_VALUE, None)
        if shows and _ends_quietly(code):
            value = None  # a notebook's "x;": the value is not shown
        if value is not None:
            namespace["_"] = value
            results.outputs.append(display.output("execute_result", value))
        return None
    except BaseException as exc:  # noqa: BLE001 - every exception of the cell is its result, SystemExit too
        return _exception(exc, filename)


_VALUE = "__stockade_cell_value__"  # where a cell's code leaves its last expression's value
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE: code compiled with a top-level await
_loop: Any = None  # the interpreter's event loop, made at its first awaiting cell: tasks outlive a cell


def _run(code: Any, namespace: dict[str, Any]) -> Any:
    """What a cell's ``code`` gives: run to its end on the interpreter's loop when it awaits at its
    top (the compiler marks such code a coroutine's); a coroutine the cell only names, as its value."""
    result = eval(code, namespace)  # noqa: S307 - inside the isolate, by design
    if not code.co_flags & _CO_COROUTINE:
        return result
    global _loop
    asyncio = _own_import("asyncio")

    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    task = _loop.create_task(result)
    try:
        return _loop.run_until_complete(task)
    except BaseException:
        # Interrupted: ended at the loop's next turn, not left to resume in a later cell, and its
        # end taken, so that no "exception never retrieved" is said in a later cell's output.
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise


def _ends_quietly(code: str) -> bool:
    """Whether the cell's last token is ``;``, which hides its value in a notebook."""
    import io
    import tokenize

    quiet = False
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT)
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type not in skipped:
                quiet = token.string == ";"
    except (tokenize.TokenError, SyntaxError):
        return False
    return quiet


def _exception(exc: BaseException, filename: str) -> dict[str, str]:
    import traceback

    tb = _cells_own(exc.__traceback__)
    # Each as plain text, whatever the cell's classes make of __name__, __str__ and slicing: the
    # reply must be made, or the interpreter ends and the cell reads as a success.
    name = _TYPE_NAME.__get__(type(exc), type)
    try:
        value = _plain(str(exc))
    except Exception:  # noqa: BLE001
        value = f"<{name}: str() failed>"
    try:
        lines = "".join(_plain(line) for line in traceback.format_exception(type(exc), exc, tb))
    except Exception:  # noqa: BLE001
        lines = f"{name}: {value}\n"
    said: dict[str, Any] = {
        "name": name[:1024],  # a class may be named anything, at any length
        "value": value[: display.TEXT_MAX],
        "traceback": lines[-display.TEXT_MAX :],
    }
    if isinstance(exc, SystemExit):  # the cell's exit code, as a script's would be (the agent takes it out)
        code = exc.code
        said["exit_code"] = 0 if code is None else (int.__and__(code, 0xFF) if isinstance(code, int) else 1)
        if code is not None and not isinstance(code, int):
            try:
                print(code, file=sys.stderr)  # sys.exit("why") says why, as a script's does
            except Exception:  # noqa: BLE001, S110 - a closed stderr, a __str__ that raises: the cell's result stands
                pass
    return said


def _cells_own(tb: Any) -> Any:
    """``tb`` from the cell's first frame on, without the interpreter's own frames (``_OWN_CODE``)."""
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
        tb = tb.tb_next
    entries, entry = [], tb
    while entry is not None:
        entries.append(entry)
        entry = entry.tb_next
    kept = [e for e in entries if e.tb_frame.f_code not in _OWN_CODE]
    if len(kept) == len(entries):
        return tb
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = type(entry)(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt


# The interpreter's own frames a cell's traceback may pass through: not the cell's to be shown.
_OWN_CODE = frozenset(f.__code__ for f in (_on_interrupt, _cells_signal, _cells_getsignal))
_TYPE_NAME = type.__dict__["__name__"]  # a class's own name, past a metaclass's __name__ property


def _plain(text: Any) -> str:
    """``text`` as an exact ``str`` (a subclass's slicing or encoding may do anything)."""
    if not isinstance(text, str):
        raise TypeError("not text")
    return str.__str__(text)


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _own_import(name: str) -> Any:
    """A module of the standard library's that the interpreter needs only now and then (asyncio,
    for a cell that awaits), imported without the cells' working directory on the path."""
    if name not in sys.modules:
        cells_path = sys.path[:]
        try:
            sys.path[:] = _own_path  # not the cells' (their directory, "." or PYTHONPATH's entries)
            __import__(name)
        finally:
            sys.path[:] = cells_path
    return sys.modules[name]


def _end(namespace: dict[str, Any], exception: dict[str, Any] | None = None) -> None:
    """End as a program ends (threads, atexit, open files flushed); never returns. The session
    closed (no ``exception``), or a process a cell forked came to the cell's end: its exception
    said as a script's on stderr, its exit status 1 (or SystemExit's)."""
    ending: BaseException | None = None
    if exception is not None:
        status = exception.get("exit_code")
        if not isinstance(status, int):
            status = 1
            try:
                sys.stderr.write(str(exception.get("traceback", "")))
            except Exception:  # noqa: BLE001, S110 - a closed stderr: the status still says it
                pass
        ending = SystemExit(status)
    runner.Program(compile("", runner.PROGRAM_FILE, "exec", dont_inherit=True), namespace).end(ending)
