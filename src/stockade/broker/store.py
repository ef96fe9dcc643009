"""The secrets themselves: a file only their keeper may read.

The file is JSON, one member per secret: ``{"OPENAI_API_KEY": "sk-..."}``, or
with the hosts it may ever be bound to ``{"OPENAI_API_KEY": {"value": "sk-...",
"hosts": ["api.openai.com"]}}``: a policy that binds it to any other host is
refused by whoever holds the store (the broker), whatever the daemon asks.

The file must be a regular file of the reading uid with no access for group
or others (``0600``): a secrets file anyone else can read is not used.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..egress.allowlist import parse_rule
from ..errors import ConfigError, PolicyError

if TYPE_CHECKING:
    from .vault import Vault

log = logging.getLogger("stockade.secrets")

MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class StoredSecret:
    value: str
    hosts: tuple[str, ...] | None  # None: any host a policy names


class SecretStore:
    """The broker's secrets: those of its file, and (``vault``) those an admin registered."""

    def __init__(self, secrets: dict[str, StoredSecret]) -> None:
        self._secrets = secrets
        self.vault: Vault | None = None

    @property
    def _all(self) -> dict[str, StoredSecret]:
        return {**(self.vault.secrets if self.vault is not None else {}), **self._secrets}

    def from_file(self, name: str) -> bool:
        return name in self._secrets

    @classmethod
    def load(cls, path: str, owner: int | None = None) -> SecretStore:
        """The secrets of ``path``, a file of ``owner`` (default: this process's uid), 0600 or 0400."""
        owner = os.geteuid() if owner is None else owner
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConfigError(f"secrets file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"secrets file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise ConfigError(f"secrets file {path} has mode {st.st_mode & 0o777:04o}: it must be 0600 or 0400")
            if st.st_uid != owner:
                raise ConfigError(f"secrets file {path} belongs to uid {st.st_uid}, not to its keeper ({owner})")
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(f"secrets file {path} is larger than {MAX_FILE_BYTES} bytes")
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(
                f"secrets file {path} is not JSON: {exc} (expected "
                '{"NAME": {"value": "...", "hosts": ["api.example.com"]}}, one entry per secret)'
            ) from None
        return cls(parse_secrets(document, f"secrets file {path}"))

    def names(self) -> list[str]:
        return sorted(self._all)

    def hosts_of(self, name: str) -> tuple[str, ...] | None:
        stored = self._all.get(name)
        return stored.hosts if stored is not None else None

    def check_grant(self, name: str, hosts: Iterable[str], *, hostless: bool = False) -> StoredSecret:
        """The secret ``name``, if it exists and may be bound to every one of ``hosts``.

        ``hostless``: one stored with no hosts may be bound to any, which only a process with one
        trusted caller allows (stockade as a library). Where several may grant it (the broker, a
        daemon), any of them could bind it to a server of its own and be sent its value there; and
        none of them learns from a refusal which secrets exist or the hosts each is kept for
        (``secrets.list`` is an admin's): they get one refusal, and this process's log says why."""
        hosts = tuple(hosts)
        stored = self._all.get(name)
        why = self._refusal(name, hosts, stored, hostless)
        if why is None:
            assert stored is not None
            return stored
        if hostless:  # its one trusted caller: told why
            raise PolicyError(why)
        log.warning("a grant of secret %s was refused: %s", name, why)
        raise PolicyError(
            f"secret {name} is not granted for {', '.join(hosts) or 'no host'}: no such secret is kept here, or "
            "it is kept for other hosts (an admin sees which: `stockade secrets ls`; the log says why)"
        )

    def _refusal(self, name: str, hosts: tuple[str, ...], stored: StoredSecret | None, hostless: bool) -> str | None:
        if stored is None:
            return f"secret {name} is not known to the secrets broker"
        if stored.hosts is None and not hostless:
            return (
                f"secret {name} names no hosts it may be sent to, and every caller here may grant it (one could "
                f'send it to a server of its own): give it hosts in its file, {{"{name}": {{"value": ..., '
                '"hosts": ["api.example.com"]}}'
            )
        if stored.hosts == ():
            where = (
                "its entry in the broker's secrets file names none"
                if self.from_file(name)
                else f"registered before hosts were required, put it again: `stockade secrets put {name} --host ...`"
            )
            return f"secret {name} may be bound to no host: {where}"
        if not hosts:
            return f"secret {name} was asked for no host: a grant names the hosts its value may be sent to"
        if stored.hosts is not None:
            permitted = [parse_rule(h) for h in stored.hosts]
            for host in hosts:
                try:
                    rule = parse_rule(host)
                except ValueError as exc:
                    return f"secret {name} may not be bound to {host!r}: {exc}"
                if not any(_within(rule.host, p.host) and (p.port is None or p.port == rule.port) for p in permitted):
                    return f"secret {name} may not be bound to {host}: its keeper allows only {', '.join(stored.hosts)}"
        return None


def _within(host: str, permitted: str) -> bool:
    if host == permitted:  # "*.example.com" asked of a keeper that allows "*.example.com"
        return True
    if permitted.startswith("*."):
        bare = host.removeprefix("*.")
        return bare.endswith(permitted[1:]) and len(bare) > len(permitted) - 1
    return host == permitted


MAX_VALUE_BYTES = 64 * 1024


def check_value(name: str, value: str, where: str) -> None:
    """A value that can stand in an HTTP header as it is: visible ASCII and inner spaces, nothing at
    its ends (a line break or a control character would be refused by the proxy, with the value in
    the refusal), at most 64 KiB."""
    if (
        not value
        or len(value.encode()) > MAX_VALUE_BYTES
        or value != value.strip(" \t")
        or any(not (" " <= c <= "~") for c in value)
    ):
        raise ConfigError(
            f"{where}: {name}: a value is 1 to {MAX_VALUE_BYTES} bytes of visible ASCII and inner spaces, "
            "with no space, tab, line break or control character at its ends or inside"
        )


def parse_secrets(document: object, where: str) -> dict[str, StoredSecret]:
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: expected an object of NAME: value")
    found: dict[str, StoredSecret] = {}
    for name, given in document.items():
        entry = {"value": given} if isinstance(given, str) else given
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str) or not entry["value"]:
            raise ConfigError(f'{where}: {name} must be a non-empty string, or {{"value": ..., "hosts": [...]}}')
        check_value(name, entry["value"], where)
        hosts = entry.get("hosts")
        if hosts is not None:
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ConfigError(f"{where}: {name}.hosts must be a list of host names")
            try:
                for host in hosts:
                    parse_rule(host)
            except ValueError as exc:
                raise ConfigError(f"{where}: {name}: {exc}") from None
        found[name] = StoredSecret(entry["value"], tuple(hosts) if hosts is not None else None)
    return found
