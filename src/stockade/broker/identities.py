"""The three identities of a privilege-separated install, and the layout of /run/stockade.

| user | runs | holds |
| --- | --- | --- |
| ``stockade-secrets`` | the broker (``stockade secretd``) | the secrets, the session key |
| ``stockade`` (in the broker's group) | the daemon | the session key (read through the group) |
| ``stockade-sandbox`` | nothing of stockade's: the account untrusted code is tested as | nothing |

Isolates themselves run as one host uid each, from ``STOCKADE_SANDBOX_UIDS``
(a range no account uses, so per-uid kernel quotas are never shared): none of
them is in the broker's or the daemon's group.

``/run/stockade/`` (0755): ``secretd/`` is the broker's own (0700); ``.session``
is the session key (0640, the broker's, readable by its group); ``secretd.sock``
is the broker's socket (0660 to its group; the broker also checks the peer's
uid). Nothing else there is readable by a sandbox uid.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

RUN_DIR = "/run/stockade"
BROKER_SOCKET = f"{RUN_DIR}/secretd.sock"


@dataclass(frozen=True)
class Names:
    secrets: str = "stockade-secrets"
    daemon: str = "stockade"
    sandbox: str = "stockade-sandbox"


def setup_users(names: Names) -> list[str]:
    """Create the three users and groups (system accounts, no login), idempotently; put the
    daemon's user in the broker's group. Returns what was done."""
    if os.geteuid() != 0:
        raise ConfigError("setup-users creates system accounts: run it as root")
    done = []
    for name in (names.secrets, names.daemon, names.sandbox):
        if not _exists(grp.getgrnam, name):
            _run(["groupadd", "--system", name])
            done.append(f"group {name} created")
        if not _exists(pwd.getpwnam, name):
            _run(["useradd", "--system", "--gid", name, "--no-create-home", "--home-dir", "/nonexistent",
                  "--shell", "/usr/sbin/nologin", name])  # fmt: skip
            done.append(f"user {name} created")
    if names.daemon not in grp.getgrnam(names.secrets).gr_mem:
        _run(["usermod", "--append", "--groups", names.secrets, names.daemon])
        done.append(f"user {names.daemon} added to group {names.secrets}")
    return done


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError(f"{argv[0]} is not installed (Debian: the passwd package)") from None
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"{' '.join(argv)} failed: {exc.stderr.strip() or exc.returncode}") from None


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    """Whether ``lookup`` (``pwd.getpwnam``, ``grp.getgrnam``) knows ``name``."""
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def ids_of(name: str) -> tuple[int, int]:
    """``name``'s uid and primary gid; ConfigError naming ``setup-users`` when it does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"no user {name!r} on this host: `stockade setup-users` creates it") from None
    return entry.pw_uid, entry.pw_gid


def prepare_run_dir(broker: str, run_dir: str = RUN_DIR) -> None:
    """``run_dir`` and the broker's private directory in it (as root, before dropping). Stockade's
    own /run/stockade, or a directory made here, is made 0755; one that was there already (a
    ``--socket`` elsewhere) is left as it is, and refused when no group or other may search it."""
    uid, gid = ids_of(broker)
    made = not os.path.isdir(run_dir)
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    if made or os.path.abspath(run_dir) == RUN_DIR:
        os.chmod(run_dir, 0o755)  # noqa: S103 - traversed by the daemon to reach the broker's socket and key
    elif not os.stat(run_dir).st_mode & 0o011:  # others, or a group (the daemon's, as the admin set it)
        raise ConfigError(
            f"--socket: its directory {run_dir} is searchable by neither its group nor others (mode "
            f"{os.stat(run_dir).st_mode & 0o777:04o}), so the daemon's user could not reach the socket: "
            "make it 0755 or put the socket elsewhere (nothing was changed)"
        )
    root_only(run_dir, "--socket: its directory")
    private = os.path.join(run_dir, "secretd")
    with contextlib.suppress(FileExistsError):
        os.mkdir(private, 0o700)
    own_directory(private, uid, gid)


def root_only(path: str, what: str) -> None:
    """Refuse ``path`` (a directory root writes in for the broker) unless root owns it and no one
    else may write in it, nor swap it or a directory above it (each root's, and writable by others
    only with the sticky bit): another user could put a link there for root to chown or bind through."""
    real = os.path.realpath(path)
    st = os.stat(real)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise ConfigError(
            f"{what} {path} belongs to uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}: root writes the "
            "broker's files there, so it must be root's and writable by root alone (nothing was changed)"
        )
    above = os.path.dirname(real)
    while True:
        st = os.stat(above)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
            raise ConfigError(
                f"{what} {path}: {above} above it belongs to uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}, "
                "so another user could swap the way to it: every directory above must be root's, and writable "
                "by others only with the sticky bit (nothing was changed)"
            )
        if above == "/":
            return
        above = os.path.dirname(above)


def own_directory(path: str, uid: int, gid: int) -> None:
    """Give the directory ``path`` itself (never where a link at it leads) to ``uid``, mode 0700."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def drop_to(name: str) -> None:
    """Become ``name`` for good: its uid, its gid, its supplementary groups; no capabilities left,
    not even in the bounding set, and none to gain through an exec (``no_new_privs``)."""
    from ..agent import linux

    entry = pwd.getpwnam(name)
    linux.drop_bounding_set()  # while root may (CAP_SETPCAP); the uid change empties the rest
    os.setgroups(os.getgrouplist(name, entry.pw_gid))
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise ConfigError(f"could not drop root to {name}")
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
