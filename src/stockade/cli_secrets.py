"""``stockade secretd`` (the secrets broker) and ``stockade setup-users`` (its three identities)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from . import cli_outcome

EXIT_ERROR = 125  # cli.EXIT_STOCKADE_ERROR
DEFAULT_STATE_DIR = "/var/lib/stockade-secrets"  # its own: the daemon's /var/lib/stockade is 0700 root


def add_parsers(subparsers: Any) -> None:
    users = subparsers.add_parser(
        "setup-users",
        help="create the stockade-secrets, stockade and stockade-sandbox users and groups (root; idempotent)",
    )
    users.add_argument("--secrets-user", default="stockade-secrets", metavar="NAME", help="the broker's user")
    users.add_argument("--daemon-user", default="stockade", metavar="NAME", help="the daemon's user")
    users.add_argument("--sandbox-user", default="stockade-sandbox", metavar="NAME", help="the sandbox account")
    users.set_defaults(func=cmd_setup_users)

    secretd = subparsers.add_parser(
        "secretd",
        help="run the secrets broker: holds secrets, answers only the daemon's uid (docs/security.md: The broker)",
    )
    secretd.add_argument(
        "--secrets-file", metavar="FILE", help="JSON secrets, mode 0600 (default: $STOCKADE_SECRETS_FILE)"
    )
    secretd.add_argument("--socket", metavar="PATH", help="its socket (default: /run/stockade/secretd.sock)")
    secretd.add_argument("--key-file", metavar="FILE", help="the session key (default: /run/stockade/.session)")
    secretd.add_argument(
        "--allow-uid",
        action="append",
        metavar="USER",
        help="the daemon's user, by name or uid; repeatable (default: stockade)",
    )
    secretd.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where secrets an admin registers through the daemon are kept, encrypted (default as root: "
        "/var/lib/stockade-secrets; otherwise none)",
    )
    secretd.add_argument("--user", default="stockade-secrets", metavar="NAME", help="started as root: become NAME")
    secretd.add_argument(
        "--daemon-group", metavar="NAME", help="the group that may read its session key (default: the --user's)"
    )
    secretd.set_defaults(func=cmd_secretd)

    secrets = subparsers.add_parser(
        "secrets", help="an admin's secrets, kept encrypted by the broker: put, ls, rm (through the daemon, as root)"
    )
    secrets_sub = secrets.add_subparsers(dest="secrets_cmd", required=True)
    put = secrets_sub.add_parser("put", help="register (or replace) a secret; its value is read from stdin")
    put.add_argument("name", metavar="NAME")
    put.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        required=True,
        help="a host it may be sent to (repeatable; at least one: a secret any caller could bind to any host "
        "could be sent to that caller's own server)",
    )
    ls = secrets_sub.add_parser("ls", help="the broker's secrets: names, hosts, where they come from (no values)")
    ls.add_argument("--json", action="store_true")
    rm = secrets_sub.add_parser("rm", help="remove a registered secret")
    rm.add_argument("name", metavar="NAME")
    for sub in (put, ls, rm):
        sub.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: $STOCKADE_SOCKET)")
        sub.add_argument("--token-file", metavar="FILE", help="the daemon's HMAC token (default: $STOCKADE_AUTH_TOKEN)")
        sub.set_defaults(func=cmd_secrets)


def cmd_secrets(args: argparse.Namespace) -> int:
    import json

    from .client import Client
    from .errors import StockadeError, printable
    from .settings import current

    try:
        if args.token_file:
            client = Client(args.socket or None, token_file=args.token_file, retry=None)
        else:
            client = Client(args.socket or None, auth_token=current().secret("auth_token"), retry=None)
        with client:
            if args.secrets_cmd == "put":
                if sys.stdin.isatty():
                    print("stockade: give the value on standard input (not as an argument): "
                          f"stockade secrets put {args.name} ... < file", file=sys.stderr)  # fmt: skip
                    return EXIT_ERROR
                value = sys.stdin.read().rstrip("\n")
                if not value:
                    print("stockade: standard input was empty: the secret's value is what it holds", file=sys.stderr)
                    return EXIT_ERROR
                client.call("secrets.put", {"name": args.name, "value": value, "hosts": args.host})
                print(f"{args.name}: registered")
            elif args.secrets_cmd == "rm":
                gone = client.call("secrets.delete", {"name": args.name}).get("deleted")
                print(f"{args.name}: {'removed' if gone else 'not registered'}")
                return 0 if gone else 1
            else:
                answer = client.call("secrets.list", {})
                listed = answer.get("secrets") if isinstance(answer, dict) else None
                if not isinstance(listed, list) or not all(_listed(entry) for entry in listed):
                    raise StockadeError("the daemon sent an invalid response to secrets.list")
                if args.json:
                    print(json.dumps(listed, indent=2))
                for entry in [] if args.json else listed:
                    # The daemon's words (a name, hosts): a terminal's escape sequences in them shown, not obeyed.
                    given = entry.get("hosts")
                    hosts = "no host (none given)" if given is None else ", ".join(given) or "no host"
                    name, source = printable(str(entry.get("name"))), printable(str(entry.get("source")))
                    print(f"{name:<32} {source:<10} {printable(hosts)}")
    except StockadeError as exc:
        return cli_outcome.fail_for(exc)  # with --json, on stdout too
    return 0


def _listed(entry: Any) -> bool:
    """Whether a daemon's listing of one secret has the shape ``secrets ls`` prints."""
    if not isinstance(entry, dict):
        return False
    hosts = entry.get("hosts")
    return hosts is None or (isinstance(hosts, list) and all(isinstance(h, str) for h in hosts))


def cmd_setup_users(args: argparse.Namespace) -> int:
    from .broker.identities import Names, setup_users
    from .errors import StockadeError

    try:
        done = setup_users(Names(args.secrets_user, args.daemon_user, args.sandbox_user))
    except StockadeError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for line in done or ["all three users and groups exist already"]:
        print(line)
    return 0


def cmd_secretd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s stockade %(levelname)s %(message)s")
    from .errors import StockadeError

    try:
        config = _broker_config(args)
    except StockadeError as exc:
        print(f"stockade secretd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    from .broker.server import serve

    asyncio.run(serve(config))
    return 0


def _broker_config(args: argparse.Namespace) -> Any:
    """Read the secrets and the key, lay out /run/stockade, and (as root) drop to the broker's user.

    Everything that needs root happens before the drop; the socket is bound after it,
    so the socket and everything the broker makes are its own."""
    import grp
    import pwd

    from .broker import identities, wire
    from .broker.server import BrokerConfig, listen
    from .broker.store import SecretStore
    from .broker.vault import Vault
    from .errors import ConfigError
    from .runtimes.process.uids import UidRange
    from .settings import current

    settings = current()
    path = args.secrets_file or settings.secrets_file
    if not path:
        raise ConfigError("no secrets file: give --secrets-file or STOCKADE_SECRETS_FILE")
    key_file = args.key_file or settings.session_key_file
    socket_path = args.socket or settings.broker_socket or identities.BROKER_SOCKET
    uids = UidRange.from_env()
    as_root = os.geteuid() == 0
    group = args.daemon_group or (args.user if as_root else None)
    if as_root:
        try:
            pwd.getpwnam(args.user)
        except KeyError:
            raise ConfigError(f"--user {args.user}: no such user (`stockade setup-users` creates it)") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        flag = "--daemon-group" if args.daemon_group else "--user (its group)"
        raise ConfigError(f"{flag} {group}: no such group (`stockade setup-users` creates it)") from None
    allowed = []
    for user in args.allow_uid or ["stockade"]:
        try:
            allowed.append(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"--allow-uid {user}: no such user (`stockade setup-users` creates stockade)") from None
    # The socket is its daemon's (0660 to the first non-root --allow-uid's own primary group; root
    # reaches any socket), the key the broker group's: a daemon that read the key as root and kept no
    # group of the broker's reaches the broker, and nothing it starts afterwards can read the key
    # (daemon/privileges.py).
    daemons = [uid for uid in allowed if uid != 0]
    socket_gid = _primary_gid(daemons[0], gid) if gid is not None and daemons else gid
    raw_key = settings.secret("session_key")
    os.environ.pop("STOCKADE_SESSION_KEY", None)  # read: out of this process's environment
    key = wire.parse_key(raw_key, "STOCKADE_SESSION_KEY") if raw_key else None
    if key is None and os.path.exists(key_file):
        key = wire.read_key(key_file)
    if key is None:
        key = wire.new_key()
    listener = None
    if as_root:
        # As root: the layout, the key and the socket (in root's /run/stockade), each given to
        # the broker's user; then root goes, before a secret is read or a request answered.
        # Every directory root writes in for the broker is checked before anything is written.
        state_dir = args.state_dir or DEFAULT_STATE_DIR
        try:
            parent = os.path.dirname(os.path.abspath(state_dir))
            os.makedirs(parent, mode=0o755, exist_ok=True)
            identities.root_only(parent, "--state-dir: its parent")
            identities.root_only(os.path.dirname(os.path.abspath(key_file)), "--key-file: its directory")
        except OSError as exc:
            raise ConfigError(f"--state-dir {state_dir} or --key-file {key_file}: {exc.strerror}") from None
        identities.prepare_run_dir(args.user, os.path.dirname(os.path.abspath(socket_path)))
        broker_uid, _ = identities.ids_of(args.user)
        # Read by root for the broker, and only if the broker owns it: its directory may be root's alone.
        store = SecretStore.load(path, owner=broker_uid)
        wire.write_key(key_file, key, gid, owner=broker_uid)
        listener = listen(socket_path, socket_gid, owner=broker_uid)
        try:
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(state_dir, 0o700)
                identities.own_directory(state_dir, broker_uid, -1)
            except OSError as exc:
                raise ConfigError(f"--state-dir {state_dir}: {exc.strerror}") from None
            identities.drop_to(args.user)
        except BaseException:
            listener.close()  # a broker that did not start leaves no socket that seems to be one
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
            raise
    else:
        store = SecretStore.load(path)
        wire.write_key(key_file, key, gid)
        state_dir = args.state_dir
    if state_dir:
        try:
            store.vault = Vault(state_dir)  # as the broker: its key is the broker's own
        except OSError as exc:
            raise ConfigError(f"--state-dir {state_dir}: {exc.strerror} (the broker's user must own it)") from None
    return BrokerConfig(
        socket_path=socket_path,
        key=key,
        store=store,
        allowed_uids=frozenset(allowed),
        sandbox_uids=(uids.first, uids.last),
        socket_gid=socket_gid,
        listener=listener,
    )


def _primary_gid(uid: int, otherwise: int) -> int:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return otherwise
