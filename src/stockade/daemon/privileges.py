"""``STOCKADE_DAEMON_USER``: the daemon started as root gives root up once it needs it no more.

Before the drop, as root: the process runtime's zygote is started (it stays
root, and holds every request to the sandbox uids: agent/confine.py
``check_request``), the cgroup parents and the uid leases are made the user's
(a delegated subtree), the daemon's socket is bound and the audit log opened.
Then the daemon becomes that user, with every capability gone but CAP_KILL
(its isolates run as other uids, and it must be able to end them). From then
on it can read the broker's session key (through the broker's group) but
neither the broker's secrets nor its memory.

What needs root later is gone with it: the gVisor and microVM runtimes (runsc
and the microVM's jail start as root) report themselves unavailable, Python
environments are no longer built on demand, and an allowlist isolate's direct
``connect`` attempts are still refused but no longer itemised (reading an
isolate's memory needs CAP_SYS_PTRACE, which would reach the broker's too).
"""

from __future__ import annotations

import logging
import os

from ..agent import linux
from ..broker import identities
from ..errors import ConfigError
from .config import DaemonConfig
from .controller import Controller

log = logging.getLogger("stockade.daemon")


def drop_root(config: DaemonConfig, controller: Controller) -> None:
    user = config.daemon_user
    assert user is not None
    if os.geteuid() != 0:
        raise ConfigError(f"STOCKADE_DAEMON_USER={user}: the daemon gives root up, so it must start as root")
    uid, gid = identities.ids_of(user)
    groups = os.getgrouplist(user, gid)  # the broker's group among them: the session key
    controller.manager.get("process").hand_to(uid, gid)  # type: ignore[attr-defined]
    if config.audit_log is not None:
        where = os.path.dirname(os.path.abspath(config.audit_log))
        os.chown(where, uid, gid)  # rotation renames in it
        for name in os.listdir(where):
            if name.startswith(os.path.basename(config.audit_log)):
                os.chown(os.path.join(where, name), uid, gid)
    if config.unix_socket and os.path.exists(config.socket):
        os.chown(config.socket, uid, -1)  # its group and mode stay what STOCKADE_SOCKET_PERMS made them
    linux.become_user_keeping(uid, gid, groups, keep=(linux.CAP_KILL,))
    log.info("gave up root: the daemon runs as %s (uid %d), with CAP_KILL alone", user, uid)
