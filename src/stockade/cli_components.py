"""``stockade start|stop|status|ps|logs|rm|exec|attach``: long-lived components (components.py, docs/components.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from . import cli, cli_outcome
from .errors import printable


def add_parsers(sub: Any, policy_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the component commands to the CLI's subparsers; ``policy_flags`` adds the Policy's
    flags to ``start`` (a component has no per-run limits)."""
    start = sub.add_parser("start", help="keep a command running in its own isolate (a component)")
    start.add_argument("--name", required=True, help="the component's name")
    start.add_argument("--restart", choices=["no", "on-failure", "always"], default="no", help="restart policy")
    start.add_argument(
        "--max-restarts",
        type=int,
        metavar="N",
        help="give up (status failed) after N restarts in a row; a run that lasts a minute resets the count",
    )
    start.add_argument(
        "--replace",
        action="store_true",
        help="replace a component of this name that has ended (its spec and last exit; its logs stay)",
    )
    start.add_argument(
        "--stdin", action="store_true", help="keep the command's stdin open for `stockade attach` (a stdio server)"
    )
    start.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="[HOST_PORT:]PORT",
        help="forward the host's loopback HOST_PORT (default: PORT; 0: any free) to PORT on the component's own "
        "loopback (needs --network loopback); repeatable",
    )
    policy_flags(start)  # a component runs until stopped, supervised here: no per-run limits
    start.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    start.set_defaults(func=cmd_start)

    stop = sub.add_parser("stop", help="stop components and release their isolates")
    stop.add_argument("names", nargs="+", metavar="name")
    stop.set_defaults(func=cmd_stop)

    for verb in ("status", "ps"):
        status = sub.add_parser(verb, help="components and their status")
        if verb == "status":
            status.add_argument("name", nargs="?")
        else:
            status.set_defaults(name=None)
        status.add_argument("--json", action="store_true")
        status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="what a component wrote")
    logs.add_argument("name")
    logs.add_argument("--tail-bytes", type=cli_outcome.whole_number(0), metavar="N", help="only the last N bytes")
    logs.add_argument("-f", "--follow", action="store_true", help="print what it writes, until it ends (or Ctrl-C)")
    logs.set_defaults(func=cmd_logs)

    rm = sub.add_parser("rm", help="delete components: their state and logs")
    rm.add_argument("names", nargs="+", metavar="name")
    rm.add_argument("--force", action="store_true", help="stop it first if it is running")
    rm.set_defaults(func=cmd_rm)

    exec_ = sub.add_parser("exec", help="run a command in a running component's isolate")
    exec_.add_argument("-i", "--interactive", action="store_true", help="pass this process's stdin to the command")
    exec_.add_argument("name")
    exec_.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    exec_.set_defaults(func=cmd_exec)

    attach = sub.add_parser("attach", help="talk to a component's stdin and stdout (one started with --stdin)")
    attach.add_argument("name")
    attach.set_defaults(func=cmd_attach)


HEADER = f"{'NAME':<20} {'STATUS':<9} {'RUNTIME':<8} {'RESTARTS':>8}  {'UPTIME':>8}  DETAIL"  # ps, start, stop


def cmd_start(args: argparse.Namespace) -> int:
    from . import components
    from .errors import StockadeError

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        policy = cli._build_policy(args).non_defaults()
        # A component runs until stopped: its policy's timeout does not apply to it.
        policy.pop("timeout_seconds", None)
        store = components.ComponentStore()
        components.start(
            components.check_name(args.name), argv, policy, args.restart, store, args.max_restarts, args.stdin,
            args.publish, args.replace,
        )  # fmt: skip
        state = store.state(args.name)
    except (StockadeError, OSError) as exc:
        return cli_outcome.fail(str(exc))
    print(HEADER)
    print(_component_line(state))
    if state.status == "failed":  # said on stderr too, where a script looks for why
        said = printable(state.error) if state.error else f"see stockade logs {args.name}"
        print(f"stockade start: {args.name} failed: {said}", file=sys.stderr)
        return 1
    if state.started_at is None and state.status == "starting":  # its first run failed; it is tried again
        said = printable(state.error) if state.error else f"see stockade logs {args.name}"
        print(f"stockade start: {args.name} did not start: {said}; it is started again (--restart "
              f"{args.restart}) until `stockade stop {args.name}`", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from . import components
    from .errors import StockadeError

    status = 0
    headed = False
    for name in args.names:  # each one, as docker stop does: one that fails does not keep the rest running
        try:
            state = components.stop(name, components.ComponentStore())
        except (StockadeError, OSError) as exc:
            status = cli_outcome.fail(str(exc))
            continue
        if not headed:
            print(HEADER)
            headed = True
        print(_component_line(state))
    return status


def cmd_status(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from . import components
    from .errors import StockadeError

    store = components.ComponentStore()
    try:
        states = [store.state(n) for n in ([args.name] if args.name else store.names())]
    except (StockadeError, OSError) as exc:
        return cli_outcome.fail(str(exc))
    if args.json:
        print(json.dumps([asdict(s) for s in states], indent=2))
    elif not states:
        print("no components")
    else:
        print(HEADER)
        for state in states:
            print(_component_line(state))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from . import components
    from .errors import StockadeError

    def write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    store = components.ComponentStore()
    try:
        if args.follow:
            components.follow_log(args.name, store, write, args.tail_bytes)
        else:
            sys.stdout.buffer.write(components.read_log(args.name, store, args.tail_bytes))
    except (StockadeError, OSError) as exc:
        return cli_outcome.fail(str(exc))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from . import components
    from .errors import StockadeError

    status = 0
    for name in args.names:
        try:
            components.remove(name, components.ComponentStore(), force=args.force)
        except (StockadeError, OSError) as exc:
            status = cli_outcome.fail(str(exc))
            continue
        print(f"removed {name}")
    return status


def cmd_exec(args: argparse.Namespace) -> int:
    from . import components, components_client
    from .errors import StockadeError

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return cli_outcome.fail("exec: no command given (stockade exec NAME -- CMD ARGS...)")
    stdin = sys.stdin.buffer if args.interactive else None
    try:
        code, error = components_client.exec_command(
            components.ComponentStore(), args.name, argv, stdin, cli_outcome.stream
        )
    except (StockadeError, OSError) as exc:
        return cli_outcome.fail(str(exc))
    if code is None:
        return cli_outcome.fail(f"component {args.name}: {error or 'the command did not run'}")
    return cli_outcome.exit_status("completed", code)


def cmd_attach(args: argparse.Namespace) -> int:
    from . import components, components_client
    from .errors import StockadeError

    def write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    try:
        why = components_client.attach(components.ComponentStore(), args.name, sys.stdin.buffer, write)
    except (StockadeError, OSError) as exc:
        return cli_outcome.fail(str(exc))
    if why == "detached":
        return 0
    print(f"stockade: component {args.name}: {printable(why)}", file=sys.stderr)
    return 1


def _component_line(state: Any) -> str:
    import time

    uptime = f"{time.time() - state.started_at:.0f}s" if state.status == "running" and state.started_at else "-"
    exited = "last exit" if state.status in ("running", "starting") else "exit"  # a run before this one's
    # An error may carry words of the isolate's (a start that failed): no terminal controls.
    ended = f"{exited} {state.exit_code}" if state.exit_code is not None else ""
    detail = " ".join(printable(state.error).split()) if state.error else ended  # one line of the table
    if state.published and state.status == "running":
        detail = " ".join(f"{where}->{port}" for port, where in sorted(state.published.items())) + (
            f"  {detail}" if detail else ""
        )
    return f"{state.name:<20} {state.status:<9} {state.runtime or '-':<8} {state.restarts:>8}  {uptime:>8}  {detail}"
