"""What the runtime manager says when a policy's runtime cannot be had here."""

from __future__ import annotations

import pytest

from stockade.errors import RuntimeUnavailableError
from stockade.policy import Policy
from stockade.runtimes.manager import RuntimeManager


def test_a_root_runtime_refused_by_a_daemon_without_root_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_DAEMON_USER", "stockade")
    monkeypatch.setattr("os.geteuid", lambda: 998)  # as the daemon runs once it gave root up
    with pytest.raises(RuntimeUnavailableError, match=r"^runtime gvisor needs root, which this daemon gave up"):
        RuntimeManager(pool_size=0).select(Policy(runtime="gvisor"))
