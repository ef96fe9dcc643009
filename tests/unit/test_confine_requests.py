"""What a root zygote holds its caller's requests to (agent/confine.py ``check_request``)."""

from __future__ import annotations

import os

import pytest

from stockade.agent import confine

FIRST, LAST = 1879048192, 1879048199


@pytest.mark.skipif(os.getuid() != 0, reason="a rootless zygote holds requests to nothing: it has no more power")
@pytest.mark.parametrize("odd_only", [False, True])
def test_a_daemon_that_gave_root_up_gets_the_odd_places_of_the_range_and_root_all(
    monkeypatch: pytest.MonkeyPatch, odd_only: bool
) -> None:
    monkeypatch.setattr(confine, "SANDBOX_UIDS", (FIRST, LAST))
    monkeypatch.setattr(confine, "ODD_UIDS_ONLY", odd_only)
    for uid in range(FIRST, LAST + 1):
        request = {"cgroup_procs": [], "outer_uid": uid, "outer_gid": uid}
        if odd_only and (uid - FIRST) % 2 == 0:
            with pytest.raises(ValueError, match=f"outer uid {uid} is root's to lease"):
                confine.check_request(request)
        else:
            confine.check_request(request)  # taken
    with pytest.raises(ValueError, match="is not one of the sandbox uids"):
        confine.check_request({"cgroup_procs": [], "outer_uid": LAST + 1, "outer_gid": LAST + 1})


def test_the_range_and_its_half_are_read_from_the_zygotes_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confine, "SANDBOX_UIDS", None)
    monkeypatch.setattr(confine, "ODD_UIDS_ONLY", False)
    confine.hold_to(f"{FIRST}-{LAST}:odd", [])
    assert (confine.SANDBOX_UIDS, confine.ODD_UIDS_ONLY) == ((FIRST, LAST), True)
    confine.hold_to(f"{FIRST}-{LAST}", [])
    assert (confine.SANDBOX_UIDS, confine.ODD_UIDS_ONLY) == ((FIRST, LAST), False)
