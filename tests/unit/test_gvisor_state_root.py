"""runsc's state directory is this user's alone before runsc is pointed at it.

Rootless without XDG_RUNTIME_DIR it is /tmp/stockade-runsc-UID: another user who made that first
could plant container state there, and the start-up sweep ran ``runsc delete --force`` on it (runsc
then signals the pid the state names).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.errors import SandboxStartError
from stockade.runtimes import gvisor_state

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a directory of another uid's is made with chown, as root")


def test_a_fresh_state_root_is_made_this_users_alone(tmp_path: Path) -> None:
    root = tmp_path / "stockade-runsc-test"
    assert gvisor_state.made_state_root(str(root)) == str(root)
    assert root.stat().st_mode & 0o777 == 0o700 and root.stat().st_uid == os.geteuid()
    gvisor_state.made_state_root(str(root))  # and again, as it is


def test_a_state_root_others_may_read_or_that_is_a_link_is_refused(tmp_path: Path) -> None:
    open_one = tmp_path / "open"
    open_one.mkdir(mode=0o755)
    open_one.chmod(0o755)
    with pytest.raises(SandboxStartError, match="with mode 0700"):
        gvisor_state.made_state_root(str(open_one))
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "private")
    with pytest.raises(SandboxStartError, match="must be a directory owned by uid"):
        gvisor_state.made_state_root(str(tmp_path / "link"))


@needs_root
def test_state_planted_in_another_users_directory_is_never_acted_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / f"stockade-runsc-{os.geteuid()}"
    planted.mkdir(mode=0o700)
    (planted / "stockade-999999999-abc.state").write_text("{}")  # a dead host's sandbox, by its name
    os.chown(planted, 4242, 4242)
    deleted: list[str] = []
    monkeypatch.setattr(gvisor_state, "runsc_delete", lambda root, name: deleted.append(name))
    gvisor_state.sweep_state(str(planted))
    assert deleted == []
    with pytest.raises(SandboxStartError, match="owned by uid 4242"):
        gvisor_state.made_state_root(str(planted))
    # The same state in a directory of its own is swept (so the test above can fail).
    os.chown(planted, os.geteuid(), os.getegid())
    gvisor_state.sweep_state(str(planted))
    assert deleted == ["stockade-999999999-abc"]
