"""The daemon's budget for answers its clients have not read (daemon/answers.py)."""

from __future__ import annotations

import pytest

from stockade.daemon.answers import AnswerBudget
from stockade.errors import DaemonBusyError


def test_one_owner_fills_its_share_and_everyone_the_whole() -> None:
    unsent = {"uid 1000": 0, "uid 1001": 0}
    budget = AnswerBudget(limit=100, share=40)
    budget.unsent.append(lambda owner: sum(unsent.values()) if owner is None else unsent.get(owner, 0))
    budget.check(40, "uid 1000")  # exactly its share
    unsent["uid 1000"] = 40
    with pytest.raises(DaemonBusyError, match="for uid 1000 that have not been read yet"):
        budget.check(1, "uid 1000")
    budget.check(40, "uid 1001")  # another's room is its own
    with budget.hold(30, "http"):  # an HTTP body being sent counts too
        unsent["uid 1001"] = 35
        with pytest.raises(DaemonBusyError, match="that their clients have not read yet"):
            budget.check(1, "uid 1002")  # the whole is full: 40 + 35 + 30 > 100
        with pytest.raises(DaemonBusyError, match="for http"):
            budget.check(11, "http")
    assert budget.sending == {} and budget.held() == 75  # what was sent is no longer counted
    budget.check(25, "uid 1002")


def test_a_caller_whose_unread_answers_fill_its_share_gets_no_new_work() -> None:
    mib = 1 << 20
    unsent = {"uid 1000": 0}
    budget = AnswerBudget(limit=100 * mib, share=50 * mib)
    budget.unsent.append(lambda owner: sum(unsent.values()) if owner is None else unsent.get(owner, 0))
    unsent["uid 1000"] = 50 * mib - 1
    budget.refuse_new("uid 1000")  # under its share: a run's answer may still be made
    unsent["uid 1000"] = 50 * mib
    with pytest.raises(DaemonBusyError, match="holds 50 MiB of answers for uid 1000 that have not been read yet"):
        budget.refuse_new("uid 1000")
    budget.refuse_new("uid 1001")  # its own room is untouched
    unsent["uid 1000"] = 45 * mib
    with budget.hold(60 * mib, "http"):  # the whole is full: those with answers in it get no more
        with pytest.raises(DaemonBusyError, match=r"holds 105 MiB .* \(at most 100 MiB\)"):
            budget.refuse_new("uid 1000")
        with pytest.raises(DaemonBusyError, match="for http"):
            budget.refuse_new("http")
        budget.refuse_new("uid 1001")  # one with none of its own is not held to the others' account
    budget.refuse_new("uid 1000")
