"""Directories whose files stockade trusts (components' state: what to run, which pid to signal;
the environment store: what runs in sandboxes, where builds write as root) are refused where
another user could change them or swap one on the way (found by an attacker's review: a user
owning STOCKADE_STATE_DIR swapped root's components/ and had root run its command unconfined)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from stockade.components import ComponentStore
from stockade.owned_paths import NotOwnedError, check_owned

NOBODY = 65534
STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")


@pytest.fixture
def place() -> Iterator[str]:
    """A directory of root's, 0755, under /tmp (sticky), removed after."""
    path = tempfile.mkdtemp(prefix="stockade-owned-")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", path], check=True)


def test_a_directory_another_user_owns_or_one_above_it_is_refused(place: str) -> None:
    theirs = os.path.join(place, "theirs")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, NOBODY, NOBODY)
    for path in (theirs, os.path.join(theirs, "state"), os.path.join(theirs, "not-made", "yet")):
        with pytest.raises(NotOwnedError, match=f"{theirs} belongs to uid {NOBODY}"):
            check_owned(path, "the test's")
    shared = os.path.join(place, "shared")
    os.mkdir(shared, 0o777)
    os.chmod(shared, 0o777)  # writable by others, no sticky bit: an entry in it can be swapped
    with pytest.raises(NotOwnedError, match="writable by no one else"):
        check_owned(os.path.join(shared, "state"), "the test's")
    os.chmod(shared, 0o1777)  # sticky: no user may move another's entries (as /tmp)
    check_owned(os.path.join(shared, "state"), "the test's")
    with pytest.raises(NotOwnedError):
        check_owned(shared, "the test's")  # but the directory itself is written by others
    link = os.path.join(shared, "link")
    os.symlink(theirs, link)
    with pytest.raises(NotOwnedError, match=f"{theirs} belongs to uid {NOBODY}"):
        check_owned(link, "the test's")  # where a link leads is checked too
    os.unlink(link)
    os.symlink(place, link)
    os.lchown(link, NOBODY, NOBODY)  # a link of theirs in a sticky directory: theirs to point elsewhere
    with pytest.raises(NotOwnedError, match=f"{link} belongs to uid {NOBODY}"):
        check_owned(os.path.join(link, "state"), "the test's")
    check_owned(os.path.join(place, "mine", "state"), "the test's")  # root's all the way, or not made yet


def test_components_and_environments_are_kept_only_where_no_other_user_can_change_them(place: str) -> None:
    theirs = os.path.join(place, "theirs")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(NotOwnedError, match="components' state"):
        ComponentStore(theirs)
    env = {**os.environ, "STOCKADE_STATE_DIR": theirs, "STOCKADE_ENV_STORE": os.path.join(theirs, "envs")}
    for command in (["ps"], ["env", "ls"]):
        said = subprocess.run([STOCKADE, *command], env=env, capture_output=True, text=True, timeout=60)
        assert said.returncode != 0 and f"{theirs} belongs to uid {NOBODY}" in said.stderr, (command, said.stderr)
    assert os.listdir(theirs) == []  # nothing made in it


def test_a_directory_its_owners_own_group_may_write_is_the_owners(place: str) -> None:
    # Debian, Ubuntu and Fedora give each user a group of their own and umask 002: ~/.local is 0775.
    own = os.path.join(place, "own")
    os.mkdir(own)
    os.chmod(own, 0o775)  # root's, group root (root's own, no other member)
    check_owned(os.path.join(own, "state"), "the test's")
    os.chown(own, 0, NOBODY)  # a group of others': nogroup
    with pytest.raises(NotOwnedError, match="writable by no one else"):
        check_owned(os.path.join(own, "state"), "the test's")


def test_a_file_where_a_directory_is_named_is_said_to_be_one(tmp_path: object) -> None:
    # It read "belongs to uid 0 with mode 0644, so another user could change what is kept there".
    a_file = os.path.join(str(tmp_path), "a-file")
    with open(a_file, "w"):
        pass
    with pytest.raises(NotOwnedError, match=r"a-file is not a directory$"):
        check_owned(os.path.join(a_file, "components"), "the state")
