"""``stockade env build|ls|rm``: Python environments on this host (environments.py, docs/environments.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import cli_outcome

EXIT_ERROR = 125  # cli.EXIT_STOCKADE_ERROR: stockade could not do what was asked


def add_parser(subparsers: Any) -> None:
    """Add ``env`` and its subcommands to the CLI's ``subparsers``."""
    env = subparsers.add_parser("env", help="Python environments: build, list, remove")
    env_sub = env.add_subparsers(dest="env_cmd", required=True)
    build = env_sub.add_parser(
        "build",
        help="build (or reuse) a read-only environment with pip and name it",
        description="Install packages with pip (the host's pip configuration: pip.conf, PIP_INDEX_URL, "
        "PIP_FIND_LINKS) for the isolates' /usr/bin/python3, into a content-addressed store; a policy "
        "uses it by name (environment_name, --python-env NAME).",
    )
    build.add_argument("name", metavar="NAME", help="the environment's name (a label; several may share one build)")
    build.add_argument("packages", nargs="*", metavar="PACKAGE", help="requirements, in pip's syntax")
    build.add_argument("-r", "--requirements", action="append", default=[], metavar="FILE", help="a requirements file")
    build.add_argument(
        "--allow-source",
        action="store_true",
        help="let pip build sdists (their build code runs on this host, outside any sandbox); default: wheels only",
    )
    build.set_defaults(func=cmd_env)
    ls = env_sub.add_parser("ls", help="the environments built here, and their names")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(func=cmd_env)
    rm = env_sub.add_parser(
        "rm",
        help="remove a name (its environment goes with its last name), or an unnamed environment by id",
    )
    rm.add_argument("target", metavar="NAME|ID", help="a name, or the id (6 digits or more) of an unnamed environment")
    rm.set_defaults(func=cmd_env)


def cmd_env(args: argparse.Namespace) -> int:
    from .errors import StockadeError

    try:
        if args.env_cmd == "build":
            return _build(args)
        if args.env_cmd == "ls":
            return _list(args)
        return _remove(args)
    except (StockadeError, ValueError, OSError) as exc:
        return cli_outcome.fail_for(exc)  # with --json, on stdout too


def _build(args: argparse.Namespace) -> int:
    from . import environments

    requirements = list(args.packages)
    for path in args.requirements:
        try:
            with open(path, encoding="utf-8") as f:
                requirements += f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"stockade: -r {path}: {why}", file=sys.stderr)
            return 2
    environments.check_name(args.name)
    reqs = environments.normalise(requirements, args.allow_source)
    if not reqs:
        print("stockade: env build needs PACKAGE... or -r FILE", file=sys.stderr)
        return 2
    env_id = environments.content_id(reqs, args.allow_source)
    before = environments.named(args.name)
    if os.path.isdir(environments.env_path(env_id)):
        print(f"{args.name}: {', '.join(reqs)} already built ({env_id[:12]})", file=sys.stderr)
    else:
        how = "sdists allowed" if args.allow_source else "wheels only"
        print(f"{args.name}: pip installs {', '.join(reqs)} ({how}) for {_python()}", file=sys.stderr)
    environments.build(reqs, name=args.name, allow_source=args.allow_source, verbose=True, expected_id=env_id)
    entry = next(e for e in environments.listing() if e.id == env_id)
    moved = f" (was {before[:12]})" if before and before != env_id else ""
    print(f"{args.name} -> {env_id[:12]}{moved}: {len(entry.installed)} packages, {_size(entry.size_bytes)}")
    return 0


def _python() -> str:
    from . import environments
    from .runtimes.process.zygote import system_python

    return f"{system_python()} {environments.python_identity()['version']}"


def _list(args: argparse.Namespace) -> int:
    from . import environments
    from .errors import printable

    entries = environments.listing()
    if args.json:
        print(json.dumps([vars(e) for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no environments in {environments.store_root()} (stockade env build NAME PACKAGE...)")
        return 0
    rows = [("NAME", "ID", "SIZE", "CREATED", "REQUIREMENTS")]
    for e in entries:
        # A store's manifests are files: what they say is shown without what a terminal would act on.
        said = printable(" ".join(e.requirements))
        rows.append((",".join(e.names) or "-", e.id[:12], _size(e.size_bytes), printable(e.created), said))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def _remove(args: argparse.Namespace) -> int:
    from . import environments

    print(environments.remove(args.target))
    return 0


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
