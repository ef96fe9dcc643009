"""The daemon's settings from the environment: defaults, and a clear refusal of bad values."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize("name", ["STOCKADE_AUTH_TOKEN", "STOCKADE_API_TOKEN"])
@pytest.mark.parametrize(
    "value", ["<token-from-/etc/stockade/token>", "<token>", "a token with spaces", "tok\x1bken-0123456789"]
)
def test_a_placeholder_is_no_token(name: str, value: str) -> None:
    # The shipped env file's placeholder, left in place, would be a token anyone can read in the repository.
    with pytest.raises(ConfigError, match=f"{name} looks like a placeholder"):
        DaemonConfig.from_env({name: value})
    assert DaemonConfig.from_env({name: "Zx8-_0123456789abcdef"}).secret(name.removeprefix("STOCKADE_").lower())


def test_an_api_token_file_is_checked_as_the_variable_is(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("<token-from-stockade-token-new>\n")
    with pytest.raises(ConfigError, match=f"--api-token-file {token} looks like a placeholder"):
        DaemonConfig.from_env({}).with_http("127.0.0.1:0", str(token))
