"""Where the environment store is (environments.store_root), and that a daemon giving root up keeps it."""

from __future__ import annotations

import os

import pytest

from stockade import environments, settings


@pytest.fixture
def unconfigured(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.delenv("STOCKADE_ENV_STORE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(environments, "_pinned_store", None)
    assert settings.current().env_store is None  # read from the environment as it is now


def test_root_uses_the_system_store_and_a_user_its_cache(unconfigured: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert environments.store_root() == environments.SYSTEM_STORE
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    assert environments.store_root() == os.path.join(os.environ["HOME"], ".cache", "stockade", "envs")


def test_a_process_that_gives_root_up_keeps_the_store_it_pinned(
    unconfigured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon pins it as root (privileges.drop_root), then runs as its own user: environments
    # built with `stockade env build` as root are still found.
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert environments.pin_store_root() == environments.SYSTEM_STORE
    monkeypatch.setattr(os, "getuid", lambda: 998)
    assert environments.store_root() == environments.SYSTEM_STORE
    assert environments.env_path("abc") == os.path.join(environments.SYSTEM_STORE, "envs", "abc")
