"""The ``stockade`` command line.

    stockade run [policy flags] [--json] -- CMD ARGS...
    stockade exec-code [--language python|bash] [policy flags] [--json] (CODE | -f FILE | -)
    stockade doctor [--json]
    stockade start --name NAME [--restart no|on-failure|always] [--max-restarts N] [--stdin] [policy flags] -- CMD...
    stockade status [NAME] | ps | logs [-f] NAME | stop NAME | rm [--force] NAME
    stockade exec [-i] NAME -- CMD ARGS... | attach NAME
    stockade serve [--socket PATH] [--token-file F] [--http [HOST:PORT]] [--api-token-file F] [--no-socket]
                   [--placement local|ray] [--ray-address HOST:PORT]
    stockade daemon ping|selftest|status|runtimes [--socket PATH] [--token-file F]
    stockade image build [--force] [--no-snapshot]
    stockade token new [--file F]
    stockade audit verify FILE...

With ``--socket`` (or ``STOCKADE_SOCKET``), run/exec-code go through the daemon,
and start-up costs no pydantic (cli_daemon.py). When nothing answers on
``$STOCKADE_SOCKET`` they say so on stderr and run in-process; ``--socket PATH``
and ``--require-daemon`` make the daemon required instead.

Exit status of ``run``/``exec-code``: the command's own; 128+N when a signal
ended it; 124 on timeout (as timeout(1)); 137 when the memory limit killed it;
125 when stockade itself failed (bad policy, no runtime), with the reason on
stderr. Heavy modules load only once a command needs them.
"""

from __future__ import annotations

import gc
import os
import sys

from .agent.wire import MAX_DATA_BYTES

TYPE_CHECKING = False  # not typing's: a run through the daemon imports neither typing nor re
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    from .result import ExecResult

EXIT_TIMEOUT = 124
EXIT_STOCKADE_ERROR = 125
EXIT_MEMORY = 137
MAX_STDIN = MAX_DATA_BYTES  # what fits one agent frame, base64-encoded


# Fields only a run that ends acts on: a component (``start``) runs until stopped,
# supervised on this host, its output streamed to its log uncut.
_ONE_RUN_FIELDS = ("timeout_seconds", "max_output_bytes")
# Subcommands whose parser carries the Policy's flags (building them loads pydantic).
_POLICY_COMMANDS = ("run", "exec-code", "start")
# The subcommands that run one command: cli_daemon.parse reads their flags without pydantic.
_ONE_RUN_COMMANDS = ("run", "exec-code")


def _policy_flags(parser: argparse.ArgumentParser, one_run: bool = True) -> None:
    """The Policy's flags, one per field, read from the model: name, type, choices,
    default, bounds and help (``policy.CLI_FLAGS`` names the ones not called after
    their field). ``one_run`` adds what only a run that ends takes."""
    from .policy import CLI_FLAGS, Policy

    g = parser.add_argument_group("policy")
    parser.set_defaults(policy_fields=tuple(Policy.model_fields))  # which destinations are the Policy's
    for name, field in Policy.model_fields.items():
        if name in _ONE_RUN_FIELDS and not one_run:
            continue
        flag, metavar = CLI_FLAGS.get(name, ("--" + name.replace("_", "-"), None))
        kind, choices, repeated = _flag_type(field.annotation)
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
    """A field's description, default and bounds, as its flag's help."""
    parts = [field.description or ""]
    if repeated:
        parts.append("repeatable")
    if field.default_factory is None and field.default not in (None, ()):
        parts.append(f"default {field.default:g}" if isinstance(field.default, float) else f"default {field.default}")
    for bound in field.metadata:
        for attr, word in (("gt", "more than"), ("ge", "at least"), ("le", "at most")):
            value = getattr(bound, attr, None)
            if value is not None:
                parts.append(f"{word} {value:g}" if isinstance(value, float) else f"{word} {value}")
    return "; ".join(p for p in parts if p)


def _build_policy(args: Any) -> Any:
    from .cli_daemon import policy_fields
    from .errors import PolicyError
    from .policy import CLI_FLAGS, Policy

    fields = policy_fields(args)  # the same fields a run through the daemon sends
    try:
        return Policy.build(**fields)
    except PolicyError as exc:  # in the words the user typed: the flag, then its field
        parts = str(exc).removeprefix("invalid policy: ").split("; ")
        for i, part in enumerate(parts):
            field, sep, rest = part.partition(":")
            name = field.split(".")[0].split("[")[0]
            if sep and name in CLI_FLAGS:
                parts[i] = f"{CLI_FLAGS[name][0]} ({field}):{rest}"
        raise PolicyError("invalid policy: " + "; ".join(parts)) from None


def _fail(message: str) -> int:
    print(f"stockade: {message}", file=sys.stderr)
    return EXIT_STOCKADE_ERROR


def _stream(name: str, data: bytes) -> None:
    """A run's output as it comes, to this process's own stdout or stderr."""
    out = sys.stdout if name == "stdout" else sys.stderr
    out.buffer.write(data)
    out.flush()


def _report(args: Any, result: ExecResult) -> int:
    """Print what the run's output did not say (all of it with --json); its exit status."""
    if args.json:
        print(result.model_dump_json(indent=2))
    elif result.termination_reason != "completed" or result.security_violations or result.unenforced_limits:
        print(result.summary(), file=sys.stderr)
    return _exit_status(result.termination_reason, result.exit_code)


def _exit_status(termination_reason: str, exit_code: int | None) -> int:
    """A run's exit status from how it ended (an ``ExecResult``'s two fields, or its JSON's)."""
    if termination_reason == "timeout":
        return EXIT_TIMEOUT
    if termination_reason == "memory_limit":
        return EXIT_MEMORY
    if exit_code is None:
        return EXIT_STOCKADE_ERROR
    if exit_code < 0:
        return 128 - exit_code
    return int(exit_code)


def _read_stdin() -> bytes:
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise SystemExit(_fail(f"standard input is larger than {MAX_STDIN} bytes"))
    return data


def _execute(args: Any, call: str, produce: Callable[[], tuple[Any, bytes]]) -> int:
    """Run through the daemon when one is given (cli_daemon.py), else here. ``produce``
    reads the payload and standard input, once it is known where the run goes."""
    from .cli_daemon import daemon_socket, via_daemon

    status = via_daemon(args, call, produce)
    zygote = getattr(args, "zygote", None)  # started by main() before the parser was built
    if status is not None:
        if zygote is not None:
            zygote.close()  # started by main() in case the run stayed here; it did not
        return status
    if zygote is None and daemon_socket(args)[0] is not None:
        zygote = _early_zygote(args.argv, daemon_checked=True)  # no daemon answered: the run stays here
    try:
        payload, stdin = produce()
    except BaseException:
        if zygote is not None:
            zygote.close()
        raise

    from .errors import StockadeError
    from .runtimes.manager import RuntimeManager

    try:
        policy = _build_policy(args)
    except (StockadeError, OSError, ValueError) as exc:
        if zygote is not None:
            zygote.close()
        return _fail(str(exc))
    # A CLI process runs one command: a warm pool would only cost time here.
    manager = RuntimeManager(pool_size=0)
    if zygote is not None:
        manager.adopt_zygote(zygote)

    from . import sdk

    on_output = None if args.json else _stream
    try:
        if call == "exec":
            result = sdk.run(payload, policy, stdin=stdin, on_output=on_output, manager=manager)
        else:
            result = sdk.run_code(payload[1], payload[0], policy, stdin=stdin, on_output=on_output, manager=manager)
    except StockadeError as exc:
        return _fail(str(exc))
    finally:
        manager.close()
    return _report(args, result)


# `stockade daemon cancel|close ID`: the Client method each one calls.
_DAEMON_ENDINGS = {"cancel": "cancel_execution", "close": "close_sandbox"}


def cmd_daemon(args: argparse.Namespace) -> int:
    """Ask a running daemon one question: for operators, and for health checks (exit 0: healthy)."""
    import json
    import time

    from .client import Client
    from .errors import StockadeError

    try:
        token = _daemon_token(args)
    except OSError as exc:
        return _fail(f"--token-file {args.token_file}: {exc.strerror}")
    # One attempt: a health check must say "down" at once, not after the client's backoff.
    with Client(args.socket or None, auth_token=token, retry=None) as client:
        try:
            if args.daemon_cmd in _DAEMON_ENDINGS:
                if not args.target:
                    return _fail(f"stockade daemon {args.daemon_cmd} needs the id that `stockade daemon status` lists")
                getattr(client, _DAEMON_ENDINGS[args.daemon_cmd])(args.target)
                print(f"{args.daemon_cmd}: {args.target}: done")
                return 0
            if args.target:
                return _fail(f"stockade daemon {args.daemon_cmd} takes no id")
            if args.daemon_cmd == "ping":
                started = time.monotonic()
                answer = client.ping()
                print(f"{answer} from {client.socket_path} in {(time.monotonic() - started) * 1000:.1f} ms")
                return 0
            report: Any = getattr(client, args.daemon_cmd)()
        except StockadeError as exc:
            return _fail(str(exc))
    print(json.dumps(report, indent=2))
    if args.daemon_cmd == "selftest" and not report.get("ok"):
        print(f"stockade: self-test failed: {report.get('message')}", file=sys.stderr)
        return 1
    return 0


def _daemon_token(args: Any) -> str | None:
    """The HMAC token: from ``--token-file``, else ``$STOCKADE_AUTH_TOKEN``, else none (OSError if unreadable)."""
    if not args.token_file:
        # Read here, not through settings.py: the lean path through a daemon starts without pydantic.
        return os.environ.get("STOCKADE_AUTH_TOKEN")
    with open(args.token_file) as f:
        return f.read().strip()


def _placement_flags(placement: str | None, ray_address: str | None) -> str:
    """``STOCKADE_PLACEMENT`` from ``--placement`` and ``--ray-address`` (which implies ``ray``)."""
    import json

    from .errors import ConfigError

    kind = placement or "ray"
    if kind == "local":
        if ray_address:
            raise ConfigError("--ray-address is for --placement ray, not local")
        return "local"
    if not ray_address:
        raise ConfigError("--placement ray needs --ray-address HOST:PORT (the cluster's GCS, or 'auto')")
    return json.dumps({"type": "ray", "address": ray_address})


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon.config import DaemonConfig
    from .daemon.main import serve
    from .errors import StockadeError

    try:
        config = DaemonConfig.from_env()
        if args.socket or args.token_file or args.user or args.placement or args.ray_address:
            from .client import read_token_file

            env = dict(os.environ)
            if args.placement or args.ray_address:
                env["STOCKADE_PLACEMENT"] = _placement_flags(args.placement, args.ray_address)
            if args.socket:
                env["STOCKADE_SOCKET"] = args.socket
            if args.token_file:
                env["STOCKADE_AUTH_TOKEN"] = read_token_file(args.token_file)
            if args.user:
                env["STOCKADE_DAEMON_USER"] = args.user
            config = DaemonConfig.from_env(env)
        if args.http is not None or args.api_token_file or args.no_socket:
            config = config.with_http(args.http, args.api_token_file, unix_socket=not args.no_socket)
        from .daemon.privileges import daemon_user_for

        config = config.model_copy(update={"daemon_user": daemon_user_for(config.daemon_user)})
    except StockadeError as exc:
        return _fail(str(exc))
    try:
        return serve(config)
    except StockadeError as exc:
        return _fail(str(exc))


def cmd_image_build(args: argparse.Namespace) -> int:
    from .errors import StockadeError
    from .runtimes.microvm import image

    try:
        built = image.build(image.bar, force=args.force)
    except StockadeError as exc:
        return _fail(str(exc))
    print(f"guest image: {built.directory} (kernel {built.kernel_version})")
    if args.no_snapshot:
        return 0
    from .runtimes.microvm.runtime import MicrovmRuntime, qemu_binary

    if qemu_binary() is None:
        print("snapshot: none (qemu-system-x86_64 is not installed)")
        return 0
    runtime = MicrovmRuntime()
    try:
        print(f"snapshot: booting the guest once to save it ({runtime.accel()})...", file=sys.stderr)
        path = runtime.make_snapshot()
    except StockadeError as exc:
        print(f"snapshot: none ({exc}); microVMs will boot instead of being restored", file=sys.stderr)
        return 0
    finally:
        runtime.close()
    print(f"snapshot: {path}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit import verify_main

    return verify_main(args.files)


def cmd_token_new(args: argparse.Namespace) -> int:
    import secrets

    token = secrets.token_hex(32)
    if not args.file:
        print(token)
        return 0
    # A token file in use is not replaced by accident: its daemon and clients would no longer agree.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.file, flags, 0o600)
    except FileExistsError:
        return _fail(f"--file {args.file} exists: a daemon or its clients may use it (--force replaces it)")
    except OSError as exc:
        return _fail(f"--file {args.file}: {exc.strerror}")
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        f.write(token + "\n")
    print(f"wrote a new token to {args.file} (mode 0600)")
    return 0


def _early_zygote(argv: list[str], daemon_checked: bool = False) -> Any:
    """Start the process runtime's zygote before pydantic is imported (the CLI's largest
    cost), so the guest interpreter boots on the other core meanwhile: for ``run`` and
    ``exec-code`` on the process runtime, read off the raw arguments (the parser that
    knows the Policy's flags needs pydantic itself). Not when a daemon will serve the
    run, unless ``daemon_checked``: none answered, and the run stays here."""
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

    # Its interpreter read here, not through settings.py: that would import pydantic first, the very
    # cost this boot overlaps. No uid range to hold it to: its caller is this process, which keeps root.
    python = os.environ.get("STOCKADE_GUEST_PYTHON") or DEFAULT_GUEST_PYTHON
    try:
        return Zygote(python, wait=False, sandbox_uids=None)
    except StockadeError:
        return None  # the runtime will start (and report on) its own


def cmd_run(args: Any) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return _fail("run: no command given (stockade run [flags] -- CMD ARGS...)")
    return _execute(args, "exec", lambda: (argv, _read_stdin()))


def cmd_exec_code(args: Any) -> int:
    language = args.language
    if args.file:
        try:
            with open(args.file) as f:
                code = f.read()
        except OSError as exc:
            return _fail(f"-f {args.file}: {exc.strerror}")
        return _execute(args, "run_code", lambda: ((language, code), _read_stdin()))
    if args.code == "-":
        return _execute(args, "run_code", lambda: ((language, sys.stdin.read()), b""))
    if args.code is not None:
        return _execute(args, "run_code", lambda: ((language, args.code), _read_stdin()))
    return _fail("exec-code: give CODE, -f FILE or - (read code from standard input)")


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
    every parser's): building them loads pydantic, which the other subcommands do without."""
    import argparse

    parser = argparse.ArgumentParser(prog="stockade", description="Run untrusted code behind real isolation.")

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

    serve = sub.add_parser("serve", help="run the daemon (Unix-socket RPC, and the HTTP API with --http)")
    serve.add_argument("--socket", metavar="PATH", help="socket path (default: $STOCKADE_SOCKET)")
    serve.add_argument("--token-file", metavar="FILE", help="the socket's HMAC token (default: $STOCKADE_AUTH_TOKEN)")
    serve.add_argument(
        "--http",
        nargs="?",
        const="127.0.0.1:8002",
        metavar="HOST:PORT",
        help="serve the HTTP API too (default 127.0.0.1:8002; $STOCKADE_HTTP); without a token, loopback only",
    )
    serve.add_argument("--api-token-file", metavar="FILE", help="the HTTP API's bearer token (or $STOCKADE_API_TOKEN)")
    serve.add_argument("--no-socket", action="store_true", help="serve the HTTP API instead of the Unix socket")
    serve.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: become NAME once the sockets are bound (default: stockade when that account "
        "exists; root keeps root; $STOCKADE_DAEMON_USER)",
    )
    serve.add_argument(
        "--placement",
        choices=["local", "ray"],
        help="where isolates run: this host (local, the default) or a Ray cluster's nodes ($STOCKADE_PLACEMENT)",
    )
    serve.add_argument("--ray-address", metavar="HOST:PORT", help="the Ray cluster's GCS address (or 'auto')")
    serve.set_defaults(func=cmd_serve)

    daemon = sub.add_parser("daemon", help="ask a running daemon: ping, selftest, status, runtimes; cancel, close")
    daemon.add_argument(
        "daemon_cmd",
        choices=["ping", "selftest", "status", "runtimes", "cancel", "close"],
        help="ping: is it there; selftest: a real confined run; status: its sandboxes; runtimes: what it can run; "
        "cancel ID: end a running execute; close ID: close a held sandbox",
    )
    daemon.add_argument("target", nargs="?", metavar="ID", help="for cancel: an execution_id; for close: a sandbox_id")
    daemon.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: $STOCKADE_SOCKET)")
    daemon.add_argument("--token-file", metavar="FILE", help="HMAC token (default: $STOCKADE_AUTH_TOKEN)")
    daemon.set_defaults(func=cmd_daemon)

    img = sub.add_parser("image", help="the microVM guest image")
    img_sub = img.add_subparsers(dest="image_cmd", required=True)
    build = img_sub.add_parser("build", help="build (or reuse) the guest image from Debian packages")
    build.add_argument("--force", action="store_true", help="rebuild even if the inputs did not change")
    build.add_argument(
        "--no-snapshot", action="store_true", help="do not boot the guest to save a snapshot for fast starts"
    )
    build.set_defaults(func=cmd_image_build)

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

    token = sub.add_parser("token", help="manage daemon tokens")
    token_sub = token.add_subparsers(dest="token_cmd", required=True)
    new = token_sub.add_parser("new", help="make a 32-byte random hex token")
    new.add_argument("--file", help="write it to FILE with mode 0600 instead of printing it")
    new.add_argument("--force", action="store_true", help="replace FILE if it exists")
    new.set_defaults(func=cmd_token_new)

    audit = sub.add_parser("audit", help="the daemon's tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_cmd", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain; names the first line where it breaks")
    verify.add_argument(
        "files", nargs="+", metavar="FILE", help="the log's files, oldest first (audit.log.2 audit.log.1 audit.log)"
    )
    verify.set_defaults(func=cmd_audit_verify)

    doctor = sub.add_parser("doctor", help="what works on this host, and why not")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The CLI needs no pydantic plugins; looking for them costs ~20 ms of start-up.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")
    program = argv is None  # this process is the command: nothing else will run in it
    argv = sys.argv[1:] if argv is None else argv
    one_run = bool(argv) and argv[0] in _ONE_RUN_COMMANDS
    if program and one_run:
        # A process that runs one command and exits: the cyclic GC would only walk
        # pydantic's objects, ~10 ms while they are built and ~30 ms more at exit.
        gc.disable()
    zygote = _early_zygote(argv)
    args: Any = None
    if one_run:
        from .cli_daemon import parse

        args = parse(argv)  # None: argparse reads it (--help, an error), with its messages
        if args is not None:
            args.cmd, args.version = argv[0], False
            args.func = cmd_run if argv[0] == "run" else cmd_exec_code
    if args is None:
        parser = build_parser(next((w for w in argv if not w.startswith("-")), ""))
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            if zygote is not None:
                zygote.close()
            raise
    args.zygote, args.argv = zygote, argv
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
        os._exit(141)
    finally:
        if program and one_run:
            gc.freeze()  # the exit's collection would walk every object to free what the exit frees


if __name__ == "__main__":
    sys.exit(main())
