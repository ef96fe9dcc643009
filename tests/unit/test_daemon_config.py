"""The daemon's settings from the environment: defaults, and a clear refusal of bad values."""

from __future__ import annotations

import pytest

from stockade.daemon.config import DaemonConfig
from stockade.errors import ConfigError


def test_the_idle_timeout_defaults_to_ten_minutes_and_zero_means_never() -> None:
    assert DaemonConfig.from_env({}).sandbox_idle_timeout == 600.0
    assert DaemonConfig.from_env({"STOCKADE_SANDBOX_IDLE_TIMEOUT": ""}).sandbox_idle_timeout == 600.0
    assert DaemonConfig.from_env({"STOCKADE_SANDBOX_IDLE_TIMEOUT": "2.5"}).sandbox_idle_timeout == 2.5
    assert DaemonConfig.from_env({"STOCKADE_SANDBOX_IDLE_TIMEOUT": "0"}).sandbox_idle_timeout is None


@pytest.mark.parametrize("name", ["STOCKADE_SANDBOX_IDLE_TIMEOUT", "STOCKADE_QUEUE_TIMEOUT", "STOCKADE_SHUTDOWN_GRACE"])
@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_number_of_seconds_is_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        DaemonConfig.from_env({name: value})


def test_a_per_uid_cap_is_off_unless_set() -> None:
    assert DaemonConfig.from_env({}).max_sandboxes_per_uid is None
    assert DaemonConfig.from_env({"STOCKADE_MAX_SANDBOXES_PER_UID": "2"}).max_sandboxes_per_uid == 2
    with pytest.raises(ConfigError, match="STOCKADE_MAX_SANDBOXES_PER_UID"):
        DaemonConfig.from_env({"STOCKADE_MAX_SANDBOXES_PER_UID": "0"})
