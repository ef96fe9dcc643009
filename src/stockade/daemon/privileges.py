"""``STOCKADE_DAEMON_USER``: the daemon started as root gives root up once it needs it no more.

``stockade serve`` started as root becomes ``stockade`` by itself when that
account exists (``stockade setup-users`` made it: the host is set up for
privilege separation); ``STOCKADE_DAEMON_USER`` names another account, or
``root`` to keep root (gVisor and the microVM need it).

Before the drop, as root: the process runtime's zygote is started (it stays
root, and holds every request to the sandbox uids: agent/confine.py
``check_request``), the cgroup parents and the uid leases are made the user's
(a delegated subtree), the daemon's socket is bound and the audit log opened.
Then the daemon becomes that user with no capability: it ends its isolates by
emptying their groups (cgroup.kill), or, on cgroup v1 alone, keeps CAP_KILL to
signal them (they run as other uids). The broker's session key (its group's
to read) is read as root just before, when a broker is configured
(``STOCKADE_BROKER_SOCKET``; the daemon waits for the broker to write it), and
the daemon keeps no supplementary group: nothing it starts afterwards can
read the key file. Its egress workers' fork server is started before the
drop, so that it stays root's and puts each worker on its isolate's uid, not
on the daemon's (egress/worker.py). From then on the daemon holds the key in
memory only, and reads neither the broker's secrets nor its memory.

What needs root later is gone with it: the gVisor and microVM runtimes (runsc
and the microVM's jail start as root) report themselves unavailable, Python
environments are no longer built on demand, and an allowlist isolate's direct
``connect`` attempts are still refused but no longer itemised (reading an
isolate's memory needs CAP_SYS_PTRACE, which would reach the broker's too).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import stat
import time

from .. import settings
from ..agent import linux
from ..broker import identities, wire
from ..errors import ConfigError
from .config import DaemonConfig
from .controller import Controller

log = logging.getLogger("stockade.daemon")
BROKER_KEY_WAIT_S = 30.0  # for a broker started a moment before the daemon (supervisord's priorities)


def prepare_audit_dir(config: DaemonConfig) -> None:
    """Before the audit log is opened (as root): its directory, made the user's if missing."""
    if config.daemon_user is not None and config.audit_log is not None:
        uid, gid = identities.ids_of(config.daemon_user)
        _audit_log_for(config.audit_log, uid, gid)


def own_audit_log(config: DaemonConfig, given: bool) -> DaemonConfig:
    """Unless the audit log was ``given`` (STOCKADE_AUDIT_LOG), a daemon that gives root up keeps
    it in a directory of its own, ``<state dir>/audit-USER/``, which root makes for it: the state
    directory itself (``/var/lib/stockade``) is root's, with root's own state in it."""
    if given or config.daemon_user is None or config.audit_log is None:
        return config
    return config.replace(audit_log=os.path.join(config.state_dir, f"audit-{config.daemon_user}", "audit.log"))


def _audit_log_for(path: str, uid: int, gid: int) -> None:
    """The audit log rotates (renames, creates) in its directory: that directory must be the user's.
    Root makes it when it is missing, and gives the user nothing that was there before: a directory
    someone else owns is refused, and no entry in it is touched but the log itself, as a file."""
    where = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.dirname(where), mode=0o755, exist_ok=True)  # root's: the state directory
    try:
        os.mkdir(where, 0o700)
        os.chown(where, uid, gid, follow_symlinks=False)
    except FileExistsError:
        pass
    st = os.lstat(where)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise ConfigError(
            f"the audit log {path}: a daemon that gives root up writes its audit log in a directory of its "
            f"own: {where} belongs to uid {st.st_uid}. Set STOCKADE_AUDIT_LOG to a file in a directory the "
            "daemon's user owns (or missing, which root then makes for it)"
        )
    with contextlib.suppress(FileNotFoundError):
        log_st = os.lstat(path)
        if stat.S_ISREG(log_st.st_mode) and log_st.st_nlink == 1:
            os.chown(path, uid, gid, follow_symlinks=False)  # opened by root a moment ago
    _check_reachable(path, uid, gid)


def _check_reachable(path: str, uid: int, gid: int) -> None:
    """Each directory above the audit log's own is searchable by the daemon's user: else it starts,
    gives root up, and every record is lost (a state directory of mode 0700, as systemd's default
    StateDirectoryMode made /var/lib/stockade)."""
    where = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    while True:
        st = os.stat(where)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise ConfigError(
                f"the audit log {path}: the daemon's user (uid {uid}) cannot reach it once root is given up: "
                f"{where} (mode {stat.S_IMODE(st.st_mode):04o}) is not searchable by it. Make it 0711 "
                "(systemd: StateDirectoryMode=0711), or set STOCKADE_AUDIT_LOG to a file the user can reach"
            )
        if where == "/":
            return
        where = os.path.dirname(where)


AUTO_USER = "stockade"
KEEP_ROOT = "root"


def daemon_user_for(asked: str | None, placement: str = "local") -> str | None:
    """Who ``stockade serve`` becomes: ``asked`` (``STOCKADE_DAEMON_USER``); unset, started as root,
    ``stockade`` when that account exists, on this host's placement; ``root``: nobody, root is kept.
    Placed on a Ray cluster, unset keeps root: the daemon's Ray driver writes into the session
    directory of this host's node, which a node started as root owns (given root up, Ray aborted
    the daemon); a node started as the daemon's user is for STOCKADE_DAEMON_USER to say."""
    if asked == KEEP_ROOT:
        return None
    if asked:
        return asked
    if os.geteuid() != 0:
        return None
    if placement != "local":
        return None
    try:
        identities.ids_of(AUTO_USER)
    except ConfigError:
        return None  # no account made for it: the host is not set up for privilege separation
    return AUTO_USER


def drop_root(config: DaemonConfig, controller: Controller) -> None:
    user = config.daemon_user
    assert user is not None
    if os.geteuid() != 0:
        raise ConfigError(f"STOCKADE_DAEMON_USER={user}: the daemon gives root up, so it must start as root")
    uid, gid = identities.ids_of(user)
    _read_broker_key(config)
    from ..environments import pin_root_view

    pin_root_view()  # root's store (/var/cache/stockade/envs), which the daemon's user reads, and pip settings
    process = controller.manager.process()
    process.hand_to(uid, gid)
    from ..egress.workers import fork_server

    fork_server()  # root's: the egress workers it forks run as their isolates' uids, not as the daemon's
    # cgroup.kill empties an isolate's group: then no signal to another uid is needed, and nothing is
    # kept. Without it (cgroup v1 alone), CAP_KILL: which could signal any process on the host.
    keep = () if process.can_end_groups() else (linux.CAP_KILL,)
    if config.audit_log is not None:
        _audit_log_for(config.audit_log, uid, gid)
    if config.unix_socket and os.path.exists(config.socket):
        os.chown(config.socket, uid, -1)  # its group and mode stay what STOCKADE_SOCKET_PERMS made them
    linux.drop_bounding_set(keep)  # nothing more to gain through an exec, for it or what it starts
    linux.become_user_keeping(uid, gid, [gid], keep=keep)  # no group of the broker's: its key is read
    kept = "CAP_KILL alone" if keep else "no capability"
    log.info("gave up root: the daemon runs as %s (uid %d), with %s (STOCKADE_DAEMON_USER=root keeps root)", user,
             uid, kept)  # fmt: skip


def _read_broker_key(config: DaemonConfig) -> None:
    """Put the broker's session key (its file, read as root) into this process's settings."""
    if not config.broker_socket or config.secret("session_key"):
        return
    path = config.session_key_file
    deadline = time.monotonic() + BROKER_KEY_WAIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"the broker's session key {path} did not appear in {BROKER_KEY_WAIT_S:g} s: start "
                "`stockade secretd` before the daemon (STOCKADE_BROKER_SOCKET names it)"
            )
        time.sleep(0.1)
    key = base64.b64encode(wire.read_key(path)).decode()
    settings.install(config.replace(session_key=settings.Secret(key)))
