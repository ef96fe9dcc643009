"""``stockade secretd`` (the secrets broker) and ``stockade setup-users`` (its three identities)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

EXIT_ERROR = 125  # cli.EXIT_STOCKADE_ERROR


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
        help="run the secrets broker: holds secrets, answers only the daemon's uid (docs/secrets.md)",
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
    secretd.add_argument("--user", default="stockade-secrets", metavar="NAME", help="started as root: become NAME")
    secretd.add_argument("--daemon-group", metavar="NAME", help="the group that may reach it (default: the --user's)")
    secretd.set_defaults(func=cmd_secretd)


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
    from .errors import ConfigError
    from .runtimes.process.uids import UidRange

    path = args.secrets_file or os.environ.get("STOCKADE_SECRETS_FILE")
    if not path:
        raise ConfigError("no secrets file: give --secrets-file or STOCKADE_SECRETS_FILE")
    key_file = args.key_file or os.environ.get("STOCKADE_SESSION_KEY_FILE") or identities.SESSION_KEY
    socket_path = args.socket or os.environ.get("STOCKADE_BROKER_SOCKET") or identities.BROKER_SOCKET
    uids = UidRange.from_env()
    as_root = os.geteuid() == 0
    group = args.daemon_group or (args.user if as_root else None)
    gid = grp.getgrnam(group).gr_gid if group else None
    allowed = []
    for user in args.allow_uid or ["stockade"]:
        try:
            allowed.append(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"--allow-uid {user}: no such user (`stockade setup-users` creates stockade)") from None
    raw_key = os.environ.pop("STOCKADE_SESSION_KEY", "")
    key = wire.parse_key(raw_key, "STOCKADE_SESSION_KEY") if raw_key else None
    if key is None and os.path.exists(key_file):
        key = wire.read_key(key_file)
    if key is None:
        key = wire.new_key()
    listener = None
    if as_root:
        # As root: the layout, the key and the socket (in root's /run/stockade), each given to
        # the broker's user; then root goes, before a secret is read or a request answered.
        identities.prepare_run_dir(args.user, os.path.dirname(os.path.abspath(socket_path)))
        broker_uid, _ = identities.ids_of(args.user)
        # Read by root for the broker, and only if the broker owns it: its directory may be root's alone.
        store = SecretStore.load(path, owner=broker_uid)
        wire.write_key(key_file, key, gid, owner=broker_uid)
        listener = listen(socket_path, gid, owner=broker_uid)
        identities.drop_to(args.user)
    else:
        store = SecretStore.load(path)
        wire.write_key(key_file, key, gid)
    return BrokerConfig(
        socket_path=socket_path,
        key=key,
        store=store,
        allowed_uids=frozenset(allowed),
        sandbox_uids=(uids.first, uids.last),
        socket_gid=gid,
        listener=listener,
    )
