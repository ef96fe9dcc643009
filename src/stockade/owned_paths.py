"""Directories whose files this process trusts: what to run, which pid to signal, which
environment a sandbox gets. Such a directory must be one no other user can change, nor swap
for one of their own: it is this user's (or root's) and writable by no one else, and so is
every directory above it, but for one writable by others with the sticky bit (/tmp), where no
user may move another's entries."""

from __future__ import annotations

import os
import stat

from .errors import ConfigError


class NotOwnedError(ConfigError):
    """A directory, or one above it, that another user could change (the message says which)."""


def check_owned(path: str, what: str) -> None:
    """Refuse ``path`` (``what`` names it: a setting, a store) unless it and every directory
    above it are as the module says, as named and where its links lead (each link on the way
    this user's or root's); a part of it not made yet is checked once it is."""
    for way in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        _check_way(way, path, what)


def _check_way(way: str, path: str, what: str) -> None:
    me = os.geteuid()
    parts = [p for p in way.split("/") if p]
    walked = "/"
    for depth in range(len(parts) + 1):
        if depth:
            walked = os.path.join(walked, parts[depth - 1])
        try:
            st = os.lstat(walked)
        except FileNotFoundError:
            return  # made later, by this user, below directories checked here
        if stat.S_ISLNK(st.st_mode) and st.st_uid in (0, me):
            continue  # where it leads is the other way checked
        others_write = st.st_mode & 0o022
        last = depth == len(parts)
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid not in (0, me)
            or (others_write and (last or not st.st_mode & stat.S_ISVTX))
        ):
            raise NotOwnedError(
                f"{what} {path}: {walked} belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}, so "
                "another user could change what is kept there or swap it: it and every directory above it must be "
                f"root's or uid {me}'s, and writable by no one else (above it, by others only with the sticky bit)"
            )
