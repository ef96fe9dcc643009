"""Directories whose files this process trusts: what to run, which pid to signal, which
environment a sandbox gets. Such a directory must be one no other user can change, nor swap
for one of their own: it is this user's (or root's) and writable by no one else, and so is
every directory above it, but for one writable by others with the sticky bit (/tmp), where no
user may move another's entries (a group that is the owner's own counts as the owner)."""

from __future__ import annotations

import grp
import os
import pwd
import stat

from .errors import ConfigError


class NotOwnedError(ConfigError):
    """A directory, or one above it, that another user could change (the message says which)."""


def check_owned(path: str, what: str, sticky: bool = False) -> None:
    """Refuse ``path`` (``what`` names it: a setting, a store) unless it and every directory
    above it are as the module says, as named and where its links lead (each link on the way
    this user's or root's); a part of it not made yet is checked once it is. ``sticky``: ``path``
    too may be writable by others with the sticky bit (a socket's directory: no other user may
    move the socket made there)."""
    for way in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        _check_way(way, path, what, sticky)


def _check_way(way: str, path: str, what: str, sticky: bool) -> None:
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
        if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            raise NotOwnedError(f"{what} {path}: {walked} is not a directory")
        others_write = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _private_group(st))
        last = depth == len(parts) and not sticky
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


def _private_group(st: os.stat_result) -> bool:
    """Whether the directory's group is its owner's own: named as the owner, no other member (the
    group Debian, Ubuntu and Fedora give each user, whose umask 002 makes directories 0775)."""
    try:
        owner, group = pwd.getpwuid(st.st_uid), grp.getgrgid(st.st_gid)
    except KeyError:
        return False
    return group.gr_name == owner.pw_name and owner.pw_gid == st.st_gid and set(group.gr_mem) <= {owner.pw_name}
