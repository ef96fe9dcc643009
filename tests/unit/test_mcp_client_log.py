"""What the MCP SDK's loggers say, which a server's messages set off: bounded."""

from __future__ import annotations

import logging

import pytest

from stockade.mcp.transport import SDK_LOGS, _Sparing


def test_each_of_the_sdks_logs_is_spared() -> None:
    for name in SDK_LOGS:
        assert [f for f in logging.getLogger(name).filters if isinstance(f, _Sparing)], name


def test_a_spared_log_says_at_most_ten_records_a_minute_then_how_many_it_left_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server whose every notification failed the SDK's checks had a traceback logged for each,
    # 450 a second, within its message rate: 0.5 MB/s of log for as long as it was kept.
    log = logging.getLogger("stockade-test.spared")
    spared = _Sparing()
    log.addFilter(spared)
    now = [1000.0]
    monkeypatch.setattr("stockade.mcp.transport.time.monotonic", lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(1000):
            try:
                raise ValueError("not a notification")
            except ValueError:
                log.warning("Failed to validate notification: %s", "notifications/message", exc_info=True)
        assert len([r for r in caplog.records if r.name == log.name]) == 10
        now[0] += 61
        log.warning("Failed to validate notification: %s", "notifications/message")
    said = [r for r in caplog.records if r.name == log.name]
    assert len(said) == 11 and "(990 records of this log left out before it)" in said[-1].getMessage()
    assert said[-1].levelno == logging.WARNING
