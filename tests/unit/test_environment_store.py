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
    monkeypatch.setattr(environments, "_pinned_pip", None)
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
    environments.pin_root_view()
    monkeypatch.setattr(os, "getuid", lambda: 998)
    assert environments.store_root() == environments.SYSTEM_STORE
    assert environments.env_path("abc") == os.path.join(environments.SYSTEM_STORE, "envs", "abc")


def test_a_process_that_gives_root_up_names_environments_as_root_did(
    unconfigured: None, monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    # Root's pip.conf (under /root, 0700) names its index: the environment's id covers it. The
    # daemon's user cannot read it, yet must find the environments root built under that id.
    for name in ("PIP_CONFIG_FILE", "PIP_INDEX_URL", "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS"):
        monkeypatch.delenv(name, raising=False)
    os.makedirs(os.path.join(tmp_path, ".config", "pip"))
    with open(os.path.join(tmp_path, ".config", "pip", "pip.conf"), "w") as f:
        f.write("[global]\nindex-url = https://mirror.example/simple\n")
    as_root = environments.content_id(("pandas",))
    assert ("index-url", "https://mirror.example/simple") in environments.pip_settings()
    environments.pin_root_view()
    monkeypatch.setenv("HOME", os.path.join(str(tmp_path), "elsewhere"))  # its own home, no pip.conf
    assert environments.content_id(("pandas",)) == as_root
    monkeypatch.setattr(environments, "_pinned_pip", None)
    assert environments.content_id(("pandas",)) != as_root  # unpinned, it would not find them
