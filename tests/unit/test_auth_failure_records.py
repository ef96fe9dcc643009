"""A flood of bad tokens from many addresses cannot rotate the audit log's real records away.

Found by attack: the records were limited per (door, address), so 3,000 bad requests from
3,000 addresses of 127/8 wrote 3,000 records in 4 s (the loopback is one network since; 3,000
networks of 10/8 stand for them here) (the 10 x 64 MB of history would rotate away
within the hour, and an IPv6 /64 holds more addresses than that)."""

from __future__ import annotations

import json
from pathlib import Path

from stockade.audit import AuditLog
from stockade.daemon.observers import AUTH_RECORDS_BURST, Observers


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_failures_from_many_addresses_are_counted_not_each_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    observers = Observers(audit=AuditLog(str(path)))
    for i in range(3000):
        observers.auth_failure("http", f"10.{i // 256 % 256}.{i % 256}.{i % 7}", "/api/v1/sandbox/execute")
    for i in range(50):  # one network's addresses share its window: one record for all of them
        observers.auth_failure("http", f"192.168.5.{i}", "/health")
    observers.close()
    records = _records(path)
    failures = [r for r in records if r["event"] == "auth_failure"]
    # The burst, and perhaps a token or two refilled while the loop ran; not one per address.
    assert AUTH_RECORDS_BURST <= len(failures) <= AUTH_RECORDS_BURST + 5, len(failures)
    (rest,) = [r for r in records if r["event"] == "auth_failures_unrecorded" and r["peer"] == "any"]
    counted = sum(int(r["unrecorded_before"]) + int(r["unrecorded_elsewhere"]) for r in failures)  # type: ignore[call-overload]
    counted += sum(int(r["count"]) for r in records if r["event"] == "auth_failures_unrecorded")  # type: ignore[call-overload]
    assert counted + len(failures) == 3050  # every failure recorded or counted, none lost
    assert int(rest["count"]) > 2900  # type: ignore[call-overload]
