"""What the MCP SDK's client session logs, which a server's messages set off: bounded."""

from __future__ import annotations

import logging

import pytest


def test_the_sdks_client_log_says_at_most_ten_records_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    # A server whose every notification failed the SDK's checks had a traceback logged for each,
    # 450 a second, within its message rate: 0.5 MB/s of log for as long as it was kept.
    from stockade.mcp.transport import SDK_CLIENT_LOG

    with caplog.at_level(logging.WARNING, logger="client"):
        for _ in range(1000):
            try:
                raise ValueError("not a notification")
            except ValueError:
                SDK_CLIENT_LOG.warning("Failed to validate notification: %s", "notifications/message", exc_info=True)
    said = [r for r in caplog.records if r.name == "client"]
    assert 1 <= len(said) <= 10, len(said)
