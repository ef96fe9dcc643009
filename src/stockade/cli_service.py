"""The ``stockade`` commands that run and operate the daemon: ``serve``, ``daemon`` (ask a
running one), ``image build`` (the microVM guest image), ``token new`` and ``audit verify``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from .cli import _daemon_token
from .cli_outcome import fail
from .errors import printable


def add_parsers(sub: Any) -> None:
    """Add serve, daemon, image, token and audit to the subcommands."""
    serve = sub.add_parser("serve", help="run the daemon (Unix-socket RPC, and the HTTP API with --http)")
    serve.add_argument("--socket", metavar="PATH", help="socket path (default: $STOCKADE_SOCKET)")
    serve.add_argument("--token-file", metavar="FILE", help="the socket's HMAC token (default: $STOCKADE_AUTH_TOKEN)")
    serve.add_argument(
        "--http",
        nargs="?",
        const="",  # --http alone: $STOCKADE_HTTP's address, else the default
        metavar="HOST:PORT",
        help="serve the HTTP API too (alone: $STOCKADE_HTTP, else 127.0.0.1:8002); without a token, loopback only",
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
        return fail(f"--token-file {args.token_file}: {exc.strerror}")
    # One attempt: a health check must say "down" at once, not after the client's backoff.
    with Client(args.socket or None, auth_token=token, retry=None) as client:
        try:
            if args.daemon_cmd in _DAEMON_ENDINGS:
                if not args.target:
                    return fail(f"stockade daemon {args.daemon_cmd} needs the id that `stockade daemon status` lists")
                getattr(client, _DAEMON_ENDINGS[args.daemon_cmd])(args.target)
                print(f"{args.daemon_cmd}: {args.target}: done")
                return 0
            if args.target:
                return fail(f"stockade daemon {args.daemon_cmd} takes no id")
            if args.daemon_cmd == "ping":
                started = time.monotonic()
                answer = client.ping()
                # The daemon's words: a terminal's escape sequences in them are shown, not obeyed.
                shown = printable(str(answer))
                print(f"{shown} from {printable(client.socket_path)} in {(time.monotonic() - started) * 1000:.1f} ms")
                return 0
            report: Any = getattr(client, args.daemon_cmd)()
        except StockadeError as exc:
            return fail(str(exc))
    print(json.dumps(report, indent=2))
    if args.daemon_cmd == "selftest" and not report.get("ok"):
        print(f"stockade: self-test failed: {printable(str(report.get('message')))}", file=sys.stderr)
        return 1
    return 0


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


def _warn_if_others_read(flag: str, path: str | None) -> None:
    """Say so when a token's file is readable by every local user: any of them could sign requests
    with it (a Kubernetes secret's volume is 0644 by default, so this is said, not refused)."""
    if not path:
        return
    with contextlib.suppress(OSError):
        where = os.path.dirname(os.path.realpath(path))
        while where != "/" and os.stat(where).st_mode & 0o001:  # every directory above it searchable
            where = os.path.dirname(where)
        if os.stat(path).st_mode & 0o004 and where == "/":
            print(f"stockade: warning: {flag} {path} is readable by every user on this host, who could sign requests "
                  "with it: chmod o-r it", file=sys.stderr)  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon.config import DaemonConfig
    from .daemon.main import serve
    from .errors import StockadeError

    try:
        # The flags over the variables, then read once: a flag's value stands where its variable's would
        # (a --token-file over an env file's STOCKADE_AUTH_TOKEN, which is then not read at all).
        env = dict(os.environ)
        if args.placement or args.ray_address:
            env["STOCKADE_PLACEMENT"] = _placement_flags(args.placement, args.ray_address)
        if args.socket == "":
            raise StockadeError("--socket: give the path to listen on (it was empty)")
        if args.socket:
            env["STOCKADE_SOCKET"] = args.socket
        if args.token_file:
            from .client import read_token_file

            env["STOCKADE_AUTH_TOKEN"] = read_token_file(args.token_file)
        for flag, path in (("--token-file", args.token_file), ("--api-token-file", args.api_token_file)):
            _warn_if_others_read(flag, path)
        if args.user:
            env["STOCKADE_DAEMON_USER"] = args.user
        config = DaemonConfig.from_env(env)
        if args.http is not None or args.api_token_file or args.no_socket:
            config = config.with_http(args.http, args.api_token_file, unix_socket=not args.no_socket)
        from .daemon.privileges import daemon_user_for, own_audit_log

        config = config.replace(daemon_user=daemon_user_for(config.daemon_user, config.placement.type))
        from .settings import is_set

        config = own_audit_log(config, given=is_set("audit_log"))
    except StockadeError as exc:
        return fail(str(exc))
    try:
        return serve(config)
    except StockadeError as exc:
        return fail(str(exc))


def cmd_image_build(args: argparse.Namespace) -> int:
    from .errors import StockadeError
    from .runtimes.microvm import image

    try:
        built = image.build(image.bar, force=args.force)
    except StockadeError as exc:
        return fail(str(exc))
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
        return fail(f"--file {args.file} exists: a daemon or its clients may use it (--force replaces it)")
    except OSError as exc:
        return fail(f"--file {args.file}: {exc.strerror}")
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        f.write(token + "\n")
    print(f"wrote a new token to {args.file} (mode 0600)")
    return 0
