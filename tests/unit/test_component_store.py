"""The component store's record of a start: one start of a name at a time."""

from __future__ import annotations

import multiprocessing
import queue
from pathlib import Path

import pytest

from stockade.components import ComponentState, ComponentStore
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


def test_a_start_is_checked_and_recorded_under_the_components_lock(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    store = ComponentStore(str(tmp_path))
    store.create("held", ["true"], {}, "no")
    store.save(ComponentState("held", "stopped"))
    context = multiprocessing.get_context("fork")
    said: multiprocessing.Queue[str] = context.Queue()
    go = context.Event()
    # Forked before the lock is taken: a child holding a copy of the lock's descriptor would hold it too.
    racer = context.Process(target=_create_named, args=(str(tmp_path), "held", go, said))
    racer.start()
    with store.locked("held"):  # as a `stop`, or another start, holds it
        go.set()
        with pytest.raises(queue.Empty):
            said.get(timeout=1)  # it waits for the lock: nothing checked, nothing written
        assert store.state("held").status == "stopped"
    assert said.get(timeout=30) == "started"
    racer.join(30)
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
