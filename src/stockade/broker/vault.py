"""Secrets an admin registers through the daemon, kept encrypted at rest by the broker.

``<state dir>/vault.key`` is a Fernet key (AES-128-CBC with HMAC-SHA256,
cryptography's ``Fernet``) that only the broker's user reads (0600, in its
0700 directory); ``<state dir>/vault`` is one Fernet token holding the JSON of
the registered secrets, rewritten whole (to a temporary file, then renamed)
on every change. The file the broker starts with (store.py) holds the others;
a name there cannot be registered over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from cryptography.fernet import Fernet, InvalidToken

from ..egress.allowlist import parse_rule
from ..errors import ConfigError, PolicyError
from .store import StoredSecret, check_value, parse_secrets

MAX_SECRETS = 1024
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class Vault:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(f"{directory} must be the broker's own directory, mode 0700")
        self._fernet = Fernet(self._key())
        self.secrets: dict[str, StoredSecret] = self._load()

    def _key(self) -> bytes:
        path = os.path.join(self.directory, "vault.key")
        try:
            with open(path, "rb") as f:
                return f.read().strip()
        except FileNotFoundError:
            pass
        key = Fernet.generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
        return key

    def _load(self) -> dict[str, StoredSecret]:
        path = os.path.join(self.directory, "vault")
        try:
            with open(path, "rb") as f:
                token = f.read()
        except FileNotFoundError:
            return {}
        try:
            document = json.loads(self._fernet.decrypt(token))
        except (InvalidToken, ValueError):
            raise ConfigError(f"{path} does not decrypt with its key: it was not written by this broker") from None
        # An entry of no hosts was registered before put required them: it is bound to none (any
        # host a caller's policy named would have had it) until it is registered again with its hosts.
        loaded = parse_secrets(document, path)
        return {n: s if s.hosts is not None else dataclasses.replace(s, hosts=()) for n, s in loaded.items()}

    def put(self, name: str, value: str, hosts: list[str]) -> None:
        if not _NAME.fullmatch(name):
            raise PolicyError(f"secret name {name!r} is not an environment variable name")
        if not hosts:  # one bound to any host would go wherever any caller's policy names
            raise PolicyError(f"secret {name}: name the hosts it may be bound to")
        try:
            check_value(name, value, "secret")
        except ConfigError as exc:
            raise PolicyError(str(exc)) from None
        for host in hosts:
            try:
                parse_rule(host)
            except ValueError as exc:
                raise PolicyError(f"secret {name}: {exc}") from None
        if name not in self.secrets and len(self.secrets) >= MAX_SECRETS:
            raise PolicyError(f"the vault holds {MAX_SECRETS} secrets already")
        self.secrets[name] = StoredSecret(value, tuple(hosts))
        self._save()

    def delete(self, name: str) -> bool:
        if self.secrets.pop(name, None) is None:
            return False
        self._save()
        return True

    def _save(self) -> None:
        document = {n: {"value": s.value, "hosts": list(s.hosts or ())} for n, s in self.secrets.items()}
        token = self._fernet.encrypt(json.dumps(document).encode())
        path = os.path.join(self.directory, "vault")
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
