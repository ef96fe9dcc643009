"""The component store's record of a start: one start of a name at a time."""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from stockade.components import ComponentState, ComponentStore, remove
from stockade.errors import StockadeError


def _create(root: str, barrier: multiprocessing.synchronize.Barrier, said: multiprocessing.Queue[str]) -> None:
    store = ComponentStore(root)
    barrier.wait()
    try:
        store.create("race", ["sleep", "1"], {}, "no", replace=True)
        said.put("started")
    except StockadeError as exc:
        said.put(str(exc))


def test_starts_of_one_name_at_once_record_one(tmp_path: Path) -> None:
    # Each found the name free before any had written it: the second's supervisor then ran
    # unrecorded, out of `stop`'s reach.
    tmp_path.chmod(0o700)
    context = multiprocessing.get_context("fork")
    barrier, said = context.Barrier(6), context.Queue()
    racers = [context.Process(target=_create, args=(str(tmp_path), barrier, said)) for _ in range(6)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    answers = sorted(said.get(timeout=10) for _ in racers)
    assert answers.count("started") == 1, answers
    assert all("is already starting" in a for a in answers if a != "started"), answers
    assert ComponentStore(str(tmp_path)).state("race").status == "starting"


def _stopped_component(tmp_path: Path) -> ComponentStore:
    """A store holding one component, "held", that has stopped."""
    tmp_path.chmod(0o700)
    store = ComponentStore(str(tmp_path))
    store.create("held", ["true"], {}, "no")
    store.save(ComponentState("held", "stopped"))
    return store


def _racing(
    tmp_path: Path, racer: Callable[[str, str, Event, multiprocessing.Queue[str]], None]
) -> tuple[Callable[[], None], multiprocessing.Queue[str], Callable[[], str]]:
    """``racer`` (on "held") in a process forked before the test takes the lock (a child holding a
    copy of the lock's descriptor would hold it too); what sets it going and returns once it waits
    for the lock (the kernel's list of locks shows it blocked), and what it says."""
    context = multiprocessing.get_context("fork")
    said: multiprocessing.Queue[str] = context.Queue()
    go = context.Event()
    process = context.Process(target=racer, args=(str(tmp_path), "held", go, said))
    process.start()

    def waiting() -> None:
        go.set()
        deadline = time.monotonic() + 30
        while not _blocked_on_a_lock(process.pid or 0):
            assert time.monotonic() < deadline, "the racer never waited for the lock"
            time.sleep(0.01)

    def answer() -> str:
        text = said.get(timeout=30)
        process.join(30)
        return text

    return waiting, said, answer


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether ``pid`` waits for a flock (/proc/locks: "N: -> FLOCK ADVISORY WRITE PID ...")."""
    with open("/proc/locks") as f:
        return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid) for line in f)


def test_a_start_is_checked_and_recorded_under_the_components_lock(tmp_path: Path) -> None:
    store = _stopped_component(tmp_path)
    waiting, said, answer = _racing(tmp_path, _create_named)
    with store.locked("held"):  # as a `stop`, or another start, holds it
        waiting()
        with pytest.raises(queue.Empty):
            said.get(timeout=1)  # it waits for the lock: nothing checked, nothing written
        assert store.state("held").status == "stopped"
    assert answer() == "started"
    assert store.state("held").status == "starting"


def _create_named(
    root: str, name: str, go: multiprocessing.synchronize.Event, said: multiprocessing.Queue[str]
) -> None:
    go.wait(30)
    try:
        ComponentStore(root).create(name, ["true"], {}, "no", replace=True)
        said.put("started")
    except StockadeError as exc:
        said.put(str(exc))


def _remove_named(
    root: str, name: str, go: multiprocessing.synchronize.Event, said: multiprocessing.Queue[str]
) -> None:
    go.wait(30)
    try:
        said.put(remove(name, ComponentStore(root)).status)
    except StockadeError as exc:
        said.put(str(exc))


def test_a_remove_is_checked_and_done_under_the_components_lock(tmp_path: Path) -> None:
    # It read the state unlocked, then deleted the directory: a start of the name in between ran
    # with its record deleted under it, out of `stop`'s reach.
    store = _stopped_component(tmp_path)
    waiting, said, answer = _racing(tmp_path, _remove_named)
    with store.locked("held"):  # a start of it holds this while it records
        waiting()
        with pytest.raises(queue.Empty):
            said.get(timeout=1)
        assert store.state("held").status == "stopped"
        store.save(ComponentState("held", "starting"))  # the start recorded, then lets go
    said_after = answer()
    assert "is starting: stop it first" in said_after, said_after
    assert store.state("held").status == "starting"  # kept whole


def test_a_start_that_waited_for_a_removed_components_lock_makes_it_anew(tmp_path: Path) -> None:
    # Its lock was of the directory `rm` deleted: it went on to write into a directory that was gone.
    store = _stopped_component(tmp_path)
    waiting, said, answer = _racing(tmp_path, _create_named)
    with store.locked("held"):  # as `rm` holds it while it deletes
        waiting()
        with pytest.raises(queue.Empty):
            said.get(timeout=1)
        store.remove("held")
    assert answer() == "started"
    assert store.state("held").status == "starting"
    assert store.spec("held")["argv"] == ["true"]


def test_a_removed_component_is_gone_for_those_that_wait_for_its_lock(tmp_path: Path) -> None:
    store = _stopped_component(tmp_path)
    assert remove("held", store).status == "stopped"
    with pytest.raises(StockadeError, match="no component named 'held'"):
        remove("held", store)
    with pytest.raises(StockadeError, match="no component named 'held'"), store.locked("held"):
        pass
