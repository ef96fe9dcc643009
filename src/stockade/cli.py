"""The ``stockade`` command line.

    stockade run [policy flags] [--json] -- CMD ARGS...
    stockade exec-code [--language python|bash] [policy flags] [--json] (CODE | -f FILE | -)
    stockade doctor [--json]
    stockade start --name NAME [--restart no|on-failure|always] [--max-restarts N] [--stdin] [policy flags] -- CMD...
    stockade status [NAME] | ps | logs [-f] NAME | stop NAME... | rm [--force] NAME...
    stockade exec [-i] NAME -- CMD ARGS... | attach NAME
    stockade serve [--socket PATH] [--token-file F] [--http [HOST:PORT]] [--api-token-file F] [--no-socket]
                   [--placement local|ray] [--ray-address HOST:PORT]
    stockade daemon ping|selftest|status|runtimes [--socket PATH] [--token-file F]
    stockade image build [--force] [--no-snapshot]
    stockade token new [--file F]
    stockade audit verify FILE...

With ``--socket`` (or ``STOCKADE_SOCKET``), run/exec-code go through the daemon,
and start-up imports neither a runtime nor pydantic (cli_daemon.py). When nothing answers on
``$STOCKADE_SOCKET`` they say so on stderr and run in-process; ``--socket PATH``
and ``--require-daemon`` make the daemon required instead.

Exit statuses and failures: cli_outcome.py. Heavy modules load only once a command needs them.
"""

from __future__ import annotations

import gc
import os
import sys

from . import cli_outcome
from .agent.wire import MAX_DATA_BYTES
from .cli_outcome import EXIT_STOCKADE_ERROR, fail, fail_for, report, stream

TYPE_CHECKING = False  # not typing's: a run through the daemon imports neither typing nor re
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, NoReturn


MAX_STDIN = MAX_DATA_BYTES  # what fits one agent frame, base64-encoded


# Fields only a run that ends acts on: a component (``start``) runs until stopped,
# supervised on this host, its output streamed to its log uncut.
_ONE_RUN_FIELDS = ("timeout_seconds", "max_output_bytes")
# Subcommands whose parser carries the Policy's flags (argparse, built from the Policy's fields).
_POLICY_COMMANDS = ("run", "exec-code", "start")
# The subcommands that run one command: cli_daemon.parse reads their flags without argparse.
_ONE_RUN_COMMANDS = ("run", "exec-code")


def _policy_flags(parser: argparse.ArgumentParser, one_run: bool = True) -> None:
    """The Policy's flags, one per field, read from the model: name, type, choices,
    default, bounds and help (``policy.CLI_FLAGS`` names the ones not called after
    their field). ``one_run`` adds what only a run that ends takes."""
    import dataclasses

    from .policy import CLI_FLAGS, Policy

    g = parser.add_argument_group("policy")
    fields = dataclasses.fields(Policy)
    parser.set_defaults(policy_fields=tuple(f.name for f in fields))  # which destinations are the Policy's
    for field in fields:
        name = field.name
        if name in _ONE_RUN_FIELDS and not one_run:
            continue
        flag, metavar = CLI_FLAGS.get(name, ("--" + name.replace("_", "-"), None))
        kind, choices, repeated = _flag_type(field.type)
        help_text = _flag_help(field, repeated)
        if repeated:
            g.add_argument(flag, dest=name, action="append", default=[], metavar=metavar, help=help_text)
        else:
            g.add_argument(flag, dest=name, type=kind, choices=choices, metavar=metavar, help=help_text)
    g.add_argument("--policy-file", metavar="FILE", help="JSON file with Policy fields (flags override it)")
    if not one_run:
        return
    parser.add_argument("--json", action="store_true", help="print the ExecResult as JSON")
    d = parser.add_argument_group("daemon")
    d.add_argument("--socket", metavar="PATH", help="run through the daemon on PATH (default: $STOCKADE_SOCKET if set)")
    d.add_argument("--token-file", metavar="FILE", help="HMAC token for the daemon (default: $STOCKADE_AUTH_TOKEN)")
    d.add_argument(
        "--require-daemon",
        action="store_true",
        help="fail (exit 125) rather than run in-process when no daemon answers on $STOCKADE_SOCKET "
        "(without it or --socket: the daemon's default socket); --socket PATH always requires its daemon",
    )


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None, bool]:
    """A field's flag as (type, choices, repeated): ``int | None`` takes an int,
    a ``Literal`` its values, a tuple or a dict one item per use of the flag."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str, [str(a) for a in args], False
    if origin in (tuple, dict):
        return str, None, True
    return (annotation if annotation in (int, float) else str), None, False


def _flag_help(field: Any, repeated: bool = False) -> str:
    """A field's description, default and bounds (a Policy field's metadata), as its flag's help."""
    import dataclasses

    parts = [field.metadata.get("description", "")]
    if repeated:
        parts.append("repeatable")
    if field.default not in (None, (), dataclasses.MISSING):
        parts.append(f"default {field.default:g}" if isinstance(field.default, float) else f"default {field.default}")
    for attr, word in (("gt", "more than"), ("ge", "at least"), ("le", "at most")):
        value = field.metadata.get(attr)
        if value is not None:
            parts.append(f"{word} {value:g}" if isinstance(value, float) else f"{word} {value}")
    return "; ".join(p for p in parts if p)


def _build_policy(args: Any) -> Any:
    import re

    from .cli_daemon import policy_fields
    from .errors import PolicyError
    from .policy import CLI_FLAGS, Policy

    fields = policy_fields(args)  # the same fields a run through the daemon sends
    try:
        return Policy.build(**fields)
    except PolicyError as exc:  # in the words the user typed: the flag (or the file), then its field
        parts = str(exc).removeprefix("invalid policy: ").split("; ")
        for i, part in enumerate(parts):
            field, sep, rest = part.partition(":")
            name = field.split(".")[0].split("[")[0]
            if not sep or " " in field:  # a problem of fields together: each it names, by its flag too
                said = part
                for named in sorted({w for w in re.findall(r"[a-z_]+", part) if w in CLI_FLAGS}):
                    # A field's name standing alone: not a part of a host, a path or a word ("packages.x.com").
                    alone = rf"(?<![\w./'@:-]){named}(?![\w./'@:-])"
                    said = re.sub(alone, f"{CLI_FLAGS[named][0]} ({named})", said, count=1)
                parts[i] = said
                continue
            if getattr(args, name, None) not in (None, []):  # a flag gave it
                if name in CLI_FLAGS:
                    parts[i] = f"{CLI_FLAGS[name][0]} ({field}):{rest}"
            elif args.policy_file:  # not a flag's, so the file's: a field it names, known or not
                parts[i] = f"--policy-file {args.policy_file} ({field}):{rest}"
        raise PolicyError("invalid policy: " + "; ".join(parts)) from None


def _read_stdin() -> bytes:
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise SystemExit(fail(f"standard input is larger than {MAX_STDIN} bytes"))
    return data


def _execute(args: Any, call: str, produce: Callable[[], tuple[Any, bytes]]) -> int:
    """Run through the daemon when one is given (cli_daemon.py), else here. ``produce``
    reads the payload and standard input, once it is known where the run goes."""
    from .cli_daemon import daemon_socket, via_daemon

    status = via_daemon(args, call, produce)
    if status is not None:
        return status
    if args.factory is None and daemon_socket(args)[0] is not None:
        # No daemon answered: the run stays here (main() closes this one too, whatever happens).
        args.factory = _early_factory(args.argv, daemon_checked=True)
    payload, stdin = produce()

    from .errors import StockadeError
    from .runtimes.manager import RuntimeManager

    try:
        policy = _build_policy(args)
    except (StockadeError, OSError, ValueError) as exc:
        return fail_for(exc)
    # A CLI process runs one command: a warm pool would only cost time here.
    manager = RuntimeManager(pool_size=0)
    if args.factory is not None:
        manager.adopt(args.factory)

    from . import sdk

    on_output = None if args.json else stream
    try:
        if call == "exec":
            result = sdk.run(payload, policy, stdin=stdin, on_output=on_output, manager=manager)
        else:
            result = sdk.run_code(payload[1], payload[0], policy, stdin=stdin, on_output=on_output, manager=manager)
    except StockadeError as exc:
        return fail_for(exc)
    finally:
        manager.close()
    return report(args, result)


# `stockade daemon cancel|close ID`: the Client method each one calls.
def _daemon_token(args: Any) -> str | None:
    """The HMAC token: from ``--token-file``, else ``$STOCKADE_AUTH_TOKEN``, else none (OSError if unreadable)."""
    if not args.token_file:
        # Read here, not through settings.py: the lean path through a daemon imports no more than it uses.
        return os.environ.get("STOCKADE_AUTH_TOKEN")
    try:
        with open(args.token_file) as f:
            token = f.read().strip()
    except OSError as exc:
        raise SystemExit(fail(f"--token-file {args.token_file}: {exc.strerror or exc}")) from None
    if not token:
        raise SystemExit(fail(f"--token-file {args.token_file}: the file is empty"))
    return token


def _early_factory(argv: list[str], daemon_checked: bool = False) -> Any:
    """Start the process runtime's isolate factory before the runtime's modules are imported (the
    CLI's largest cost): the zygote boots, and forks the isolate's spare into its cgroup, on the
    other core meanwhile (``IsolateFactory.early``). For ``run`` and ``exec-code`` on the process
    runtime, read off the raw arguments (the parser that knows the Policy's flags imports the
    Policy itself). Not when a daemon will serve the run, unless ``daemon_checked``: none
    answered, and the run stays here."""
    words = argv[: argv.index("--")] if "--" in argv else argv
    if not words or words[0] not in _ONE_RUN_COMMANDS:
        return None
    daemon = os.environ.get("STOCKADE_SOCKET") or any(w.startswith(("--socket", "--require-daemon")) for w in words)
    if (daemon and not daemon_checked) or "--trust" in words or any(w.startswith("--trust=") for w in words):
        return None
    for flag in ("--runtime", "--isolation"):
        for i, word in enumerate(words):
            value = words[i + 1] if word == flag and i + 1 < len(words) else word.partition("=")[2]
            if (word == flag or word.startswith(flag + "=")) and value != "process":
                return None
    from .errors import StockadeError
    from .paths import DEFAULT_GUEST_PYTHON
    from .runtimes.process.zygote import Zygote

    # Its interpreter read here, not through settings.py: that would import the settings first, part of
    # the cost this boot overlaps. No uid range to hold it to: its caller is this process, which keeps root.
    python = os.environ.get("STOCKADE_GUEST_PYTHON") or DEFAULT_GUEST_PYTHON
    try:
        zygote = Zygote(python, wait=False, sandbox_uids=None)
        from .runtimes.process.factory import IsolateFactory  # imported while the zygote boots

        return IsolateFactory.early(zygote)  # closes the zygote if it fails
    except (StockadeError, OSError):
        return None  # the runtime will start (and report on) its own


def cmd_run(args: Any) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return fail("run: no command given (stockade run [flags] -- CMD ARGS...)")
    return _execute(args, "exec", lambda: (argv, _read_stdin()))


def _decode_source(data: bytes, language: str, where: str) -> str:
    """Code read as bytes, decoded as ``python3 FILE`` would (PEP 263: a BOM or a coding
    cookie, else UTF-8); a shell script as UTF-8. ValueError naming ``where`` otherwise."""
    import io

    encoding = "utf-8"
    try:
        if language == "python":
            import tokenize

            encoding = tokenize.detect_encoding(io.BytesIO(data).readline)[0]
        return data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise ValueError(f"{where}: cannot read it as {encoding} text ({exc})") from None


def _stdin_code(language: str) -> tuple[str, str]:
    data = sys.stdin.buffer.read(MAX_STDIN + 1) if sys.stdin is not None else b""
    if len(data) > MAX_STDIN:
        raise SystemExit(fail(f"the code on standard input is larger than {MAX_STDIN} bytes"))
    try:
        return language, _decode_source(data, language, "the code on standard input")
    except ValueError as exc:
        raise SystemExit(fail(str(exc))) from None


def cmd_exec_code(args: Any) -> int:
    language = args.language
    if args.file and args.code is not None:  # one of them would be run, the other dropped unsaid
        return fail("exec-code: give CODE or -f FILE, not both")
    if args.file:
        try:
            with open(args.file, "rb") as f:
                code = _decode_source(f.read(), language, f"-f {args.file}")
        except OSError as exc:
            return fail(f"-f {args.file}: {exc.strerror}")
        except ValueError as exc:
            return fail(str(exc))
        return _execute(args, "run_code", lambda: ((language, code), _read_stdin()))
    if args.code == "-":
        return _execute(args, "run_code", lambda: (_stdin_code(language), b""))
    if args.code is not None:
        return _execute(args, "run_code", lambda: ((language, args.code), _read_stdin()))
    return fail("exec-code: give CODE, -f FILE or - (read code from standard input)")


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from .doctor import collect, render

    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0 if any(r["available"] and r["name"] != "fake" for r in report["runtimes"]) else 1


def build_parser(command: str = "*") -> argparse.ArgumentParser:
    """The whole command line. Only ``command``'s parser carries the Policy's flags (``*``:
    every parser's): building them imports the Policy, which the other subcommands do without."""
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse's; a usage error of a command given --json is one JSON document on stdout too,
        as its every other failure is (code ``usage``), then the usual usage and exit 2."""

        def error(self, message: str) -> NoReturn:
            if cli_outcome.json_failures:  # the command line given --json (_main)
                import json

                print(json.dumps({"error": message, "code": "usage"}))
            super().error(message)

    parser = Parser(prog="stockade", description="Run untrusted code behind real isolation.")

    def policy_flags(sub: argparse.ArgumentParser, name: str, one_run: bool = True) -> None:
        if command in ("*", name):
            _policy_flags(sub, one_run)

    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd")

    # No abbreviated flags for the commands that run something: main() reads --runtime,
    # --isolation, --trust and --socket off the raw arguments before this parser exists.
    run = sub.add_parser("run", help="run a command in a fresh isolate", allow_abbrev=False)
    policy_flags(run, "run")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(func=cmd_run)

    code = sub.add_parser("exec-code", help="run a piece of code in a fresh isolate", allow_abbrev=False)
    code.add_argument("--language", choices=["python", "bash"], default="python")
    code.add_argument("-f", "--file", help="read the code from FILE")
    policy_flags(code, "exec-code")
    code.add_argument("code", nargs="?", help="the code, or - to read it from standard input")
    code.set_defaults(func=cmd_exec_code)

    from . import cli_components

    cli_components.add_parsers(sub, lambda parser: policy_flags(parser, "start", one_run=False))

    from . import cli_service
    from .cli_env import add_parser as add_env_parser
    from .cli_k8s import add_parser as add_k8s_parser
    from .cli_mcp import add_parser as add_mcp_parser
    from .cli_ray import add_parser as add_ray_parser
    from .cli_secrets import add_parsers as add_secrets_parsers

    add_env_parser(sub)
    add_mcp_parser(sub)
    add_k8s_parser(sub)
    add_ray_parser(sub)
    add_secrets_parsers(sub)
    cli_service.add_parsers(sub)

    doctor = sub.add_parser("doctor", help="what works on this host, and why not")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The CLI needs no pydantic plugins; looking for them costs ~20 ms where a command loads pydantic.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")
    program = argv is None  # this process is the command: nothing else will run in it
    argv = sys.argv[1:] if argv is None else argv
    one_run = bool(argv) and argv[0] in _ONE_RUN_COMMANDS
    return _main(argv, program, one_run)


def entry() -> None:
    """The ``stockade`` program: ``main``, then the exit. After a run (``run``, ``exec-code``) its
    isolate, zygote and runtime are closed (``_main``'s finally) and nothing else ran here: the
    interpreter's own finalisation (module teardown, the atexit pass over managers already closed)
    would only cost the exit a few ms."""
    status = main()
    if sys.argv[1:2] and sys.argv[1] in _ONE_RUN_COMMANDS:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            os._exit(141)
        except OSError:  # a full disk, an I/O error: the output is lost, which the status must say
            os._exit(status or EXIT_STOCKADE_ERROR)
        os._exit(status)
    sys.exit(status)


def _main(argv: list[str], program: bool, one_run: bool) -> int:
    if program and one_run:
        # A process that runs one command and exits: the cyclic GC would only walk
        # the objects its imports build, while they are built and again at exit.
        gc.disable()
    # The isolate is begun before anything else is imported; whatever then happens (a parse error,
    # no command, a refused policy, ^C), the finally below ends what is left of it.
    factory = _early_factory(argv)
    args: Any = None
    try:
        if one_run:
            from .cli_daemon import parse

            args = parse(argv)  # None: argparse reads it (--help, an error), with its messages
            if args is not None:
                args.cmd, args.version = argv[0], False
                args.func = cmd_run if argv[0] == "run" else cmd_exec_code
        if args is None:
            words = argv[: argv.index("--")] if "--" in argv else argv
            cli_outcome.json_failures = "--json" in words  # a usage error said in JSON too (build_parser)
            parser = build_parser(next((w for w in argv if not w.startswith("-")), ""))
            args, extra = parser.parse_known_args(argv)
            if extra:
                _refuse_unknown(parser, args, extra)
        args.factory, args.argv = factory, argv
        cli_outcome.json_failures = bool(getattr(args, "json", False))
        if args.version:
            from . import __version__

            print(f"stockade {__version__}")
            return 0
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        try:
            status: int = args.func(args)
            return status
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            _close_factories(factory, args)
            os._exit(141)
        except Exception as exc:
            from .errors import StockadeError

            if isinstance(exc, StockadeError):  # one a command did not word itself (a bad setting): said, exit 125
                return fail_for(exc)
            raise
    finally:
        _close_factories(factory, args)


# Flags a user may expect of a command that has none, with why.
_NOT_HERE = {("start", "--timeout"): "a component runs until `stockade stop`; --timeout is for run and exec-code"}


def _refuse_unknown(parser: Any, args: Any, extra: list[str]) -> None:
    """Refuse arguments no parser took, in the usage of the command they were given to (argparse
    itself names the top-level program, whose usage does not show that command's flags)."""
    import argparse

    chosen, path = parser, []
    while True:
        subs = [a for a in chosen._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            break
        chosen = subs[0].choices[name]
        path.append(name)
    why = [_NOT_HERE[(path[0], flag)] for flag in extra if path and (path[0], flag) in _NOT_HERE]
    chosen.error(f"unrecognized arguments: {' '.join(extra)}" + "".join(f" ({w})" for w in why))


def _close_factories(factory: Any, args: Any) -> None:
    """End the isolate begun early (main's, or _execute's once no daemon answered); a runtime that
    adopted it has closed it already, and a second close does nothing."""
    for each in (factory, getattr(args, "factory", None)):
        if each is not None:
            each.close()


if __name__ == "__main__":
    entry()
